"""models/decoder_stack.py: decode-only steps through every layer in one native call (kernels'
DecoderStack) give the Python layers' tokens and log-probabilities bit for bit, and the steps and
models it cannot take run the Python layers."""

from __future__ import annotations

import pytest

from loomlm import LLM, SamplingParams
from loomlm.layers.kernels import cpu_kernels
from loomlm.models.decoder_stack import build_decoder_stack

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the native CPU kernels are not built")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colors:",
           "Water boils at"]


def _generate(llm: LLM, use_stack: bool) -> tuple[list, list[bool]]:
    """(token ids and top-3 log-probabilities per prompt, whether each forward took the stack)."""
    model = llm.llm_engine.model_runner.model
    model.use_decoder_stack = use_stack
    took: list[bool] = []
    choose = type(model)._decoder_stack

    def spy(batch, num_tokens):
        stack = choose(model, batch, num_tokens)
        took.append(stack is not None)
        return stack

    model._decoder_stack = spy
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        del model._decoder_stack
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outputs], took


@pytest.mark.parametrize("quantization", ["gguf", None], ids=["gguf_blocks", "float32_panels"])
def test_stack_equals_the_python_layers(quantization, monkeypatch):
    monkeypatch.setenv("LOOMLM_LINEAR_METHOD", "native")  # float32: the panel method the stack runs
    llm = LLM(quantization=quantization, num_gpu_blocks_override=64, enable_prefix_caching=False)
    stacked, took = _generate(llm, True)
    model = llm.llm_engine.model_runner.model
    assert model._stack is not None and model._stack.num_layers() == len(model.layers)
    assert any(took) and not all(took)  # decode steps took it; the prefill step did not
    python, took_python = _generate(llm, False)
    assert not any(took_python)
    assert stacked == python


def test_models_and_methods_it_cannot_take(make_tiny_model_dir, monkeypatch):
    # Qwen2's q/k/v biases: the Python layers.
    qwen = LLM(str(make_tiny_model_dir("qwen2")), num_gpu_blocks_override=32)
    assert build_decoder_stack(qwen.llm_engine.model_runner.model) is None
    _, took = _generate(qwen, True)
    assert not any(took)
    # A plain Llama on the native panels qualifies; on plain matmuls ("torch") it does not.
    monkeypatch.setenv("LOOMLM_LINEAR_METHOD", "native")
    llama = LLM(str(make_tiny_model_dir("llama")), num_gpu_blocks_override=32)
    stacked, took = _generate(llama, True)
    assert any(took)
    assert stacked == _generate(llama, False)[0]
    monkeypatch.setenv("LOOMLM_LINEAR_METHOD", "torch")
    plain = LLM(str(make_tiny_model_dir("llama")), num_gpu_blocks_override=32)
    assert build_decoder_stack(plain.llm_engine.model_runner.model) is None


def test_release_drops_the_stack():
    llm = LLM(quantization="gguf", num_gpu_blocks_override=16)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3), use_tqdm=False)
    runner = llm.llm_engine.model_runner
    model = runner.model
    assert model._stack is not None
    runner.release()
    assert model._stack is None and model._stack_key is None
