"""Control-plane benchmark: what the stack adds around the engine's compute, on the CPU.

Starts a live stack (gunicorn + gevent, Celery GPU worker on the CPU, embedded Redis,
SQLite; or Postgres + Redis with --backend postgres) with the built-in tiny model and
measures, through the official tinker SDK:

1. per-call overhead: SDK submit-to-result latency of a small `forward` call minus the
   worker's compute time for that call (stored per request), median and p99, beside the
   compute time itself;
2. throughput: futures completed per second with 200 concurrent clients (one-token
   samples on the base model), beside the same calls made one at a time.

    python -m benchmarks.control_plane [--calls 200] [--clients 200] [--backend sqlite]
                                       [--before REV]

With --before, the same measures are taken first on a stack of commit REV (a git worktree in
a temporary folder, its processes run from there) and printed beside this checkout's: what
a change cost the hot path, in one run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
import tinker
from tinker import types

from store.engine import normalise_url
from tests.e2e.stack import API_KEY, ROOT, Stack

BASE = "tinkerq/tiny-qwen3"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure_overhead(service: tinker.ServiceClient, stack: Stack, calls: int) -> dict:
    tc = service.create_lora_training_client(BASE, rank=8).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(100, 108))),
        loss_fn_inputs={"target_tokens": np.arange(101, 109), "weights": np.ones(8, np.float32)},
    )
    tc.forward([datum], "cross_entropy").result()  # warm-up
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        tc.forward([datum], "cross_entropy").result()
        latencies.append(time.perf_counter() - start)
    engine = sa.create_engine(normalise_url(stack.env.get("DATABASE_URL")
                                            or f"sqlite:///{stack.data_dir / 'tinkerq.db'}"))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT compute_seconds FROM requests WHERE model_id = :m AND seq_id > 1 "
                    "ORDER BY seq_id"), {"m": tc.model_id},
        ).fetchall()
    compute = [float(r[0] or 0.0) for r in rows][-calls:]
    overhead = [lat - c for lat, c in zip(latencies, compute, strict=True)]
    return {"latency": latencies, "compute": compute, "overhead": overhead}


async def _sample_many(sampler, n: int, concurrency: int) -> float:
    prompt = types.ModelInput.from_ints([9707, 11, 1879])
    params = types.SamplingParams(max_tokens=1, temperature=0.0)
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await sampler.sample(prompt, 1, params)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - start)


def measure_throughput(service: tinker.ServiceClient, clients: int, sequential: int) -> dict:
    sampler = service.create_sampling_client(base_model=BASE).result()
    asyncio.run(_sample_many(sampler, 8, 8))  # warm-up
    one_at_a_time = asyncio.run(_sample_many(sampler, sequential, 1))
    concurrent = asyncio.run(_sample_many(sampler, clients * 2, clients))
    return {"sequential": one_at_a_time, "concurrent": concurrent}


def measure(root: Path, folder: Path, args: argparse.Namespace) -> dict:
    """One stack's figures, each a list: per call (latency, compute, overhead), and one
    futures/s figure each way (sequential, concurrent)."""
    stack = Stack.start(folder, args.backend, root=root)
    try:
        service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
        per_call = measure_overhead(service, stack, args.calls)
        rates = measure_throughput(service, args.clients, sequential=50)
        return per_call | {k: [v] for k, v in rates.items()}
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--before", metavar="REV", help="a commit to measure beside this tree")
    parser.add_argument("--repeat", type=int, default=1, help="stacks started per tree, in turn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        trees = {"this tree": ROOT}
        if args.before:
            trees = {f"before ({args.before})": before} | trees
            subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before],
                           cwd=ROOT, check=True, capture_output=True)
        runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
        try:
            for i in range(args.repeat):  # the trees take turns: drift hits both alike
                for t, (name, tree) in enumerate(trees.items()):
                    got = measure(tree, Path(tmp) / f"stack-{t}-{i}", args)
                    for key, values in got.items():  # pooled over the repeats
                        runs[name].setdefault(key, []).extend(values)
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT,
                               check=False)
    ms = 1000.0
    print(f"\ncontrol plane, backend={args.backend}, tiny model on CPU, {args.calls} sequential "
          f"forward calls (8 tokens), {args.clients} concurrent clients, {args.repeat} stack(s) "
          "per tree, in turn")
    head = "".join(f"{name + ' median':>24}{'p99':>10}" for name in runs)
    print(f"{'measure':<40}{head}")
    for label, key in [("SDK submit -> result (ms)", "latency"),
                       ("  worker compute (ms)", "compute"),
                       ("  overhead = latency - compute (ms)", "overhead")]:
        cells = "".join(f"{statistics.median(o[key]) * ms:>24.2f}{pct(o[key], 99) * ms:>10.2f}"
                        for o in runs.values())
        print(f"{label:<40}{cells}")
    for label, key in [("futures/s, 1 client at a time", "sequential"),
                       (f"futures/s, {args.clients} concurrent clients", "concurrent")]:
        print(f"{label:<40}" + "".join(
            f"{statistics.median(o[key]):>24.1f}{'':>10}" for o in runs.values()))


if __name__ == "__main__":
    main()
