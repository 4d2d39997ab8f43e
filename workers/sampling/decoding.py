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
the rest wait in arrival order. A prompt is prefilled once while requests of it run: the
samples of every request with the same prompt and adapter share its KV cache blocks.
Sequences take cache blocks as they grow; when none are left the youngest request goes back
to the queue (preempted) and starts again later.

The running batch's parts, each in its module (whose docstring tells the design):

  sequences   a request and its sequences, each with a block table into the KV cache
  kv_cache    the KV cache: paged, blocks shared by reference count
  admission   which requests join, the blocks they take, the prompts they share; growth
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

from config import SettingsError
from protocol.jobs import UserError
from workers.model import LoraModel
from workers.sampling import admission, decode_kernels
from workers.sampling.admission import Prompts, SharedPrompt
from workers.sampling.choose import next_tokens, sampling_of
from workers.sampling.forward import decode_fused, decode_unfused, forward, lora_path
from workers.sampling.graphs import DecodeInputs, Graphs, Steady, to_host
from workers.sampling.kv_cache import BLOCK, KVCache, kv_dtype_problem, most_blocks, slots
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


class RunningBatch:
    def __init__(self, model: LoraModel, decode: Callable[[list[int]], str],
                 eos_token_ids: list[int], max_num_sequences: int = 256, kv_tokens: int = 0,
                 cuda_graphs: bool = True, fused: bool | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.model = model
        # decode steps through decode_kernels and their sampling (without top-k / top-p)
        # through sample_kernels (default: on CUDA, when Triton is there)
        self.fused = (model.device.type == "cuda" and decode_kernels.available(model.device)
                      and fastpath.supported(model.hf)) if fused is None else fused
        if self.fused and (why := decode_kernels.unsupported(model.config)):
            log.warning("the sampler takes the unfused decode step: %s", why)
            self.fused = False
        # where the fused step adds LoRA B: "gemv", "dots" or "addmm"; None: by the step's
        # rows and adapters (lora_path_for)
        self.lora_path: str | None = None
        self.decode = decode
        self.eos = set(eos_token_ids)
        self.max_num_sequences = max_num_sequences
        self._kv_tokens = kv_tokens
        if why := kv_dtype_problem(kv_dtype, model.device):
            raise SettingsError(why)  # at the worker's start, not at its first sample
        self._kv_dtype = kv_dtype  # None: the model's
        self.cache: KVCache | None = None
        self.prompts: Prompts | None = None  # the running requests' prompts, with the cache
        self._arrivals = 0  # requests admitted so far: each one's `order`
        self.preemptions = 0  # requests sent back to the queue for want of cache blocks
        self.prompt_tokens = {"prefilled": 0, "shared": 0}  # joined calls' prompts, so far
        fuse_base_weights(model)
        self.lora = LoraTable(model)
        self.waiting: deque[Request] = deque()
        self.running: list[Seq] = []
        self.joining: list[Request] = []  # taken from the queue, being prefilled
        self.steady: Steady | None = None  # the running rows' inputs, kept on the device
        self.rng = random.Random()  # seeds of unseeded requests (the same on every TP rank)
        self.graphs = Graphs(self) if cuda_graphs and model.device.type == "cuda" else None

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # --- admission -------------------------------------------------------------------------
    def admit(self, key: Any, spec: Any, adapter: Adapter | None) -> None:
        """Queue a validated request (sampler.SampleSpec) with its adapter's weights."""
        cache = self._cache()
        self._arrivals += 1
        request = Request(key, spec, adapter,
                          self.rng.getrandbits(62) if spec.seed is None else spec.seed,
                          self._arrivals, None if adapter is None else adapter_key(adapter))
        if spec.num_samples > self.max_num_sequences:
            raise UserError(f"num_samples={spec.num_samples} exceeds the sampler's "
                            f"max_num_sequences={self.max_num_sequences}")
        most = most_blocks(len(spec.prompt), spec.num_samples, spec.max_tokens)
        if most > cache.blocks:  # alone in the cache, it must be able to finish
            raise UserError(
                f"prompt + num_samples × max_tokens = {len(spec.prompt)} + "
                f"{spec.num_samples} × {spec.max_tokens} tokens needs {most * BLOCK} tokens "
                f"of KV cache (in blocks of {BLOCK}); the sampler's holds {cache.capacity}")
        self.waiting.append(request)

    def _cache(self) -> KVCache:
        if self.cache is None:
            self.cache = KVCache.for_model(self.model, self._kv_tokens, self.max_num_sequences,
                                           self._kv_dtype)
            self.prompts = Prompts(self.cache)
        return self.cache

    def _prompts(self) -> Prompts:
        self._cache()
        assert self.prompts is not None
        return self.prompts

    def _use_adapters(self, joined: list[Request]) -> None:
        """Lay the adapters of the joined and the running requests side by side."""
        needed = {r.key_of_adapter: r.adapter
                  for r in joined + [s.req for s in self.running] if r.adapter is not None}
        changed = set(needed) != set(self.lora.adapters)
        if changed and self.lora.rebuild(list(needed.values())) and self.graphs:
            self.graphs.graphs.clear()  # they captured the old buffers

    # --- the loop --------------------------------------------------------------------------
    def step(self, max_steps: int) -> list[tuple[Any, Any]]:
        """Admit what fits, run up to `max_steps` decode steps; (key, SampleOutput | error)
        for every request that finished."""
        done: list[Request] = []
        with torch.inference_mode():
            if self.waiting:
                self._flush(done)  # joining changes the rows: the host must be current
                joined, prompts = self._prompts().join(
                    self.waiting, self.running, self.max_num_sequences, max_steps)
                if joined:
                    for r in joined:
                        source = "shared" if r.cache_hits else "prefilled"
                        self.prompt_tokens[source] += len(r.spec.prompt)
                    self.joining = joined  # (neither waiting nor running: fail_all's too)
                    self._use_adapters(joined)
                    self._prefill(prompts, joined, done)
                    self.joining = []
                    self.steady = None
            if self.running:
                self._grow(max_steps, done)
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
            prompt = r.prompt_out or PromptOut()
            prompt.cache_hit_tokens = r.cache_hits
            out.append((r.key, SampleOutput(seqs, prompt)))
        return out

    def _prefill(self, prompts: list[SharedPrompt], joined: list[Request],
                 done: list[Request]) -> None:
        """One packed pass over the new prompts, into their blocks; then each joined
        sequence's copy of its prompt's last block, and its first token."""
        model, cache, device = self.model, self._cache(), self.model.device
        lengths = [len(p.prefix[0]) for p in prompts]
        if prompts:
            tokens = torch.tensor([t for p in prompts for t in p.prefix[0]], device=device)
            positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
            write = torch.tensor([x for p, n in zip(prompts, lengths, strict=True)
                                  for x in slots(p.blocks, 0, n)], device=device)
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            varlen = fastpath.VarlenAttention(cu, device)

            def attend(i, q, k, v, scale):  # (over the keys as decode steps read them)
                k, v = (t.to(q.dtype) for t in cache.write(i, write, k, v))
                return varlen(q, k, v.contiguous(), scale)

            keys = [p.prefix[1] for p in prompts]
            mask, uniform = self.lora.row_mask(keys, lengths), self.lora.uniform(keys)
            # every position's logits for prompts a request wants scored, else the last's
            scored = {r.shared for r in joined if r.spec.scores_prompt}
            full = [p in scored for p in prompts]
            pick = torch.tensor([x for s, e, f in zip(cu[:-1], cu[1:], full, strict=True)
                                 for x in (range(s, e) if f else [e - 1])], device=device)
            logits = forward(model, self.lora, tokens, positions, mask, attend, pick, uniform)
            rows_of, k = {}, 0  # each prompt's logits rows
            for p, n, f in zip(prompts, lengths, full, strict=True):
                rows_of[p] = logits[k : k + (n if f else 1)]
                p.last = rows_of[p][-1].clone()  # (not a view: the rest can go)
                k += len(rows_of[p])
            for r in joined:
                if r.spec.scores_prompt:
                    r.prompt_out = prompt_outputs(r.spec, rows_of[r.shared], r.seed)
        src, dst = [], []  # each sequence's own copy of its prompt's part-filled last block
        for r in joined:
            n = len(r.spec.prompt)
            for s in r.seqs:
                s.length = n
                src += slots(r.shared.blocks, n - n % BLOCK, n)
                dst += slots(s.blocks, n - n % BLOCK, n)
        cache.copy_tokens(src, dst)
        first = torch.stack([r.shared.last for r in joined])  # [R, V]: each sample's start
        seqs = [s for r in joined for s in r.seqs]
        fan = torch.tensor([i for i, r in enumerate(joined) for _ in r.seqs], device=device)
        self._choose_and_advance(first[fan], seqs, done)
        self.running.extend(s for s in seqs if s.stop_reason is None)

    def _grow(self, max_steps: int, done: list[Request]) -> None:
        """Give every running sequence the blocks this tick's steps write to; when none are
        free, read the last step (its ends free blocks), then preempt the youngest request
        (its blocks freed; it runs again from its prompt later, and its seeds give it the
        same tokens)."""
        cache, grown, flushed = self._cache(), [], False
        while not admission.grow(self.running, cache, max_steps, grown):
            if not flushed:
                self._flush(done)
                flushed = True
            else:
                self._preempt(max((s.req for s in self.running), key=lambda r: r.order))
        if self.steady is not None and not self.steady.stale:
            self.steady.extend([(s, first) for s, first in grown if s.req.open])

    def _preempt(self, r: Request) -> None:
        """Take a request out of the batch (the host has read every step: `_grow` flushed)
        and put it back at the queue's front, to start again from its prompt."""
        log.info("sampler KV cache full: request %s (%d sample(s)) goes back to the queue",
                 r.key, len(r.seqs))
        self._cache().release([b for s in r.seqs if s.stop_reason is None for b in s.blocks])
        self._prompts().release(r)
        self.running = [s for s in self.running if s.req is not r]
        r.seqs, r.prompt_out, r.open = [], None, 0
        self.waiting.appendleft(r)  # preempted youngest first: the oldest ends up in front
        self.steady = None
        self.preemptions += 1
        self._prompts().expect.preempted()

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
        the scratch block) until the rows are rebuilt."""
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
            st.idle(ended, self._cache().scratch_block)
            self.running = [s for s in st.rows if s is not None]

    def decode_forward(self, x: DecodeInputs) -> torch.Tensor:
        """One decode step, its inputs -> logits [N, V]: the fused step or the unfused one."""
        cache = self._cache()
        if self.fused:
            return decode_fused(self.model, self.lora, x, cache,
                                self.lora_path_for(len(x.tokens), x.mask is not None))
        return decode_unfused(self.model, self.lora, x, cache)

    def lora_path_for(self, rows: int, several: bool) -> str:
        """Where a fused step of `rows` rows adds LoRA B; `several`: its rows use more than
        one adapter (or some none). See forward.LORA_GEMV_ROWS."""
        return self.lora_path or lora_path(rows, several)

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
        self._cache().release(s.blocks)
        self._prompts().expect.ended(len(s.tokens), s.req.spec.max_tokens)
        s.req.open -= 1
        if s.req.open == 0:
            self._prompts().release(s.req)
            done.append(s.req)

    def fail_all(self, error: Exception) -> list[tuple[Any, Exception]]:
        """Drop every request (after an unexpected error) and free the cache."""
        requests = list(dict.fromkeys([*self.waiting, *self.joining,
                                       *(s.req for s in self.running)]))
        for r in requests:  # a sequence holds its blocks until it stops
            self._cache().release([b for s in r.seqs if s.stop_reason is None
                                   for b in s.blocks])
            self._prompts().release(r)
        self.waiting.clear()
        self.joining, self.running = [], []
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
        kv = BLOCK * sum(most_blocks(len(specs[i].prompt), specs[i].num_samples,
                                     specs[i].max_tokens) for i in valid)
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
