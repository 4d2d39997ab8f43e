"""A checkpoint's life after its save: exports and their signed download URLs, TTLs and the
sweep, publishing, weights_access_token, copies (app/blueprints/checkpoints.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pyrage
import pytest
from sqlalchemy import update
from tinker import types

from store import checkpoints
from store.schema import CheckpointRow, ModelRow, utcnow
from tests.api.conftest import KEY, OTHER_KEY, Api, new_session


def _expire(services, ckpt: CheckpointRow) -> None:
    with services.store.transaction() as s:
        s.execute(update(CheckpointRow).where(CheckpointRow.id == ckpt.id)
                  .values(expires_at=utcnow() - dt.timedelta(seconds=1)))


def _load_body(session_id: str, path: str, n: int = 1, **extra) -> dict:
    return {"session_id": session_id, "model_seq_id": n, "path": path, "optimizer": False,
            **extra}


# --- save_weights_external and downloads ----------------------------------------------------


def test_save_weights_external_is_a_numbered_save(api, model_id, enqueued, add_checkpoint):
    key = str(pyrage.x25519.Identity.generate().to_public())
    body = {"model_id": model_id, "path": "final", "seq_id": 1, "ttl_seconds": 3600,
            "age_encryption_recipients": [key], "type": "save_weights_external"}
    api.ok("save_weights_external", body)
    [row] = enqueued
    data = json.loads(row.payload)
    assert (row.kind, row.seq_id) == ("save_weights_external", 1)
    assert data["tinker_path"] == f"tinker://{model_id}/external_weights/final"
    assert data["checkpoint_dir"].endswith(f"{model_id}/external_weights/final")
    assert (data["age_recipients"], data["ttl_seconds"]) == ([key], 3600)


@pytest.mark.parametrize("recipients, says", [
    (["age1notakey"], "age1notakey"),
    ([], "list of 1 to 10"),
    (["ssh-ed25519 AAAA"], "ssh-ed25519 AAAA"),
    ("age1x", "age_encryption_recipients: Input should be a valid list"),
])
def test_bad_age_recipients_are_a_400(api, model_id, enqueued, recipients, says):
    body = {"model_id": model_id, "path": "x", "seq_id": 1,
            "age_encryption_recipients": recipients}
    resp = api.post("save_weights_external", body)
    assert resp.status_code == 400 and says in resp.get_json()["detail"]
    assert [r.state for r in enqueued] == ["failed"]  # the seq_id is still claimed


def test_signed_urls_download_each_file_without_a_key(api, other, app, model_id,
                                                      add_checkpoint, services):
    ckpt = add_checkpoint(model_id, "external", "final")
    (Path(ckpt.local_dir) / "adapter_config.json").write_text('{"r": 8}')
    url = f"training_runs/{model_id}/checkpoints/external_weights/final/external_weights_urls"
    answer = types.ExternalWeightsUrlsResponse.model_validate(api.get(url).get_json())
    assert sorted(answer.urls) == ["adapter.bin", "adapter_config.json"]
    assert answer.expires > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=59)
    anonymous = Api(app.test_client(), key=None)
    for name, link in answer.urls.items():
        assert link.startswith("http://localhost/api/v1/downloads/")
        resp = anonymous.client.get(urlsplit(link).path)
        assert resp.status_code == 200, resp.get_json()
        assert resp.data == (Path(ckpt.local_dir) / name).read_bytes()
    assert other.get(url).status_code == 404  # another key gets no URLs
    link = urlsplit(answer.urls["adapter.bin"]).path
    token = link.split("/")[4]
    forged = link.replace(token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    assert anonymous.client.get(forged).status_code == 403
    services.signer.max_age_s = -1  # every URL signed so far has lapsed
    resp = anonymous.client.get(link)
    assert resp.status_code == 403 and "expired" in resp.get_json()["detail"]
    services.signer.max_age_s = 3600
    assert api.delete(f"training_runs/{model_id}/checkpoints/external_weights/final") \
        .status_code == 200
    assert anonymous.client.get(link).status_code == 404  # deleted: the URL serves nothing


def test_public_url_setting_names_the_host(api, model_id, add_checkpoint, services):
    add_checkpoint(model_id, "external", "e")
    object.__setattr__(services.settings, "public_url", "https://tinker.example.com/")
    url = f"training_runs/{model_id}/checkpoints/external_weights/e/external_weights_urls"
    [link] = api.get(url).get_json()["urls"].values()
    assert link.startswith("https://tinker.example.com/api/v1/downloads/")


def test_the_signing_key_is_made_once_and_kept(settings):
    from store.secret import signing_key

    key = signing_key(settings)
    assert len(key) == 64 and signing_key(settings) == key
    assert oct((settings.data_path / "secret_key").stat().st_mode & 0o777) == "0o600"


# --- TTL and the sweep ----------------------------------------------------------------------


def test_ttl_is_set_cleared_and_checked(api, other, model_id, add_checkpoint):
    add_checkpoint(model_id, "training", "w")
    url = f"training_runs/{model_id}/checkpoints/weights/w/ttl"
    assert api.client.put(f"/api/v1/{url}", json={"ttl_seconds": 7200},
                          headers={"X-API-Key": KEY}).status_code == 200
    [listed] = api.get(f"training_runs/{model_id}/checkpoints").get_json()["checkpoints"]
    expires = dt.datetime.fromisoformat(listed["expires_at"].rstrip("Z"))
    assert abs((expires - utcnow()).total_seconds() - 7200) < 60
    api.client.put(f"/api/v1/{url}", json={"ttl_seconds": None}, headers={"X-API-Key": KEY})
    [listed] = api.get(f"training_runs/{model_id}/checkpoints").get_json()["checkpoints"]
    assert listed["expires_at"] is None
    resp = api.client.put(f"/api/v1/{url}", json={"ttl_seconds": 0}, headers={"X-API-Key": KEY})
    assert resp.status_code == 400 and "ttl_seconds=0" in resp.get_json()["detail"]
    resp = other.client.put(f"/api/v1/{url}", json={"ttl_seconds": 3600},
                            headers={"X-API-Key": OTHER_KEY})
    assert resp.status_code == 404


def test_an_expired_checkpoint_is_hidden_then_swept(api, session_id, model_id,
                                                    add_checkpoint, services):
    keep = add_checkpoint(model_id, "training", "keep")
    gone = add_checkpoint(model_id, "training", "gone")
    _expire(services, gone)
    listed = api.get(f"training_runs/{model_id}/checkpoints").get_json()["checkpoints"]
    assert [c["checkpoint_id"] for c in listed] == ["weights/keep"]
    assert api.get("checkpoints").get_json()["cursor"]["total_count"] == 1
    resp = api.post("load_weights", _load_body(session_id, gone.tinker_path))
    assert resp.status_code == 404
    assert api.get(f"training_runs/{model_id}").get_json()["last_checkpoint"][
        "checkpoint_id"] == "weights/keep"
    root = services.settings.checkpoint_root
    assert checkpoints.sweep_expired(services.store, root) == [gone.tinker_path]
    assert not Path(gone.local_dir).exists() and Path(keep.local_dir).exists()
    assert checkpoints.sweep_expired(services.store, root) == []  # each is deleted once


# --- publishing and access tokens -----------------------------------------------------------


def test_a_published_checkpoint_is_readable_by_every_key(api, other, model_id, add_checkpoint,
                                                        enqueued):
    ckpt = add_checkpoint(model_id, "training", "w")
    other_sid = new_session(other)
    publish = f"training_runs/{model_id}/checkpoints/weights/w/publish"
    load = _load_body(other_sid, ckpt.tinker_path)
    sample = {"session_id": other_sid, "sampling_session_seq_id": 0,
              "model_path": ckpt.tinker_path}
    assert other.post("load_weights", load).status_code == 404
    assert other.post("weights_info", {"tinker_path": ckpt.tinker_path}).status_code == 404
    assert other.post(publish).status_code == 404  # only the owner publishes
    assert api.post(publish).status_code == 200
    [listed] = api.get(f"training_runs/{model_id}/checkpoints").get_json()["checkpoints"]
    assert listed["public"] is True
    info = other.ok("weights_info", {"tinker_path": ckpt.tinker_path})
    assert info["lora_rank"] == 8
    assert other.ok("load_weights", load)["model_id"] == f"{other_sid}:train:1"
    assert other.ok("create_sampling_session", sample)
    assert other.get("checkpoints").get_json()["checkpoints"] == []  # never in their lists
    assert other.delete(f"training_runs/{model_id}/checkpoints/weights/w").status_code == 404
    assert api.delete(publish).status_code == 200
    assert Path(ckpt.local_dir).exists()  # unpublishing deletes nothing
    again = _load_body(other_sid, ckpt.tinker_path, n=2)
    assert other.post("load_weights", again).status_code == 404


def test_weights_access_token_reads_the_owner_s_checkpoint(api, other, model_id,
                                                          add_checkpoint):
    ckpt = add_checkpoint(model_id, "training", "w")
    other_sid = new_session(other)
    body = _load_body(other_sid, ckpt.tinker_path)
    assert other.post("load_weights", body | {"weights_access_token": "tml-wrong"}) \
        .status_code == 404
    assert other.ok("load_weights", body | {"weights_access_token": KEY})


# --- copies ---------------------------------------------------------------------------------


def test_copy_weights_links_the_files_into_a_new_run(api, session_id, model_id, add_checkpoint,
                                                     services, enqueued):
    ckpt = add_checkpoint(model_id, "sampler", "s")
    body = {"source_path": ckpt.tinker_path, "destination_project_id": "archive",
            "ttl_seconds": 7200}
    headers = {"X-API-Key": KEY, "X-Idempotency-Key": "copy-1"}
    resp = api.client.post("/api/v1/copy_weights", json=body, headers=headers)
    copy = types.CopyWeightsResponse.model_validate(resp.get_json()).tinker_path
    assert copy.endswith("/sampler_weights/s") and copy != ckpt.tinker_path
    retried = api.client.post("/api/v1/copy_weights", json=body, headers=headers)
    assert retried.get_json()["tinker_path"] == copy  # the same key: the same copy
    run_id = copy.removeprefix("tinker://").split("/")[0]
    with services.store.transaction() as s:
        row = s.query(CheckpointRow).filter_by(tinker_path=copy).one()
        run = s.get(ModelRow, run_id)
        assert (run.copied_from, run.lora_rank) == (ckpt.tinker_path, 8)
        assert row.expires_at is not None
    source_file = Path(ckpt.local_dir) / "adapter.bin"
    assert os.stat(Path(row.local_dir) / "adapter.bin").st_ino == source_file.stat().st_ino
    assert api.delete(f"training_runs/{model_id}/checkpoints/sampler_weights/s") \
        .status_code == 200
    assert (Path(row.local_dir) / "adapter.bin").read_bytes() == b"x" * 10
    sample = {"session_id": session_id, "sampling_session_seq_id": 0, "model_path": copy}
    assert api.ok("create_sampling_session", sample)
    adam = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    resp = api.post("optim_step", {"model_id": run_id, "seq_id": 1, "adam_params": adam})
    assert resp.status_code == 400 and "is a copy of" in resp.get_json()["detail"]


def test_copy_weights_into_a_session_slot_and_refusals(api, other, session_id, model_id,
                                                       add_checkpoint):
    ckpt = add_checkpoint(model_id, "training", "w")
    body = {"source_path": ckpt.tinker_path, "session_id": session_id, "model_seq_id": 7}
    copy = api.ok("copy_weights", body)["tinker_path"]
    assert copy == f"tinker://{session_id}:train:7/weights/w"
    other_sid = new_session(other)
    mine = {"source_path": ckpt.tinker_path, "session_id": other_sid, "model_seq_id": 0}
    assert other.post("copy_weights", mine).status_code == 404
    resp = api.post("copy_weights", {"source_path": ckpt.tinker_path})
    assert resp.status_code == 400 and "destination_project_id" in resp.get_json()["detail"]
    taken = body | {"model_seq_id": 0}  # the slot of the session's first run
    resp = api.post("copy_weights", taken)
    assert resp.status_code == 400 and "already exists" in resp.get_json()["detail"]
