"""API keys (`loomlm serve --api-key`): every API family answers a missing or wrong key with a 401
in its own error format and accepts a key as `Authorization: Bearer`, `x-api-key` or HTTP Basic
(key as the user name); `/health` and `/metrics` stay open. Driven by the real `openai`, `lorax-client` and
`scale-llm-engine` clients, loomlm's own clients, and httpx for each key form."""

from __future__ import annotations

import base64
import importlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import lorax
import openai
import pytest
from server_utils import RunningServer, serve_app
from starlette.datastructures import Headers

import loomlm
from loomlm.client import AuthenticationError
from loomlm.server.auth import (
    UNAUTHORIZED_MESSAGE,
    APIKeyChecker,
    load_api_keys,
    presented_keys,
)

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
KEYS = ("first-key", "second-key")
KEY = KEYS[1]

# One cheap request per API family (and the routes outside any family), by method and path.
FAMILY_REQUESTS = {
    "openai": ("GET", "/v1/models", None),
    "lorax": ("POST", "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}),
    "llmengine": ("GET", "/v1/llm/model-endpoints", None),
}
KEY_FORMS = {
    "bearer": lambda key: {"Authorization": f"Bearer {key}"},
    "x-api-key": lambda key: {"x-api-key": key},
    "basic": lambda key: {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()},
}


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RunningServer]:
    from loomlm.engine.async_engine import AsyncLLMEngine
    from loomlm.server.app import build_app

    engine = AsyncLLMEngine.from_engine_args(model=MODEL)
    try:
        with serve_app(build_app(engine, api_keys=KEYS), engine) as running:
            yield running
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def le(auth_server: RunningServer) -> Iterator:
    """The `llmengine` package pointed at the server; its key is set per test (`set_api_key`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_ENGINE_DISABLE_VERSION_CHECK", "1")
        llmengine = importlib.import_module("llmengine")
        llmengine.api_engine.set_base_path(auth_server.base_url + "/")
        try:
            yield llmengine
        finally:
            llmengine.api_engine.set_base_path(None)
            llmengine.api_engine.set_api_key(None)


def call(server: RunningServer, family: str, headers: dict[str, str]) -> httpx.Response:
    method, path, body = FAMILY_REQUESTS[family]
    return httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=120)


def assert_unauthorized(family: str, answer: httpx.Response) -> None:
    """A 401 in `family`'s own error body."""
    assert answer.status_code == 401, answer.text
    body = answer.json()
    if family == "openai":
        assert body == {"error": {"message": UNAUTHORIZED_MESSAGE, "type": "AuthenticationError", "param": None,
                                  "code": 401}}
    elif family == "lorax":
        assert body == {"error": UNAUTHORIZED_MESSAGE, "error_type": "authentication"}
    else:
        assert body == {"detail": UNAUTHORIZED_MESSAGE}


# ---------------------------------------------------------------------------
# Each family, each key form, over HTTP


def test_health_and_metrics_stay_open(auth_server):
    assert httpx.get(auth_server.base_url + "/health").status_code == 200
    assert httpx.get(auth_server.base_url + "/metrics").status_code == 200  # as vLLM's --api-key leaves it


@pytest.mark.parametrize("family", FAMILY_REQUESTS)
def test_each_family_rejects_a_missing_or_wrong_key_in_its_own_format(auth_server, family):
    assert_unauthorized(family, call(auth_server, family, {}))
    for headers in KEY_FORMS.values():
        assert_unauthorized(family, call(auth_server, family, headers("wrong-key")))
        assert_unauthorized(family, call(auth_server, family, headers(KEY[:-1])))  # a prefix is no key
    assert_unauthorized(family, call(auth_server, family, {"Authorization": "Basic %%% not base64"}))
    assert_unauthorized(family, call(auth_server, family, {"Authorization": KEY}))  # no scheme


@pytest.mark.parametrize("form", KEY_FORMS)
@pytest.mark.parametrize("family", FAMILY_REQUESTS)
def test_each_family_accepts_each_key_form(auth_server, family, form):
    for key in KEYS:
        answer = call(auth_server, family, KEY_FORMS[form](key))
        assert answer.status_code == 200, answer.text


def test_every_other_route_needs_a_key_too(auth_server):
    url = auth_server.base_url
    for method, path in (("POST", "/tokenize"), ("GET", "/info"), ("GET", "/no-such-path"),
                         ("POST", "/v1/llm/completions-stream?model_endpoint_name=x")):
        answer = httpx.request(method, url + path, json={"prompt": "x"})
        assert answer.status_code == 401, (path, answer.text)
    assert httpx.get(url + "/info", headers={"x-api-key": KEY}).status_code == 200
    # One valid credential is enough, whatever else the request presents.
    assert httpx.get(url + "/v1/models", headers={"x-api-key": KEY, "Authorization": "Bearer wrong"}).status_code == 200


# ---------------------------------------------------------------------------
# The real clients of each family


def test_openai_client(auth_server):
    client = openai.OpenAI(base_url=f"{auth_server.base_url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert completion.usage.completion_tokens == 2
    wrong = openai.OpenAI(base_url=f"{auth_server.base_url}/v1", api_key="wrong-key", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError, match="Invalid or missing API key"):
        wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)


def test_lorax_clients(auth_server):
    url = auth_server.base_url
    good = lorax.Client(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert good.generate(PROMPT, max_new_tokens=2).details.generated_tokens == 2
    with pytest.raises(lorax.errors.UnknownError, match="401"):  # lorax-client has no class for 401
        lorax.Client(url, timeout=120).generate(PROMPT, max_new_tokens=2)
    ours = loomlm.Client(url, headers={"x-api-key": KEY}, timeout=120)
    assert len(list(ours.generate_stream(PROMPT, max_new_tokens=2))) == 2
    with pytest.raises(AuthenticationError) as err:
        loomlm.Client(url, headers={"x-api-key": "wrong-key"}, timeout=120).generate(PROMPT, max_new_tokens=2)
    assert err.value.status_code == 401


def test_llmengine_clients(auth_server, le):
    le.api_engine.set_api_key(KEY)  # sent as x-api-key and as HTTP Basic (key, "")
    assert [m.name for m in le.Model.list().model_endpoints] == [MODEL]
    response = le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=2, temperature=0)
    assert response.output.num_completion_tokens == 2
    assert len(list(le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=2, stream=True))) == 2
    le.api_engine.set_api_key("wrong-key")
    with pytest.raises(le.errors.UnauthorizedError, match="Invalid or missing API key"):
        le.Completion.create(model=MODEL, prompt=PROMPT, max_new_tokens=2)
    with pytest.raises(le.errors.UnauthorizedError):
        le.Model.list()

    kwargs = {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 2, "temperature": 0,
              "base_url": auth_server.base_url}
    assert loomlm.Completion.create(**kwargs, api_key=KEY).output.text == response.output.text  # Bearer
    with pytest.raises(AuthenticationError):
        loomlm.Completion.create(**kwargs)
    with pytest.raises(AuthenticationError):
        list(loomlm.Completion.create(**kwargs, api_key="wrong-key", stream=True))


# ---------------------------------------------------------------------------
# Start-up, key files and key parsing


def test_an_open_server_says_so_at_start_up(auth_server, caplog):
    from loomlm.server.app import build_app

    with caplog.at_level(logging.INFO, logger="loomlm.server"):
        build_app(auth_server.engine)
    assert any(r.levelno == logging.WARNING and "No API key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loomlm.server"):
        build_app(auth_server.engine, api_keys=["k"])
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    with pytest.raises(ValueError, match="empty"):
        build_app(auth_server.engine, api_keys=[""])


def test_load_api_keys(tmp_path: Path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\n  alpha  \n\nbeta\nalpha\n", encoding="utf-8")
    assert load_api_keys(["gamma"], key_file) == ("gamma", "alpha", "beta")
    assert load_api_keys() == ()
    with pytest.raises(ValueError, match="empty"):
        load_api_keys([" "])
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(key_file=tmp_path / "absent.txt")


def test_presented_keys_and_the_checker():
    def keys(**headers: str) -> list[str]:
        return presented_keys(Headers(headers={k.replace("_", "-"): v for k, v in headers.items()}))

    basic = base64.b64encode(b"k1:ignored:colon").decode()
    assert keys(authorization=f"Basic {basic}", x_api_key="k2") == ["k2", "k1"]
    assert keys(authorization="bearer  k3 ") == ["k3"]
    assert keys(authorization="Basic !!!") == [] and keys(authorization="Token k4") == [] and keys() == []
    assert keys(authorization="Basic " + base64.b64encode(b":password-only").decode()) == []
    for encoding in ("utf-8", "latin-1"):  # HTTP Basic leaves the charset open; `requests` sends latin-1
        assert keys(authorization="Basic " + base64.b64encode("clé:".encode(encoding)).decode()) == ["clé"]
    checker = APIKeyChecker([*KEYS, "clé"])
    assert checker.is_any_valid(["nope", KEYS[0]]) and checker.is_valid(KEY) and checker.is_valid("clé")
    assert not checker.is_valid(KEY[:-1]) and not checker.is_valid(KEY + "x") and not checker.is_any_valid([])
    with pytest.raises(ValueError):
        APIKeyChecker([])


def test_serve_checks_the_key_file_before_loading_the_model(tmp_path: Path):
    script = Path(sys.executable).with_name("loomlm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "loomlm.cli"]
    result = subprocess.run([*command, "serve", "--api-key-file", str(tmp_path / "absent.txt")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "API key file" in result.stderr
    help_text = subprocess.run([*command, "serve", "--help"], capture_output=True, text=True, timeout=120,
                               check=False).stdout
    assert "--api-key" in help_text and "--api-key-file" in help_text
