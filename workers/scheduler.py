"""The tick's first and last verbs: which queued jobs run now, and what finished.

A tick is `plan = scheduler.schedule(now)`, `results = executor.run(plan)`,
`scheduler.complete(plan, results)`. The scheduler is plain Python (it imports no torch, so
it is tested on its own); it owns the queue of pending jobs and each model's seq_id cursor.
`schedule()` only reads that state; `complete()` writes it. Call them alternately: a second
`schedule()` before `complete()` plans the same jobs again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.jobs import BARRIER_KINDS, OPENING_KINDS, RESTORE, SAMPLE_KINDS, Job, Outcome


@dataclass
class Plan:
    """What the executor runs in one tick, in this order: barriers, train, samples."""

    barriers: list[Job] = field(default_factory=list)  # at most one per model, each alone
    train: list[Job] = field(default_factory=list)  # forward/forward_backward: one pass
    samples: list[Job] = field(default_factory=list)  # one batched sampling call
    expired: list[tuple[Job, str]] = field(default_factory=list)  # failed here, with why
    skips: list[Job] = field(default_factory=list)  # only advance order; nothing runs
    releases: list[str] = field(default_factory=list)  # idle models: state to disk, memory freed
    snapshots: list[str] = field(default_factory=list)  # models snapshotted after their barrier

    def empty(self) -> bool:
        return not (self.barriers or self.train or self.samples or self.expired or self.skips
                    or self.releases)

    def jobs(self) -> list[Job]:
        """Every job the plan settles, expired ones included."""
        expired = [job for job, _ in self.expired]
        return self.barriers + self.train + self.samples + expired + self.skips


class Scheduler:
    """Pending jobs and per-model seq_id order; builds one `Plan` per tick."""

    def __init__(self, gap_timeout_s: float, max_tokens_per_tick: int,
                 release_idle_s: float = 0.0, snapshot_every_steps: int = 0,
                 snapshot_every_s: float = float("inf")):
        if gap_timeout_s <= 0:
            raise ValueError(f"gap_timeout_s={gap_timeout_s} must be above 0")
        if max_tokens_per_tick < 1:
            raise ValueError(f"max_tokens_per_tick={max_tokens_per_tick} must be at least 1")
        self.gap_timeout_s = gap_timeout_s
        self.max_tokens_per_tick = max_tokens_per_tick
        self.release_idle_s = release_idle_s  # 0: models are never released
        self._last_used: dict[str, float] = {}  # models held in memory: when a job last ended
        self._retiring: set[str] = set()  # models whose session finished: release when idle
        self._pending: dict[str, Job] = {}  # by request_id, in arrival order
        self._tokens: dict[str, int] = {}  # by request_id: the job's share of the budget
        self._next_seq: dict[str, int] = {}  # open models: the seq_id that runs next
        self._lost: dict[str, set[int]] = defaultdict(set)  # seq_ids given up on a gap
        self.snapshot_every_steps = snapshot_every_steps  # 0: no snapshots
        self.snapshot_every_s = snapshot_every_s
        self._steps_since_snapshot: dict[str, int] = {}
        self._snapshot_at: dict[str, float] = {}
        # False holds back the snapshots that snapshot_every_steps makes due (the writer is
        # over its budget: Engine); snapshot_every_s still forces one
        self.snapshot_gate: Callable[[], bool] = lambda: True

    # --- the queue ----------------------------------------------------------------------
    def add(self, job: Job, num_tokens: int = 0) -> None:
        """Queue `job` (its enqueued_at already set); a request_id already queued is ignored."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} of {job.request_id} must be at least 0")
        if job.kind not in SAMPLE_KINDS and job.model_id is None:
            raise ValueError(f"{job.kind} job {job.request_id} has no model_id")
        if job.seq_id is None and job.kind not in SAMPLE_KINDS | OPENING_KINDS:
            raise ValueError(f"{job.kind} job {job.request_id} has no seq_id")
        if job.request_id in self._pending:
            return  # a redelivery of a job still queued: the first copy answers both
        self._pending[job.request_id] = job
        self._tokens[job.request_id] = num_tokens

    @property
    def pending(self) -> int:
        return len(self._pending)

    # --- models -------------------------------------------------------------------------
    def waiting(self) -> list[Job]:
        """The pending jobs (a copy: workers/metrics.py reads it from another thread)."""
        return list(self._pending.values())

    def open_model(self, model_id: str, next_seq: int = 1) -> None:
        """A model now exists (created or loaded: its next seq_id is 1; or restored: the one
        after the calls it replayed)."""
        self._next_seq[model_id] = next_seq
        self._lost.pop(model_id, None)

    def drop(self, model_id: str) -> list[Job]:
        """Take the model's pending jobs out of the queue (its restore failed: they are
        answered with why) and return them."""
        dropped = [job for job in self._pending.values() if job.model_id == model_id]
        for job in dropped:
            del self._pending[job.request_id]
            del self._tokens[job.request_id]
        return dropped

    def until_release(self, now: float) -> float | None:
        """Seconds until the next model is due for release (None: none will be)."""
        if self._retiring:
            return 0.0
        if not self.release_idle_s or not self._last_used:
            return None
        return max(0.0, min(self._last_used.values()) + self.release_idle_s - now)

    def knows(self, model_id: str) -> bool:
        return model_id in self._next_seq

    def retire(self, model_id: str) -> None:
        """The model's session finished: release it once its pending jobs are done, whatever
        release_idle_s says. A model this scheduler does not know holds nothing to release."""
        if self.knows(model_id):
            self._retiring.add(model_id)

    # --- the tick -----------------------------------------------------------------------
    def schedule(self, now: float) -> Plan:
        """The jobs to run this tick. The invariant, clause by clause:

        1. Order: a model's requests run in seq_id order. After `open_model` its seq_ids start
           at 1; the job with seq_id k runs only after k-1 completed (ok or failed).
        2. Gaps: when k+1 is queued and k is not, the model waits. If its head job has waited
           longer than gap_timeout_s since its enqueued_at, it is expired (the message names
           the model, the seq_id it waits for and the timeout) and the missing seq_ids are
           given up, so the model's later jobs run instead of each timing out in turn.
        3. Late jobs: a job whose seq_id is below the model's next one is a redelivery of a
           request already done: it goes to `skips` (nothing runs again). If its seq_id was
           given up on a gap, it never ran: it is expired with a message instead.
        4. Unknown models (never opened, or forgotten) are not the scheduler's business: their
           jobs stay pending, except create_model / load_weights without a seq_id, which are
           barriers that run first. `complete` opens the model when one of them succeeds. A
           load_weights with a seq_id (legacy load_state) is an ordinary ordered barrier.
        5. Barriers: per model per tick, if its next ready job (after any skips) is a barrier
           (create_model, load_weights, optim_step, save_weights*), that barrier alone runs;
           otherwise the run of consecutive ready forward/forward_backward jobs (skips
           included, in order) up to the next barrier. Barriers run oldest first.
        6. One train pass: the runs of all models share `train`, within a token budget of
           max_tokens_per_tick. Models take turns (round robin, oldest waiting head first),
           each adding one job per turn while the budget lasts; a model whose next job does
           not fit stops for this tick (order forbids passing it). A single job larger than
           the whole budget runs alone in its own tick, so it never starves: it waits at most
           until it is the oldest head.
        7. Samples have no order; they batch across models and sessions, oldest first, capped
           by the same budget rule (one oversized sample runs alone).
        8. Release: a model with no pending job whose last job ended release_idle_s or more
           ago is in `releases` (its state leaves memory for disk); it is listed again only
           after another of its jobs ends. A retired model (its session finished) with no
           pending job is in `releases` at once.
        9. Snapshots (snapshot_every_steps > 0): a barrier's model is in `snapshots` when the
           barrier opens it (a creation, or a restore that replayed calls), loads weights,
           or is the snapshot_every_steps-th (or a later) optim_step since its last snapshot
           while `snapshot_gate()` allows, or the first one snapshot_every_s or more after
           it; at most one such optim_step per tick (the
           others are due again at their next optim_step, which spreads the snapshots of
           runs that step together). A barrier runs alone in its model's tick, so the
           snapshot holds exactly the calls up to its seq_id.
        """
        plan = Plan()
        runs: list[list[Job]] = []
        by_model, samples = self._group()
        for model_id, jobs in by_model.items():
            opening = [job for job in jobs if job.seq_id is None]
            if opening:  # the model (re)appears; its ordered jobs wait for the next tick
                plan.barriers.append(min(opening, key=_age))
            elif model_id in self._next_seq:
                chain = self._chain(model_id, jobs, now, plan)
                runs.append(_take_barrier_or_run(chain, plan))
        plan.barriers.sort(key=_age)
        due = [job for job in plan.barriers if self._snapshot_due(job, now)]
        periodic = [job.model_id for job in due if job.kind == "optim_step"][:1]
        plan.snapshots = [job.model_id for job in due if job.kind != "optim_step"] + periodic
        self._fill(sorted((run for run in runs if run), key=lambda r: _age(r[0])), plan)
        plan.samples = self._fit(sorted(samples, key=_age))
        idle = ([m for m, t in self._last_used.items() if now - t >= self.release_idle_s]
                if self.release_idle_s else [])
        plan.releases = [m for m in dict.fromkeys(idle + sorted(self._retiring))
                         if m not in by_model]
        return plan

    def complete(self, plan: Plan, outcomes: dict[str, Outcome], now: float = 0.0) -> None:
        """Settle every job of `plan`: remove it from pending and advance its model's order.

        Every planned job counts as done, ok or failed (a failed request still consumes its
        seq_id): the executor answers each one, and a job missing from `outcomes` is treated
        like a failed one. A create_model / load_weights without a seq_id whose outcome is ok
        opens its model (next seq_id 1) when the scheduler does not know it yet. A model
        whose job ended counts as used at `now`; a released one is no longer tracked.
        """
        for model_id in plan.releases:
            self._last_used.pop(model_id, None)
            self._retiring.discard(model_id)
        for job in plan.jobs():
            self._pending.pop(job.request_id, None)
            self._tokens.pop(job.request_id, None)
        ordered = sorted((j for j in plan.jobs() if j.seq_id is not None), key=_seq)
        for job in ordered:
            self._advance(job)
        for job in plan.barriers:
            outcome = outcomes.get(job.request_id)
            ok = outcome is not None and outcome.ok
            if job.seq_id is None and ok and not self.knows(job.model_id):
                next_seq = job.body.get("next_seq", 1) if job.kind == RESTORE else 1
                self.open_model(job.model_id, next_seq)
            if ok and job.model_id in plan.snapshots:
                self._steps_since_snapshot[job.model_id] = 0
                self._snapshot_at[job.model_id] = now
            elif ok and job.kind == "optim_step":
                steps = self._steps_since_snapshot.get(job.model_id, 0)
                self._steps_since_snapshot[job.model_id] = steps + 1
        for job in plan.jobs() if self.release_idle_s else ():
            if job.model_id is not None and self.knows(job.model_id):
                self._last_used[job.model_id] = now

    # --- helpers ------------------------------------------------------------------------
    def _snapshot_due(self, job: Job, now: float) -> bool:
        if not self.snapshot_every_steps:
            return False
        if job.seq_id is None and self.knows(job.model_id):
            return False  # a redelivered opening of a live model changes nothing
        if job.kind == RESTORE:
            return bool(job.body.get("replay"))  # else its snapshot is the one it read
        if job.kind in OPENING_KINDS:  # a creation, or a load (opening or ordered)
            return True
        if job.kind != "optim_step":
            return False
        steps = self._steps_since_snapshot.get(job.model_id, 0) + 1
        since = now - self._snapshot_at.get(job.model_id, now)
        if since >= self.snapshot_every_s:
            return True
        return steps >= self.snapshot_every_steps and self.snapshot_gate()

    def _group(self) -> tuple[dict[str, list[Job]], list[Job]]:
        """Pending jobs split into per-model lists and samples."""
        by_model: dict[str, list[Job]] = defaultdict(list)
        samples = []
        for job in self._pending.values():
            if job.kind in SAMPLE_KINDS:
                samples.append(job)
            else:
                by_model[job.model_id].append(job)
        return by_model, samples

    def _chain(self, model_id: str, jobs: list[Job], now: float, plan: Plan) -> list[Job]:
        """The model's consecutive ready jobs from its next seq_id; late/expired go to plan."""
        cursor, chain = self._next_seq[model_id], []
        for job in sorted(jobs, key=_seq):
            if job.seq_id < cursor:
                self._settle_late(model_id, job, plan)
            elif job.seq_id == cursor:
                chain.append(job)
                cursor += 1
            elif not chain and now - job.enqueued_at > self.gap_timeout_s:
                plan.expired.append((job, self._gap_message(model_id, job, cursor, now)))
                cursor = job.seq_id + 1  # the missing seq_ids are given up (see complete)
            else:
                break  # a gap: wait for the missing seq_id
        return chain

    def _settle_late(self, model_id: str, job: Job, plan: Plan) -> None:
        if job.seq_id not in self._lost.get(model_id, ()):
            plan.skips.append(job)  # already done: answering it again would repeat work
            return
        message = (
            f"model {model_id!r}: seq_id {job.seq_id} arrived after the scheduler gave up "
            f"waiting for it (gap_timeout_s={self.gap_timeout_s}); later requests already ran"
        )
        plan.expired.append((job, message))

    def _gap_message(self, model_id: str, job: Job, missing: int, now: float) -> str:
        return (
            f"model {model_id!r}: request seq_id {job.seq_id} waited "
            f"{now - job.enqueued_at:.1f}s for seq_id {missing}, longer than "
            f"gap_timeout_s={self.gap_timeout_s}; seq_ids {missing}..{job.seq_id - 1} are "
            "given up"
        )

    def _advance(self, job: Job) -> None:
        """Move the model's cursor past `job`; seq_ids jumped over are recorded as lost."""
        cursor = self._next_seq.get(job.model_id)
        if cursor is None or job.seq_id < cursor:
            return  # model forgotten meanwhile, or a late job: the cursor is already past
        self._lost[job.model_id].update(range(cursor, job.seq_id))
        self._next_seq[job.model_id] = job.seq_id + 1

    def _fits(self, used: int, job: Job) -> bool:
        # An empty batch takes any job, so one larger than the budget still runs (alone).
        return used == 0 or used + self._tokens[job.request_id] <= self.max_tokens_per_tick

    def _fill(self, runs: list[list[Job]], plan: Plan) -> None:
        """Round robin over the models' runs: one train job per model per turn, within budget."""
        used = 0
        while runs:
            still = []
            for run in runs:
                while run and run[0].kind == "skip":
                    plan.skips.append(run.pop(0))  # free: skips cost no compute
                if run and self._fits(used, run[0]):
                    used += self._tokens[run[0].request_id]
                    plan.train.append(run.pop(0))
                    still.append(run)
            runs = still

    def _fit(self, jobs: list[Job]) -> list[Job]:
        """The longest prefix of `jobs` within the budget (at least one job)."""
        taken, used = [], 0
        for job in jobs:
            if not self._fits(used, job):
                break
            used += self._tokens[job.request_id]
            taken.append(job)
        return taken


def _take_barrier_or_run(chain: list[Job], plan: Plan) -> list[Job]:
    """Leading skips go to plan; then a barrier alone, or the train run up to the next barrier."""
    while chain and chain[0].kind == "skip":
        plan.skips.append(chain.pop(0))
    if chain and chain[0].kind in BARRIER_KINDS:
        plan.barriers.append(chain[0])
        return []
    run = []
    for job in chain:
        if job.kind in BARRIER_KINDS:
            break
        run.append(job)
    return run


def _age(job: Job) -> float:
    return job.enqueued_at


def _seq(job: Job) -> int:
    return job.seq_id
