"""Batch scripts: Tinker calls as Celery signatures that compose with `chain` and `group`.

    from celery import chain
    from tasks.batch import Batch

    batch = Batch.open(api_key="tml-local")            # or batch_id="sl-1": a re-run dedupes
    run = batch.create_model("tinkerq/tiny-qwen3", rank=16, seed=0)
    steps = [run.create]                               # a model's creation runs first
    for minibatch in minibatches:                      # datums: tinker types or plain dicts
        steps += [run.forward_backward(minibatch, "cross_entropy"),
                  run.optim_step(learning_rate=1e-3)]
    steps.append(run.save_weights_for_sampler("epoch-1"))
    chain(*steps).apply_async()                        # sends the first call; returns at once

    python -m tasks.batch status <batch-id> [--wait SECONDS] [--json]   # progress, results
    python -m tasks.batch resend <batch-id>            # send every call again, in order

Each call method builds the body the SDK would send and submits it through the REST API's
own path (tasks/calls.py, tasks/submit.py: the same checks, rows, payloads and (model |
sampler, seq_id) dedupe) without sending a task, and returns an immutable signature of the
same `tinker.<verb>` task on the model's queue, carrying only the request id. So the seq_id
order of every model and all ids are fixed before anything runs; Celery only decides when
each call is sent. Results land in the rows, where
REST `retrieve_future`, the REST listings and `status` read them.

Rules that follow from the engine:
- A chain sends a link after the previous call's result is stored, so a model's `create`
  must precede its other calls in a chain (a call that reaches the worker before its model
  exists is failed as orphaned). A `group` sends its members at once: use it across models,
  or for one model's calls after its creation (the engine still runs them in seq_id order).
- A group followed by more links is a chord, which needs a Celery result backend; tinkerq
  has none (results live in the database).
- Bad input raises ValueError with the API's message, and nothing is written.
- A call that fails (bad input the engine found, a server error) is stored `failed` and the
  chain goes on, as independent REST calls would; `status` shows it.
- Sending a call again never recomputes it: the task turns a finished row into a skip. A
  batch opened again with the same `batch_id` replays its model and sampler ids and seq_ids,
  so its rows dedupe to the first run's and a re-run script only sends the calls again.

A batch is a client session (its id is the session id): `GET /api/v1/sessions/<batch-id>`
lists its training runs and samplers. Scripts need the service's settings (DATABASE_URL,
REDIS_URL, TINKERQ_DATA_DIR, TINKERQ_QUEUE, the base model; `python -m config --help`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from celery.canvas import Signature
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from config import Settings
from protocol.errors import RequestError
from store.db import Store
from store.model_info import ModelInfo
from store.schema import ModelRow, RequestRow, SessionRow, tenant_of
from tasks import batch_status, calls, saves
from tasks.celery_app import celery_app
from tasks.enqueue import request_id, signature, task_name
from tasks.submit import Submitter

__all__ = ["Batch", "Sampler", "TrainingRun", "main", "request_id", "signature"]
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
Datum = types.Datum | Mapping[str, Any]  # a dict: {"model_input": [ids], "loss_fn_inputs": {}}


@contextlib.contextmanager
def _checked() -> Iterator[None]:
    """The API's 4xx/503 answers become ValueError in a script, before anything is written."""
    try:
        yield
    except RequestError as e:
        raise ValueError(e.message) from e


def _plain(value: Any) -> dict[str, Any]:
    """AdamParams / SamplingParams (pydantic or dataclass), a mapping, or None -> a dict."""
    if value is None:
        return {}
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value)


def _model_input(value: types.ModelInput | Mapping[str, Any] | Sequence[int]) -> types.ModelInput:
    if isinstance(value, types.ModelInput):
        return value
    if isinstance(value, Mapping):
        return types.ModelInput.model_validate(value)
    return types.ModelInput.from_ints([int(t) for t in value])


def _datum(value: Datum) -> types.Datum:
    if isinstance(value, types.Datum):
        return value
    inputs = dict(value.get("loss_fn_inputs", {}))
    return types.Datum(model_input=_model_input(value["model_input"]), loss_fn_inputs=inputs)


def open_store(settings: Settings) -> Store:
    store = Store(settings.database)
    if not inspect(store.engine).has_table("requests"):
        raise RuntimeError(
            f"{settings.database} has no tinkerq schema: start the service first (honcho "
            "start), or point DATABASE_URL / TINKERQ_DATA_DIR at the service's database"
        )
    return store


@dataclasses.dataclass
class Batch:
    """A labelled set of calls of one API key (a session row); makes runs and samplers."""

    id: str
    tenant: str
    submit: Submitter  # writes rows without sending their tasks; refuses bad input outright
    _models: int = 0  # model_seq_id of the next create_model: ids replay on a re-run
    _samplers: int = 0

    @property
    def store(self) -> Store:
        return self.submit.store

    @classmethod
    def open(cls, api_key: str, batch_id: str | None = None, name: str | None = None,
             settings: Settings | None = None) -> Batch:
        """A new batch, or with `batch_id` the one of that id (created if missing)."""
        if not api_key.startswith("tml-"):
            raise ValueError("invalid API key: it must start with 'tml-'")
        batch_id = batch_id or f"batch-{uuid.uuid4().hex[:12]}"
        if not BATCH_ID.fullmatch(batch_id):
            raise ValueError(f"batch_id={batch_id!r} must match {BATCH_ID.pattern}")
        settings = settings or celery_app.conf.tinkerq_settings
        store = open_store(settings)
        submit = Submitter(settings, store, ModelInfo(settings), send=None, claim_rejected=False)
        batch = cls(batch_id, tenant_of(api_key), submit)
        batch._ensure_session(name)
        return batch

    def _ensure_session(self, name: str | None) -> None:
        row = SessionRow(id=self.id, tenant=self.tenant, tags=["batch"], display_name=name)
        with contextlib.suppress(IntegrityError), self.store.transaction() as s:
            if s.get(SessionRow, self.id) is None:
                s.add(row)
        with self.store.transaction() as s:
            found = s.get(SessionRow, self.id)
        if found is None or found.tenant != self.tenant:
            raise ValueError(f"batch id {self.id!r} is taken; choose another")

    def _signature_of(self, stored_id: str) -> Signature:
        with self.store.transaction() as s:
            row = s.get(RequestRow, stored_id, options=[defer(RequestRow.payload)])
        assert row is not None
        return signature(row)

    # --- what a batch makes ---------------------------------------------------------------
    def create_model(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        *,
        train_attn: bool = True,
        train_mlp: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, Any] | None = None,
    ) -> TrainingRun:
        """A LoRA training run; its creation is the signature `run.create`."""
        lora = {"rank": rank, "seed": seed, "train_attn": train_attn,
                "train_mlp": train_mlp, "train_unembed": train_unembed}
        body = {"session_id": self.id, "model_seq_id": self._models, "base_model": base_model,
                "lora_config": lora, "user_metadata": user_metadata}
        with _checked():
            answer = calls.create_model(self.submit, self.tenant, body)
        self._models += 1
        model_id = answer["model_id"]
        create = self._signature_of(answer["request_id"])
        return TrainingRun(self, model_id, create)

    def training_run(self, model_id: str) -> TrainingRun:
        """A run this batch created earlier (a later chain); new calls follow its last one."""
        with self.store.transaction() as s:
            model = s.get(ModelRow, model_id)
            last = s.scalar(select(func.max(RequestRow.seq_id)).where(
                RequestRow.model_id == model_id))
        if model is None or model.session_id != self.id or model.tenant != self.tenant:
            raise ValueError(f"model {model_id!r} is not a training run of batch {self.id!r}")
        return TrainingRun(self, model_id, None, (last or 0) + 1)

    def sampler(self, model_path: str | None = None, base_model: str | None = None) -> Sampler:
        """A sampling session on the base model or on sampler weights: `model_path` may name
        weights that a save of this chain writes later (chain the samples after it)."""
        if (model_path is None) == (base_model is None):
            raise ValueError("give one of model_path (sampler weights) or base_model")
        body = {"session_id": self.id, "sampling_session_seq_id": self._samplers,
                "model_path": model_path, "base_model": base_model}
        with _checked():
            row = calls.create_sampler(self.submit, self.tenant, body, planned=True)
        self._samplers += 1
        return Sampler(self, row.id)

    # --- reading it back ------------------------------------------------------------------
    def signatures(self) -> list[Signature]:
        """Every stored call of the batch, in the order written: the chain to send again."""
        rows = batch_status.batch_rows(self.store, self.tenant, self.id)
        return [signature(row) for row in rows]

    def status(self) -> list[dict[str, Any]]:
        rows = batch_status.batch_rows(self.store, self.tenant, self.id)
        return [batch_status.describe(row) for row in rows]


Verb = Callable[[Submitter, str, Any], dict[str, Any]]


@dataclasses.dataclass
class TrainingRun:
    """One model's numbered calls; each method returns the signature of one stored call."""

    batch: Batch
    model_id: str
    create: Signature | None  # None for a run reopened with Batch.training_run
    next_seq: int = 1

    def _call(self, kind: str, verb: Verb, body: Callable[[int], Any]) -> Signature:
        """Claim the next seq_id: the first run's row if a re-run finds one (it must be the
        same verb), else a new row."""
        with _checked():
            answer = verb(self.batch.submit, self.batch.tenant, body(self.next_seq))
        sig = self.batch._signature_of(answer["request_id"])
        if sig.name != task_name(kind):
            raise ValueError(
                f"{self.model_id} seq_id {self.next_seq} is already a {sig.name} call, not "
                f"{kind}: a re-run must make the same calls in order (or use a new batch id)"
            )
        self.next_seq += 1
        return sig

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: types.LossFnType = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> Signature:
        return self._train("forward_backward", data, loss_fn, loss_fn_config)

    def forward(
        self, data: Sequence[Datum], loss_fn: types.LossFnType = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> Signature:
        return self._train("forward", data, loss_fn, loss_fn_config)

    def _train(self, kind: str, data: Sequence[Datum], loss_fn: types.LossFnType,
               config: dict[str, float] | None) -> Signature:
        fb_input = types.ForwardBackwardInput(data=[_datum(d) for d in data], loss_fn=loss_fn,
                                              loss_fn_config=config)

        def body(seq: int) -> bytes:  # the body the SDK would POST
            msg = forward_backward_request_to_proto(types.ForwardBackwardRequest(
                forward_backward_input=fb_input, model_id=self.model_id, seq_id=seq))
            msg.forward_only = kind == "forward"
            return msg.SerializeToString()

        return self._call(kind, calls.forward_backward, body)

    def optim_step(
        self, adam_params: types.AdamParams | Mapping[str, float] | None = None, **fields: float
    ) -> Signature:
        """`adam_params`: types.AdamParams or a dict; or its fields as keywords."""
        adam = _plain(adam_params) | fields
        return self._call("optim_step", calls.optim_step, lambda seq: {
            "model_id": self.model_id, "seq_id": seq, "adam_params": adam})

    def save_state(self, name: str, ttl_seconds: int | None = None) -> Signature:
        """Adapter + optimizer state at tinker://<model>/weights/<name>."""
        return self._save("save_weights", saves.save_weights, name, ttl_seconds)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None) -> Signature:
        """The peft adapter at `sampler_path(name)`, for `Batch.sampler(model_path=...)`."""
        verb = saves.save_weights_for_sampler
        return self._save("save_weights_for_sampler", verb, name, ttl_seconds)

    def sampler_path(self, name: str) -> str:
        return f"tinker://{self.model_id}/sampler_weights/{name}"

    def _save(self, kind: str, verb: Verb, name: str, ttl: int | None) -> Signature:
        return self._call(kind, verb, lambda seq: {
            "model_id": self.model_id, "seq_id": seq, "path": name, "ttl_seconds": ttl})


@dataclasses.dataclass
class Sampler:
    """A sampling session; `sample` returns the signature of one stored sample call."""

    batch: Batch
    sampler_id: str
    next_seq: int = 1

    def sample(
        self,
        prompt: types.ModelInput | Sequence[int],
        num_samples: int = 1,
        sampling_params: types.SamplingParams | Mapping[str, Any] | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Signature:
        body = {"sampling_session_id": self.sampler_id, "seq_id": self.next_seq,
                "prompt": _model_input(prompt).model_dump(), "num_samples": num_samples,
                "sampling_params": _plain(sampling_params),
                "prompt_logprobs": include_prompt_logprobs,
                "topk_prompt_logprobs": topk_prompt_logprobs}
        with _checked():
            answer = calls.sample(self.batch.submit, self.batch.tenant, body)
        self.next_seq += 1
        return self.batch._signature_of(answer["request_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["status", "resend"])
    parser.add_argument("targets", nargs="+", help="batch ids, or request ids (req-...)")
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"),
                        help="the key that owns the batch (env TINKER_API_KEY; tml-local)")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="status: wait up to this many seconds for every call to finish")
    parser.add_argument("--json", action="store_true", help="status: print the calls as JSON")
    args = parser.parse_args(argv)
    store = open_store(celery_app.conf.tinkerq_settings)
    command = batch_status.status_command if args.command == "status" else \
        batch_status.resend_command
    return command(args, store, tenant_of(args.api_key))


if __name__ == "__main__":
    sys.exit(main())
