"""One tick's forward/backward pass over every model's calls: packed, micro-batched, safe.

The rows (datums) of all jobs are cut into micro-batches of at most `budget` tokens; each
micro-batch is one packed stream through the model (`LoraModel.packed_logprobs`: no
padding, chunked loss), then one backward. Gradients are staged per job and added to the
adapters' `.grad` only when the whole job has run, so a job that fails part-way leaves no
trace in its adapter.

Rule that makes the staging exact: a micro-batch holds rows of at most one job per adapter
slot (rows of different slots may mix freely, their parameters are disjoint), so the
gradient of a slot's parameters in a micro-batch belongs to exactly one job.

Memory: `budget` comes from `--train-micro-batch-size` (tokens), or, when that is 0, from
the free GPU memory (an estimate of activation bytes per token). On an out-of-memory error
the micro-batch is split in two and retried, and the budget remembers the smaller size (it
grows back by a quarter after each tick without one); a single datum that does not fit
alone fails its own job with a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from app.protocol import FwdBwdRequest, WireDatum
from workers.losses import token_losses
from workers.model import LoraModel

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    request: FwdBwdRequest
    config: dict[str, float]
    slot: int


@dataclass
class JobResult:
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # per datum
    loss_sum: float = 0.0
    error: str | None = None


@dataclass
class _Row:
    job: int  # index into the tick's jobs
    datum: WireDatum
    slot: int
    needs_grad: bool

    @property
    def tokens(self) -> int:
        return len(self.datum.tokens)


class Trainer:
    def __init__(self, model: LoraModel, micro_batch_tokens: int = 0, chunk_tokens: int = 4096,
                 checkpoint_layers: bool = False):
        self.model = model
        self.fixed_budget = micro_batch_tokens
        self.chunk_tokens = chunk_tokens
        self.checkpoint_layers = checkpoint_layers
        self.learned_budget: int | None = None  # lowered by out-of-memory errors

    def run(self, jobs: list[TrainJob]) -> list[JobResult]:
        rows = [_Row(j, d, job.slot, not job.request.forward_only)
                for j, job in enumerate(jobs) for d in job.request.data]
        results = [JobResult() for _ in jobs]
        staged: dict[int, list[torch.Tensor]] = {}
        per_row: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        learned = self.learned_budget
        for micro in micro_batches(rows, self.budget(), len(jobs)):
            self._run_split(micro, jobs, results, staged, per_row, rows)
        if learned is not None and self.learned_budget == learned:
            self.learned_budget = int(learned * 1.25) + 1  # no OOM this tick: let it regrow
        self._commit(jobs, results, staged)
        for i, row in enumerate(rows):
            if results[row.job].error is None:
                lp, losses = per_row[i]
                results[row.job].outputs.append({"logprobs": lp.numpy(),
                                                 "elementwise_loss": losses.numpy()})
                results[row.job].loss_sum += float(losses.sum())
        return results

    # --- memory -------------------------------------------------------------------------------
    def budget(self) -> int:
        if self.fixed_budget > 0:
            return self.fixed_budget
        if self.learned_budget is not None:
            return self.learned_budget
        return estimate_budget(self.model, self.checkpoint_layers)

    def _run_split(self, micro, jobs, results, staged, per_row, rows) -> None:
        live = [i for i in micro if results[rows[i].job].error is None]
        if not live:
            return
        try:
            self._forward_backward(live, jobs, rows, staged, per_row)
        except torch.OutOfMemoryError:
            _free_memory()
            tokens = sum(rows[i].tokens for i in live)
            if len(live) == 1:
                results[rows[live[0]].job].error = (
                    f"a datum of {tokens} tokens does not fit in GPU memory even alone "
                    f"(micro-batch budget now {self.budget()} tokens); send shorter sequences")
                return
            self.learned_budget = max(1, tokens // 2)
            log.warning("out of memory on %d tokens; splitting and retrying", tokens)
            half = len(live) // 2
            for part in (live[:half], live[half:]):
                self._run_split(part, jobs, results, staged, per_row, rows)

    # --- compute ------------------------------------------------------------------------------
    def _forward_backward(self, micro: list[int], jobs, rows, staged, per_row) -> None:
        batch = [rows[i] for i in micro]
        needs_grad = any(r.needs_grad for r in batch)
        with torch.set_grad_enabled(needs_grad):
            lps = self.model.packed_logprobs(
                [r.datum.tokens.tolist() for r in batch],
                [r.datum.inputs["target_tokens"].tolist() for r in batch],
                [r.slot for r in batch], self.chunk_tokens, self.checkpoint_layers,
            )
            losses = [self._token_losses(jobs[r.job], r.datum, lp) for r, lp in zip(
                batch, lps, strict=True)]
            if needs_grad:
                self._stage_grads(batch, losses, staged)
        for i, lp, loss in zip(micro, lps, losses, strict=True):
            per_row[i] = (lp.detach().float().cpu(), loss.detach().float().cpu())

    def _token_losses(self, job: TrainJob, datum: WireDatum, lp: torch.Tensor) -> torch.Tensor:
        inputs = {k: torch.tensor(v, device=lp.device) for k, v in datum.inputs.items()}
        return token_losses(job.request.loss_fn, lp, inputs, job.config)

    def _stage_grads(self, batch: list[_Row], losses: list[torch.Tensor],
                     staged: dict[int, list[torch.Tensor]]) -> None:
        total = sum(loss.sum() for r, loss in zip(batch, losses, strict=True) if r.needs_grad)
        owners = {r.slot: r.job for r in batch if r.needs_grad}  # one job per slot (see top)
        params = {s: self.model.adapter_parameters(s) for s in owners}
        flat = [p for s in owners for p in params[s]]
        grads = torch.autograd.grad(total, flat, allow_unused=True)
        k = 0
        for s, job in owners.items():
            mine = grads[k : k + len(params[s])]
            k += len(params[s])
            acc = staged.setdefault(job, [torch.zeros_like(p) for p in params[s]])
            for a, g in zip(acc, mine, strict=True):
                if g is not None:
                    a.add_(g)

    def _commit(self, jobs, results, staged) -> None:
        """Add each fully-run job's gradients to its adapter (they accumulate until optim)."""
        for j, grads in staged.items():
            if results[j].error is not None:
                continue
            for p, g in zip(self.model.adapter_parameters(jobs[j].slot), grads, strict=True):
                p.grad = g if p.grad is None else p.grad + g


def micro_batches(rows: list[_Row], budget: int, num_jobs: int) -> list[list[int]]:
    """Greedy cut of the rows (in order) into micro-batches of <= budget tokens, with at
    most one job per slot in each; a row larger than the budget gets one of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens, owner = 0, {}
    for i, row in enumerate(rows):
        clash = owner.get(row.slot, row.job) != row.job
        if current and (tokens + row.tokens > budget or clash):
            batches.append(current)
            current, tokens, owner = [], 0, {}
        current.append(i)
        tokens += row.tokens
        owner[row.slot] = row.job
    if current:
        batches.append(current)
    return batches


def estimate_budget(model: LoraModel, checkpoint_layers: bool) -> int:
    """Tokens per micro-batch that the free GPU memory should hold (CPU: no limit)."""
    if model.device.type != "cuda":
        return 1 << 30
    free, _ = torch.cuda.mem_get_info(model.device)
    # Memory PyTorch has cached but not handed out is free for us too.
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
    c = model.config
    itemsize = next(model.hf.parameters()).element_size()
    heads = (c.num_attention_heads + c.num_key_value_heads) * getattr(
        c, "head_dim", c.hidden_size // c.num_attention_heads)
    # Tensors a layer saves for backward, per token: norms, projections, attention and MLP
    # activations in the model dtype, plus the fp32 copies RMSNorm makes.
    per_layer = (6 * c.hidden_size + 3 * heads + 4 * c.intermediate_size) * itemsize
    per_layer += (2 * c.hidden_size + heads) * 4
    layers = 1 if checkpoint_layers else c.num_hidden_layers
    per_token = layers * per_layer + c.num_hidden_layers * c.hidden_size * itemsize
    return max(256, int(0.8 * free / per_token))


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

