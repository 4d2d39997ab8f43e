"""Bootstrap endpoints, auth, JSON errors, sessions."""

from __future__ import annotations

from tinker import types

from store.schema import FAILED, SessionRow
from tests.api.conftest import ALIAS, Api, create_model_body


def test_client_config_dynamic_config_telemetry(api):
    config = types.ClientConfigResponse.model_validate(
        api.ok("client/config", {"sdk_version": "0.38.0"}))
    assert config.sample_use_retrieve_futures and config.sample_join_sampling_session
    assert config.pjwt_auth_enabled and config.custom_loss_server_side
    dynamic = types.ClientDynamicConfigResponse.model_validate(
        api.ok("client/dynamic_config", {"sdk_version": "0.38.0"}))
    assert dynamic.sample_cancel_enabled
    assert api.ok("telemetry", {"events": [], "session_id": "x"}) == {"status": "accepted"}


def test_healthz_needs_no_key(app):
    resp = Api(app.test_client(), key=None).get("healthz")
    assert resp.status_code == 200
    types.HealthResponse.model_validate(resp.get_json())


def test_server_capabilities(api, settings):
    resp = api.get("get_server_capabilities")
    caps = types.GetServerCapabilitiesResponse.model_validate(resp.get_json())
    names = [m.model_name for m in caps.supported_models]
    assert names == [settings.base_model, ALIAS]
    assert caps.supported_models[0].max_context_length == settings.max_seq_len


def test_missing_and_bad_key_are_401_json(app):
    for key in (None, "sk-wrong"):
        resp = Api(app.test_client(), key=key).post("create_session", {})
        assert resp.status_code == 401
        assert resp.is_json and resp.get_json()["detail"]
    bad = Api(app.test_client(), key="sk-wrong").post("create_session", {})
    assert "tml-" in bad.get_json()["detail"]


def test_unknown_route_and_method_answer_json(api):
    resp = api.post("no_such_thing", {})
    assert resp.status_code == 404 and resp.get_json()["detail"]
    resp = api.get("create_session")
    assert resp.status_code == 405 and resp.get_json()["detail"]


def test_malformed_json_is_400_json(api):
    resp = api.post("create_session", b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert "JSON" in resp.get_json()["detail"]
    resp = api.post("create_session", b"[1, 2]", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "object" in resp.get_json()["detail"]


def test_create_session_and_read_it_back(api, other):
    body = {
        "tags": ["a"],
        "user_metadata": {"k": "v", "n": 3},
        "sdk_version": "0.38.0",
        "display_name": "run",
        "type": "create_session",
    }
    answer = types.CreateSessionResponse.model_validate(api.ok("create_session", body))
    sid = answer.session_id
    assert sid.startswith("sess-") and len(sid) == len("sess-") + 12
    info = types.GetSessionResponse.model_validate(api.get(f"sessions/{sid}").get_json())
    assert info.user_metadata == {"k": "v", "n": "3"} and info.display_name == "run"
    listed = types.ListSessionsResponse.model_validate(api.get("sessions").get_json())
    assert listed.sessions == [sid]
    assert other.get(f"sessions/{sid}").status_code == 404
    assert other.get("sessions").get_json() == {"sessions": []}


def test_session_lists_its_models_and_samplers(api, session_id, model_id):
    api.ok(
        "create_sampling_session",
        {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": ALIAS},
    )
    info = api.get(f"sessions/{session_id}").get_json()
    assert info["training_run_ids"] == [model_id]
    assert info["sampler_ids"] == [f"{session_id}:sample:0"]


def test_heartbeat_and_finish(api, other, session_id):
    answer = api.ok("session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"})
    types.SessionHeartbeatResponse.model_validate(answer)
    assert other.post("session_heartbeat", {"session_id": session_id}).status_code == 404
    assert other.post(f"sessions/{session_id}/finish", {}).status_code == 404
    body = {"reason": {"type": "success"}, "detail": "done"}
    assert api.ok(f"sessions/{session_id}/finish", body) == {}
    resp = api.post("session_heartbeat", {"session_id": session_id})
    assert resp.status_code == 410 and resp.get_json()["detail"]


def test_unknown_session_is_404(api):
    resp = api.post("session_heartbeat", {"session_id": "sess-000000000000"})
    assert resp.status_code == 404 and "sess-000000000000" in resp.get_json()["detail"]


def test_a_finished_session_releases_its_runs_and_takes_no_more_calls(
        api, services, session_id, model_id, enqueued):
    """Finishing asks the run's queue to release it (once); after that a call on the run, a
    new run or a new sampler in the session is a 400 naming the session, and the refused
    call still claims its seq_id so that the worker's order skips it."""
    retired: list[tuple[str, list[str]]] = []
    services.submit.retire = lambda queue, ids: retired.append((queue, ids))
    api.ok(f"sessions/{session_id}/finish", {"reason": {"type": "success"}})
    assert retired == [(services.settings.queue, [model_id])]
    api.ok(f"sessions/{session_id}/finish", {"reason": {"type": "errored"}})  # first wins
    with services.store.transaction() as s:
        assert s.get(SessionRow, session_id).finish_reason == "success"
    adam = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    calls = [("optim_step", {"model_id": model_id, "seq_id": 1, "adam_params": adam}),
             ("create_model", create_model_body(session_id, seq=1)),
             ("create_sampling_session", {"session_id": session_id,
                                          "sampling_session_seq_id": 0, "base_model": ALIAS})]
    for route, body in calls:
        resp = api.post(route, body)
        assert resp.status_code == 400, (route, resp.get_json())
        assert session_id in resp.get_json()["detail"] and "finished" in resp.get_json()["detail"]
    assert [row.seq_id for row in enqueued] == [1]  # the refused optim_step, stored failed
    assert enqueued[0].state == FAILED and enqueued[0].kind == "optim_step"


def test_create_session_retried_with_its_idempotency_key_answers_the_same_session(api, other):
    body = {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"}

    def create(client, key=None):
        headers = {"X-Idempotency-Key": key} if key else {}
        resp = client.post("create_session", body, headers=headers)
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()["session_id"]

    first = create(api, "stainless-python-retry-1")
    assert create(api, "stainless-python-retry-1") == first  # the SDK's retry
    assert create(api, "stainless-python-retry-2") != first
    assert create(other, "stainless-python-retry-1") != first  # keys are per tenant
    assert create(api) != create(api)  # no key: every call is a new session
    resp = api.post("create_session", body, headers={"X-Idempotency-Key": "k" * 200})
    assert resp.status_code == 400 and "at most 128" in resp.get_json()["detail"]
