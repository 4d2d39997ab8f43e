"""The worker's metrics (workers/metrics.py): what the engine's ticks count, what a scrape
reads of its state, and the HTTP server prometheus_client's parser reads."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_engine import create_body, start_engine
from tests.unit.test_executor import fwdbwd_body, job
from workers import metrics

SAMPLE = {"prompt": [5, 6], "num_samples": 2, "max_tokens": 3, "temperature": 0.0,
          "top_k": -1, "top_p": 1.0, "seed": 1, "stop_strings": [], "stop_token_ids": [],
          "stop_at_eos": False, "prompt_logprobs": False, "topk_prompt_logprobs": 0,
          "adapter_dir": None}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ticks_count_phases_calls_and_tokens(tiny_model, tmp_path):
    engine = start_engine(tiny_model, tmp_path)
    train = sample("tinkerq_tokens_total", kind="train")
    sampled = sample("tinkerq_tokens_total", kind="sampled")
    ticks = sample("tinkerq_tick_seconds_count", phase="train")
    assert engine.submit(job("create_model", create_body("a"), "a")).result(10).ok
    assert engine.submit(job("forward_backward", fwdbwd_body("a", 1, [1, 2, 3, 4, 5, 6]),
                             "a", 1)).result(10).ok
    assert engine.submit(job("sample", SAMPLE, rid="s1")).result(30).ok
    assert sample("tinkerq_tokens_total", kind="train") - train == 5  # the model input
    assert sample("tinkerq_tokens_total", kind="sampled") - sampled == 2 * 3
    assert sample("tinkerq_tick_seconds_count", phase="train") > ticks
    assert sample("tinkerq_tick_calls_count", kind="create_model") >= 1
    assert sample("tinkerq_train_tokens_per_second") > 0


def test_a_scrape_reads_the_engine_and_parses(tiny_model, tmp_path):
    engine = start_engine(tiny_model, tmp_path)
    assert engine.submit(job("create_model", create_body("a"), "a")).result(10).ok
    assert engine.submit(job("sample", SAMPLE, rid="s1")).result(30).ok  # the KV cache is made
    assert engine.executor.snapshots.wait_idle(30)  # the creation's snapshot is written
    port = free_port()
    assert metrics.serve("127.0.0.1", port, engine, lambda: 7)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        depth = {s.labels["kind"]: s.value for s in families["tinkerq_queue_depth"].samples}
        assert depth["broker"] == 7
        adapters = {s.labels["state"]: s.value for s in families["tinkerq_adapters"].samples}
        assert adapters["resident"] == 1 and adapters["offloaded"] == 0
        assert "tinkerq_tick_seconds" in families
        kv = {s.labels["state"]: s.value for s in families["tinkerq_kv_cache_tokens"].samples}
        assert kv["capacity"] > 0 and kv["used"] == 0  # the sample finished: all free again
        prompts = {s.labels["source"]: s.value
                   for s in families["tinkerq_sample_prompt_tokens"].samples
                   if s.name.endswith("_total")}
        assert prompts == {"prefilled": 2, "shared": 0}  # SAMPLE's prompt, once
        [share] = families["tinkerq_sample_expected_share"].samples
        assert share.value == engine.executor.sampling.prompts.expect.share
        assert 0 < share.value <= 1
        [duty] = families["tinkerq_snapshot_writer_duty"].samples
        assert 0 < duty.value < 0.5  # the creation's snapshot, a moment of the last minute
        assert metrics.serve("127.0.0.1", port, engine, lambda: 0) is False  # port taken
    finally:
        for collector in list(REGISTRY._collector_to_names):
            if isinstance(collector, metrics.State):
                REGISTRY.unregister(collector)
