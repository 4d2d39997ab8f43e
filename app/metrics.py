"""The API's Prometheus metrics at `/metrics` (prometheus_client): requests by route,
method and status, their latency, long-polls parked on the doorbell, and the calls waiting
for a worker (read from the database at each scrape, so every API process agrees).

Under gunicorn with several worker processes each process counts its own requests into
files under PROMETHEUS_MULTIPROC_DIR (app/gunicorn_conf.py makes the folder and marks the
files of a process that exits), and a scrape of any process sums them all. Without the
variable (one process, the tests) the process's own registry answers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from store.db import UNAVAILABLE, Store
from store.schema import PENDING, RequestRow

REQUESTS = Counter("tinkerq_http_requests_total", "HTTP requests answered, by route (the URL "
                   "rule, not the URL), method and status.", ["route", "method", "status"])
LATENCY = Histogram("tinkerq_http_request_seconds", "Time to answer an HTTP request, by route "
                    "and method (a long-poll counts the time it waited).", ["route", "method"],
                    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60))
# set by app/gunicorn_conf.py before the workers import prometheus_client
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
PARKED = Gauge("tinkerq_long_polls_parked", "retrieve_future / retrieve_futures / OpenAI calls "
               "waiting on the doorbell now.", multiprocess_mode="livesum")


class _Pending:
    """The calls accepted and not yet answered, by kind and queue: one query per scrape."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tinkerq_futures_pending", "Calls accepted and not yet "
                                   "answered (request rows pending), by kind and queue.",
                                   labels=["kind", "queue"])
        try:
            with self.store.transaction() as s:
                rows = s.execute(select(RequestRow.kind, RequestRow.queue, func.count())
                                 .where(RequestRow.state == PENDING)
                                 .group_by(RequestRow.kind, RequestRow.queue)).all()
        except UNAVAILABLE:
            return  # the database is away: no figure rather than a wrong one
        for kind, queue, count in rows:
            family.add_metric([kind, queue or ""], count)
        yield family


@contextlib.contextmanager
def parked() -> Iterator[None]:
    PARKED.inc()
    try:
        yield
    finally:
        PARKED.dec()


def _start() -> None:
    g.metrics_started = time.perf_counter()


def _finish(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        LATENCY.labels(route, request.method).observe(time.perf_counter() - started)
        REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    return response


def init_app(app: Flask, store: Store) -> None:
    app.before_request(_start)
    app.after_request(_finish)
    pending = _Pending(store)

    @app.get("/metrics")
    def metrics() -> Response:
        registry = REGISTRY
        if MULTIPROCESS:  # every gunicorn process's files
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        database = CollectorRegistry(auto_describe=False)
        database.register(pending)
        return Response(generate_latest(registry) + generate_latest(database),
                        mimetype=CONTENT_TYPE_LATEST)
