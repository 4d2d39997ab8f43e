"""The sampler's KV cache in the model's dtype (bf16) against float8 (sample_kv_dtype=fp8),
on the RL recipe's shapes, in one process on one GPU.

Real Qwen3 shapes with random bf16 weights and one rank-32 adapter; RL groups (16 samples
to a prompt, one call of num_samples=16 each, 64-token prompts) generating 1,024 tokens
each, no stop condition, temperature 1. For each cache dtype and batch size (sequences
running at once):

  cache GiB     the cache the batch needs: every sequence at prompt + new tokens
  decode tok/s  tokens of the decode steps / their time (prefill excluded); "does not fit"
                where the cache and the model exceed the GPU's free memory
  |lp - fwd|    mean and max |sampled logprob - the training forward's| over 16 sequences
                of 128 tokens: what an importance-sampling loss sees as the sampler's
                mismatch (bf16 rounding alone in the bf16 row)

    python -m benchmarks.kv_fp8 --model 4b --batch 256 512
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import torch

from benchmarks.engine_train import VOCAB, qwen3_config
from benchmarks.sampler import build_model, kv_bytes_per_token, run_engine
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import KV_DTYPES
from workers.sampling.sampler import SampleSpec, adapter_of
from workers.training import fastpath


def mismatch(model, batch: RunningBatch) -> tuple[float, float]:
    """Mean and max |sampled logprob - training forward logprob| of 16 sequences."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, 64).tolist() for _ in range(16)]
    for i, prompt in enumerate(prompts):
        batch.admit(i, SampleSpec(prompt, 1, 128, 0, temperature=1.0, seed=i,
                                  stop_at_eos=False), adapter_of(model, 0))
    done = []
    while batch.busy:
        done += batch.step(64)
    outs = [out.sequences[0] for _, out in sorted(done, key=lambda kv: kv[0])]
    seqs = [p + o.tokens for p, o in zip(prompts, outs, strict=True)]
    with torch.no_grad():
        ref = model.packed_pass([q[:-1] for q in seqs], [q[1:] for q in seqs], [0] * 16,
                                [False] * 16, lambda r, o, lp: -lp)
    gaps = torch.cat([(torch.tensor(o.logprobs) - ref.logprobs[i][-128:].float().cpu()).abs()
                      for i, o in enumerate(outs)])
    return float(gaps.mean()), float(gaps.max())


def bench(name: str, batches: list[int], prompt: int, new: int, group: int) -> list[str]:
    model = build_model(name, "cuda", 1)
    rows = []
    for label, dtype in (("bf16", None), ("fp8", KV_DTYPES["fp8"])):
        per_token = kv_bytes_per_token(qwen3_config(name), 1 if dtype else 2)
        free, _ = torch.cuda.mem_get_info()
        fits = [b for b in batches if b * (prompt + new) * per_token < free - 6 * 2**30]
        gib = {b: b * (prompt + new) * per_token / 2**30 for b in batches}
        batch = None
        if fits:
            batch = RunningBatch(model, lambda ids: "", [], max_num_sequences=max(fits),
                                 kv_tokens=max(fits) * (prompt + new) + 4096,
                                 cuda_graphs=True, kv_dtype=dtype)
            lp_mean, lp_max = mismatch(model, batch)
        for b in batches:
            if b in fits:
                run_engine(model, batch, b, prompt, 1, max_tokens=8, group=group)  # capture
                _, rate = run_engine(model, batch, b, prompt, 1, max_tokens=new, group=group)
                cells = f"{rate:>13,.0f}{lp_mean:>11.4f}{lp_max:>9.3f}"
            else:
                cells = f"{'does not fit':>13}{'':>11}{'':>9}"
            rows.append(f"{name:>5}{label:>6}{b:>7}{gib[b]:>11.1f}{cells}")
            print(rows[-1], flush=True)
        del batch
        gc.collect()
        torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["4b"])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--group", type=int, default=16)
    args = parser.parse_args()
    fastpath.compile_kernels()
    rows = []
    for name in args.model:
        rows += bench(name, args.batch, args.prompt, args.new_tokens, args.group)
    print(f"\nKV cache dtype, {torch.cuda.get_device_name()}, prompts of {args.prompt} tokens, "
          f"{args.group} samples each, {args.new_tokens} new tokens, temperature 1, one "
          "rank-32 adapter, CUDA graphs, fused decode step")
    print(f"{'model':>5}{'cache':>6}{'batch':>7}{'cache GiB':>11}{'decode tok/s':>13}"
          f"{'|lp-fwd| mean':>11}{'max':>9}")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
