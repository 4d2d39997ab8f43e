"""The deployment's API keys, for its operator (api_keys=keys accepts only these):

    python -m app.keys create --name alice [--note laptop]  # prints the new key, this once
    python -m app.keys list                                 # names, dates, hash prefixes
    python -m app.keys revoke alice                         # or a hash prefix from `list`
    python -m app.keys limit alice --max-models 4 --max-pending 256   # "default": the settings'

The database is the deployment's (DATABASE_URL, else the SQLite file under TINKERQ_DATA_DIR),
migrated first as the API does at start; only a key's hash is stored, and it is the key's
tenant id whether the key was made here or used in the open mode. `check_bind` is the other
half of the open mode: gunicorn (app/gunicorn_conf.py) refuses to listen beyond this machine
while any `tml-` key is accepted.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from config import SettingsError, load_settings
from config.settings import Settings
from store import keys
from store.db import Store
from store.schema import tenant_of

HASH_SHOWN = 12  # hex digits of a key's hash that `list` shows (enough for `revoke`)


def is_local(host: str) -> bool:
    """Whether `host` answers this machine only: a loopback address or "localhost"."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every address) or a host name, which may resolve to anything


def check_bind(host: str, settings: Settings) -> None:
    """Refuse to listen on `host` beyond this machine while any `tml-` key is accepted."""
    if settings.api_keys == "open" and not is_local(host):
        raise SettingsError(
            f"refusing to listen on {host or 'every address'!r}: api_keys=open accepts any "
            "tml- key, so the API may listen on loopback only (127.0.0.1, ::1, localhost). "
            "Make keys with `python -m app.keys create --name NAME` and set "
            "TINKERQ_API_KEYS=keys, or set TINKERQ_HOST=127.0.0.1"
        )


def _limit(raw: str) -> int | None:
    """A limit on the command line: a count, or "default" (the deployment's setting)."""
    if raw == "default":
        return None
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is neither a count nor 'default'") from None


def _limits(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, name) for name in ("max_models", "max_pending")
            if hasattr(args, name)}  # a flag not given leaves no attribute (SUPPRESS)


def _shown(limit: int | None, default: str) -> str:
    """A key's own limit as printed, or what stands for the deployment's."""
    return default if limit is None else str(limit)


def _create(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    key = keys.create(store, args.name, args.note)
    if limits := _limits(args):
        keys.set_limits(store, tenant_of(key), limits)
    print(key)  # stdout holds the key alone, for `KEY=$(python -m app.keys create ...)`
    print(f"made key {args.name.strip()!r}; it is shown this once, only its hash is kept",
          file=sys.stderr)
    if settings.api_keys == "open":
        print("note: api_keys=open here accepts any tml- key; set TINKERQ_API_KEYS=keys for "
              "the API to accept only the keys made here", file=sys.stderr)


def _list(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    table = [("NAME", "KIND", "CREATED (UTC)", "REVOKED (UTC)", "HASH", "MAX RUNS",
              "MAX PENDING")]
    for row in keys.all_keys(store):
        table.append((row.name, "registered" if row.registered else "seen",
                      f"{row.created_at:%Y-%m-%d %H:%M:%S}",
                      f"{row.revoked_at:%Y-%m-%d %H:%M:%S}" if row.revoked_at else "-",
                      row.tenant[:HASH_SHOWN],
                      _shown(row.max_models, f"{settings.max_models_per_tenant} (default)"),
                      _shown(row.max_pending, f"{settings.max_pending_per_tenant} (default)")))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _revoke(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    row = keys.find_one(store, args.key)
    keys.revoke(store, row.tenant)
    print(f"revoked key {row.name!r} ({row.tenant[:HASH_SHOWN]}): it and its JWTs get 401")


def _set_limits(store: Store, settings: Settings, args: argparse.Namespace) -> None:
    limits = _limits(args)
    if not limits:
        raise keys.RegistryError("name a limit to set: --max-models and/or --max-pending")
    row = keys.set_limits(store, keys.find_one(store, args.key).tenant, limits)
    print(f"key {row.name!r}: max_models={_shown(row.max_models, 'default')}, "
          f"max_pending={_shown(row.max_pending, 'default')}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a key, print it once, keep its hash")
    create.add_argument("--name", required=True, help="unique among the keys not revoked")
    create.add_argument("--note", default="", help="a free text kept with the key")
    create.set_defaults(run=_create)
    limit = commands.add_parser("limit", help="set a key's own quotas (live runs, calls "
                                "pending); 'default' goes back to the deployment's settings")
    limit.add_argument("key", metavar="NAME_OR_HASH_PREFIX")
    limit.set_defaults(run=_set_limits)
    for command in (create, limit):
        command.add_argument("--max-models", type=_limit, default=argparse.SUPPRESS,
                             metavar="N",
                             help="live training runs (max_models_per_tenant by default)")
        command.add_argument("--max-pending", type=_limit, default=argparse.SUPPRESS,
                             metavar="N",
                             help="calls not yet answered (max_pending_per_tenant by default)")
    commands.add_parser("list", help="every key the server has a row for, never the key itself"
                        ).set_defaults(run=_list)
    revoke = commands.add_parser("revoke", help="refuse a key and its JWTs from now on")
    revoke.add_argument("key", metavar="NAME_OR_HASH_PREFIX")
    revoke.set_defaults(run=_revoke)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        store = Store(settings.database)
        try:
            store.create_schema()
            args.run(store, settings, args)
        finally:
            store.engine.dispose()
    except (SettingsError, keys.RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
