"""Scripts that show Tinker users' code running against tinkerq (run each with `python -m
examples.<name>`; each module's docstring says how).

`use_served_tokenizer` is what the tinker-cookbook examples need beyond the SDK: the cookbook
loads a tokenizer by model name from the Hugging Face hub, and `tinkerq/tiny-qwen3` is not
there. `add_server_args` and `prepare_log_dir` are the cookbook examples' shared command line
and set-up. Imports happen inside the functions, so importing this package costs nothing.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_server_args(p: argparse.ArgumentParser, default_model: str) -> None:
    """--base-url, --api-key, --model and --tokenizer, as the cookbook examples take them."""
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default="tml-local",
                   help="used when TINKER_API_KEY is not set")
    p.add_argument("--model", default=default_model)
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder; default: the one the server reports")


def prepare_log_dir(args: argparse.Namespace) -> None:
    """Before a cookbook run: refuse a log dir holding an earlier run (the cookbook would
    resume from its checkpoints), set the API key, make the dir, register the tokenizer."""
    if (args.log_dir / "metrics.jsonl").exists():
        raise SystemExit(f"{args.log_dir} holds an earlier run; pass a new --log-dir")
    os.environ.setdefault("TINKER_API_KEY", args.api_key)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    use_served_tokenizer(args.base_url, args.model, args.tokenizer)


def use_served_tokenizer(base_url: str, model_name: str, path: str | None = None) -> Any:
    """Make the cookbook's `get_tokenizer(model_name)` return a local tokenizer; return it.

    With no `path`, ask the server: a training client's `get_tokenizer()` loads the folder
    that tinkerq reports for the model, which exists on the server's machine. The client is
    a throwaway rank-1 adapter; it costs one `create_model` call.
    """
    from tinker_cookbook.tokenizer_utils import register_tokenizer

    if path is None:
        import tinker

        with tinker.ServiceClient(base_url=base_url) as service:
            client = service.create_lora_training_client(model_name, rank=1).result()
            tokenizer = client.get_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    register_tokenizer(model_name, lambda: tokenizer)
    return tokenizer
