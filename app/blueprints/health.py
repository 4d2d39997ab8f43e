"""Liveness and readiness, outside /api/v1 and open (no key), for supervisors and load
balancers: `/healthz` says the process answers; `/readyz` says whether a call sent now could
be served: the database answers, Redis answers, and every base model this deployment serves
has a live worker (tasks/placement.readiness). Not ready is a 503 naming what failed."""

from __future__ import annotations

from functools import cache
from typing import Any

import redis
from flask import Blueprint
from sqlalchemy import text

from app.blueprints.common import services
from store.db import UNAVAILABLE
from tasks import placement

bp = Blueprint("health", __name__)
TIMEOUT_S = 2.0


@cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)


@bp.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, Any], int]:
    checks: dict[str, Any] = {}
    try:
        with services().store.transaction() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except UNAVAILABLE as e:
        checks["database"] = f"unavailable: {_first_line(e)}"
    try:
        _redis(services().settings.redis).ping()
        checks["redis"] = "ok"
    except redis.RedisError as e:
        checks["redis"] = f"unavailable: {_first_line(e)}"
    if checks["database"] == "ok":
        checks["workers"] = {name: "live" if live else "no live worker"
                             for name, live in placement.readiness(services().submit).items()}
    else:
        checks["workers"] = "unknown: the registry is in the database"
    failed = [name for name, value in checks.items()
              if value != "ok" and not (isinstance(value, dict)
                                        and all(v == "live" for v in value.values()))]
    if failed:
        return {"status": "unready", "detail": f"not ready: {', '.join(failed)}",
                "checks": checks}, 503
    return {"status": "ready", "checks": checks}, 200


def _first_line(e: Exception) -> str:
    message = str(getattr(e, "orig", None) or e).strip()
    return message.splitlines()[0][:200] if message else type(e).__name__
