"""Decode tok/s of the running batch under different settings of the decode step's module
constants, side by side in one process: the first setting is the baseline of the others.

A setting is a comma-separated list of NAME=VALUE, each NAME a constant of one of the decode
step's modules in workers.sampling (`MODULES`: decoding, forward, epilogue_kernels,
attention_kernels, gemv_kernel, decode_kernels), set where it is read (integers; 0/1 for
switches), or BLAS=cublaslt (the library PyTorch's matmuls take); "-" is the code as it
stands. Each setting gets fresh CUDA graphs; with --repeat the settings take turns and each
figure is the median of its runs. Same requests as benchmarks.sampler (real Qwen3 shapes,
random bf16 weights, rank-32 adapters, 256 new tokens, temperature 1).

    python -m benchmarks.decode_settings --model 0.6b 4b --batch 1 8 \\
        --setting GEMV_ROWS=0 - --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.sampler import build_model, timed
from workers.sampling import (
    attention_kernels,
    decode_kernels,
    decoding,
    epilogue_kernels,
    forward,
    gemv_kernel,
)
from workers.sampling.choose import compile_sampling
from workers.sampling.decoding import RunningBatch
from workers.training import fastpath

# where a setting's constants are looked up
MODULES = (decoding, forward, epilogue_kernels, attention_kernels, gemv_kernel, decode_kernels)


def parse(setting: str) -> list[tuple[Callable[[], Any], Callable[[Any], Any], Any]]:
    """'A=1,B=0' -> [(get, set, value)] per NAME; '-' -> []. BLAS=cublaslt (or cublas): the
    library PyTorch's matmuls take (torch.backends.cuda.preferred_blas_library)."""
    out = []
    for item in filter(None, setting.split(",")):
        if item == "-":
            continue
        name, value = item.split("=")
        if name == "BLAS":
            blas = torch.backends.cuda.preferred_blas_library
            out.append((blas, blas, value))
            continue
        module = next((m for m in MODULES if hasattr(m, name)), None)
        if module is None:
            raise SystemExit(f"no constant {name!r} in "
                             + ", ".join(m.__name__ for m in MODULES))
        out.append((functools.partial(getattr, module, name),
                    functools.partial(setattr, module, name), int(value)))
    return out


@contextlib.contextmanager
def applied(setting: str):
    """The setting in force inside the block; what it changed is restored after."""
    saved = []
    try:
        for get, put, value in parse(setting):
            saved.append((put, get()))
            put(value)
        yield
    finally:
        for put, value in reversed(saved):
            put(value)


def run(name: str, batches: list[int], adapters: list[int], prompt: int,
        settings: list[str], repeat: int) -> list[str]:
    model = build_model(name, "cuda", max(adapters))
    batch = RunningBatch(model, lambda ids: "", [], max_num_sequences=max(batches),
                         kv_tokens=max(batches) * (prompt + 256) + 4096, cuda_graphs=True)
    rows = []
    for b in batches:
        for a in adapters:
            runs: list[list[float]] = [[] for _ in settings]
            for _ in range(repeat):  # (rounds interleave the settings: drift hits all)
                for setting, got in zip(settings, runs, strict=True):
                    with applied(setting):
                        batch.graphs.graphs.clear()
                        got.append(timed(model, batch, b, prompt, a)[1])
            rates = [statistics.median(r) for r in runs]
            base = rates[0]
            rows.append(f"{name:>5}{b:>7}{a:>9}" + "".join(
                f"{r:>9.0f} {r / base:>5.2f}x" for r in rates))
            print(rows[-1], flush=True)
    batch.graphs.graphs.clear()
    del batch, model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["0.6b", "4b"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--setting", nargs="+", default=["-"])
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over the settings; each figure is its median")
    args = parser.parse_args()
    for s in args.setting:
        parse(s)  # (a typo fails before any model is built)
    fastpath.compile_kernels()
    compile_sampling()
    rows = []
    for name in args.model:
        rows += run(name, args.batch, args.adapters, args.prompt, args.setting, args.repeat)
    print(f"\ndecode tok/s by setting, {torch.cuda.get_device_name()}, prompt {args.prompt}, "
          f"256 new tokens, temperature 1, median of {args.repeat}; ratios to the first setting")
    for i, s in enumerate(args.setting):
        print(f"  [{i}] {s}")
    print(f"{'model':>5}{'batch':>7}{'adapters':>9}"
          + "".join(f"{f'[{i}]':>16}" for i in range(len(args.setting))))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
