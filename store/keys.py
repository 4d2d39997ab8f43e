"""What the server keeps of API keys: a row per key hash (`tenant`) once the key is asked
about or revoked. Any `tml-` key is accepted (the open mode, for a service on 127.0.0.1);
a revoked one is refused everywhere, its JWTs too."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from store.db import Store
from store.schema import ApiKeyRow, utcnow


def revoked(store: Store, tenant: str) -> bool:
    with store.transaction() as s:
        return s.scalar(select(ApiKeyRow.revoked_at).where(ApiKeyRow.tenant == tenant)) \
            is not None


def known(store: Store, tenant: str) -> ApiKeyRow:
    """The key's row, made on first use (named after the start of its hash)."""
    try:
        with store.transaction() as s:
            if s.scalar(select(ApiKeyRow.id).where(ApiKeyRow.tenant == tenant)) is None:
                s.add(ApiKeyRow(tenant=tenant, name=f"key-{tenant[:8]}", note=""))
    except IntegrityError:
        pass  # a concurrent first use made it
    with store.transaction() as s:
        row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant == tenant)).one()
        s.expunge(row)
        return row


def revoke(store: Store, tenant: str) -> None:
    known(store, tenant)
    with store.transaction() as s:
        row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant == tenant)).one()
        row.revoked_at = row.revoked_at or utcnow()
