"""The alembic migrations build exactly store.schema's tables, on SQLite and on Postgres, and two
processes upgrading at once do not trip over each other."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from store.engine import normalise_url
from store.migrate import upgrade
from store.schema import Base


def schema_diff(url: str) -> list:
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def concurrent_upgrades(url: str, n: int = 3) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(url)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_sqlite_schema_matches_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    concurrent_upgrades(url)
    assert schema_diff(url) == []


def test_postgres_schema_matches_models(pg_url):
    concurrent_upgrades(pg_url)
    assert schema_diff(pg_url) == []
