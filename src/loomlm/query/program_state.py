"""The program state output writers receive (LMQL's `lmql.runtime.program_state.ProgramState`).

Source: eth-sri/lmql `src/lmql/runtime/program_state.py`: `variable_values` (each hole's text),
`variable_program_values` (converted: INT holes as int), `variable_diffs`, `variable_scores`,
`variable_monotonicity` ("var" while a hole grows, "fin" once it is done), `prompt`, and
`get` / `get_program_value` / `get_diff` / `final` / `copy` / `json`. It is also a dict of the
program values (hole name -> value, INT holes as int), which is what loomlm's writers read.
"""

from __future__ import annotations

from typing import Any


class ProgramState(dict):
    """The holes' values at one state of a query (see the module docstring)."""

    def __init__(self, prompt: str = "") -> None:
        super().__init__()
        self.prompt = prompt
        self.variable_values: dict[str, str] = {}
        self.variable_program_values: dict[str, Any] = {}
        self.variable_diffs: dict[str, str | None] = {}
        self.variable_scores: dict[str, Any] = {}
        self.variable_monotonicity: dict[str, str] = {}

    def set(self, name: str, value: str, program_value: Any = None, scores: Any = None, diff: str | None = None,
            montonicity: str = "var") -> None:  # lmql's spelling of the keyword
        """Record hole `name`: its text `value` and converted `program_value` (default: the text)."""
        self.variable_values[name] = value
        self.variable_program_values[name] = value if program_value is None else program_value
        self.variable_diffs[name] = diff
        self.variable_scores[name] = scores
        self.variable_monotonicity[name] = montonicity
        dict.__setitem__(self, name, self.variable_program_values[name])

    def get_program_value(self, name: str, default: Any = None) -> Any:
        return self.variable_program_values.get(name, default)

    def get_diff(self, name: str, default: Any = None) -> Any:
        return self.variable_diffs.get(name, default)

    def final(self, name: str) -> str:
        """"fin" once hole `name` is done, else "var"."""
        return self.variable_monotonicity.get(name, "var")

    def copy(self) -> ProgramState:
        state = ProgramState(self.prompt)
        for name, value in self.variable_values.items():
            state.set(name, value, self.variable_program_values[name], self.variable_scores[name],
                      self.variable_diffs[name], self.variable_monotonicity[name])
        return state

    async def json(self) -> dict[str, str]:
        """lmql's summary: name -> 'var("text")' or 'fin("text")'."""
        return {name: f'{self.final(name)}("{value}")' for name, value in self.variable_values.items()}
