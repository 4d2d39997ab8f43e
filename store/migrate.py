"""Schema migrations: `upgrade(url)` = `alembic upgrade head`, safe to run concurrently.

The web process and the worker both upgrade at startup; they serialise on a lock so the
second finds the schema at head and does nothing: pg_advisory_lock on Postgres, an flock
on a file next to the database on SQLite.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection

from store.engine import normalise_url

ROOT = Path(__file__).resolve().parent.parent  # the project root, where alembic.ini is
LOCK_KEY = 0x74696E6B  # "tink": the advisory lock id of schema upgrades


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "store" / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextlib.contextmanager
def _file_lock(url: str) -> Iterator[None]:
    db_file = url.removeprefix("sqlite:///")
    if not db_file or db_file == ":memory:":
        yield
        return
    Path(db_file).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db_file}.migrate-lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_lock(conn: Connection) -> Iterator[None]:
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
        conn.commit()


def upgrade(url: str, revision: str = "head") -> None:
    url = normalise_url(url)
    config = alembic_config(url)
    engine = create_engine(url)
    try:
        lock = _file_lock(url) if url.startswith("sqlite") else contextlib.nullcontext()
        with lock, engine.connect() as conn:
            pg = _pg_lock(conn) if conn.dialect.name == "postgresql" else contextlib.nullcontext()
            with pg:
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                conn.commit()
    finally:
        engine.dispose()
