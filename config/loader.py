"""Settings from the environment and the command line: `load_settings`, the `--flag` per
setting of `build_parser`, and `model_dir`, where the served base model lives."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from config.settings import DEFAULT_BASE_MODEL, Settings, SettingsError

ENV_PREFIX = "TINKERQ_"
# Environment names kept for convention; every other field is TINKERQ_<FIELD>.
_ENV_ALIASES = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL"}


def _coerce(kind: Callable[[str], Any], name: str, raw: str) -> Any:
    try:
        return kind(raw)
    except ValueError as e:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from e


def env_name(name: str) -> str:
    return _ENV_ALIASES.get(name, ENV_PREFIX + name.upper())


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_bool.__name__ = "bool"


_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str,
                                             "bool": _bool}


def _kind(f: dataclasses.Field) -> Callable[[str], Any]:
    return _PARSERS[str(f.type)]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add one `--flag` per setting to `parser` (defaults are None so env can fill in)."""
    parser = parser or argparse.ArgumentParser(description="tinkerq settings")
    for f in fields(Settings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_kind(f),
            default=None,
            help=f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})"
            .replace("%", "%%"),  # argparse formats help strings with %
        )
    return parser


def load_settings(
    argv: list[str] | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Settings from overrides > argv > env > defaults, validated."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = source.get(env_name(f.name))
        if raw is not None and raw != "":
            values[f.name] = _coerce(_kind(f), f.name, raw)
    if argv is not None:
        args, _ = build_parser().parse_known_args(argv)
        values.update({k: v for k, v in vars(args).items() if v is not None})
    values.update(overrides)
    return Settings(**values).validate()


def model_dir(settings: Settings) -> Path:
    """The local folder of the served base model (config.json, safetensors, tokenizer).

    The built-in default lives under data_dir and is written by the worker on first start;
    a Hugging Face id is looked up in the local cache only (never downloaded).
    """
    name = settings.base_model
    if name == DEFAULT_BASE_MODEL:
        return settings.data_path / "models" / "tiny-qwen3"
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "not in the local cache"
        raise SettingsError(
            f"base_model={name!r} is neither a folder nor a Hugging Face id in the local cache"
        ) from e
