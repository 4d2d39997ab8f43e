"""audit, billing/usage/events and billing/usage/checkpoints/current, from the records."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update
from tinker import types

from store.schema import DONE, RequestRow, utcnow
from tests.api.conftest import KEY, new_session


def test_audit_logs_what_was_done_to_checkpoints(api, other, session_id, model_id,
                                                add_checkpoint):
    ckpt = add_checkpoint(model_id, "training", "w")
    publish = f"training_runs/{model_id}/checkpoints/weights/w/publish"
    api.post(publish)
    other_sid = new_session(other)
    other.ok("load_weights", {"session_id": other_sid, "model_seq_id": 0,
                              "path": ckpt.tinker_path, "optimizer": False})
    api.delete(publish)
    api.client.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": "p"},
                   headers={"X-API-Key": KEY})
    api.delete(f"training_runs/{model_id}/checkpoints/weights/w")
    log = types.AuditLogResponse.model_validate(api.get("audit").get_json())
    events = [(e.event, e.event_details.get("purpose")) for e in log.entries]
    assert events == [("checkpoint_publish", None), ("checkpoint_read", "load"),
                      ("checkpoint_unpublish", None), ("project_session_set", None),
                      ("checkpoint_delete", None)]
    reader = log.entries[1].event_details["actor"]
    assert reader != log.entries[0].event_details["actor"]  # the other key read it
    assert log.entries[1].tinker_path == ckpt.tinker_path
    only = api.get("audit?event_type=projects").get_json()["entries"]
    assert [e["event"] for e in only] == ["project_session_set"]
    today = utcnow().date().isoformat()
    assert len(api.get(f"audit?day={today}").get_json()["entries"]) == 5
    assert api.get("audit?day=2001-01-01").get_json()["entries"] == []
    assert other.get("audit").get_json()["entries"] == []  # logged to the owner
    assert api.get("audit?day=yesterday").status_code == 400


def test_usage_events_sum_tokens_per_hour_and_kind(api, session_id, model_id, services,
                                                   enqueued, add_checkpoint):
    sampler = api.ok("create_sampling_session", {"session_id": session_id,
                                                 "sampling_session_seq_id": 0,
                                                 "base_model": "Qwen/Qwen3-8B"})
    body = {"sampling_session_id": sampler["sampling_session_id"], "seq_id": 0,
            "num_samples": 2, "prompt": {"chunks": [{"type": "encoded_text",
                                                     "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 8}}
    api.ok("asample", body)
    hour = utcnow().replace(minute=0, second=0, microsecond=0)
    with services.store.transaction() as s:
        s.execute(update(RequestRow).where(RequestRow.kind == "sample").values(
            state=DONE, finished_at=hour + dt.timedelta(minutes=5), tokens_in=3,
            tokens_cached=3, tokens_out=8))
    add_checkpoint(model_id, "sampler", "s")
    start = hour.isoformat() + "Z"
    end = (hour + dt.timedelta(hours=1)).isoformat() + "Z"
    answer = types.BillingUsageResponse.model_validate(
        api.get(f"billing/usage/events?starting_on={start}&ending_before={end}").get_json())
    kinds = {(e.event_info.type, getattr(e.event_info, "cached", None)):
             getattr(e.event_info, "token_count", getattr(e.event_info, "count", None))
             for e in answer.data}
    assert kinds == {("sampling_sample", None): 8, ("sampling_prefill", False): 3,
                     ("sampling_prefill", True): 3, ("checkpoint", None): 1}
    assert {e.session_id for e in answer.data} == {session_id}
    assert all(e.estimated_cost_usd is None for e in answer.data)
    bad = api.get(f"billing/usage/events?starting_on={start}&ending_before={start}")
    assert bad.status_code == 400
    odd = api.get(f"billing/usage/events?starting_on={hour.isoformat()}T&ending_before={end}")
    assert odd.status_code == 400


def test_checkpoint_storage_now_per_project(api, model_id, add_checkpoint):
    add_checkpoint(model_id, "training", "a")
    add_checkpoint(model_id, "sampler", "b")
    answer = types.CurrentCheckpointStorageUsageResponse.model_validate(
        api.get("billing/usage/checkpoints/current").get_json())
    [group] = answer.data
    assert (group.checkpoint_count, group.size_bytes) == (2, 20)
    none = api.get("billing/usage/checkpoints/current?project_id=elsewhere").get_json()
    assert none["data"] == []
