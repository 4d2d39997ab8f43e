"""Flower over a live stack: every Tinker call is a readable task, and long ticks stay online.

Flower runs from the Procfile's own `flower` line (`Stack.start(..., flower=True)`), with
its default inspect timeout. Flower learns tasks from the worker's events, so the checks
poll its HTTP API until the tasks show up.
"""

from __future__ import annotations

import ast
import contextlib
import re
import socket
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest
import tinker
from flower.options import options as flower_options
from tinker import types

from tests.e2e.stack import API_KEY, Stack, procfile_command
from tests.e2e.test_sdk import BASE, DATA

pytestmark = pytest.mark.e2e
VERBS = ["create_model", "forward_backward", "optim_step", "save_weights_for_sampler", "sample"]
PROMPT = [9707, 11, 1879, 0, 13]  # distinctive ids, to search the task records for
# A tick this long outlasts Flower's inspect timeout (1 s) and also the 4 s after which
# Flower calls a worker offline when its heartbeats (every 2 s) stop.
LONG_TICK_S = 5.0


def inspect_timeout_s() -> float:
    """Flower's `--inspect_timeout` (milliseconds) as the Procfile runs it, in seconds."""
    found = re.search(r"--inspect[_-]timeout[= ]([\d.]+)", procfile_command("flower"))
    return float(found.group(1) if found else flower_options.inspect_timeout) / 1000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("stack-flower"), "sqlite", flower=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def flower(stack):
    with httpx.Client(base_url=stack.flower_url, timeout=30) as client:  # no credentials
        yield client


@pytest.fixture(scope="module")
def service(stack):
    return tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)


def finished_tasks(flower: httpx.Client, summaries: list[str],
                   timeout: float = 30.0) -> dict[str, dict]:
    """Flower's finished tasks by summary, once one has each of `summaries` as a substring."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = flower.get("/api/tasks").json()
        done = {summary_of(t): t for t in tasks.values() if t["state"] in ("SUCCESS", "FAILURE")}
        found = {want: [t for s, t in done.items() if want in s + " "] for want in summaries}
        if all(len(ts) == 1 for ts in found.values()):
            return {want: ts[0] for want, ts in found.items()}
        if time.monotonic() > deadline:
            raise AssertionError(f"Flower's finished tasks after {timeout} s: {list(done)}")
        time.sleep(0.2)


def online_worker(flower: httpx.Client, timeout: float = 30.0) -> str:
    """The one worker Flower knows, once its heartbeats say it is online."""
    deadline = time.monotonic() + timeout
    while True:
        workers = flower.get("/api/workers", params={"status": 1}).json()
        if list(workers.values()) == [True]:
            return next(iter(workers))
        if time.monotonic() > deadline:
            raise AssertionError(f"Flower's workers after {timeout} s: {workers}")
        time.sleep(0.2)


def summary_of(record: dict) -> str:
    """The task's kwargs as Flower shows them (a repr), which must be just the summary."""
    kwargs = ast.literal_eval(record["kwargs"])
    assert set(kwargs) == {"summary"}, record
    return kwargs["summary"]


def test_procfile_runs_flower_on_loopback_without_auth(stack, flower):
    command = procfile_command("flower")
    assert "celery -A tasks flower" in command and "--address=127.0.0.1" in command
    assert flower.get("/api/workers").status_code == 200  # the API answers without auth
    port = int(stack.env["FLOWER_PORT"])
    with pytest.raises(ConnectionRefusedError):  # bound to 127.0.0.1 only, not 0.0.0.0
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_the_api_listens_on_loopback_by_default(stack):
    """Any tml- key is accepted: the web answers this machine only unless TINKERQ_HOST says
    otherwise (the stack, like the Procfile, leaves it unset)."""
    assert "TINKERQ_HOST" not in stack.env
    port = int(stack.env["TINKERQ_PORT"])
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_the_http_servers_own_errors_answer_json(stack):
    """gunicorn answers an over-long URL (414) or header (431) itself, and Flask a JSON body
    over its limit (413): each in the API's JSON shape, never HTML, which the SDK misreads
    as a proxy's answer."""
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        cases = [
            http.get("/api/v1/training_runs/" + "r" * 10_000, headers=headers),
            http.get("/api/v1/healthz", headers=headers | {"X-Big": "h" * 10_000}),
            http.post("/api/v1/create_session", headers=headers | {
                "Content-Type": "application/json"}, content=b" " * (17 << 20) + b"{}"),
        ]
    for resp, status in zip(cases, (414, 431, 413), strict=True):
        assert resp.status_code == status, (resp.status_code, resp.text[:200])
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["detail"]


def test_every_call_is_a_task_with_a_short_summary(service, stack, flower):
    tc = service.create_lora_training_client(BASE, rank=4, seed=7).result()
    tc.forward_backward(DATA, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    sampler.sample(types.ModelInput.from_ints(PROMPT), 2,
                   types.SamplingParams(max_tokens=3, stop=[])).result()

    session = tc.model_id.split(":")[0]
    found = finished_tasks(flower, [f"{v} model={tc.model_id} " for v in VERBS[:-1]]
                           + [f"sample sampler={session}:"])
    mine = {record["name"]: record for record in found.values()}
    assert sorted(mine) == sorted(f"tinker.{v}" for v in VERBS), found
    worker = online_worker(flower)

    for name, listed in mine.items():
        record = flower.get(f"/api/task/info/{listed['uuid']}").json()
        assert record["name"] == name and record["state"] == "SUCCESS", record
        assert record["runtime"] > 0 and record["worker"] == worker, record
        assert record["worker"].startswith(stack.env["TINKERQ_QUEUE"] + "@")
        (request_id,) = ast.literal_eval(record["args"])
        assert request_id.startswith("req-"), record
        summary = summary_of(record)
        assert summary.startswith(name.removeprefix("tinker.") + " "), summary
        # Never the payload: no token ids, no datum contents, one short line.
        assert len(record["args"]) + len(record["kwargs"]) < 300, record
        assert "\n" not in summary and "[" not in summary, summary
        assert not {"9707", "1879", "1096", "target_tokens", "weights"} & set(
            re.split(r"[\s=,:']+", record["args"] + record["kwargs"])), record

    def field(verb: str, key: str) -> str:
        found = re.search(rf"\b{key}=(\S+)", summary_of(mine[f"tinker.{verb}"]))
        assert found, (verb, key, summary_of(mine[f"tinker.{verb}"]))
        return found.group(1)

    for verb in VERBS[:-1]:
        assert field(verb, "model") == tc.model_id
    assert field("create_model", "base") == BASE and field("create_model", "rank") == "4"
    seqs = [int(field(v, "seq")) for v in ("forward_backward", "optim_step",
                                           "save_weights_for_sampler")]
    assert seqs == sorted(set(seqs)) and seqs[0] >= 1, seqs  # the model's own order
    assert field("forward_backward", "datums") == str(len(DATA))
    assert field("forward_backward", "tokens") == str(sum(d.model_input.length for d in DATA))
    assert field("forward_backward", "loss") == "cross_entropy"
    assert field("sample", "seq") == "0" and field("sample", "n") == "2"
    assert field("sample", "prompt") == str(len(PROMPT))
    assert field("sample", "max_tokens") == "3"


def long_datum(n: int) -> types.Datum:
    tokens = np.random.default_rng(n).integers(100, 150_000, n + 1)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                       loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                                       "weights": np.ones(n, dtype=np.float32)})


def refresh_while(flower: httpx.Client, worker: str, running: threading.Event,
                  probes: list[dict]) -> None:
    """Flower's inspect of `worker` (`/api/workers?refresh=1`) over and over while
    `running` is set, into `probes`: when each was sent, how long it took, whether the
    worker answered it, what it reported active, and whether Flower showed it online
    (that comes from the worker's heartbeats)."""
    while running.is_set():
        sent = time.time()
        info = flower.get("/api/workers", params={"refresh": 1, "workername": worker}).json()
        took = time.time() - sent
        alive = flower.get("/api/workers", params={"status": 1}).json()
        entry = info.get(worker, {})
        probes.append({
            "sent": sent, "took": took, "online": alive.get(worker),
            "answered": entry.get("timestamp", 0) >= sent,
            "active": [t["name"] for t in entry.get("active", [])],
        })
        time.sleep(0.1)


def test_worker_answers_inspect_during_a_long_tick(service, stack, flower):
    """One forward_backward over thousands of tokens: the tiny model's 151,936-token LM head
    makes its tick take seconds on CPU. Flower inspects the worker throughout."""
    timeout = inspect_timeout_s()
    worker = online_worker(flower)
    tc = service.create_lora_training_client(BASE, rank=4).result()
    tokens, seq = 512, 1
    for _ in range(4):  # grow the datum until one tick is long enough on this machine
        running = threading.Event()
        running.set()
        probes: list[dict] = []
        prober = threading.Thread(target=refresh_while, args=(flower, worker, running, probes))
        prober.start()
        try:
            tc.forward_backward([long_datum(tokens)], "cross_entropy").result()
        finally:
            running.clear()
            prober.join()
        (record,) = finished_tasks(flower, [f"forward_backward model={tc.model_id} seq={seq}"]
                                   ).values()
        seq += 1
        tick = compute_seconds(stack, record)
        if tick >= LONG_TICK_S:
            break
        tokens = min(8000, int(tokens * min(4.0, 1.5 * LONG_TICK_S / tick)))  # max_seq_len 8192
    assert tick >= LONG_TICK_S > timeout, (tokens, tick)
    # Inspects that surely fell inside the tick: it ended between started + tick and succeeded.
    inside = [p for p in probes if record["succeeded"] - tick < p["sent"]
              and p["sent"] + p["took"] < record["started"] + tick]
    assert len(inside) >= 2, (record, tick, probes)
    # Every inspect during the tick was answered, well within Flower's timeout, with the
    # running call listed as active, and the worker stayed online.
    assert all(p["answered"] and p["online"] for p in inside), probes
    assert all(p["took"] < timeout for p in inside), probes
    assert any("tinker.forward_backward" in p["active"] for p in inside), probes
    print(f"\ntick of {tokens} tokens: {tick:.2f} s (task runtime {record['runtime']:.2f} s, "
          f"inspect timeout {timeout:.1f} s); {len(inside)} inspects during it, slowest answer "
          f"{max(p['took'] for p in inside):.3f} s")


def compute_seconds(stack: Stack, record: dict) -> float:
    """The engine's own time for the task's call (its training pass), from its request row."""
    (request_id,) = ast.literal_eval(record["args"])
    with contextlib.closing(sqlite3.connect(stack.data_dir / "tinkerq.db")) as db:
        (seconds,) = db.execute("SELECT compute_seconds FROM requests WHERE id = ?",
                                (request_id,)).fetchone()
    return seconds
