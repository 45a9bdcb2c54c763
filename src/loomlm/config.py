"""Frozen engine configuration, validated at construction (vLLM engine-arg names)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import MISSING, dataclass, field, fields, replace

import torch

from loomlm.pooling_params import PoolerConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# Values of ModelConfig.quantization (vLLM's engine arg of that name).
QUANTIZATION_METHODS = (None, "gguf", "q8_0", "q4_0")
# Those that quantize a float checkpoint's linear weights at load, to these GGML types.
LOAD_TIME_QUANTIZATION = {"q8_0": 8, "q4_0": 2}


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how.

    Attributes:
        model: a zoo alias (e.g. "smollm2-135m-instruct"), an HF directory, a .gguf path, or a
            Hugging Face repo id ("Qwen/Qwen3-0.6B"; see `loomlm.models.loader.resolve_model`).
        dtype: weight / activation dtype name; "auto" follows the checkpoint (`resolve_dtype`).
        revision: the hub revision (branch, tag or commit) of a repo-id model; None: "main".
        tokenizer: a separate tokenizer (alias, HF directory, .gguf path or repo id); None: the model's.
        tokenizer_revision: the hub revision of the tokenizer; None: `revision` (vLLM's rule).
        trust_remote_code: vLLM's flag; only False is accepted, loomlm runs no code from model repos.
        max_model_len: context window in tokens; None takes the model's own.
        seed: seed of the engine's default generator (requests without a seed).
        served_model_name: the name the servers report; None uses the alias or path.
        device: "cpu", "cuda", or "auto" (cuda when available).
        max_logprobs: most `logprobs` / `prompt_logprobs` alternatives a request may ask for
            (vLLM's engine arg; OpenAI's own limit for top_logprobs is 20).
        quantization: vLLM's engine arg. None: weights in float (a GGUF file is dequantized at
            load); "gguf": a GGUF file's linear weights stay in their GGML blocks (Q4_0, Q4_1,
            Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) and run on the native quantized kernels (CPU, float32
            activations); other types and the embedding table are dequantized. "q8_0" / "q4_0":
            any checkpoint's projection weights (in-features a multiple of 32) are quantized at
            load to that GGML type (gguf-py's reference quantizer, as llama.cpp's
            `llama-quantize`) and run on the same kernels; the embedding table, the LM head and
            MoE experts stay float.
        task: vLLM's engine arg: "auto", "generate" or "embed" (loomlm serves generation and
            embeddings from one engine, whichever is named; "classify", "score", "reward" are refused).
        override_pooler_config: vLLM's engine arg: the default pooling of embeddings,
            {"pooling_type": "LAST" | "MEAN", "normalize": bool} (default LAST, normalised).
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    revision: str | None = None
    tokenizer: str | None = None
    tokenizer_revision: str | None = None
    trust_remote_code: bool = False
    max_model_len: int | None = None
    seed: int = 0
    served_model_name: str | None = None
    device: str = "auto"
    max_logprobs: int = 20
    quantization: str | None = None
    task: str = "auto"
    override_pooler_config: dict | None = None

    def __post_init__(self) -> None:
        if self.task not in ("auto", "generate", "embed"):
            raise ValueError(f"task={self.task!r} is not supported: loomlm runs generative models and their "
                             "embeddings (task='generate', 'embed' or 'auto').")
        if isinstance(self.override_pooler_config, str):  # the CLI's JSON text
            try:
                object.__setattr__(self, "override_pooler_config", json.loads(self.override_pooler_config))
            except json.JSONDecodeError as exc:
                raise ValueError(f"override_pooler_config is not JSON: {exc}") from None
        PoolerConfig.from_override(self.override_pooler_config)  # checked here, used by the engine
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(map(str, QUANTIZATION_METHODS))}, "
                             f"got {self.quantization!r}.")
        if self.trust_remote_code:
            raise ValueError(
                "loomlm runs no remote code: each supported architecture is implemented in loomlm "
                "itself, so a model repo's Python is never imported; remove trust_remote_code "
                "(--trust-remote-code)."
            )
        for name in ("revision", "tokenizer", "tokenizer_revision"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}.")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}.")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}.")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The explicit dtype; for "auto", the default of a checkpoint without a dtype
        (`resolve_dtype(None)`). The engine replaces "auto" once it has read the checkpoint
        (`with_checkpoint_dtype`), so its `config.model_config.torch_dtype` is the dtype it runs in."""
        return self.resolve_dtype(None)

    def resolve_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype to compute in, given the checkpoint's (`loader.checkpoint_dtype`; None: unknown).

        An explicit dtype wins. "auto" follows vLLM (`ModelConfig`'s dtype "auto": the checkpoint's
        `torch_dtype`), except: a float32 or dtype-less checkpoint (and GGUF) runs in bfloat16 on
        CUDA, and on CPU everything runs in float32 (bfloat16 measured 0.45-0.96x the speed of
        float32 on this machine, DESIGN.md); a half-precision checkpoint on CPU logs that at INFO.
        """
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        is_half = checkpoint_dtype in _HALF_DTYPES
        if self.torch_device.type == "cuda":
            return checkpoint_dtype if is_half else torch.bfloat16
        if is_half:
            logger.info("checkpoint dtype %s; computing in float32 on CPU (no fast half-precision path)",
                        _DTYPE_NAMES[checkpoint_dtype])
        return torch.float32

    def with_checkpoint_dtype(self, checkpoint_dtype: torch.dtype | None) -> ModelConfig:
        """This config with `dtype` made explicit: the name of `resolve_dtype(checkpoint_dtype)`."""
        return replace(self, dtype=_DTYPE_NAMES[self.resolve_dtype(checkpoint_dtype)])


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache.

    Attributes:
        block_size: tokens per KV block.
        kv_cache_memory_bytes: memory budget for the KV block pool (bytes).
        num_gpu_blocks_override: exact number of blocks (vLLM's name; any device); wins over the budget.
        enable_prefix_caching: share the KV blocks of cached prompt prefixes between requests
            (vLLM's name and default).
    """

    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}.")
        for name in ("kv_cache_memory_bytes", "num_gpu_blocks_override"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching with chunked prefill.

    Attributes:
        max_num_batched_tokens: token budget of one step (prefill chunks + decode tokens).
        max_num_seqs: most requests in the running batch. 128 is vLLM's default for `vllm serve` on
            CPU: a burst of 128 streams is admitted and prefilled in arrival order at once, instead of
            its second half waiting for free slots until the first half has finished (TTFT).
        long_prefill_token_threshold: most prompt tokens one request may prefill in a step
            (0: up to the whole budget), so a long prompt does not starve decodes.
        scheduling_policy: vLLM's: "fcfs" (arrival order) or "priority" (requests' `priority`,
            lower first, then arrival; when the KV cache is full a waiting request may preempt
            running ones of lower priority, and the lowest-priority running request is the one
            preempted).
        step_thread_niceness: added to the nice value of an AsyncLLMEngine's step thread (and so of
            the OpenMP workers it starts), 0-19 (default 0): when the event loop, the HTTP clients or
            a health probe need a core the compute threads hold, the kernel runs them first. A trade:
            on 2 cores (benchmarks/serving.py, Zen 4) +5 cut the worst `/health` under 128 streams
            from 47-53 ms to 27 ms, but the compute threads, preempted at once, then wait for each
            other at every OpenMP barrier: 32 streams served 193 / 183 tok/s against 211 / 212 at 0.
            Ignored by the offline LLM, which has no step thread.
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    long_prefill_token_threshold: int = 0
    step_thread_niceness: int = 0
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}) so every running request can decode each step."
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be non-negative.")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}.")
        if not 0 <= self.step_thread_niceness <= 19:
            raise ValueError(f"step_thread_niceness must be in [0, 19], got {self.step_thread_niceness}.")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's engine-arg names).

    Attributes:
        enable_lora: accept requests that name an adapter.
        max_loras: adapters installed in the model at once (LoRAX's --max-active-adapters);
            an idle one is evicted, least recently used first, when another is needed.
        max_cpu_loras: adapters kept in host memory, ready to install (None: max_loras).
        lora_adapter_ids: adapters to load at start-up (LoRAX's --adapter-ids; see
            `loomlm.lora.source.resolve_adapter` for what an id may be); any local path.
        adapter_roots: directories under which adapter ids sent in requests may name local
            adapters (`loomlm serve --adapter-root`); none: requests may name hub / s3 adapters
            and the preloaded ones only. Stored as real paths.
    """

    enable_lora: bool = False
    max_loras: int = 8
    max_cpu_loras: int | None = None
    lora_adapter_ids: tuple[str, ...] = ()
    adapter_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be positive, got {self.max_loras}.")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras}).")
        if self.lora_adapter_ids and not self.enable_lora:
            raise ValueError("lora_adapter_ids needs enable_lora=True.")
        object.__setattr__(self, "lora_adapter_ids", tuple(self.lora_adapter_ids))
        if isinstance(self.adapter_roots, str):
            raise ValueError("adapter_roots must be a sequence of directories, not one string.")
        roots = tuple(os.path.realpath(os.path.expanduser(root)) for root in self.adapter_roots)
        missing = [root for root in roots if not os.path.isdir(root)]
        if missing:
            raise ValueError(f"adapter root {missing[0]!r} is not a directory.")
        object.__setattr__(self, "adapter_roots", roots)


@dataclass(frozen=True)
class KernelConfig:
    """Which kernels run the model, chosen once at load (CLI flags of the same names).

    None for any field: the environment variable named below when set (a default for scripts
    and benchmarks), else the automatic choice.

    Attributes:
        attention_backend: decode attention, "torch" or "cpu_native" (LOOMLM_ATTENTION_BACKEND;
            automatic: cpu_native on CPU in float32 when the native kernels are built).
        linear_method: "auto", "torch", "mkl_packed" or "native" (LOOMLM_LINEAR_METHOD;
            LOOMLM_PACKED_GEMM=0 also means "torch"; see `select_linear_method`).
        gguf_activation_planes: the quantized kernels' activation precision, 1 (llama.cpp's
            one 8-bit plane) or 2 (LOOMLM_GGUF_ACTIVATION_PLANES; default 2, see
            `gguf_activation_planes`).
        gguf_float_rows: from this many rows (tokens in a step) a GGUF layer runs the
            dequantized float path; 0 never (LOOMLM_GGUF_FLOAT_ROWS; default per block type,
            `default_float_rows`).

    Raises ValueError for a value outside those.
    """

    attention_backend: str | None = None
    linear_method: str | None = None
    gguf_activation_planes: int | None = None
    gguf_float_rows: int | None = None

    def __post_init__(self) -> None:
        if self.attention_backend is not None:
            from loomlm.layers.decode_attention import DECODE_BACKENDS

            if self.attention_backend not in DECODE_BACKENDS:
                raise ValueError(f"attention_backend must be one of {sorted(DECODE_BACKENDS)}, "
                                 f"got {self.attention_backend!r}.")
        if self.linear_method is not None:
            from loomlm.layers.linear_method import METHOD_NAMES

            if self.linear_method not in METHOD_NAMES:
                raise ValueError(f"linear_method must be one of {', '.join(METHOD_NAMES)}, "
                                 f"got {self.linear_method!r}.")
        if self.gguf_activation_planes not in (None, 1, 2):
            raise ValueError(f"gguf_activation_planes must be 1 or 2, got {self.gguf_activation_planes!r}.")
        if self.gguf_float_rows is not None and (not isinstance(self.gguf_float_rows, int) or self.gguf_float_rows < 0):
            raise ValueError(f"gguf_float_rows must be an integer >= 0, got {self.gguf_float_rows!r}.")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism over torch.distributed (vLLM's engine-arg names; `loomlm.distributed`).

    Attributes:
        tensor_parallel_size: ranks one model is cut across (1: the whole model in this process).
        distributed_init_method: where the ranks meet, "tcp://HOST:PORT" (None: a free loopback port
            on one machine, or torchrun's `env://` when RANK / WORLD_SIZE are set).
        nnodes, node_rank: machines taking part and this one's index (node 0 runs the engine);
            each runs tensor_parallel_size / nnodes ranks.

    Raises ValueError for sizes below 1, a node count that does not divide the ranks, or a node
    rank outside [0, nnodes).
    """

    tensor_parallel_size: int = 1
    distributed_init_method: str | None = None
    nnodes: int = 1
    node_rank: int = 0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.nnodes < 1:
            raise ValueError("tensor_parallel_size and nnodes must be positive.")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"nnodes ({self.nnodes}) must divide tensor_parallel_size ({self.tensor_parallel_size}).")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}.")
        if self.nnodes > 1 and not self.distributed_init_method:
            raise ValueError("nnodes > 1 needs distributed_init_method='tcp://HOST:PORT' (node 0's address).")


# Values of SpeculativeConfig.method (vLLM's names).
SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config` / `--speculative-config`, same keys).

    Proposals are checked by the target model in one forward pass per step and accepted exactly
    (greedy: while they equal the target's argmax; sampled: by rejection sampling, Leviathan et
    al. 2023, so outputs are distributed as without speculation); see `loomlm.spec_decode`.

    Attributes:
        method: "ngram" (prompt lookup: the tokens that followed the longest earlier match of the
            context's last n-gram) or "draft_model" (a smaller model with the same vocabulary,
            `model`, proposes greedily with its own KV cache). None: "draft_model" when `model`
            is given ("ngram" / "[ngram]" as `model` mean the n-gram method, as in vLLM).
        num_speculative_tokens: k, the most tokens proposed per request and step (required).
        prompt_lookup_max, prompt_lookup_min: n-gram lengths tried, longest first; one given
            sets the other, none gives 5 and 5 (vLLM's defaults).
        model, revision, quantization: the draft model and how to load it (as ModelConfig's).
        disable_by_batch_size: no proposals while more requests than this are unfinished
            (vLLM's `disable_by_batch_size`; None: never disabled by load).

    Below k, proposals adapt per request (`loomlm.spec_decode.manager`): how many are made follows
    the request's acceptance and the measured cost of a verified token, so speculation that does
    not pay stops.

    Raises ValueError for an unknown method, a missing or non-positive k, bad n-gram bounds, or a
    draft model missing.
    """

    method: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    revision: str | None = None
    quantization: str | None = None
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        method = self.method
        if method is None or method == "[ngram]":
            method = "ngram" if self.model in (None, "ngram", "[ngram]") else "draft_model"
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}.")
        object.__setattr__(self, "method", method)
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be a positive integer, got {k!r}.")
        if method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if lo is None and hi is None:
                lo = hi = 5
            lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError(f"prompt_lookup_min ({lo}) and prompt_lookup_max ({hi}) must be integers with "
                                 "1 <= prompt_lookup_min <= prompt_lookup_max.")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
            object.__setattr__(self, "model", None)
        elif not self.model:
            raise ValueError("speculative method 'draft_model' needs the draft model ('model').")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be positive, got {self.disable_by_batch_size}.")

    @classmethod
    def from_value(cls, value) -> SpeculativeConfig | None:
        """From what `LLM(speculative_config=...)` or `--speculative-config` gives: a dict, its JSON
        text, a SpeculativeConfig, or None. Raises ValueError for unknown keys or bad JSON."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or its JSON), got {type(value).__name__}.")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown speculative_config key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
    kernel_config: KernelConfig = field(default_factory=KernelConfig)
    speculative_config: SpeculativeConfig | None = None
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Split flat engine args (vLLM style: `LLM(model=..., block_size=...)`) into the configs.

        Raises ValueError for an unknown argument.
        """
        speculative = SpeculativeConfig.from_value(kwargs.pop("speculative_config", None))
        # Each section's class is its field's default factory; an argument goes to the first that has it.
        sections = {f.name: f.default_factory for f in fields(cls) if f.default_factory is not MISSING}
        parts: dict[str, dict] = {name: {} for name in sections}
        for key, value in kwargs.items():
            section = next((name for name, klass in sections.items() if key in klass.__dataclass_fields__), None)
            if section is None:
                raise ValueError(f"unknown engine argument {key!r}.")
            parts[section][key] = value
        return cls(speculative_config=speculative, **{name: klass(**parts[name]) for name, klass in sections.items()})
