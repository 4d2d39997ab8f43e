"""The alembic migrations build exactly store.schema's tables, on SQLite and on Postgres, and two
processes upgrading at once do not trip over each other."""

from __future__ import annotations

import threading
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from store.engine import normalise_url
from store.migrate import upgrade
from store.schema import Base

PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


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


@pytest.fixture
def pg_url():
    name = f"tinkerq_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # a real server is required: CI starts one
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    # The plain scheme, as users write DATABASE_URL; the store maps it to psycopg2.
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_postgres_schema_matches_models(pg_url):
    concurrent_upgrades(pg_url)
    assert schema_diff(pg_url) == []
