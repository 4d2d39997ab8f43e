"""training_runs, checkpoints (per run and per user), checkpoint deletion, weights_info."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinker import types

from store import checkpoints
from tests.api.conftest import ALIAS, KEY


def test_training_runs(api, other, model_id, add_checkpoint):
    add_checkpoint(model_id, "training", "w1")
    add_checkpoint(model_id, "sampler", "s1")
    run = types.TrainingRun.model_validate(
        api.get(f"training_runs/{model_id}?access_scope=owned").get_json()
    )
    assert run.training_run_id == model_id and run.base_model == ALIAS and run.lora_rank == 8
    assert run.user_metadata == {"renderer_name": "qwen3"}
    assert run.last_checkpoint.checkpoint_id == "weights/w1"
    assert run.last_sampler_checkpoint.tinker_path == f"tinker://{model_id}/sampler_weights/s1"
    listed = types.TrainingRunsResponse.model_validate(
        api.get("training_runs?limit=20&offset=0&access_scope=owned").get_json()
    )
    assert [r.training_run_id for r in listed.training_runs] == [model_id]
    assert listed.cursor.total_count == 1 and listed.cursor.limit == 20
    assert other.get(f"training_runs/{model_id}").status_code == 404
    assert other.get("training_runs").get_json()["training_runs"] == []


def test_checkpoint_lists(api, other, model_id, add_checkpoint):
    add_checkpoint(model_id, "training", "w1")
    add_checkpoint(model_id, "sampler", "s1")
    per_run = types.CheckpointsListResponse.model_validate(
        api.get(f"training_runs/{model_id}/checkpoints").get_json()
    )
    assert sorted(c.checkpoint_id for c in per_run.checkpoints) == [
        "sampler_weights/s1",
        "weights/w1",
    ]
    kinds = {c.checkpoint_type for c in per_run.checkpoints}
    assert kinds == {"training", "sampler"}
    mine = types.CheckpointsListResponse.model_validate(
        api.get("checkpoints?limit=1&offset=0").get_json()
    )
    assert len(mine.checkpoints) == 1 and mine.cursor.total_count == 2
    assert other.get(f"training_runs/{model_id}/checkpoints").status_code == 404
    assert other.get("checkpoints").get_json()["checkpoints"] == []


def test_listings_go_past_1000_checkpoints(api, model_id, services):
    """A run's listing has no page in the SDK: it holds every checkpoint, not the first
    1,000; the user listing pages past 1,000 with offset."""
    from store.schema import CheckpointRow, tenant_of

    with services.store.transaction() as s:
        s.add_all(CheckpointRow(
            tenant=tenant_of(KEY), model_id=model_id, kind="sampler", name=f"c{i}",
            tinker_path=f"tinker://{model_id}/sampler_weights/c{i}", local_dir=f"/nowhere/{i}",
        ) for i in range(1005))
    per_run = api.get(f"training_runs/{model_id}/checkpoints").get_json()
    assert len(per_run["checkpoints"]) == 1005 == per_run["cursor"]["total_count"]
    page = api.get(f"training_runs/{model_id}/checkpoints?limit=10&offset=1000").get_json()
    assert len(page["checkpoints"]) == 5
    tail = api.get("checkpoints?limit=1000&offset=1000").get_json()
    assert len(tail["checkpoints"]) == 5 and tail["cursor"]["total_count"] == 1005
    names = {c["checkpoint_id"] for c in per_run["checkpoints"]}
    assert names == {f"sampler_weights/c{i}" for i in range(1005)}


def test_delete_checkpoint(api, other, model_id, add_checkpoint):
    ckpt = add_checkpoint(model_id, "training", "w1")
    path = f"training_runs/{model_id}/checkpoints/weights/w1"
    assert other.delete(path).status_code == 404
    assert Path(ckpt.local_dir).is_dir()
    resp = api.delete(path)
    assert resp.status_code == 200 and resp.get_json() == {}
    assert not Path(ckpt.local_dir).exists()
    assert api.delete(path).status_code == 404
    assert api.get(f"training_runs/{model_id}/checkpoints").get_json()["checkpoints"] == []


@pytest.mark.parametrize("name", [".", "..", "", ".w1"])
def test_delete_never_reaches_past_one_checkpoint(api, model_id, add_checkpoint, name):
    """A name that resolves to the segment's folder (or above) is refused; w1 stays."""
    ckpt = add_checkpoint(model_id, "training", "w1")
    resp = api.delete(f"training_runs/{model_id}/checkpoints/weights/{name}")
    assert resp.status_code in (400, 404, 405), resp.status_code
    assert Path(ckpt.local_dir).is_dir()


def test_remove_files_touches_only_a_checkpoint_folder(tmp_path):
    root = tmp_path / "ckpts"
    keep = root / "tenant" / "run" / "weights" / "keep"
    keep.mkdir(parents=True)
    for target in (root, root / "tenant", root / "tenant" / "run", keep.parent, tmp_path):
        checkpoints.remove_files(root, str(target))
        checkpoints.remove_files(root, str(keep.parent / "."))
    assert keep.is_dir()
    checkpoints.remove_files(root, str(keep))
    assert not keep.exists() and keep.parent.is_dir()


def test_weights_info(api, other, model_id, add_checkpoint):
    ckpt = add_checkpoint(model_id, "training", "w1")
    answer = types.WeightsInfoResponse.model_validate(
        api.ok("weights_info", {"tinker_path": ckpt.tinker_path})
    )
    assert answer.base_model == ALIAS and answer.lora_rank == 8 and answer.is_lora
    assert answer.train_attn and answer.train_mlp and answer.train_unembed
    assert other.post("weights_info", {"tinker_path": ckpt.tinker_path}).status_code == 404
    resp = api.post("weights_info", {"tinker_path": "tinker://x/bad"})
    assert resp.status_code == 400 and "tinker://x/bad" in resp.get_json()["detail"]


def test_access_scope_and_project_filters(api, other, session_id, model_id, add_checkpoint):
    """accessible: the caller's runs and every run holding a published checkpoint; a
    project_id keeps the runs of that project's sessions."""
    add_checkpoint(model_id, "training", "w")
    assert other.get(f"training_runs/{model_id}?access_scope=accessible").status_code == 404
    api.post(f"training_runs/{model_id}/checkpoints/weights/w/publish")
    assert other.get(f"training_runs/{model_id}").status_code == 404  # owned: theirs only
    seen = other.get(f"training_runs/{model_id}?access_scope=accessible").get_json()
    assert seen["training_run_id"] == model_id
    listed = other.get("training_runs?access_scope=accessible").get_json()["training_runs"]
    assert [r["training_run_id"] for r in listed] == [model_id]
    assert other.get("training_runs").get_json()["training_runs"] == []
    assert other.get("training_runs?access_scope=all").status_code == 400
    api.client.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": "p1"},
                   headers={"X-API-Key": api.key})
    assert len(api.get("training_runs?project_id=p1").get_json()["training_runs"]) == 1
    assert api.get("training_runs?project_id=p2").get_json()["training_runs"] == []
