"""Turns a SchedulerOutput into one forward pass and sampled tokens.

Owns the model weights, the KV block pool and the sampler. Policy (who runs,
how many tokens) is the scheduler's; the runner only lays the scheduled tokens
out as a flat batch (decode tokens first, then prefill spans), builds the slot
mapping and block tables, runs the model, and samples for the requests whose
step reaches their last token; a request verifying speculative proposals samples at each of
them and takes the accepted prefix (`loomlm.spec_decode.rejection`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from loomlm.config import CacheConfig, KernelConfig, LoRAConfig, ModelConfig
from loomlm.distributed.parallel_state import TensorParallel
from loomlm.distributed.tensor_parallel import check_tensor_parallel, parallelize, shard_config, shard_weights
from loomlm.distributed.worker import stop_workers
from loomlm.engine.sampling_metadata import SamplingMetadata
from loomlm.engine.scheduler import GrammarBitmask, SchedulerOutput
from loomlm.layers.decode_attention import DECODE_BACKENDS, select_decode_backend
from loomlm.layers.forward_context import ForwardBatch, PrefillSpan, forward_context
from loomlm.layers.fused_ops import select_fused_ops
from loomlm.layers.linear import Linear
from loomlm.layers.moe import SparseMoeBlock
from loomlm.layers.lora import LoRABatch
from loomlm.layers.linear_method import GGUFLinearMethod, select_linear_method
from loomlm.layers.packed_gemm import return_freed_memory
from loomlm.layers.sampler import LogprobsTensors, Sampler, gather_logprobs
from loomlm.lora.manager import LoRAManager
from loomlm.models.registry import model_class_for
from loomlm.spec_decode.rejection import accepted_prefix

logger = logging.getLogger(__name__)


@dataclass
class PositionLogprobs:
    """Logprobs at one position: the chosen token first, then the top alternatives."""

    token_ids: list[int]  # [chosen, top-1, top-2, ...]
    logprobs: list[float]  # natural log, aligned with token_ids
    rank: int  # the chosen token's rank (1 = most likely)


@dataclass
class ModelRunnerOutput:
    # request_id -> the tokens it takes this step (only requests that reached their last token):
    # one sampled token, or with speculative decoding the accepted proposals, then the target's token
    sampled_token_ids: dict[str, list[int]]
    # request_id -> logprobs of each of those tokens (requests with needs_logprobs)
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # request_id -> logprobs of the prompt tokens whose predicting position ran this step, in order
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # request_id -> the embedding of a pooling request whose prompt finished prefilling this step
    pooled: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class StepInput:
    """What a step's forward pass needs, in plain lists (rank 0 broadcasts it to the other
    tensor-parallel ranks): the flat batch, decode tokens first, then prefill spans."""

    input_ids: list[int] = field(default_factory=list)  # [num_tokens]
    positions: list[int] = field(default_factory=list)  # [num_tokens]
    slot_mapping: list[int] = field(default_factory=list)  # [num_tokens]: where each token's K/V goes
    num_decode_tokens: int = 0
    decode_tables: list[list[int]] = field(default_factory=list)  # per decode token: its sequence's block table
    decode_lens: list[int] = field(default_factory=list)  # per decode token: its context length (itself included)
    # per prefill span: (first row, end row, context length, block table)
    spans: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    token_slots: list[int] | None = None  # per token: its adapter slot (-1 base); None without adapters
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) KV block copies before the pass
    logits_rows: list[int] = field(default_factory=list)  # rows whose logits are sampled
    prompt_rows: list[int] = field(default_factory=list)  # rows whose logits give prompt logprobs
    # The adapters rank 0 installed this step (LoRAManager.activate's arguments; None: none), so
    # that every tensor-parallel rank's slots follow the same sequence of installs and evictions.
    loras: tuple[dict, list[str]] | None = None


class ModelRunner:
    """Owns the model, the KV pool and the sampler; `execute()` runs one scheduled step."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, hf_config, weights,
                 max_model_len: int, kernel_config: KernelConfig | None = None,
                 lora_config: LoRAConfig | None = None, tp: TensorParallel | None = None) -> None:
        """weights: iterable of (HF name, tensor); `kernel_config`: the kernel switches (None: the
        defaults); `lora_config` with enable_lora: the runner owns the adapter slots (`lora_manager`).

        `tp`: this process's tensor-parallel rank (None: the whole model here): the runner holds its
        shard of the weights and its heads' KV pool (`loomlm.distributed.tensor_parallel`).

        Raises ValueError when the checkpoint does not fit the config, a forced attention backend
        cannot run here, or the model cannot be cut `tp.world_size` ways."""
        kernel_config = kernel_config or KernelConfig()
        self.device = model_config.torch_device
        self.dtype = model_config.torch_dtype
        self.hf_config = hf_config
        self.vocab_size = hf_config.vocab_size
        self.block_size = cache_config.block_size
        self.tp = tp
        model_config_hf = hf_config
        if tp is not None:
            check_tensor_parallel(hf_config, tp.world_size)
            model_config_hf = shard_config(hf_config, tp.world_size)
            weights = shard_weights(weights, hf_config, tp)
        start = time.perf_counter()
        with torch.device("cpu"):
            model = model_class_for(hf_config)(model_config_hf, max_position=max_model_len)
        model.load_weights(weights)
        if tp is not None:
            parallelize(model, hf_config.vocab_size, tp)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        # Rotary tables stay float32 for accuracy; they are cast per use.
        for module in self.model.modules():
            if hasattr(module, "cos_cached"):
                module.cos_cached = module.cos_cached.float()
                module.sin_cached = module.sin_cached.float()
        self.linear_method = select_linear_method(self.device, self.dtype, kernel_config.linear_method)
        if model_config.quantization is not None:  # "gguf", or quantized at load ("q8_0", "q4_0")
            self.linear_method = GGUFLinearMethod(self.linear_method, kernel_config.gguf_activation_planes,
                                                  kernel_config.gguf_float_rows)
        if self.linear_method.releases_plain:
            for module in self.model.modules():
                if isinstance(module, (Linear, SparseMoeBlock)):  # the MoE block processes its experts
                    module.process_weights(self.linear_method)
            embed_from_blocks = getattr(self.model, "embed_from_lm_head_blocks", None)
            if embed_from_blocks is not None and embed_from_blocks():
                logger.info("embedding lookup reads the tied LM head's GGML blocks (no float table)")
            return_freed_memory()
        logger.info("loaded weights in %.1f s (linear method: %s)", time.perf_counter() - start,
                    self.linear_method.name)

        layers = self.model.attention_layers()
        # Every layer caches the same KV shape (the model classes share one head_dim per model).
        num_kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
        if any((a.num_kv_heads, a.head_dim) != (num_kv_heads, head_dim) for a in layers):
            raise ValueError("layers with different KV head shapes are not supported")
        bytes_per_block = 2 * len(layers) * self.block_size * num_kv_heads * head_dim * self.dtype.itemsize
        self.num_blocks = cache_config.num_gpu_blocks_override or max(1, cache_config.kv_cache_memory_bytes // bytes_per_block)
        shape = (num_kv_heads, self.num_blocks, self.block_size, head_dim)
        # One pool for all layers: [2, num_layers, num_kv_heads, num_blocks, block_size, head_dim]
        self.kv_cache = torch.zeros((2, len(layers), *shape), dtype=self.dtype, device=self.device)
        for i, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        logger.info("KV cache: %d blocks x %d tokens (%.0f MiB)", self.num_blocks, self.block_size,
                    self.kv_cache.numel() * self.dtype.itemsize / 2**20)
        seed_gen = torch.Generator(device=self.device)
        seed_gen.manual_seed(model_config.seed)
        self.fused_ops = select_fused_ops(self.device, self.dtype)
        self.sampler = Sampler(seed_gen, self.fused_ops)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.use_decode_backend(select_decode_backend(self.device, self.dtype, kernel_config.attention_backend))
        logger.info("decode attention backend: %s; fused ops: %s", self.decode_backend.name, self.fused_ops.name)
        # Adapter slots in the model's linears (the scheduler only counts adapters; installing
        # them is the runner's, each step, as vLLM v1's worker-side LoRA manager).
        self.lora_manager = (LoRAManager(self.model, lora_config.max_loras, self.dtype, self.device,
                                         lora_config.max_cpu_loras, tp)
                             if lora_config is not None and lora_config.enable_lora else None)

    def release(self) -> None:
        """Free the weights and the KV pool (at engine shutdown): memory goes back at once, even
        while something still holds the engine object. Any later `execute` raises RuntimeError.
        Rank 0 of a tensor-parallel group also stops the workers."""
        if self.tp is not None and self.tp.is_driver and self.model is not None:
            stop_workers(self.tp)
        for attn in self.model.attention_layers() if self.model is not None else []:
            attn.k_cache = attn.v_cache = None
        drop_stack = getattr(self.model, "drop_decoder_stack", None)  # native decode holds the pools too
        if drop_stack is not None:
            drop_stack()
        self.kv_cache = None
        self.decode_backend = None  # its reused gather buffer goes too
        self.model = None  # last: `model is None` means everything is released
        return_freed_memory()

    def use_decode_backend(self, name: str) -> None:
        """Run decode attention with the backend `name` (a key of DECODE_BACKENDS) from now on."""
        self.decode_backend = DECODE_BACKENDS[name](self.device, self.dtype, self.num_kv_heads, self.num_blocks,
                                                    self.block_size, self.head_dim)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: the scheduled requests' tokens through the model over their
        `scheduler_output.block_tables`, then sampling.

        Raises RuntimeError after `release()`.
        """
        if self.model is None:
            raise RuntimeError("the engine has been shut down (its weights and KV cache are released)")
        # Decodes first: a request's one new token, and the tokens proposed after it, each a decode
        # query over the same block table (the step writes every token's K/V before attending).
        items = sorted(scheduler_output.scheduled, key=lambda it: it.num_new_tokens - len(it.spec_token_ids) != 1)
        step = StepInput(blocks_to_copy=list(scheduler_output.blocks_to_copy))
        sampling_requests = []  # one per logits row: a request appears 1 + len(spec_token_ids) times
        sampling_pending: list[list[int]] = []  # per row: the proposed tokens it assumes accepted
        sampling_groups: list[tuple] = []  # (request, its proposed tokens) per sampling request
        prompt_logprob_rows: dict[str, tuple[list[int], list[int], int]] = {}
        pooling_items: list[tuple] = []  # (request, first flat row, first position, tokens, prefill done)
        slot_of, step.loras = self._activate_loras(scheduler_output)
        if slot_of:
            step.token_slots = []  # each flat-batch token's adapter slot, -1 for the base model
        for item in items:
            req, spec = item.request, item.spec_token_ids
            start, end = req.num_computed_tokens, req.num_computed_tokens + item.num_new_tokens
            first = len(step.input_ids)
            if slot_of:
                slot = -1 if req.lora_request is None else slot_of[req.lora_request.lora_name]
                step.token_slots.extend([slot] * item.num_new_tokens)
            self._append_run(step, req.all_token_ids[start:end - len(spec)] + spec, start,
                             scheduler_output.block_tables[req.request_id], item.num_new_tokens - len(spec) == 1)
            if req.pooling_params is not None:
                pooling_items.append((req, first, start, item.num_new_tokens, item.samples_token))
            if item.samples_token:
                step.logits_rows.extend(range(len(step.input_ids) - 1 - len(spec), len(step.input_ids)))
                sampling_requests.extend([req] * (1 + len(spec)))
                sampling_pending.extend(spec[:i] for i in range(1 + len(spec)))
                sampling_groups.append((req, spec))
            if req.prompt_logprobs is not None:
                # Row of position p predicts token p + 1; skip targets already scored (before a preemption).
                first_target = max(start + 1, len(req.prompt_logprobs))
                targets = list(range(first_target, min(end + 1, req.num_prompt_tokens)))
                if targets:
                    prompt_logprob_rows[req.request_id] = (
                        [first + t - 1 - start for t in targets], [req.all_token_ids[t] for t in targets],
                        req.sampling_params.prompt_logprobs or 0)
        step.prompt_rows = [r for batch_rows, _, _ in prompt_logprob_rows.values() for r in batch_rows]
        if self.tp is not None:
            self.tp.broadcast(step)  # the workers run the same forward on their shards
        hidden, prompt_logits, logits = self._run(step)
        output = ModelRunnerOutput({})
        if pooling_items:
            output.pooled = _pool(hidden, pooling_items)
        if prompt_logprob_rows:
            output.prompt_logprobs = self._prompt_logprobs(prompt_logits, prompt_logprob_rows)
        if not sampling_requests:
            return output
        meta = SamplingMetadata.from_requests(sampling_requests, self.vocab_size, self.device, sampling_pending)
        if scheduler_output.grammar_bitmask is not None:
            meta.grammar_bitmask = self._grammar_rows(scheduler_output.grammar_bitmask, sampling_requests,
                                                      sampling_pending)
        sampled = self.sampler(logits, meta)
        row_logprobs = _logprob_lists(sampled.logprobs) if sampled.logprobs is not None else None
        row_tokens = sampled.sampled_token_ids.tolist()
        # A request's rows in order: row i samples from the target's distribution given the
        # proposals before i accepted; `accepted_prefix` keeps rows while they confirm them.
        row = 0
        for req, spec in sampling_groups:
            taken = accepted_prefix(row_tokens[row:row + 1 + len(spec)], spec)
            output.sampled_token_ids[req.request_id] = taken
            if row_logprobs is not None and req.needs_logprobs:
                output.logprobs[req.request_id] = row_logprobs[row:row + len(taken)]
            row += 1 + len(spec)
        return output

    @torch.inference_mode()
    def last_token_logits(self, runs: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """One forward pass over several runs of tokens, each continuing its own cached context:
        runs[i] = (token ids, position of the first, block table). Writes their K/V at the
        table's slots and returns the logits at each run's last token, [len(runs), vocab_size]
        float32, in the order of `runs` (a draft model's proposal steps; no sampling, no LoRA).
        """
        order = sorted(range(len(runs)), key=lambda i: len(runs[i][0]) != 1)  # decodes first
        step = StepInput()
        for i in order:
            self._append_run(step, *runs[i], len(runs[i][0]) == 1)
            step.logits_rows.append(len(step.input_ids) - 1)
        _, _, logits = self._run(step)  # [len(runs), vocab_size], in `order`
        return logits[torch.tensor(order, device=self.device).argsort()]

    def _append_run(self, step: StepInput, tokens: list[int], start: int, table: list[int],
                    is_decode: bool) -> None:
        """Append a run of tokens continuing its cached context to the flat batch: token ids,
        positions from `start`, slots of `table` (the block table). With `is_decode` (one new
        token, and the proposals after it) each token is a decode query while no prefill span
        precedes it; otherwise the run is a prefill span."""
        bs, end = self.block_size, start + len(tokens)
        first = len(step.input_ids)
        step.input_ids.extend(tokens)
        step.positions.extend(range(start, end))
        step.slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        if is_decode and not step.spans:
            step.num_decode_tokens += len(tokens)
            step.decode_tables.extend([table] * len(tokens))
            step.decode_lens.extend(range(start + 1, end + 1))
        else:
            step.spans.append((first, len(step.input_ids), end, table))

    def _activate_loras(self, scheduler_output: SchedulerOutput) -> tuple[dict[str, int], tuple | None]:
        """Install the running requests' adapters (`LoRAManager.activate`). Returns (adapter name ->
        slot, the activate call's arguments for the other tensor-parallel ranks); ({}, None) when
        no scheduled request uses one."""
        if self.lora_manager is None or not any(it.request.lora_request is not None for it in scheduler_output.scheduled):
            return {}, None
        new = [it.request.lora_request.lora_name for it in scheduler_output.scheduled
               if it.is_new and it.request.lora_request is not None]
        activation = (dict(scheduler_output.active_loras), new)
        return self.lora_manager.activate(*activation), activation

    def _grammar_rows(self, grammar: GrammarBitmask, sampling_requests: list,
                      sampling_pending: list[list[int]]) -> torch.Tensor:
        """The constrained rows' bitmasks placed at their sampling rows; other rows allow everything (-1)."""
        row_of = {(r.request_id, len(p)): i for i, (r, p) in enumerate(zip(sampling_requests, sampling_pending))}
        rows = torch.tensor([row_of[key] for key in grammar.rows], dtype=torch.int64)
        full = torch.full((len(sampling_requests), grammar.bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = grammar.bitmask
        return full.to(self.device)

    def _prompt_logprobs(self, logit_chunks: list[torch.Tensor],
                         rows: dict[str, tuple[list[int], list[int], int]]) -> dict[str, list[PositionLogprobs]]:
        """logit_chunks: the logits of the prompt rows in order, in chunks (`_run`); rows: request_id ->
        (flat batch rows, the prompt token each row predicts, top-k wanted)."""
        targets = [t for _, request_targets, _ in rows.values() for t in request_targets]
        k = max(num for _, _, num in rows.values())
        all_positions: list[PositionLogprobs] = []
        begin = 0
        for logits in logit_chunks:
            target_ids = torch.tensor(targets[begin:begin + logits.shape[0]], dtype=torch.int64, device=self.device)
            all_positions.extend(_logprob_lists(gather_logprobs(logits.log_softmax(dim=-1), k, target_ids)))
            begin += logits.shape[0]
        out: dict[str, list[PositionLogprobs]] = {}
        start = 0
        for request_id, (batch_rows, _, _) in rows.items():
            out[request_id] = all_positions[start:start + len(batch_rows)]
            start += len(batch_rows)
        return out

    def _run(self, step: StepInput) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """The forward pass of one step, the same on every tensor-parallel rank (the collectives
        in the layers and `_logits` pair up): KV block copies, the model, then the logits of the
        prompt-logprob rows (chunks of 512 rows bound the [rows, vocab] logits: 100 MiB at a 49k
        vocabulary) and of the sampling rows. Returns (hidden [num_tokens, hidden_size], prompt
        logit chunks, sampling logits [rows, vocab_size] or None)."""
        if step.blocks_to_copy:
            self.copy_blocks(step.blocks_to_copy)
        if step.loras is not None and self.tp is not None and not self.tp.is_driver:
            self.lora_manager.activate(*step.loras)  # rank 0 did in `execute`
        dev = self.device
        batch = ForwardBatch(
            positions=torch.tensor(step.positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(step.slot_mapping, dtype=torch.int64, device=dev),
            num_decode_tokens=step.num_decode_tokens,
            decode=self.decode_backend.prepare_metadata(step.decode_tables, step.decode_lens)
            if step.decode_tables else None,
            prefill_spans=[PrefillSpan(first, end, context, torch.tensor(table, dtype=torch.int64, device=dev))
                           for first, end, context, table in step.spans],
            lora=LoRABatch(torch.tensor(step.token_slots, dtype=torch.int64, device=dev))
            if step.token_slots is not None else None,
            ops=self.fused_ops,
        )
        ids = torch.tensor(step.input_ids, dtype=torch.int64, device=dev)
        with forward_context(batch):
            hidden = self.model(ids, batch.positions)  # [num_tokens, hidden_size]
        prompt_logits = [self._logits(hidden[step.prompt_rows[begin:begin + 512]])
                         for begin in range(0, len(step.prompt_rows), 512)]
        logits = self._logits(hidden[step.logits_rows]) if step.logits_rows else None
        if self.tp is not None:
            self.tp.step_done()
        return hidden, prompt_logits, logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden_size] -> float32 logits [n, vocab_size]; with tensor parallelism each
        rank computes its vocabulary slice and every rank gets them all (a collective)."""
        logits = self.model.compute_logits(hidden)
        if self.tp is not None:
            logits = self.tp.all_gather_last_dim(logits)[:, :self.vocab_size]
        return logits

    @torch.inference_mode()
    def worker_loop(self) -> None:
        """A tensor-parallel worker rank: run each step rank 0 broadcasts, until it broadcasts None."""
        while (step := self.tp.broadcast()) is not None:
            self._run(step)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K and V of every layer from block src to block dst, for each (src, dst)."""
        src = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=self.device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=self.device)
        # kv_cache: [2, layers, kv_heads, blocks, block_size, head_dim]; blocks are dim 3.
        self.kv_cache.index_copy_(3, dst, self.kv_cache.index_select(3, src))

    @torch.inference_mode()
    def logits_for(self, token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits at every position of one sequence, run through the paged path in chunks.

        The first chunk is a fresh prefill, later chunks attend to the cached blocks
        (chunk_size=1 exercises the decode path). Uses blocks 0.. of the pool as scratch,
        so call it only when no request is running (tests compare it with transformers).
        Returns [len(token_ids), vocab_size] float32. Raises ValueError if the pool is too small
        or the model is cut across tensor-parallel ranks.
        """
        if self.tp is not None:
            raise ValueError("logits_for runs a whole model (tensor_parallel_size 1).")
        n = len(token_ids)
        num_blocks = (n + self.block_size - 1) // self.block_size
        if num_blocks > self.num_blocks:
            raise ValueError("sequence longer than the KV cache")
        table = list(range(num_blocks))  # blocks 0.. in order: slot == position
        chunk_size = chunk_size or n
        logits = []
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            step = StepInput(logits_rows=list(range(end - start)))
            self._append_run(step, token_ids[start:end], start, table, end - start == 1 and start > 0)
            logits.append(self._run(step)[2])
        return torch.cat(logits)


def _logprob_lists(t: LogprobsTensors) -> list[PositionLogprobs]:
    """One device-to-host copy per tensor, then per-row Python lists."""
    return [PositionLogprobs(ids, values, rank) for ids, values, rank in
            zip(t.logprob_token_ids.tolist(), t.logprobs.tolist(), t.selected_token_ranks.tolist())]


def _pool(hidden: torch.Tensor, items: list[tuple]) -> dict[str, list[float]]:
    """Embeddings of the pooling requests whose prompts finished prefilling this step.

    hidden: [num_tokens, hidden_size], the model's final hidden states. items: (request, first flat
    row, first position, tokens this step, prefill done). "MEAN" sums each chunk into the request's
    `pool_sum` (a chunk from position 0 starts it afresh: a request recomputed after preemption) and
    divides by the prompt length; "LAST" takes the last prompt token's state. L2-normalised when
    asked (vLLM's pooler, `F.normalize`), returned as float32 lists.
    """
    pooled = {}
    for req, first, start, count, done in items:
        params = req.pooling_params
        if params.pooling_type == "MEAN":
            chunk = hidden[first:first + count].float().sum(dim=0)  # [hidden_size]
            req.pool_sum = chunk if start == 0 or req.pool_sum is None else req.pool_sum + chunk
        if not done:
            continue
        if params.pooling_type == "MEAN":
            vector = req.pool_sum / req.num_prompt_tokens
            req.pool_sum = None
        else:
            vector = hidden[first + count - 1].float()
        if params.normalize:
            vector = torch.nn.functional.normalize(vector, dim=-1)
        pooled[req.request_id] = vector.tolist()
    return pooled
