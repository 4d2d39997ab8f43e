"""The running batch's decode inputs and CUDA graphs.

Decode steps run as CUDA graphs on CUDA (`cuda_graphs`; torch.compile only fuses the
element-wise pieces of the unfused step and the sampling), one per batch-size bucket
(powers of two), LoRA width and kind of step, captured on first use; padded rows of a
bucket write to a scratch token of the arena. Elsewhere, or with graphs off, the same
function runs eagerly.
Between steps the host builds nothing while the rows stay the same (`Steady`): the chosen
tokens are fed back and positions advance on the device, and the host reads each step's
tokens one step late, while the next step runs, so stop checks overlap the GPU's work. A
sequence that stops leaves its row idle (on the scratch token) until requests join or half
the rows idle, when the rows are rebuilt; its one extra step stays inside its own region.

The running batch (decoding.RunningBatch) is seen through `Batch`, what this module reads of
it: decoding imports this module, not the other way round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from workers.model import LoraModel
from workers.sampling.arena import KVArena
from workers.sampling.choose import Sampling, sampling_of
from workers.sampling.lora_table import LoraTable
from workers.sampling.sequences import Seq

log = logging.getLogger(__name__)


class Batch(Protocol):
    """What the decode inputs and the graphs read of the running batch."""

    model: LoraModel
    arena: KVArena | None
    lora: LoraTable
    fused: bool
    running: list[Seq]

    def flash(self, rows: int) -> bool: ...

    def lora_path_for(self, rows: int, several: bool) -> str: ...

    def decode_forward(self, x: DecodeInputs) -> torch.Tensor: ...


@dataclass
class DecodeInputs:
    tokens: torch.Tensor  # [B] last token of each sequence
    positions: torch.Tensor  # [B]
    write: torch.Tensor  # [B] arena index its K/V goes to
    starts: torch.Tensor  # [B + 1] int32 region starts (the last entry unused)
    used: torch.Tensor  # [B] int32 keys after this step
    cu_q: torch.Tensor  # [B + 1] int32 0..B
    mask: torch.Tensor | None  # [B, R]; None: no LoRA, or `uniform`
    uniform: bool  # every row on one adapter (no mask needed)
    max_len: int
    cols: torch.Tensor  # [B, 2] int32: each row's LoRA columns [lo, hi) (the fused step's mask)

    @classmethod
    def build(cls, seqs: list[Seq], batch: Batch) -> DecodeInputs:
        device = batch.model.device
        keys = [s.req.key_of_adapter for s in seqs]
        cols = batch.lora.row_columns(keys)
        starts = [s.start for s in seqs]
        used = [s.length + 1 for s in seqs]
        host = torch.tensor([[s.tokens[-1], s.length, s.start + s.length] for s in seqs])
        host = host.to(device)
        return cls(
            tokens=host[:, 0], positions=host[:, 1], write=host[:, 2],
            starts=torch.tensor(starts + [batch.arena.scratch], dtype=torch.int32,
                                device=device),
            used=torch.tensor(used, dtype=torch.int32, device=device),
            cu_q=torch.arange(len(seqs) + 1, dtype=torch.int32, device=device),
            mask=batch.lora.row_mask(keys, cols=cols), uniform=batch.lora.uniform(keys),
            max_len=max(s.req.region for s in seqs), cols=cols,
        )


@dataclass(eq=False)
class Steady:
    """The running rows' decode inputs, kept on the device between steps: each step's tokens
    are fed back and positions advance there, so an unchanged set of rows costs the host no
    tensor building, and the host reads a step's tokens one step late, while the next step
    runs. A row whose sequence ended idles (reads and writes the scratch token) until
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
        x.write += self.alive
        x.used += self.alive
        if self.sampling is not None:
            self.sampling.steps += 1

    def idle(self, rows: list[int], scratch: int) -> None:
        for row in rows:
            self.x.write[row] = scratch
            self.x.starts[row] = scratch
            self.x.used[row] = 1
            self.alive[row] = 0
        self.stale = 2 * sum(s is not None for s in self.rows) <= len(self.rows)


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
        key = (bucket, width, x.uniform, fused, fused and self.batch.flash(bucket),
               fused and self.batch.lora_path_for(bucket, bool(width) and not x.uniform))
        if key not in self.graphs or x.max_len > self.max_len:
            if x.max_len > self.max_len:  # graphs bake the longest region in: recapture all
                self.max_len = max(x.max_len, 2 * self.max_len, 1024)
                self.graphs.clear()
            self.graphs[key] = self._capture(bucket, x.uniform)
        graph, static, out = self.graphs[key]
        scratch = self.batch.arena.scratch
        for name in ("tokens", "positions"):
            getattr(static, name)[:b].copy_(getattr(x, name))
            getattr(static, name)[b:].zero_()
        static.write[:b].copy_(x.write)
        static.write[b:].fill_(scratch)
        static.starts[:b].copy_(x.starts[:b])
        static.starts[b:].fill_(scratch)
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
        scratch = batch.arena.scratch
        width = batch.lora.width
        dtype = next(batch.model.hf.parameters()).dtype
        static = DecodeInputs(
            tokens=torch.zeros(bucket, dtype=torch.long, device=device),
            positions=torch.zeros(bucket, dtype=torch.long, device=device),
            write=torch.full((bucket,), scratch, dtype=torch.long, device=device),
            starts=torch.full((bucket + 1,), scratch, dtype=torch.int32, device=device),
            used=torch.ones(bucket, dtype=torch.int32, device=device),
            cu_q=torch.arange(bucket + 1, dtype=torch.int32, device=device),
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
