"""RL through tinker-cookbook's training loop against tinkerq: learn to write even token ids.

The task is small enough for the random-weight default model to learn from scratch, and anyone
can check its reward offline. Each episode is one prompt of a few token ids, drawn from a fixed
pool. The policy samples `--max-tokens` tokens with no stop condition, and the reward is the
fraction of sampled ids that are even. A random policy scores about 0.5. Everything else is the
cookbook's: `tinker_cookbook.rl.train.main` samples each group, centres rewards within the
group, trains with `--loss-fn` (importance_sampling, ppo or cispo) and logs `metrics.jsonl`.

Why it learns: the random model's next-token distribution is close to uniform over 151,936
ids, so learning means piling probability onto a few even ids that were sampled in a context
and rewarded. That works when contexts recur, hence the fixed prompt pool, and it needs a
learning rate far above a real model's (5e-2 with LoRA rank 8). The reward jumps from 0.5 to
about 1.0 once the sampled positions lock in, with the defaults within about ten steps.

Run it against a running tinkerq (`honcho start`), then look at `<log-dir>/reward.png`:

    python -m examples.rl_cookbook --base-url http://localhost:8000 --log-dir /tmp/rl-even

The cookbook loads the tokenizer by model name from the Hugging Face hub. For the built-in
`tinkerq/tiny-qwen3`, this script instead registers the tokenizer folder that the server
reports (`TrainingClient.get_tokenizer()`), so nothing is downloaded but the script must run on
the server's machine (or take `--tokenizer PATH`). The log dir must be new: the cookbook would
resume from the checkpoints of an earlier run there.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import chz
import tinker
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.rl import train
from tinker_cookbook.rl.types import (
    Action,
    ActionExtra,
    Env,
    EnvGroupBuilder,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)

from examples import add_server_args, prepare_log_dir

DEFAULT_MODEL = "tinkerq/tiny-qwen3"
LOSS_FNS = ("importance_sampling", "ppo", "cispo")
REWARD_KEY = "env/all/reward/total"
FIRST_SPECIAL_ID = 151643  # Qwen's <|endoftext|>; prompts use ordinary tokens below it


def even_fraction(tokens: Sequence[int]) -> float:
    """The reward: the share of token ids that are even (0 for an empty action)."""
    return sum(t % 2 == 0 for t in tokens) / len(tokens) if tokens else 0.0


class EvenTokensEnv(Env):
    """One prompt, one sampled completion, one reward."""

    def __init__(self, prompt: Sequence[int]):
        self.prompt = list(prompt)

    async def initial_observation(self) -> tuple[tinker.ModelInput, StopCondition]:
        return tinker.ModelInput.from_ints(self.prompt), []  # [] = no stop: max_tokens each

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        reward = even_fraction(action)
        return StepResult(
            reward=reward,
            episode_done=True,
            next_observation=tinker.ModelInput.from_ints([]),
            next_stop_condition=[],
            metrics={"even_fraction": reward},
        )


@dataclass(frozen=True)
class EvenTokensGroupBuilder(EnvGroupBuilder):
    """`group_size` episodes on the same prompt; the loop centres rewards within the group."""

    prompt: tuple[int, ...]
    group_size: int

    async def make_envs(self) -> Sequence[Env]:
        return [EvenTokensEnv(self.prompt) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return ["even_tokens"]


class EvenTokensDataset(RLDataset):
    """`num_batches` batches of `batch_size` groups, on prompts drawn from a seeded pool of
    `num_prompts` random prompts."""

    def __init__(self, batch_size: int, group_size: int, num_batches: int, num_prompts: int,
                 prompt_len: int, seed: int):
        self.batch_size, self.group_size, self.num_batches = batch_size, group_size, num_batches
        rng = random.Random(seed)
        self.prompts = [tuple(rng.randrange(FIRST_SPECIAL_ID) for _ in range(prompt_len))
                        for _ in range(num_prompts)]
        self.seed = seed

    def get_batch(self, index: int) -> Sequence[EvenTokensGroupBuilder]:
        rng = random.Random(self.seed * 1_000_003 + index)
        prompts = rng.sample(self.prompts, min(self.batch_size, len(self.prompts)))
        return [EvenTokensGroupBuilder(p, self.group_size) for p in prompts]

    def __len__(self) -> int:
        return self.num_batches


@chz.chz
class EvenTokensDatasetBuilder(RLDatasetBuilder):
    batch_size: int = 8
    group_size: int = 4
    num_batches: int = 30
    num_prompts: int = 8
    prompt_len: int = 4
    seed: int = 0

    async def __call__(self) -> tuple[EvenTokensDataset, None]:
        return EvenTokensDataset(self.batch_size, self.group_size, self.num_batches,
                                 self.num_prompts, self.prompt_len, self.seed), None


def build_config(args: argparse.Namespace) -> train.Config:
    dataset = EvenTokensDatasetBuilder(
        batch_size=args.batch_size, group_size=args.group_size, num_batches=args.steps,
        num_prompts=args.num_prompts, prompt_len=args.prompt_len, seed=args.seed,
    )
    return train.Config(
        learning_rate=args.learning_rate,
        dataset_builder=dataset,
        model_name=args.model,
        recipe_name="tinkerq_even_tokens",
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        log_path=str(args.log_dir),
        loss_fn=args.loss_fn,
        lora_rank=args.lora_rank,
        base_url=args.base_url,
        eval_every=0,
        save_every=0,
        num_groups_to_log=0,
        rollout_json_export=False,
    )


def reward_curve(log_dir: Path) -> list[tuple[int, float]]:
    """(step, mean reward of the step's rollouts) from the cookbook's metrics.jsonl."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [(int(r["step"]), float(r[REWARD_KEY])) for r in rows if REWARD_KEY in r]


def write_curve(curve: list[tuple[int, float]], log_dir: Path, title: str) -> None:
    """reward.csv and reward.png in `log_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_dir / "reward.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "mean_reward"])
        writer.writerows((step, f"{reward:.4f}") for step, reward in curve)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s for s, _ in curve], [r for _, r in curve], marker="o", markersize=3)
    ax.axhline(0.5, color="grey", linestyle=":", label="random policy")
    ax.set(xlabel="training step", ylabel="mean reward (even-id fraction)", ylim=(0, 1.02),
           title=title)
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(log_dir / "reward.png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[tuple[int, float]]:
    """Train, write reward.csv / reward.png into args.log_dir, return the reward curve."""
    prepare_log_dir(args)
    asyncio.run(train.main(build_config(args)))
    curve = reward_curve(args.log_dir)
    title = (f"{args.model}, {args.loss_fn}: {args.batch_size} prompts x {args.group_size} "
             f"samples x {args.max_tokens} tokens per step")
    write_curve(curve, args.log_dir, title)
    return curve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(p, DEFAULT_MODEL)
    p.add_argument("--loss-fn", choices=LOSS_FNS, default="importance_sampling")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="groups (prompts) per step")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=8, help="size of the prompt pool")
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=5e-2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=Path("var/examples/rl_cookbook"))
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    curve = run(args)
    k = max(1, len(curve) // 5)
    first, last = curve[:k], curve[-k:]
    print(f"mean reward, first {k} steps: {sum(r for _, r in first) / k:.3f}; "
          f"last {k} steps: {sum(r for _, r in last) / k:.3f}; "
          f"curve in {args.log_dir / 'reward.png'}")


if __name__ == "__main__":
    main()
