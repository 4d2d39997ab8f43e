"""Where the training runs' snapshots live, and which of them to keep (no torch here).

A snapshot is a run's whole training state (weights and AdamW moments) in the training
checkpoint layout, at `<root>/<model id>/<seq>/`, `<seq>` twelve digits: the last seq_id
whose effect it holds (0: the run as it was created or loaded). The worker writes it
(workers/snapshots.py) atomically, so a folder with that name is always whole.

A snapshot at seq s may rebuild the run only if every call up to s is settled in the
database: a call the worker had run but whose answer was not stored yet is still pending, is
delivered again, and would be applied twice. `newest_usable` picks accordingly, and
`prune` keeps the newest usable snapshot and every newer one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_DIGITS = 12


def folder(root: Path, model_id: str, seq: int) -> Path:
    return Path(root) / model_id / f"{seq:0{_DIGITS}d}"


def listing(root: Path, model_id: str) -> list[int]:
    """The seqs of the run's whole snapshots, oldest first."""
    base = Path(root) / model_id
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir()
                  if len(p.name) == _DIGITS and p.name.isdigit() and p.is_dir())


def newest_usable(root: Path, model_id: str, first_pending: int) -> tuple[int, Path] | None:
    """The newest snapshot below `first_pending` (the run's first seq_id not yet settled in
    the database), or None."""
    usable = [seq for seq in listing(root, model_id) if seq < first_pending]
    return (usable[-1], folder(root, model_id, usable[-1])) if usable else None


def prune(root: Path, model_id: str, first_pending: int) -> list[Path]:
    """Delete the run's snapshots older than its newest usable one; returns them."""
    usable = newest_usable(root, model_id, first_pending)
    if usable is None:
        return []
    removed = []
    for seq in listing(root, model_id):
        if seq < usable[0]:
            path = folder(root, model_id, seq)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def models(root: Path) -> list[str]:
    """The runs that have a snapshot folder."""
    if not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def remove(root: Path, model_id: str) -> None:
    """Forget a run's snapshots (its session finished, or the run is gone)."""
    shutil.rmtree(Path(root) / model_id, ignore_errors=True)
