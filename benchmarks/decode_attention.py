"""Decode attention sweep on one GPU: `attention_kernels.attention` under each configuration
(keys per inner step, warps, pipeline stages, splits of a row's keys) at the sampler
benchmark's shapes, against the copy bandwidth.

Qwen3 head layouts (0.6B: 16 query and 8 KV heads, 4B: 32 and 8; head dim 128), batches
of 1 to 256 rows, every row at the mean context of the sampler benchmark (prompt + 128 of
256 new tokens: 256 and 640 keys), blocks scattered over the cache. Calls rotate over 4
layers' caches (more than the L2 holds) inside a CUDA graph, as in a decode step. Per shape:
the configuration `attention_kernels` picks now, the fastest one, their µs per call and the
K/V bytes read per second as a share of the copy bandwidth. `--kv-dtype fp8` sweeps a
float8 cache (sample_kv_dtype=fp8), its bytes counted at one a value.

    python -m benchmarks.decode_attention
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.sampler import copy_bandwidth
from workers.sampling import attention_kernels as ak
from workers.sampling.kv_cache import BLOCK, blocks_for

HEADS = {"0.6b": (16, 8), "4b": (32, 8)}
DIM, LAYERS, CALLS = 128, 4, 32


def time_calls(fn, rounds: int = 5, layers: int = LAYERS) -> float:
    """Seconds per call of `fn(layer)` over CALLS calls (layers in turn) in one graph."""
    for layer in range(layers):  # compiles outside the graph
        fn(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(i % layers)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / rounds / CALLS


def sweep(model: str, rows: int, context: int, bandwidth: float, configs: list[tuple],
          kv_dtype: torch.dtype = torch.bfloat16) -> str:
    heads, kv = HEADS[model]
    g = torch.Generator(device="cuda").manual_seed(0)
    per_row = blocks_for(context)
    slots = (rows * per_row + 1) * BLOCK
    caches = [tuple(torch.randn(slots, kv, DIM, device="cuda", generator=g,
                                dtype=torch.bfloat16).to(kv_dtype) for _ in "kv")
              for _ in range(LAYERS)]
    order = torch.randperm(rows * per_row, generator=torch.Generator().manual_seed(1))
    table = order.view(rows, per_row).to(torch.int32).cuda()
    used = torch.full((rows,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(rows, heads, DIM, device="cuda", dtype=torch.bfloat16)
    default_splits = ak.splits(rows, kv, 1024, q.device)  # (graphs bake max_len ≥ 1024)
    scale = DIM**-0.5
    ref = ak.attention(q, *caches[0], table, used, scale, default_splits)
    default = (32 if default_splits > 1 else 64, 4, 3, default_splits)
    times = {}
    for bt, warps, stages, s_factor in configs:
        n_splits = max(1, min(16, int(default_splits * s_factor)))
        key = (bt, warps, stages, n_splits)
        if key in times or (key != default and n_splits > 1 and context // n_splits < bt):
            continue
        out = ak.attention(q, *caches[0], table, used, scale, n_splits, key[:3])
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        times[key] = time_calls(lambda i, key=key: ak.attention(
            q, *caches[i], table, used, scale, key[3], key[:3]))
    best = min(times, key=times.get)
    kv_bytes = 2 * rows * context * kv * DIM * caches[0][0].element_size()

    def rate(t: float) -> str:
        return f"{t * 1e6:>8.1f}{100 * kv_bytes / t / bandwidth:>6.0f}%"

    return (f"{model:>5}{rows:>6}{context:>8}  {str(default):>17}{rate(times[default])}  "
            f"{str(best):>17}{rate(times[best])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["0.6b", "4b"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128, 256])
    parser.add_argument("--context", type=int, nargs="+", default=[256, 640])
    parser.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16",
                        help="the cache's dtype (fp8: sample_kv_dtype=fp8, a byte a value)")
    args = parser.parse_args()
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    bandwidth = copy_bandwidth("cuda")
    configs = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (1, 2, 0.5)))
    rows = []
    for model, b, ctx in itertools.product(args.model, args.batch, args.context):
        rows.append(sweep(model, b, ctx, bandwidth, configs, kv_dtype))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    print(f"\ndecode attention, {torch.cuda.get_device_name()}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, {args.kv_dtype} K/V; config = (keys per step, "
          "warps, stages, splits); "
          f"% = K/V bytes per second over the copy bandwidth")
    print(f"{'model':>5}{'rows':>6}{'context':>8}  {'default':>17}{'µs':>8}{'bw':>7}  "
          f"{'best':>17}{'µs':>8}{'bw':>7}")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
