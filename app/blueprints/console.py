"""The console: a web page (`/console`) that lists the caller's sessions, training runs,
checkpoints and samplers and draws each run's loss and metrics per step, refreshing while
it trains. The page itself holds no data; it asks for it with the caller's API key (typed
into the page, kept in the browser's session storage) from two JSON routes behind the same
keys as every other call:

    GET /api/v1/console/overview                the caller's records, newest first
    GET /api/v1/console/runs/<run_id>/metrics   the run's metrics, one point per step

A step ends at an optim_step: the forward_backward calls before it are one step (metrics
named `...:sum` add up over them, the others average), and the optim_step's own metrics
(grad_norm ...) join that step. Charts are Plotly's (the `plotly` package's own bundle,
served from this API: the page needs no network beyond it).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, send_file
from sqlalchemy import select
from tinker.proto.response_conv import deserialize_forward_backward_output

from app.blueprints.common import owned, services, tenant
from store.schema import DONE, CheckpointRow, ModelRow, RequestRow, SamplerRow, SessionRow

bp = Blueprint("console", __name__)
PAGE = Path(__file__).resolve().parents[1] / "console"
LIMIT = 200  # records of each kind listed
MAX_CALLS = 20000  # a run's newest calls read for its curves


@bp.get("/console")
def page() -> Response:
    return send_file(PAGE / "console.html", mimetype="text/html", max_age=0)


@bp.get("/console/console.js")
def script() -> Response:
    return send_file(PAGE / "console.js", mimetype="text/javascript", max_age=0)


@bp.get("/console/plotly.min.js")
def plotly() -> Response:
    import plotly as package

    bundle = Path(package.__file__).parent / "package_data" / "plotly.min.js"
    return send_file(bundle, mimetype="text/javascript", max_age=86400)


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat() + "Z"


@bp.get("/api/v1/console/overview")
def overview() -> dict[str, Any]:
    me = tenant()
    with services().store.transaction() as s:
        def newest(row: Any) -> Any:
            return s.scalars(select(row).where(row.tenant == me)
                             .order_by(row.created_at.desc()).limit(LIMIT))

        sessions = [{"id": r.id, "created": _iso(r.created_at), "tags": r.tags,
                     "finished": _iso(r.finished_at), "last_heartbeat": _iso(r.last_heartbeat)}
                    for r in newest(SessionRow)]
        runs = [{"id": r.id, "base_model": r.base_model, "rank": r.lora_rank,
                 "session": r.session_id, "created": _iso(r.created_at),
                 "last_call": _iso(r.last_request_time)} for r in newest(ModelRow)]
        checkpoints = [{"path": r.tinker_path, "kind": r.kind, "run": r.model_id,
                        "bytes": r.size_bytes, "created": _iso(r.created_at),
                        "expires": _iso(r.expires_at)} for r in newest(CheckpointRow)]
        samplers = [{"id": r.id, "base_model": r.base_model, "model_path": r.model_path,
                     "created": _iso(r.created_at)} for r in newest(SamplerRow)]
    return {"sessions": sessions, "training_runs": runs, "checkpoints": checkpoints,
            "samplers": samplers}


@bp.get("/api/v1/console/runs/<path:run_id>/metrics")
def run_metrics(run_id: str) -> dict[str, Any]:
    with services().store.transaction() as s:
        run = owned(s, ModelRow, run_id, "training run")
        rows = s.execute(
            select(RequestRow.kind, RequestRow.seq_id, RequestRow.result,
                   RequestRow.result_type, RequestRow.finished_at)
            .where(RequestRow.model_id == run.id, RequestRow.state == DONE,
                   RequestRow.kind.in_(("forward_backward", "optim_step")))
            .order_by(RequestRow.seq_id.desc()).limit(MAX_CALLS)).all()
    steps = per_step(sorted(rows, key=lambda r: r.seq_id))
    return {"run": run.id, "steps": [step for step, _ in steps],
            "metrics": _series(steps)}


def per_step(rows: list[Any]) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) for every step with a metric: a step's forward_backward calls and the
    optim_step that ends it."""
    out: list[tuple[int, dict[str, float]]] = []
    step = 1
    sums: defaultdict[str, float] = defaultdict(float)
    counts: defaultdict[str, int] = defaultdict(int)
    for row in rows:
        found = _metrics(row)
        for name, value in found.items():
            sums[name] += value
            counts[name] += 1
        if row.kind == "optim_step":
            if sums:
                out.append((step, {k: v if k.endswith(":sum") else v / counts[k]
                                   for k, v in sums.items()}))
            step, sums, counts = step + 1, defaultdict(float), defaultdict(int)
    if sums:  # the step in progress
        out.append((step, {k: v if k.endswith(":sum") else v / counts[k]
                           for k, v in sums.items()}))
    return out


def _metrics(row: Any) -> dict[str, float]:
    if row.result is None:
        return {}
    if row.result_type == "proto":
        found = deserialize_forward_backward_output(row.result).metrics
    else:
        found = json.loads(row.result).get("metrics") or {}
    return {str(k): float(v) for k, v in found.items() if isinstance(v, int | float)}


def _series(steps: list[tuple[int, dict[str, float]]]) -> dict[str, dict[str, list]]:
    """Each metric's points: {name: {"x": steps, "y": values}}."""
    series: dict[str, dict[str, list]] = {}
    for step, values in steps:
        for name, value in values.items():
            point = series.setdefault(name, {"x": [], "y": []})
            point["x"].append(step)
            point["y"].append(value)
    return dict(sorted(series.items(), key=lambda item: (not item[0].startswith("loss"),
                                                         item[0])))
