"""The fused decode step's kernels between the matmuls, on one GPU: where LoRA B goes.

Per layer of a Qwen3 shape (0.6B, 4B), the work between the 4 matmuls of a decode step of
`rows` rows with 1 or 8 rank-32 adapters (rows grouped by adapter, as the running batch
orders them): q/k/v epilogue, two add-norms and SiLU·mul (attention excluded), timed in a
CUDA graph over 4 layers' weights, in µs per layer:

  addmm   LoRA B by one addmm per projection group (after a 0/1 row mask when several
          adapters share the step), then the kernels without LoRA
  gemv    the kernels a row per program, LoRA B as a GEMV per row
  dots    the kernels 16 rows per program, LoRA B as tensor-core dots; `dots best` the
          fastest (columns per program, warps, stages) of a sweep, per kernel

And the projections of steps of a few rows: `gemv_kernel.gemv` against F.linear
(cuBLAS) on each projection group's weight with one rank-32 adapter's A rows (as the
fused step multiplies them), 8 copies in turn (more than the L2 holds): µs per call and
the weight bytes per second as a share of the copy bandwidth, with gemv's default and its
fastest (columns per program, warps, stages).

    python -m benchmarks.decode_kernels
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.decode_attention import time_calls
from benchmarks.engine_train import HEAD_DIM, RANK, SHAPES
from benchmarks.sampler import copy_bandwidth
from workers.sampling import epilogue_kernels as ek
from workers.sampling import gemv_kernel as gk

LAYERS = 4


class Layer:
    """One layer's inputs and LoRA tables for a step of `rows` rows."""

    def __init__(self, model: str, rows: int, adapters: int, g: torch.Generator):
        hidden, inter, _, heads, kv = SHAPES[model]
        self.hidden, self.inter, self.heads = hidden, inter, heads
        d, w = HEAD_DIM, RANK * adapters
        out = (heads + 2 * kv) * d
        bf = dict(device="cuda", dtype=torch.bfloat16)

        def randn(*shape):
            return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16) * 0.1

        self.y_qkv, self.B_qkv = randn(rows, out + 3 * w), randn(out, 3 * w)
        self.y_o, self.B_o = randn(rows, hidden + w), randn(hidden, w)
        self.y_gu, self.B_gu = randn(rows, 2 * inter + 2 * w), randn(2 * inter, 2 * w)
        self.y_down, self.B_down = randn(rows, hidden + w), randn(hidden, w)
        self.h = randn(rows, hidden)
        self.act = randn(rows, inter)
        self.norm_w = torch.ones(hidden, **bf)
        self.qk_w = torch.ones(d, **bf)
        self.k = torch.zeros(rows + 1, kv, d, **bf)
        self.v = torch.zeros(rows + 1, kv, d, **bf)
        self.cos, self.sin = torch.ones(rows, d, **bf), torch.zeros(rows, d, **bf)
        self.write = torch.arange(rows, device="cuda")
        per = -(-rows // adapters)  # rows grouped by adapter
        lo = torch.arange(rows, device="cuda") // per * RANK
        self.cols = torch.stack([lo, lo + RANK], 1).to(torch.int32)
        col = torch.arange(w, device="cuda")
        mask = ((col[None] >= self.cols[:, :1]) & (col[None] < self.cols[:, 1:])).to(
            torch.bfloat16)
        self.masks = None if adapters == 1 else {n: mask.repeat(1, n) for n in (1, 2, 3)}

    def addmm(self, y, B, members):
        """As forward._group: into the base columns of y in place (a strided view)."""
        low = y[:, B.shape[0]:]
        if self.masks is not None:
            low = low * self.masks[members]
        return y[:, : B.shape[0]].addmm_(low, B.T)

    def run(self, how: str, rows: int = 1, configs: dict | None = None):
        c = configs or {}
        if how == "addmm":
            B = dict(qkv=None, o=None, gu=None, down=None)
            y_qkv = self.addmm(self.y_qkv, self.B_qkv, 3)
            y_o, y_gu = self.addmm(self.y_o, self.B_o, 1), self.addmm(self.y_gu, self.B_gu, 2)
            y_down = self.addmm(self.y_down, self.B_down, 1)
        else:
            B = dict(qkv=self.B_qkv, o=self.B_o, gu=self.B_gu, down=self.B_down)
            y_qkv, y_o, y_gu, y_down = self.y_qkv, self.y_o, self.y_gu, self.y_down
        ek.qkv_epilogue(y_qkv, B["qkv"], self.cols, self.qk_w, self.qk_w, 1e-6, self.cos,
                        self.sin, self.k, self.v, self.write, self.heads, rows, c.get("qkv"))
        ek.add_norm(y_o, B["o"], self.cols, self.h, self.norm_w, 1e-6, rows, c.get("norm"))
        ek.silu_mul(y_gu, B["gu"], self.cols, self.inter, rows, c.get("silu"))
        ek.add_norm(y_down, B["down"], self.cols, self.h, self.norm_w, 1e-6, rows,
                    c.get("norm"))


def kernel_time(layers: list[Layer], kernel: str, config) -> float:
    """µs per call of one kernel of the dots path under a config."""

    def call(i: int) -> None:
        x = layers[i]
        if kernel == "qkv":
            ek.qkv_epilogue(x.y_qkv, x.B_qkv, x.cols, x.qk_w, x.qk_w, 1e-6, x.cos, x.sin,
                            x.k, x.v, x.write, x.heads, 16, config)
        elif kernel == "norm":
            ek.add_norm(x.y_o, x.B_o, x.cols, x.h, x.norm_w, 1e-6, 16, config)
        else:
            ek.silu_mul(x.y_gu, x.B_gu, x.cols, x.inter, 16, config)

    return time_calls(call) * 1e6


def bench(model: str, rows: int, adapters: int) -> str:
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = [Layer(model, rows, adapters, g) for _ in range(LAYERS)]
    us = {how: time_calls(lambda i, how=how: layers[i].run(how, 16 if how == "dots" else 1))
          * 1e6 for how in ("addmm", "gemv", "dots")}
    best = {}
    sweeps = {"qkv": list(itertools.product((4, 8), (1, 2, 3))),
              "norm": list(itertools.product((64, 128, 256), (4, 8), (1, 2, 3))),
              "silu": list(itertools.product((32, 64, 128), (4, 8), (1, 2, 3)))}
    for kernel, configs in sweeps.items():
        times = {cfg: kernel_time(layers, kernel, cfg) for cfg in configs}
        best[kernel] = min(times, key=times.get)
    us["best"] = time_calls(lambda i: layers[i].run("dots", 16, best)) * 1e6
    return (f"{model:>5}{rows:>6}{adapters:>9}{us['addmm']:>8.1f}{us['gemv']:>8.1f}"
            f"{us['dots']:>8.1f}{us['best']:>8.1f}   " + " ".join(
                f"{k}={v}" for k, v in best.items()))


def projection(n: int, k: int, rows: int, bandwidth: float) -> str:
    """F.linear, gemv's default and its fastest config on one weight shape [n, k]."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(gk.gemv(x, ws[0]).float(), F.linear(x, ws[0]).float(),
                               atol=0.5, rtol=2e-2)
    times = {"linear": time_calls(lambda i: F.linear(x, ws[i]), layers=8)}
    for cfg in itertools.product((16, 32, 64), (4, 8), (2, 3, 4)):
        times[cfg] = time_calls(lambda i, cfg=cfg: gk.gemv(x, ws[i], cfg), layers=8)
    best = min((c for c in times if c != "linear"), key=times.get)

    def rate(t: float) -> str:
        return f"{t * 1e6:>8.1f}{100 * 2 * n * k / t / bandwidth:>6.0f}%"

    return f"{rate(times['linear'])}{rate(times[gk.GEMV_CONFIG])}{rate(times[best])}  {best}"


def gemv_rows(model: str, rows: int, bandwidth: float) -> list[str]:
    hidden, inter, _, heads, kv = SHAPES[model]
    shapes = {"qkv": ((heads + 2 * kv) * HEAD_DIM + 3 * RANK, hidden),
              "o": (hidden + RANK, heads * HEAD_DIM),
              "gate_up": (2 * inter + 2 * RANK, hidden), "down": (hidden + RANK, inter)}
    out = []
    for name, (n, k) in shapes.items():
        out.append(f"{model:>5}{name:>9}{rows:>6}{projection(n, k, rows, bandwidth)}")
        print(out[-1], flush=True)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["0.6b", "4b"])
    parser.add_argument("--batch", type=int, nargs="*", default=[16, 32, 128, 256])
    parser.add_argument("--gemv-rows", type=int, nargs="*", default=[1, 8])
    args = parser.parse_args()
    bandwidth = copy_bandwidth("cuda")
    projections = []
    for model, m in itertools.product(args.model, args.gemv_rows):
        projections += gemv_rows(model, m, bandwidth)
    rows = []
    for model, b, adapters in itertools.product(args.model, args.batch, (1, 8)):
        rows.append(bench(model, b, adapters))
        print(rows[-1], flush=True)
    print(f"\nfused decode step, the kernels between the matmuls, µs per layer, "
          f"{torch.cuda.get_device_name()}, LoRA rank {RANK}")
    print(f"{'model':>5}{'rows':>6}{'adapters':>9}{'addmm':>8}{'gemv':>8}{'dots':>8}"
          f"{'best':>8}   best configs (columns, warps, stages)")
    for r in rows:
        print(r)
    print(f"\nprojections of a few rows, µs per call and weight bytes per second over the "
          f"copy bandwidth ({bandwidth / 1e12:.2f} TB/s)")
    print(f"{'model':>5}{'group':>9}{'rows':>6}{'F.linear':>14}{'gemv':>14}{'best':>14}"
          f"  best (columns, warps, stages)")
    for r in projections:
        print(r)


if __name__ == "__main__":
    main()
