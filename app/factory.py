"""The application factory. Run: `gunicorn --config app/gunicorn_conf.py 'app.factory:create_app()'`
(the config's gevent worker, and its check that api_keys=open listens on loopback only).

`create_app()` builds one `Services` bundle per app (settings, store, doorbell, model info,
the submit path with its enqueue), stores it in `app.extensions["tinkerq"]`, migrates the
schema and registers one blueprint per Tinker resource under /api/v1 (and the health
checks at the root).
"""

from __future__ import annotations

from flask import Flask

from app import access, auth, errors, metrics, schemas
from app.blueprints import (
    admin,
    checkpoints,
    client,
    console,
    futures,
    health,
    identity,
    models,
    openai_api,
    runs,
    sampling,
    session_views,
    sessions,
    training,
)
from app.services import Services
from config import Settings, load_settings
from store.db import Store
from store.doorbell import Doorbell
from store.downloads import Signer
from store.model_info import ModelInfo
from store.secret import derived_key, signing_key
from tasks.submit import Retire, Send, Submitter


def create_app(settings: Settings | None = None, enqueue: Send | None = None,
               retire: Retire | None = None) -> Flask:
    """The API; `enqueue` (and `retire`) given, no Celery app is built (tests)."""
    settings = settings or load_settings()
    if enqueue is None:
        from tasks.enqueue import make_enqueuer, make_retirer  # lazy: builds the Celery app

        enqueue, retire = make_enqueuer(settings), make_retirer(settings)
    store = Store(settings.database)
    store.create_schema()
    model = ModelInfo(settings)

    app = Flask("tinkerq", static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["tinkerq"] = Services(
        settings=settings,
        store=store,
        doorbell=Doorbell(settings.redis),
        model=model,
        submit=Submitter(settings, store, model, enqueue, retire=retire),
        signer=Signer(signing_key(settings), settings.download_url_ttl_s, "download",
                      "ask for new URLs (external_weights_urls)"),
        trace_signer=Signer(signing_key(settings), settings.download_url_ttl_s, "trace",
                            "export the trace again"),
        jwt_key=derived_key(signing_key(settings), "jwt"),
    )
    errors.init_app(app)
    metrics.init_app(app, store)
    if settings.access_log:
        access.init_app(app)
    auth.init_app(app)
    for module in (client, sessions, session_views, models, training, sampling, futures, runs,
                   checkpoints, identity, admin):
        app.register_blueprint(module.bp, url_prefix="/api/v1")
    app.register_blueprint(openai_api.bp, url_prefix="/v1")
    app.register_blueprint(health.bp)  # /healthz, /readyz: for supervisors, no key
    app.register_blueprint(console.bp)  # /console, and its data under /api/v1/console
    spec = schemas.openapi(app, auth.needs_key)
    app.add_url_rule("/openapi.json", "openapi", lambda: spec)
    return app
