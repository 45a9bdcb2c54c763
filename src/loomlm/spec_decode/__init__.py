"""Speculative decoding: proposers, exact acceptance, and the engine's per-request bookkeeping.

A proposer guesses the next k tokens of a decoding request (`ngram_proposer`: prompt lookup;
`draft_model_proposer`: a smaller model, greedily). The next engine step computes the request's
last token and the k proposals in one target forward pass (k + 1 decode queries over one block
table) and samples a token at each of the k + 1 positions, row i from the target's distribution
given proposals 0..i-1; `rejection.accepted_prefix` keeps the proposals while the rows confirm
them, then the first row that does not (or the bonus row after all k). Follows vLLM v1
(`vllm/v1/spec_decode/`, `vllm/v1/sample/rejection_sampler.py`); exactness is argued in
`rejection.py`.
"""
