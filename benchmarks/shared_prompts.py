"""Training on RL groups: the samples of one prompt run it once (train_share_prefixes) or
each runs it again.

Qwen3 shapes with random bf16 weights, one LoRA adapter of rank 32. A tick is one
forward_backward of G groups x 16 samples: a prompt of P tokens and completions of C tokens
each, with importance_sampling's inputs as the cookbook sends them (zero advantage on the
prompt), run through the engine's Trainer in micro-batches of 8 sequences (8 x (P + C)
tokens, as benchmarks/device_rl.sh runs the recipe). Off and on alternate in one process;
the table gives row tokens a second (every datum's tokens, shared or not), the tokens the
layers ran and the speed-up. The recipe's shape is P=64, C=1024: in a micro-batch of 8
samples of one prompt, 7 share 63 of their 1,088 positions (5.1% of the tokens); longer
prompts share more.

    python -m benchmarks.shared_prompts --model 4b --shapes 64x1024 512x512 1024x256
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch

from benchmarks.engine_train import RANK, VOCAB
from benchmarks.sampler import build_model
from protocol.wire import FwdBwdRequest, WireDatum
from workers.model import LoraModel
from workers.training import fastpath, packed
from workers.training.trainer import Trainer, TrainJob, _Row, micro_batches

SAMPLES, PER_MICRO = 16, 8


def group_job(groups: int, prompt: int, completion: int, seed: int = 0) -> TrainJob:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(groups):
        head = rng.integers(0, VOCAB, prompt)
        for _ in range(SAMPLES):
            seq = np.concatenate([head, rng.integers(0, VOCAB, completion)])
            n = len(seq) - 1
            advantages = np.zeros(n, np.float32)
            advantages[prompt - 1:] = rng.normal()
            data.append(WireDatum(seq[:-1], {
                "target_tokens": seq[1:], "advantages": advantages,
                "logprobs": rng.uniform(-12, -10, n).astype(np.float32)}))
    return TrainJob(FwdBwdRequest("m", 1, "importance_sampling", {}, False, data), {}, 0)


def ran_tokens(job: TrainJob, budget: int) -> int:
    """Tokens the layers run with sharing on: the pack of each micro-batch the trainer cuts."""
    rows = [_Row(0, d, 0, True) for d in job.request.data]
    total = 0
    for micro in micro_batches(rows, budget, 1):
        data = [rows[i].datum for i in micro]
        total += packed.make_pack([d.tokens.tolist() for d in data],
                                  [d.inputs["target_tokens"].tolist() for d in data],
                                  [0] * len(data), torch.device("cpu"), share=True).num_tokens
    return total


def timed_pair(model: LoraModel, trainer: Trainer, job: TrainJob, repeats: int) -> dict:
    times: dict[bool, list[float]] = {False: [], True: []}
    for k in range(repeats + 1):  # the first round warms both up
        for share in (False, True):
            model.share_prefixes = share
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = trainer.run([job])[0]
            end.record()
            torch.cuda.synchronize()
            assert result.error is None, result.error
            for p in model.adapter_parameters(0):
                p.grad = None
            if k:
                times[share].append(start.elapsed_time(end) / 1e3)
    return {share: float(np.median(t)) for share, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["4b"])
    parser.add_argument("--shapes", nargs="+", default=["64x1024", "512x512", "1024x256"],
                        help="PROMPTxCOMPLETION tokens")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fastpath.compile_kernels()
    lines = []
    for name in args.model:
        model = build_model(name, "cuda", 1)  # slot 0: a rank-RANK adapter
        for shape in args.shapes:
            prompt, completion = map(int, shape.split("x"))
            job = group_job(args.groups, prompt, completion)
            budget = PER_MICRO * (prompt + completion)
            trainer = Trainer(model, micro_batch_tokens=budget)
            seconds = timed_pair(model, trainer, job, args.repeats)
            rows = sum(len(d.tokens) for d in job.request.data)
            ran = ran_tokens(job, budget)
            line = (f"{name:>5} {shape:>9} {len(job.request.data):>5}"
                    f"{rows / seconds[False]:>11.0f}{rows / seconds[True]:>11.0f}"
                    f"{rows:>9}{ran:>9}{seconds[False] / seconds[True]:>9.3f}x")
            print(line, flush=True)
            lines.append(line)
        del model
        torch.cuda.empty_cache()
    print(f"\nRL groups of {SAMPLES}, importance_sampling, LoRA rank {RANK}, micro-batches "
          f"of {PER_MICRO} sequences, {torch.cuda.get_device_name()}; tok/s = row tokens / s")
    print(f"{'model':>5} {'PxC':>9} {'rows':>5}{'off tok/s':>11}{'on tok/s':>11}"
          f"{'tokens':>9}{'ran (on)':>9}{'speed-up':>10}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
