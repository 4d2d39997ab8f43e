"""/healthz and /readyz: open (no key), and /readyz names what keeps the service from
serving: the database, Redis, or a base model with no live worker."""

from __future__ import annotations

import dataclasses

from sqlalchemy.orm import sessionmaker

from app.factory import create_app
from store import workers
from store.engine import make_engine


def beat(services, worker_id: str, base_model: str) -> None:
    with services.store.transaction() as s:
        workers.beat(s, worker_id, "gpu-0", "host", 1, base_model)


def test_healthz_answers_without_a_key(app):
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/api/v1/healthz").status_code == 200  # the SDK's own route stays


def test_readyz_wants_a_live_worker_for_the_served_model(app, services, settings):
    client = app.test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["checks"]["database"] == "ok" and body["checks"]["redis"] == "ok"
    assert body["checks"]["workers"] == {settings.base_model: "no live worker"}
    assert body["detail"] == "not ready: workers"

    beat(services, "gpu-0@host:1", settings.base_model)
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["checks"]["workers"] == {settings.base_model: "live"}


def test_readyz_counts_every_registered_base_model(app, services, settings):
    beat(services, "gpu-0@host:1", settings.base_model)
    beat(services, "gpu-1@host:2", "other/model")
    with services.store.transaction() as s:  # the second worker went silent long ago
        s.execute(workers.WorkerRow.__table__.update()
                  .where(workers.WorkerRow.id == "gpu-1@host:2")
                  .values(heartbeat_at=workers.utcnow() - workers.dt.timedelta(hours=1)))
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["workers"] == {settings.base_model: "live",
                                                    "other/model": "no live worker"}


def test_readyz_names_redis_when_it_does_not_answer(settings, enqueued):
    app = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0"),
                     enqueue=enqueued.append)
    try:
        resp = app.test_client().get("/readyz")
        assert resp.status_code == 503
        body = resp.get_json()
        assert body["checks"]["redis"].startswith("unavailable: ")
        assert "redis" in body["detail"]
    finally:
        app.extensions["tinkerq"].doorbell.close()


def test_readyz_names_the_database_when_it_does_not_answer(app, services):
    services.store.engine = make_engine("postgresql://postgres@127.0.0.1:9/nowhere")
    services.store.sessions = sessionmaker(services.store.engine, expire_on_commit=False)
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["checks"]["database"].startswith("unavailable: ")
    assert body["checks"]["workers"].startswith("unknown")
    assert app.test_client().get("/healthz").status_code == 200
