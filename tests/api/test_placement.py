"""Many workers and base models behind one API (store/workers.py, tasks/placement.py): the
registry's live workers are what get_server_capabilities lists, a new run goes to the live
worker of its base model with the fewest runs, a sampling session to the one with the
fewest unanswered samples, each base model's own vocabulary checks its calls, and a live
worker takes over a silent queue of its base model (runs, samplers, pending calls)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from sqlalchemy import update

from store import workers
from store.schema import PENDING, ModelRow, RequestRow, SamplerRow, WorkerRow, utcnow
from tasks.housekeeping import _Watch
from tests.api.conftest import ALIAS, create_model_body, new_session
from tests.api.test_training import PROTO, datum, fwdbwd_body

OTHER = "acme/other-base"


def register(services, queue: str, base: str, names: str, path: str = "",
             age_s: float = 0.0) -> None:
    with services.store.transaction() as s:
        workers.beat(s, f"{queue}@host:1", queue, "host", 1, base, names=names,
                     model_path=path, gpus=1, runs=0, max_runs=8)
        s.execute(update(WorkerRow).where(WorkerRow.queue == queue).values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=age_s)))


def other_model(tmp_path, vocab: int = 300) -> str:
    folder = tmp_path / "other-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "vocab_size": vocab, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "max_position_embeddings": 512}))
    return str(folder)


def served(api) -> list[str]:
    answer = api.get("get_server_capabilities").get_json()
    return [m["model_name"] for m in answer["supported_models"]]


def test_capabilities_list_the_live_workers_base_models(api, services, settings, tmp_path):
    assert served(api) == settings.served_model_names()  # no worker yet: this process's own
    register(services, "gpu-a", settings.base_model, f"{settings.base_model},{ALIAS}")
    register(services, "gpu-b", OTHER, OTHER, other_model(tmp_path))
    register(services, "gpu-gone", "acme/gone", "acme/gone", age_s=3600)
    assert sorted(served(api)) == sorted([settings.base_model, ALIAS, OTHER])  # not the stale


def test_new_runs_go_to_the_least_loaded_worker_of_their_base_model(api, other, services,
                                                                    settings, session_id,
                                                                    tmp_path):
    register(services, "gpu-a1", settings.base_model, ALIAS)
    register(services, "gpu-b", OTHER, OTHER, other_model(tmp_path))

    theirs = new_session(other)

    def create(seq: int, client=api, session=session_id) -> str:
        body = create_model_body(session, seq=seq)
        model_id = client.ok("create_model", body)["model_id"]
        with services.store.transaction() as s:
            return s.get(ModelRow, model_id).queue

    # another tenant's two runs, on the only worker of the model; its runs count too
    assert [create(0, other, theirs), create(1, other, theirs)] == ["gpu-a1", "gpu-a1"]
    register(services, "gpu-a2", settings.base_model, ALIAS)  # a second one comes up
    # a1 holds 2 runs, a2 none: a2 takes two, then the tie goes to a1 (the queue's name)
    assert [create(2), create(3), create(4)] == ["gpu-a2", "gpu-a2", "gpu-a1"]
    body = create_model_body(session_id, seq=9) | {"base_model": OTHER}
    model_id = api.ok("create_model", body)["model_id"]
    with services.store.transaction() as s:
        assert s.get(ModelRow, model_id).queue == "gpu-b"
    bad = api.post("create_model", create_model_body(session_id, seq=10)
                   | {"base_model": "acme/none"})
    assert bad.status_code == 400 and OTHER in bad.get_json()["detail"]


def test_each_base_models_vocabulary_checks_its_calls(api, services, session_id, tmp_path):
    register(services, "gpu-b", OTHER, OTHER, other_model(tmp_path, vocab=300))
    model_id = api.ok("create_model", create_model_body(session_id) | {
        "base_model": OTHER})["model_id"]
    info = api.ok("get_info", {"model_id": model_id})
    assert info["model_data"]["model_name"] == OTHER

    def fwdbwd(token: int):
        body = fwdbwd_body(model_id, 1 + token, [datum([1, token], [token, 2])])
        return api.post("forward_backward", body, headers=PROTO)

    assert fwdbwd(299).status_code == 200
    refused = fwdbwd(400)  # below this process's own model's 512, above OTHER's 300
    assert refused.status_code == 400 and "300" in refused.get_json()["detail"]


def test_a_sampling_session_goes_to_the_worker_with_the_fewest_waiting_samples(
        api, services, settings, session_id):
    register(services, "gpu-a1", settings.base_model, ALIAS)
    register(services, "gpu-a2", settings.base_model, ALIAS)
    with services.store.transaction() as s:  # a1 has a sample waiting
        s.add(RequestRow(id="req-waiting", tenant="t", kind="sample", queue="gpu-a1",
                         payload=b"", state=PENDING))
    body = {"session_id": session_id, "sampling_session_seq_id": 1, "base_model": ALIAS,
            "type": "create_sampling_session"}
    sampler = api.ok("create_sampling_session", body)["sampling_session_id"]
    with services.store.transaction() as s:
        assert s.get(SamplerRow, sampler).queue == "gpu-a2"


def test_a_live_worker_takes_over_a_silent_queue(api, services, settings, session_id):
    register(services, "gpu-a1", settings.base_model, ALIAS)
    model_id = api.ok("create_model", create_model_body(session_id))["model_id"]
    with services.store.transaction() as s:
        s.add(RequestRow(id="req-late", tenant="t", kind="optim_step", model_id=model_id,
                         seq_id=1, queue="gpu-a1", payload=b"{}", state=PENDING))
    fast = dataclasses.replace(settings, queue="gpu-a2", failover_after_s=30.0)
    sent: list[tuple] = []
    watch = _Watch(services.store, fast, held=set, resend=lambda *a: sent.append(a),
                   queue_depth=lambda: 0)
    watch.beat()
    assert watch.failover() == 0  # a1 is live, and a2's own beats are not steady yet
    watch.steady_since -= 60  # a2 has beaten for a minute
    assert watch.failover() == 0  # a1 still beats
    with services.store.transaction() as s:
        s.execute(update(WorkerRow).where(WorkerRow.queue == "gpu-a1").values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=31)))
    assert watch.failover() == 2  # the creation and the optim_step
    with services.store.transaction() as s:
        assert s.get(ModelRow, model_id).queue == "gpu-a2"
        assert s.get(RequestRow, "req-late").queue == "gpu-a2"
    assert {(a[0], a[3]) for a in sent} >= {("req-late", "gpu-a2")}
    assert watch.failover() == 0  # nothing is left on gpu-a1


def test_a_worker_whose_beats_failed_for_the_failover_time_stops(services, settings):
    fast = dataclasses.replace(settings, failover_after_s=30.0)
    stopped = []
    watch = _Watch(services.store, fast, held=set, resend=lambda *a: None,
                   queue_depth=lambda: 0)
    watch.on_lost = lambda: stopped.append(True)
    watch.beat()
    watch.beaten -= 10  # a usual gap
    watch.beat()
    assert not stopped
    watch.beaten -= 31  # the database was away for longer than failover_after_s
    watch.beat()
    assert stopped
