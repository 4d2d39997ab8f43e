"""Batched KV-cache sampling on the tiny random Qwen3: exactness, seeds, stops, isolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protocol.jobs import UserError
from workers.lora import BASE_SLOT
from workers.model import AdapterSpec
from workers.sampling.decoding import sample
from workers.sampling.sampler import SampleOutput, SampleSpec

EOS = [511]  # tiny_model's eos_token_id


def decode(ids: list[int]) -> str:
    """A fake tokenizer: one letter per token."""
    return "".join(chr(97 + i % 26) for i in ids)


def run(model, *specs: SampleSpec, eos: list[int] = EOS) -> list[SampleOutput]:
    outs = sample(model, list(specs), decode, eos)
    for out in outs:
        assert isinstance(out, SampleOutput), out
    return outs  # type: ignore[return-value]


def greedy(prompt: list[int], n: int = 8, slot: int = BASE_SLOT, **kw) -> SampleSpec:
    kw.setdefault("stop_at_eos", False)
    return SampleSpec(prompt, 1, n, slot, temperature=0.0, **kw)


def seeded(prompt: list[int], seed: int, n: int = 8, **kw) -> SampleSpec:
    return SampleSpec(prompt, kw.pop("num_samples", 2), n, BASE_SLOT, seed=seed, **kw)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int, slot: int = BASE_SLOT) -> list[int]:
    """Argmax step by step, recomputing the whole sequence without a cache."""
    ids = list(prompt)
    for _ in range(n):
        x = torch.tensor([ids])
        logits, _ = model.forward_logits(x, torch.ones_like(x), [slot])
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


P1, P2, P3 = [5, 17, 300, 42, 9], [100, 200], [7, 8, 9, 10, 11, 12, 13, 14, 15]


def test_greedy_batch_matches_uncached_reference(tiny_model):
    outs = run(tiny_model, greedy(P1, 10), greedy(P2, 6), greedy(P3, 3))
    for out, (p, n) in zip(outs, [(P1, 10), (P2, 6), (P3, 3)], strict=True):
        (seq,) = out.sequences
        assert seq.tokens == reference_greedy(tiny_model, p, n)
        assert seq.stop_reason == "length"


def test_sampled_logprobs_are_raw_model_logprobs(tiny_model):
    spec = seeded(P1, 3, n=6, temperature=0.7, top_k=50, top_p=0.9)
    (out,) = run(tiny_model, spec)
    for seq in out.sequences:
        full = P1 + seq.tokens
        (want,) = tiny_model.target_logprobs([full[:-1]], [full[1:]], [BASE_SLOT])
        got = torch.tensor(seq.logprobs)
        torch.testing.assert_close(got, want[-len(seq.tokens) :], atol=1e-4, rtol=0)


def test_prompt_logprobs_and_topk(tiny_model):
    spec = SampleSpec(P1, 1, 1, BASE_SLOT, prompt_logprobs=True, topk_prompt_logprobs=3)
    out, _ = run(tiny_model, spec, greedy(P3, 2))
    (want,) = tiny_model.target_logprobs([P1[:-1]], [P1[1:]], [BASE_SLOT])
    assert len(out.prompt.logprobs) == len(P1) and math.isnan(out.prompt.logprobs[0])
    torch.testing.assert_close(torch.tensor(out.prompt.logprobs[1:]), want, atol=1e-4, rtol=0)
    ids, lps = out.prompt.topk
    assert ids.shape == lps.shape == (len(P1), 3) and str(ids.dtype) == "int32"
    assert (ids[0] == 0).all() and (lps[0] == -99999.0).all()
    assert (lps[1:, 0] >= lps[1:, 1]).all() and (lps[1:, 0] >= want.numpy() - 1e-4).all()
    assert len(out.sequences[0].tokens) == 1


def test_prompt_scoring_extras(tiny_model):
    """prompt_logprobs_last_n masks all but the last n; target ids get their log-probs
    (0.0 where -1); alternatives are draws whose log-probs are the raw model's, seeded, and
    the argmax at temperature 0."""
    rows = len(P1) - 1
    logp = torch.log_softmax(tiny_model_logits(tiny_model, P1)[:-1].double(), -1)
    ids = [[-1, -1] for _ in range(rows)]
    ids[1], ids[rows - 1] = [7, -1], [3, 9]
    spec = SampleSpec(P1, 1, 1, BASE_SLOT, prompt_logprobs=True, topk_prompt_logprobs=2,
                      prompt_logprobs_last_n=2, target_prompt={"ids": ids, "layout": None},
                      prompt_alt_tokens_k=4, temperature=0.8, seed=5)
    (out,) = run(tiny_model, spec)
    assert all(math.isnan(x) for x in out.prompt.logprobs[:-2])
    torch.testing.assert_close(torch.tensor(out.prompt.logprobs[-2:]),
                               logp[-2:].gather(-1, torch.tensor(P1[-2:])[:, None])[:, 0].float(),
                               atol=1e-4, rtol=0)
    assert (out.prompt.topk[1][:-2] == -99999.0).all() and (out.prompt.topk[1][-2:] < 0).all()
    values, layout = out.prompt.target
    assert values.shape == (rows, 2) and layout is None
    assert values[0].tolist() == [0.0, 0.0] and values[1, 1] == 0.0
    for (i, j), token in {(1, 0): 7, (rows - 1, 0): 3, (rows - 1, 1): 9}.items():
        assert values[i, j] == pytest.approx(logp[i, token].item(), abs=1e-4)
    tokens, lps = out.prompt.alt
    assert tokens.shape == lps.shape == (rows, 4)
    np.testing.assert_allclose(lps, logp.gather(-1, torch.tensor(tokens)).numpy(), atol=1e-4)
    (again,) = run(tiny_model, spec)
    assert (again.prompt.alt[0] == tokens).all()  # the request's seed fixes the draws
    greedy_spec = SampleSpec(P1, 1, 1, BASE_SLOT, prompt_alt_tokens_k=3, temperature=0.0)
    (cold,) = run(tiny_model, greedy_spec)
    assert (cold.prompt.alt[0] == logp.argmax(-1, keepdim=True).numpy()).all()


def test_topk_sample_logprobs_are_the_model_s_top_k_at_each_sampled_position(tiny_model):
    spec = seeded(P1, 3, n=5, temperature=0.9, topk_sample_logprobs=4, num_samples=2)
    (out,) = run(tiny_model, spec)
    for seq in out.sequences:
        ids, lps = seq.topk
        assert ids.shape == lps.shape == (len(seq.tokens), 4) and str(ids.dtype) == "int32"
        logp = torch.log_softmax(tiny_model_logits(tiny_model, P1 + seq.tokens)[
            len(P1) - 1:-1].double(), -1)
        want, want_ids = logp.topk(4, -1)
        assert (ids == want_ids.numpy()).all()
        np.testing.assert_allclose(lps, want.numpy(), atol=1e-4)
        chosen = logp.gather(-1, torch.tensor(seq.tokens)[:, None])[:, 0]
        np.testing.assert_allclose(seq.logprobs, chosen.numpy(), atol=1e-4)
    (plain,) = run(tiny_model, seeded(P1, 3, n=5, temperature=0.9, num_samples=2))
    assert [s.tokens for s in plain.sequences] == [s.tokens for s in out.sequences]
    assert all(s.topk is None for s in plain.sequences)


def tiny_model_logits(model, prompt: list[int]) -> torch.Tensor:
    """[L, V] logits of the base model over the prompt (the plain HF forward)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits, _ = model.forward_logits(ids, torch.ones_like(ids), [BASE_SLOT])
    return logits[0]


def test_seed_reproducible_and_batch_invariant(tiny_model):
    (alone,) = run(tiny_model, seeded(P2, 11))
    (again,) = run(tiny_model, seeded(P2, 11))
    mixed = run(
        tiny_model,
        seeded(P3, 5, n=4, temperature=0.5, num_samples=3),
        greedy(P1, 12),
        seeded(P2, 11),
        seeded([1], 99, n=3, top_k=5),
    )
    tokens = [s.tokens for s in alone.sequences]
    assert tokens == [s.tokens for s in again.sequences]
    assert tokens == [s.tokens for s in mixed[2].sequences]
    assert tokens[0] != tokens[1]  # samples of one request differ
    (other,) = run(tiny_model, seeded(P2, 12))
    assert tokens != [s.tokens for s in other.sequences]


def test_top_k_1_equals_greedy(tiny_model):
    (g, k1) = run(tiny_model, greedy(P1, 8), seeded(P1, 4, n=8, top_k=1, stop_at_eos=False))
    assert all(s.tokens == g.sequences[0].tokens for s in k1.sequences)


def test_stop_token_and_eos(tiny_model):
    (g,) = run(tiny_model, greedy(P1, 10))
    tokens = g.sequences[0].tokens
    stop = tokens[3]
    cut = tokens[: tokens.index(stop) + 1]
    by_id, by_eos, past_eos = run(
        tiny_model,
        greedy(P1, 10, stop_token_ids=[stop]),
        greedy(P1, 10, stop_at_eos=True),
        greedy(P1, 10, stop_at_eos=False),
        eos=[stop],
    )
    for out in (by_id, by_eos):
        assert (out.sequences[0].tokens, out.sequences[0].stop_reason) == (cut, "stop")
    assert (past_eos.sequences[0].tokens, past_eos.sequences[0].stop_reason) == (tokens, "length")


def test_stop_string_across_tokens(tiny_model):
    (g,) = run(tiny_model, greedy(P3, 10))
    tokens = g.sequences[0].tokens
    target = decode(tokens)[4:6]  # one letter per token: spans tokens 4 and 5
    n = next(i for i in range(1, 11) if target in decode(tokens[:i]))
    (out,) = run(tiny_model, greedy(P3, 10, stop_strings=["never", target]))
    assert out.sequences[0].tokens == tokens[:n]
    assert out.sequences[0].stop_reason == "stop"


@pytest.mark.parametrize(
    "bad",
    [
        SampleSpec(P1, 1, 4, BASE_SLOT, stop_token_ids=[512]),
        SampleSpec(P1, 1, 0, BASE_SLOT),
        SampleSpec([512], 1, 4, BASE_SLOT),
        SampleSpec(P1, 1, 4, slot=3),
    ],
)
def test_bad_request_is_isolated(tiny_model, bad):
    err, ok = sample(tiny_model, [bad, greedy(P2, 4)], decode, EOS)
    assert isinstance(err, UserError)
    assert isinstance(ok, SampleOutput)
    assert ok.sequences[0].tokens == reference_greedy(tiny_model, P2, 4)


def test_adapter_rows_alone_and_mixed(tiny_model):
    tiny_model.add_adapter(0, AdapterSpec(rank=4, alpha=8), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in tiny_model.adapter_weights(0).values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.2)
    (alone,) = run(tiny_model, greedy(P1, 8, slot=0))
    base, mixed = run(tiny_model, greedy(P3, 8), greedy(P1, 8, slot=0))
    tokens = alone.sequences[0].tokens
    assert tokens == mixed.sequences[0].tokens == reference_greedy(tiny_model, P1, 8, slot=0)
    assert tokens != reference_greedy(tiny_model, P1, 8)  # the adapter changes the output
    assert base.sequences[0].tokens == reference_greedy(tiny_model, P3, 8)
