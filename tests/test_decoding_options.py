"""Decoding options end to end on the default model: logprobs and prompt logprobs
against transformers, penalties through generation, best_of, seeds with n > 1,
token constraints, truncation, detokenization options and their bad input."""

from __future__ import annotations

import pytest
import torch

from loomlm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):\n   ", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # A small step budget so the longer prompts are prefilled in several chunks.
    return LLM("smollm2-135m-instruct", max_num_batched_tokens=16, max_num_seqs=16)


def reference_logprobs(reference, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position: [len, vocab]."""
    with torch.inference_mode():
        logits = reference(torch.tensor([token_ids])).logits[0].float()
    return logits.log_softmax(-1)


def test_logprobs_match_transformers(llm, reference):
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        completion = out.outputs[0]
        ids = out.prompt_token_ids + completion.token_ids
        ref = reference_logprobs(reference, ids)
        n_prompt = len(out.prompt_token_ids)
        # Generated tokens: position n_prompt - 1 + i predicts token i.
        assert len(completion.logprobs) == len(completion.token_ids) == 8
        for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = ref[n_prompt - 1 + i]
            assert next(iter(entry)) == token  # the sampled token comes first
            assert len(entry) in (5, 6)  # sampled + top-5 (the greedy token is among them)
            for token_id, lp in entry.items():
                assert abs(lp.logprob - row[token_id].item()) < 1e-4
                assert lp.rank == int((row > row[token_id]).sum()) + 1
            assert entry[token].rank == 1  # greedy
        total = sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs))
        assert completion.cumulative_logprob == pytest.approx(total, abs=1e-5)
        # Prompt tokens: None for the first, then the actual token first and its top-3 alternatives.
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
        for j in range(1, n_prompt):
            entry = out.prompt_logprobs[j]
            actual = out.prompt_token_ids[j]
            assert next(iter(entry)) == actual
            top = ref[j - 1].topk(3).indices.tolist()
            assert set(entry) == {actual, *top}
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[j - 1, token_id].item()) < 1e-4
            assert entry[actual].decoded_token == llm.get_tokenizer().decode([actual])


def test_repetition_penalty_greedy_matches_transformers_generate(llm, reference):
    for penalty in (1.3, 0.8):
        params = SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=penalty, ignore_eos=True)
        for out in llm.generate(PROMPTS, params, use_tqdm=False):
            ids = torch.tensor([out.prompt_token_ids])
            with torch.inference_mode():
                ref = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=16, min_new_tokens=16, repetition_penalty=penalty,
                                         pad_token_id=0)
            assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()


def test_frequency_penalty_stops_a_greedy_loop(llm):
    prompt = "1 1 1 1 1 1 1 1 1 1"
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    penalised = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    frequency_penalty=2.0, presence_penalty=1.0), use_tqdm=False)[0]
    ids = penalised.outputs[0].token_ids
    assert plain.outputs[0].token_ids != ids
    assert max(ids.count(t) for t in ids) < max(plain.outputs[0].token_ids.count(t) for t in plain.outputs[0].token_ids)


def test_best_of_returns_the_n_most_likely_of_its_samples(llm):
    prompt = "Write a short poem about the sea."
    common = dict(temperature=1.0, seed=11, max_tokens=12, logprobs=0)
    best = llm.generate(prompt, SamplingParams(n=2, best_of=5, **common), use_tqdm=False)[0]
    # The same seeds (seed + i) sampled as n=5 give the 5 candidates best_of chose from.
    candidates = llm.generate(prompt, SamplingParams(n=5, **common), use_tqdm=False)[0].outputs
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked]
    assert [c.index for c in best.outputs] == [0, 1]
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob
    # Without logprobs asked, best_of still ranks (cumulative_logprob is reported, logprobs are not).
    no_lp = llm.generate(prompt, SamplingParams(n=2, best_of=5, temperature=1.0, seed=11, max_tokens=12),
                         use_tqdm=False)[0]
    assert [c.token_ids for c in no_lp.outputs] == [c.token_ids for c in ranked]
    assert no_lp.outputs[0].logprobs is None and no_lp.outputs[0].cumulative_logprob is not None


def test_seeded_n_is_reproducible_across_batch_compositions(llm):
    params = SamplingParams(n=3, temperature=0.9, top_p=0.95, seed=5, max_tokens=10, presence_penalty=0.5)
    alone = llm.generate("Tell me a joke.", params, use_tqdm=False)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=7), SamplingParams(temperature=0.0, max_tokens=3)]
    crowded = llm.generate(["Hello", "Tell me a joke.", "Numbers: 1, 2,"], [others[0], params, others[1]],
                           use_tqdm=False)[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowded.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1  # three independent samples


def test_token_constraints(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert "Paris" in base.outputs[0].text
    banned = llm.generate("The capital of France is",
                          SamplingParams(temperature=0, max_tokens=6, bad_words=["Paris"]), use_tqdm=False)[0]
    assert "Paris" not in banned.outputs[0].text
    target = tok.encode(" banana", add_special_tokens=False)[0]
    biased = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                               logit_bias={str(target): 100}), use_tqdm=False)[0]
    assert biased.outputs[0].token_ids == [target] * 5
    allowed = [tok.encode(w, add_special_tokens=False)[0] for w in (" yes", " no", " maybe")]
    constrained = llm.generate("Is the sky blue?", SamplingParams(temperature=1.0, seed=0, max_tokens=8, ignore_eos=True,
                                                                  allowed_token_ids=allowed), use_tqdm=False)[0]
    assert set(constrained.outputs[0].token_ids) <= set(allowed)


def test_min_tokens_holds_back_eos(llm):
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Say OK."}], tokenize=False, add_generation_prompt=True)
    short = llm.generate(chat, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    held = llm.generate(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=20), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 20
    assert tok.eos_token_id not in held.token_ids[:19]


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    ids = llm.get_tokenizer().encode("one two three four five six seven eight nine ten")
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=4), use_tqdm=False)[0]
    direct = llm.generate(ids[-4:], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-4:]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids


def test_detokenization_options(llm):
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Say OK."}], tokenize=False, add_generation_prompt=True)
    kept = llm.generate(chat, SamplingParams(temperature=0, max_tokens=32, skip_special_tokens=False),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text.endswith(tok.eos_token)
    base = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    stop = "Paris"
    cut = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8, stop=stop),
                       use_tqdm=False)[0].outputs[0]
    with_stop = llm.generate("The capital of France is", SamplingParams(
        temperature=0, max_tokens=8, stop=stop, include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert stop not in cut.text and with_stop.text.endswith(stop)
    assert base.outputs[0].text.startswith(with_stop.text)


@pytest.mark.parametrize("kwargs", [
    {"logprobs": 21}, {"prompt_logprobs": 50}, {"logit_bias": {10**6: 1.0}}, {"allowed_token_ids": [10**6]},
    {"stop_token_ids": [10**6]},
])
def test_bad_input_against_the_model_raises_and_loses_nothing(llm, kwargs):
    engine = llm.llm_engine
    with pytest.raises(ValueError):
        llm.generate(["fine", "also fine"], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, **kwargs)],
                     use_tqdm=False)
    assert not engine.has_unfinished_requests()
    ok = llm.generate("fine", SamplingParams(max_tokens=2, logprobs=20), use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == 2


def test_chat_equals_generate_on_the_rendered_conversation(llm):
    tok = llm.get_tokenizer()
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}],
                     [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]]
    params = SamplingParams(temperature=0, max_tokens=10)
    chats = llm.chat(conversations, params, use_tqdm=False)
    for conversation, out in zip(conversations, chats):
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        direct = llm.generate(tok.encode(ids, add_special_tokens=False), params, use_tqdm=False)[0]
        assert out.prompt_token_ids == direct.prompt_token_ids
        assert out.outputs[0].text == direct.outputs[0].text
        assert out.prompt == ids  # the rendered conversation, as vLLM's LLM.chat reports it
    single = llm.chat(conversations[0], params, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].text == chats[0].outputs[0].text
    # continue_final_message: the assistant's partial reply is continued, not closed.
    partial = conversations[0] + [{"role": "assistant", "content": "The answer is"}]
    cont = llm.chat(partial, params, use_tqdm=False, continue_final_message=True)[0]
    assert tok.decode(cont.prompt_token_ids).endswith("The answer is")
    custom = llm.chat(conversations[0], params, use_tqdm=False,
                      chat_template="{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}")[0]
    assert tok.decode(custom.prompt_token_ids) == "Q: What is 2 + 2?\nA:"
    with pytest.raises(ValueError):
        llm.chat([], params, use_tqdm=False)
    with pytest.raises(ValueError):
        llm.chat(conversations[0], params, use_tqdm=False, chat_template="{% if %}")


def test_watermarked_generations_are_detected(llm):
    from loomlm.watermark import WatermarkParams, detect

    prompts = ["Write a story about a dragon.", "Describe your favourite city.", "Explain how rain forms.",
               "Tell me about the history of bread."]
    common = dict(temperature=1.0, max_tokens=200, ignore_eos=True)
    marked = llm.generate(prompts, [SamplingParams(seed=i, watermark=True, **common) for i in range(4)],
                          use_tqdm=False)
    plain = llm.generate(prompts, [SamplingParams(seed=i, **common) for i in range(4)], use_tqdm=False)
    for m, p in zip(marked, plain):
        ids = m.prompt_token_ids[-1:] + m.outputs[0].token_ids  # the first token is seeded by the prompt's last
        found = detect(ids)
        assert found.num_tokens_scored == 200 and found.z_score > 4 and found.is_watermarked
        assert detect(m.outputs[0].text).is_watermarked  # from text, through the tokenizer
        assert not detect(p.prompt_token_ids[-1:] + p.outputs[0].token_ids).is_watermarked
        assert not detect(ids, hash_key=WatermarkParams().hash_key + 1).is_watermarked  # the key matters
