"""Exact acceptance of proposed tokens (speculative sampling, Leviathan et al. 2023; Chen et al. 2023).

A proposer here is deterministic: it puts all its mass on its proposal d (q = one-hot(d); the
n-gram proposer and the greedy draft model both are). Speculative sampling then accepts d with
probability min(1, p(d) / q(d)) = p(d) and, on rejection, draws from the residual
norm(max(p - q, 0)), which is p with d removed and renormalised. Drawing t ~ p and accepting d
exactly when t == d does both at once: P(accept) = p(d), and a rejected draw is t ~ p given
t != d, the residual. So the sampler draws one token per position from the target's own
distribution (after every logits processor, temperature, top-k / top-p, with the request's
generator), row i conditioned on the proposals before i; the accepted output is the rows'
tokens up to and including the first that differs from its proposal, or all k + 1 (the last, the
"bonus" token, drawn from p given all k proposals). Greedy rows take the argmax, and the rule
becomes "accept while the argmax equals the proposal": exactly the non-speculative tokens. Each
output token is thus distributed as the non-speculative sampler's at that position.
"""

from __future__ import annotations


def accepted_prefix(row_tokens: list[int], proposed: list[int]) -> list[int]:
    """The tokens a request takes this step.

    row_tokens: the token sampled at each of its 1 + len(proposed) rows (row i given proposals
    0..i-1); proposed: its proposed tokens. Returns row_tokens[:a + 1], where a counts the leading
    rows whose token equals the proposal at that position (0 <= a <= len(proposed)).
    """
    accepted = 0
    while accepted < len(proposed) and row_tokens[accepted] == proposed[accepted]:
        accepted += 1
    return row_tokens[:accepted + 1]
