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

Each call method validates its input as the REST API does and writes the call's request row
at once (same tenant, payload and (model | sampler, seq_id) dedupe: `Store.add_request`),
then returns an immutable signature of the same `tinker.<verb>` task on the model's queue,
carrying only the request id. So the seq_id order of every model and all ids are fixed before
anything runs; Celery only decides when each call is sent. Results land in the rows, where
REST `retrieve_future`, the REST listings and `status` read them.

Rules that follow from the engine:
- A chain sends a link after the previous call's result is stored, so a model's `create`
  must precede its other calls in a chain (a call that reaches the worker before its model
  exists is failed as orphaned). A `group` sends its members at once: use it across models,
  or for one model's calls after its creation (the engine still runs them in seq_id order).
- A group followed by more links is a chord, which needs a Celery result backend; tinkerq
  has none (results live in the database).
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
import datetime as dt
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from celery.canvas import Signature
from sqlalchemy import func, inspect, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from app.blueprints.checks import (
    check_adam,
    check_base_model,
    check_checkpoint_name,
    check_forward_backward,
    check_lora,
    check_sample,
    parse_tinker_path,
)
from config import Settings
from protocol.errors import RequestError
from protocol.wire import WireError, decode_forward_backward
from store.db import Store
from store.model_info import ModelInfo
from store.schema import CheckpointRow, ModelRow, RequestRow, SamplerRow, SessionRow, tenant_of
from tasks import celery_app
from tasks.enqueue import task_name

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


def signature(row: RequestRow) -> Signature:
    """The immutable signature of a stored call: its verb's task, its queue, its id."""
    return celery_app.signature(
        task_name(row.kind),
        args=[row.id],
        kwargs={"summary": row.summary},
        queue=row.queue,
        immutable=True,
    )


def request_id(sig: Signature) -> str:
    """The request id a signature carries (REST `retrieve_future` takes it)."""
    return sig.args[0]


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
    store: Store
    settings: Settings
    _models: int = 0  # model_seq_id of the next create_model: ids replay on a re-run
    _samplers: int = 0

    @classmethod
    def open(cls, api_key: str, batch_id: str | None = None, name: str | None = None) -> Batch:
        """A new batch, or with `batch_id` the one of that id (created if missing)."""
        if not api_key.startswith("tml-"):
            raise ValueError("invalid API key: it must start with 'tml-'")
        batch_id = batch_id or f"batch-{uuid.uuid4().hex[:12]}"
        if not BATCH_ID.fullmatch(batch_id):
            raise ValueError(f"batch_id={batch_id!r} must match {BATCH_ID.pattern}")
        settings = celery_app.conf.tinkerq_settings
        batch = cls(batch_id, tenant_of(api_key), open_store(settings), settings)
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

    def _add(self, row: RequestRow, *creates: Any) -> Signature:
        """Store a call (dedupe: a re-run gets the first run's row) and sign it."""
        found = self.store.add_request(row, *creates)
        return signature(row) if found == row.id else self._signature_of(found)

    def _signature_of(self, stored_id: str) -> Signature:
        with self.store.transaction() as s:
            row = s.get(RequestRow, stored_id, options=[defer(RequestRow.payload)])
        assert row is not None
        return signature(row)

    def _vocab(self) -> int:
        with _checked():
            return ModelInfo(self.settings).vocab_size

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
        lora_cfg = {"rank": rank, "seed": seed, "train_attn": train_attn,
                    "train_mlp": train_mlp, "train_unembed": train_unembed}
        with _checked():
            base = check_base_model(base_model, self.settings)
            lora = check_lora(lora_cfg, self.settings)
        model_id = f"{self.id}:train:{self._models}"
        model = ModelRow(id=model_id, tenant=self.tenant, session_id=self.id, base_model=base,
                         lora_rank=lora["rank"], lora_seed=lora["seed"],
                         train_attn=lora["train_attn"], train_mlp=lora["train_mlp"],
                         train_unembed=lora["train_unembed"], user_metadata=user_metadata or {},
                         queue=self.settings.queue)
        row = RequestRow(
            id=_new_request_id(), tenant=self.tenant, kind="create_model", model_id=model_id,
            seq_id=0, queue=model.queue,
            payload=_json({"model_id": model_id, "base_model": base, "lora": lora}),
            summary=f"create_model model={model_id} base={base} rank={rank}",
        )
        create = self._add(row, model)
        self._models += 1
        return TrainingRun(self, model_id, self._queue_of(model_id), create)

    def training_run(self, model_id: str) -> TrainingRun:
        """A run this batch created earlier (a later chain); new calls follow its last one."""
        with self.store.transaction() as s:
            model = s.get(ModelRow, model_id)
            last = s.scalar(select(func.max(RequestRow.seq_id)).where(
                RequestRow.model_id == model_id))
        if model is None or model.session_id != self.id or model.tenant != self.tenant:
            raise ValueError(f"model {model_id!r} is not a training run of batch {self.id!r}")
        return TrainingRun(self, model_id, model.queue, None, (last or 0) + 1)

    def sampler(self, model_path: str | None = None, base_model: str | None = None) -> Sampler:
        """A sampling session on the base model or on sampler weights: `model_path` may name
        weights that a save of this chain writes later (chain the samples after it)."""
        if (model_path is None) == (base_model is None):
            raise ValueError("give one of model_path (sampler weights) or base_model")
        sampler_id = f"{self.id}:sample:{self._samplers}"
        row = SamplerRow(id=sampler_id, tenant=self.tenant, session_id=self.id,
                         queue=self.settings.queue, base_model="", model_path=model_path)
        with _checked():
            if model_path is not None:
                row.base_model, row.checkpoint_dir = self._sampler_weights(model_path)
            else:
                row.base_model = check_base_model(str(base_model), self.settings)
        with contextlib.suppress(IntegrityError), self.store.transaction() as s:
            if s.get(SamplerRow, sampler_id) is None:  # else a re-run: the first one stays
                s.add(row)
        self._samplers += 1
        with self.store.transaction() as s:
            stored = s.get(SamplerRow, sampler_id)
        assert stored is not None
        return Sampler(self, stored)

    def _sampler_weights(self, path: str) -> tuple[str, str]:
        run_id, kind, name = parse_tinker_path(path)
        with self.store.transaction() as s:
            model = s.get(ModelRow, run_id)
        if kind != "sampler" or model is None or model.tenant != self.tenant:
            raise RequestError(400, f"model_path {path!r} is not sampler weights of yours")
        return model.base_model, str(_checkpoint_dir(self, run_id, "sampler_weights", name))

    def _queue_of(self, model_id: str) -> str:
        with self.store.transaction() as s:
            model = s.get(ModelRow, model_id)
        assert model is not None
        return model.queue

    # --- reading it back ------------------------------------------------------------------
    def signatures(self) -> list[Signature]:
        """Every stored call of the batch, in the order written: the chain to send again."""
        return [signature(row) for row in _batch_rows(self.store, self.tenant, self.id)]

    def status(self) -> list[dict[str, Any]]:
        return [describe(row) for row in _batch_rows(self.store, self.tenant, self.id)]


@dataclasses.dataclass
class TrainingRun:
    """One model's numbered calls; each method returns the signature of one stored call."""

    batch: Batch
    model_id: str
    queue: str
    create: Signature | None  # None for a run reopened with Batch.training_run
    next_seq: int = 1

    def _call(self, kind: str, build: Callable[[], tuple[bytes, str]]) -> Signature:
        """Claim the next seq_id: the first run's row if a re-run finds one, else a new row."""
        seq = self.next_seq
        if found := self.batch.store.request_holding(self.model_id, None, seq):
            sig = self._replayed(found, kind)
        else:
            with _checked():
                payload, summary = build()
            row = RequestRow(id=_new_request_id(), tenant=self.batch.tenant, kind=kind,
                             model_id=self.model_id, seq_id=seq, queue=self.queue,
                             payload=payload,
                             summary=f"{kind} model={self.model_id} seq={seq} {summary}"[:256])
            sig = self.batch._add(row)
        self.next_seq += 1
        return sig

    def _replayed(self, stored_id: str, kind: str) -> Signature:
        """A re-run's call: the stored one (checked when written), if it is the same verb."""
        sig = self.batch._signature_of(stored_id)
        if sig.name != task_name(kind):
            raise ValueError(
                f"{self.model_id} seq_id {self.next_seq} is already a {sig.name} call, not "
                f"{kind}: a re-run must make the same calls in order (or use a new batch id)"
            )
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
        def build() -> tuple[bytes, str]:
            fb_input = types.ForwardBackwardInput(data=[_datum(d) for d in data],
                                                  loss_fn=loss_fn,
                                                  loss_fn_config=config)
            msg = forward_backward_request_to_proto(types.ForwardBackwardRequest(
                forward_backward_input=fb_input, model_id=self.model_id, seq_id=self.next_seq))
            msg.forward_only = kind == "forward"
            body = msg.SerializeToString()  # the body the SDK would POST
            try:
                req = decode_forward_backward(body)
            except WireError as e:
                raise RequestError(400, str(e)) from e
            check_forward_backward(req, self.batch.settings, self.batch._vocab())
            return body, f"loss={req.loss_fn} datums={len(req.data)} tokens={req.num_tokens}"

        return self._call(kind, build)

    def optim_step(
        self, adam_params: types.AdamParams | Mapping[str, float] | None = None, **fields: float
    ) -> Signature:
        """`adam_params`: types.AdamParams or a dict; or its fields as keywords."""
        def build() -> tuple[bytes, str]:
            adam = check_adam(_plain(adam_params) | fields)
            return _json({"adam_params": adam}), f"lr={adam['learning_rate']:g}"

        return self._call("optim_step", build)

    def save_state(self, name: str, ttl_seconds: int | None = None) -> Signature:
        """Adapter + optimizer state at tinker://<model>/weights/<name>."""
        return self._save("save_weights", "weights", name, ttl_seconds)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None) -> Signature:
        """The peft adapter at `sampler_path(name)`, for `Batch.sampler(model_path=...)`."""
        return self._save("save_weights_for_sampler", "sampler_weights", name, ttl_seconds)

    def sampler_path(self, name: str) -> str:
        return f"tinker://{self.model_id}/sampler_weights/{name}"

    def _save(self, kind: str, segment: str, name: str, ttl: int | None) -> Signature:
        def build() -> tuple[bytes, str]:
            check_checkpoint_name(name)
            if ttl is not None and ttl < 1:
                raise RequestError(400, f"ttl_seconds={ttl} must be at least 1 (None: never expires)")
            self._check_new_name("training" if segment == "weights" else "sampler", name)
            path = f"tinker://{self.model_id}/{segment}/{name}"
            folder = _checkpoint_dir(self.batch, self.model_id, segment, name)
            data = {"checkpoint_dir": str(folder), "tinker_path": path, "ttl_seconds": ttl,
                    "user_metadata": None}
            if kind == "save_weights_for_sampler":
                data["sampling_session_id"] = None
            return _json(data), f"path={path}"

        return self._call(kind, build)

    def _check_new_name(self, kind: str, name: str) -> None:
        with self.batch.store.transaction() as s:
            taken = s.scalars(select(CheckpointRow.id).where(
                CheckpointRow.model_id == self.model_id, CheckpointRow.kind == kind,
                CheckpointRow.name == name)).first()
        if taken is not None:
            raise RequestError(400, f"checkpoint {name!r} already exists for {self.model_id!r}")


@dataclasses.dataclass
class Sampler:
    """A sampling session; `sample` returns the signature of one stored sample call."""

    batch: Batch
    row: SamplerRow
    next_seq: int = 1

    @property
    def sampler_id(self) -> str:
        return self.row.id

    def sample(
        self,
        prompt: types.ModelInput | Sequence[int],
        num_samples: int = 1,
        sampling_params: types.SamplingParams | Mapping[str, Any] | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Signature:
        body = {"prompt": _model_input(prompt).model_dump(), "num_samples": num_samples,
                "sampling_params": _plain(sampling_params),
                "prompt_logprobs": include_prompt_logprobs,
                "topk_prompt_logprobs": topk_prompt_logprobs}
        with _checked():
            data = check_sample(body, self.batch.settings, self.batch._vocab())
        data["adapter_dir"] = self.row.checkpoint_dir
        seq = self.next_seq
        row = RequestRow(
            id=_new_request_id(), tenant=self.batch.tenant, kind="sample",
            sampler_id=self.row.id, seq_id=seq, queue=self.row.queue, payload=_json(data),
            summary=(f"sample sampler={self.row.id} seq={seq} n={data['num_samples']} "
                     f"prompt={len(data['prompt'])} max_tokens={data['max_tokens']}")[:256],
        )
        sig = self.batch._add(row)
        self.next_seq += 1
        return sig


def _new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def _checkpoint_dir(batch: Batch, model_id: str, segment: str, name: str) -> Path:
    """The folder the worker writes, as the API names it (app/blueprints/training.py)."""
    return batch.settings.checkpoint_root / batch.tenant / model_id / segment / name


# --- status ---------------------------------------------------------------------------------


def _batch_rows(store: Store, tenant: str, batch_id: str) -> list[RequestRow]:
    models = select(ModelRow.id).where(ModelRow.session_id == batch_id)
    samplers = select(SamplerRow.id).where(SamplerRow.session_id == batch_id)
    query = (
        select(RequestRow)
        .options(defer(RequestRow.payload))
        .where(RequestRow.tenant == tenant,
               or_(RequestRow.model_id.in_(models), RequestRow.sampler_id.in_(samplers)))
        .order_by(RequestRow.created_at, RequestRow.seq_id)
    )
    with store.transaction() as s:
        return list(s.scalars(query))


def _rows_by_id(store: Store, tenant: str, ids: list[str]) -> list[RequestRow]:
    query = select(RequestRow).options(defer(RequestRow.payload)).where(
        RequestRow.tenant == tenant, RequestRow.id.in_(ids)).order_by(RequestRow.created_at)
    with store.transaction() as s:
        return list(s.scalars(query))


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat() + "Z"


def describe(row: RequestRow) -> dict[str, Any]:
    """A stored call as plain JSON: state, and for finished calls the decoded result."""
    out: dict[str, Any] = {
        "request_id": row.id, "kind": row.kind, "model_id": row.model_id,
        "sampler_id": row.sampler_id, "seq_id": row.seq_id, "state": row.state,
        "summary": row.summary, "created_at": _iso(row.created_at),
        "finished_at": _iso(row.finished_at), "compute_seconds": row.compute_seconds,
    }
    if row.error is not None:
        out |= {"error": row.error, "category": row.error_category}
    if row.result is not None:
        out["result"] = _decode(row.kind, row.result, row.result_type)
    return out


def _decode(kind: str, result: bytes, result_type: str | None) -> dict[str, Any]:
    if result_type != "proto":
        return json.loads(result)
    if kind == "sample":
        seqs = deserialize_sample_response(result).sequences
        return {"sequences": [{"tokens": s.tokens, "stop_reason": s.stop_reason} for s in seqs]}
    return {"metrics": deserialize_forward_backward_output(result).metrics}


def _brief(call: dict[str, Any]) -> str:
    """One line of result for the table: metrics, a path, sampled tokens, or the error."""
    if "error" in call:
        return f"{call['category']} error: {call['error']}"[:120]
    result = call.get("result") or {}
    if "metrics" in result:
        return " ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
    if "sequences" in result:
        return " | ".join(str(s["tokens"]) for s in result["sequences"])[:120]
    return str(result.get("path") or result.get("model_id") or "")


def format_status(label: str, calls: list[dict[str, Any]]) -> str:
    states = [c["state"] for c in calls]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("done", "failed", "pending"))
    lines = [f"{label}: {len(calls)} calls: {counts}",
             f"{'seq':>4}  {'call':<25} {'on':<28} {'state':<8} result"]
    for c in calls:
        target = (c["model_id"] or c["sampler_id"] or "")[-28:]
        lines.append(f"{c['seq_id'] if c['seq_id'] is not None else '':>4}  {c['kind']:<25} "
                     f"{target:<28} {c['state']:<8} {_brief(c)}")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------


def _calls(store: Store, tenant: str, targets: list[str]) -> list[dict[str, Any]]:
    if all(t.startswith("req-") for t in targets):
        rows = _rows_by_id(store, tenant, targets)
    else:
        rows = [r for t in targets for r in _batch_rows(store, tenant, t)]
    return [describe(r) for r in rows]


def _status(args: argparse.Namespace, store: Store, tenant: str) -> int:
    deadline = time.monotonic() + args.wait
    calls = _calls(store, tenant, args.targets)
    while any(c["state"] == "pending" for c in calls) and time.monotonic() < deadline:
        time.sleep(0.5)
        calls = _calls(store, tenant, args.targets)
    if not calls:
        print(f"no calls of this API key found for {' '.join(args.targets)} (--api-key, "
              "TINKER_API_KEY)")
        return 1
    if args.json:
        print(json.dumps(calls, indent=1))
    else:
        print(format_status(" ".join(args.targets), calls))
    return 1 if args.wait and any(c["state"] == "pending" for c in calls) else 0


def _resend(args: argparse.Namespace, store: Store, tenant: str) -> int:
    from celery import chain

    rows = [r for t in args.targets for r in _batch_rows(store, tenant, t)]
    if not rows:
        print(f"no calls of this API key found for {' '.join(args.targets)}")
        return 1
    chain(*[signature(r) for r in rows]).apply_async()
    pending = sum(not r.finished for r in rows)
    print(f"sent {len(rows)} calls again as one chain ({pending} not finished yet)")
    return 0


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
    command = _status if args.command == "status" else _resend
    return command(args, store, tenant_of(args.api_key))


if __name__ == "__main__":
    sys.exit(main())
