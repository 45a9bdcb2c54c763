"""Scheduler invariants on fake requests (no model): budgets, chunked prefill,
preemption by recompute, and no leaked blocks after any mix of finish/abort/preempt."""

from __future__ import annotations

import random

from loomlm.config import SchedulerConfig
from loomlm.engine.block_manager import BlockManager
from loomlm.engine.request import Request, RequestStatus
from loomlm.engine.scheduler import Scheduler
from loomlm.sampling_params import SamplingParams


def make_request(rid: str, prompt_len: int, max_tokens: int, stop_token: int | None = None,
                 first_token_id: int = 0) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            stop_token_ids=[stop_token] if stop_token is not None else None)
    prompt = list(range(first_token_id, first_token_id + prompt_len))
    return Request(rid, prompt, params, max_tokens)


def scheduled(out) -> list[tuple[str, int]]:
    return [(it.request.request_id, it.num_new_tokens) for it in out.scheduled]


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
        # the table (handed to the runner in the output) covers every token computed so far plus this step's
        assert out.block_tables[req.request_id] == bm.block_table(req.request_id)
        assert len(bm.block_table(req.request_id)) * bm.block_size >= req.num_computed_tokens + it.num_new_tokens
        assert req.status == RequestStatus.RUNNING
    assert set(out.block_tables) == set(ids)
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


def test_decodes_first_then_the_oldest_prefill_chunks():
    cfg = SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=8, long_prefill_token_threshold=4)
    sched = Scheduler(cfg, BlockManager(64, 4, enable_caching=False))
    sched.add_request(make_request("A", 20, 4))  # a long prompt, 4 tokens a step
    sched.add_request(make_request("B", 2, 4))
    out = sched.schedule()
    assert scheduled(out) == [("A", 4), ("B", 2)]
    sched.update_from_output(out, {"B": 7})  # B decodes from now on; A is still prefilling
    for rid in ("C", "D", "E"):
        sched.add_request(make_request(rid, 6, 4))
    out = sched.schedule()
    check_step(sched, out)
    # B's decode token, then the budget left (9) to prefill chunks, oldest first: A (running),
    # C (first waiting), then the single token left to D; E waits.
    assert scheduled(out) == [("B", 1), ("A", 4), ("C", 4), ("D", 1)]
    assert [r.request_id for r in sched.waiting] == ["E"]


def test_an_older_prefill_preempts_a_later_decode_scheduled_before_it():
    cfg = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4, long_prefill_token_threshold=4)
    sched = Scheduler(cfg, BlockManager(4, 4, enable_caching=False))
    a, b = make_request("A", 12, 2), make_request("B", 3, 8)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(2):  # A prefills 8 of its 12 prompt tokens (2 blocks), B decodes (2 blocks)
        out = sched.schedule()
        check_step(sched, out)
        sched.update_from_output(out, {it.request.request_id: 7 for it in out.scheduled if it.samples_token})
    # B's decode is scheduled first and takes the last free block; A's chunk needs one more, so
    # B, the latest arrival, is preempted: its decode is undone and its blocks go to A.
    out = sched.schedule()
    check_step(sched, out)
    assert scheduled(out) == [("A", 4)]
    assert out.total_num_scheduled_tokens == 4
    assert out.preempted_request_ids == ["B"]
    assert list(sched.waiting) == [b] and b.num_computed_tokens == 0 and b.output_token_ids == [7, 7]


def test_default_config_admits_a_burst_of_128_and_prefills_it_in_arrival_order():
    cfg = SchedulerConfig()  # the defaults, as `loomlm serve` runs them
    budget = cfg.max_num_batched_tokens
    sched = Scheduler(cfg, BlockManager(128 * 256 // 16, 16))  # room for 128 requests of 128 + 128 tokens
    requests = [make_request(f"r{i}", 128, 128, first_token_id=128 * i) for i in range(128)]
    for r in requests:
        sched.add_request(r)
    first_token_step: dict[str, int] = {}
    max_running, step = 0, 0
    while len(first_token_step) < len(requests):
        num_decodes = sum(r.num_tokens - r.num_computed_tokens == 1 for r in sched.running)
        num_prompt_left = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in requests)
        out = sched.schedule()
        check_step(sched, out)
        # Work-conserving: every running request decodes, and the rest of the budget prefills.
        assert out.total_num_scheduled_tokens == min(budget, num_decodes + num_prompt_left)
        max_running = max(max_running, len(sched.running))
        sampled = {it.request.request_id: 7 for it in out.scheduled if it.samples_token}
        sched.update_from_output(out, sampled)
        for rid in sampled:
            first_token_step.setdefault(rid, step)
        step += 1
    assert max_running == 128 and not sched.waiting
    assert sched.num_preemptions == 0
    steps = [first_token_step[r.request_id] for r in requests]
    assert steps == sorted(steps), "first tokens must come in arrival order"
    assert steps[0] == 0
    # Every request streams before the first one finishes (no second wave waiting for slots).
    assert not any(r.is_finished for r in requests)


def steps_to_first_token(policy: str, late_priority: int) -> tuple[int, int, list[Request]]:
    """A saturated engine (two sequence slots, a pool for about two requests) running six long
    low-priority requests; then one request arrives with `late_priority`. Returns the steps until
    its first token, the preemptions, and every request (finished)."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=2, scheduling_policy=policy),
                      BlockManager(12, 4))
    background = [make_request(f"bg{i}", 8, 12) for i in range(6)]
    for r in background:
        r.priority = 5 if policy == "priority" else 0
        sched.add_request(r)
    for _ in range(3):  # the batch is running
        out = sched.schedule()
        sched.update_from_output(out, {it.request.request_id: 7 for it in out.scheduled if it.samples_token})
    late = make_request("late", 8, 4, first_token_id=100)
    late.priority = late_priority
    sched.add_request(late)
    steps, preemptions = None, 0
    for step in range(1, 1000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        check_step(sched, out)
        preemptions += len(out.preempted_request_ids)
        sched.update_from_output(out, {it.request.request_id: 7 for it in out.scheduled if it.samples_token})
        if steps is None and late.num_output_tokens:
            steps = step
    sched.block_manager.check_invariants()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return steps, preemptions, background + [late]


def test_priority_request_gets_its_first_token_before_fcfs_would():
    """vLLM's --scheduling-policy priority: a late request of higher priority (lower value) is
    admitted at once, preempting the lowest-priority running one; under FCFS it waits for slots.
    Nothing is lost: every request ends with all its tokens."""
    fcfs_steps, fcfs_preemptions, fcfs_requests = steps_to_first_token("fcfs", 0)
    prio_steps, prio_preemptions, prio_requests = steps_to_first_token("priority", 0)
    assert prio_steps == 1 and fcfs_steps > 10, (prio_steps, fcfs_steps)
    assert prio_preemptions >= 1 and fcfs_preemptions == 0
    for r in fcfs_requests + prio_requests:
        assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.max_tokens
    # Equal priority: no jumping the queue (strictly higher priority preempts).
    equal_steps, equal_preemptions, _ = steps_to_first_token("priority", 5)
    assert equal_steps > 10 and equal_preemptions == 0


def test_priority_orders_admission_and_picks_the_lowest_priority_victim():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, scheduling_policy="priority"),
                      BlockManager(64, 4))
    requests = [make_request(f"r{p}", 4, 2) for p in (3, 1, 2)]
    for r, p in zip(requests, (3, 1, 2)):
        r.priority = p
        sched.add_request(r)
    out = sched.schedule()
    assert [it.request.request_id for it in out.scheduled] == ["r1", "r2", "r3"]
    assert sched._victim().request_id == "r3"
