"""Continuous-batching generation: one running batch of sequences across decode steps.

`RunningBatch` owns the sampling side of the worker:

  admit(key, spec, adapter)  queue a request (its adapter's weights are referenced now, so a
                             slot reloaded later does not change a request already admitted)
  step(max_steps)            let waiting requests join (batched prefill), run up to
                             `max_steps` decode steps of every running sequence, and return
                             the requests that finished

Between steps sequences join and leave: a finished sequence frees its rows at once, and a
request answers when its last sample ends. Requests of different adapters, sampling
sessions and the base model share every step; at most `max_num_sequences` run at once, and
the rest wait in arrival order. A request's prompt is prefilled once, into its first
sample's region, and copied to the others'.

The running batch's parts, each in its module (whose docstring tells the design):

  sequences   a request and its sequences, each owning a region of the KV arena
  arena       the KV cache: one arena per layer, regions first-fit allocated
  lora_table  projections that read the same input as one matmul, and the batch's adapters
              side by side per projection group (every step one fixed set of matmuls)
  forward     the forward passes: prefill and the unfused decode step, and the fused decode
              step (its Triton kernels in epilogue_kernels, attention_kernels and
              gemv_kernel; what they share, and their design, in decode_kernels)
  choose      batch-independent seeded sampling of each row's next token
  graphs      the decode inputs kept on the device between steps, and the CUDA graphs that
              replay a decode step

Requests and their answers are sampler's (SampleSpec, SampleOutput); `sample()` runs a fixed
list of them to completion on a private running batch (tests, tools).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from protocol.jobs import UserError
from workers.model import LoraModel
from workers.parallel import tp
from workers.sampling import decode_kernels
from workers.sampling.arena import KVArena, auto_kv_tokens
from workers.sampling.choose import next_tokens, sampling_of
from workers.sampling.forward import decode_fused, decode_unfused, forward
from workers.sampling.graphs import DecodeInputs, Graphs, Steady, to_host
from workers.sampling.lora_table import Adapter, LoraTable, adapter_key, fuse_base_weights
from workers.sampling.sampler import (
    PromptOut,
    SampledSeq,
    SampleOutput,
    SampleSpec,
    adapter_of,
    prompt_outputs,
    sampled_topk,
    validate,
)
from workers.sampling.sequences import Request, Seq
from workers.training import fastpath

log = logging.getLogger(__name__)

# Where the fused step adds LoRA B (RunningBatch.lora_path_for; measured on an H100 with
# `benchmarks.sampler --lora-placement`): inside the kernels a row per program ("gemv":
# each row reads only its adapter's B) in steps of at most LORA_GEMV_ROWS rows, or of at
# most MIXED_GEMV_ROWS when the rows use several adapters; larger steps of one adapter
# with an addmm per projection group ("addmm": B read once); larger mixed ones inside the
# kernels 16 rows per program ("dots": tensor-core dots over the adapters of each block of
# rows, which the running batch groups by adapter), where the addmm would read every
# adapter's B and mask the rows first.
LORA_GEMV_ROWS = 8
MIXED_GEMV_ROWS = 32


class RunningBatch:
    def __init__(self, model: LoraModel, decode: Callable[[list[int]], str],
                 eos_token_ids: list[int], max_num_sequences: int = 256, kv_tokens: int = 0,
                 cuda_graphs: bool = True, fused: bool | None = None):
        self.model = model
        # decode steps through decode_kernels and their sampling (without top-k / top-p)
        # through sample_kernels (default: on CUDA, when Triton is there)
        self.fused = (model.device.type == "cuda" and decode_kernels.available(model.device)
                      and fastpath.supported(model.hf)) if fused is None else fused
        if self.fused and (why := decode_kernels.unsupported(model.config)):
            log.warning("the sampler takes the unfused decode step: %s", why)
            self.fused = False
        # the fused step's attention: flash attention for steps of at least this many rows,
        # else (None: always) the Triton kernel, which measured faster at every size
        self.flash_rows: int | None = None
        # where the fused step adds LoRA B: "gemv", "dots" or "addmm"; None: by the step's
        # rows and adapters (lora_path_for)
        self.lora_path: str | None = None
        self.decode = decode
        self.eos = set(eos_token_ids)
        self.max_num_sequences = max_num_sequences
        self._kv_tokens = kv_tokens
        self.arena: KVArena | None = None
        fuse_base_weights(model)
        self.lora = LoraTable(model)
        self.waiting: deque[Request] = deque()
        self.running: list[Seq] = []
        self.steady: Steady | None = None  # the running rows' inputs, kept on the device
        self.rng = random.Random()  # seeds of unseeded requests (the same on every TP rank)
        self.graphs = Graphs(self) if cuda_graphs and model.device.type == "cuda" else None

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # --- admission -------------------------------------------------------------------------
    def admit(self, key: Any, spec: Any, adapter: Adapter | None) -> None:
        """Queue a validated request (sampler.SampleSpec) with its adapter's weights."""
        arena = self._arena()
        request = Request(key, spec, adapter,
                          self.rng.getrandbits(62) if spec.seed is None else spec.seed,
                          None if adapter is None else adapter_key(adapter))
        if spec.num_samples > self.max_num_sequences:
            raise UserError(f"num_samples={spec.num_samples} exceeds the sampler's "
                            f"max_num_sequences={self.max_num_sequences}")
        if request.region * spec.num_samples > arena.capacity:
            raise UserError(
                f"num_samples × (prompt + max_tokens) = {request.region * spec.num_samples} "
                f"tokens exceeds the sampler's KV cache of {arena.capacity} tokens")
        self.waiting.append(request)

    def _arena(self) -> KVArena:
        if self.arena is None:
            c, m = self.model.config, self.model
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            k_proj = next(v for n, v in m.layers.items() if n.endswith("k_proj"))
            kv_heads = k_proj.out_features // head_dim  # this rank's, under tensor parallelism
            dtype = next(m.hf.parameters()).dtype
            per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * (
                torch.finfo(dtype).bits // 8)
            # never more than every running sequence at the model's whole context can use
            most = self.max_num_sequences * getattr(c, "max_position_embeddings", 1 << 20)
            tokens = self._kv_tokens or tp.agree_min(
                min(most, auto_kv_tokens(m.device, per_token)), m.tp)
            self.arena = KVArena(c.num_hidden_layers, tokens, kv_heads, head_dim,
                                 dtype, m.device)
            log.info("sampler KV cache: %d tokens (%.1f GiB)", tokens,
                     tokens * per_token / 2**30)
        return self.arena

    # --- the loop --------------------------------------------------------------------------
    def step(self, max_steps: int) -> list[tuple[Any, Any]]:
        """Admit what fits, run up to `max_steps` decode steps; (key, SampleOutput | error)
        for every request that finished."""
        done: list[Request] = []
        with torch.inference_mode():
            if self.waiting:
                self._flush(done)  # joining changes the rows: the host must be current
                joined = self._join()
                if joined:
                    self._prefill(joined, done)
                    self.steady = None
            for _ in range(max_steps):
                if not self.running:
                    break
                self._decode_step(done)
            self._flush(done)
        out = []
        for r in done:
            seqs = [SampledSeq(s.tokens, s.logprobs, s.stop_reason or "length",
                               sampled_topk(self.model, r.spec, s.tokens)
                               if r.spec.topk_sample_logprobs else None) for s in r.seqs]
            out.append((r.key, SampleOutput(seqs, r.prompt_out or PromptOut())))
        return out

    def _join(self) -> list[Request]:
        arena, joined = self._arena(), []
        while self.waiting:
            r = self.waiting[0]
            if len(self.running) + sum(len(j.seqs) for j in joined) + r.spec.num_samples > (
                    self.max_num_sequences):
                break
            starts = []
            for _ in range(r.spec.num_samples):
                start = arena.alloc(r.region)
                if start is None:
                    break
                starts.append(start)
            if len(starts) < r.spec.num_samples:
                for s in starts:
                    arena.release(s, r.region)
                break  # waits for running sequences to free their regions
            self.waiting.popleft()
            r.seqs = [Seq(r, j, s) for j, s in enumerate(starts, start=r.spec.first_index)]
            r.open = len(r.seqs)
            joined.append(r)
        if joined:
            needed = {r.key_of_adapter: r.adapter
                      for r in joined + [s.req for s in self.running] if r.adapter is not None}
            changed = set(needed) != set(self.lora.adapters)
            if changed and self.lora.rebuild(list(needed.values())) and self.graphs:
                self.graphs.graphs.clear()  # they captured the old buffers
        return joined

    def _prefill(self, joined: list[Request], done: list[Request]) -> None:
        model, arena, device = self.model, self._arena(), self.model.device
        lengths = [len(r.spec.prompt) for r in joined]
        tokens = torch.tensor([t for r in joined for t in r.spec.prompt], device=device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        write = torch.cat([torch.arange(r.seqs[0].start, r.seqs[0].start + n)
                           for r, n in zip(joined, lengths, strict=True)]).to(device)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        varlen = fastpath.VarlenAttention(cu, device)

        def attend(i, q, k, v, scale):
            arena.k[i].index_copy_(0, write, k)
            arena.v[i].index_copy_(0, write, v)
            return varlen(q, k, v.contiguous(), scale)

        keys = [r.key_of_adapter for r in joined]
        mask, uniform = self.lora.row_mask(keys, lengths), self.lora.uniform(keys)
        full = [r.spec.scores_prompt for r in joined]
        # logits for every prompt position of requests that want prompt logprobs, else the last
        pick = torch.tensor([p for r, s, e, f in zip(joined, cu[:-1], cu[1:], full, strict=True)
                             for p in (range(s, e) if f else [e - 1])], device=device)
        logits = forward(model, self.lora, tokens, positions, mask, attend, pick, uniform)
        # The prompt's KV goes to every other sample's region.
        src, dst = [], []
        for r, n in zip(joined, lengths, strict=True):
            for s in r.seqs[1:]:
                src.append(torch.arange(r.seqs[0].start, r.seqs[0].start + n))
                dst.append(torch.arange(s.start, s.start + n))
        if src:
            src_t, dst_t = torch.cat(src).to(device), torch.cat(dst).to(device)
            for i in range(len(arena.k)):
                arena.k[i].index_copy_(0, dst_t, arena.k[i][src_t])
                arena.v[i].index_copy_(0, dst_t, arena.v[i][src_t])
        last, k = [], 0
        for r, n, f in zip(joined, lengths, full, strict=True):
            rows = n if f else 1
            if f:
                r.prompt_out = prompt_outputs(r.spec, logits[k : k + rows], r.seed)
            last.append(logits[k + rows - 1])
            for s in r.seqs:
                s.length = n
            k += rows
        first = torch.stack(last)  # [R, V]: every sample of a request starts from it
        seqs = [s for r in joined for s in r.seqs]
        fan = torch.tensor([i for i, r in enumerate(joined) for _ in r.seqs], device=device)
        self._choose_and_advance(first[fan], seqs, done)
        self.running.extend(s for s in seqs if s.stop_reason is None)

    def _decode_step(self, done: list[Request]) -> None:
        """Launch one step from the device-side inputs, feed its tokens back on the device,
        then read the previous step's tokens (ready by now) while this one runs."""
        st = self.steady
        if st is None or st.stale:
            self._flush(done)
            # rows grouped by adapter (a stable sort): a block of rows in the fused kernels
            # then spans few adapters' columns
            self.running.sort(key=lambda s: self.lora.columns(s.req.key_of_adapter))
            st = self.steady = Steady.build(self)
        logits = self.graphs.run(st.x) if self.graphs is not None else self.decode_forward(st.x)
        for s in self.running:
            s.length += 1  # the fed token's K/V is in the cache now
        tokens, logprobs = next_tokens(logits, st.sampling, self.fused)
        st.advance(tokens)
        previous, st.pending = st.pending, to_host(tokens, logprobs)
        if previous is not None:
            self._collect(st, previous, done)

    def _flush(self, done: list[Request]) -> None:
        st = self.steady
        if st is not None and st.pending is not None:
            pending, st.pending = st.pending, None
            self._collect(st, pending, done)

    def _collect(self, st: Steady, pending: tuple, done: list[Request]) -> None:
        """Record a step's tokens; a sequence that stops leaves its row idle (it writes to
        the scratch token) until the rows are rebuilt."""
        tokens, logprobs, ready = pending
        if ready is not None:
            ready.synchronize()
        ended = []
        for row, (s, t, lp) in enumerate(zip(st.rows, tokens.tolist(), logprobs.tolist(),
                                             strict=True)):
            if s is None:
                continue
            self._record(s, t, lp, done)
            if s.stop_reason is not None:
                st.rows[row] = None
                ended.append(row)
        if ended:
            st.idle(ended, self.arena.scratch)  # type: ignore[union-attr]
            self.running = [s for s in st.rows if s is not None]

    def decode_forward(self, x: DecodeInputs) -> torch.Tensor:
        """One decode step, its inputs -> logits [N, V]: the fused step or the unfused one."""
        arena = self._arena()
        if self.fused:
            rows = len(x.tokens)
            return decode_fused(self.model, self.lora, x, arena, self.flash(rows),
                                self.lora_path_for(rows, x.mask is not None))
        return decode_unfused(self.model, self.lora, x, arena)

    def lora_path_for(self, rows: int, several: bool) -> str:
        """Where a fused step of `rows` rows adds LoRA B; `several`: its rows use more than
        one adapter (or some none). See LORA_GEMV_ROWS."""
        if self.lora_path is not None:
            return self.lora_path
        if rows <= LORA_GEMV_ROWS or (several and rows <= MIXED_GEMV_ROWS):
            return "gemv"
        return "dots" if several else "addmm"

    def flash(self, rows: int) -> bool:
        """Whether the fused step of this many rows takes flash attention."""
        return (self.model.device.type == "cuda" and self.flash_rows is not None
                and rows >= self.flash_rows)

    def _choose_and_advance(self, logits: torch.Tensor, seqs: list[Seq],
                            done: list[Request]) -> None:
        tokens, logprobs = next_tokens(logits, sampling_of(self.model, seqs), self.fused)
        for s, t, lp in zip(seqs, tokens.tolist(), logprobs.tolist(), strict=True):
            self._record(s, t, lp, done)

    def _record(self, s: Seq, token: int, logprob: float, done: list[Request]) -> None:
        s.tokens.append(token)
        s.logprobs.append(logprob)
        s.stop_reason = self._stop_reason(s)
        if s.stop_reason is not None:
            self._finish(s, done)

    def _stop_reason(self, s: Seq) -> str | None:
        spec, token = s.req.spec, s.tokens[-1]
        if token in spec.stop_token_ids or (spec.stop_at_eos and token in self.eos):
            return "stop"
        if spec.stop_strings:  # decoded whole: strings that span tokens are caught
            text = self.decode(s.tokens)
            if any(x in text for x in spec.stop_strings):
                return "stop"
        return "length" if len(s.tokens) >= spec.max_tokens else None

    def _finish(self, s: Seq, done: list[Request]) -> None:
        self._arena().release(s.start, s.req.region)
        s.req.open -= 1
        if s.req.open == 0:
            done.append(s.req)

    def fail_all(self, error: Exception) -> list[tuple[Any, Exception]]:
        """Drop every request (after an unexpected error) and free the cache."""
        requests = list(self.waiting) + list(dict.fromkeys(s.req for s in self.running))
        for s in self.running:
            self._arena().release(s.start, s.req.region)
        self.waiting.clear()
        self.running = []
        self.steady = None
        return [(r.key, error) for r in requests]


def sample(
    model: LoraModel,
    specs: list[SampleSpec],
    decode: Callable[[list[int]], str],
    eos_token_ids: list[int],
) -> list[SampleOutput | Exception]:
    """One output per spec, in order; a spec that fails gets its Exception in its place."""
    results: list[SampleOutput | Exception | None] = [None] * len(specs)
    valid: list[int] = []
    for i, spec in enumerate(specs):
        try:
            validate(spec, model)
            valid.append(i)
        except UserError as e:
            results[i] = e
    if valid:
        kv = sum(specs[i].num_samples * (len(specs[i].prompt) + specs[i].max_tokens)
                 for i in valid)
        batch = RunningBatch(model, decode, eos_token_ids, kv_tokens=kv, cuda_graphs=False,
                             max_num_sequences=sum(specs[i].num_samples for i in valid))
        try:
            for i in valid:
                batch.admit(i, specs[i], adapter_of(model, specs[i].slot))
            while batch.busy:
                for key, out in batch.step(64):
                    results[key] = out
        except Exception as e:  # a batch-wide failure becomes every open request's error
            for i in valid:
                if results[i] is None:
                    results[i] = e
    return results  # type: ignore[return-value]
