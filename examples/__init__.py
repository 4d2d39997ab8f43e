"""Scripts that show Tinker users' code running against tinkerq (run each with `python -m
examples.<name>`; each module's docstring says how).

`use_served_tokenizer` is what the tinker-cookbook examples need beyond the SDK: the cookbook
loads a tokenizer by model name from the Hugging Face hub, and `tinkerq/tiny-qwen3` is not
there. Imports happen inside it, so importing this package costs nothing.
"""

from __future__ import annotations

from typing import Any


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
