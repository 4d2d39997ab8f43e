"""What an operator sees of a live stack (JSON logs): Prometheus metrics of the API and the
worker, read with prometheus_client's parser; the readiness check; one call followed by its
request_id from the API's access line through the worker's task to the tick that ran it;
the console in a real headless chromium, with its screenshot in test-artifacts/; and the
API spec fuzzed by schemathesis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.stack import API_KEY, Stack
from tests.e2e.test_sdk import ADAM, BASE, DATA

pytestmark = pytest.mark.e2e
STEPS = 3
PENDING = 3  # max_pending_per_tenant: the SDK meets the backpressure (and rides through it)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # the console's screenshot


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-ops"), "sqlite", log_format="json",
                    max_pending_per_tenant=str(PENDING))
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


def chromium():
    """Debian's headless chromium through its chromedriver (apt: chromium chromium-driver;
    .ci/run installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "the console test needs chromium and chromium-driver (apt)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1800"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_console_lists_the_run_and_draws_its_curves(stack, trained):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium()
    try:
        browser.get(f"{stack.url}/console")
        browser.find_element(By.ID, "key").send_keys(API_KEY)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        loss = '.chart[data-metric="loss:sum"]'
        WebDriverWait(browser, 30).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, f'{loss}[data-points="{STEPS}"]'))
        runs = [row.get_attribute("data-run")
                for row in browser.find_elements(By.CSS_SELECTOR, "#training_runs tr.run")]
        assert runs == [trained.model_id]
        # what Plotly drew: one trace of STEPS points, and its SVG line
        points = browser.execute_script(
            f"return document.querySelector('{loss}').data[0].x.length")
        assert points == STEPS
        assert browser.find_elements(By.CSS_SELECTOR, f"{loss} .scatterlayer path.js-line")
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "console.png"))
    finally:
        browser.quit()


def test_the_sdk_rides_through_backpressure(stack, trained):
    """Eight forward calls at once against max_pending_per_tenant=3: the calls past it get
    429 with Retry-After, which the SDK waits out and sends again; every one answers."""
    def refused() -> float:
        return value(samples(f"{stack.url}/metrics"), "tinkerq_http_requests_total",
                     route="/api/v1/forward_backward", status="429")

    before = refused()
    futures = [trained.forward(DATA, "cross_entropy") for _ in range(8)]
    results = [f.result(timeout=120) for f in futures]
    assert [len(r.loss_fn_outputs) for r in results] == [len(DATA)] * 8
    assert refused() > before


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_spec(stack, trained):
    """/openapi.json fuzzed against the live stack (last in this module: it makes sessions
    and refused calls of its own): a bounded number of examples per route, each answer
    checked for a 5xx and against the spec (a 4xx must be the spec's error shape). The
    route that revokes the caller's own key is left out: it would end the run early."""
    st = Path(sys.executable).with_name("st")
    report = ARTIFACTS / "schemathesis.xml"
    proc = subprocess.run(
        [str(st), "run", f"{stack.url}/openapi.json", "-H", f"X-API-Key: {API_KEY}",
         "--checks", "not_a_server_error,response_schema_conformance",
         "--max-examples", "20", "--generation-deterministic", "--request-timeout", "60",
         "--exclude-path", "/api/v1/auth/apikey/me", "--report", "junit",
         "--report-junit-path", str(report), "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks"})
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    # it ran every other route (not a spec it could not read or an empty selection)
    spec = httpx.get(f"{stack.url}/openapi.json", timeout=10).json()
    operations = sum(len(ops) for ops in spec["paths"].values()) - 2  # apikey/me: GET, DELETE
    suites = report.read_text()
    cases = suites.count("<testcase ") - suites.count('name="Stateful tests"')
    assert cases == operations and 'failures="0"' in suites, tail
    assert not httpx.get(f"{stack.url}/healthz", timeout=10).is_error  # still serving
