"""--base-model: a local Llama or Qwen3 folder, or a Hugging Face id from the local cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from config import SettingsError, load_settings, model_dir
from tests.conftest import tiny_qwen3_config
from workers.lora import BASE_SLOT
from workers.model import AdapterSpec, LoraModel


def save_tiny(folder, config) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_local_folder_loads_and_trains_an_adapter(tmp_path, arch):
    config = tiny_qwen3_config() if arch == "qwen3" else LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        architectures=["LlamaForCausalLM"])
    save_tiny(tmp_path / arch, config)
    folder = model_dir(load_settings(env={}, base_model=str(tmp_path / arch)))
    model = LoraModel.load(folder, torch.device("cpu"), torch.float32)
    assert len(model.layers) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    model.add_adapter(0, AdapterSpec(rank=4, alpha=8), torch.Generator().manual_seed(0))
    base = model.target_logprobs([[1, 2, 3]], [[2, 3, 4]], [BASE_SLOT])[0]
    lora = model.target_logprobs([[1, 2, 3]], [[2, 3, 4]], [0])[0]
    torch.testing.assert_close(base, lora)  # B starts at zero: the adapter changes nothing yet
    lora.sum().backward()
    assert all(w.B.grad is not None for w in model.adapter_weights(0).values())


def test_hugging_face_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    save_tiny(snapshot, tiny_qwen3_config())
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert model_dir(load_settings(env={}, base_model="acme/tiny")) == snapshot
    shutil.rmtree(cache)
    with pytest.raises(SettingsError, match="acme/tiny"):
        model_dir(load_settings(env={}, base_model="acme/tiny"))


def test_unsupported_architecture_is_refused(tmp_path):
    save_tiny(tmp_path / "m", tiny_qwen3_config())
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "architectures": ["MysteryForCausalLM"]}))
    with pytest.raises(ValueError, match="MysteryForCausalLM"):
        LoraModel.load(tmp_path / "m", torch.device("cpu"), torch.float32)
