"""RL reference loop through the real `tinker` SDK against a running tinkerq: time per step.

What an RL user's loop does, step after step, with one LoRA training client:

  sampling   save_weights_and_get_sampling_client (no path), then every prompt's sample
             request (num_samples = --samples, temperature 1, --max-tokens, no stop
             condition) submitted at once, and all awaited
  training   forward_backward(loss_fn = --loss-fn) on one datum per sample, and optim_step
             (Adam), both submitted before either is awaited

The task is a toy, chosen so that nothing needs a tokenizer or a dataset: prompts are
--prompt-tokens random ordinary Qwen token ids (a fixed NumPy seed, the same every step), the
reward of a sample is the fraction of its token ids that are even (about 0.5 for a random
policy), and a sample's advantage is its reward minus the mean of its prompt's group. Each
datum carries the sampler's logprobs (`logprobs`), the advantage on every sampled token
(`advantages`, 0 on the prompt) and the `target_tokens`, as tinker's importance_sampling,
ppo and cispo losses take them.

Per step (printed as it finishes): sampling, training and total seconds, sampled tokens and
their rate, training tokens (the datums' input tokens) and their rate, mean reward. Summary:
means over the steps after the first (the first also pays for warm-up and compilation).
--time-budget stops starting new steps once that many seconds of steps have passed; on
SIGTERM (e.g. from `timeout`) the summary of the finished steps is printed before exiting.

    python -m benchmarks.rl_reference --base-url http://localhost:8000 --steps 20
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

FIRST_SPECIAL_ID = 151643  # Qwen's <|endoftext|>: prompts use the ordinary ids below it
DEFAULT_API_KEY = "tml-rl-reference"


@dataclass
class StepStats:
    step: int
    sample_s: float
    train_s: float
    sampled_tokens: int
    train_tokens: int
    mean_reward: float

    @property
    def total_s(self) -> float:
        return self.sample_s + self.train_s


def even_fraction(tokens: np.ndarray) -> float:
    """The toy reward: the share of token ids that are even (0 for an empty sample)."""
    return float(np.mean(tokens % 2 == 0)) if len(tokens) else 0.0


def make_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, FIRST_SPECIAL_ID, size=(count, length)).tolist()


def rl_datum(types, prompt: list[int], tokens: np.ndarray, logprobs: np.ndarray,
             advantage: float):
    """One importance-sampling datum: inputs prompt + sample[:-1], targets the next tokens;
    the prompt's targets carry no advantage (and a placeholder logprob of 0)."""
    prompt_targets = len(prompt) - 1
    full = np.concatenate([np.asarray(prompt, dtype=np.int64), tokens.astype(np.int64)])
    sampler_lp = np.concatenate([np.zeros(prompt_targets, np.float32),
                                 logprobs.astype(np.float32)])
    advantages = np.concatenate([np.zeros(prompt_targets, np.float32),
                                 np.full(len(tokens), advantage, np.float32)])
    return types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1].tolist()),
        loss_fn_inputs={"target_tokens": full[1:], "logprobs": sampler_lp,
                        "advantages": advantages},
    )


def run_step(types, tc, prompts: list[list[int]], args, step: int) -> StepStats:
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    start = time.perf_counter()
    sampler = tc.save_weights_and_get_sampling_client().result()
    futures = [sampler.sample(types.ModelInput.from_ints(p), args.samples, params)
               for p in prompts]
    results = [f.result() for f in futures]
    sampled = time.perf_counter()

    data, rewards, sampled_tokens = [], [], 0
    for prompt, res in zip(prompts, results, strict=True):
        seqs = [(np.asarray(s.tokens, dtype=np.int64), np.asarray(s.logprobs, dtype=np.float32))
                for s in res.sequences]
        group = np.array([even_fraction(tokens) for tokens, _ in seqs])
        rewards.extend(group)
        for (tokens, logprobs), reward in zip(seqs, group, strict=True):
            sampled_tokens += len(tokens)
            if len(tokens):
                data.append(rl_datum(types, prompt, tokens, logprobs,
                                     float(reward - group.mean())))
    train_tokens = sum(d.model_input.length for d in data)

    adam = types.AdamParams(learning_rate=args.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    train_start = time.perf_counter()
    fb = tc.forward_backward(data, args.loss_fn)
    opt = tc.optim_step(adam)
    fb.result()
    opt.result()
    done = time.perf_counter()
    return StepStats(step, sampled - start, done - train_start, sampled_tokens, train_tokens,
                     float(np.mean(rewards)))


HEADER = (f"{'step':>4}{'sample s':>10}{'train s':>9}{'total s':>9}{'sampled tok':>13}"
          f"{'sample tok/s':>14}{'train tok':>11}{'train tok/s':>13}{'reward':>8}")


def row(s: StepStats) -> str:
    return (f"{s.step:>4}{s.sample_s:>10.2f}{s.train_s:>9.2f}{s.total_s:>9.2f}"
            f"{s.sampled_tokens:>13}{s.sampled_tokens / s.sample_s:>14.0f}"
            f"{s.train_tokens:>11}{s.train_tokens / s.train_s:>13.0f}{s.mean_reward:>8.3f}")


def summary(stats: list[StepStats], workload: str, setup_s: float) -> str:
    steady = stats[1:] or stats  # the first step also warms up (compiles, allocates)
    mean = {k: float(np.mean([getattr(s, k) for s in steady]))
            for k in ("sample_s", "train_s", "total_s", "sampled_tokens", "train_tokens")}
    label = f"mean of steps 2-{len(stats)}" if len(stats) > 1 else "step 1 only"
    lines = [
        "",
        f"RL reference (tinker SDK), {workload}",
        f"steps done {len(stats)}; training client setup {setup_s:.1f} s; "
        f"first step {stats[0].total_s:.1f} s; rewards {stats[0].mean_reward:.3f} -> "
        f"{stats[-1].mean_reward:.3f} (toy task: fraction of even token ids)",
        f"{'':<24}{'step s':>9}{'sampling s':>12}{'training s':>12}{'sampled tok/s':>15}"
        f"{'train tok/s':>13}",
        f"{label:<24}{mean['total_s']:>9.2f}{mean['sample_s']:>12.2f}{mean['train_s']:>12.2f}"
        f"{mean['sampled_tokens'] / mean['sample_s']:>15.0f}"
        f"{mean['train_tokens'] / mean['train_s']:>13.0f}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", DEFAULT_API_KEY))
    p.add_argument("--base-model", default=None,
                   help="a model name the server serves (default: its first)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--samples", type=int, default=16, help="num_samples per prompt")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--loss-fn", default="importance_sampling",
                   choices=("importance_sampling", "ppo", "cispo"))
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; no new step starts once the steps so far took this long")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[StepStats]:
    args = parse_args(argv)
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    # The SDK warns on every long-poll "try_again" (a request waiting longer than the server's
    # long_poll_seconds): hundreds of lines per step here, none of them news.
    logging.getLogger("tinker").setLevel(logging.ERROR)
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    rest = tinker.RestClient(base_url=args.base_url, api_key=args.api_key)
    caps = rest.get_server_capabilities().result()
    base_model = args.base_model or caps.supported_models[0].model_name
    workload = (f"base model {base_model}: {args.prompts} prompts x {args.samples} samples, "
                f"{args.prompt_tokens} prompt + {args.max_tokens} sampled tokens, temperature 1, "
                f"LoRA rank {args.lora_rank}, {args.loss_fn}, lr {args.learning_rate:g}, "
                f"{args.steps} steps" + (f", budget {args.time_budget:g} s"
                                        if args.time_budget else ""))
    print(workload, flush=True)

    start = time.perf_counter()
    tc = service.create_lora_training_client(base_model, rank=args.lora_rank,
                                             seed=args.seed).result()
    setup_s = time.perf_counter() - start
    prompts = make_prompts(args.prompts, args.prompt_tokens, args.seed)

    print(HEADER, flush=True)
    stats: list[StepStats] = []
    loop_start = time.perf_counter()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        for step in range(1, args.steps + 1):
            spent = time.perf_counter() - loop_start
            if args.time_budget is not None and spent > args.time_budget:
                print(f"time budget of {args.time_budget:g} s spent: stopping after "
                      f"{len(stats)} steps", flush=True)
                break
            stats.append(run_step(types, tc, prompts, args, step))
            print(row(stats[-1]), flush=True)
    except (Terminated, KeyboardInterrupt) as e:
        print(f"{type(e).__name__} during step {len(stats) + 1}", flush=True)
        if stats:
            print(summary(stats, workload, setup_s), flush=True)
        os._exit(124)  # the SDK's threads may still wait on requests in flight
    if stats:
        print(summary(stats, workload, setup_s), flush=True)
    return stats


class Terminated(Exception):
    """SIGTERM arrived (from `timeout`, say)."""


def _terminated(signum, frame) -> None:
    raise Terminated




if __name__ == "__main__":
    main(sys.argv[1:])
