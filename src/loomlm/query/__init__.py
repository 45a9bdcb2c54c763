"""Queries: prompt templates with `[VAR]` holes, chat tags and `where` constraints (LMQL-style),
run on a loomlm model with output writers that follow the generation as it happens.

    result = loomlm.run_sync("Q: What is the capital of France?\\nA:[ANSWER]",
                             where='STOPS_AT(ANSWER, "\\n") and len(TOKENS(ANSWER)) < 20',
                             output_writer=loomlm.stream("ANSWER"))
    result["ANSWER"]

Template syntax: `loomlm.query.template`; constraints: `loomlm.query.constraints`; writers:
`loomlm.query.writers`; running: `loomlm.query.runner`.
"""

from __future__ import annotations

from loomlm.query.program_state import ProgramState
from loomlm.query.runner import QueryResult, run, run_sync
from loomlm.query.writers import (
    BaseOutputWriter,
    HeadlessOutputWriter,
    PrintingOutputWriter,
    SilentOutputWriter,
    headless,
    printing,
    silent,
    stream,
)

__all__ = [
    "BaseOutputWriter",
    "HeadlessOutputWriter",
    "PrintingOutputWriter",
    "ProgramState",
    "QueryResult",
    "SilentOutputWriter",
    "headless",
    "printing",
    "run",
    "run_sync",
    "silent",
    "stream",
]
