"""Submit one supervised epoch as a Celery chain, print its batch id, and exit.

    python examples/sl_chain.py                    # one epoch on the served base model
    python -m tasks.batch status <batch-id>        # progress and losses (--wait 60 blocks)

The chain: create a LoRA run; forward_backward (cross_entropy) + optim_step per minibatch;
save_weights_for_sampler; one greedy sample from the saved weights. Every call is written to
the database and the chain's first call is sent to the worker's queue before the script
exits; the worker sends each next call when the previous one is stored.

Run it from the repository root with the service's settings (DATABASE_URL, REDIS_URL,
TINKERQ_DATA_DIR, TINKERQ_QUEUE, ...): none for a plain `honcho start`, or `honcho run python
examples/sl_chain.py` to load the same .env. With `--batch-id NAME`, running it again finds
the same calls and sends them again; nothing trains twice.
"""

from __future__ import annotations

import argparse
import os

from celery import chain
from tinker import types
from tokenizers import Tokenizer

from config import model_dir
from tasks import celery_app  # built from the environment's settings, like the service's
from tasks.batch import Batch

# (prompt, completion): the completion is what the model learns to continue with.
PAIRS = [
    ("The capital of France is", " Paris."),
    ("The capital of Japan is", " Tokyo."),
    ("Two plus two equals", " four."),
    ("The sky on a clear day is", " blue."),
    ("Water freezes at zero degrees", " Celsius."),
    ("The largest planet is", " Jupiter."),
    ("A week has seven", " days."),
    ("The opposite of hot is", " cold."),
]


def datum(tokenizer: Tokenizer, prompt: str, completion: str) -> dict:
    """Next-token targets over prompt + completion; only the completion is weighted."""
    p = tokenizer.encode(prompt).ids
    tokens = p + tokenizer.encode(completion).ids
    weights = [0.0] * (len(p) - 1) + [1.0] * (len(tokens) - len(p))
    return {"model_input": tokens[:-1],
            "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": weights}}


def main() -> None:
    settings = celery_app.conf.tinkerq_settings
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-id", help="fixed id: a re-run dedupes (default: a new id)")
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"))
    parser.add_argument("--base-model", default=settings.base_model)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(str(model_dir(settings) / "tokenizer.json"))
    data = [datum(tokenizer, p, c) for p, c in PAIRS]
    batch = Batch.open(args.api_key, batch_id=args.batch_id, name="sl_chain")
    run = batch.create_model(args.base_model, rank=args.rank, seed=0)
    steps = [run.create]
    adam = types.AdamParams(learning_rate=args.learning_rate)
    for _ in range(args.epochs):
        for i in range(0, len(data), args.batch_size):
            steps.append(run.forward_backward(data[i : i + args.batch_size], "cross_entropy"))
            steps.append(run.optim_step(adam))
    steps.append(run.save_weights_for_sampler("final"))
    sampler = batch.sampler(model_path=run.sampler_path("final"))
    prompt = tokenizer.encode(PAIRS[0][0]).ids
    steps.append(sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)))
    chain(*steps).apply_async()

    print(f"batch: {batch.id}")
    print(f"sent {len(steps)} calls as one chain: model {run.model_id}, "
          f"{args.epochs} epoch(s) of {len(data)} examples, then {run.sampler_path('final')}")
    print(f"progress: python -m tasks.batch status {batch.id}")


if __name__ == "__main__":
    main()
