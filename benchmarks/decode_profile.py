"""Where a decode step's GPU time goes, kernel by kernel, with prefill taken out.

The running batch (real Qwen3 shapes, random bf16 weights, `--adapters` rank-32 adapters,
CUDA graphs, the fused step) is timed over 256 new tokens as in `benchmarks.sampler`, then
profiled twice: requests of 2 and of 2 + `--steps` new tokens. Per kernel, the second
profile's GPU time minus the first's is what the extra decode steps cost, so prefill and
admission cancel out. Printed per step, largest first.

    python -m benchmarks.decode_profile --model 0.6b --batch 128

The profiled steps run at contexts prompt + 1 to prompt + 2 + steps, shorter than the timed
run's mean (prompt + 128): attention's share grows with the context.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.sampler import NEW_TOKENS, build_model, run_engine, timed
from workers.sampling.decoding import RunningBatch


def kernel_times(model, batch, b: int, prompt: int, adapters: int, new_tokens: int
                 ) -> dict[str, tuple[float, int]]:
    """GPU µs and call count per kernel name for one run of `b` requests (after an untimed
    run of the same shape)."""
    run_engine(model, batch, b, prompt, adapters, max_tokens=new_tokens)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_engine(model, batch, b, prompt, adapters, max_tokens=new_tokens)
    times = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)  # older torch: cuda_time_total
        times[e.key] = (getattr(e, "cuda_time_total", 0) if t is None else t, e.count)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="0.6b")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rows", type=int, default=22, help="kernels to print")
    args = parser.parse_args()

    model = build_model(args.model, "cuda", args.adapters)
    b = args.batch
    batch = RunningBatch(model, lambda ids: "", [], max_num_sequences=b,
                         kv_tokens=b * (args.prompt + NEW_TOKENS + 16) + 4096, cuda_graphs=True)
    _, decode_rate = timed(model, batch, b, args.prompt, args.adapters)
    short = kernel_times(model, batch, b, args.prompt, args.adapters, 2)
    long = kernel_times(model, batch, b, args.prompt, args.adapters, 2 + args.steps)
    rows = sorted(((t - short.get(k, (0, 0))[0], n - short.get(k, (0, 0))[1], k)
                   for k, (t, n) in long.items()), reverse=True)
    total = sum(t for t, _, _ in rows if t > 0) / args.steps
    print(f"decode profile, {torch.cuda.get_device_name()}: Qwen3-{args.model}, batch {b}, "
          f"{args.adapters} adapter(s), {args.prompt}-token prompts")
    print(f"timed over {NEW_TOKENS} new tokens: {decode_rate:,.0f} tok/s, "
          f"{1000 * b / decode_rate:.3f} ms per step")
    print(f"profiled: {args.steps} steps at contexts {args.prompt + 1}-"
          f"{args.prompt + 2 + args.steps}, kernels {total:.0f} µs per step")
    print(f"{'µs/step':>9} {'calls/step':>10}  kernel")
    for t, n, k in rows[:args.rows]:
        print(f"{t / args.steps:9.1f} {n / args.steps:10.1f}  {k[:90]}")


if __name__ == "__main__":
    main()
