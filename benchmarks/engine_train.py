"""Training-pass benchmark on one GPU: the engine's packed multi-LoRA pass vs a naive baseline.

Real Qwen3 shapes (0.6B, 4B) with random bf16 weights, LoRA rank 32 on attention + MLP,
sequence lengths drawn log-uniformly from 256 to 4096 tokens until a tick holds ~64k
tokens. Workloads, all in one process and one table:

  engine, 1 adapter         the tick's sequences all belong to one adapter
  engine, 8 / 32 adapters   the same sequences spread round-robin over 8 / 32 adapters
  engine, transformers      1 adapter through the transformers layer modules (per-sequence
    layers                  SDPA, eager element-wise ops) instead of workers.training.fastpath
  naive baseline            transformers + peft, padded batches of 8 sequences, one adapter,
                            the model's own (full-logits) loss
  optim_step, 8 adapters    AdamW on 8 rank-32 adapters

MFU = useful FLOP/s / the bf16 matmul rate measured in the same run (8192³ matmuls).
Useful FLOPs of a LoRA step per token: 4·N_matmul (forward 2N, backward 2N for activation
gradients: base weights get none) plus attention: per layer and sequence of length L,
3 · 2·L²·H·D (causal QK and PV forward = 2·L²·H·D, backward = 2× forward). LoRA's own
FLOPs (< 2% at rank 32) are not counted. N_matmul = projection + LM head parameters.

    python -m benchmarks.engine_train --model 0.6b 4b
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import time

# Packed micro-batches change length every time: let the CUDA caching allocator grow and
# reuse segments instead of fragmenting (must be set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch

from protocol.wire import FwdBwdRequest, WireDatum
from workers.default_model import QWEN3_HEAD_DIM, QWEN3_SHAPES
from workers.model import AdapterSpec, LoraModel
from workers.training import fastpath
from workers.training.optimizer import adamw_step
from workers.training.trainer import Trainer, TrainJob

SHAPES, HEAD_DIM = QWEN3_SHAPES, QWEN3_HEAD_DIM
VOCAB, RANK = 151936, 32


def qwen3_config(name: str):
    from transformers import Qwen3Config

    hidden, inter, layers, heads, kv = SHAPES[name]
    return Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=HEAD_DIM, tie_word_embeddings=True,
                       max_position_embeddings=8192, architectures=["Qwen3ForCausalLM"])


def matmul_params(cfg) -> int:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * d * 2 + h * cfg.num_key_value_heads * d * 2
    return cfg.num_hidden_layers * (attn + 3 * h * i) + h * cfg.vocab_size


def step_flops(cfg, lengths: list[int]) -> float:
    attn = sum(3 * 2 * L * L * cfg.num_attention_heads * cfg.head_dim for L in lengths)
    return 4 * matmul_params(cfg) * sum(lengths) + cfg.num_hidden_layers * attn


def draw_lengths(total: int, seed: int = 0) -> list[int]:
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(int(math.exp(rng.uniform(math.log(256), math.log(4096)))))
    return lengths


def measured_tflops(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def engine_jobs(lengths: list[int], adapters: int, rng: np.random.Generator) -> list[TrainJob]:
    per: list[list[WireDatum]] = [[] for _ in range(adapters)]
    for k, n in enumerate(lengths):
        seq = rng.integers(0, VOCAB, n + 1)
        per[k % adapters].append(WireDatum(seq[:-1], {"target_tokens": seq[1:],
                                                      "weights": np.ones(n, np.float32)}))
    return [TrainJob(FwdBwdRequest(f"m{s}", 1, "cross_entropy", {}, False, data), {}, s)
            for s, data in enumerate(per)]


def run_engine(model: LoraModel, lengths, adapters: int, repeats: int, fast: bool = True,
               **trainer_args) -> dict:
    model.fast = fast
    for slot in range(adapters):
        model.add_adapter(slot, AdapterSpec(RANK, 32.0, train_unembed=False),
                          torch.Generator().manual_seed(slot))
    jobs = engine_jobs(lengths, adapters, np.random.default_rng(0))
    trainer = Trainer(model, **trainer_args)
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: trainer.run(jobs), repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30
    optim = None
    if adapters == 8:
        optim = time_optim([model.adapter_parameters(s) for s in range(adapters)], repeats)
    for slot in range(adapters):
        model.drop_adapter(slot)
    return {"seconds": seconds, "peak_gib": peak, "optim": optim,
            "budget": trainer.budget()}


def time_optim(params: list[list[torch.Tensor]], repeats: int) -> float:
    """One optim_step of every adapter: AdamW with clipping, moments kept between steps."""
    grads = [[torch.randn_like(t) for t in p] for p in params]
    states: list = [None] * len(params)

    def step() -> None:
        for i, p in enumerate(params):
            for t, g in zip(p, grads[i], strict=True):
                t.grad = g
            states[i], _ = adamw_step(p, states[i], learning_rate=1e-4, beta1=0.9,
                                      beta2=0.95, eps=1e-8, weight_decay=0.0,
                                      grad_clip_norm=1.0)

    return timed(step, repeats)


def check_fastpath(model: LoraModel) -> str:
    """The fast path (varlen flash, grouped LoRA, compiled kernels) and the transformers
    layers, both in bf16, against the transformers layers in fp32, on a short pack of two
    adapters: largest log-prob error and relative error of one adapter's gradient."""
    for slot in (0, 1):
        model.add_adapter(slot, AdapterSpec(RANK, 32.0), torch.Generator().manual_seed(slot))
        with torch.no_grad():
            for w in model.adapter_weights(slot).values():
                w.B.normal_(0, 0.02)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, VOCAB, n + 1).tolist() for n in (700, 1500, 300)]
    args = ([s[:-1] for s in seqs], [s[1:] for s in seqs], [0, 1, 0], [True] * 3,
            lambda row, offset, lp: -lp)
    out = {}
    for label, fast, dtype in (("fp32", False, torch.float32), ("hf", False, torch.bfloat16),
                               ("fast", True, torch.bfloat16)):
        inv_freq = model.hf.model.rotary_emb.inv_freq.clone()
        model.hf.to(dtype)
        model.hf.model.rotary_emb.inv_freq = inv_freq
        model.fast = fast
        out[label] = model.packed_pass(*args)
    for slot in (0, 1):
        model.drop_adapter(slot)
    ref = out["fp32"]

    def errors(r) -> str:
        dlp = max(float((a - b).abs().max()) for a, b in zip(ref.logprobs, r.logprobs,
                                                              strict=True))
        num = sum(float((a - b).norm() ** 2) for a, b in zip(ref.grads[0], r.grads[0],
                                                             strict=True))
        den = sum(float(a.norm() ** 2) for a in ref.grads[0])
        return f"max |Δ logprob| {dlp:.4f}, gradient {math.sqrt(num / den):.4f}"

    return (f"vs fp32 (2,500 tokens, 2 adapters): fast path {errors(out['fast'])}; "
            f"transformers layers {errors(out['hf'])}")


def run_naive(cfg, lengths, batch: int, repeats: int, device) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                              attn_implementation="sdpa")
    model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, VOCAB, n) for n in lengths]

    def step() -> None:
        for k in range(0, len(seqs), batch):
            group = seqs[k : k + batch]
            width = max(len(s) for s in group)
            ids = torch.zeros(len(group), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(group):
                ids[r, : len(s)] = torch.as_tensor(s, device=device)
                mask[r, : len(s)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, repeats)
    return {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def profile_tick(model: LoraModel, lengths: list[int], adapters: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for slot in range(adapters):
        model.add_adapter(slot, AdapterSpec(RANK, 32.0, train_unembed=False),
                          torch.Generator())
    jobs = engine_jobs(lengths, adapters, np.random.default_rng(0))
    trainer = Trainer(model)
    trainer.run(jobs)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.run(jobs)
        torch.cuda.synchronize()
    print(f"profile, {adapters} adapter(s):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                    max_name_column_width=40), flush=True)
    for slot in range(adapters):
        model.drop_adapter(slot)


def bench(name: str, tokens: int, repeats: int, peak_tflops: float, device,
          profile: tuple[int, ...] = ()) -> list[str]:
    cfg = qwen3_config(name)
    lengths = draw_lengths(tokens)
    flops = step_flops(cfg, lengths)
    n_tok = sum(lengths)
    rows = []

    def row(label: str, r: dict) -> str:
        mfu = flops / r["seconds"] / (peak_tflops * 1e12)
        line = (f"{name:>5} {label:<34}{n_tok / r['seconds']:>10.0f}{100 * mfu:>7.1f}%"
                f"{r['peak_gib']:>9.1f}{r.get('budget', ''):>12}")
        print(line, flush=True)  # progress, in case a later workload runs out of time
        return line

    with torch.device(device):
        hf = __import__("transformers").AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = LoraModel(hf, torch.device(device))
    fastpath.compile_kernels()
    results = {}
    check = check_fastpath(model)
    print(check, flush=True)
    for adapters in profile:
        profile_tick(model, lengths, adapters)
    for adapters in (1, 8, 32):
        results[adapters] = run_engine(model, lengths, adapters, repeats)
        rows.append(row(f"engine, {adapters} adapter(s)", results[adapters]))
    fixed = run_engine(model, lengths, 1, repeats, micro_batch_tokens=8192)
    rows.append(row("engine, 1, 8k-token micro-batches", fixed))
    eager = run_engine(model, lengths, 1, repeats, fast=False)
    rows.append(row("engine, 1, transformers layers", eager))
    del model, hf
    _release()
    naive = None
    for batch in (8, 4, 2, 1):  # the baseline runs last, so its memory never crowds ours
        try:
            naive = run_naive(cfg, lengths, batch, repeats, device)
            rows.append(row(f"naive baseline (padded, batch {batch})", naive))
            break
        except torch.OutOfMemoryError:
            _release()
    _release()
    speedup = naive["seconds"] / results[1]["seconds"] if naive else float("nan")
    rows.append(f"{name:>5} {check}")
    rows.append(f"{name:>5} engine(1) / naive speed-up {speedup:.2f}x; 8 adapters / 1 adapter "
                f"{results[1]['seconds'] / results[8]['seconds']:.2f}x; micro-batch budget "
                f"{results[1]['budget']} tokens; optim_step, 8 adapters: "
                f"{1000 * results[8]['optim']:.1f} ms")
    return rows


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["0.6b", "4b"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per tick")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, nargs="*", default=[], metavar="ADAPTERS",
                        help="print the top GPU kernels of one engine tick with this many "
                             "adapters (e.g. --profile 1 8)")
    args = parser.parse_args()
    device = "cuda"
    peak = measured_tflops(device)
    rows = []
    for name in args.model:
        rows += bench(name, args.tokens, args.repeats, peak, device, args.profile)
    print(f"\ntraining pass, {torch.cuda.get_device_name()}, measured bf16 matmul "
          f"{peak:.0f} TFLOP/s, ~{args.tokens} tokens/tick, lengths 256-4096, LoRA rank {RANK}")
    print(f"{'model':>5} {'workload':<34}{'tok/s':>10}{'MFU':>8}{'peak GiB':>9}"
          f"{'micro-batch':>12}")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
