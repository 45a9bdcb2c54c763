"""Scheduler invariants on fake requests (no model): budgets, chunked prefill,
preemption by recompute, and no leaked blocks after any mix of finish/abort/preempt."""

from __future__ import annotations

import random

from loomlm.config import SchedulerConfig
from loomlm.engine.block_manager import BlockManager
from loomlm.engine.request import Request, RequestStatus
from loomlm.engine.scheduler import Scheduler
from loomlm.sampling_params import SamplingParams


def make_request(rid: str, prompt_len: int, max_tokens: int, stop_token: int | None = None) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            stop_token_ids=[stop_token] if stop_token is not None else None)
    return Request(rid, list(range(prompt_len)), params, max_tokens, detokenizer=None)


def check_step(sched: Scheduler, out) -> None:
    cfg = sched.config
    assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert out.total_num_scheduled_tokens == sum(it.num_new_tokens for it in out.scheduled)
    assert len(sched.running) <= cfg.max_num_seqs
    ids = [it.request.request_id for it in out.scheduled]
    assert len(ids) == len(set(ids))
    bm = sched.block_manager
    for it in out.scheduled:
        req = it.request
        assert it.num_new_tokens >= 1
        assert req.num_computed_tokens + it.num_new_tokens <= req.num_tokens
        # the table covers every token computed so far plus this step's
        assert len(bm.block_table(req.request_id)) * bm.block_size >= req.num_computed_tokens + it.num_new_tokens
        assert req.status == RequestStatus.RUNNING
    for rid in out.preempted_request_ids:
        assert rid not in ids and bm.block_table(rid) == []
    bm.check_invariants()


def run(sched: Scheduler, requests: list[Request], rng: random.Random, abort_prob: float = 0.0,
        stop_token: int | None = None) -> tuple[int, set[str]]:
    for r in requests:
        sched.add_request(r)
    preemptions, aborted = 0, set()
    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        check_step(sched, out)
        preemptions += len(out.preempted_request_ids)
        sampled = {}
        for it in out.scheduled:
            if it.samples_token:
                sampled[it.request.request_id] = rng.choice([stop_token, 7, 8, 9]) if stop_token is not None else 7
        sched.update_from_output(out, sampled)
        if abort_prob and rng.random() < abort_prob:
            live = sched.running + list(sched.waiting)
            if live:
                victim = rng.choice(live)
                sched.abort(victim)
                aborted.add(victim.request_id)
        sched.block_manager.check_invariants()
    assert not sched.has_unfinished_requests(), "requests were left unfinished"
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "leaked KV blocks"
    assert bm.block_tables == {}
    return preemptions, aborted


def test_every_request_finishes_with_all_its_tokens_under_preemption():
    rng = random.Random(1)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16), BlockManager(24, 4))
    requests = [make_request(f"r{i}", rng.randint(1, 40), rng.randint(1, 30)) for i in range(40)]
    preemptions, _ = run(sched, requests, rng)
    assert preemptions > 0, "the pool was meant to be too small for the batch"
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.num_output_tokens == r.max_tokens  # nothing generated was lost by recompute
        assert r.all_token_ids == r.prompt_token_ids + r.output_token_ids


def test_chunked_prefill_respects_budget_and_threshold():
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, long_prefill_token_threshold=10)
    sched = Scheduler(cfg, BlockManager(64, 4))
    long_req = make_request("long", 95, 2)
    sched.add_request(long_req)
    out = sched.schedule()
    assert [it.num_new_tokens for it in out.scheduled] == [10]
    assert not out.scheduled[0].samples_token
    sched.update_from_output(out, {})
    assert long_req.num_computed_tokens == 10 and long_req.num_output_tokens == 0
    # a second request joins the running batch at the next step (continuous batching)
    sched.add_request(make_request("short", 3, 2))
    out = sched.schedule()
    assert [(it.request.request_id, it.num_new_tokens) for it in out.scheduled] == [("long", 10), ("short", 3)]


def test_random_mix_of_finish_abort_preempt_leaks_nothing():
    for seed in range(5):
        rng = random.Random(seed)
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=8,
                                          long_prefill_token_threshold=rng.choice([0, 16])), BlockManager(20, 4))
        requests = [make_request(f"r{i}", rng.randint(1, 30), rng.randint(1, 25), stop_token=3) for i in range(30)]
        _, aborted = run(sched, requests, rng, abort_prob=0.05, stop_token=3)
        for r in requests:
            assert r.is_finished
            if r.request_id not in aborted:
                assert r.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED)
                if r.status == RequestStatus.FINISHED_STOPPED:
                    assert r.output_token_ids[-1] == 3 and 3 not in r.output_token_ids[:-1]
                else:
                    assert r.num_output_tokens == r.max_tokens
