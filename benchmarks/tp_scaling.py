"""Tensor-parallel scaling: the engine's training pass and the sampler over N GPUs.

Qwen3 shapes (default 4B) with random bf16 weights and the workloads of the one-GPU
benchmarks: a training tick of ~64k tokens of packed sequences (256 to 4096 tokens, one
rank-32 adapter on attention + MLP, as `engine_train`) and a sampling run at batch 128
(128-token prompts, 256 new tokens, temperature 1, one adapter, CUDA graphs, as
`sampler`). For each N in --sizes that the machine has GPUs for: N processes, one GPU each,
NCCL, the model sharded by `workers.parallel.tp.apply_tp`. One table:

  train tok/s, MFU   forward_backward tokens/s; MFU against N x the bf16 matmul rate
                     measured on GPU 0 in this run
  decode tok/s       sampled tokens/s of the decode steps (prefill excluded)
  scaling            rate_N / (N x rate_1), each of the two rates

The first row, "1 plain", runs the same workloads with no process group at all: the TP
code path at N=1 ("1") must cost no more than 5% against it.

    python -m benchmarks.tp_scaling --model 4b --sizes 1 2 4 8
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import queue
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.engine_train import (
    RANK,
    draw_lengths,
    engine_jobs,
    measured_tflops,
    qwen3_config,
    step_flops,
    timed,
)
from benchmarks.sampler import run_engine as run_sampler


def _rank_main(rank: int, size: int, plain: bool, port: int, name: str, tokens: int,
               repeats: int, graphs: bool, out) -> None:
    # A rank stuck this long prints every thread's stack (to stderr) and goes on waiting, so
    # that a hang shows where each rank is instead of ending the run silently.
    faulthandler.dump_traceback_later(240, repeat=True)
    begin = time.perf_counter()

    def phase(what: str) -> None:
        if rank == 0:
            print(f"  N={size}{' plain' if plain else ''}: {what} at "
                  f"{time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)

    from transformers import AutoModelForCausalLM

    from workers.model import AdapterSpec, LoraModel
    from workers.parallel import tp
    from workers.sampling.choose import compile_sampling
    from workers.sampling.decoding import RunningBatch
    from workers.training import fastpath
    from workers.training.trainer import Trainer

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    if not plain:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size, device_id=device)
    cfg = qwen3_config(name)
    torch.manual_seed(0)
    with device:
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                              attn_implementation="sdpa")
    model = LoraModel(hf, device)
    if not plain:
        tp.apply_tp(model, tp.TP(rank, size, dist.group.WORLD))
        model.tp = model.tp or tp.TP(rank, size, dist.group.WORLD)
    torch.cuda.empty_cache()
    phase("model built and sharded")
    fastpath.compile_kernels()
    compile_sampling()
    model.add_adapter(0, AdapterSpec(RANK, 32.0, train_unembed=False),
                      torch.Generator().manual_seed(0))
    lengths = draw_lengths(tokens)
    jobs = engine_jobs(lengths, 1, np.random.default_rng(0))
    trainer = Trainer(model)
    trainer.run(jobs)  # compile + warm-up
    phase("first training tick done")
    train_s = timed(lambda: trainer.run(jobs), repeats)
    phase("training timed")
    torch.manual_seed(1)  # a non-zero LoRA delta for the sampler, alike on every rank
    with torch.no_grad():
        for w in model.adapter_weights(0).values():
            w.B.normal_(0, 0.01)
    batch = RunningBatch(model, lambda ids: "", [], max_num_sequences=128,
                         kv_tokens=128 * 400 + 4096, cuda_graphs=graphs)
    run_sampler(model, batch, 128, 128, 1, max_tokens=8)  # graph capture
    phase("decode graphs captured")
    _, decode = run_sampler(model, batch, 128, 128, 1)
    phase("sampling timed")
    if rank == 0:
        out.put({"train": sum(lengths) / train_s, "flops": step_flops(cfg, lengths) / train_s,
                 "decode": decode, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
    if not plain:
        dist.barrier()
    # No destroy_process_group: after NCCL collectives were captured in CUDA graphs it can
    # hang in ncclCommDestroy (pytorch/pytorch#115388), which kept this run from ever
    # printing. The process exits instead; the OS frees the communicators.
    sys.stderr.flush()
    os._exit(0)


def run(size: int, plain: bool, name: str, tokens: int, repeats: int, graphs: bool) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    from workers.parallel.runtime import _free_port

    port = _free_port()
    procs = [ctx.Process(target=_rank_main,
                         args=(r, size, plain, port, name, tokens, repeats, graphs, out))
             for r in range(size)]
    for p in procs:
        p.start()
    while True:  # the answer, or the first rank that died without giving it
        try:
            result = out.get(timeout=5)
            break
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"N={size}: a rank process exited with {dead[0]}") from None
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="4b")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=1 << 16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-plain", dest="plain", action="store_false",
                        help="skip the no-process-group row (scaling is then against the "
                             "first N)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="decode without CUDA graphs (eager steps)")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    peak = measured_tflops("cuda") * 1e12
    runs = [("1 plain", 1, True)] * args.plain + [
        (str(n), n, False) for n in args.sizes if n <= gpus]
    rows, base = [], None
    for label, n, plain in runs:
        r = run(n, plain, args.model, args.tokens, args.repeats, args.graphs)
        if base is None:
            base = r
        mfu = r["flops"] / (n * peak)
        rows.append(f"{label:>8}{r['train']:>12.0f}{100 * mfu:>8.1f}%"
                    f"{r['train'] / (n * base['train']):>9.2f}{r['decode']:>14.0f}"
                    f"{r['decode'] / (n * base['decode']):>9.2f}{r['peak_gib']:>10.1f}")
        print(rows[-1], flush=True)
    print(f"\ntensor parallelism, Qwen3-{args.model} shapes, {torch.cuda.get_device_name()} "
          f"x{gpus} (matmul {peak / 1e12:.0f} TFLOP/s each); train: ~{args.tokens} tokens "
          f"per tick, 1 adapter; decode: batch 128, 128-token prompts, 256 new tokens, "
          f"{'CUDA graphs' if args.graphs else 'eager'}")
    print(f"{'N':>8}{'train tok/s':>12}{'MFU':>9}{'scaling':>9}{'decode tok/s':>14}"
          f"{'scaling':>9}{'peak GiB':>10}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
