"""Query templates: text with `[VAR]` holes, `{:user}` / `{:assistant}` / `{:system}` chat tags
and `{VAR}` references, parsed into segments.

Syntax (after LMQL's prompt strings, ../shared/specs/lmql-generations.md):

- `[NAME]`: a hole the model fills; `[NAME:int]` is a hole with `INT(NAME)`; `[NAME:input]`
  is a hole the output writer's `input()` fills (a person, in an interactive run).
- `{:user}`, `{:assistant}`, `{:system}`: start a chat message of that role; a query with
  chat tags is rendered through the model's chat template (text before the first tag must be
  blank).
- `{NAME}`: the value of an earlier hole, or of an input given to `run(inputs=...)`.
- `[[`, `]]`, `{{`, `}}`: literal brackets and braces.

Names are Python identifiers. A hole name used twice is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
HOLE_KINDS = ("generate", "int", "input")

_TOKEN = re.compile(r"""
    (?P<escape>\[\[|\]\]|\{\{|\}\})
  | \[\s*(?P<hole>[A-Za-z_]\w*)\s*(?::\s*(?P<kind>\w+)\s*)?\]
  | \{:(?P<role>\w+)\}
  | \{(?P<ref>[A-Za-z_]\w*)\}
""", re.VERBOSE)


@dataclass(frozen=True)
class Text:
    """Literal text of the prompt."""

    text: str


@dataclass(frozen=True)
class Hole:
    """A variable to fill: `kind` "generate" (the model), "int" (the model, digits only) or "input"."""

    name: str
    kind: str = "generate"


@dataclass(frozen=True)
class RoleTag:
    """The start of a chat message of `role`."""

    role: str


@dataclass(frozen=True)
class Reference:
    """`{name}`: the value of an earlier hole or of an input."""

    name: str


Segment = Text | Hole | RoleTag | Reference


@dataclass(frozen=True)
class Template:
    """A parsed query."""

    segments: list[Segment]

    @property
    def holes(self) -> list[Hole]:
        return [s for s in self.segments if isinstance(s, Hole)]

    @property
    def is_chat(self) -> bool:
        return any(isinstance(s, RoleTag) for s in self.segments)


def parse_template(query: str, inputs: Iterable[str] = ()) -> Template:
    """Parse `query` (see the module docstring); `inputs` are the names `{NAME}` may use besides
    earlier holes.

    Raises ValueError: a non-string or empty query, a hole name used twice, an unknown hole
    kind or chat role, a reference to no earlier hole or input, text before the first chat
    tag, or a query without any hole.
    """
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the query must be a non-empty string.")
    known = set(inputs)
    segments: list[Segment] = []
    pos = 0
    for match in _TOKEN.finditer(query):
        if match.start() > pos:
            segments.append(Text(query[pos:match.start()]))
        pos = match.end()
        if match["escape"]:
            segments.append(Text(match["escape"][0]))
        elif match["hole"]:
            name, kind = match["hole"], match["kind"] or "generate"
            if kind not in HOLE_KINDS:
                raise ValueError(f"hole [{name}:{kind}]: unknown kind {kind!r}; expected int or input.")
            if name in known:
                raise ValueError(f"the name {name!r} is used by two holes (or a hole and an input); "
                                 "hole names must be unique.")
            known.add(name)
            segments.append(Hole(name, kind))
        elif match["role"]:
            if match["role"] not in ROLES:
                raise ValueError(f"unknown chat tag {{:{match['role']}}}; expected one of "
                                 + ", ".join(f"{{:{r}}}" for r in ROLES) + ".")
            segments.append(RoleTag(match["role"]))
        else:
            if match["ref"] not in known:
                raise ValueError(f"{{{match['ref']}}} names no earlier hole and no input.")
            segments.append(Reference(match["ref"]))
    if pos < len(query):
        segments.append(Text(query[pos:]))
    template = Template(_merge_text(segments))
    if not template.holes:
        raise ValueError("the query has no [VAR] hole to fill.")
    if template.is_chat:
        first_tag = next(i for i, s in enumerate(template.segments) if isinstance(s, RoleTag))
        if any(not isinstance(s, Text) or s.text.strip() for s in template.segments[:first_tag]):
            raise ValueError("in a chat query everything belongs to a message: start it with {:system}, "
                             "{:user} or {:assistant}.")
    return template


def _merge_text(segments: list[Segment]) -> list[Segment]:
    """Adjacent Text segments joined (escapes produce one-character texts)."""
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, Text) and merged and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + segment.text)
        else:
            merged.append(segment)
    return merged
