"""Output writers: how a running query reports its progress (LMQL's `lmql.printing`,
`lmql.stream(...)`, `lmql.headless`, `lmql.silent` and `BaseOutputWriter`).

`loomlm.run` calls `add_interpreter_head_state` each time a hole's text grows (as the engine
produces tokens), once when a hole is finished, and once when the query is done
(`is_final=True`); it calls `input` for `[NAME:input]` holes. Both are awaited in the event
loop that runs the query. Source: LMQL's `lmql/runtime/output_writer.py` (the method
signatures), ../shared/specs/lmql-generations.md.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from loomlm.query.program_state import ProgramState


class BaseOutputWriter:
    """Receives a query's states; subclass it and override what you need (the defaults do nothing
    but read `input` from stdin)."""

    async def input(self, *args: Any) -> str:
        """The value of an `[NAME:input]` hole; `args[0]` is the prompt ("NAME: ")."""
        return await asyncio.to_thread(input, *args)

    def add_compiler_output(self, code: str) -> None:
        """lmql's hook: the Python an LMQL program compiled to (LMQL programs only). Does nothing."""

    def add_decoder_state(self, *args: Any, **kwargs: Any) -> None:
        """lmql's hook: the decoder's search tree (LMQL programs only). Does nothing."""

    async def add_interpreter_head_state(self, variable: str | None, head: int, prompt: str, where: str | None,
                                         trace: Any, is_valid: bool, is_final: bool, mask: Any, num_tokens: int,
                                         program_variables: ProgramState) -> None:
        """One state of the query.

        Args:
            variable: the hole being filled (the last one when is_final).
            head: the decoding branch, always 0 (loomlm runs one branch per query).
            prompt: the interaction so far: the query text with the values so far, the
                current hole's partial text included.
            where: the query's where clause as given (None without one).
            trace: reserved (None), as LMQL's.
            is_valid: the values so far meet their constraints (finished holes are checked;
                a hole being generated is constrained while decoding, so it counts as valid).
            is_final: the query is done; prompt and program_variables are final.
            mask: reserved (None): the constraints are applied inside the engine.
            num_tokens: tokens generated for `variable` so far.
            program_variables: a `ProgramState` (LMQL's): `variable_values` {name: text} of the
                holes so far (the current one partial), `variable_program_values` with INT holes
                as int once finished; itself a dict of those program values.
        """


class PrintingOutputWriter(BaseOutputWriter):
    """Prints the interaction as it grows, then whether the values met their constraints."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file
        self._shown = ""

    async def add_interpreter_head_state(self, variable, head, prompt, where, trace, is_valid, is_final, mask,
                                         num_tokens, program_variables) -> None:
        out = self.file or sys.stdout
        if prompt.startswith(self._shown):
            out.write(prompt[len(self._shown):])
        else:  # not a continuation of what is shown (cannot happen in one run): start over
            out.write("\n" + prompt)
        self._shown = prompt
        if is_final:
            out.write(f"\n\nvalid={is_valid}\n")
            self._shown = ""
        out.flush()


class stream(BaseOutputWriter):  # LMQL's name: `lmql.stream("VAR")`
    """Prints only the text of hole `variable`, delta by delta, as it is generated."""

    def __init__(self, variable: str, file: TextIO | None = None) -> None:
        if not isinstance(variable, str) or not variable:
            raise ValueError(f"stream() needs the name of a hole, got {variable!r}.")
        self.variable = variable
        self.file = file
        self._num_printed = 0

    async def add_interpreter_head_state(self, variable, head, prompt, where, trace, is_valid, is_final, mask,
                                         num_tokens, program_variables) -> None:
        if is_final:
            self._num_printed = 0
            return
        if variable != self.variable:
            return
        text = program_variables.get(variable)
        if isinstance(text, str) and len(text) > self._num_printed:
            out = self.file or sys.stdout
            out.write(text[self._num_printed:])
            out.flush()
            self._num_printed = len(text)


class HeadlessOutputWriter(BaseOutputWriter):
    """No output; a query that asks for input fails (nobody is there to answer)."""

    async def input(self, *args: Any) -> str:
        raise RuntimeError(f"the query asks for input ({args[0].strip() if args else ''}), but its output writer "
                           "is headless; use loomlm.silent or another writer to allow input.")


class SilentOutputWriter(BaseOutputWriter):
    """No output; input is still read from stdin."""


printing = PrintingOutputWriter()
headless = HeadlessOutputWriter()
silent = SilentOutputWriter()
