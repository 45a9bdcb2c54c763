"""A query's `where` clause (LMQL's constraint notation), parsed with `ast` and compiled to the
engine's own mechanisms: stop strings, max tokens and structured outputs. Nothing is retried:
a constraint shapes the decoding of its hole as it happens.

Source: LMQL's constraints (`lmql/ops`): `STOPS_AT(VAR, s)` ends the hole at `s`, which stays
in the value; `STOPS_BEFORE(VAR, s)` ends it before `s`; `len(TOKENS(VAR)) < n` (or `<=`);
`VAR in ["a", "b"]`; `INT(VAR)`; `REGEX(VAR, r"...")`. Terms are joined with `and`. The clause
is never evaluated: only these shapes, with literal arguments, are accepted.

Compilation: STOPS_AT / STOPS_BEFORE -> `stop` (+ `include_stop_str_in_output` for STOPS_AT);
the token limit -> `max_tokens`; `in` -> a `choice` constraint; INT -> the regex
` ?-?[0-9]+[^0-9]`: an optional leading space (models write numbers after a colon), digits, and
one more character that ends the number and is dropped from the value (LMQL ends an INT at the
first non-digit token; a bare ` ?-?[0-9]+` would let the model append digits forever, since
end-of-sequence rarely follows a number); REGEX -> a `regex` constraint. One hole takes at
most one of `in`, INT and REGEX.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from loomlm.sampling_params import StructuredOutputsParams

INT_REGEX = r" ?-?[0-9]+"  # an INT value
_INT_DECODING_REGEX = INT_REGEX + r"[^0-9]"  # what is decoded: the value and the character ending it


@dataclass
class HoleConstraints:
    """Everything the where clause says about one hole."""

    stop: list[str] = field(default_factory=list)
    include_stop_str: bool = False  # STOPS_AT keeps the stop string in the value
    max_tokens: int | None = None
    choice: list[str] | None = None
    regex: str | None = None
    is_int: bool = False

    @property
    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.choice is not None:
            return StructuredOutputsParams(choice=self.choice)
        if self.is_int:
            return StructuredOutputsParams(regex=_INT_DECODING_REGEX)
        if self.regex is not None:
            return StructuredOutputsParams(regex=self.regex)
        return None

    def value_text(self, generated: str) -> str:
        """The hole's value in the text generated so far (an INT's ending character dropped)."""
        if self.is_int and generated and not generated[-1].isdigit():
            return generated[:-1]
        return generated

    def is_satisfied_by(self, value: str, num_tokens: int) -> bool:
        """Whether a finished value meets every constraint (it can miss one when the token limit
        cut a regex or a choice short)."""
        for stop in self.stop:
            index = value.find(stop)
            allowed = len(value) - len(stop) if self.include_stop_str else -1
            if index not in (-1, allowed):
                return False
        if self.max_tokens is not None and num_tokens > self.max_tokens:
            return False
        if self.choice is not None and value not in self.choice:
            return False
        if self.is_int and re.fullmatch(INT_REGEX, value) is None:
            return False
        return not (self.regex is not None and re.fullmatch(self.regex, value) is None)

    def set_structured(self, kind: str, term: str, **value: object) -> None:
        """Constrain the hole by `kind` (in / INT / REGEX), setting `value` (choice=, is_int= or
        regex=); only one kind may. Raises ValueError naming `term` when another one did."""
        taken = [name for name, on in (("in", self.choice is not None), ("INT", self.is_int),
                                       ("REGEX", self.regex is not None)) if on]
        if taken:
            raise ValueError(f"malformed where clause: {term!r} conflicts with {taken[0]} on the same hole "
                             "(one hole takes one of in, INT, REGEX).")
        for name, setting in value.items():
            setattr(self, name, setting)


def parse_where(where: str | None, holes: list[str]) -> dict[str, HoleConstraints]:
    """Per hole name (each of `holes` gets an entry), its constraints.

    Raises ValueError for a clause that is not Python syntax, a term of an unsupported shape,
    a name that is not a hole, or conflicting constraints.
    """
    constraints = {name: HoleConstraints() for name in holes}
    if where is not None and not isinstance(where, str):
        raise ValueError(f"where must be a string, got {type(where).__name__}.")
    if where is None or not where.strip():
        return constraints
    try:
        tree = ast.parse(where.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"malformed where clause {where!r}: {exc.msg}.") from exc
    terms = tree.values if isinstance(tree, ast.BoolOp) and isinstance(tree.op, ast.And) else [tree]
    for term in terms:
        _apply(term, constraints)
    return constraints


def _unsupported(term: ast.expr, why: str = "") -> ValueError:
    return ValueError(f"malformed where clause: unsupported constraint {ast.unparse(term)!r}{why}; "
                      "expected STOPS_AT(VAR, s), STOPS_BEFORE(VAR, s), len(TOKENS(VAR)) < n, VAR in [...], "
                      "INT(VAR) or REGEX(VAR, r) joined by `and`.")


def _hole(node: ast.expr, term: ast.expr, constraints: dict[str, HoleConstraints]) -> HoleConstraints:
    if not isinstance(node, ast.Name):
        raise _unsupported(term, " (the first argument must be a hole's name)")
    if node.id not in constraints:
        raise ValueError(f"malformed where clause: {node.id!r} in {ast.unparse(term)!r} is not a hole of the query.")
    return constraints[node.id]


def _literal(node: ast.expr, kind: type, term: ast.expr):
    if not isinstance(node, ast.Constant) or not isinstance(node.value, kind) or isinstance(node.value, bool):
        raise _unsupported(term, f" (expected a {kind.__name__} literal)")
    return node.value


def _apply(term: ast.expr, constraints: dict[str, HoleConstraints]) -> None:
    text = ast.unparse(term)
    if isinstance(term, ast.Call) and isinstance(term.func, ast.Name) and not term.keywords:
        name, args = term.func.id, term.args
        if name in ("STOPS_AT", "STOPS_BEFORE") and len(args) == 2:
            hole = _hole(args[0], term, constraints)
            stop = _literal(args[1], str, term)
            if not stop:
                raise _unsupported(term, " (the stop string is empty)")
            include = name == "STOPS_AT"
            if hole.stop and hole.include_stop_str != include:
                raise ValueError(f"malformed where clause: {text!r}: one hole cannot mix STOPS_AT and STOPS_BEFORE.")
            hole.stop.append(stop)
            hole.include_stop_str = include
            return
        if name == "INT" and len(args) == 1:
            _hole(args[0], term, constraints).set_structured("INT", text, is_int=True)
            return
        if name == "REGEX" and len(args) == 2:
            hole = _hole(args[0], term, constraints)
            pattern = _literal(args[1], str, term)
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"malformed where clause: {text!r}: bad regular expression ({exc}).") from exc
            hole.set_structured("REGEX", text, regex=pattern)
            return
    if isinstance(term, ast.Compare) and len(term.ops) == 1:
        op, right = term.ops[0], term.comparators[0]
        if isinstance(op, ast.In):
            hole = _hole(term.left, term, constraints)
            if not isinstance(right, (ast.List, ast.Tuple)) or not right.elts:
                raise _unsupported(term, " (expected a non-empty list of strings)")
            hole.set_structured("in", text)
            hole.choice = [_literal(element, str, term) for element in right.elts]
            if not all(hole.choice):
                raise _unsupported(term, " (a choice is empty)")
            return
        if isinstance(op, (ast.Lt, ast.LtE)) and _is_len_tokens(term.left):
            hole = _hole(term.left.args[0].args[0], term, constraints)
            limit = _literal(right, int, term) - (1 if isinstance(op, ast.Lt) else 0)
            if limit < 1:
                raise ValueError(f"malformed where clause: {text!r} leaves no token to generate.")
            hole.max_tokens = limit if hole.max_tokens is None else min(hole.max_tokens, limit)
            return
    raise _unsupported(term)


def _is_len_tokens(node: ast.expr) -> bool:
    """`len(TOKENS(<something>))`."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Call)
            and isinstance(node.args[0].func, ast.Name) and node.args[0].func.id == "TOKENS"
            and len(node.args[0].args) == 1)
