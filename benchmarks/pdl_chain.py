"""What programmatic dependent launch (PDL) saves per kernel here: a chain of dependent
Triton kernels replayed as one CUDA graph, each kernel reading what the one before wrote,
launched plainly or dependent (griddepcontrol), µs per kernel.

Workloads, each kernel of the chain:
  tiny     one program: a 128-float vector + 1 (launch and latency only)
  stream   2 programs per SM: each reads its block of a weight of the given MiB (a
           different weight per kernel, 160 MiB in turn) and the previous kernel's output,
           writes one float per program (a decode GEMV's shape of work)

Variants:
  plain     ordinary launches
  pdl       launched dependent: wait for the previous kernel first, then let the next
            launch
  pdl+pre   (stream) as pdl, but the program loads its weight block before waiting

And pairs of a one-row projection of a weight [N, K] (a different copy per pair, more
than the L2 holds) and a kernel between that turns its output into the next input, µs per
pair: the projection as gemv_kernel.gemv does it (a tensor-core dot on rows padded to
16) or on CUDA cores, plain or dependent (pdl+pre: the first step's weights loaded before
the wait). Defaults: 0.6B's q/k/v, 4B's o and q/k/v.

    python -m benchmarks.pdl_chain
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

CHAIN = 64  # kernels per graph


@triton.jit
def _tiny(src, dst, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    i = tl.arange(0, 128)
    tl.store(dst + i, tl.load(src + i) + 1.0)


@triton.jit
def _stream(src, dst, w, per_program, PDL: tl.constexpr, PRE: tl.constexpr,
            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = w + pid * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if PRE:  # the weights do not depend on the kernel before: read them while it ends
        for off in range(0, per_program, BLOCK):
            acc += tl.load(base + off + tl.arange(0, BLOCK)).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if not PRE:
        for off in range(0, per_program, BLOCK):
            acc += tl.load(base + off + tl.arange(0, BLOCK)).to(tl.float32)
    prev = tl.load(src + pid)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(dst + pid, tl.sum(acc, axis=0) * 1e-9 + prev)


@triton.jit
def _gemv_dot(x, w, out, N, K, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """gemv_kernel.gemv's way for one row: padded to 16 rows, a tensor-core dot per step
    of K (operands staged in shared memory)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.arange(0, 16)
    k = tl.arange(0, BK)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        xt = tl.load(x + rows[:, None] * 0 + k0 + k[None, :], mask=(rows == 0)[:, None],
                     other=0.0)
        wt = tl.load(w + cols[:, None] * K + k0 + k[None, :])
        acc += tl.dot(xt, tl.trans(wt))
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out + rows[:, None] * 0 + cols[None, :], acc, mask=(rows == 0)[:, None])


@triton.jit
def _gemv_reg(x, w, out, N, K, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
              PRE: tl.constexpr):
    """One row on CUDA cores (no shared memory); PRE: the first step's weights loaded
    before waiting for the kernel before."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    ws = w + cols[:, None] * K + k[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    if PRE:
        first = tl.load(ws).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    start = 0
    if PRE:
        acc += first * tl.load(x + k).to(tl.float32)[None, :]
        start = BK
    for k0 in range(start, K, BK):
        acc += tl.load(ws + k0).to(tl.float32) * tl.load(x + k0 + k).to(tl.float32)[None, :]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out + cols, tl.sum(acc, axis=1))


@triton.jit
def _glue(src, dst, N, K, PDL: tl.constexpr):
    """The kernel between two projections: reads one's output, writes the next one's input."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    i = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    tl.store(dst + i, (tl.load(src + i % N) * 0.5).to(tl.bfloat16), mask=i < K)


def graph_us(launch, n: int = CHAIN) -> float:
    """µs per kernel of a graph of `n` launches (launch(i) issues kernel i)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n):
            launch(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            launch(i)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[2, 8, 32])
    parser.add_argument("--gemv", type=lambda v: tuple(map(int, v.split("x"))), nargs="*",
                        default=[(4192, 1024), (2592, 4096), (6240, 2560)], metavar="NxK")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bufs = [torch.zeros(4096, device="cuda") for _ in range(2)]
    rows = []

    def tiny(pdl: bool):
        return lambda i: _tiny[(1,)](bufs[i % 2], bufs[(i + 1) % 2], PDL=pdl,
                                     **({"launch_pdl": True} if pdl else {}))

    rows.append(("tiny", "-", graph_us(tiny(False)), graph_us(tiny(True)), None))
    for mib in args.mib:
        programs = 2 * sms
        per = int(mib * 2**20 / 2 / programs) // 1024 * 1024
        copies = max(8, int(-(-160 // mib)))  # (160 MiB in turn: more than the L2 holds)
        ws = [torch.randn(programs * per, device="cuda", dtype=torch.bfloat16)
              for _ in range(copies)]

        def stream(pdl: bool, pre: bool, ws=ws, per=per, programs=programs):
            return lambda i: _stream[(programs,)](
                bufs[i % 2], bufs[(i + 1) % 2], ws[i % len(ws)], per, PDL=pdl, PRE=pre,
                BLOCK=1024,
                num_warps=4, **({"launch_pdl": True} if pdl else {}))

        rows.append(("stream", f"{programs * per * 2 / 2**20:.1f}",
                     graph_us(stream(False, False)), graph_us(stream(True, False)),
                     graph_us(stream(True, True))))
        del ws
    pairs = []
    for n, k in args.gemv:
        copies = max(8, -(-160 * 2**20 // (2 * n * k)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        xs = [torch.randn(k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        y = torch.zeros(n, device="cuda")

        def pair(kind: str, pdl: bool, pre: bool = False, ws=ws, xs=xs, y=y, n=n, k=k):
            extra = {"launch_pdl": True} if pdl else {}

            def launch(i):
                if i % 2 == 0:
                    if kind == "dot":
                        _gemv_dot[(-(-n // 32),)](xs[0], ws[i // 2 % len(ws)], y, n, k, BN=32,
                                                  BK=256, PDL=pdl, num_warps=4,
                                                  num_stages=4, **extra)
                    else:
                        _gemv_reg[(-(-n // 32),)](xs[0], ws[i // 2 % len(ws)], y, n, k, BN=32,
                                                  BK=128, PDL=pdl, PRE=pre, num_warps=4,
                                                  **extra)
                else:
                    _glue[(-(-k // 1024),)](y, xs[0], n, k, PDL=pdl, **extra)
            return launch

        times = [graph_us(pair("dot", False)), graph_us(pair("dot", True)),
                 graph_us(pair("reg", False)), graph_us(pair("reg", True)),
                 graph_us(pair("reg", True, True))]
        pairs.append((n, k, [2 * t for t in times]))
        del ws
    print(f"\nPDL, {torch.cuda.get_device_name()}, triton {triton.__version__}, a CUDA graph of "
          f"{CHAIN} dependent kernels, µs per kernel (median of 20 replays)")
    print(f"{'workload':>9}{'MiB':>7}{'plain':>9}{'pdl':>9}{'pdl+pre':>9}")
    for name, mib, plain, pdl, pre in rows:
        print(f"{name:>9}{mib:>7}{plain:>9.2f}{pdl:>9.2f}"
              + (f"{pre:>9.2f}" if pre is not None else f"{'':>9}"))
    print("\none-row projection [N, K] then a kernel between, µs per pair (weight bytes at "
          "the copy bandwidth: about N·K·2 / 3e6)")
    print(f"{'N':>6}{'K':>6}{'dot':>8}{'dot pdl':>9}{'cores':>8}{'pdl':>8}{'pdl+pre':>9}")
    for n, k, t in pairs:
        print(f"{n:>6}{k:>6}" + "".join(f"{v:>8.2f}" for v in t[:2]) + "".join(
            f"{v:>8.2f}" for v in t[2:]))


if __name__ == "__main__":
    main()
