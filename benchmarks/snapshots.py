"""Snapshots of training runs: what they cost training, and how long a restore takes.

Real Qwen3 shapes (0.6B, 4B) with random bf16 weights; 8 training runs with LoRA rank 32 on
attention, MLP and the unembedding (Tinker's default targets). One training step is what the
engine's scheduler makes of 8 forward_backward calls (2 sequences of 1,024 tokens each: 16k
tokens in one packed pass) and their 8 optim_steps, run through the executor as the engine
runs it (Scheduler.schedule → Executor.run → Scheduler.complete).

  cost       steps/s with snapshots off, with the tick's part only (the device copies made,
             then dropped: nothing written), with the writer's host copy but no file, and on
             (snapshot_every_steps K), in alternating
             blocks of 8 steps in the same process (a block's time includes waiting for the
             writes it started, so none spill into the next), and what the writer did: snapshots
             written, bytes each, seconds each (off the tick: a device copy in the tick, the
             host copy and the write on the writer's thread)
  restore    a fresh executor on the same base model rebuilds the 8 runs from a snapshot
             and r replayed steps (r = 0, 4, 8, 16): seconds for all 8, and the replay's
             share. r is at most K, so the K = 8 row bounds recovery at the default.

  --variants  where a write slows the tick (on the GPU the 0.6B tick is CPU-bound: 1.9 s of
             CPU to 0.9 s of GPU time over 4 steps): the writer as built (O_DIRECT: the disk's
             DMA reads the pinned buffer, no copy by a CPU) beside the same writer with plain
             writes (a CPU copies the bytes into the page cache), and with plain writes from
             a thread on the machine's last core (the tick's on the first four)

  --budget   the default policy beside the rest: snapshots due every K held back while
             the writer was busy more than snapshot_max_duty of the last minute (its own
             writer, blocks 4x as long), with the share of its blocks' time the writer took

The snapshots go to a temporary folder. Written with O_DIRECT they are not in the page
cache, so the restore reads them from the disk, as after a reboot (before, it read them
from memory, as after a kill on the same host).

    python -m benchmarks.snapshots --model 0.6b 4b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch

from benchmarks.engine_train import qwen3_config
from config import load_settings
from protocol.jobs import RESTORE, Job
from store import snapshots
from workers import checkpoints
from workers.executor import Executor
from workers.model import LoraModel
from workers.scheduler import Scheduler
from workers.snapshots import SnapshotWriter
from workers.training import fastpath

RUNS, RANK, SEQS, SEQ_LEN, BLOCK = 8, 32, 2, 1024, 8
ADAM = {"adam_params": {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                        "weight_decay": 0.0, "grad_clip_norm": 1.0}}


def fwdbwd(model_id: str, seq: int, vocab: int, rng: np.random.Generator) -> Job:
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    data = []
    for _ in range(SEQS):
        tokens = rng.integers(0, vocab, SEQ_LEN + 1)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
            loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                            "weights": np.ones(SEQ_LEN, dtype=np.float32)}))
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq,
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
    payload = forward_backward_request_to_proto(request).SerializeToString()
    return Job(request_id=f"fb-{model_id}-{seq}", kind="forward_backward", payload=payload,
               model_id=model_id, seq_id=seq)


def optim(model_id: str, seq: int) -> Job:
    return Job(request_id=f"opt-{model_id}-{seq}", kind="optim_step",
               payload=json.dumps(ADAM).encode(), model_id=model_id, seq_id=seq)


class _Dropped:
    """Stands in for the writer: takes the tick's copies and drops them."""

    def put(self, *_: object) -> None:
        pass


class _HostOnly(SnapshotWriter):
    """The writer up to its pinned host copy, with no file written: what the copy to the
    host costs apart from the write."""

    def _write(self, model_id: str, seq: int, state: checkpoints.TrainingState) -> None:
        pass


class _OtherCore(SnapshotWriter):
    """The writer, its thread on the machine's last core (the tick's on the first four)."""

    def _run(self) -> None:
        os.sched_setaffinity(0, {os.cpu_count() - 1})
        super()._run()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Bench:
    def __init__(self, ex: Executor, k: int):
        self.ex, self.scheduler = ex, Scheduler(300, 1 << 20, snapshot_every_steps=k)
        self.seq = dict.fromkeys(self.models, 0)
        self.rng = np.random.default_rng(0)
        self.done: dict[str, list[Job]] = {m: [] for m in self.models}

    @property
    def models(self) -> list[str]:
        return [f"run{i}" for i in range(RUNS)]

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.enqueued_at = time.monotonic()
            self.scheduler.add(job, job.num_tokens)
        while self.scheduler.pending:
            plan = self.scheduler.schedule(time.monotonic())
            outcomes = self.ex.run(plan)
            assert all(o.ok for o in outcomes.values()), outcomes
            self.scheduler.complete(plan, outcomes, time.monotonic())

    def create(self) -> None:
        self.run([Job(request_id=f"create-{m}", kind="create_model", model_id=m, payload=json.dumps(
            {"model_id": m, "base_model": "bench", "lora": {"rank": RANK, "seed": i}}).encode())
            for i, m in enumerate(self.models)])

    def step(self) -> float:
        jobs = []
        for m in self.models:
            fb = fwdbwd(m, self.seq[m] + 1, self.ex.model.vocab_size, self.rng)
            jobs += [fb, optim(m, self.seq[m] + 2)]
            self.done[m] += jobs[-2:]
            self.seq[m] += 2
        sync()
        start = time.perf_counter()
        self.run(jobs)
        sync()
        return time.perf_counter() - start


def restore(ex: Executor, root, bench: Bench, base: dict[str, int], steps: int) -> float:
    """Seconds to rebuild every run from its snapshot at seq `base[m]` plus `steps` steps."""
    jobs = []
    for m in bench.models:
        replay = [j for j in bench.done[m] if base[m] < j.seq_id <= base[m] + 2 * steps]
        body = {"model_id": m, "base_model": "bench", "snapshot_seq": base[m],
                "snapshot_dir": str(snapshots.folder(root, m, base[m])),
                "next_seq": base[m] + 2 * steps + 1}
        job = Job(request_id=f"restore-{m}", kind=RESTORE, payload=json.dumps(body).encode(),
                  model_id=m)
        job.body["replay"] = replay
        jobs.append(job)
    for m in bench.models:
        ex.residency.drop(m)
    sync()
    start = time.perf_counter()
    from workers.scheduler import Plan

    outcomes = ex.run(Plan(barriers=jobs))
    sync()
    assert all(o.ok for o in outcomes.values()), outcomes
    return time.perf_counter() - start


def bench_model(name: str, k: int, blocks: int, device: torch.device,
                variants: bool = False, budget: bool = False) -> None:
    folder = tempfile.mkdtemp(prefix="tinkerq-snap-")
    settings = load_settings(env={}, data_dir=folder, sample_kv_tokens=2048,
                             max_lora_adapters=RUNS, max_models=2 * RUNS, random_seed=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LoraModel.from_config(qwen3_config(name), device, dtype, seed=0)
    if device.type == "cuda":
        fastpath.compile_kernels()
    ex = Executor(model, settings, decode=lambda ids: "", eos_token_ids=[])
    bench = Bench(ex, k)
    ex.snapshots.first_pending = lambda m: bench.seq[m] + 1  # everything run is settled
    bench.create()
    for _ in range(2):  # warm-up: compiled kernels, allocator
        bench.step()
    assert ex.snapshots.wait_idle(600)
    writer = ex.snapshots
    written_before = writer.written.count
    stand_ins = {"copy": _Dropped(), "host": _HostOnly(writer.root), "on": writer}
    if variants:
        writer.root.mkdir(parents=True, exist_ok=True)
        stand_ins = {"on": writer, "buffered": SnapshotWriter(writer.root, direct=False),
                     "other core": _OtherCore(writer.root, direct=False)}
        for other in ("buffered", "other core"):
            stand_ins[other].first_pending = writer.first_pending
        os.sched_setaffinity(0, set(range(min(4, os.cpu_count() or 1))))
    if budget:  # the default policy: K, held back while the writer is over its duty
        stand_ins["budget"] = SnapshotWriter(writer.root)
        stand_ins["budget"].first_pending = writer.first_pending
    times: dict[str, list[float]] = {"off": [], **{mode: [] for mode in stand_ins}}
    for _ in range(blocks):
        for mode in times:
            bench.scheduler.snapshot_every_steps = 0 if mode == "off" else k
            ex.snapshots = stand_ins.get(mode, writer)
            gated = mode == "budget"
            bench.scheduler.snapshot_gate = (  # (its own writer: only its writes count)
                lambda: stand_ins["budget"].duty() < settings.snapshot_max_duty
            ) if gated else (lambda: True)
            steps = 4 * BLOCK if gated else BLOCK
            took = sum(bench.step() for _ in range(steps))
            start = time.perf_counter()  # a write still going on is the block's to pay
            assert isinstance(ex.snapshots, _Dropped) or ex.snapshots.wait_idle(600)
            times[mode].append((took + time.perf_counter() - start) / steps)
    budget_time = 4 * BLOCK * sum(times.get("budget", []))
    ex.snapshots = writer
    assert ex.snapshots.wait_idle(600)
    w = ex.snapshots.written
    count = w.count - written_before
    off = statistics.median(times["off"])
    tokens = RUNS * SEQS * SEQ_LEN
    print(f"\n## {name}: {RUNS} runs, rank {RANK}, {tokens} tokens per step, K={k}, "
          f"{blocks} x {BLOCK} steps each way ({card(device)})")
    print("| snapshots | s/step (median block) | train tok/s | vs off |")
    print("|---|---|---|---|")
    print(f"| off | {off:.3f} | {tokens / off:,.0f} | baseline |")
    labels = {"copy": "the tick's device copies only",
              "host": "device + pinned host copies, no file", "on": "on",
              "buffered": "on, plain (buffered) writes",
              "other core": "on, plain writes, the writer's thread on another core",
              "budget": f"on, held back above {100 * settings.snapshot_max_duty:.1f}% writer "
                        f"duty (the default; blocks of {4 * BLOCK} steps)"}
    for mode in stand_ins:
        what, t = labels[mode], statistics.median(times[mode])
        print(f"| {what}, every {k} optim_steps | {t:.3f} | {tokens / t:,.0f} | "
              f"{100 * (t / off - 1):+.1f}% |")
    print(f"writer: {count} snapshots in the timed blocks, {w.bytes / w.count / 2**20:.0f} MiB "
          f"each, {w.seconds / w.count:.2f} s each to write, {w.replaced} replaced unwritten")
    for mode in ("buffered", "other core") if variants else ():
        v = stand_ins[mode].written
        print(f"{labels[mode]}: {v.count} writes, {v.seconds / max(1, v.count):.3f} s each")
    if budget:
        v = stand_ins["budget"].written
        print(f"{labels['budget']}: {v.count} writes, the writer busy "
              f"{100 * v.seconds / budget_time:.1f}% of those blocks' time (the budget: "
              f"{100 * settings.snapshot_max_duty:.1f}% of the last minute, which the "
              "interleaved blocks without its writes make easier to meet)")
    if variants:
        return

    # restore: a snapshot of every run now, then 16 more steps recorded for the replay
    base = {}
    for m in bench.models:
        run = ex.residency.resident(m)
        state = checkpoints.gather_training_state(model, run.slot, run.adam, "bench",
                                                  on_device=True)
        ex.snapshots.put(m, bench.seq[m], state)
        base[m] = bench.seq[m]
    assert ex.snapshots.wait_idle(600)
    ex.snapshots.first_pending = lambda m: base[m] + 1  # keep these snapshots
    bench.scheduler.snapshot_every_steps = 0
    step_s = statistics.median([bench.step() for _ in range(16)])
    fresh = Executor(model, settings, decode=lambda ids: "", eos_token_ids=[])
    root = settings.snapshot_root
    print("| replayed steps r | restore 8 runs (s) | of which replay (s) | r x step (s) |")
    print("|---|---|---|---|")
    load = None
    for steps in (0, 4, 8, 16):
        took = restore(fresh, root, bench, base, steps)
        load = took if load is None else load
        print(f"| {steps} | {took:.2f} | {took - load:.2f} | {steps * step_s:.2f} |")


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["0.6b", "4b"])
    parser.add_argument("--k", type=int, default=load_settings(env={}).snapshot_every_steps)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", action="store_true",
                        help="time writers that put the bytes out in other ways (no restore)")
    parser.add_argument("--budget", action="store_true",
                        help="add the default policy: K held back by the writer's duty budget")
    args = parser.parse_args()
    for name in args.model:
        bench_model(name, args.k, args.blocks, torch.device(args.device), args.variants,
                    args.budget)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
