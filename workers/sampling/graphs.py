"""The running batch's decode inputs and CUDA graphs.

Decode steps run as CUDA graphs on CUDA (`cuda_graphs`; torch.compile only fuses the
element-wise pieces of the unfused step and the sampling), one per batch-size bucket
(powers of two), LoRA width and kind of step, captured on first use; padded rows of a
bucket read and write the KV cache's scratch block. Elsewhere, or with graphs off, the same
function runs eagerly.
Between steps the host builds nothing while the rows stay the same (`Steady`): the chosen
tokens are fed back and positions advance on the device, and the host reads each step's
tokens one step late, while the next step runs, so stop checks overlap the GPU's work. A
sequence that stops leaves its row idle (on the scratch block) until requests join or half
the rows idle, when the rows are rebuilt; its one extra step stays inside its own blocks.
The rows' block tables live on the device too: a tick's new blocks are written into them
in one copy (`Steady.extend`), and each step finds where its K/V go from the table.

The running batch (decoding.RunningBatch) is seen through `Batch`, what this module reads of
it: decoding imports this module, not the other way round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from workers.model import LoraModel
from workers.sampling.choose import Sampling, sampling_of
from workers.sampling.kv_cache import BLOCK, KVCache, blocks_for
from workers.sampling.lora_table import LoraTable
from workers.sampling.sequences import Seq

log = logging.getLogger(__name__)


class Batch(Protocol):
    """What the decode inputs and the graphs read of the running batch."""

    model: LoraModel
    cache: KVCache | None
    lora: LoraTable
    fused: bool
    running: list[Seq]

    def lora_path_for(self, rows: int, several: bool) -> str: ...

    def decode_forward(self, x: DecodeInputs) -> torch.Tensor: ...


@dataclass
class DecodeInputs:
    tokens: torch.Tensor  # [B] last token of each sequence
    positions: torch.Tensor  # [B]
    table: torch.Tensor  # [B, W] int32 block tables (the scratch block past each row's own)
    used: torch.Tensor  # [B] int32 keys after this step
    mask: torch.Tensor | None  # [B, R]; None: no LoRA, or `uniform`
    uniform: bool  # every row on one adapter (no mask needed)
    max_len: int  # the longest sequence any row may reach (W = blocks_for(max_len))
    cols: torch.Tensor  # [B, 2] int32: each row's LoRA columns [lo, hi) (the fused step's mask)

    def write_slots(self) -> torch.Tensor:
        """[B] the cache slot each row's new K/V goes to (its position, through its table)."""
        block = self.table.gather(1, (self.positions // BLOCK)[:, None])[:, 0]
        return block.long() * BLOCK + self.positions % BLOCK

    @classmethod
    def build(cls, seqs: list[Seq], batch: Batch) -> DecodeInputs:
        device = batch.model.device
        keys = [s.req.key_of_adapter for s in seqs]
        cols = batch.lora.row_columns(keys)
        max_len = max(s.req.region for s in seqs)
        width, scratch = blocks_for(max_len), batch.cache.scratch_block
        table = torch.tensor([s.blocks + [scratch] * (width - len(s.blocks)) for s in seqs],
                             dtype=torch.int32)
        host = torch.tensor([[s.tokens[-1], s.length] for s in seqs]).to(device)
        return cls(
            tokens=host[:, 0], positions=host[:, 1], table=table.to(device),
            used=torch.tensor([s.length + 1 for s in seqs], dtype=torch.int32, device=device),
            mask=batch.lora.row_mask(keys, cols=cols), uniform=batch.lora.uniform(keys),
            max_len=max_len, cols=cols,
        )


@dataclass(eq=False)
class Steady:
    """The running rows' decode inputs, kept on the device between steps: each step's tokens
    are fed back and positions advance there, so an unchanged set of rows costs the host no
    tensor building, and the host reads a step's tokens one step late, while the next step
    runs. A row whose sequence ended idles (reads and writes the scratch block) until
    requests join or half the rows idle; then the rows are rebuilt from the host's state."""

    rows: list[Seq | None]
    x: DecodeInputs
    alive: torch.Tensor  # [B] int32, 0 for idle rows
    sampling: Sampling | None
    pending: tuple | None = None  # the last step's (tokens, logprobs, ready event) on host
    stale: bool = False

    @classmethod
    def build(cls, batch: Batch) -> Steady:
        rows = list(batch.running)
        return cls(list(rows), DecodeInputs.build(rows, batch),
                   torch.ones(len(rows), dtype=torch.int32, device=batch.model.device),
                   sampling_of(batch.model, rows))

    def advance(self, tokens: torch.Tensor) -> None:
        x = self.x
        x.tokens.copy_(tokens)
        x.positions += self.alive
        x.used += self.alive
        if self.sampling is not None:
            self.sampling.steps += 1

    def idle(self, rows: list[int], scratch_block: int) -> None:
        for row in rows:
            self.x.table[row] = scratch_block
            # its own position may be its region's end, past its table when the region is
            # whole blocks (the step after its last token ran before the host saw it end)
            self.x.positions[row] = 0
            self.x.used[row] = 1
            self.alive[row] = 0
        self.stale = 2 * sum(s is not None for s in self.rows) <= len(self.rows)

    def extend(self, grown: list[tuple[Seq, int]]) -> None:
        """Write the blocks sequences took into their rows' tables (one host-to-device
        copy); `grown`: (sequence, its first new block's index)."""
        index = {s: row for row, s in enumerate(self.rows) if s is not None}
        entries = [(index[s], col, s.blocks[col]) for s, first in grown if s in index
                   for col in range(first, len(s.blocks))]
        if entries:
            at = torch.tensor(entries, dtype=torch.int64).to(self.x.table.device).T
            self.x.table[at[0], at[1]] = at[2].to(torch.int32)


def to_host(tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple:
    """Start copying a step's results to the host; (tokens, logprobs, event to wait on)."""
    if tokens.device.type != "cuda":
        return tokens, logprobs, None
    out = (tokens.to("cpu", non_blocking=True), logprobs.to("cpu", non_blocking=True))
    ready = torch.cuda.Event()
    ready.record()
    return (*out, ready)


class Graphs:
    """One CUDA graph per (batch bucket, LoRA width, one-adapter batch, kind of step):
    static inputs, replayed per step."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, DecodeInputs, torch.Tensor]] = {}
        self.max_len = 0

    def run(self, x: DecodeInputs) -> torch.Tensor:
        b = x.tokens.shape[0]
        bucket = 1 << max(0, (b - 1).bit_length())
        width, fused = self.batch.lora.width, self.batch.fused
        key = (bucket, width, x.uniform, fused,
               fused and self.batch.lora_path_for(bucket, bool(width) and not x.uniform))
        if key not in self.graphs or x.max_len > self.max_len:
            if x.max_len > self.max_len:  # graphs bake the table's width in: recapture all
                self.max_len = max(x.max_len, 2 * self.max_len, 1024)
                self.graphs.clear()
            self.graphs[key] = self._capture(bucket, x.uniform)
        graph, static, out = self.graphs[key]
        for name in ("tokens", "positions"):
            getattr(static, name)[:b].copy_(getattr(x, name))
            getattr(static, name)[b:].zero_()
        static.table[:b, : x.table.shape[1]].copy_(x.table)  # (the rest: scratch, unread)
        static.table[b:].fill_(self.batch.cache.scratch_block)
        static.used[:b].copy_(x.used)
        static.used[b:].fill_(1)
        static.cols[:b].copy_(x.cols)
        static.cols[b:].zero_()
        if static.mask is not None and x.mask is not None:
            static.mask[:b].copy_(x.mask)
            static.mask[b:].zero_()
        graph.replay()
        return out[:b]

    def _capture(self, bucket: int, uniform: bool
                 ) -> tuple[torch.cuda.CUDAGraph, DecodeInputs, torch.Tensor]:
        batch, device = self.batch, self.batch.model.device
        width = batch.lora.width
        dtype = next(batch.model.hf.parameters()).dtype
        static = DecodeInputs(
            tokens=torch.zeros(bucket, dtype=torch.long, device=device),
            positions=torch.zeros(bucket, dtype=torch.long, device=device),
            table=torch.full((bucket, blocks_for(self.max_len)), batch.cache.scratch_block,
                             dtype=torch.int32, device=device),
            used=torch.ones(bucket, dtype=torch.int32, device=device),
            mask=(torch.zeros(bucket, width, dtype=dtype, device=device)
                  if width and not uniform else None),
            uniform=uniform,
            max_len=self.max_len,
            cols=torch.zeros(bucket, 2, dtype=torch.int32, device=device),
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocations, autotuning)
                batch.decode_forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = batch.decode_forward(static)
        log.info("captured decode graph: batch %d, LoRA width %d", bucket, width)
        return graph, static, out
