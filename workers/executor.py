"""The executor: runs one tick's plan on the model and answers every job in it.

It owns the torch side of the worker: the `LoraModel`, the training runs (through
`workers.residency`, which keeps the least recently used ones in CPU memory when there are
more runs than device slots, and loads the sampler weights that samples name).
Order of work in a tick: the barriers (each alone), then every forward/forward_backward of
every model in batched passes (one per group of at most `max_lora_adapters` models, each
group made resident before it runs), then every sample request in one batched call.

Over several ranks every rank runs the same plan: tensor-parallel ranks each their shard,
data-parallel replicas each their share of the datums and sequences
(workers/parallel/replicas.py); rank 0 answers.

Failures stay with their request: bad input becomes a `user` error for that job alone,
and if a batched pass fails as a whole, its jobs are retried one by one so that only the
culprit fails.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from config import Settings
from protocol.custom_graph import check_inputs
from protocol.jobs import RESTORE, Job, Outcome, UserError
from protocol.losses import check_loss_inputs, resolve_loss_config
from protocol.wire import FwdBwdRequest, encode_forward_backward_output
from workers import checkpoints, recovery
from workers.attempts import attempt, body
from workers.metrics import Stopwatch
from workers.model import AdapterSpec, LoraModel
from workers.parallel import dp, tp
from workers.parallel.replicas import Replicas
from workers.residency import Residency, Run
from workers.sampling import sampler
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import KV_DTYPES
from workers.scheduler import Plan
from workers.snapshots import SnapshotWriter
from workers.training.optimizer import AdamState, adamw_step
from workers.training.trainer import Trainer, TrainJob

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    """A decoded, validated forward/forward_backward job ready for the batch."""

    job: Job
    request: FwdBwdRequest
    config: dict[str, Any]


class Executor:
    def __init__(
        self,
        model: LoraModel,
        settings: Settings,
        decode: Callable[[list[int]], str],
        eos_token_ids: list[int],
    ):
        self.model = model
        self.settings = settings
        self.decode = decode
        self.eos_token_ids = eos_token_ids
        self.residency = Residency(model, settings.max_lora_adapters, settings.max_models,
                                   settings.max_sampler_adapters, settings.offload_budget_bytes,
                                   settings.released_dir)
        self.runs: dict[str, Run] = self.residency.runs  # every run, resident or offloaded
        self.snapshots = SnapshotWriter(settings.snapshot_root)  # rank 0's is the one that writes
        model.share_prefixes = settings.train_share_prefixes
        self.trainer = Trainer(model, settings.train_micro_batch_size,
                               settings.loss_chunk_tokens, settings.gradient_checkpointing)
        self.sampling = RunningBatch(model, decode, eos_token_ids,
                                     settings.sample_max_num_sequences,
                                     settings.sample_kv_tokens, settings.sample_cuda_graphs,
                                     fused=None if settings.sample_fused_step else False,
                                     kv_dtype=KV_DTYPES[settings.sample_kv_dtype])
        self._sample_started: dict[str, float] = {}  # request id -> admission time
        self.leader: Any = None  # parallel.runtime.Leader on rank 0 over several ranks
        # the replicas' shares of the work, under data parallelism
        self.replicas = Replicas(model.dp) if dp.active(model.dp) else None
        self.rng = self.sampling.rng  # unseeded adapters and samples draw from it
        self.laps: dict[str, float] = {}  # the last tick's phases (workers/metrics.py)
        self.sampled_tokens = 0  # by the samples answered so far
        if settings.random_seed >= 0:
            self.rng.seed(settings.random_seed)

    @classmethod
    def from_settings(cls, settings: Settings) -> Executor:
        return cls.build(settings)

    @classmethod
    def build(cls, settings: Settings, rank: int = 0,
              join: Callable[[torch.device], Any] | None = None) -> Executor:
        """Load the model (rank `rank`'s replica, or its shard under tensor parallelism:
        rank 0 starts the other ranks, a follower joins them with `join`, which gives its
        `runtime.Ranks`) and make the executor."""
        from workers.startup import build

        return build(cls, settings, rank, join)

    # --- the plan -----------------------------------------------------------------------------
    def run(self, plan: Plan) -> dict[str, Outcome]:
        """Run the tick's plan; under tensor parallelism every follower runs it too, with
        the same seed for the tick's random choices."""
        if self.leader is None:
            return self.run_here(plan)
        outcomes = self.run_here(plan, self.leader.send(plan))
        if any(not o.ok and o.category == "server" for o in outcomes.values()):
            # A collective whose peer died fails with an error (gloo) before the watchdog
            # sees the death: those calls must run again after the restart, not be answered
            # with the error, so a lost rank stops the worker here, before any answer.
            self.leader.check(grace=2.0)
        return outcomes

    def run_here(self, plan: Plan, seed: int | None = None) -> dict[str, Outcome]:
        if seed is not None:  # the tick's random choices, alike on every rank
            self.rng.seed(seed)
        outcomes: dict[str, Outcome] = {}
        watch = Stopwatch()
        restores = [job for job in plan.barriers if job.kind == RESTORE]
        if restores:  # together: their replays share passes
            outcomes.update(recovery.restore_many(self, restores))
        for job in plan.barriers:
            if job.kind != RESTORE:
                outcomes[job.request_id] = self._timed(self._barrier, job)
            if outcomes[job.request_id].ok and job.model_id in plan.snapshots:
                recovery.snapshot(self, job)
        watch.lap("barriers")
        if plan.train:
            outcomes.update(self._train(plan.train))
        watch.lap("train")
        outcomes.update(self._sampling(plan.samples))
        watch.lap("sample")
        self.residency.release(plan.releases)
        self.laps = watch.laps  # workers/metrics.py reports them
        return outcomes

    def _sampling(self, jobs: list[Job]) -> dict[str, Outcome]:
        """Admit the tick's sample jobs and run the decode steps; the answers of the
        requests that failed or finished (under data parallelism: of the requests whose
        parts, traded between the replicas, are all in)."""
        outcomes, finished = {}, []
        for request_id, failure in self._sample(jobs) if jobs else []:
            if self.replicas is not None and request_id in self.replicas.expected:
                finished.append((request_id, failure))  # one replica's part failed
            else:  # failed before any split: the same answer on every replica
                self._sample_started.pop(request_id, None)
                outcomes[request_id] = failure
        if self.sampling.busy:
            finished += self._decode()
        if self.replicas is not None and (jobs or self.replicas.any_busy):
            # every replica alike: the parts that finished (a tick with no sampling trades
            # nothing: no replica has a part)
            finished = self.replicas.exchange(finished, self.sampling.busy)
        now = time.perf_counter()
        for request_id, result in finished:
            seconds = now - self._sample_started.pop(request_id, now)
            if isinstance(result, sampler.SampleOutput):
                self.sampled_tokens += sum(len(seq.tokens) for seq in result.sequences)
            outcomes[request_id] = (result if isinstance(result, Outcome)
                                    else sampler.outcome(result, seconds))
        return outcomes

    @property
    def busy(self) -> bool:
        """The running sample batch (of any replica) has work: the engine ticks again
        without waiting."""
        return self.sampling.busy or (self.replicas is not None and self.replicas.others_busy)

    def _timed(self, fn: Callable[[Job], Outcome], job: Job) -> Outcome:
        start = time.perf_counter()
        outcome, failure = attempt(fn, job)
        return (outcome or failure).replace(compute_seconds=time.perf_counter() - start)

    # --- barriers -----------------------------------------------------------------------------
    def _barrier(self, job: Job) -> Outcome:
        handler = getattr(self, f"_{job.kind}")
        return handler(job, body(job))

    def _run(self, model_id: str) -> Run:
        """The run of a barrier's model, its adapter brought into a device slot."""
        return self.residency.resident(model_id)

    def _spec(self, lora: dict[str, Any]) -> AdapterSpec:
        return AdapterSpec(
            rank=int(lora["rank"]),
            alpha=self.settings.lora_alpha,
            train_attn=bool(lora.get("train_attn", True)),
            train_mlp=bool(lora.get("train_mlp", True)),
            train_unembed=bool(lora.get("train_unembed", True)),
        )

    def _create_model(self, job: Job, body: dict[str, Any]) -> Outcome:
        model_id = body["model_id"]
        if model_id not in self.runs:  # a redelivered create is answered, not repeated
            seed = body["lora"].get("seed")
            seed = self.rng.randrange(2**31) if seed is None else int(seed)
            spec = self._spec(body["lora"])
            slot = self.residency.take_slot(spec)
            self.model.add_adapter(slot, spec, torch.Generator().manual_seed(seed))
            self.residency.add(model_id, Run(slot, spec, body["base_model"]))
        return Outcome(json={"model_id": model_id, "type": "create_model"})

    def _load_weights(self, job: Job, body: dict[str, Any]) -> Outcome:
        spec, weights, adam = checkpoints.load_training_state(Path(body["checkpoint_dir"]))
        self.install(body["model_id"], spec, weights, adam if body.get("optimizer") else None,
                     body["base_model"])
        return Outcome(
            json={"path": body["tinker_path"], "model_id": body["model_id"],
                  "type": "load_weights"}
        )

    def install(self, model_id: str, spec: AdapterSpec, weights: checkpoints.LayerWeights,
                adam: AdamState | None, base_model: str) -> None:
        """Make the run's state these whole weights and AdamW moments (a checkpoint's, a
        snapshot's): into its slot if the run exists, else into a new one."""
        if model_id in self.runs:
            run = self._run(model_id)
            run.spec = spec
        else:
            run = Run(self.residency.take_slot(spec), spec, base_model)
            self.residency.add(model_id, run)
        self.model.set_adapter_weights(run.slot, spec, weights)
        if adam is not None and tp.active(self.model.tp):  # the file holds whole moments
            layers = self.model.adapter_layers(run.slot)
            adam = AdamState(adam.step, tp.shard_tensors(layers, adam.exp_avg),
                             tp.shard_tensors(layers, adam.exp_avg_sq))
        run.adam = adam

    def _optim_step(self, job: Job, body: dict[str, Any]) -> Outcome:
        run = self._run(job.model_id)
        params = self.model.adapter_parameters(run.slot)
        dp.all_reduce_grads(params, self.model.dp)  # every replica's share of the gradient
        norm = None
        if tp.active(self.model.tp):  # shards' squares summed over ranks, replicas once
            layers = self.model.adapter_layers(run.slot)
            norm = functools.partial(tp.grad_norm, layers)
        run.adam, metrics = adamw_step(params, run.adam, **body["adam_params"], norm=norm)
        return Outcome(json={"metrics": metrics, "type": "optim_step"})

    def _save_weights(self, job: Job, body: dict[str, Any]) -> Outcome:
        run = self._run(job.model_id)
        folder = Path(body["checkpoint_dir"])
        size = checkpoints.save_training_state(self.model, run.slot, run.adam, folder,
                                               run.base_model)
        return Outcome(
            json={"path": body["tinker_path"], "type": "save_weights"},
            checkpoint=checkpoints.written(job.model_id, "training", body, size),
        )

    def _save_weights_for_sampler(self, job: Job, body: dict[str, Any]) -> Outcome:
        run, folder = self._run(job.model_id), Path(body["checkpoint_dir"])
        kind = "external" if job.kind == "save_weights_external" else "sampler"
        size = checkpoints.save_sampler_weights(self.model, run.slot, folder, run.base_model,
                                                export=kind == "external",
                                                encrypt_to=body.get("age_recipients"))
        self.residency.forget_sampler(str(folder))  # an overwritten folder must be reloaded
        answer = {"path": body.get("tinker_path"), "type": job.kind,
                  "sampling_session_id": body.get("sampling_session_id"),
                  "size_bytes": size if kind == "external" else None}
        answer = {k: v for k, v in answer.items() if v is not None}
        if not body.get("tinker_path"):  # a sampling session's weights: no checkpoint row
            return Outcome(json=answer)
        return Outcome(json=answer, checkpoint=checkpoints.written(job.model_id, kind, body,
                                                                   size))

    _save_weights_external = _save_weights_for_sampler  # the same adapter, to download

    # --- forward / backward -------------------------------------------------------------------
    def _prepare(self, job: Job) -> _Prepared:
        request = body(job)
        config = resolve_loss_config(request.loss_fn, request.loss_fn_config)
        vocab = self.model.vocab_size
        for i, datum in enumerate(request.data):
            check_loss_inputs(request.loss_fn, i, len(datum.tokens), datum.inputs)
            if "custom_loss" in config:
                check_inputs(config["custom_loss"], i, len(datum.tokens), datum.inputs)
            for name in ("tokens", "target_tokens"):
                arr = datum.tokens if name == "tokens" else datum.inputs["target_tokens"]
                if len(arr) and (arr.min() < 0 or arr.max() >= vocab):
                    raise UserError(f"data[{i}].{name} has ids outside [0, {vocab})")
        if not request.data:
            raise UserError("forward_backward needs at least one datum")
        if job.model_id not in self.runs:
            raise UserError(f"model {job.model_id} is not known to this worker")
        return _Prepared(job, request, config)

    def _train(self, jobs: list[Job]) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        prepared: list[_Prepared] = []
        for job in jobs:
            ready, failure = attempt(self._prepare, job)
            if failure:
                outcomes[job.request_id] = failure
            else:
                prepared.append(ready)
        for group in self._groups(prepared):
            outcomes.update(self._train_group(group))
        return outcomes

    def _groups(self, prepared: list[_Prepared]) -> list[list[_Prepared]]:
        """The jobs cut into groups of at most `max_lora_adapters` models, resident ones first
        (fewer transfers); a model's jobs stay together and in order."""
        models = list(dict.fromkeys(p.job.model_id for p in prepared))
        models.sort(key=lambda m: not self.residency.in_slot(m))  # stable: keeps arrival order
        size = self.settings.max_lora_adapters
        chunks = [set(models[i : i + size]) for i in range(0, len(models), size)]
        return [[p for p in prepared if p.job.model_id in chunk] for chunk in chunks]

    def _train_group(self, group: list[_Prepared]) -> dict[str, Outcome]:
        try:  # gradients are committed only for jobs that ran whole, so a retry is safe
            return self._train_batch(group)
        except Exception:  # noqa: BLE001 - retry alone so that only the culprit fails
            log.exception("batched forward/backward failed; retrying its jobs one by one")
            return {
                p.job.request_id: self._timed(
                    lambda _j, p=p: self._train_batch([p])[p.job.request_id], p.job
                )
                for p in group
            }

    def _train_batch(self, batch: list[_Prepared]) -> dict[str, Outcome]:
        start = time.perf_counter()
        models = list(dict.fromkeys(p.job.model_id for p in batch))
        # the batch's models fit in the slots, so making one resident never offloads another
        slots = {m: self.residency.resident(m, keep=models).slot for m in models}
        jobs = [TrainJob(p.request, p.config, slots[p.job.model_id]) for p in batch]
        results = (self.trainer.run(jobs) if self.replicas is None
                   else self.replicas.train(self.trainer, jobs))
        seconds = (time.perf_counter() - start) / len(batch)
        return {
            p.job.request_id: Outcome.fail(r.error, "user") if r.error else Outcome(
                proto=encode_forward_backward_output(r.outputs,
                                                     {"loss:sum": r.loss_sum, **r.metrics}),
                compute_seconds=seconds,
            )
            for p, r in zip(batch, results, strict=True)
        }

    # --- sampling -----------------------------------------------------------------------------
    def _sample_spec(self, job: Job) -> sampler.SampleSpec:
        data = body(job)
        return sampler.SampleSpec.of(data, self.residency.sampler_slot(data.get("adapter_dir")))

    def _sample(self, jobs: list[Job]) -> list[tuple[str, Outcome]]:
        """Validate each sample job and add it to the running batch; only failures answer
        now (the others answer when their last sequence ends)."""
        finished = []
        for job in jobs:
            _, failure = attempt(self._admit_sample, job)
            if failure:
                finished.append((job.request_id, failure))
        return finished

    def _admit_sample(self, job: Job) -> None:
        spec = self._sample_spec(job)
        sampler.validate(spec, self.model)
        self._sample_started[job.request_id] = time.perf_counter()
        if spec.seed is None:  # drawn here, so that every replica draws it alike
            spec.seed = self.sampling.rng.getrandbits(62)
        if self.replicas is not None:
            lo, hi = self.replicas.share(job.request_id, spec.num_samples)
            if hi == lo:
                return  # the other replicas sample this request
            spec.num_samples, spec.first_index = hi - lo, lo
        self.sampling.admit(job.request_id, spec, sampler.adapter_of(self.model, spec.slot))

    def _decode(self) -> list[tuple[str, Any]]:
        """Run the running batch for this tick's decode steps: the requests that finished,
        each with its SampleOutput or its failure."""
        try:
            finished = self.sampling.step(self.settings.sample_steps_per_tick)
        except Exception as e:  # noqa: BLE001 - the batch's requests fail, the worker lives
            log.exception("decode step failed")
            finished = self.sampling.fail_all(e)
        return [(request_id, result if isinstance(result, sampler.SampleOutput)
                 else sampler.outcome(result, 0.0)) for request_id, result in finished]
