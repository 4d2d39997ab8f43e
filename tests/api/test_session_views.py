"""sessions/search, PUT sessions/<id>/project, sessions/<id>/trace_export."""

from __future__ import annotations

import datetime as dt
import json
from urllib.parse import urlsplit

from sqlalchemy import update
from tinker import types

from store.schema import RequestRow, SessionRow, utcnow
from tests.api.conftest import Api, create_model_body


def new_session(api, name: str | None = None, **metadata: str) -> str:
    body = {"tags": [], "user_metadata": metadata, "sdk_version": "0.38.0"}
    if name:
        body["display_name"] = name
    return api.ok("create_session", body)["session_id"]


def search(api, **request) -> types.SessionSearchResponse:
    return types.SessionSearchResponse.model_validate(api.ok("sessions/search", request))


def test_search_filters_and_pages_newest_first(api, other, services):
    ids = [new_session(api, f"nightly run {i}", team="rl" if i % 2 else "sl") for i in range(5)]
    new_session(other, "nightly run of someone else")
    everything = search(api)
    assert [s.session_id for s in everything.sessions] == ids[::-1]
    assert everything.next_cursor is None
    assert all(s.status.type == "active" for s in everything.sessions)
    first = search(api, limit=2)
    second = search(api, limit=2, cursor=first.next_cursor.model_dump(mode="json"))
    third = search(api, limit=2, cursor=second.next_cursor.model_dump(mode="json"))
    paged = [s.session_id for page in (first, second, third) for s in page.sessions]
    assert paged == ids[::-1] and third.next_cursor is None
    assert [s.session_id for s in search(api, display_name="RUN 3 nightly").sessions] == [ids[3]]
    assert {s.session_id for s in search(api, user_metadata={"team": "rl"}).sessions} == \
        {ids[1], ids[3]}
    either = search(api, session_id=ids[0], display_name="run 4")
    assert {s.session_id for s in either.sessions} == {ids[0], ids[4]}
    api.post(f"sessions/{ids[2]}/finish", {"reason": {"type": "errored"}})
    with services.store.transaction() as s:  # a session silent for an hour is not active
        s.execute(update(SessionRow).where(SessionRow.id == ids[4])
                  .values(last_heartbeat=utcnow() - dt.timedelta(hours=1)))
    errored = search(api, statuses=[{"type": "client_finished", "reasons": ["errored"]}])
    assert [s.session_id for s in errored.sessions] == [ids[2]]
    assert search(api, statuses=[{"type": "client_finished", "reasons": ["success"]}]) \
        .sessions == []
    active = search(api, statuses=[{"type": "active"}])
    assert [s.session_id for s in active.sessions] == [ids[3], ids[1], ids[0]]
    mine = search(api, owner={"type": "user", "owner_urns": [everything.sessions[0].owner]})
    assert len(mine.sessions) == 5
    assert search(api, owner={"type": "user", "owner_urns": ["tml:user:x"]}).sessions == []


def test_project_moves_and_filters(api, other):
    sid = new_session(api)
    resp = api.client.put(f"/api/v1/sessions/{sid}/project", json={"project_id": "proj-a"},
                          headers={"X-API-Key": api.key})
    assert resp.status_code == 200
    [found] = search(api, project_ids=["proj-a"]).sessions
    assert (found.session_id, found.project_id) == (sid, "proj-a")
    assert search(api, project_ids=["proj-b"]).sessions == []
    resp = other.client.put(f"/api/v1/sessions/{sid}/project", json={"project_id": "x"},
                            headers={"X-API-Key": other.key})
    assert resp.status_code == 404
    resp = api.client.put(f"/api/v1/sessions/{sid}/project", json={},
                          headers={"X-API-Key": api.key})
    assert resp.status_code == 400 and "project_id" in resp.get_json()["detail"]


def test_checkpoint_counts_in_summaries(api, add_checkpoint):
    sid = new_session(api)
    run = api.ok("create_model", create_model_body(sid))["model_id"]
    add_checkpoint(run, "training", "a")
    add_checkpoint(run, "sampler", "b")
    [found] = search(api, session_id=sid).sessions
    assert (found.checkpoints_count, found.checkpoint_storage_bytes) == (2, 20)


def test_trace_export_is_a_timeline_of_the_session_s_calls(api, other, app, services, finish):
    sid = new_session(api)
    run = api.ok("create_model", create_model_body(sid))["model_id"]
    adam = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    rid = api.ok("optim_step", {"model_id": run, "seq_id": 1, "adam_params": adam})["request_id"]
    finish(rid, {"metrics": {}})
    with services.store.transaction() as s:
        s.execute(update(RequestRow).where(RequestRow.id == rid).values(compute_seconds=0.25))
    answer = api.get(f"sessions/{sid}/trace_export").get_json()
    assert answer["status"] == "ready"
    anonymous = Api(app.test_client(), key=None)
    resp = anonymous.client.get(urlsplit(answer["url"]).path)
    assert resp.status_code == 200 and sid in resp.headers["Content-Disposition"]
    events = json.loads(resp.data)["traceEvents"]
    [track] = [e for e in events if e["ph"] == "M"]
    assert track["args"]["name"] == run
    slices = {e["name"]: e for e in events if e["ph"] == "X"}
    assert set(slices) == {"create_model", "optim_step", "optim_step (compute)"}
    assert slices["optim_step (compute)"]["dur"] == 250000
    assert slices["optim_step"]["args"]["request_id"] == rid
    assert other.get(f"sessions/{sid}/trace_export").status_code == 404
    forged = urlsplit(answer["url"]).path.replace("/traces/", "/traces/x")
    assert anonymous.client.get(forged).status_code == 403
