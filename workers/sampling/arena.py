"""The running batch's KV cache: one arena per layer, [capacity tokens, kv heads, head dim].

A sequence owns one contiguous region of prompt + max_tokens tokens (known at admission, so
nothing is padded or moved); regions are first-fit allocated and freed when the sequence
ends. Attention reads the arena in place: prefill (and the unfused decode step) with one
flash-attention call per layer for the whole batch (`cu_seqlens_k` = region starts,
`seqused_k` = lengths), on the CPU one SDPA per row.
"""

from __future__ import annotations

import bisect

import torch


class KVArena:
    """Per-layer K and V storage of `capacity` tokens (+1 scratch token) with a first-fit
    allocator of contiguous regions."""

    def __init__(self, layers: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (capacity + 1, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.scratch = capacity  # padded graph rows write here
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, size), by start

    def alloc(self, size: int) -> int | None:
        for i, (start, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, free - size)
                return start
        return None

    def release(self, start: int, size: int) -> None:
        i = bisect.bisect(self._free, (start, size))
        self._free.insert(i, (start, size))
        # merge with the right, then the left neighbour
        if i + 1 < len(self._free) and start + size == self._free[i + 1][0]:
            self._free[i] = (start, size + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])

    @property
    def free_tokens(self) -> int:
        return sum(size for _, size in self._free)


def auto_kv_tokens(device: torch.device, per_token: int) -> int:
    """The arena's tokens when the sampler sets none (`per_token`: a token's bytes)."""
    if device.type != "cuda":  # at most 64k tokens and 2 GiB of host memory
        return max(1024, min(1 << 16, (2 << 30) // per_token))
    free, _ = torch.cuda.mem_get_info(device)
    return max(4096, int(0.3 * free / per_token))
