"""Supervised fine-tuning through tinker-cookbook's loop against tinkerq, on an in-memory set.

The data is a few dozen chat pairs made up here ("Count on from 7." -> "7 8 9 10"), rendered
with the cookbook's `qwen3_disable_thinking` renderer and the tokenizer the server reports
(no download), and trained with `tinker_cookbook.supervised.train.main`: `cross_entropy` on
the assistant tokens, linear learning-rate decay, `metrics.jsonl` in the log dir.

Run it against a running tinkerq (`honcho start`):

    python -m examples.sl_cookbook --base-url http://localhost:8000 --log-dir /tmp/sl-count

The cookbook loads the tokenizer by model name from the Hugging Face hub; for the built-in
`tinkerq/tiny-qwen3` this script registers the tokenizer folder the server reports instead
(see `examples.use_served_tokenizer`). The log dir must be new: the cookbook would resume from
the checkpoints of an earlier run there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
from pathlib import Path

import chz
import tinker
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.supervised.types import (
    ChatDatasetBuilder,
    ChatDatasetBuilderCommonConfig,
    SupervisedDataset,
)

from examples import add_server_args, prepare_log_dir

DEFAULT_MODEL = "tinkerq/tiny-qwen3"
RENDERER = "qwen3_disable_thinking"
NLL_KEY = "train_mean_nll"


def counting_conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` chats: the user names a start, the assistant counts on four numbers."""
    starts = random.Random(seed).sample(range(1, 90), n)
    return [
        [{"role": "user", "content": f"Count on from {s}."},
         {"role": "assistant", "content": " ".join(str(s + i) for i in range(4))}]
        for s in starts
    ]


class InMemoryDataset(SupervisedDataset):
    """Fixed datums in batches of `batch_size`, reshuffled each epoch."""

    def __init__(self, data: list[tinker.Datum], batch_size: int):
        self.data, self.batch_size = list(data), batch_size
        self.order = list(range(len(data)))

    def get_batch(self, index: int) -> list[tinker.Datum]:
        picked = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return [self.data[i] for i in picked]

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def set_epoch(self, seed: int = 0) -> None:
        self.order = list(range(len(self.data)))
        random.Random(seed).shuffle(self.order)


@chz.chz
class CountingDatasetBuilder(ChatDatasetBuilder):
    """The counting chats rendered with `common_config`'s renderer and tokenizer."""

    num_examples: int = 32
    seed: int = 0

    def __call__(self) -> tuple[InMemoryDataset, None]:
        data = [
            conversation_to_datum(chat, self.renderer, self.common_config.max_length,
                                  TrainOnWhat.LAST_ASSISTANT_MESSAGE)
            for chat in counting_conversations(self.num_examples, self.seed)
        ]
        return InMemoryDataset(data, self.common_config.batch_size), None


def build_config(args: argparse.Namespace) -> train.Config:
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=args.model, renderer_name=RENDERER, max_length=64,
        batch_size=args.batch_size,
    )
    return train.Config(
        log_path=str(args.log_dir),
        model_name=args.model,
        recipe_name="tinkerq_counting_sft",
        renderer_name=RENDERER,
        dataset_builder=CountingDatasetBuilder(
            common_config=common, num_examples=args.num_examples, seed=args.seed
        ),
        learning_rate=args.learning_rate,
        num_epochs=args.epochs,
        lora_rank=args.lora_rank,
        base_url=args.base_url,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
    )


def nll_curve(log_dir: Path) -> list[tuple[int, float]]:
    """(step, mean NLL per assistant token of the step's batch) from metrics.jsonl."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [(int(r["step"]), float(r[NLL_KEY])) for r in rows if NLL_KEY in r]


def run(args: argparse.Namespace) -> list[tuple[int, float]]:
    """Train and return the per-step training NLL."""
    prepare_log_dir(args)
    asyncio.run(train.main(build_config(args)))
    return nll_curve(args.log_dir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(p, DEFAULT_MODEL)
    p.add_argument("--num-examples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=Path("var/examples/sl_cookbook"))
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    curve = run(args)
    print("train NLL per step: " + ", ".join(f"{nll:.2f}" for _, nll in curve))


if __name__ == "__main__":
    main()
