"""The deployment's secret key: it signs download URLs (store/downloads.py) and the JWTs
the API issues (app/auth.py). Every API host of one deployment must hold the same key: set
`secret_key`, or let the first process make one in <data_dir>/secret_key (mode 0600)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from config.settings import Settings


def signing_key(settings: Settings) -> str:
    """The `secret_key` setting, or the key kept in <data_dir>/secret_key (made once: the
    first process to get there writes it, the others read it)."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_path / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return _read_key(path)


def _read_key(path: Path) -> str:
    for _ in range(100):  # another process may be between creating the file and writing it
        key = path.read_text().strip()
        if key:
            return key
        os.sched_yield()
    raise RuntimeError(f"{path} is empty: delete it, or set TINKERQ_SECRET_KEY")


def derived_key(key: str, purpose: str) -> str:
    """A key of its own for one purpose, so that no two uses sign with the same key."""
    return hmac.new(key.encode(), purpose.encode(), hashlib.sha256).hexdigest()
