"""Running a query: fill its holes in order, each decoded under its compiled constraints and
streamed to the output writer as the engine produces tokens.

A plain query's prompt for a hole is the text so far (the query's text with the values so
far). A chat query's is the messages so far rendered by the model's chat template with the
last message left open (`continue_final_message`), so a hole in an `{:assistant}` message is
the assistant's reply; closed messages are stripped of surrounding whitespace, the open one of
leading whitespace. Each hole is one engine request; earlier holes' KV blocks come back from
the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loomlm.decoders import Decoder
from loomlm.generation import Model, as_model
from loomlm.query.constraints import HoleConstraints, parse_where
from loomlm.query.lmql_program import looks_like_lmql_program, run_lmql_program
from loomlm.query.program_state import ProgramState
from loomlm.query.template import Hole, Reference, RoleTag, Text, parse_template
from loomlm.query.writers import BaseOutputWriter, silent


@dataclass
class QueryResult:
    """What a query produced.

    Attributes:
        prompt: the whole interaction: the query's text with every hole filled (chat tags kept).
        variables: {hole name: value}, in query order; INT holes hold an int.
        is_valid: every value meets its constraints (a token limit can cut a regex or a
            choice short; the value is then kept as generated and this is False).
    """

    prompt: str
    variables: dict[str, str | int]
    is_valid: bool

    def __getitem__(self, name: str) -> str | int:
        return self.variables[name]


class _Interaction:
    """The text so far and, for a chat query, its messages."""

    def __init__(self, is_chat: bool) -> None:
        self.is_chat = is_chat
        self.text = ""
        self.messages: list[dict[str, str]] = []

    def add(self, text: str) -> None:
        self.text += text
        if self.messages:
            self.messages[-1]["content"] += text

    def open_message(self, role: str) -> None:
        self.text += f"{{:{role}}}"
        self.messages.append({"role": role, "content": ""})

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template gets them (see the module docstring)."""
        closed = [{"role": m["role"], "content": m["content"].strip()} for m in self.messages[:-1]]
        last = self.messages[-1]
        return [*closed, {"role": last["role"], "content": last["content"].lstrip()}]


async def run(query: str, output_writer: BaseOutputWriter | None = None, model: Model | str | None = None,
              where: str | None = None, inputs: dict[str, Any] | None = None, decoder: str = "argmax",
              max_tokens: int | None = None, **decoder_kwargs: Any) -> QueryResult:
    """Run `query` on `model` (None: the default model): loomlm's template syntax
    (`loomlm.query.template`), or an LMQL program (its first statement a decoder clause or a quoted
    prompt), which the `lmql` package compiles and runs on loomlm's engine
    (`loomlm.query.lmql_program`; it then returns lmql's `LMQLResult`, `inputs` are the program's
    free variables, and the program holds its decoder and constraints).

    Args:
        output_writer: gets the query's states as tokens arrive (default `loomlm.silent`).
        where: constraints on the holes in LMQL's notation (`loomlm.query.constraints`), e.g.
            `'STOPS_AT(ANSWER, "\\n") and len(TOKENS(ANSWER)) < 20'`.
        inputs: values for `{NAME}` references that are not holes.
        decoder, max_tokens, decoder_kwargs: how every hole is decoded (`Model.generate`'s
            arguments; argmax or sample with n=1); `max_tokens` caps each hole, a where clause
            may lower it per hole.
    Returns the filled-in prompt and the holes' values.
    Raises ValueError (before anything runs): a malformed query or where clause, a hole name
    reused, a decoder that yields several completions; RuntimeError: input asked of a headless writer.
    """
    if looks_like_lmql_program(query):
        if where is not None or max_tokens is not None or decoder != "argmax" or decoder_kwargs:
            raise ValueError("this query is an LMQL program (it starts with a decoder or a quoted prompt): write its "
                             "decoder, where clause and limits in the program; where=, decoder=, max_tokens= and "
                             "decoder arguments are for loomlm's template syntax.")
        return await run_lmql_program(query, model, output_writer, **(inputs or {}))
    try:
        template = parse_template(query, inputs or {})
        names = [hole.name for hole in template.holes]
        constraints = parse_where(where, names)
    except ValueError as exc:
        raise ValueError(f"{exc} (read as loomlm's template syntax; an LMQL program would start with a decoder "
                         "clause or a quoted prompt string)") from exc
    for hole in template.holes:
        if hole.kind == "input" and constraints[hole.name] != HoleConstraints():
            raise ValueError(f"hole [{hole.name}:input] is filled by the output writer: it takes no constraints.")
        if hole.kind == "int":
            constraints[hole.name].set_structured("INT", f"[{hole.name}:int]", is_int=True)
    base = Decoder.from_kwargs(decoder, max_tokens, **decoder_kwargs)
    if base.n != 1 or base.is_beam:
        raise ValueError("a query fills each hole once: use decoder 'argmax' or 'sample' with n=1.")
    handle = as_model(model)
    writer = output_writer if output_writer is not None else silent
    state = _Interaction(template.is_chat)
    variables: dict[str, str | int] = {}
    texts: dict[str, str] = {}  # each finished hole's text (INT holes: before conversion)
    is_valid, variable, num_tokens = True, None, 0
    for segment in template.segments:
        if isinstance(segment, Text):
            state.add(segment.text)
        elif isinstance(segment, RoleTag):
            state.open_message(segment.role)
        elif isinstance(segment, Reference):
            state.add(str(variables[segment.name] if segment.name in variables else (inputs or {})[segment.name]))
        elif isinstance(segment, Hole):
            variable = segment.name
            if segment.kind == "input":  # no constraints (checked above), so valid and not an INT
                value, num_tokens, ok = str(await writer.input(f"{variable}: ")), 0, True
            else:
                value, num_tokens, ok = await _fill(handle, state, variable, constraints[variable], base, writer,
                                                    where, is_valid, variables, texts)
            is_valid = is_valid and ok
            variables[variable] = int(value) if constraints[variable].is_int and ok else value
            texts[variable] = value
            state.add(value)
            await writer.add_interpreter_head_state(variable, 0, state.text, where, None, is_valid, False, None,
                                                    num_tokens, _program_state(state.text, texts, variables))
    await writer.add_interpreter_head_state(variable, 0, state.text, where, None, is_valid, True, None, num_tokens,
                                            _program_state(state.text, texts, variables))
    return QueryResult(state.text, variables, is_valid)


async def _fill(handle: Model, state: _Interaction, variable: str, constraints: HoleConstraints, base: Decoder,
                writer: BaseOutputWriter, where: str | None, is_valid: bool,
                variables: dict[str, str | int], texts: dict[str, str]) -> tuple[str, int, bool]:
    """Generate one hole, reporting each growth; returns (value, tokens, meets its constraints)."""
    decoder = base.with_constraints(tuple(constraints.stop), constraints.include_stop_str,
                                    constraints.structured_outputs, constraints.max_tokens)
    if state.is_chat:
        prompt: str | list[int] = await handle._chat_prompt(state.chat_messages())
    else:
        prompt = state.text
        if not prompt:
            raise ValueError(f"hole [{variable}] has no text before it: the model needs a prompt to continue.")
    text, num_tokens = "", 0
    async for partial in handle._stream(prompt, decoder):
        value = constraints.value_text(partial.text)
        if value == text and partial.num_tokens == num_tokens:
            continue
        text, num_tokens = value, partial.num_tokens
        await writer.add_interpreter_head_state(variable, 0, state.text + text, where, None, is_valid, False, None,
                                                num_tokens, _program_state(state.text + text, texts, variables,
                                                                           variable, text))
    return text, num_tokens, constraints.is_satisfied_by(text, num_tokens)


def run_sync(query: str, output_writer: BaseOutputWriter | None = None, model: Model | str | None = None,
             **kwargs: Any) -> QueryResult:
    """`run`, blocking (works inside a running event loop too; the writer is then called from
    the model's own event loop thread)."""
    handle = as_model(model)
    return handle._runtime.loop.run_sync(run(query, output_writer, handle, **kwargs))


def _program_state(prompt: str, texts: dict[str, str], variables: dict[str, str | int], current: str | None = None,
                   partial: str | None = None) -> ProgramState:
    """What the writer gets: the finished holes ("fin"), and the one growing ("var") if any."""
    program_state = ProgramState(prompt)
    for name, value in variables.items():
        program_state.set(name, texts[name], value, montonicity="fin")
    if current is not None:
        program_state.set(current, partial, montonicity="var")
    return program_state
