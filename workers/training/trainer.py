"""One tick's forward/backward pass over every model's calls: packed, micro-batched, safe.

The rows (datums) of all jobs are cut into micro-batches of at most `budget` tokens; each
micro-batch is one packed stream through the model (`LoraModel.packed_pass`: no
padding, chunked loss with each chunk's backward at once, then one backward through the
layers). Gradients are staged per job and added to the
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
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from protocol.losses import CUSTOM
from protocol.wire import FwdBwdRequest, WireDatum
from workers.model import LoraModel
from workers.parallel import tp
from workers.training.losses import ROW_STATS, token_losses

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    request: FwdBwdRequest
    config: dict[str, Any]
    slot: int


@dataclass
class JobResult:
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # per datum
    loss_sum: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # a custom loss's own
    error: str | None = None


# (this replica's results, the exception its pass raised) -> the jobs that failed on any
# replica; raises if any replica's pass raised (every replica then retries alike)
Agree = Callable[[list[JobResult], Exception | None], set[int]]


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

    def run(self, jobs: list[TrainJob], agree: Agree | None = None) -> list[JobResult]:
        """Every job's outputs, loss and metrics; the gradients of the jobs that ran whole
        are added to their adapters. With `agree` (data parallelism), the replicas settle
        which jobs failed before any gradient is committed (see `Agree`)."""
        rows = [_Row(j, d, job.slot, not job.request.forward_only)
                for j, job in enumerate(jobs) for d in job.request.data]
        results = [JobResult() for _ in jobs]
        staged: dict[int, list[torch.Tensor]] = {}
        per_row: dict[int, tuple[torch.Tensor, torch.Tensor, dict[str, float]]] = {}
        raised: Exception | None = None
        try:
            self._compute(jobs, rows, results, staged, per_row)
            self._collect(jobs, rows, results, per_row)
        except Exception as e:  # noqa: BLE001 - raised again below, after the agreement
            if agree is None:
                raise
            raised = e
        if agree is not None:
            for j in agree(results, raised):  # raises if any replica raised
                results[j].error = results[j].error or "failed on another data-parallel replica"
        self._commit(jobs, results, staged)
        return results

    def _compute(self, jobs, rows, results, staged, per_row) -> None:
        learned = self.learned_budget
        training = {job.slot for job in jobs if not job.request.forward_only}
        # This tick's staged gradients, and their sum with .grad at commit, live beside it.
        reserve = 2 * sum(p.numel() * p.element_size() for s in training
                          for p in self.model.adapter_parameters(s))
        for micro in micro_batches(rows, self.budget(reserve), len(jobs)):
            self._run_split(micro, jobs, results, staged, per_row, rows)
        if learned is not None and self.learned_budget == learned:
            # No out-of-memory error this tick: let it regrow, up to the estimate.
            grown = int(learned * 1.25) + 1
            estimate = tp.agree_min(estimate_budget(self.model, self.checkpoint_layers,
                                                 self.chunk_tokens, reserve), self.model.tp)
            self.learned_budget = grown if grown < estimate else None

    @staticmethod
    def _collect(jobs, rows, results, per_row) -> None:
        """Each job's per-datum outputs, summed loss and custom metrics, on the host."""
        for i, row in enumerate(rows):
            result = results[row.job]
            if result.error is None:
                lp, losses, metrics = per_row[i]
                result.outputs.append({"logprobs": lp.cpu().numpy(),
                                       "elementwise_loss": losses.cpu().numpy()})
                result.loss_sum += float(losses.sum())
                for key, value in metrics.items():  # a custom loss's, summed over datums
                    result.metrics[key] = result.metrics.get(key, 0.0) + value
        for job, result in zip(jobs, results, strict=True):
            for key in result.metrics:  # ...and averaged, for the :mean ones
                if key.endswith(":mean"):
                    result.metrics[key] /= len(job.request.data)

    # --- memory -------------------------------------------------------------------------------
    def budget(self, reserve: int = 0) -> int:
        """Tokens per micro-batch; `reserve`: bytes the tick needs besides activations."""
        if self.fixed_budget > 0:
            return self.fixed_budget
        if self.learned_budget is not None:
            return self.learned_budget
        return tp.agree_min(estimate_budget(self.model, self.checkpoint_layers, self.chunk_tokens,
                                         reserve), self.model.tp)

    def _run_split(self, micro, jobs, results, staged, per_row, rows) -> None:
        live = [i for i in micro if results[rows[i].job].error is None]
        if not live:
            return
        try:
            self._forward_backward(live, jobs, rows, staged, per_row)
            return
        except torch.OutOfMemoryError:
            if tp.active(self.model.tp):  # the other ranks wait in a collective: no retry
                log.critical("out of memory on a tensor-parallel rank; the worker stops")
                os._exit(70)
            # handled below: inside `except`, the traceback pins the failed pass's tensors
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
        device = self.model.device
        inputs = [{k: torch.tensor(v, device=device) for k, v in r.datum.inputs.items()
                   if k != "target_tokens"} for r in batch]
        targets, widths = _targets(batch, inputs)

        def narrow(k: int, lp: torch.Tensor) -> torch.Tensor:
            """Row k's own log-probs from the pack's [n, K] (K: the widest top-k row)."""
            if lp.dim() == 1:
                return lp
            return lp[:, 0] if widths[k] == 0 else lp[:, :widths[k]]

        def row_loss(k: int, offset: int, lp: torch.Tensor) -> torch.Tensor:
            job = jobs[batch[k].job]
            part = {name: t[offset : offset + len(lp)] for name, t in inputs[k].items()}
            lp = lp if widths[k] else narrow(k, lp)  # a top-k row keeps its padding columns
            return token_losses(job.request.loss_fn, lp, part, job.config)

        def prepare(logprobs: list[torch.Tensor]) -> None:
            for k, lp in enumerate(logprobs):  # whole-row statistics (gspo's ratio)
                job = jobs[batch[k].job]
                if stats := ROW_STATS.get(job.request.loss_fn):
                    extra = stats(narrow(k, lp), inputs[k], job.config)
                    if job.request.loss_fn == CUSTOM:  # the chunks need only g and f
                        row_metrics[k] = extra.pop("custom_metrics")  # type: ignore[arg-type]
                        inputs[k] = {}
                    inputs[k].update(extra)

        needs_rows = any(jobs[r.job].request.loss_fn in ROW_STATS for r in batch)
        row_metrics: dict[int, dict[str, float]] = {}

        out = self.model.packed_pass(
            [r.datum.tokens.tolist() for r in batch],
            targets,
            [r.slot for r in batch], [r.needs_grad for r in batch], row_loss,
            self.chunk_tokens, self.checkpoint_layers, prepare if needs_rows else None,
        )
        owners = {r.slot: r.job for r in batch if r.needs_grad}  # one job per slot (see top)
        for slot, grads in out.grads.items():
            params = self.model.adapter_parameters(slot)
            job = owners[slot]
            if job not in staged:  # the job's first micro-batch: keep its gradients as they are
                staged[job] = [torch.zeros_like(p) if g is None else g.contiguous()
                               for p, g in zip(params, grads, strict=True)]
                continue
            pairs = [(a, g) for a, g in zip(staged[job], grads, strict=True) if g is not None]
            if pairs:
                torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
        for k, (i, lp, loss) in enumerate(zip(micro, out.logprobs, out.losses, strict=True)):
            # to the host at the end: no sync per micro-batch
            per_row[i] = (narrow(k, lp), loss, row_metrics.get(k, {}))

    def _commit(self, jobs, results, staged) -> None:
        """Add each fully-run job's gradients to its adapter (they accumulate until optim)."""
        for j, grads in staged.items():
            if results[j].error is not None:
                continue
            params = self.model.adapter_parameters(jobs[j].slot)
            held = [(p.grad, g) for p, g in zip(params, grads, strict=True) if p.grad is not None]
            if held:
                torch._foreach_add_([a for a, _ in held], [g for _, g in held])
            for p, g in zip(params, grads, strict=True):
                if p.grad is None:
                    p.grad = g


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


def estimate_budget(model: LoraModel, checkpoint_layers: bool, chunk_tokens: int = 4096,
                    reserve: int = 0) -> int:
    """Tokens per micro-batch that the free GPU memory should hold (CPU: no limit)."""
    if model.device.type != "cuda":
        return 1 << 30
    free, _ = torch.cuda.mem_get_info(model.device)
    # Memory PyTorch has cached but not handed out is free for us too.
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
    c = model.config
    itemsize = next(model.hf.parameters()).element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    h, i = c.hidden_size, c.intermediate_size
    # Tensors a layer saves for backward, per token.
    if model.fast:
        # fastpath: the residual stream and its norm twice (4h), q/k before and after RoPE,
        # v, the attention output (3q + 3kv), gate, up and silu·up (3i); fp32 norms are
        # recomputed by the fused backward kernels.
        per_layer = (4 * h + 3 * q + 3 * kv + 3 * i) * itemsize
    else:
        # transformers layers: norms, projections, attention and MLP activations, plus
        # the fp32 copies RMSNorm makes.
        per_layer = (6 * h + 3 * (q + kv) + 4 * i) * itemsize + (2 * h + q + kv) * 4
    if checkpoint_layers:  # each layer's input, plus one layer recomputed at a time
        per_token = per_layer + c.num_hidden_layers * h * itemsize
    else:  # (the layer inputs are among the saved tensors already)
        per_token = c.num_hidden_layers * per_layer
    # The loss side holds one chunk's logits: fp32 logits, their gradient, model-dtype copy.
    head = chunk_tokens * c.vocab_size * (8 + itemsize)
    return max(256, int(0.85 * (free - head - reserve) / per_token))


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _targets(batch: list[_Row], inputs: list[dict[str, torch.Tensor]]
             ) -> tuple[list[list[int]] | list[list[list[int]]], list[int]]:
    """The rows' targets for one pack, and each row's top-k width (0: one target per
    position). With any top-k row in the batch every row's targets become [n, K] for the
    widest K: a plain row's single target in column 0, a narrower top-k row's padded with
    token 0 at weight 0 (so the padding adds nothing to its loss)."""
    arrays = [r.datum.inputs["target_tokens"] for r in batch]
    widths = [a.shape[1] if a.ndim == 2 else 0 for a in arrays]
    k_max = max(widths)
    if k_max == 0:
        return [a.tolist() for a in arrays], widths
    padded = []
    for a, width, x in zip(arrays, widths, inputs, strict=True):
        wide = np.zeros((a.shape[0], k_max), dtype=np.int64)
        wide[:, :max(width, 1)] = a if width else a[:, None]
        padded.append(wide.tolist())
        if 0 < width < k_max:
            x["weights"] = torch.nn.functional.pad(x["weights"], (0, k_max - width))
    return padded, widths
