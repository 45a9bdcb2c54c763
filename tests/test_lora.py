"""Multi-LoRA against `peft` on a tiny random Llama: adapters of different ranks and targets
(rsLoRA included) and the base model in one batch, each matching its peft reference;
the adapter slots' LRU eviction; bad adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loomlm import LLM, LoRARequest, SamplingParams

ADAPTERS = {
    # name: (rank, alpha, targets, rsLoRA)
    "attn-r4": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "mlp-r16": (16, 16, ["gate_proj", "up_proj", "down_proj"], False),
    "all-r8-rs": (8, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
}
PROMPTS = [[5, 17, 42, 99, 7, 3], [200, 1, 64, 33], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def base_dir(make_tiny_model_dir) -> Path:
    return make_tiny_model_dir("llama")


def make_adapters(base_dir: Path, out_root: Path, std: float) -> dict[str, Path]:
    """The ADAPTERS made with peft on `base_dir`'s model, every LoRA weight drawn from N(0, std)."""
    dirs = {}
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                use_rslora=rslora, init_lora_weights=False))
        with torch.no_grad():  # non-zero B (peft's default B is zero): a visible update
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.normal_(0.0, std)
        dirs[name] = out_root / name
        model.save_pretrained(str(dirs[name]))
    return dirs


@pytest.fixture(scope="module")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(base_dir, tmp_path_factory.mktemp("tiny-adapters"), std=0.3)


@torch.inference_mode()
def peft_logprobs(base_dir: Path, adapter_dir: Path | None, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the peft-wrapped transformers model's logits: [len, vocab]."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)


def check_mixed_batch_against_peft(llm: LLM, reference_dir: Path, adapter_dirs: dict[str, Path],
                                   prompts: list[list[int]], tolerance: float) -> None:
    """Every adapter and the base model in one generate call; each request equals its peft reference."""
    requests = [None] + [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapter_dirs.items())]
    batch, loras = [], []
    for lora in requests:
        for prompt in prompts:
            batch.append(prompt)
            loras.append(lora)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    outputs = llm.generate(batch, params, lora_request=loras, use_tqdm=False)
    by_adapter: dict[str | None, list[list[int]]] = {}
    for prompt, lora, out in zip(batch, loras, outputs):
        ids = prompt + out.outputs[0].token_ids
        ref = peft_logprobs(reference_dir, None if lora is None else adapter_dirs[lora.lora_name], ids)
        ours = [next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]] + [
            e[t].logprob for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert ours == pytest.approx(expected, abs=tolerance)
        # Greedy: each generated token is the reference's argmax.
        for k, token in enumerate(out.outputs[0].token_ids):
            assert token == ref[len(prompt) - 1 + k].argmax().item()
        by_adapter.setdefault(None if lora is None else lora.lora_name, []).append(out.outputs[0].token_ids)
    assert len({tuple(map(tuple, v)) for v in by_adapter.values()}) == len(by_adapter)  # adapters change outputs
    manager = llm.llm_engine.lora_manager
    assert sorted(manager.loaded) == sorted(adapter_dirs)


def test_mixed_adapters_and_base_in_one_batch_match_peft(base_dir, adapter_dirs):
    llm = LLM(str(base_dir), enable_lora=True, max_loras=4)
    check_mixed_batch_against_peft(llm, base_dir, adapter_dirs, PROMPTS, tolerance=1e-4)
    assert llm.llm_engine.lora_manager.num_loads == 3


def test_default_model_adapters_match_peft(smollm2_reference_dir, tmp_path_factory):
    # Adapters made with peft on transformers' load of the default weights; loomlm runs the GGUF.
    adapters = make_adapters(smollm2_reference_dir, tmp_path_factory.mktemp("smollm2-adapters"), std=0.05)
    llm = LLM("smollm2-135m-instruct", enable_lora=True, max_loras=4)
    tok = llm.get_tokenizer()
    prompts = [tok.encode("The capital of France is"), tok.encode("def add(a, b):")]
    check_mixed_batch_against_peft(llm, smollm2_reference_dir, adapters, prompts, tolerance=1e-3)


def test_lru_eviction_and_reload(base_dir, adapter_dirs):
    llm = LLM(str(base_dir), enable_lora=True, max_loras=2)
    manager = llm.llm_engine.lora_manager
    names = list(adapter_dirs)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = {}
    for i, name in enumerate(names):  # the third load evicts the least recently used
        lora = LoRARequest(name, i + 1, str(adapter_dirs[name]))
        first[name] = llm.generate(PROMPTS[0], params, lora_request=lora, use_tqdm=False)[0].outputs[0].token_ids
    assert manager.num_evictions == 1 and names[0] not in manager.loaded
    again = llm.generate(PROMPTS[0], params, lora_request=LoRARequest(names[0], 1, str(adapter_dirs[names[0]])),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert again == first[names[0]] and manager.num_loads == 4


def test_more_adapters_than_slots_wait_for_a_slot(base_dir, adapter_dirs):
    """3 adapters through 2 slots in one call: requests wait for a free slot (no error), and each
    gets its own adapter's output, as when run alone."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    loras = [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapter_dirs.items())]
    alone = LLM(str(base_dir), enable_lora=True, max_loras=3)
    expected = [alone.generate(PROMPTS[0], params, lora_request=lora, use_tqdm=False)[0].outputs[0].token_ids
                for lora in loras]
    llm = LLM(str(base_dir), enable_lora=True, max_loras=2)
    outputs = llm.generate([PROMPTS[0]] * 3, params, lora_request=loras, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.llm_engine.lora_manager.num_evictions >= 1


def test_adapter_loads_in_the_background_while_others_decode(base_dir, adapter_dirs):
    """An adapter not loaded yet is read in a worker thread: the engine keeps stepping the
    other requests meanwhile, then installs it and runs its request."""
    llm = LLM(str(base_dir), enable_lora=True, max_loras=2)
    engine, manager = llm.llm_engine, llm.llm_engine.lora_manager
    release = __import__("threading").Event()
    real_load = manager.load

    def slow_load(request):
        release.wait(timeout=30)
        real_load(request)

    manager.load = slow_load
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    lora = LoRARequest("attn-r4", 1, str(adapter_dirs["attn-r4"]))
    engine.add_request("base", PROMPTS[1], params)
    engine.add_request("adapted", PROMPTS[0], params, lora_request=lora)  # not loaded: goes to the worker
    base_done = None
    for _ in range(50):
        for out in engine.step():
            if out.request_id == "base" and out.finished:
                base_done = out
        if base_done is not None:
            break
    assert base_done is not None and len(base_done.outputs[0].token_ids) == 8  # never stalled
    assert "adapted" in engine.output_processor.requests and manager.loaded == []
    release.set()
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    manager.load = real_load
    expected = llm.generate(PROMPTS[0], params, lora_request=lora, use_tqdm=False)[0].outputs[0].token_ids
    assert finished["adapted"].outputs[0].token_ids == expected


def test_bad_adapters_raise_and_lose_nothing(base_dir, adapter_dirs, tmp_path):
    llm = LLM(str(base_dir), enable_lora=True, max_loras=2)
    bad_target = tmp_path / "bad"
    bad_target.mkdir()
    src = adapter_dirs["attn-r4"]
    config = json.loads((src / "adapter_config.json").read_text())
    (bad_target / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "PREFIX_TUNING"}))
    (bad_target / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    for lora in (LoRARequest("missing", 1, str(tmp_path / "nowhere")), LoRARequest("bad", 2, str(bad_target))):
        with pytest.raises(ValueError):
            llm.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(max_tokens=2), lora_request=[None, lora],
                         use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()
    # A name already used for another adapter directory is refused.
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False,
                 lora_request=LoRARequest("attn-r4", 1, str(adapter_dirs["attn-r4"])))
    with pytest.raises(ValueError, match="already loaded"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False,
                     lora_request=[LoRARequest("attn-r4", 1, str(adapter_dirs["mlp-r16"]))])
    assert not llm.llm_engine.has_unfinished_requests()
    plain = LLM(str(base_dir))
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate(PROMPTS[0], SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, str(src)),
                       use_tqdm=False)
