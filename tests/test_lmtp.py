"""LMQL's model transport protocol (LMTP): the unmodified `lmql` package (0.7.3) runs LMQL programs
on a loomlm server over its websocket, and in process through `loomlm.lmql.run`; the protocol's
numbers are the engine's own (greedy tokens, processed logprobs under LMQL's masks, prompt scores)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import aiohttp
import lmql
import pytest
from lmql.models.lmtp.lmtp_client import LMTPWebSocketClient
from server_utils import RunningServer, serve_app

from loomlm import SamplingParams
from loomlm.query.lmql_program import export_tokenizer, looks_like_lmql_program
from loomlm.server.app import build_app

PROGRAM = '''
argmax
    "Q: What is the capital of France?\\nA: The capital is[ANSWER]" where STOPS_AT(ANSWER, ".") and len(TOKENS(ANSWER)) < 20
    "\\nQ: Name a fruit. A:[FRUIT]" where FRUIT in [" kiwi", " durian"]
    "\\nHow many legs does a dog have? A number:[N]" where INT(N) and len(TOKENS(N)) < 4
'''


@pytest.fixture(scope="module")
def endpoint(server: RunningServer) -> str:
    return server.base_url.removeprefix("http://")


@pytest.fixture(scope="module")
def model(server: RunningServer, endpoint: str):
    """lmql's own model object on the loomlm server, as a user writes it."""
    return lmql.model(server.engine.served_model_name, endpoint=endpoint,
                      tokenizer=str(export_tokenizer(server.engine.tokenizer)))


def lmql_ids(tokenizer, text: str) -> list[int]:
    """The ids lmql sends for a prompt: BOS, then the text's tokens."""
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


async def raw_client(endpoint: str, name: str, body):
    """Run `body(client)` with lmql's own LMTP websocket client connected to the server."""
    async with aiohttp.ClientSession() as session, session.ws_connect(f"http://{endpoint}") as ws:
        client = LMTPWebSocketClient(name, ws)
        client.connect()
        try:
            return await body(client)
        finally:
            client.handler.cancel()


def test_lmql_program_runs_on_the_server_with_the_engines_greedy_tokens(model, server, llm):
    result = asyncio.run(lmql.run(PROGRAM, model=model))
    answer, fruit, legs = result.variables["ANSWER"], result.variables["FRUIT"], result.variables["N"]
    # argmax under STOPS_AT is the engine's greedy continuation of the same tokens, up to the stop
    tokenizer = server.tokenizer
    ids = lmql_ids(tokenizer, "Q: What is the capital of France?\nA: The capital is")
    greedy = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=19),
                          use_tqdm=False)[0].outputs[0].text
    assert "." in greedy and answer == greedy[:greedy.index(".") + 1]
    assert fruit in (" kiwi", " durian")  # the choice is forced through LMTP's logit_bias masks
    assert isinstance(legs, int)


def test_sample_and_beam_decoders_keep_the_constraints(model):
    for decoder in ("sample(temperature=0.8)", "beam(n=2)"):
        result = asyncio.run(lmql.run(PROGRAM.replace("argmax", decoder), model=model))
        for r in result if isinstance(result, list) else [result]:
            # STOPS_AT: the value ends at its first "." (or at the token limit, when sampling never wrote one)
            assert "." not in r.variables["ANSWER"][:-1], decoder
            assert r.variables["FRUIT"] in (" kiwi", " durian"), decoder
            assert isinstance(r.variables["N"], int), decoder


def test_output_writers_stream_and_print(model):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = asyncio.run(lmql.run(PROGRAM, model=model, output_writer=lmql.stream("ANSWER")))
    assert out.getvalue().strip() == result.variables["ANSWER"].strip()
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        asyncio.run(lmql.run(PROGRAM, model=model, output_writer=lmql.printing))
    assert "The capital is" + result.variables["ANSWER"] in out.getvalue()


def test_concurrent_programs_batch_and_give_the_sequential_results(model):
    sequential = asyncio.run(lmql.run(PROGRAM, model=model)).variables

    async def four():
        return await asyncio.gather(*(lmql.run(PROGRAM, model=model) for _ in range(4)))

    assert [r.variables for r in asyncio.run(four())] == [sequential] * 4


def test_generate_reports_the_processed_distribution_under_a_mask(server, endpoint, llm):
    """GENERATE with LMQL's -100 mask on the greedy token: the engine's tokens and its processed
    logprobs (the masked token gone from the top list), exactly as the offline engine gives them."""
    tokenizer = server.tokenizer
    ids = lmql_ids(tokenizer, "The capital of France is")
    plain = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1),
                         use_tqdm=False)[0].outputs[0].token_ids[0]
    bias = {plain: -100.0}
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5, logit_bias=bias, logprobs_mode="processed_logprobs")
    expected = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]

    async def body(client):
        return [t async for t in client.generate(ids, max_tokens=4, temperature=0.0, top_logprobs=5,
                                                  logit_bias={str(plain): -100})]

    tokens = asyncio.run(raw_client(endpoint, server.engine.served_model_name, body))
    assert [t["token"] for t in tokens] == expected.token_ids
    assert [t["finish_reason"] for t in tokens] == [None, None, None, "length"]
    for entry, logprobs in zip(tokens, expected.logprobs):
        assert entry["logprob"] == pytest.approx(logprobs[entry["token"]].logprob, abs=1e-5)
        assert {int(t): lp for t, lp in entry["top_logprobs"].items()} == pytest.approx(
            {t: lp.logprob for t, lp in logprobs.items()}, abs=1e-5)
    assert str(plain) not in tokens[0]["top_logprobs"]


def test_score_equals_the_engines_prompt_logprobs(server, endpoint, llm, model):
    tokenizer = server.tokenizer
    prompt = lmql_ids(tokenizer, "Q: What is 2+2?\nA:")
    scored = tokenizer.encode(" 4, of course.", add_special_tokens=False)
    full = llm.generate({"prompt_token_ids": prompt + scored},
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    expected = [full.prompt_logprobs[len(prompt) + j][t].logprob for j, t in enumerate(scored)]

    async def body(client):
        return [t async for t in client.score(prompt, scored)]

    entries = asyncio.run(raw_client(endpoint, server.engine.served_model_name, body))
    assert [e["token"] for e in entries] == scored
    assert [e["logprob"] for e in entries] == pytest.approx(expected, abs=1e-5)
    assert [e["finish_reason"] for e in entries] == [None] * (len(scored) - 1) + ["stop"]
    # lmql's own score() on top: the likelier answer wins
    result = asyncio.run(model.score("Q: What is 2+2?\nA:", [" 4", " banana"]))
    assert result.argmax() == " 4"


def test_bad_commands_fail_only_their_stream(server, endpoint):
    name = server.engine.served_model_name

    async def body():
        async with aiohttp.ClientSession() as session, session.ws_connect(f"http://{endpoint}") as ws:
            async def ask(text: str) -> tuple[str, list]:
                await ws.send_str(text)
                kind, payload = (await ws.receive_str()).split(" ", 1)
                return kind, json.loads(payload)

            answers = [
                await ask("GENERATE " + json.dumps({"stream_id": 1, "model": name, "prompt": [1, 10 ** 9]})),
                await ask("GENERATE " + json.dumps({"stream_id": 2, "model": "gpt-4", "prompt": [1, 2]})),
                await ask("GENERATE " + json.dumps({"stream_id": 3, "model": name, "prompt": [1], "nucleus": 3})),
                await ask("FROB " + json.dumps({"stream_id": 4, "model": name})),
                await ask("SCORE " + json.dumps({"stream_id": 5, "model": name, "prompt": [1], "scored": []})),
            ]
            await ws.send_str("GENERATE {not json")  # dropped, the connection stays up
            await ws.send_bytes(b"\xff\xfe not text")  # likewise
            answers.append(await ask("MODEL_INFO " + json.dumps({"stream_id": 6, "model": name})))
            answers.append(await ask("GENERATE " + json.dumps(
                {"stream_id": 7, "model": name, "prompt": [1, 504], "max_tokens": 1})))
            return answers

    answers = asyncio.run(body())
    errors = [payload[0] for kind, payload in answers[:5]]
    assert all(kind == "TOKEN" for kind, _ in answers[:5])
    assert [e["stream_id"] for e in errors] == [1, 2, 3, 4, 5]
    assert "vocabulary" in errors[0]["error"] or "token" in errors[0]["error"]
    assert "not loaded" in errors[1]["error"] and "nucleus" in errors[2]["error"]
    assert "Unknown command" in errors[3]["error"] and "scored" in errors[4]["error"]
    assert answers[5] == ("MSG", [{"stream_id": 6, "model_info": answers[5][1][0]["model_info"]}])
    assert answers[5][1][0]["model_info"]["model"] == name
    kind, tokens = answers[6]
    assert kind == "TOKEN" and tokens[0]["stream_id"] == 7 and tokens[0]["finish_reason"] == "length"


def test_api_keys_guard_the_websocket(server):
    with serve_app(build_app(server.engine, api_keys=("secret",)), server.engine) as guarded:
        url = guarded.base_url

        async def connect(headers):
            async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=headers) as ws:
                await ws.send_str("MODEL_INFO " + json.dumps({"stream_id": 1, "model": None}))
                return (await ws.receive()).type

        assert asyncio.run(connect({"Authorization": "Bearer secret"})) == aiohttp.WSMsgType.TEXT
        with pytest.raises(aiohttp.WSServerHandshakeError):
            asyncio.run(connect({}))


def test_run_takes_lmql_programs_in_process_and_says_which_syntax():
    import loomlm.lmql as loomlm_lmql

    assert looks_like_lmql_program(PROGRAM) and looks_like_lmql_program("'Q: Hello\\n A:[WHAT]'")
    assert not looks_like_lmql_program("Q: [ANSWER]")
    result = loomlm_lmql.run_sync("'Q: Hello\\n A:[WHAT]' where len(TOKENS(WHAT)) < 4")
    assert result.prompt.startswith("Q: Hello\n A:")  # LMQL's string: no quotes, a real newline
    program = loomlm_lmql.run_sync(PROGRAM)
    assert program.variables["FRUIT"] in (" kiwi", " durian") and program.variables["ANSWER"].endswith(".")
    with pytest.raises(ValueError, match="LMQL program"):
        loomlm_lmql.run_sync(PROGRAM, where="len(TOKENS(ANSWER)) < 3")
    with pytest.raises(ValueError, match="loomlm's template syntax"):
        loomlm_lmql.run_sync("Q: [ANSWER]", where="STOPS_AT(ANSWER,")


def test_generate_asks_only_for_what_fits_the_window():
    """lmql asks for chunks (16, 128) unaware of the context window: GENERATE generates what fits
    (checked on the protocol core, with an engine that records what it was asked)."""
    from loomlm.outputs import CompletionOutput, Logprob, RequestOutput
    from loomlm.server.lmtp import generate_entries

    class RecordingEngine:
        max_model_len, tokenizer, asked = 10, [None] * 100, []

        async def generate(self, prompt, params, request_id, lora_request=None):
            self.asked.append(params.max_tokens)
            yield RequestOutput(request_id, None, prompt, None,
                                [CompletionOutput(0, "", [7], None, [{7: Logprob(-0.5)}], "length")], True)

    async def entries(max_tokens):
        return [e async for e in generate_entries(RecordingEngine(), 3, {"prompt": [1] * 6, "max_tokens": max_tokens},
                                                  "r")]

    assert asyncio.run(entries(128)) == [{"token": 7, "stream_id": 3, "logprob": -0.5, "finish_reason": "length",
                                          "top_logprobs": {"7": -0.5}}]
    asyncio.run(entries(2))
    assert RecordingEngine.asked == [4, 2]
