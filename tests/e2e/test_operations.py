"""What an operator sees of a live stack (JSON logs): Prometheus metrics of the API and the
worker, read with prometheus_client's parser; the readiness check; and one call followed by
its request_id from the API's access line through the worker's task to the tick that ran
it."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.stack import API_KEY, Stack
from tests.e2e.test_sdk import ADAM, BASE, DATA

pytestmark = pytest.mark.e2e
STEPS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-ops"), "sqlite", log_format="json")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def trained(stack):
    """A run trained STEPS steps through the SDK."""
    service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
    tc = service.create_lora_training_client(BASE, rank=4, seed=1).result()
    for _ in range(STEPS):
        fb = tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(ADAM).result()
        fb.result()
    return tc


def samples(url: str) -> list:
    text = httpx.get(url, timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list, name: str, **labels: str) -> float:
    return sum(s.value for s in found
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def json_lines(stack: Stack, process: str) -> list[dict]:
    lines = []
    for line in (stack.data_dir / f"{process}.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_metrics_of_the_api_and_the_worker(stack, trained):
    api = samples(f"{stack.url}/metrics")
    assert value(api, "tinkerq_http_requests_total", route="/api/v1/forward_backward",
                 method="POST", status="200") == STEPS
    assert value(api, "tinkerq_http_request_seconds_count",
                 route="/api/v1/retrieve_future") >= STEPS
    worker = samples(stack.metrics_url)
    tokens = sum(len(d.model_input.to_ints()) for d in DATA)
    assert value(worker, "tinkerq_tokens_total", kind="train") == STEPS * tokens
    assert value(worker, "tinkerq_tick_seconds_count", phase="train") >= STEPS
    assert value(worker, "tinkerq_tick_calls_count", kind="optim_step") >= STEPS
    assert value(worker, "tinkerq_adapters", state="resident") == 1
    assert value(worker, "tinkerq_train_tokens_per_second") > 0


def test_ready_once_the_worker_beats(stack, trained):
    deadline = time.monotonic() + 30
    while (resp := httpx.get(f"{stack.url}/readyz", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, resp.json()
        time.sleep(0.5)
    assert resp.json()["checks"]["workers"] == {BASE: "live"}
    assert httpx.get(f"{stack.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_a_call_is_followed_by_its_request_id(stack, trained):
    access = [r for r in json_lines(stack, "web") if r.get("logger") == "tinkerq.access"]
    submitted = [r for r in access if r["route"] == "/api/v1/forward_backward"]
    assert len(submitted) == STEPS and all(r["status"] == 200 for r in submitted)
    call = submitted[-1]["request_id"]
    assert call and submitted[-1]["http_request_id"] and submitted[-1]["duration_ms"] > 0
    assert any(r["route"] == "/api/v1/retrieve_future" for r in access
               if r["request_id"] == call)
    worker = json_lines(stack, "worker")
    assert any(r.get("request_id") == call and r["role"] == "worker" for r in worker)
    ticks = [r for r in worker if call in (r.get("request_ids") or [])]
    assert len(ticks) == 1 and "train" in ticks[0]["phases"]
