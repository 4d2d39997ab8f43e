"""What the server keeps of API keys: a row per key hash (`tenant`), never the key.

Two kinds of rows. A key the operator registered (`python -m app.keys create`: `create`
makes it, returns it once and keeps its hash) is the only kind api_keys=keys accepts. In the
open mode (any `tml-` key is a tenant of its own, for a service on 127.0.0.1) a row is made
for a key when it is first asked about or revoked (`known`). In both modes a revoked key is
refused everywhere, its JWTs too.
"""

from __future__ import annotations

import secrets
import string

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from store.db import Store
from store.schema import ApiKeyRow, tenant_of, utcnow

KEY_ALPHABET = string.ascii_letters + string.digits  # no punctuation: a double-click copies it
KEY_LENGTH = 48  # ~285 random bits after "tml-"
MIN_PREFIX = 6  # hex digits of a hash prefix that `find_one` accepts


class RegistryError(ValueError):
    """A name taken or empty, or no single key matching a name or hash prefix."""


def find(store: Store, tenant: str) -> ApiKeyRow | None:
    """The key's row, if the server has one (one query: every authenticated call asks)."""
    with store.transaction() as s:
        row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant == tenant)).one_or_none()
        if row is not None:
            s.expunge(row)
        return row


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


def create(store: Store, name: str, note: str = "") -> str:
    """A new registered key named `name` (unique among the keys not revoked); only its hash
    is stored, so the returned key is the one copy there is."""
    name = name.strip()
    if not 0 < len(name) <= 128:
        raise RegistryError(f"name {name!r} must have 1 to 128 characters")
    key = "tml-" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))
    with store.transaction() as s:
        if s.scalar(select(ApiKeyRow.id).where(ApiKeyRow.name == name,
                                               ApiKeyRow.revoked_at.is_(None))) is not None:
            raise RegistryError(f"a key named {name!r} exists; revoke it first or pick another "
                                "name")
        s.add(ApiKeyRow(tenant=tenant_of(key), name=name, note=note[:512], registered=True))
    return key


def set_limits(store: Store, tenant: str, limits: dict[str, int | None]) -> ApiKeyRow:
    """Set the key's own quotas (`max_models`, `max_pending`; None: the deployment's)."""
    for name, value in limits.items():
        if name not in ("max_models", "max_pending"):
            raise RegistryError(f"{name!r} is not a key's limit (max_models, max_pending)")
        if value is not None and not 0 <= value <= 1 << 31:
            raise RegistryError(f"{name}={value} must be between 0 and {1 << 31}")
    with store.transaction() as s:
        row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.tenant == tenant)).one()
        for name, value in limits.items():
            setattr(row, name, value)
        s.flush()
        s.expunge(row)
        return row


def all_keys(store: Store) -> list[ApiKeyRow]:
    """Every key row, oldest first."""
    with store.transaction() as s:
        rows = list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id)))
        s.expunge_all()
        return rows


def find_one(store: Store, name_or_prefix: str) -> ApiKeyRow:
    """The key named so (among those not revoked), else the one whose hash starts so."""
    rows = all_keys(store)
    named = [r for r in rows if r.name == name_or_prefix and r.revoked_at is None]
    prefix = name_or_prefix.lower()
    hashed = [r for r in rows if r.tenant.startswith(prefix)] if len(prefix) >= MIN_PREFIX else []
    matches = named or hashed
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RegistryError(f"no key is named {name_or_prefix!r} (among those not revoked) or "
                            f"has a hash starting {name_or_prefix!r} (at least {MIN_PREFIX} "
                            "digits); see `list`")
    raise RegistryError(f"{name_or_prefix!r} matches {len(matches)} keys ("
                        f"{', '.join(r.tenant[:12] for r in matches)}): give a longer hash prefix")
