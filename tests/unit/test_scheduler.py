"""The scheduler's invariant, one test per clause of `Scheduler.schedule`'s docstring.

Plain Python: nothing here imports torch. Time is the `now` argument; nothing sleeps.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from protocol.jobs import Job, Outcome
from workers.scheduler import Plan, Scheduler

TIMEOUT = 300.0


def job(
    rid: str,
    kind: str = "forward_backward",
    model: str | None = "m",
    seq: int | None = None,
    t: float = 0.0,
) -> Job:
    return Job(request_id=rid, kind=kind, payload=b"", model_id=model, seq_id=seq, enqueued_at=t)


def make(budget: int = 1000, *models: str) -> Scheduler:
    s = Scheduler(gap_timeout_s=TIMEOUT, max_tokens_per_tick=budget)
    for model in models or ("m",):
        s.open_model(model)
    return s


def tick(s: Scheduler, now: float = 0.0, failed: frozenset[str] = frozenset()) -> Plan:
    """One tick with a fake executor that answers every job (failing those in `failed`)."""
    plan = s.schedule(now)
    outcomes = {
        j.request_id: Outcome.fail("boom") if j.request_id in failed else Outcome(json={})
        for j in plan.barriers + plan.train + plan.samples
    }
    s.complete(plan, outcomes)
    return plan


def ids(jobs: list[Job]) -> list[str]:
    return [j.request_id for j in jobs]


def test_scheduler_imports_no_torch():
    code = "import sys, workers.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_order_with_out_of_order_arrival():
    s = make()
    s.add(job("b", seq=2))
    assert tick(s).empty()  # seq 1 missing: seq 2 waits
    s.add(job("c", seq=3))
    s.add(job("a", seq=1))
    assert ids(tick(s).train) == ["a", "b", "c"]
    assert s.pending == 0


def test_gap_waits_then_expires_after_timeout():
    s = make()
    s.add(job("two", seq=2, t=0.0))
    s.add(job("three", seq=3, t=0.0))
    assert tick(s, now=TIMEOUT - 1).empty()
    plan = tick(s, now=TIMEOUT + 1)
    [(expired, message)] = plan.expired
    assert expired.request_id == "two"
    assert "'m'" in message and "seq_id 1" in message and f"gap_timeout_s={TIMEOUT}" in message
    assert ids(plan.train) == ["three"]  # the gap is given up: later jobs run
    s.add(job("one", seq=1, t=TIMEOUT + 2))  # the lost request finally arrives
    [(late, message)] = tick(s, now=TIMEOUT + 2).expired
    assert late.request_id == "one" and "gave up" in message


def test_barrier_splits_runs():
    s = make()
    for rid, kind, seq in [
        ("1", "forward_backward", 1),
        ("2", "forward_backward", 2),
        ("3", "optim_step", 3),
        ("4", "forward_backward", 4),
    ]:
        s.add(job(rid, kind, seq=seq))
    first, second, third = tick(s), tick(s), tick(s)
    assert ids(first.train) == ["1", "2"] and not first.barriers
    assert ids(second.barriers) == ["3"] and not second.train
    assert ids(third.train) == ["4"] and not third.barriers


def test_several_models_runs_share_one_train_list():
    s = make(1000, "a", "b", "c")
    s.add(job("a1", model="a", seq=1))
    s.add(job("a2", kind="forward", model="a", seq=2))
    s.add(job("b1", model="b", seq=1))
    s.add(job("c1", kind="save_weights", model="c", seq=1))
    plan = tick(s)
    assert sorted(ids(plan.train)) == ["a1", "a2", "b1"]
    assert ids(plan.barriers) == ["c1"]


def test_round_robin_budget_keeps_small_model_from_starving():
    s = make(100, "big", "small")
    for i in range(1, 51):
        s.add(job(f"big{i}", model="big", seq=i, t=0.0), num_tokens=40)
    s.add(job("small1", model="small", seq=1, t=1.0), num_tokens=40)
    plan = tick(s)
    assert ids(plan.train) == ["big1", "small1"]  # big2 would pass the budget of 100
    assert ids(tick(s).train) == ["big2", "big3"]


def test_oversized_single_job_runs_alone_and_never_starves():
    s = make(100, "huge", "small")
    s.add(job("s1", model="small", seq=1, t=0.0), num_tokens=10)
    s.add(job("h1", model="huge", seq=1, t=1.0), num_tokens=500)
    assert ids(tick(s).train) == ["s1"]  # h1 does not fit beside s1
    s.add(job("s2", model="small", seq=2, t=2.0), num_tokens=10)  # small keeps coming
    assert ids(tick(s).train) == ["h1"]  # now the oldest head: it runs, alone
    assert ids(tick(s).train) == ["s2"]


def test_samples_batch_across_models_and_sessions():
    s = make()
    for i in range(3):
        s.add(Job(f"s{i}", "sample", b"", sampler_id=f"session{i}", enqueued_at=i))
    s.add(job("1", seq=1))
    plan = tick(s)
    assert ids(plan.samples) == ["s0", "s1", "s2"] and ids(plan.train) == ["1"]


def test_samples_capped_by_budget_oldest_first():
    s = make(100)
    for i in range(3):
        s.add(Job(f"s{i}", "sample", b"", enqueued_at=i), num_tokens=40)
    assert ids(tick(s).samples) == ["s0", "s1"]
    assert ids(tick(s).samples) == ["s2"]


def test_failed_job_still_advances_order():
    s = make()
    s.add(job("1", "optim_step", seq=1))
    s.add(job("2", seq=2))
    assert ids(tick(s, failed=frozenset({"1"})).barriers) == ["1"]
    assert ids(tick(s).train) == ["2"]


def test_create_model_opens_the_model():
    s = Scheduler(gap_timeout_s=TIMEOUT, max_tokens_per_tick=1000)
    s.add(job("fb", model="new", seq=1))
    s.add(job("create", "create_model", model="new"))
    plan = tick(s)
    assert ids(plan.barriers) == ["create"] and not plan.train
    assert s.knows("new")
    assert ids(tick(s).train) == ["fb"]


def test_failed_create_model_does_not_open_the_model():
    s = Scheduler(gap_timeout_s=TIMEOUT, max_tokens_per_tick=1000)
    s.add(job("create", "create_model", model="new"))
    tick(s, failed=frozenset({"create"}))
    assert not s.knows("new")


def test_load_weights_with_seq_id_is_an_ordered_barrier():
    s = make()
    s.add(job("load", "load_weights", seq=2))
    s.add(job("fb", seq=1))
    assert ids(tick(s).train) == ["fb"]
    assert ids(tick(s).barriers) == ["load"]


def test_skip_jobs_advance_order():
    s = make()
    s.add(job("1", seq=1))
    s.add(job("2", "skip", seq=2))
    s.add(job("3", seq=3))
    s.add(job("4", "skip", seq=4))
    s.add(job("5", "optim_step", seq=5))
    plan = tick(s)
    assert ids(plan.train) == ["1", "3"] and ids(plan.skips) == ["2", "4"]
    assert ids(tick(s).barriers) == ["5"]
    assert s.pending == 0


def test_unknown_models_jobs_wait():
    s = Scheduler(gap_timeout_s=TIMEOUT, max_tokens_per_tick=1000)
    s.add(job("fb", model="stranger", seq=2))
    assert tick(s, now=10 * TIMEOUT).empty()  # not even the gap timeout applies
    assert s.pending == 1
    s.open_model("stranger")
    s.add(job("first", model="stranger", seq=1, t=10 * TIMEOUT))
    assert ids(tick(s, now=10 * TIMEOUT).train) == ["first", "fb"]


def test_duplicate_request_id_is_kept_once():
    s = make()
    s.add(job("1", seq=1))
    s.add(job("1", seq=1))
    assert s.pending == 1
    assert ids(tick(s).train) == ["1"]


def test_late_redelivery_is_treated_as_done():
    s = make()
    s.add(job("1", seq=1))
    tick(s)
    s.add(job("1-again", seq=1))
    plan = tick(s)
    assert ids(plan.skips) == ["1-again"] and not plan.train and not plan.expired
    assert s.pending == 0


@pytest.mark.parametrize(
    ("bad", "tokens", "fragment"),
    [
        (job("x", model=None, seq=1), 0, "no model_id"),
        (job("x", seq=None), 0, "no seq_id"),
        (job("x", seq=1), -1, "num_tokens=-1"),
    ],
)
def test_add_rejects_bad_jobs(bad: Job, tokens: int, fragment: str):
    with pytest.raises(ValueError, match=fragment):
        make().add(bad, num_tokens=tokens)


def test_idle_models_are_released_once_until_used_again():
    s = Scheduler(gap_timeout_s=60, max_tokens_per_tick=1000, release_idle_s=10)
    for m in ("a", "b"):
        s.open_model(m)
    assert s.until_release(0.0) is None  # nothing has run yet: nothing is held
    s.add(job("a1", "forward_backward", "a", 1))
    s.add(job("b1", "forward_backward", "b", 1))
    plan = s.schedule(0.0)
    s.complete(plan, {}, now=1.0)
    assert s.until_release(5.0) == 6.0 and s.schedule(10.0).releases == []
    s.add(job("b2", "optim_step", "b", 2))  # b has a call waiting: never released meanwhile
    plan = s.schedule(11.0)
    assert plan.releases == ["a"] and [j.model_id for j in plan.barriers] == ["b"]
    s.complete(plan, {}, now=11.0)
    assert s.schedule(30.0).releases == ["b"]  # a is listed no more
    s.complete(s.schedule(30.0), {}, now=30.0)
    assert s.until_release(30.0) is None and s.schedule(100.0).empty()
    s.add(job("a2", "forward", "a", 2))  # used again: held, and released again later
    s.complete(s.schedule(100.0), {}, now=100.0)
    assert s.schedule(110.0).releases == ["a"]


def test_no_release_when_the_setting_is_zero():
    s = Scheduler(gap_timeout_s=60, max_tokens_per_tick=1000)
    s.open_model("a")
    s.add(job("a1", "forward", "a", 1))
    s.complete(s.schedule(0.0), {}, now=0.0)
    assert s.until_release(1e9) is None and s.schedule(1e9).releases == []


def test_a_retired_model_is_released_once_its_pending_jobs_are_done():
    """A finished session's model leaves memory as soon as it has nothing pending, even
    with idle releases off; an unknown model is not listed."""
    s = Scheduler(gap_timeout_s=60, max_tokens_per_tick=1000)
    for m in ("a", "b"):
        s.open_model(m)
    s.add(job("a1", "forward_backward", "a", 1))
    s.retire("a")
    s.retire("b")
    s.retire("never-opened")
    assert s.until_release(0.0) == 0.0
    plan = s.schedule(0.0)
    assert plan.releases == ["b"] and [j.request_id for j in plan.train] == ["a1"]
    s.complete(plan, {}, now=0.0)
    plan = s.schedule(0.0)
    assert plan.releases == ["a"] and not plan.jobs()
    s.complete(plan, {}, now=0.0)
    assert s.until_release(0.0) is None and s.schedule(0.0).empty()
