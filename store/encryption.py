"""age (filippo.io/age) encryption of an exported checkpoint's files, through `pyrage`.

`save_weights_external(age_encryption_recipients=[...])` asks for every exported file to be
encrypted to the named recipients: native X25519 keys (`age1...`) or SSH public keys
(`ssh-ed25519 ...`, `ssh-rsa ...`). Each file `f` is replaced by `f.age`; the server keeps no
plain copy and no identity, so only the holders of the recipients' secret keys can read it
(`age -d -i key f.age`, or pyrage as tinker_cookbook.weights.download does).

pyrage is imported when first used: the GPU image runs exports without recipients too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SUFFIX = ".age"


def _recipient(key: str) -> Any:
    import pyrage

    kind = pyrage.ssh if key.startswith("ssh-") else pyrage.x25519
    return kind.Recipient.from_str(key.strip())


def is_recipient(key: str) -> bool:
    """Whether `key` parses as an age recipient."""
    import pyrage

    try:
        _recipient(key)
    except (pyrage.RecipientError, ValueError):
        return False
    return True


def encrypt_folder(folder: Path, keys: list[str]) -> None:
    """Replace every file directly in `folder` with its encryption to `keys`, `<name>.age`."""
    import pyrage

    recipients = [_recipient(k) for k in keys]
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        pyrage.encrypt_file(str(file), str(file) + SUFFIX, recipients)
        file.unlink()
