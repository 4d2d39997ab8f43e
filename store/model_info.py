"""What the API knows about the served base model, read from its config.json (no torch).

Read lazily on first use: the built-in default model is written by the worker on its first
start, so the web process may come up before the file exists (503 until then; the SDK
retries 5xx).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config import Settings, SettingsError, model_dir
from protocol.errors import RequestError


class ModelInfo:
    def __init__(self, settings: Settings, path: Path | None = None):
        """The model of `settings`, or the one in folder `path` (another base model, as a
        worker of it registered its folder)."""
        self._settings = settings
        self._config: dict[str, Any] | None = None
        self._path: Path | None = path

    @property
    def path(self) -> Path:
        if self._path is None:
            try:
                self._path = model_dir(self._settings)
            except SettingsError as e:
                raise RequestError(503, str(e)) from e
        return self._path

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            file = self.path / "config.json"
            try:
                self._config = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise RequestError(
                    503, f"base model config {file} is not readable yet ({e}); is the worker up?"
                ) from e
        return self._config

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_position_embeddings(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return int(value) if value is not None else None

    @property
    def arch(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type")

    @property
    def tokenizer_id(self) -> str:
        """What `TrainingClient.get_tokenizer()` hands to AutoTokenizer: the local folder."""
        return str(self.path)
