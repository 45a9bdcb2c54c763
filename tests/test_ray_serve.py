"""Replicas on Ray Serve (a local `ray.init()`): 2 replicas of the default model behind loomlm's
prefix-aware router. The OpenAI, TGI and LLM Engine faces answer through it as the offline
engine does; requests sharing a long prefix stay on one replica (its prefix cache then serves
them); killing a replica's process fails only the requests it held, in the family's error format
or as an ended stream, and Ray Serve brings it back; /metrics labels every series with its replica.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time

import httpx
import pytest
from openai import OpenAI

from loomlm import LLM, SamplingParams
from loomlm.server.ray_serve import affinity_key, choose_replica, run_local, stop_local

MODEL = "smollm2-135m-instruct"
PREFIX = ("You are a careful assistant. Answer in one short sentence, and never add anything that "
          "was not asked. The following questions are about the geography of Europe, its rivers, "
          "its mountains and its capital cities; answer each of them on its own. ") * 4  # ~200 tokens


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    try:
        yield run_local(MODEL, 2, {"max_num_seqs": 16})
    finally:
        stop_local()


def replica_pid(index: int) -> int:
    from ray import serve

    return serve.get_deployment_handle(f"loomlm-replica-{index}", app_name="loomlm").pid.remote().result()


def session_for(index: int) -> str:
    """A session id the router sends to replica `index` (with both replicas idle)."""
    for n in range(1000):
        session = f"s{n}"
        if choose_replica(affinity_key({"x-session-id": session}, b""), [0, 0]) == index:
            return session
    raise AssertionError("no session id maps to that replica")


def test_every_face_answers_through_the_router(cluster):
    from text_generation import Client

    prompts = ["The capital of France is", "def add(a, b):"]
    expected = [o.outputs[0].text for o in LLM(MODEL).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)]
    client = OpenAI(base_url=cluster + "/v1", api_key="x")
    texts = [client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0.0).choices[0].text
             for p in prompts]
    assert texts == expected
    stream = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0.0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected[0]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat.choices[0].message.content
    tgi = Client(cluster, timeout=120).generate(prompts[0], max_new_tokens=12)
    assert tgi.generated_text == expected[0]
    with pytest.MonkeyPatch.context() as mp:  # the real `llmengine` client (scale-llm-engine)
        mp.setenv("LLM_ENGINE_DISABLE_VERSION_CHECK", "1")  # no call to PyPI on import
        llmengine = importlib.import_module("llmengine")
        llmengine.api_engine.set_base_path(cluster + "/")
        try:
            le = llmengine.Completion.create(model=MODEL, prompt=prompts[0], max_new_tokens=12, temperature=0)
        finally:
            llmengine.api_engine.set_base_path(None)
    assert le.output.text == expected[0]
    huge = httpx.post(cluster + "/generate", content=b'{"inputs": "' + b"x" * (5 << 20) + b'"}', timeout=120,
                      headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "error_type" in huge.json()  # bounded at the router, TGI's format
    bad = client.with_options(max_retries=0).completions
    with pytest.raises(Exception) as info:  # a 400 in OpenAI's format, from the replica, through the router
        bad.create(model=MODEL, prompt="x", max_tokens=-1)
    assert getattr(info.value, "status_code", None) == 400


def cache_counters(cluster: str) -> dict[tuple[str, str], float]:
    """(metric, replica) -> value of the replicas' prefix-cache counters, through the router's /metrics."""
    values = {}
    for line in httpx.get(cluster + "/metrics", timeout=60).text.splitlines():
        for name in ("loomlm_prefix_cache_hits_total", "loomlm_prefix_cache_queries_total"):
            if line.startswith(name + "{"):
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                values[name, replica] = float(line.rsplit(" ", 1)[1])
    return values


def test_a_shared_prefix_stays_on_one_replica(cluster):
    before = cache_counters(cluster)
    replicas = set()
    for i in range(10):
        response = httpx.post(cluster + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": PREFIX + f"Question {i}: what is the capital of country number {i}?",
            "max_tokens": 4, "temperature": 0.0})
        assert response.status_code == 200
        replicas.add(response.headers["x-loomlm-replica"])
    assert len(replicas) == 1
    replica = replicas.pop()
    after = cache_counters(cluster)
    # The first request fills the cache; the other nine find the ~200-token prefix in it.
    hits = after["loomlm_prefix_cache_hits_total", replica] - before["loomlm_prefix_cache_hits_total", replica]
    queries = after["loomlm_prefix_cache_queries_total", replica] - before["loomlm_prefix_cache_queries_total", replica]
    assert hits / queries > 0.8


def test_killing_a_replica_fails_only_its_requests_and_ray_restarts_it(cluster):
    victim, survivor = session_for(0), session_for(1)
    body = {"model": MODEL, "prompt": "Count from one to one hundred:", "max_tokens": 400, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    outcome = {}

    def stream_on_victim():
        try:
            with httpx.stream("POST", cluster + "/v1/completions", json=body, headers={"X-Session-Id": victim},
                              timeout=120) as response:
                outcome["status"] = response.status_code
                outcome["chunks"] = sum(1 for _ in response.iter_lines())
        except httpx.HTTPError as exc:
            outcome["error"] = type(exc).__name__

    thread = threading.Thread(target=stream_on_victim)
    thread.start()
    time.sleep(3)  # the stream is under way
    os.kill(replica_pid(0), signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()  # no hang: the stream ended or failed
    assert outcome.get("chunks", 0) < 400 or outcome.get("status", 0) >= 500 or "error" in outcome
    ok = httpx.post(cluster + "/v1/completions", headers={"X-Session-Id": survivor}, timeout=120,
                    json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
    assert ok.status_code == 200 and ok.headers["x-loomlm-replica"] == "1"
    # Requests for the dead replica fail in their family's format until Ray Serve has restarted it.
    deadline, statuses = time.monotonic() + 300, []
    while time.monotonic() < deadline:
        response = httpx.post(cluster + "/generate", headers={"X-Session-Id": victim}, timeout=120,
                              json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        assert response.status_code == 502 and "error_type" in response.json()  # TGI's error body
        time.sleep(2)
    assert statuses[-1] == 200
