"""API test fixtures: the Flask app on a tmp SQLite file, a fake model folder, real Redis
(db 15) for the doorbell, and a recording `enqueue` instead of Celery."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, text, update

from app.factory import create_app
from config import load_settings
from protocol.paths import SEGMENT_OF
from store.doorbell import sampler_bell
from store.schema import DONE, FAILED, CheckpointRow, RequestRow, utcnow

REDIS_URL = "redis://127.0.0.1:6379/15"
VOCAB = 512
KEY = "tml-test-key"
OTHER_KEY = "tml-other-key"
ALIAS = "Qwen/Qwen3-8B"


class Api:
    """The Flask test client with the API key and the /api/v1 prefix filled in."""

    def __init__(self, client: Any, key: str | None = KEY):
        self.client = client
        self.key = key

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"X-API-Key": self.key} if self.key else {}
        return headers | (extra or {})

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        headers = self._headers(kw.pop("headers", None))
        if isinstance(body, bytes):
            return self.client.post(f"/api/v1/{path}", data=body, headers=headers, **kw)
        return self.client.post(
            f"/api/v1/{path}", json=body if body is not None else {}, headers=headers, **kw
        )

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(f"/api/v1/{path}", headers=self._headers(), **kw)

    def delete(self, path: str) -> Any:
        return self.client.delete(f"/api/v1/{path}", headers=self._headers())

    def ok(self, path: str, body: Any = None) -> dict[str, Any]:
        resp = self.post(path, body)
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    config = {
        "vocab_size": VOCAB,
        "architectures": ["Qwen3ForCausalLM"],
        "max_position_embeddings": 1024,
        "model_type": "qwen3",
    }
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder)
    return folder


def write_tokenizer(folder) -> None:
    """A word-level tokenizer over a few words (ids below VOCAB) and a chat template, for the
    OpenAI-compatible routes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "world"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant"
                "{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template,
                                                              "eos_token": "<|im_end|>"}))


@pytest.fixture
def database_url() -> str:
    return ""  # SQLite under data_dir; test_hostile.py runs on PostgreSQL as well


@pytest.fixture
def settings(tmp_path, model_folder, database_url):
    return load_settings(
        env={},
        database_url=database_url,
        data_dir=str(tmp_path / "data"),
        base_model=str(model_folder),
        model_aliases=ALIAS,
        redis_url=REDIS_URL,
        long_poll_seconds=0.5,
        max_seq_len=256,
        max_sample_tokens=64,
        max_lora_rank=32,
        max_models_per_tenant=4,
    )


@pytest.fixture
def enqueued():
    return []


@pytest.fixture
def app(settings, enqueued):
    app = create_app(settings, enqueue=enqueued.append)
    app.config["TESTING"] = True
    yield app
    services = app.extensions["tinkerq"]
    services.doorbell.close()
    services.store.engine.dispose()


@pytest.fixture
def services(app):
    return app.extensions["tinkerq"]


@pytest.fixture
def api(app):
    return Api(app.test_client())


@pytest.fixture
def other(app):
    return Api(app.test_client(), OTHER_KEY)


@pytest.fixture
def session_id(api):
    return new_session(api, k="v")


def new_session(api: Api, **user_metadata: str) -> str:
    """A new session of `api`'s key, created with the body the SDK sends."""
    body = {"tags": [], "user_metadata": user_metadata, "sdk_version": "0.38.0",
            "type": "create_session"}
    return api.ok("create_session", body)["session_id"]


def create_model_body(session_id: str, seq: int = 0, **lora: Any) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "model_seq_id": seq,
        "base_model": ALIAS,
        "user_metadata": {"renderer_name": "qwen3"},
        "lora_config": {"rank": 8, "train_unembed": True, "train_mlp": True, "train_attn": True}
        | lora,
        "optimizer_config": {"type": "adamw"},
        "type": "create_model",
    }


@pytest.fixture
def model_id(api, session_id, enqueued):
    answer = api.ok("create_model", create_model_body(session_id))
    enqueued.clear()
    return answer["model_id"]


@pytest.fixture
def finish(services):
    """Play the worker: store a result for a request and ring the doorbell."""

    def _finish(
        request_id: str,
        result: Any = None,
        *,
        proto: bytes | None = None,
        error: str | None = None,
        category: str = "user",
    ) -> None:
        values: dict[str, Any] = {"finished_at": utcnow()}
        if error is not None:
            values |= {"state": FAILED, "error": error, "error_category": category}
        elif proto is not None:
            values |= {"state": DONE, "result": proto, "result_type": "proto"}
        else:
            values |= {"state": DONE, "result": json.dumps(result).encode(), "result_type": "json"}
        with services.store.transaction() as s:
            s.execute(update(RequestRow).where(RequestRow.id == request_id).values(**values))
            sampler = s.get(RequestRow, request_id).sampler_id
        services.doorbell.ring(request_id)
        if sampler is not None:
            services.doorbell.ring(sampler_bell(sampler))

    return _finish


@pytest.fixture
def add_checkpoint(services):
    """Play the task that records a checkpoint the worker wrote."""

    def _add(model_id: str, kind: str, name: str, key: str = KEY) -> CheckpointRow:
        from store.schema import tenant_of

        segment = SEGMENT_OF[kind]
        tenant = tenant_of(key)
        folder = services.settings.checkpoint_root / tenant / model_id / segment / name
        folder.mkdir(parents=True)
        (folder / "adapter.bin").write_bytes(b"x" * 10)
        row = CheckpointRow(
            tenant=tenant,
            model_id=model_id,
            kind=kind,
            name=name,
            tinker_path=f"tinker://{model_id}/{segment}/{name}",
            local_dir=str(folder),
            size_bytes=10,
        )
        with services.store.transaction() as s:
            s.add(row)
        return row

    return _add


PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url():
    name = f"tinkerq_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # a real server is required: CI starts one
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    # The plain scheme, as users write DATABASE_URL; the store maps it to psycopg2.
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
