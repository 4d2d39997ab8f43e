"""The console's data routes: the caller's own records, and a run's metrics per step (the
forward_backward calls up to an optim_step are one step: `:sum` metrics add up, the others
average; the optim_step's own metrics join it). The page itself is tested in a real browser
(tests/e2e/test_console.py)."""

from __future__ import annotations

import json

from protocol.wire import encode_forward_backward_output
from store.schema import DONE, ModelRow, RequestRow, utcnow


def record(services, model_id: str, seq: int, kind: str, metrics: dict[str, float]) -> None:
    if kind == "forward_backward":
        result, result_type = encode_forward_backward_output([], metrics), "proto"
    else:
        result, result_type = json.dumps({"metrics": metrics}).encode(), "json"
    tenant = _tenant(services, model_id)
    with services.store.transaction() as s:
        s.add(RequestRow(id=f"req-{seq}", tenant=tenant, kind=kind, model_id=model_id,
                         seq_id=seq, queue="gpu-0", payload=b"{}", state=DONE,
                         result=result, result_type=result_type, finished_at=utcnow()))


def _tenant(services, model_id: str) -> str:
    with services.store.transaction() as s:
        return s.get(ModelRow, model_id).tenant


def test_a_runs_metrics_come_per_step(api, services, model_id):
    record(services, model_id, 1, "forward_backward", {"loss:sum": 4.0, "acc:mean": 0.5})
    record(services, model_id, 2, "forward_backward", {"loss:sum": 2.0, "acc:mean": 0.7})
    record(services, model_id, 3, "optim_step", {"grad_norm:mean": 1.5})
    record(services, model_id, 4, "forward_backward", {"loss:sum": 3.0, "acc:mean": 0.9})
    record(services, model_id, 5, "optim_step", {"grad_norm:mean": 0.5})
    record(services, model_id, 6, "forward_backward", {"loss:sum": 1.0, "acc:mean": 1.0})
    resp = api.get(f"console/runs/{model_id}/metrics")
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["steps"] == [1, 2, 3]  # the third is still open: no optim_step yet
    assert list(body["metrics"])[0] == "loss:sum"
    assert body["metrics"]["loss:sum"] == {"x": [1, 2, 3], "y": [6.0, 3.0, 1.0]}
    assert body["metrics"]["acc:mean"]["y"] == [0.6, 0.9, 1.0]
    assert body["metrics"]["grad_norm:mean"] == {"x": [1, 2], "y": [1.5, 0.5]}


def test_the_console_shows_only_the_callers_records(api, other, model_id):
    mine = api.get("console/overview").get_json()
    assert [r["id"] for r in mine["training_runs"]] == [model_id]
    assert len(mine["sessions"]) == 1
    theirs = other.get("console/overview").get_json()
    assert theirs["training_runs"] == [] and theirs["sessions"] == []
    assert other.get(f"console/runs/{model_id}/metrics").status_code == 404
    assert api.client.get("/api/v1/console/overview").status_code == 401  # no key


def test_the_page_and_its_chart_library_are_served(app):
    client = app.test_client()
    page = client.get("/console")
    assert page.status_code == 200 and b"/console/plotly.min.js" in page.data
    assert client.get("/console/console.js").status_code == 200
    bundle = client.get("/console/plotly.min.js")
    assert bundle.status_code == 200 and b"plotly" in bundle.data[:2000].lower()
