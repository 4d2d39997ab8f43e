"""The API's /metrics: Prometheus text that prometheus_client's own parser reads, with the
requests counted by route (the URL rule), method and status, and the calls pending."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import create_model_body


def scrape(app) -> dict[str, list]:
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 200
    assert resp.mimetype == "text/plain"
    return {f.name: f.samples for f in text_string_to_metric_families(resp.get_data(True))}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_requests_are_counted_by_route_and_status(app, api, session_id):
    before = scrape(app)
    api.ok("create_model", create_model_body(session_id))
    assert api.get("training_runs/not-a-run").status_code == 404
    after = scrape(app)
    counts = after["tinkerq_http_requests"]

    def grew(route: str, status: str) -> float:
        return (value(counts, "tinkerq_http_requests_total", route=route, status=status)
                - value(before.get("tinkerq_http_requests", []),
                        "tinkerq_http_requests_total", route=route, status=status))

    assert grew("/api/v1/create_model", "200") == 1
    assert grew("/api/v1/training_runs/<run_id>", "404") == 1
    latency = after["tinkerq_http_request_seconds"]
    assert value(latency, "tinkerq_http_request_seconds_count", route="/api/v1/create_model") >= 1


def test_pending_calls_are_read_from_the_database(app, api, session_id, settings):
    api.ok("create_model", create_model_body(session_id))
    api.ok("create_model", create_model_body(session_id, seq=1))
    pending = scrape(app)["tinkerq_futures_pending"]
    assert value(pending, "tinkerq_futures_pending", kind="create_model",
                 queue=settings.queue) == 2


def test_an_unknown_route_counts_as_unmatched(app, api):
    assert api.get("nowhere").status_code == 404
    counts = scrape(app)["tinkerq_http_requests"]
    assert value(counts, "tinkerq_http_requests_total", route="unmatched", status="404") >= 1
