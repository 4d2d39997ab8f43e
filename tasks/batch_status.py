"""What a batch stored, read back: `python -m tasks.batch status | resend` (tasks/batch.py).

`describe` turns a stored call into plain JSON (state, and the decoded result once
finished); `format_status` prints a batch as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Any

from celery import chain
from sqlalchemy import or_, select
from sqlalchemy.orm import defer
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from store.db import Store
from store.schema import ModelRow, RequestRow, SamplerRow
from tasks.enqueue import signature


def batch_rows(store: Store, tenant: str, batch_id: str) -> list[RequestRow]:
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
        rows = [r for t in targets for r in batch_rows(store, tenant, t)]
    return [describe(r) for r in rows]


def status_command(args: argparse.Namespace, store: Store, tenant: str) -> int:
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


def resend_command(args: argparse.Namespace, store: Store, tenant: str) -> int:
    rows = [r for t in args.targets for r in batch_rows(store, tenant, t)]
    if not rows:
        print(f"no calls of this API key found for {' '.join(args.targets)}")
        return 1
    chain(*[signature(r) for r in rows]).apply_async()
    pending = sum(not r.finished for r in rows)
    print(f"sent {len(rows)} calls again as one chain ({pending} not finished yet)")
    return 0
