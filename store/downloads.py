"""Signed, time-limited download tokens for the files of exported weights.

`GET .../external_weights_urls` answers one URL per file of an external_weights checkpoint;
each carries a token that names the checkpoint (its tinker path and creation time, so a
checkpoint deleted and saved again under the same name is not served to an old URL) and the
file, signed with the deployment's key (store/secret.py; itsdangerous, HMAC with a timestamp). The
download route needs no API key: the token is the permission, and it lapses after
`download_url_ttl_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from protocol.errors import RequestError
from store.schema import CheckpointRow

SALT = "tinkerq-external-weights"


def files_of(folder: str) -> list[str]:
    """The checkpoint's files, as paths relative to its folder."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Grant:
    tinker_path: str
    created: str  # the checkpoint's created_at, ISO
    file: str


class Signer:
    def __init__(self, key: str, max_age_s: int):
        self.serializer = URLSafeTimedSerializer(key, salt=SALT)
        self.max_age_s = max_age_s

    def token(self, ckpt: CheckpointRow, file: str) -> str:
        return self.serializer.dumps([ckpt.tinker_path, ckpt.created_at.isoformat(), file])

    def open(self, token: str) -> Grant:
        """The grant in `token`; 403 when it is forged or has lapsed."""
        try:
            path, created, file = self.serializer.loads(token, max_age=self.max_age_s)
        except SignatureExpired:
            raise RequestError(403, "this download URL has expired; ask for new URLs "
                                    "(external_weights_urls)") from None
        except (BadSignature, ValueError, TypeError):
            raise RequestError(403, "this download URL is not valid") from None
        return Grant(str(path), str(created), str(file))

    @staticmethod
    def matches(grant: Grant, ckpt: CheckpointRow) -> bool:
        return ckpt.created_at.isoformat() == grant.created


class TraceSigner:
    """Tokens for a session's trace download: (owner tenant, session id)."""

    def __init__(self, key: str, max_age_s: int):
        self.serializer = URLSafeTimedSerializer(key, salt=SALT + "-trace")
        self.max_age_s = max_age_s

    def token(self, tenant: str, session_id: str) -> str:
        return self.serializer.dumps([tenant, session_id])

    def open(self, token: str) -> tuple[str, str]:
        try:
            tenant, session_id = self.serializer.loads(token, max_age=self.max_age_s)
        except SignatureExpired:
            raise RequestError(403, "this trace URL has expired; export the trace again") \
                from None
        except (BadSignature, ValueError, TypeError):
            raise RequestError(403, "this trace URL is not valid") from None
        return str(tenant), str(session_id)
