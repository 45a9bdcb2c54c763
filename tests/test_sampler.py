"""The batched logits processors against their references, on the same logits.

transformers' processors (one setting for the whole batch) are run row by row
with each row's own setting; loomlm runs all rows at once, settings mixed and
some rows off. Presence / frequency penalties follow OpenAI's documented formula.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TypicalLogitsWarper,
)

from loomlm import SamplingParams
from loomlm.engine.request import Request
from loomlm.engine.sampling_metadata import SamplingMetadata
from loomlm.layers import logits_processors as lp
from loomlm.layers.sampler import Sampler, gather_logprobs

VOCAB = 300


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, VOCAB, generator=g) * 3  # [rows, vocab], both signs


def make_request(prompt: list[int], output: list[int], **params) -> Request:
    sp = SamplingParams(**params)
    req = Request("r", prompt, sp, max_tokens=100)
    for t in output:
        req.append_output_token(t)
    return req


def histories(n: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist(),
             torch.randint(0, VOCAB, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-5)


def test_repetition_penalty_matches_transformers(logits):
    penalties = [1.0, 1.3, 0.7, 2.0, 1.1]
    reqs = [make_request(p, o, repetition_penalty=r) for (p, o), r in zip(histories(5), penalties)]
    meta = SamplingMetadata.from_requests(reqs, VOCAB, torch.device("cpu"))
    ours = Sampler.process_logits(logits.clone(), meta)
    for i, (req, penalty) in enumerate(zip(reqs, penalties)):
        ids = torch.tensor([req.all_token_ids])
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i:i + 1].clone())
        assert_same_logits(ours[i:i + 1], ref)
    assert torch.equal(ours[0], logits[0])  # penalty 1: untouched


def test_presence_and_frequency_penalties_follow_openai(logits):
    settings = [(0.0, 0.0), (1.5, 0.0), (0.0, 0.8), (-0.5, 1.2), (2.0, -2.0)]
    hist = histories(5)
    reqs = [make_request(p, o, presence_penalty=pp, frequency_penalty=fp) for (p, o), (pp, fp) in zip(hist, settings)]
    meta = SamplingMetadata.from_requests(reqs, VOCAB, torch.device("cpu"))
    ours = Sampler.process_logits(logits.clone(), meta)
    for i, ((_, output), (presence, frequency)) in enumerate(zip(hist, settings)):
        ref = logits[i].clone()
        # https://platform.openai.com/docs/advanced-usage/frequency-and-presence-penalties
        for token in set(output):  # prompt tokens are not penalised
            count = output.count(token)
            ref[token] -= count * frequency + (1.0 if count > 0 else 0.0) * presence
        torch.testing.assert_close(ours[i], ref)


def test_typical_p_matches_transformers(logits):
    masses = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.95])
    ours = lp.apply_typical_p(logits.clone(), masses)
    for i, mass in enumerate(masses.tolist()):
        if mass == 1.0:
            assert torch.equal(ours[i], logits[i])
            continue
        ref = TypicalLogitsWarper(mass)(None, logits[i:i + 1].clone())
        assert_same_logits(ours[i:i + 1], ref)


def test_min_p_matches_transformers(logits):
    min_ps = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.9])
    ours = lp.apply_min_p(logits.clone(), min_ps)
    for i, m in enumerate(min_ps.tolist()):
        ref = MinPLogitsWarper(m)(None, logits[i:i + 1].clone()) if m else logits[i:i + 1]
        assert_same_logits(ours[i:i + 1], ref)


def test_logit_bias_matches_sequence_bias(logits):
    biases = [None, {5: 10.0, 7: -100.0}, {"42": 3.5}, None, {0: -1.0, 299: 2.0, 150: 0.25}]
    reqs = [make_request([1, 2], [], logit_bias=b) for b in biases]
    meta = SamplingMetadata.from_requests(reqs, VOCAB, torch.device("cpu"))
    ours = Sampler.process_logits(logits.clone(), meta)
    for i, bias in enumerate(biases):
        if bias is None:
            assert torch.equal(ours[i], logits[i])
            continue
        proc = SequenceBiasLogitsProcessor([[[int(t)], float(b)] for t, b in bias.items()])
        ref = proc(torch.tensor([[1, 2]]), logits[i:i + 1].clone())
        assert_same_logits(ours[i:i + 1], ref)


def test_bad_words_match_no_bad_words_processor(logits):
    bad_words_ids = [[17], [4, 9], [3, 8, 12]]
    contexts = [[1, 2, 3], [5, 4], [7, 3, 8], [4, 9, 3, 8], [11]]
    reqs = []
    for ctx in contexts:
        req = make_request(ctx, [])
        req.sampling_params.bad_words_token_ids = bad_words_ids
        reqs.append(req)
    meta = SamplingMetadata.from_requests(reqs, VOCAB, torch.device("cpu"))
    ours = Sampler.process_logits(logits.clone(), meta)
    for i, ctx in enumerate(contexts):
        ref = NoBadWordsLogitsProcessor(bad_words_ids, eos_token_id=299)(torch.tensor([ctx]), logits[i:i + 1].clone())
        assert_same_logits(ours[i:i + 1], ref)


def test_allowed_token_ids_and_min_tokens(logits):
    reqs = [make_request([1], [], allowed_token_ids=[3, 4, 250]), make_request([1], [9], min_tokens=3),
            make_request([1], [9, 9, 9], min_tokens=3), make_request([1], []), make_request([1], [])]
    for r in reqs:
        r.sampling_params.all_stop_token_ids = {2, 7}
    meta = SamplingMetadata.from_requests(reqs, VOCAB, torch.device("cpu"))
    ours = Sampler.process_logits(logits.clone(), meta)
    assert torch.isfinite(ours[0]).nonzero().flatten().tolist() == [3, 4, 250]
    assert torch.isinf(ours[1, [2, 7]]).all() and torch.isfinite(ours[1]).sum() == VOCAB - 2  # below min_tokens
    assert torch.equal(ours[2], logits[2]) and torch.equal(ours[3], logits[3])  # min_tokens reached; unset


def test_gather_logprobs_ranks_and_top_k(logits):
    logprobs = logits.log_softmax(-1)
    chosen = torch.tensor([0, 1, 2, 3, 4])
    out = gather_logprobs(logprobs, 3, chosen)
    assert out.logprob_token_ids.shape == (5, 4)
    assert torch.equal(out.logprob_token_ids[:, 0], chosen)
    torch.testing.assert_close(out.logprobs[:, 0], logprobs[torch.arange(5), chosen])
    order = logprobs.argsort(dim=-1, descending=True)
    assert torch.equal(out.logprob_token_ids[:, 1:], order[:, :3])
    expected_ranks = [(order[i] == chosen[i]).nonzero().item() + 1 for i in range(5)]
    assert out.selected_token_ranks.tolist() == expected_ranks


def test_mixed_batch_rows_with_settings_off_sample_as_alone(logits):
    # Greedy rows pick the argmax of their own processed logits whatever the other rows ask.
    reqs = [make_request([1], [], temperature=0.0), make_request([1], [5, 5], temperature=0.0, frequency_penalty=2.0),
            make_request([1], [], temperature=0.8, top_k=5, typical_p=0.9, seed=1)]
    meta = SamplingMetadata.from_requests(reqs, VOCAB, torch.device("cpu"))
    out = Sampler()(logits[:3].clone(), meta)
    assert out.logprobs is None
    assert out.sampled_token_ids[0] == logits[0].argmax()
    penalised = logits[1].clone()
    penalised[5] -= 4.0
    assert out.sampled_token_ids[1] == penalised.argmax()
    assert out.sampled_token_ids[2] in logits[2].topk(5).indices


def test_processed_logprobs_report_the_distribution_sampled_from(logits):
    """logprobs_mode="processed_logprobs" (vLLM's option, per request here): the logprobs after
    logit_bias (and, sampling, temperature and top-k); raw rows in the same batch keep the model's."""
    top = int(logits[0].argmax())
    bias = {top: -100.0}
    reqs = [make_request([1], [], temperature=0.0, logprobs=3, logit_bias=bias, logprobs_mode="processed_logprobs"),
            make_request([1], [], temperature=0.0, logprobs=3, logit_bias=bias),
            make_request([1], [], temperature=0.5, top_k=4, logprobs=3, logprobs_mode="processed_logprobs", seed=3)]
    meta = SamplingMetadata.from_requests(reqs, VOCAB, torch.device("cpu"))
    out = Sampler()(logits[:3].clone(), meta)
    biased = logits[0].clone()
    biased[top] -= 100.0
    expected = biased.log_softmax(-1)
    assert int(out.sampled_token_ids[0]) == int(biased.argmax())
    torch.testing.assert_close(out.logprobs.logprobs[0], expected[out.logprobs.logprob_token_ids[0]])
    assert top not in out.logprobs.logprob_token_ids[0].tolist()  # biased away: not among the top 3
    raw = logits[1].log_softmax(-1)  # row 1: raw, so the biased-away token still leads the top 3
    assert int(out.logprobs.logprob_token_ids[1, 1]) == int(logits[1].argmax())
    torch.testing.assert_close(out.logprobs.logprobs[1], raw[out.logprobs.logprob_token_ids[1]])
    scaled = logits[2] / 0.5
    kept = scaled.topk(4).indices
    truncated = torch.full_like(scaled, float("-inf"))
    truncated[kept] = scaled[kept]
    assert int(out.sampled_token_ids[2]) in kept.tolist()
    ids = out.logprobs.logprob_token_ids[2]
    torch.testing.assert_close(out.logprobs.logprobs[2], truncated.log_softmax(-1)[ids])
    with pytest.raises(ValueError, match="logprobs_mode"):
        SamplingParams(logprobs_mode="raw_logits")
