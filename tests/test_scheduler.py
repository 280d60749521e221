"""The scheduler alone: admission order, limits, solo rows and cancellation, without models."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from eft_integrations.scheduler import Scheduler


@dataclass(eq=False)
class Job:
    name: str
    token_footprint: int = 10
    solo: bool = False
    speculative_k: int | None = None
    cancelled: bool = False
    prompt_key: str = ""
    prompt_length: int = 32
    prefilled: bool = False


def names(jobs) -> list[str]:
    return [j.name for j in jobs]


def test_first_come_first_served_up_to_the_batch_size():
    scheduler = Scheduler(max_batch_size=2)
    for name in "abc":
        scheduler.add(Job(name))
    out = scheduler.schedule([], [])
    assert names(out.admitted) == ["a", "b"]
    assert names(scheduler.waiting) == ["c"]
    # a full batch admits nobody; one row leaving lets the next in
    assert scheduler.schedule(out.admitted, []).admitted == []
    assert names(scheduler.schedule(out.admitted[:1], []).admitted) == ["c"]


def test_tokens_in_flight_bound_admission_and_nobody_overtakes_the_head():
    scheduler = Scheduler(max_batch_size=8, max_tokens_in_flight=100)
    running = [Job("r", token_footprint=60)]
    scheduler.add(Job("big", token_footprint=50))
    scheduler.add(Job("small", token_footprint=5))
    assert scheduler.schedule(running, []).admitted == []  # small waits behind big
    assert names(scheduler.schedule([], []).admitted) == ["big", "small"]


def test_an_empty_engine_takes_a_request_larger_than_the_limit():
    scheduler = Scheduler(max_tokens_in_flight=100)
    scheduler.add(Job("huge", token_footprint=1_000))
    assert names(scheduler.schedule([], []).admitted) == ["huge"]


def test_limits_count_plain_and_speculative_rows_together():
    scheduler = Scheduler(max_batch_size=2)
    scheduler.add(Job("next"))
    assert scheduler.schedule([Job("p")], [Job("s", speculative_k=2)]).admitted == []


def test_cancelled_requests_leave_the_queue_and_the_batch():
    scheduler = Scheduler()
    gone, kept = Job("gone", cancelled=True), Job("kept")
    scheduler.add(gone)
    scheduler.add(kept)
    running = [Job("r1"), Job("r2", cancelled=True)]
    out = scheduler.schedule(running, [])
    assert names(out.cancelled_waiting) == ["gone"]
    assert names(out.cancelled_running) == ["r2"]
    assert names(out.admitted) == ["kept"]


def test_a_cancelled_row_frees_its_place_in_the_same_step():
    scheduler = Scheduler(max_batch_size=1)
    scheduler.add(Job("next"))
    out = scheduler.schedule([Job("r", cancelled=True)], [])
    assert names(out.admitted) == ["next"]


def test_a_solo_request_joins_only_an_empty_batch_of_its_kind_and_nothing_joins_it():
    scheduler = Scheduler()
    scheduler.add(Job("solo", solo=True))
    scheduler.add(Job("after"))
    assert scheduler.schedule([Job("running")], []).admitted == []
    out = scheduler.schedule([], [])
    assert names(out.admitted) == ["solo"]  # "after" may not join it
    assert scheduler.schedule(out.admitted, []).admitted == []
    assert names(scheduler.schedule([], []).admitted) == ["after"]
    # the other kind's batch is a separate forward
    scheduler.add(Job("solo-spec", solo=True, speculative_k=2))
    assert names(scheduler.schedule([Job("plain")], []).admitted) == ["solo-spec"]


def test_an_equal_prompt_waits_for_the_one_prefilling_and_steps_aside_meanwhile():
    scheduler = Scheduler(max_batch_size=8)
    scheduler.share_prefills_from = 16
    first, second, third = (Job(f"a{i}", prompt_key="p") for i in (1, 2, 3))
    other = Job("b", prompt_key="q")
    for job in (first, second, third, other):
        scheduler.add(job)
    assert names(scheduler.schedule([], []).admitted) == ["a1", "b"]  # b passes a2, a3
    assert names(scheduler.waiting) == ["a2", "a3"]
    assert scheduler.schedule([first, other], []).admitted == []  # still prefilling
    first.prefilled = True
    assert names(scheduler.schedule([first, other], []).admitted) == ["a2", "a3"]


def test_short_prompts_and_a_scheduler_without_prefix_caching_never_wait():
    scheduler = Scheduler(max_batch_size=8)
    jobs = [Job("a1", prompt_key="p"), Job("a2", prompt_key="p")]
    for job in jobs:
        scheduler.add(job)
    assert names(scheduler.schedule([], []).admitted) == ["a1", "a2"]  # no prefix caching
    scheduler.share_prefills_from = 64
    for job in (Job("b1", prompt_key="s"), Job("b2", prompt_key="s")):
        scheduler.add(job)
    assert names(scheduler.schedule([], []).admitted) == ["b1", "b2"]  # under a block


def test_a_leader_that_leaves_unblocks_its_followers():
    scheduler = Scheduler(max_batch_size=8)
    scheduler.share_prefills_from = 16
    leader, follower = Job("a1", prompt_key="p"), Job("a2", prompt_key="p")
    scheduler.add(follower)
    assert scheduler.schedule([leader], []).admitted == []
    leader.cancelled = True
    out = scheduler.schedule([leader], [])
    assert names(out.cancelled_running) == ["a1"] and names(out.admitted) == ["a2"]


def test_limits_are_checked():
    with pytest.raises(ValueError, match=">= 1"):
        Scheduler(max_batch_size=0)


def test_the_scheduler_module_needs_no_torch():
    import ast
    from pathlib import Path

    import eft_integrations.scheduler as module

    imported = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "torch" not in imported and "threading" not in imported
