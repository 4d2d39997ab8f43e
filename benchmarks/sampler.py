"""Sampling benchmark on one GPU: the running batch against transformers `generate` and the
memory-bandwidth floor.

Real Qwen3 shapes (0.6B, 4B) with random bf16 weights; prompts of 128 and 512 tokens; 256 new
tokens per sequence (no stop conditions); batches of 1, 32, 128, 256, 512 sequences, each its own
request and seed (temperature 1), on 1 or 8 distinct rank-32 LoRA adapters (all
projections). All in one process, one table:

  tok/s         generated tokens / wall time from admission to the last token (prefill in)
  decode tok/s  tokens of the decode steps / their time (prefill excluded)
  floor tok/s   batch / (bytes a decode step must read / copy bandwidth measured here):
                bytes = projection + LM-head weights + the adapters' LoRA factors + the
                batch's K/V at the mean context (prompt + 128), in the cache's dtype
                (--kv-dtype: bf16, or fp8 at a byte a value)
  16/prompt     decode tok/s of the same number of sequences, 16 to a prompt (one request
                of num_samples=16 each, as an RL group): the prompt prefilled once and its
                KV cache blocks shared; 1 adapter and the first prompt length only
  unfused       decode tok/s of the same requests with the unfused step (eager glue
                between the matmuls, as before decode_kernels); 1 adapter and the first
                prompt length only
  hf generate   transformers `generate` of the base model, same prompts, batch 1/32/128
                (128-token prompts), sampling on, no cache tricks

    python -m benchmarks.sampler --model 0.6b 4b
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from benchmarks.engine_train import RANK, VOCAB, matmul_params, qwen3_config
from workers.model import AdapterSpec, LoraModel
from workers.sampling import choose, sample_kernels
from workers.sampling.choose import compile_sampling
from workers.sampling.decoding import RunningBatch
from workers.sampling.kv_cache import KV_DTYPES
from workers.sampling.sampler import SampleSpec, adapter_of
from workers.training import fastpath

NEW_TOKENS = 256
GROUP = 16  # samples to a prompt in the 16/prompt column
PATHS = ("gemv", "dots", "addmm")  # where the fused step adds LoRA B (--lora-placement)


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * n / (time.perf_counter() - start)


def kv_bytes_per_token(cfg, value_bytes: int = 2) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * value_bytes


def adapter_bytes(model: LoraModel, slot: int) -> int:
    return sum(2 * t.numel() for t in model.adapter_parameters(slot))  # read as bf16


def run_unfused(model: LoraModel, batch: RunningBatch, b: int, prompt_len: int) -> float:
    """Decode tok/s of `b` one-adapter requests through the unfused step."""
    saved, batch.fused = batch.fused, False
    try:
        return timed(model, batch, b, prompt_len, 1)[1]
    finally:
        batch.fused = saved


def lora_placement(name: str, model: LoraModel, batch: RunningBatch, prompt_len: int,
                   batches: list[int]) -> list[str]:
    """Decode tok/s with LoRA B added in the fused kernels a row per program ("gemv"), in
    them 16 rows per program ("dots") and by one addmm per projection group ("addmm"), at
    1 and 8 adapters: where RunningBatch.lora_path_for's thresholds sit."""
    rows = []
    try:
        for b in batches:
            for adapters in (1, 8):
                rates = []
                for path in PATHS:
                    batch.lora_path = path
                    rates.append(timed(model, batch, b, prompt_len, adapters)[1])
                    batch.graphs.graphs.clear()  # (their memory: one pool per graph)
                rows.append(f"{name:>5}{b:>7}{adapters:>9}"
                            + "".join(f"{r:>9.0f}" for r in rates))
                print(rows[-1], flush=True)
    finally:
        batch.lora_path = None
    return rows


def timed(model: LoraModel, batch: RunningBatch, b: int, prompt_len: int, adapters: int,
          group: int = 1) -> tuple[float, float]:
    """run_engine after a short untimed run of the same shape (graph capture, tuning)."""
    run_engine(model, batch, b, prompt_len, adapters, max_tokens=8, group=group)
    return run_engine(model, batch, b, prompt_len, adapters, group=group)


def run_engine(model: LoraModel, batch: RunningBatch, batch_size: int, prompt_len: int,
               adapters: int, max_tokens: int = NEW_TOKENS, group: int = 1
               ) -> tuple[float, float]:
    """(tok/s, decode tok/s) of `batch_size` sequences, `group` samples to a request."""
    rng = np.random.default_rng(batch_size + prompt_len)
    group = min(group, batch_size)
    for i in range(batch_size // group):
        slot = i % adapters
        spec = SampleSpec(rng.integers(0, VOCAB, prompt_len).tolist(), group, max_tokens,
                          slot, temperature=1.0, seed=i, stop_at_eos=False)
        batch.admit(i, spec, adapter_of(model, slot))
    torch.cuda.synchronize()
    start = time.perf_counter()
    done = batch.step(0)  # admission + prefill
    torch.cuda.synchronize()
    prefilled = time.perf_counter()
    while batch.busy:
        done += batch.step(64)
    torch.cuda.synchronize()
    end = time.perf_counter()
    assert len(done) == batch_size // group
    generated = batch_size * max_tokens
    return generated / (end - start), batch_size * (max_tokens - 1) / (end - prefilled)


def run_hf(model: LoraModel, batch_size: int, prompt_len: int, device) -> float:
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, VOCAB, (batch_size, prompt_len)), device=device)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True,
                  temperature=1.0, top_k=0, pad_token_id=0)
    model.hf.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]),
                      **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    return batch_size * NEW_TOKENS / (time.perf_counter() - start)


def check(model: LoraModel, batch: RunningBatch, kv_dtype: torch.dtype | None = None) -> str:
    """Greedy tokens with CUDA graphs = without = the unfused step; sampled logprobs =
    training-forward ones. 18 sequences of 3 adapters and the base model, long enough that
    the decode steps split their keys (the Triton attention's combine step)."""
    rng = np.random.default_rng(7)
    shapes = [(20 + 13 * j % 97, (0, 1, -1)[j % 3]) for j in range(18)]
    specs = [SampleSpec(rng.integers(0, VOCAB, n).tolist(), 1, 16, slot, temperature=0.0,
                        stop_at_eos=False) for n, slot in shapes]
    eager = RunningBatch(model, lambda ids: "", [], kv_tokens=4096, cuda_graphs=False,
                         kv_dtype=kv_dtype)
    outs = []
    for b, fused in ((batch, True), (eager, True), (eager, False)):
        b.fused = fused
        for i, s in enumerate(specs):
            b.admit(i, s, adapter_of(model, s.slot))
        done = []
        while b.busy:
            done += b.step(64)
        outs.append(dict(done))

    def agree(other: dict) -> str:
        first = [next((j for j, (a, b) in enumerate(zip(outs[0][i].sequences[0].tokens,
                                                       other[i].sequences[0].tokens,
                                                       strict=True)) if a != b), 16)
                 for i in range(len(specs))]
        return "identical" if min(first) == 16 else f"agree for {first} of 16 (bf16 ties?)"

    def diff(out: dict) -> float:
        seqs = [s.prompt + out[i].sequences[0].tokens for i, s in enumerate(specs)]
        with torch.no_grad():
            ref = model.packed_pass([q[:-1] for q in seqs], [q[1:] for q in seqs],
                                    [s.slot for s in specs], [False] * len(specs),
                                    lambda r, o, lp: -lp)
        return max(float((torch.tensor(out[i].sequences[0].logprobs)
                          - ref.logprobs[i][-16:].cpu()).abs().max()) for i in range(len(specs)))

    # the sampling kernels against the eager `choose` on one batch of logits
    logits = torch.randn(256, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
    temps = torch.tensor([0.0, 0.7, 1.0, 1.5], device="cuda").repeat(64)
    streams = torch.arange(256, device="cuda") * 7919
    steps = torch.arange(256, device="cuda") % 50
    got = sample_kernels.choose(logits, temps, streams, steps)
    want = choose.choose(logits, temps, streams, steps)
    kernels = (f"sampling kernels vs eager choose: {int((got[0] != want[0]).sum())} of 256 "
               f"tokens differ, max |logprob diff| {float((got[1] - want[1]).abs().max()):.1e}")
    return (f"greedy tokens: graphs vs eager {agree(outs[1])}, fused vs unfused "
            f"{agree(outs[2])}; max |sampled logprob - training forward| fused "
            f"{diff(outs[0]):.4f}, unfused {diff(outs[2]):.4f} (bf16); {kernels}")


def build_model(name: str, device, adapters: int) -> LoraModel:
    """A Qwen3 shape (`qwen3_config`) with random bf16 weights and `adapters` rank-RANK
    adapters in slots 0.., their B random too (a new adapter's B is zero)."""
    torch.manual_seed(0)
    with torch.device(device):
        hf = __import__("transformers").AutoModelForCausalLM.from_config(
            qwen3_config(name), dtype=torch.bfloat16, attn_implementation="sdpa")
    model = LoraModel(hf, torch.device(device))
    for slot in range(adapters):
        model.add_adapter(slot, AdapterSpec(RANK, 32.0), torch.Generator().manual_seed(slot))
        with torch.no_grad():
            for w in model.adapter_weights(slot).values():
                w.B.normal_(0, 0.01)
    return model


def bench(name: str, batches: list[int], prompts: list[int], bandwidth: float,
          device, hf_batches: list[int], profile: list[int], placement: list[int],
          kv_dtype: str = "model") -> tuple[list[str], list[str]]:
    """Rows of the main table and of the LoRA-placement table for one model."""
    cfg = qwen3_config(name)
    model = build_model(name, device, 8)
    weights = 2 * matmul_params(cfg)
    per_adapter = adapter_bytes(model, 0)
    most = max(batches + placement)
    kv_tokens = most * (max(prompts) + NEW_TOKENS) + 4096
    batch = RunningBatch(model, lambda ids: "", [], max_num_sequences=most,
                         kv_tokens=kv_tokens, cuda_graphs=True, kv_dtype=KV_DTYPES[kv_dtype])
    value_bytes = 1 if kv_dtype == "fp8" else 2  # (the model is bf16)
    rows = [f"{name:>5} {check(model, batch, KV_DTYPES[kv_dtype])}"]
    print(rows[0], flush=True)
    for b in profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        for adapters in (1, 8):
            run_engine(model, batch, b, prompts[0], adapters, max_tokens=8)
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                run_engine(model, batch, b, prompts[0], adapters, max_tokens=32)
            print(f"profile, batch {b}, {adapters} adapters, 32 steps, by GPU time:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20,
                                            max_name_column_width=60), flush=True)
    placed = lora_placement(name, model, batch, prompts[0], placement) if placement else []
    hf_rate = {}
    for prompt_len in prompts:
        for adapters in (1, 8):
            for b in batches:
                rate, decode_rate = timed(model, batch, b, prompt_len, adapters)
                context = prompt_len + NEW_TOKENS // 2
                step_bytes = (weights + min(adapters, b) * per_adapter
                              + b * context * kv_bytes_per_token(cfg, value_bytes))
                floor = b * bandwidth / step_bytes
                hf_col, group_col, unfused_col = "", "", ""
                if adapters == 1 and prompt_len == prompts[0]:
                    group_col = f"{timed(model, batch, b, prompt_len, 1, GROUP)[1]:.0f}"
                    unfused_col = f"{run_unfused(model, batch, b, prompt_len):.0f}"
                if adapters == 1 and prompt_len == prompts[0] and b in hf_batches:
                    try:
                        hf_rate[b] = run_hf(model, b, prompt_len, device)
                        hf_col = f"{hf_rate[b]:.0f}"
                    except torch.OutOfMemoryError:
                        hf_col = "OOM"
                    gc.collect()
                    torch.cuda.empty_cache()
                line = (f"{name:>5}{prompt_len:>7}{adapters:>9}{b:>7}{rate:>10.0f}"
                        f"{decode_rate:>13.0f}{floor:>12.0f}{100 * decode_rate / floor:>9.1f}%"
                        f"{group_col:>10}{unfused_col:>9}{hf_col:>12}")
                print(line, flush=True)
                rows.append(line)
    del batch, model
    gc.collect()
    torch.cuda.empty_cache()
    return rows, placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["0.6b", "4b"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128, 256, 512])
    parser.add_argument("--prompt", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--hf-batch", type=int, nargs="*", default=[1, 32, 128])
    parser.add_argument("--profile", type=int, nargs="*", default=[], metavar="BATCH",
                        help="print the top ops of 32 decode steps at these batch sizes")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="model",
                        help="the KV cache's dtype (sample_kv_dtype); the floor counts its "
                        "bytes")
    parser.add_argument("--lora-placement", type=int, nargs="*", default=[],
                        metavar="BATCH", help="also time each place the fused step can "
                        "add LoRA B at these batch sizes (first prompt length)")
    args = parser.parse_args()
    device = "cuda"
    fastpath.compile_kernels()
    compile_sampling()
    bandwidth = copy_bandwidth(device)
    rows, placed = [], []
    for name in args.model:
        main_rows, placement_rows = bench(name, args.batch, args.prompt, bandwidth, device,
                                          args.hf_batch, args.profile, args.lora_placement,
                                          args.kv_dtype)
        rows += main_rows
        placed += placement_rows
    print(f"\nsampling, {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s,"
          f" {NEW_TOKENS} new tokens, temperature 1, LoRA rank {RANK}, CUDA graphs,"
          f" fused decode step (Triton), KV cache {args.kv_dtype}")
    print(f"{'model':>5}{'prompt':>7}{'adapters':>9}{'batch':>7}{'tok/s':>10}{'decode tok/s':>13}"
          f"{'floor tok/s':>12}{'of floor':>10}{'16/prompt':>10}{'unfused':>9}{'hf generate':>12}")
    for r in rows:
        print(r)
    if placed:
        print(f"\nWhere the fused step adds LoRA B, decode tok/s, prompt {args.prompt[0]}")
        print(f"{'model':>5}{'batch':>7}{'adapters':>9}" + "".join(f"{p:>9}" for p in PATHS))
        for r in placed:
            print(r)


if __name__ == "__main__":
    main()
