"""Snapshots and restores on the GPU: the snapshot copied to the host on the writer's own
stream holds the run's state bit for bit, and a run rebuilt from it and replayed alone
matches the run that trained beside another to float rounding (the GPU's batched passes
round by batch; the CPU's are exact: tests/unit/test_recovery.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from store import snapshots
from tests.unit.test_engine import start_engine
from tests.unit.test_recovery import fresh_model, restore_job, state, train_two

pytestmark = pytest.mark.gpu


def test_a_snapshot_holds_the_state_and_a_restore_matches_to_rounding(tmp_path):
    engine, work, root = train_two(tmp_path / "first", "cuda")
    assert snapshots.listing(root, "a") == [0, 6, 12]
    fresh = start_engine(fresh_model("cuda"), tmp_path / "second")
    # nothing replayed: the restored run is the snapshot, which is the run at seq_id 12
    outcome = fresh.submit(restore_job(root, "a", work["a"], 13)).result(60)
    assert outcome.ok and outcome.json["replayed"] == 0, outcome.error
    optimizer = load_file(snapshots.folder(root, "a", 12) / "optimizer.safetensors")
    assert int(optimizer["step"]) == 6
    at_12 = state(fresh, "a")
    for later in work["a"][12:]:  # fb 13, optim 14, fb 15 run after the snapshot
        assert fresh.submit(later).result(60).ok
    expected, got = state(engine, "a"), state(fresh, "a")
    assert int(got["step"]) == 7
    for key, tensor in expected.items():
        if tensor is None or key == "step":
            continue
        # within rounding: far below what the last step changed
        moved = (tensor - at_12[key]).abs().max() if key in at_12 and at_12[key] is not None \
            else tensor.abs().max()
        assert (got[key] - tensor).abs().max() <= 1e-3 * moved + 1e-7, key
    # and the replay path itself, through the optim_step at 14
    fresh2 = start_engine(fresh_model("cuda"), tmp_path / "third")
    assert fresh2.submit(restore_job(root, "a", work["a"], 16)).result(60).ok
    replayed = state(fresh2, "a")
    for key, tensor in expected.items():
        if tensor is not None and key != "step":
            torch.testing.assert_close(replayed[key], tensor, rtol=1e-3, atol=1e-5)
