"""Typed settings shared by every tinkerq process (web, worker, flower, batch scripts).

One `Settings` object per process. Precedence, highest first: command-line flags
(`--max-lora-rank 64`), environment variables (`TINKERQ_MAX_LORA_RANK=64`, plus the
conventional `DATABASE_URL` and `REDIS_URL`), then the defaults below. Every field
has a default and a help text; `python -m config --help` prints them all.

This package imports nothing of the project.
"""

from config.loader import load_settings, model_dir
from config.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "load_settings", "model_dir"]
