"""A request of the running batch and its sequences, one per sample: each sequence holds a
block table into the KV cache (kv_cache) and collects its tokens and logprobs."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from workers.sampling.lora_table import Adapter


@dataclass(eq=False)  # identity: sequences and requests are dict keys / set members
class Seq:
    req: Request
    index: int  # sample index within the request
    blocks: list[int]  # its KV cache blocks, in order (the prompt's full ones shared)
    length: int = 0  # tokens in the cache
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


@dataclass(eq=False)
class Request:
    key: Any
    spec: Any  # sampler.SampleSpec
    adapter: Adapter | None
    seed: int
    order: int  # arrival: the youngest running request is the first preempted
    key_of_adapter: tuple[int, ...] | None = None  # adapter_key(adapter), computed once
    seqs: list[Seq] = field(default_factory=list)
    prompt_out: Any = None  # sampler.PromptOut, once the prefill ran
    shared: Any = None  # admission.SharedPrompt: its prompt's blocks, while it runs
    cache_hits: int = 0  # prompt tokens it found prefilled by another call
    open: int = 0  # sequences still running

    @property
    def region(self) -> int:
        """The most positions a sequence of it writes: prompt + max_tokens."""
        return len(self.spec.prompt) + self.spec.max_tokens

    @functools.cached_property
    def prefix(self) -> tuple:
        """What makes two requests' prompts one prefill: the tokens and the adapter."""
        return tuple(self.spec.prompt), self.key_of_adapter
