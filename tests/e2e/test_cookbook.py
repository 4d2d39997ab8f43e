"""tinker-cookbook's loops against a live tinkerq: RL that learns, SFT whose loss falls, and the
cookbook's own `recipes.sl_loop` / `recipes.rl_loop` run under a Hugging Face model name.

One stack (SQLite + embedded Redis) serves the built-in tiny random-weight Qwen3, also under
the alias `Qwen/Qwen3-8B`, the way a hub user would serve a local copy of that model. The RL
and SFT runs are the examples' own functions (`examples/rl_cookbook.py`,
`examples/sl_cookbook.py`). Sampling in the cookbook's RL loop is not seeded, so the
thresholds below leave room for the run-to-run spread while still failing a loop that does
not learn (learning rate 0, wrong advantage sign: rewards stay at 0.5 or fall to 0).
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from statistics import mean

import pytest
import tinker

from examples import rl_cookbook, sl_cookbook, use_served_tokenizer
from tests.e2e.stack import API_KEY, Stack

pytestmark = pytest.mark.e2e
HUB_NAME = "Qwen/Qwen3-8B"  # a model the cookbook knows (renderer "qwen3"), served as an alias


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # random_seed: the RL runs below seed neither their adapters nor their samples. At their
    # learning rate one run in about 18 seen collapsed onto an odd token (reward 0 from then
    # on: no signal left to climb back), failing the suite. Seeded, every run starts from the
    # same adapter and draws the same sampling seeds; only the order in which a group's 32
    # concurrent sample calls arrive still varies (the same samples, in another order), which
    # can part two runs in float rounding a few steps in
    s = Stack.start(tmp_path_factory.mktemp("stack-cookbook"), "sqlite", model_aliases=HUB_NAME,
                    random_seed=20261127)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)  # the cookbook's ServiceClient reads it


# One prompt x 32 samples x 4 tokens per step: the mean reward of the untrained policy (about
# uniform over 151,936 ids) is 0.5 with a standard deviation of 0.044 over its 128 tokens.
# Learning shows as a jump to about 1.0. In 7 trial runs of 24 steps with these settings it
# came at steps 5 to 8 and held to the end; earlier trials saw it from step 4 to 10. What the
# tests ask is that the jump comes and holds for three steps. They do not ask that it lasts
# to the last step: once every sample earns 1.0 the gradient is zero, but Adam's momentum
# keeps moving the adapter at this learning rate, and a run can drift off the even ids
# again (seen in trial runs that shared their ticks with others; a CI run failed the old
# end-of-run check at 0.49 0.48 0.34, the middle of its curve unprinted). That is the
# optimizer's doing, not the server's, and a loss that does not learn never gets there.
RL_SMALL = ["--batch-size", "1", "--num-prompts", "1", "--group-size", "32", "--max-tokens",
            "4", "--learning-rate", "7e-2"]
RL_STEPS = 24


def run_rl(stack: Stack, log_dir: Path, loss_fn: str) -> list[float]:
    args = rl_cookbook.parser().parse_args([
        "--base-url", stack.url, "--log-dir", str(log_dir), "--loss-fn", loss_fn,
        "--steps", str(RL_STEPS), *RL_SMALL,
    ])
    curve = rl_cookbook.run(args)
    assert [step for step, _ in curve] == list(range(RL_STEPS)), stack.logs()
    rewards = [reward for _, reward in curve]
    assert 0.3 <= rewards[0] <= 0.7, curve_text(rewards)  # step 0 samples the untrained adapter
    # The sampler's logprobs are the trainer's on the same weights: the loop's importance
    # ratio starts at 1 (a sampler on stale weights or tempered logprobs would break this).
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [r["optim/kl_sample_train_v1"] for r in rows if "optim/kl_sample_train_v1" in r]
    assert len(kl) == RL_STEPS and max(map(abs, kl)) < 1e-3, kl
    return rewards


def run_learning(stack: Stack, log_dir: Path, loss_fn: str) -> list[float]:
    """run_rl, and once more if that run collapsed onto odd tokens (reward 0 held for three
    steps: no signal is left to climb back). About one run in 18 does at this learning rate
    (see the stack fixture; the full suite of 2026-12-06 saw cispo do it once, and pass when
    run again); the retry draws other samples from the server's seeded stream. A loss that
    pushes the wrong way collapses on both runs and fails."""
    rewards = run_rl(stack, log_dir, loss_fn)
    collapsed = learned_at([1.0 - r for r in rewards], level=0.98) is not None
    if learned_at(rewards) is None and collapsed:
        rewards = run_rl(stack, log_dir.with_name(f"{log_dir.name}-again"), loss_fn)
    return rewards


def curve_text(rewards: list[float]) -> str:
    """The whole reward curve as the failure message (pytest would cut a list short)."""
    return "rewards by step: " + " ".join(f"{r:.2f}" for r in rewards)


def learned_at(rewards: list[float], level: float = 0.9, hold: int = 3) -> int | None:
    """The first step from which `hold` consecutive rewards are all at least `level`."""
    for i in range(len(rewards) - hold + 1):
        if min(rewards[i:i + hold]) >= level:
            return i
    return None


def test_learned_at_needs_the_level_held():
    assert learned_at([0.5, 0.95, 0.5, 0.9, 1.0, 1.0, 0.2]) == 3
    assert learned_at([0.5, 0.95, 0.89, 0.95, 1.0]) is None
    assert learned_at([0.5, 0.52, 0.48] * 8) is None  # an untrained policy's curve


def test_rl_importance_sampling_learns_even_tokens(stack, tmp_path):
    rewards = run_learning(stack, tmp_path / "rl", "importance_sampling")
    assert learned_at(rewards) is not None, curve_text(rewards)
    csv_rows = (tmp_path / "rl" / "reward.csv").read_text().splitlines()
    assert csv_rows[0] == "step,mean_reward" and len(csv_rows) == RL_STEPS + 1
    assert (tmp_path / "rl" / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_rl_clipped_losses_learn_too(stack, tmp_path, loss_fn):
    rewards = run_learning(stack, tmp_path / loss_fn, loss_fn)
    assert learned_at(rewards) is not None, curve_text(rewards)


def test_sl_cookbook_loop_lowers_the_loss(stack, tmp_path):
    args = sl_cookbook.parser().parse_args([
        "--base-url", stack.url, "--log-dir", str(tmp_path / "sl"), "--num-examples", "16",
        "--batch-size", "4", "--epochs", "3", "--learning-rate", "2e-2",
    ])
    nll = [value for _, value in sl_cookbook.run(args)]
    assert len(nll) == 12 and all(math.isfinite(x) for x in nll), nll
    assert nll[0] > 10  # about ln(151936) = 11.9 for the random model
    assert mean(nll[-3:]) <= 0.5 * nll[0], nll


# --- the cookbook's recipes, unchanged, under a hub model name -----------------------------

def fake_hub_dataset(rows: list[dict]):
    """What `datasets.load_dataset` returns, built from `rows` instead of the hub."""
    import datasets

    return lambda *args, **kwargs: datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})


def test_recipe_sl_loop_under_a_hub_name(stack, tmp_path, monkeypatch):
    import datasets
    from tinker_cookbook.recipes import sl_loop

    use_served_tokenizer(stack.url, HUB_NAME)
    chats = [{"messages": [{"role": "user", "content": f"Count on from {i}."},
                           {"role": "assistant", "content": f"{i} {i + 1} {i + 2}"}]}
             for i in range(12)]
    monkeypatch.setattr(datasets, "load_dataset", fake_hub_dataset(chats))  # no_robots
    sl_loop.main(sl_loop.Config(base_url=stack.url, log_path=str(tmp_path), model_name=HUB_NAME,
                                batch_size=4, learning_rate=1e-2, save_every=0))

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    nll = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]
    assert len(nll) == 3 and nll[-1] < nll[0], nll
    assert rows[0]["learning_rate:mean"] == pytest.approx(1e-2)  # optim_step's own metric
    runs = tinker.RestClient(base_url=stack.url, api_key=API_KEY)
    caps = runs.get_server_capabilities().result()
    assert HUB_NAME in [m.model_name for m in caps.supported_models]
    final = json.loads((tmp_path / "checkpoints.jsonl").read_text().splitlines()[-1])
    run_id = final["state_path"].removeprefix("tinker://").split("/")[0]
    assert runs.get_training_run(run_id).result().base_model == HUB_NAME


def test_recipe_rl_loop_under_a_hub_name(stack, tmp_path, monkeypatch):
    """rl_loop with its default loss, stable_reinforce: it samples with
    record_stability_info=True and names each sampled sequence in its datums' provenance,
    which the server checks against its record. Its GSM8K grader needs pylatexenc, which
    this environment lacks, and the random model never writes a \\boxed answer, so the import
    is stubbed and the grader is replaced by one the random model can satisfy; every request
    is the recipe's own."""
    import datasets

    monkeypatch.setitem(sys.modules, "pylatexenc", types.ModuleType("pylatexenc"))
    monkeypatch.setitem(sys.modules, "pylatexenc.latex2text",
                        types.ModuleType("pylatexenc.latex2text"))
    from tinker_cookbook.recipes import rl_loop

    use_served_tokenizer(stack.url, HUB_NAME)
    problems = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)]
    monkeypatch.setattr(datasets, "load_dataset", fake_hub_dataset(problems))  # gsm8k
    monkeypatch.setattr(rl_loop, "get_reward", lambda response, answer: len(response) % 2)
    config = rl_loop.Config(base_url=stack.url, log_path=str(tmp_path), model_name=HUB_NAME,
                            batch_size=2, group_size=4, max_tokens=8, save_every=0)
    assert config.loss_fn == "stable_reinforce"  # left at the recipe's default
    rl_loop.main(config)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/total" in r]
    assert len(steps) == 2 and all(0 <= r["reward/total"] <= 1 for r in steps), rows
    assert any("grad_norm:mean" in r for r in steps), rows  # at least one step trained
