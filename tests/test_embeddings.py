"""Embeddings (vLLM's `LLM.embed`, OpenAI's `/v1/embeddings`, LoRAX's `/embed`): the model's final
hidden states pooled (last token or mean) and L2-normalised, equal to a transformers forward on
the same weights within 1e-4, batched with generation, through the real `openai` and `lorax` clients."""

from __future__ import annotations

import asyncio

import pytest
import torch
from lorax import Client as LoRAXClient
from openai import BadRequestError
from transformers import AutoModelForCausalLM, AutoTokenizer

from loomlm import LLM, SamplingParams
from loomlm.pooling_params import PoolingParams

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
           "A much longer prompt about nothing in particular, " * 6]


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model_dir):
    return make_tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    # A small token budget: the long prompt's prefill runs in chunks (MEAN sums across them).
    return LLM(str(tiny_dir), max_num_batched_tokens=32, max_num_seqs=8)


def reference_embeddings(model_dir, prompts: list[str], pooling: str, normalize: bool = True) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state[0]  # [T, hidden], after the final norm
        vector = hidden[-1] if pooling == "LAST" else hidden.mean(dim=0)
        out.append(torch.nn.functional.normalize(vector, dim=-1) if normalize else vector)
    return out


@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
def test_embed_equals_transformers_pooled_hidden_states(tiny_llm, tiny_dir, pooling):
    outputs = tiny_llm.embed(PROMPTS, PoolingParams(pooling_type=pooling), use_tqdm=False)
    for output, expected in zip(outputs, reference_embeddings(tiny_dir, PROMPTS, pooling)):
        assert output.finished and output.outputs.hidden_size == expected.shape[0]
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, rtol=0, atol=1e-4)
    # Again: the prompts' blocks are now in the prefix cache; MEAN must not take states from it.
    again = tiny_llm.embed(PROMPTS, PoolingParams(pooling_type=pooling), use_tqdm=False)
    for first, second in zip(outputs, again):
        torch.testing.assert_close(torch.tensor(second.outputs.embedding), torch.tensor(first.outputs.embedding),
                                   rtol=0, atol=1e-5)


def test_unnormalised_and_dimensions(tiny_llm, tiny_dir):
    (output,) = tiny_llm.embed(PROMPTS[:1], PoolingParams(normalize=False), use_tqdm=False)
    (expected,) = reference_embeddings(tiny_dir, PROMPTS[:1], "LAST", normalize=False)
    torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, rtol=1e-5, atol=1e-4)
    assert abs(torch.tensor(output.outputs.embedding).norm().item() - 1.0) > 1e-3
    hidden = expected.shape[0]
    assert tiny_llm.embed(PROMPTS[:1], PoolingParams(dimensions=hidden), use_tqdm=False)[0].outputs.hidden_size == hidden
    with pytest.raises(ValueError, match="dimensions"):
        tiny_llm.embed(PROMPTS[:1], PoolingParams(dimensions=hidden // 2), use_tqdm=False)
    with pytest.raises(ValueError, match="pooling_type"):
        PoolingParams(pooling_type="CLS")


def test_engine_default_pooling_from_override_pooler_config(tiny_dir):
    llm = LLM(str(tiny_dir), override_pooler_config={"pooling_type": "mean"}, kv_cache_memory_bytes=16 << 20)
    (output,) = llm.embed(PROMPTS[:1], use_tqdm=False)
    (expected,) = reference_embeddings(tiny_dir, PROMPTS[:1], "MEAN")
    torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown keys"):
        LLM(str(tiny_dir), override_pooler_config={"pooling": "MEAN"})


def test_embeddings_batch_with_generation(tiny_dir):
    """Embedding and generation requests in flight together on one AsyncLLMEngine: each gets what
    it gets alone."""
    from loomlm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(model=str(tiny_dir), kv_cache_memory_bytes=16 << 20)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def together():
        async def generate(prompt):
            final = None
            async for final in engine.generate(prompt, params):
                pass
            return final.outputs[0].token_ids

        return await asyncio.gather(*(generate(p) for p in PROMPTS), *(engine.embed(p) for p in PROMPTS))

    try:
        results = asyncio.run(together())
        alone_tokens = [asyncio.run(_generate_alone(engine, p, params)) for p in PROMPTS]
    finally:
        engine.shutdown()
    assert results[:3] == alone_tokens
    for output, expected in zip(results[3:], reference_embeddings(tiny_dir, PROMPTS, "LAST")):
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, rtol=0, atol=1e-4)


async def _generate_alone(engine, prompt, params):
    final = None
    async for final in engine.generate(prompt, params):
        pass
    return final.outputs[0].token_ids


def test_openai_and_lorax_clients_get_the_offline_embeddings(client, server, llm):
    expected = [torch.tensor(o.outputs.embedding) for o in llm.embed(PROMPTS[:2], use_tqdm=False)]
    name = server.engine.served_model_name
    default = client.embeddings.create(model=name, input=PROMPTS[:2])  # the client asks for base64
    as_float = client.embeddings.create(model=name, input=PROMPTS[:2], encoding_format="float")
    for response in (default, as_float):
        assert [d.index for d in response.data] == [0, 1]
        for item, want in zip(response.data, expected):
            torch.testing.assert_close(torch.tensor(item.embedding), want, rtol=0, atol=1e-6)
    token_ids = server.tokenizer.encode(PROMPTS[0])
    assert default.usage.prompt_tokens == default.usage.total_tokens == \
        len(token_ids) + len(server.tokenizer.encode(PROMPTS[1]))
    by_ids = client.embeddings.create(model=name, input=token_ids, encoding_format="float")
    torch.testing.assert_close(torch.tensor(by_ids.data[0].embedding), expected[0], rtol=0, atol=1e-6)
    hidden = expected[0].shape[0]
    assert len(client.embeddings.create(model=name, input="hi", dimensions=hidden,
                                        encoding_format="float").data[0].embedding) == hidden
    for kwargs, message in ((dict(input="hi", dimensions=8), "dimensions"), (dict(input=""), "input"),
                            (dict(input=[]), "input")):
        with pytest.raises(BadRequestError, match=message):
            client.embeddings.create(model=name, **kwargs)
    lorax = LoRAXClient(server.base_url)
    torch.testing.assert_close(torch.tensor(lorax.embed(PROMPTS[0]).embeddings), expected[0], rtol=0, atol=1e-6)
