"""Data-parallel scaling of the worker: training and sampling tokens/s at D replicas.

Everything goes through the worker's executor as the engine drives it (`Executor.build` with
`data_parallel_size=D`: rank 0 starts D-1 follower processes, one GPU each, and every plan
goes to every rank; datums and sample sequences are dealt to the replicas, results merged,
LoRA gradients all-reduced at optim_step). Qwen3 shapes (default 4B) with random bf16
weights, written once to a temporary folder that every rank loads.

  train     one forward_backward of ~64k tokens (sequences of 256 to 4096 tokens, as
            `engine_train`) + its optim_step, one rank-32 adapter: tokens/s over 3 ticks
  sample    128 requests of 1 sample (128-token prompts, 256 new tokens, temperature 1) on
            the same adapter, admitted in one tick: sampled tokens/s, prefill included
  scaling   rate_D / (D x rate_1)

With one GPU (or none: --device cpu --model tiny) only D=1 runs on it; the results of D=2
are checked against D=1 over gloo on the CPU by tests/unit/test_dp_worker.py.

    python -m benchmarks.dp_scaling --model 4b --sizes 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch

from benchmarks.engine_train import RANK, draw_lengths, qwen3_config
from config import load_settings
from protocol.jobs import Job
from workers.executor import Executor
from workers.scheduler import Plan

ADAM = {"adam_params": {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                        "weight_decay": 0.0, "grad_clip_norm": 1.0}}


def write_model(name: str, folder: Path) -> Path:
    """A random-weight Qwen3 of shape `name` saved to `folder` (with a tokenizer)."""
    from transformers import AutoModelForCausalLM

    from workers.default_model import write_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        hf = AutoModelForCausalLM.from_config(qwen3_config(name), dtype=torch.bfloat16)
    hf.save_pretrained(folder)
    write_tokenizer(folder)
    del hf
    return folder


def fwdbwd(seq: int, tokens: int, vocab: int) -> Job:
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    rng, data = np.random.default_rng(seq), []
    for n in draw_lengths(tokens, seed=seq):
        ids = rng.integers(0, vocab, n + 1)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                                loss_fn_inputs={"target_tokens": ids[1:].astype(np.int64),
                                                "weights": np.ones(n, dtype=np.float32)}))
    request = types.ForwardBackwardRequest(model_id="a", seq_id=seq,
                                           forward_backward_input=types.ForwardBackwardInput(
                                               data=data, loss_fn="cross_entropy"))
    return Job(request_id=f"fb{seq}", kind="forward_backward", model_id="a", seq_id=seq,
               payload=forward_backward_request_to_proto(request).SerializeToString())


def samples(n: int, max_tokens: int, vocab: int, tick: int) -> list[Job]:
    rng = np.random.default_rng(tick)
    return [Job(request_id=f"s{tick}-{i}", kind="sample", payload=json.dumps({
        "prompt": rng.integers(0, vocab, 128).tolist(), "num_samples": 1,
        "max_tokens": max_tokens, "temperature": 1.0, "top_k": -1, "top_p": 1.0,
        "seed": i, "stop_strings": [], "stop_token_ids": [], "stop_at_eos": False,
        "prompt_logprobs": False, "topk_prompt_logprobs": 0,
        "adapter_dir": None}).encode()) for i in range(n)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(d: int, folder: Path, device: str, tokens: int, repeats: int,
            new_tokens: int) -> dict:
    data = tempfile.mkdtemp(prefix="tinkerq-dp-")
    ex = Executor.build(load_settings(env={}, data_dir=data, base_model=str(folder),
                                      device=device, data_parallel_size=d, random_seed=0,
                                      max_lora_adapters=2, sample_max_num_sequences=256))
    try:
        vocab = ex.model.vocab_size
        ex.run(Plan(barriers=[Job(request_id="c", kind="create_model", model_id="a",
                                  payload=json.dumps({"model_id": "a", "base_model": "b",
                                                      "lora": {"rank": RANK, "seed": 0}})
                                  .encode())]))
        seq, times = 1, []
        for i in range(repeats + 1):  # the first: compile and allocator warm-up
            job = fwdbwd(seq, tokens, vocab)
            sync()
            start = time.perf_counter()
            out = ex.run(Plan(train=[job]))
            ex.run(Plan(barriers=[Job(request_id=f"o{seq}", kind="optim_step", model_id="a",
                                      seq_id=seq + 1, payload=json.dumps(ADAM).encode())]))
            sync()
            assert out[job.request_id].ok, out[job.request_id].error
            times.append(time.perf_counter() - start) if i else None
            seq += 2
        trained = sum(draw_lengths(tokens, seed=1))
        rates = {}
        for tick, max_tokens in ((0, 8), (1, new_tokens)):  # the first: graph capture
            sync()
            start = time.perf_counter()
            got = ex.run(Plan(samples=samples(128, max_tokens, vocab, tick)))
            while ex.busy:
                got.update(ex.run(Plan()))
            sync()
            assert len(got) == 128 and all(o.ok for o in got.values())
            rates[tick] = 128 * max_tokens / (time.perf_counter() - start)
        return {"train": trained / float(np.median(times)), "sample": rates[1]}
    finally:
        if ex.leader is not None:
            ex.leader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="4b", help="a Qwen3 size (0.6b, 4b) or 'tiny'")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=1 << 16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256, help="per sample")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    # (on the CPU every D runs, over gloo: a check of the path, not a measure of scaling)
    sizes = [d for d in args.sizes if d <= gpus or args.device == "cpu"]
    with tempfile.TemporaryDirectory(prefix="tinkerq-model-") as tmp:
        if args.model == "tiny":
            from workers.default_model import ensure_default_model

            folder = Path(tmp) / "tiny"
            ensure_default_model(folder)
        else:
            folder = write_model(args.model, Path(tmp) / args.model)
        rows, base = [], None
        for d in sizes:
            r = measure(d, folder, args.device, args.tokens, args.repeats, args.new_tokens)
            base = base or r
            rows.append(f"{d:>4}{r['train']:>14,.0f}{r['train'] / (d * base['train']):>9.2f}"
                        f"{r['sample']:>15,.0f}{r['sample'] / (d * base['sample']):>9.2f}")
    card = torch.cuda.get_device_name() if gpus else "CPU"
    print(f"\ndata parallelism through the executor, Qwen3-{args.model} shapes, {card} "
          f"x{max(gpus, 1)}; train: ~{args.tokens} tokens + optim_step per tick, 1 adapter "
          f"rank {RANK}; sample: 128 x 1 sample, 128-token prompts, {args.new_tokens} new "
          "tokens")
    print(f"{'D':>4}{'train tok/s':>14}{'scaling':>9}{'sample tok/s':>15}{'scaling':>9}")
    for row in rows:
        print(row)
    skipped = [d for d in args.sizes if d not in sizes]
    if skipped:
        print(f"(D = {skipped} not run: {max(gpus, 1)} device(s) here)")


if __name__ == "__main__":
    main()
