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

SALT = "tinkerq-download"


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
    """Timed tokens of one kind (its own salt): a list of strings signed with the
    deployment's key, refused with a 403 once forged or older than `max_age_s`."""

    def __init__(self, key: str, max_age_s: int, kind: str, renew: str):
        self.serializer = URLSafeTimedSerializer(key, salt=f"{SALT}-{kind}")
        self.max_age_s = max_age_s
        self.kind, self.renew = kind, renew  # for the 403s: what lapsed, how to get a new one

    def sign(self, *fields: str) -> str:
        return self.serializer.dumps(list(fields))

    def open(self, token: str, count: int) -> list[str]:
        try:
            fields = self.serializer.loads(token, max_age=self.max_age_s)
        except SignatureExpired:
            raise RequestError(403, f"this {self.kind} URL has expired; {self.renew}") from None
        except (BadSignature, ValueError, TypeError):
            fields = None
        if not isinstance(fields, list) or len(fields) != count:
            raise RequestError(403, f"this {self.kind} URL is not valid")
        return [str(f) for f in fields]


def file_token(signer: Signer, ckpt: CheckpointRow, file: str) -> str:
    return signer.sign(ckpt.tinker_path, ckpt.created_at.isoformat(), file)


def open_file_token(signer: Signer, token: str) -> Grant:
    return Grant(*signer.open(token, 3))


def grants(grant: Grant, ckpt: CheckpointRow) -> bool:
    """Whether `grant` is for this checkpoint, not an earlier one of the same path."""
    return ckpt.created_at.isoformat() == grant.created
