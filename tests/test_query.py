"""Queries (`loomlm.run`): templates with holes and chat tags, `where` constraints compiled to
the engine's stop strings / max tokens / structured outputs, output writers, bad input."""

from __future__ import annotations

from collections.abc import Iterator

import asyncio
import io
import itertools
import re

import pytest

import loomlm
from loomlm import SamplingParams
from loomlm.models.zoo import DEFAULT_MODEL
from loomlm.query.constraints import HoleConstraints, parse_where
from loomlm.query.template import Hole, Reference, RoleTag, Text, parse_template

QUESTION = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def model() -> Iterator[loomlm.Model]:
    with loomlm.model(DEFAULT_MODEL) as handle:
        yield handle


def greedy(llm, prompt, **kwargs) -> str:
    return llm.generate(prompt, SamplingParams(temperature=0, **kwargs), use_tqdm=False)[0].outputs[0].text


class Recorder(loomlm.BaseOutputWriter):
    """Keeps every state it is given, and answers input() with `answers`."""

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.states: list[dict] = []
        self.answers = answers or {}

    async def input(self, *args):
        return self.answers[args[0].rstrip(": ")]

    async def add_interpreter_head_state(self, variable, head, prompt, where, trace, is_valid, is_final, mask,
                                         num_tokens, program_variables):
        self.states.append({"variable": variable, "prompt": prompt, "where": where, "is_valid": is_valid,
                                "is_final": is_final, "num_tokens": num_tokens, "variables": dict(program_variables)})


# ---------------------------------------------------------------------------------------
# Parsing (no model)


def test_template_segments():
    template = parse_template("{:system} Be brief.{:user} Hi [[there]] {{x}} {NAME}\n{:assistant}[A] and [B:int]",
                              inputs=["NAME"])
    assert template.segments == [
        RoleTag("system"), Text(" Be brief."), RoleTag("user"), Text(" Hi [there] {x} "), Reference("NAME"),
        Text("\n"), RoleTag("assistant"), Hole("A"), Text(" and "), Hole("B", "int")]
    assert template.is_chat and [h.name for h in template.holes] == ["A", "B"]
    assert not parse_template("Q: Hello\n A:[WHAT] {WHAT}").is_chat


@pytest.mark.parametrize(("query", "message"), [
    ("Q: [X] and [X]", "used by two holes"),
    ("Q: [X] {Y}", r"\{Y\} names no earlier hole"),
    ("Q: {X} [X]", r"\{X\} names no earlier hole"),
    ("Q: [X:float]", "unknown kind 'float'"),
    ("{:robot} hi [X]", "unknown chat tag"),
    ("Hello {:user} hi [X]", "everything belongs to a message"),
    ("Q: no holes here", "no \\[VAR\\] hole"),
    ("", "non-empty string"),
])
def test_bad_templates(query, message):
    with pytest.raises(ValueError, match=message):
        parse_template(query)


def test_where_compiles_each_constraint():
    where = ('STOPS_AT(A, "\\n") and STOPS_AT(A, ".") and len(TOKENS(A)) < 20 and len(TOKENS(A)) <= 12 '
             'and B in ["yes", "no"] and INT(C) and REGEX(D, r"[a-z]+") and STOPS_BEFORE(E, "!")')
    c = parse_where(where, ["A", "B", "C", "D", "E", "F"])
    assert c["A"] == HoleConstraints(stop=["\n", "."], include_stop_str=True, max_tokens=12)
    assert c["B"].structured_outputs.choice == ["yes", "no"]
    assert c["C"].is_int and c["C"].structured_outputs.regex.startswith(" ?-?[0-9]+")
    assert c["D"].structured_outputs.regex == "[a-z]+"
    assert c["E"] == HoleConstraints(stop=["!"], include_stop_str=False)
    assert c["F"] == HoleConstraints()
    assert c["A"].is_satisfied_by(" Paris.", 3) and not c["A"].is_satisfied_by(" Par.is.", 3)
    assert not c["A"].is_satisfied_by(" Paris", 13)
    assert c["E"].is_satisfied_by("hi", 1) and not c["E"].is_satisfied_by("hi!", 2)
    assert c["C"].value_text(" 42\n") == " 42" and c["C"].is_satisfied_by(" 42", 2)


@pytest.mark.parametrize(("where", "message"), [
    ("STOPS_AT(A, ", "malformed where clause"),
    ('STOPS_AT(A, "x") or INT(A)', "unsupported constraint"),
    ("len(A) < 3", "unsupported constraint"),
    ('A == "x"', "unsupported constraint"),
    ("__import__('os').system('echo hacked')", "unsupported constraint"),
    ("STOPS_AT(A, B)", "expected a str literal"),
    ('STOPS_AT(Z, "x")', "'Z' .* is not a hole"),
    ('INT(A) and A in ["1", "2"]', "conflicts with INT"),
    ('STOPS_AT(A, "x") and STOPS_BEFORE(A, "y")', "cannot mix STOPS_AT and STOPS_BEFORE"),
    ("len(TOKENS(A)) < 1", "leaves no token"),
    ('REGEX(A, "[")', "bad regular expression"),
    ("A in []", "non-empty list"),
])
def test_malformed_where_clauses(where, message):
    with pytest.raises(ValueError, match=message):
        parse_where(where, ["A"])


# ---------------------------------------------------------------------------------------
# Running queries: every value meets its constraints, and equals the engine's own decoding


def test_plain_query_with_stops_at_and_a_token_limit(model, llm):
    result = loomlm.run_sync(QUESTION + "[ANSWER]", model=model, where='STOPS_AT(ANSWER, ".") and len(TOKENS(ANSWER)) < 20')
    answer = result["ANSWER"]
    assert answer == greedy(llm, QUESTION, stop=["."], include_stop_str_in_output=True, max_tokens=19)
    assert answer.endswith(".") and answer.count(".") == 1
    assert result.prompt == QUESTION + answer and result.is_valid
    assert result.variables == {"ANSWER": answer}


def test_stops_before_and_token_limit(model, llm):
    result = loomlm.run_sync("Write a long sentence about the sea:[S]", model=model,
                             where='STOPS_BEFORE(S, ",") and len(TOKENS(S)) <= 6')
    tokenizer = model.engine.tokenizer
    assert "," not in result["S"] and len(tokenizer.encode(result["S"], add_special_tokens=False)) <= 6
    assert result["S"] == greedy(llm, "Write a long sentence about the sea:", stop=[","], max_tokens=6)


def test_choice_int_and_regex_constraints(model):
    choices = [" yes", " no", " maybe"]
    result = loomlm.run_sync(
        "Is Paris in France? Answer:[YN]\nHow many legs does a spider have? Answer:[LEGS]\n"
        "A phone number:[PHONE]\nAnd a year:[YEAR:int]", model=model, max_tokens=12,
        where=f'YN in {choices!r} and INT(LEGS) and REGEX(PHONE, r" [0-9]{{3}}-[0-9]{{4}}")')
    values = result.variables
    assert values["YN"] in choices
    assert isinstance(values["LEGS"], int) and isinstance(values["YEAR"], int)
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", values["PHONE"])
    assert result.is_valid
    # An INT's value ends at its last digit: the character that ended it is not kept.
    assert f"have? Answer: {values['LEGS']}\nA phone" in result.prompt or \
        f"have? Answer:{values['LEGS']}\nA phone" in result.prompt


def test_chat_query_equals_llm_chat(model, llm):
    query = "{:system} Answer briefly.\n{:user} What is the capital of France?\n{:assistant}[RESPONSE]"
    result = loomlm.run_sync(query, model=model, max_tokens=12)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    assert result["RESPONSE"] == expected
    assert result.prompt == query.replace("[RESPONSE]", expected)


def test_multi_turn_chat_with_references_and_inputs(model):
    query = ("{:user} My name is {NAME}. Say hello to me.\n{:assistant}[GREETING]\n"
             "{:user} What is my name?\n{:assistant} Your name is[ANSWER]")
    result = loomlm.run_sync(query, model=model, inputs={"NAME": "Ada"}, max_tokens=10,
                             where='STOPS_AT(ANSWER, ".")')
    assert "My name is Ada." in result.prompt
    assert result.prompt.endswith(" Your name is" + result["ANSWER"])
    assert set(result.variables) == {"GREETING", "ANSWER"}


def test_concurrent_queries_batch_and_equal_sequential(model):
    queries = [f"Q: What is {a} + {b}?\nA:[X]" for a, b in ((1, 2), (3, 4), (10, 5))]
    sequential = [loomlm.run_sync(q, model=model, max_tokens=6).variables for q in queries]

    async def main():
        return await asyncio.gather(*(loomlm.run(q, model=model, max_tokens=6) for q in queries))

    assert [r.variables for r in asyncio.run(main())] == sequential


# ---------------------------------------------------------------------------------------
# Output writers


def test_stream_prints_exactly_the_variable_as_it_is_generated(model, capsys):
    result = loomlm.run_sync("Tell me about Paris:[INTRO]\nQ: And London?\nA:[ANSWER]", model=model,
                             output_writer=loomlm.stream("ANSWER"), max_tokens=10)
    assert capsys.readouterr().out == result["ANSWER"] and len(result["ANSWER"]) > 5
    # In order and piece by piece: a file records each write.
    out = io.StringIO()
    writes: list[str] = []
    out.write = lambda text: writes.append(text) or len(text)  # type: ignore[method-assign]
    result = loomlm.run_sync("Tell me about Paris:[INTRO]\nQ: And London?\nA:[ANSWER]", model=model,
                             output_writer=loomlm.stream("ANSWER", file=out), max_tokens=10)
    assert "".join(writes) == result["ANSWER"] and len(writes) >= 5


def test_custom_writer_sees_tokens_as_they_arrive(model):
    recorder = Recorder()
    result = asyncio.run(loomlm.run(QUESTION + "[A]\nQ: And of Italy?\nA:[B]", model=model,
                                    output_writer=recorder, max_tokens=8, where="len(TOKENS(B)) < 6"))
    states = recorder.states
    a_states = [s for s in states if s["variable"] == "A"]
    texts = [s["variables"]["A"] for s in a_states]
    assert len(a_states) >= 8 and texts[-1] == result["A"]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert [s["num_tokens"] for s in a_states[:8]] == list(range(1, 9))
    assert all(s["prompt"] == QUESTION + s["variables"]["A"] for s in a_states)
    assert all(s["where"] == "len(TOKENS(B)) < 6" and s["is_valid"] for s in states)
    assert [s["is_final"] for s in states].count(True) == 1 and states[-1]["is_final"]
    assert states[-1]["prompt"] == result.prompt and states[-1]["variables"] == result.variables
    assert max(s["num_tokens"] for s in states if s["variable"] == "B") <= 5


def test_writers_get_lmqls_program_state(model):
    """A writer written against LMQL (`program_variables.variable_values`, `final`, as lmql's
    `StreamingOutputWriter` reads it) gets a ProgramState: texts, INT program values, var / fin."""
    seen = []

    class LMQLStyleWriter(loomlm.BaseOutputWriter):
        async def add_interpreter_head_state(self, variable, head, prompt, where, trace, is_valid, is_final, mask,
                                             num_tokens, program_variables):
            seen.append((variable, dict(program_variables.variable_values),
                         dict(program_variables.variable_program_values),
                         {name: program_variables.final(name) for name in program_variables.variable_values},
                         program_variables.prompt, prompt))

    result = loomlm.run_sync("Q: How many legs does a spider have? A:[LEGS]\nQ: Name one.\nA:[NAME]", model=model,
                             output_writer=LMQLStyleWriter(), max_tokens=6, where="INT(LEGS)")
    legs = result["LEGS"]
    assert isinstance(legs, int)
    variable, texts, values, finality, state_prompt, prompt = seen[-1]
    assert set(texts) == {"LEGS", "NAME"} and isinstance(texts["LEGS"], str) and int(texts["LEGS"]) == legs
    assert texts["NAME"] == result["NAME"]
    assert values == {"LEGS": legs, "NAME": result["NAME"]} and finality == {"LEGS": "fin", "NAME": "fin"}
    assert state_prompt == prompt == result.prompt
    growing = [entry for entry in seen if entry[0] == "NAME" and entry[3].get("NAME") == "var"]
    assert growing and all(entry[3]["LEGS"] == "fin" for entry in growing)
    assert all(entry[1]["NAME"] == entry[2]["NAME"] for entry in growing)


def test_printing_writer_prints_the_interaction_then_validity(model, capsys):
    result = loomlm.run_sync(QUESTION + "[A]", model=model, output_writer=loomlm.printing, max_tokens=6)
    assert capsys.readouterr().out == result.prompt + "\n\nvalid=True\n"


def test_input_holes(model, monkeypatch):
    query = "Name:[NAME:input]\nHello {NAME}, you are[X]"
    result = loomlm.run_sync(query, model=model, output_writer=Recorder({"NAME": " Ada"}), max_tokens=3)
    assert result.prompt.startswith("Name: Ada\nHello  Ada, you are") and result["NAME"] == " Ada"
    monkeypatch.setattr("builtins.input", lambda prompt="": " Bob")
    assert loomlm.run_sync(query, model=model, output_writer=loomlm.silent, max_tokens=3)["NAME"] == " Bob"
    with pytest.raises(RuntimeError, match="headless"):
        loomlm.run_sync(query, model=model, output_writer=loomlm.headless, max_tokens=3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"query": "Q: [X] and [X]"}, "used by two holes"),
    ({"query": "Q:[X]", "where": "STOPS_AT(X"}, "malformed where clause"),
    ({"query": "Q:[X]", "where": 'STOPS_AT(Y, "x")'}, "'Y' .* is not a hole"),
    ({"query": "Q:[X]", "decoder": "beam"}, "fills each hole once"),
    ({"query": "Q:[X]", "decoder": "sample", "n": 2}, "fills each hole once"),
    ({"query": "Q:[X]", "decoder": "greedy"}, "unknown decoder"),
    ({"query": "[X] is first"}, "no text before it"),
    ({"query": "Q:[X:input]", "where": "INT(X)"}, "takes no constraints"),
    ({"query": "Q:[X:int]", "where": "INT(X)"}, "conflicts with INT"),
])
def test_bad_queries_are_value_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loomlm.run_sync(model=model, **kwargs)


# ---------------------------------------------------------------------------------------
# Remote: the same query on a server gives the same values


def test_remote_query_equals_local(model, server):
    remote = loomlm.model(server.base_url)
    query = ("{:user} What is the capital of France?\n{:assistant}[ANSWER]\n"
             "{:user} How many legs does a spider have?\n{:assistant}[LEGS]\nWord:[W]")
    kwargs = {"max_tokens": 10, "where": 'STOPS_AT(ANSWER, ".") and INT(LEGS) and W in [" one", " two"]'}
    local = loomlm.run_sync(query, model=model, **kwargs)
    out = io.StringIO()
    remote_result = loomlm.run_sync(query, model=remote, output_writer=loomlm.stream("ANSWER", file=out), **kwargs)
    assert remote_result.variables == local.variables and remote_result.prompt == local.prompt
    assert out.getvalue() == local["ANSWER"]
