"""Beam search: vLLM's algorithm (see loomlm.beam_search) against a plain reference
run on transformers' logits, against transformers' own `generate(num_beams=...)`
where the two definitions coincide, KV sharing (prompt prefilled once,
copy-on-write), preemption, and bad input.

Why transformers' beam search is compared only with EOS ignored: the
definitions differ once a beam can end early. vLLM (and loomlm) divide by
len ** length_penalty with len counting the *prompt* too (transformers counts
generated tokens only), keep every EOS candidate among a beam's top 2k
(transformers only those ranked within the top k), and never stop early
(transformers' early_stopping=True stops once k hypotheses are done). With
EOS ignored every beam has the same length, both searches keep the top k of
the same candidates each step, and the best sequence must be identical.
"""

from __future__ import annotations

import pytest
import torch

from loomlm import LLM, BeamSearchParams
from loomlm.beam_search import get_beam_search_score

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "The best way to learn is",
           "Water boils at"]


@torch.inference_mode()
def reference_beam_search(model, prompt: list[int], width: int, max_tokens: int, eos: int,
                          length_penalty: float, ignore_eos: bool) -> list[tuple[list[int], float]]:
    """vLLM's LLM.beam_search, written plainly: every beam recomputed from scratch, no KV cache."""
    def score(item: tuple[list[int], float]) -> float:
        return get_beam_search_score(item[0], item[1], eos, length_penalty)

    beams: list[tuple[list[int], float]] = [(prompt, 0.0)]
    completed: list[tuple[list[int], float]] = []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            logprobs = model(torch.tensor([tokens])).logits[0, -1].float().log_softmax(-1)
            top = logprobs.topk(2 * width)
            for token, lp in zip(top.indices.tolist(), top.values.tolist()):
                new = (tokens + [token], cum + lp)
                (completed if token == eos and not ignore_eos else candidates).append(new)
        beams = sorted(candidates, key=score, reverse=True)[:width]
    return sorted(completed + beams, key=score, reverse=True)[:width]


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_matches_the_reference_algorithm(llm, reference, length_penalty):
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True)
    prompts = [chat, PROMPTS[0], PROMPTS[1]]  # the chat prompt ends beams with EOS
    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=length_penalty)
    outputs = llm.beam_search(prompts, params)
    for prompt, out in zip(prompts, outputs):
        ids = tok.encode(prompt)
        ref = reference_beam_search(reference, ids, 3, 6, tok.eos_token_id, length_penalty, ignore_eos=False)
        assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in ref]
        for seq, (tokens, cum) in zip(out.sequences, ref):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
            assert seq.text == tok.decode(tokens)
            assert len(seq.logprobs) == len(tokens) - len(ids)
            assert seq.finish_reason == ("stop" if tokens[-1] == tok.eos_token_id else "length")


def test_best_sequence_matches_transformers_generate_without_eos(llm, reference):
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    outputs = llm.beam_search(PROMPTS, params)
    tok = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, outputs):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            ref = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=4,
                                     num_return_sequences=4, max_new_tokens=8, early_stopping=True,
                                     length_penalty=1.0, eos_token_id=None, pad_token_id=0,
                                     output_scores=True, return_dict_in_generate=True)
        assert out.sequences[0].tokens == ref.sequences[0].tolist()
        # transformers' sequences_scores is cum / generated_len ** length_penalty.
        assert out.sequences[0].cum_logprob / 8 == pytest.approx(ref.sequences_scores[0].item(), abs=1e-4)
        assert [s.tokens for s in out.sequences] == ref.sequences.tolist()


def test_prompt_is_prefilled_once_and_beams_share_blocks(llm):
    engine = llm.llm_engine
    runner = engine.model_runner
    prompt = "A long prompt that spans several KV blocks, so that sharing it matters: " * 3
    num_prompt = len(llm.get_tokenizer().encode(prompt))
    computed_prompt_tokens = 0
    copies = []
    max_shared = 0
    original = runner.execute

    def spy(scheduler_output):
        nonlocal computed_prompt_tokens, max_shared
        for item in scheduler_output.scheduled:
            start = item.request.num_computed_tokens
            computed_prompt_tokens += max(0, min(num_prompt, start + item.num_new_tokens) - start)
        copies.extend(scheduler_output.blocks_to_copy)
        engine.block_manager.check_invariants()
        max_shared = max(max_shared, max(engine.block_manager.ref_counts))
        return original(scheduler_output)

    runner.execute = spy
    try:
        out = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True))[0]
    finally:
        runner.execute = original
    assert len(out.sequences) == 4
    assert computed_prompt_tokens == num_prompt  # not once per beam
    assert max_shared >= 4  # the prompt's blocks were held by all four beams at once
    assert copies  # beams wrote different tokens into a shared partial block: copied first
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_preemption_does_not_change_the_result(llm):
    params = BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True)
    expected = llm.beam_search(PROMPTS[:3], params)
    tight = LLM("smollm2-135m-instruct", num_gpu_blocks_override=10, max_num_batched_tokens=32, max_num_seqs=16)
    got = tight.beam_search(PROMPTS[:3], params)
    assert tight.llm_engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for a, b in zip(expected, got):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    bm = tight.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("kwargs", [{"beam_width": 0}, {"max_tokens": 0}, {"temperature": -1.0}])
def test_bad_beam_params_raise(kwargs):
    with pytest.raises(ValueError):
        BeamSearchParams(**({"beam_width": 2, "max_tokens": 4} | kwargs))


def test_too_wide_or_bad_prompt_raises_and_loses_nothing(llm):
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError):
        llm.beam_search([PROMPTS[0], ""], BeamSearchParams(beam_width=2, max_tokens=2))
    assert not llm.llm_engine.has_unfinished_requests()
