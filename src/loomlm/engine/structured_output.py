"""Structured output: constraints compiled off the hot path, applied as per-step token bitmasks.

The compiler is llguidance (the grammar backend vLLM also ships): a constraint
becomes an llguidance grammar (JSON schema, regex, Lark), compiled into an
`LLMatcher` in a worker thread and cached by the constraint's key; each
request gets a copy of the cached matcher (`deep_copy`), so a schema seen
before starts at once. A request whose matcher is still compiling is not
admitted by the scheduler, so it never stalls the batch.

Per step, the matchers of the constrained rows fill one int32 bitmask
[rows, ceil(vocab / 32)] in parallel (llguidance's executor); bit t of a row
allows token t. EOS is allowed only where the grammar may end; a matcher that
has stopped (nothing but EOS could follow, or EOS was taken) ends its request.
When the grammar admits exactly one continuation, its tokens are appended
without sampling (llguidance's forced tokens, "jump-forward").
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING


from loomlm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from loomlm.engine.scheduler import GrammarBitmask, SchedulerOutput

logger = logging.getLogger(__name__)


# JSON as json.dumps writes it (", " and ": "): the spacing models saw most in training, so
# forcing it disturbs them least; no other whitespace, which a small model can pad forever.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Compiled constraints kept for reuse (least recently used evicted).
MAX_CACHED_GRAMMARS = 256


def grammar_of(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) of one constraint."""
    from llguidance import LLMatcher

    if params.json is not None:
        schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
        return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_STYLE)
    if params.json_object:
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_STYLE)
    if params.regex is not None:
        return LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        # JSON string literals are valid Lark literals in llguidance, escapes included.
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    return LLMatcher.grammar_from_lark(params.grammar)


class StructuredOutputRequest:
    """One sequence's constraint state: its compile future, then its own matcher."""

    def __init__(self, future: Future, manager: StructuredOutputManager) -> None:
        self._future = future
        self._manager = manager  # counts jump-forward tokens engine-wide
        self.matcher = None

    @property
    def is_ready(self) -> bool:
        """True once the grammar is compiled (the request may then be scheduled)."""
        if self.matcher is None and self._future.done():
            self.matcher = self._future.result().deep_copy()
        return self.matcher is not None

    def accept(self, token_id: int) -> None:
        """Advance the matcher by a generated token (the mask guarantees it is allowed)."""
        if not self.matcher.consume_token(token_id):
            logger.warning("token %d rejected by the grammar: %s", token_id, self.matcher.get_error())

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many leading `token_ids` the grammar accepts in a row from here (speculative
        proposals past them are cut); the matcher is left as it was."""
        return self.matcher.validate_tokens(token_ids)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete: nothing but the end can follow (or the end was taken)."""
        return self.matcher.is_stopped()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (empty when there is a choice); the caller appends them
        without sampling and feeds them back through `accept`."""
        tokens = list(self.matcher.compute_ff_tokens())
        self._manager.num_forced_tokens += len(tokens)
        return tokens


class StructuredOutputManager:
    """Validates and compiles constraints (worker thread, cached) and fills per-step bitmasks.

    Args:
        tokenizer: the model's HF (fast) tokenizer.
        vocab_size: the model's vocabulary size (logits width, >= len(tokenizer)).
    """

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        # Imported here, at start-up (the server builds the manager with the app), not at the first
        # bitmask: the import takes ~3.5 s and holds the GIL for up to ~0.4 s at a time, which
        # stalled every HTTP answer (/health: 413 ms) during the first structured request.
        import llguidance.torch  # noqa: F401

        self.vocab_size = vocab_size
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._executor = llguidance.LLExecutor()
        self._compile_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loomlm-grammar")
        # Constraint key -> its compile, least recently used first; bounded, since every request
        # may bring a new schema (a request holding an evicted one keeps its own matcher).
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._validated: OrderedDict[tuple, None] = OrderedDict()  # keys of valid constraints, oldest first
        self.num_compiles = 0  # distinct constraints compiled (cache misses)
        self.num_cache_hits = 0
        self.num_forced_tokens = 0  # tokens appended by jump-forward instead of sampled

    def validate(self, params: StructuredOutputsParams) -> None:
        """Raises ValueError with the compiler's message when the constraint is invalid."""
        from llguidance import LLMatcher

        key = params.key
        if key in self._cache or key in self._validated:
            return  # checked before: the engine validates once off the event loop, then again on adding
        try:
            grammar = grammar_of(params)
        except Exception as exc:  # llguidance reports bad input as ValueError / RuntimeError
            raise ValueError(f"invalid structured output constraint: {exc}") from exc
        error = LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise ValueError(f"invalid structured output constraint: {error}")
        with self._lock:
            self._validated[key] = None
            while len(self._validated) > MAX_CACHED_GRAMMARS:
                self._validated.popitem(last=False)

    def request_state(self, params: StructuredOutputsParams) -> StructuredOutputRequest:
        """A new sequence's state; compiles the constraint in the worker thread unless cached."""
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                self.num_compiles += 1
                future = self._cache[key] = self._compile_pool.submit(self._compile, params)
                while len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
        return StructuredOutputRequest(future, self)

    def _compile(self, params: StructuredOutputsParams):
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer, grammar_of(params), log_level=1)
        if matcher.is_error():
            raise ValueError(f"invalid structured output constraint: {matcher.get_error()}")
        return matcher

    def grammar_bitmask(self, scheduler_output: SchedulerOutput) -> GrammarBitmask | None:
        """The step's hook: the bitmask rows of the constrained requests that sample a token this
        step (in scheduling order), or None when there are none. A request verifying proposed
        tokens gets a row per position: its next token after each prefix of the proposals."""
        import llguidance.torch  # already imported by __init__: a dict lookup

        from loomlm.engine.scheduler import GrammarBitmask

        constrained = [it for it in scheduler_output.scheduled
                       if it.samples_token and it.request.structured_output is not None]
        if not constrained:
            return None
        rows = [(it.request.request_id, i) for it in constrained for i in range(1 + len(it.spec_token_ids))]
        mask = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        plain, drafted, row = [], [], 0
        for it in constrained:
            matcher = it.request.structured_output.matcher
            if it.spec_token_ids:
                drafted.append((matcher, row, list(it.spec_token_ids)))
            else:
                plain.append((matcher, row))
            row += 1 + len(it.spec_token_ids)
        if plain:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, plain, mask)
        if drafted:
            llguidance.torch.fill_next_token_bitmask_par_with_draft_tokens(self._executor, drafted, mask)
        return GrammarBitmask(rows, mask)
