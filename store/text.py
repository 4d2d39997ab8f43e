"""Text in and out for the OpenAI-compatible API: the base model's own tokenizer
(`tokenizer.json`, through `tokenizers`) and chat template (`tokenizer_config.json`,
rendered in jinja2's sandbox as transformers renders it), read from the model folder. No
torch: the web process loads this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from protocol.errors import RequestError


class TextCodec:
    def __init__(self, folder: Path):
        file = folder / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError, Exception) as e:  # tokenizers raises plain Exception
            raise RequestError(503, f"the base model's tokenizer ({file}) is not readable: "
                                    f"{e}") from e
        self.config = config
        template = config.get("chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.chat_template = env.from_string(template) if isinstance(template, str) else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it (a chat template's) count."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> list[int]:
        """The prompt of a chat: the messages in the model's template, ready for the
        assistant's turn."""
        if self.chat_template is None:
            raise RequestError(400, "the base model's tokenizer has no chat template; use "
                                    "/v1/completions")
        try:
            text = self.chat_template.render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.config.get("bos_token") or "",
                eos_token=self.config.get("eos_token") or "", **options)
        except TemplateError as e:
            raise RequestError(400, f"the chat template refused the messages: {e}") from e
        return self.encode(text)


def _raise(message: str) -> None:
    raise TemplateError(message)
