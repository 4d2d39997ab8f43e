"""The running batch's KV cache: paged. One K and one V tensor per layer of `blocks` blocks of
BLOCK tokens (+ a scratch block), [tokens, kv heads, head dim]; token slot = block · BLOCK +
offset.

Keys and values are stored in the model's dtype, or in float8 e4m3 (`sample_kv_dtype=fp8`):
one byte each, written rounded to nearest and read back into the model's dtype.

A sequence holds a block table (its blocks in order) and grows a block at a time as it
decodes, so the cache holds what sequences have written, not what they might write. Blocks
are reference-counted: the samples of the requests of one prompt and adapter share the
prompt's full blocks (admission tells when). When growth finds no free block, the running
batch preempts its youngest request (decoding.RunningBatch) and runs it again later.
"""

from __future__ import annotations

import logging

import torch

from workers.parallel import tp

log = logging.getLogger(__name__)
BLOCK = 32  # tokens per block
KV_DTYPES = {"model": None, "fp8": torch.float8_e4m3fn}  # sample_kv_dtype's choices


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


def most_blocks(prompt: int, samples: int, max_tokens: int) -> int:
    """The most blocks a request ever holds: its prompt's blocks once (admission), and each
    sample's own blocks up to prompt + max_tokens."""
    return blocks_for(prompt) + samples * (blocks_for(prompt + max_tokens) - prompt // BLOCK)


class KVCache:
    """Per-layer K and V storage of `capacity` tokens (rounded up to whole blocks), with a
    free list and
    reference counts; the last block (`scratch_block`) is where idle and padded rows of a
    decode step read and write."""

    def __init__(self, layers: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.blocks = max(1, blocks_for(capacity))
        self.capacity = self.blocks * BLOCK
        shape = ((self.blocks + 1) * BLOCK, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.scratch_block = self.blocks
        self.scratch = self.scratch_block * BLOCK  # the scratch block's first token slot
        self._free = list(range(self.blocks - 1, -1, -1))  # a stack: low blocks first
        self._refs = [0] * self.blocks

    @classmethod
    def for_model(cls, model, tokens: int, max_sequences: int,
                  dtype: torch.dtype | None = None) -> KVCache:
        """The cache of a LoraModel's sampler: `tokens`, or (0) auto_kv_tokens' share of
        free memory, but never more than `max_sequences` at the model's whole context; in
        `dtype` (default: the model's)."""
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        k_proj = next(v for n, v in model.layers.items() if n.endswith("k_proj"))
        kv_heads = k_proj.out_features // head_dim  # this rank's, under tensor parallelism
        dtype = dtype or next(model.hf.parameters()).dtype
        per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * (
            torch.finfo(dtype).bits // 8)
        most = max_sequences * getattr(c, "max_position_embeddings", 1 << 20)
        tokens = tokens or tp.agree_min(min(most, auto_kv_tokens(model.device, per_token)),
                                        model.tp)
        cache = cls(c.num_hidden_layers, tokens, kv_heads, head_dim, dtype, model.device)
        log.info("sampler KV cache: %d tokens (%.1f GiB, %s)", cache.capacity,
                 cache.capacity * per_token / 2**30, str(dtype).removeprefix("torch."))
        return cache

    def alloc(self, n: int) -> list[int] | None:
        """`n` fresh blocks (reference count 1), or None (and nothing taken) if fewer are
        free."""
        if n > len(self._free):
            return None
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [n, Hk, D] of one layer into token slots `slots` [n]; returns them as
        stored (rounded to the cache's dtype)."""
        return store(self.k[layer], slots, k), store(self.v[layer], slots, v)

    def copy_tokens(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of token slots `src` to `dst` in every layer."""
        if not src:
            return
        device = self.k[0].device
        s, d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        for t in (*self.k, *self.v):
            _bytes(t).index_copy_(0, d, _bytes(t)[s])

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_tokens(self) -> int:
        return len(self._free) * BLOCK


def store(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`new` [n, ...] rounded to `cache`'s dtype into its rows `slots`; returns the rounded
    rows (`new` itself when the dtypes agree)."""
    rounded = new.to(cache.dtype)
    _bytes(cache).index_copy_(0, slots, _bytes(rounded))
    return rounded


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """`t` as raw bytes where index_copy_ takes no float8 (the CPU's, at least)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def slots(table: list[int], start: int, stop: int) -> list[int]:
    """Token slots of positions [start, stop) of a sequence with this block table."""
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)]


def kv_dtype_problem(dtype: torch.dtype | None, device: torch.device,
                     capability: tuple[int, int] | None = None) -> str | None:
    """Why `device` cannot hold a cache of `dtype` (None: the model's), or None if it can.
    Float8 conversions on CUDA need compute capability 8.9 (Ada, Hopper) or newer."""
    if dtype is None or dtype.itemsize != 1 or device.type != "cuda":
        return None
    capability = capability or torch.cuda.get_device_capability(device)
    if tuple(capability) >= (8, 9):
        return None
    return (f"sample_kv_dtype=fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper "
            f"or later); {device} is {capability[0]}.{capability[1]}: use sample_kv_dtype=model")


def auto_kv_tokens(device: torch.device, per_token: int) -> int:
    """The cache's tokens when the sampler sets none (`per_token`: a token's bytes)."""
    if device.type != "cuda":  # at most 64k tokens and 2 GiB of host memory
        return max(1024, min(1 << 16, (2 << 30) // per_token))
    free, _ = torch.cuda.mem_get_info(device)
    return max(4096, int(0.3 * free / per_token))
