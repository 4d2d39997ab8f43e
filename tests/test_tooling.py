"""The project's own tooling passes: ruff (lint) on everything, mypy on app/ and config/,
and the command-line help of the config and the worker lists every setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_is_clean():
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_app_and_config():
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_setting_is_listed_by_help():
    from dataclasses import fields

    from config import Settings

    for module in ("config", "workers"):
        result = run(module, "--help")
        assert result.returncode == 0, result.stdout + result.stderr
        for f in fields(Settings):
            assert "--" + f.name.replace("_", "-") in result.stdout, (module, f.name)
