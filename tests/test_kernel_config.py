"""Kernel switches as engine arguments (`KernelConfig`): chosen once at load, CLI flags, the
LOOMLM_* environment variables only as defaults."""

from __future__ import annotations

import pytest
import torch

from loomlm import LLM, SamplingParams
from loomlm.cli import _engine_kwargs, build_parser
from loomlm.config import EngineConfig, KernelConfig
from loomlm.layers.decode_attention import select_decode_backend
from loomlm.layers.kernels import cpu_kernels
from loomlm.layers.linear_method import TORCH_METHOD, GGUFLinearMethod

MODEL = "smollm2-135m-instruct"


def test_engine_args_and_cli_flags_reach_the_kernel_config():
    config = EngineConfig.from_kwargs(model=MODEL, attention_backend="torch", linear_method="native",
                                      gguf_activation_planes=1, gguf_float_rows=0)
    assert config.kernel_config == KernelConfig("torch", "native", 1, 0)
    args = build_parser().parse_args(["serve", MODEL, "--attention-backend", "torch", "--linear-method", "torch",
                                      "--gguf-activation-planes", "1", "--gguf-float-rows", "16"])
    assert EngineConfig.from_kwargs(**_engine_kwargs(args)).kernel_config == KernelConfig("torch", "torch", 1, 16)
    # Not given: None, so the environment variable (or the automatic choice) decides.
    assert EngineConfig.from_kwargs(**_engine_kwargs(build_parser().parse_args(["serve", MODEL]))).kernel_config \
        == KernelConfig()


@pytest.mark.parametrize("kwargs", [
    {"attention_backend": "flash_attn"}, {"linear_method": "cublas"},
    {"gguf_activation_planes": 3}, {"gguf_float_rows": -1},
])
def test_invalid_kernel_switches_are_value_errors(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        EngineConfig.from_kwargs(model=MODEL, **kwargs)


def test_the_argument_wins_over_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LOOMLM_ATTENTION_BACKEND", "torch")
    assert select_decode_backend(cpu, torch.float32) == "torch"  # the variable is the default
    if cpu_kernels() is not None:
        assert select_decode_backend(cpu, torch.float32, "cpu_native") == "cpu_native"
    monkeypatch.delenv("LOOMLM_ATTENTION_BACKEND")
    with pytest.raises(ValueError, match="cpu_native"):  # cannot run in bfloat16
        select_decode_backend(cpu, torch.bfloat16, "cpu_native")


def test_the_engine_runs_the_kernels_it_was_given(llm):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = LLM(MODEL, attention_backend="torch", linear_method="torch", num_gpu_blocks_override=64)
    runner = plain.llm_engine.model_runner
    assert runner.decode_backend.name == "torch" and runner.linear_method is TORCH_METHOD
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    # Other kernels, the same greedy tokens as the default engine's (float32 both).
    assert [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)] == expected
    del plain
    quantized = LLM(MODEL, quantization="gguf", gguf_activation_planes=1, gguf_float_rows=0,
                    num_gpu_blocks_override=64)
    method = quantized.llm_engine.model_runner.linear_method
    assert isinstance(method, GGUFLinearMethod) and (method.activation_planes, method.float_rows) == (1, 0)
    assert len(quantized.generate(prompts, greedy, use_tqdm=False)[1].outputs[0].token_ids) == 8
