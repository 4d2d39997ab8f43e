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
    parser.add_argument("--mib", type=float, nargs="+", default=[4, 8, 16])
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
    print(f"\nPDL, {torch.cuda.get_device_name()}, triton {triton.__version__}, a CUDA graph of "
          f"{CHAIN} dependent kernels, µs per kernel (median of 20 replays)")
    print(f"{'workload':>9}{'MiB':>7}{'plain':>9}{'pdl':>9}{'pdl+pre':>9}")
    for name, mib, plain, pdl, pre in rows:
        print(f"{name:>9}{mib:>7}{plain:>9.2f}{pdl:>9.2f}"
              + (f"{pre:>9.2f}" if pre is not None else f"{'':>9}"))


if __name__ == "__main__":
    main()
