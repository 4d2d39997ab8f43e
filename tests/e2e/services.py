"""A PostgreSQL cluster and a Redis server of a test's own, which it may kill and restart.

The machine's shared PostgreSQL and Redis serve every other test: a chaos test that stops
its database or broker must not stop theirs. PostgreSQL refuses to run as root, so the
cluster belongs to the `postgres` user (`runuser`), in a folder under /tmp it can reach.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]) if glob.glob(
    "/usr/lib/postgresql/*/bin") else None


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def new_cluster() -> Path:
    """initdb a fresh cluster (trust auth, superuser `postgres`); returns its folder."""
    if PG_BIN is None:
        raise RuntimeError("PostgreSQL's server binaries are not installed")
    folder = Path(tempfile.mkdtemp(prefix="tinkerq-pg-"))
    os.chmod(folder, 0o755)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(folder / "data"), "-A",
                                 "trust", "-U", "postgres", "--no-sync"]),
                   check=True, capture_output=True)
    return folder


def postgres_command(cluster: Path, port: int) -> list[str]:
    return _as_postgres([str(PG_BIN / "postgres"), "-D", str(cluster / "data"), "-p", str(port),
                         "-k", str(cluster), "-c", "listen_addresses=127.0.0.1",
                         "-c", "fsync=off", "-c", "max_connections=200"])


def redis_command(port: int) -> list[str]:
    """A Redis that keeps nothing on disk: a restart loses every queued message."""
    return ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no"]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing answers on port {port} after {timeout} s")


def remove_cluster(cluster: Path) -> None:
    shutil.rmtree(cluster, ignore_errors=True)
