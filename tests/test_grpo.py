"""GRPO (the train_grpo stage, engine/rl/): the objective against a direct computation, the
reference pass, a tiny run through the CLI, bit-identical resume after SIGKILL, config errors,
and the logged rewards against the Gymnasium environment's for the same texts.

Tiny runs use recipe grpo_smollm2 on the tiny model with a reward its random answers can earn in
part (the format checks plus at most 28 characters: the share of checks passed), so rewards
differ within a group and the advantages and the adapter's update are not zero.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose, run_cli, run_engine

from engine.rl.objective import group_advantages, sequence_terms

TINY_GRPO = [
    "recipe=grpo_smollm2",
    *TINY,
    "reward=checks",
    "reward.checks={max_chars:28}",
    "device=cpu",
    "precision=fp32",
    "grpo.group_size=3",
    "grpo.prompts_per_step=2",
    "grpo.max_new_tokens=8",
    "train.micro_batch_size=4",
    "train.warmup_steps=0",
    "train.lr=1e-2",
]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- the objective


def test_group_advantages_equal_direct_computation():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    got = group_advantages(rewards, 4, scale=True)
    want = []
    for g in range(3):
        r = rewards[4 * g : 4 * g + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # unbiased, as torch.std
        want += [(x - mean) / (std + 1e-4) for x in r]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert got[8:].abs().max() == 0  # a group whose rewards agree teaches nothing (and is not NaN)
    centred = group_advantages(rewards, 4, scale=False)
    assert torch.allclose(centred[:4], torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_clipped_loss_and_kl_equal_direct_computation():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g) * 3
    old = logp + (torch.rand(3, 5, generator=g) - 0.5)  # ratios on both sides of the clip range
    ref = logp + (torch.rand(3, 5, generator=g) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.2])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    eps, beta = 0.2, 0.1
    terms = sequence_terms(logp, old, ref, adv, mask, clip_eps=eps, beta=beta)

    for i in range(3):
        losses, kls, clipped = [], [], 0
        for t in range(5):
            if not mask[i, t]:
                continue
            ratio = math.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = float(ref[i, t] - logp[i, t])
            kl = math.exp(d) - d - 1
            losses.append(-surrogate + beta * kl)
            kls.append(kl)
            clipped += (ratio > 1 + eps and a > 0) or (ratio < 1 - eps and a < 0)
        assert float(terms.loss[i]) == pytest.approx(sum(losses) / len(losses), abs=1e-6)
        assert float(terms.kl[i]) == pytest.approx(sum(kls) / len(kls), abs=1e-6)
        assert float(terms.clipped[i]) == clipped
    assert float(terms.clipped.sum()) > 0, "the batch should exercise the clip"

    # iterations=1: the ratio is 1, the gradient is the advantage-weighted log-likelihood's.
    x = logp.clone().requires_grad_(True)
    one = sequence_terms(x, x.detach(), None, adv, mask, clip_eps=eps, beta=0.0)
    one.loss.mean().backward()
    want = -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 3
    assert torch.allclose(x.grad, want.float(), atol=1e-6)


# ---------------------------------------------------------------- the reference pass


def test_reference_logprobs_are_the_base_models():
    """The reference is the policy with its adapter switched off: the base model's log-probs exactly."""
    from engine.adapter import build_for_run
    from engine.data import prepare
    from engine.evaluate.generation import stop_config
    from engine.model import build_tiny
    from engine.rl.grpo import sequence_logprobs
    from engine.rl.sampling import sample

    cfg = compose([*TINY_GRPO, "stages=[prepare_data,train_grpo]"])
    policy, tok = build_for_run(cfg.model, cfg.quantization, cfg.adapter, progress=False)
    with torch.no_grad(), torch.random.fork_rng():  # a trained adapter: B is no longer zero
        torch.manual_seed(3)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    base, _ = build_tiny(cfg.model)  # the same random-init weights, never wrapped
    data = prepare(cfg.data, tok, seed=0)
    eos, stops = stop_config(data.template, tok, [])
    prompts = [data.prompt_text(e, tok) for e in data.splits["train"][:2]]
    torch.manual_seed(0)
    samples = sample(
        policy, tok, prompts, group_size=3, max_new_tokens=6, temperature=1.0, top_p=1.0, eos_ids=eos, stops=stops, device="cpu"
    )

    ref = sequence_logprobs(policy, samples, rows=4, temperature=1.0, adapter=False)
    tuned = sequence_logprobs(policy, samples, rows=4, temperature=1.0, adapter=True)
    on_base = sequence_logprobs(base, samples, rows=6, temperature=1.0)
    assert torch.allclose(ref, on_base, atol=1e-5), (ref - on_base).abs().max()
    assert (tuned - ref).abs().max() > 1e-3, "the adapter should change the policy"
    assert all(m.lora_B["default"].weight.requires_grad for m in policy.modules() if hasattr(m, "lora_B") and m.lora_B)


# ---------------------------------------------------------------- the stage through the CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """train_grpo, evaluate and report on the tiny model (3 steps)."""
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    r = run_engine(
        *TINY_GRPO,
        "stages=[prepare_data,train_grpo,evaluate,report]",
        "train.max_steps=3",
        "eval.max_examples=4",
        "eval.max_new_tokens=8",
        f"hydra.run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_tiny_run_logs_rewards_and_saves_an_adapter(tiny_run):
    log = _log(tiny_run / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    for rec in log:
        for key in ("loss", "lr", "reward_mean", "reward_std", "reward_max_chars", "kl", "clip_frac", "completion_len"):
            assert key in rec, key
        assert 0 < rec["completion_len"] <= 8
    # The step's mean reward is the mean of the completions it logged.
    samples = _log(tiny_run / "samples.jsonl")
    assert len(samples) == 3 * 2 * 3
    for rec in log:
        mine = [s["reward"] for s in samples if s["step"] == rec["step"]]
        assert rec["reward_mean"] == pytest.approx(sum(mine) / len(mine), abs=1e-6)

    from safetensors.torch import load_file

    weights = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    moved = [k for k, v in weights.items() if "lora_B" in k and v.abs().max() > 0]
    assert moved, "the adapter should have moved from its zero-initialised B"

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    grpo = metrics["train_grpo"]
    assert grpo["steps"] == 3 and grpo["completions"] == 18 and grpo["stopped"] == "completed"
    reward = metrics["evaluate"]["reward"]
    assert set(reward) >= {"base", "finetuned", "parts", "examples"} and reward["examples"] == 4
    assert metrics["evaluate"]["test"]["reward"] == reward["finetuned"]
    assert metrics["evaluate"]["base"]["test"]["reward"] == reward["base"]
    report = (tiny_run / "report.md").read_text()
    assert "GRPO" in report and "Reward on held-out prompts" in report


def test_evaluate_reward_is_the_reward_of_the_recorded_answers(tiny_run):
    """evaluate.reward rescored by hand from generations.jsonl with the same reward."""
    from engine.reward import REWARDS, items_from_examples

    cfg = compose([*TINY_GRPO, "stages=[prepare_data,train_grpo,evaluate]"])
    from engine.data import prepare
    from engine.model import build_tiny

    _, tok = build_tiny(cfg.model)
    examples = prepare(cfg.data, tok, seed=cfg.seed).splits["test"][:4]
    rows = _log(tiny_run / "generations.jsonl")
    reward = REWARDS.build(cfg.reward)
    recorded = json.loads((tiny_run / "metrics.json").read_text())["evaluate"]["reward"]
    for variant in ("base", "finetuned"):
        scored = reward.score([r[variant] for r in rows], items_from_examples(examples))
        assert recorded[variant] == pytest.approx(sum(s.value for s in scored) / len(scored), abs=1e-6)


def test_logged_rewards_equal_the_gymnasium_environments(tiny_run):
    """Every completion the stage scored gets the same reward from engine.env's step()."""
    import gymnasium

    import engine.env  # noqa: F401  (registers engine/TextReward-v0)

    overrides = [o for o in TINY_GRPO if o.split("=")[0] in ("recipe", "model", "reward", "reward.checks")]
    env = gymnasium.make("engine/TextReward-v0", overrides=overrides, split="train").unwrapped
    samples = _log(tiny_run / "samples.jsonl")
    for s in samples:
        env.reset(options={"index": s["prompt"]})
        _, reward, terminated, _, info = env.step(s["text"])
        assert terminated
        assert reward == s["reward"]
        assert info["parts"] == s["parts"]
    assert len({s["reward"] for s in samples}) > 1, "the test needs rewards that differ"


# ---------------------------------------------------------------- resume


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    args = [*TINY_GRPO, "stages=[prepare_data,train_grpo]", "train.max_steps=4", "train.save_every=2", "adapter.dropout=0.1"]
    baseline = tmp_path / "baseline"
    r = run_engine(*args, f"hydra.run.dir={baseline}")
    assert r.returncode == 0, r.stderr[-3000:]

    crashy = tmp_path / "crashy"
    os.environ["ENGINE_CRASH_AT"] = "step:3"
    try:
        r = run_engine(*args, f"hydra.run.dir={crashy}")
    finally:
        os.environ.pop("ENGINE_CRASH_AT")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [rec["step"] for rec in _log(crashy / "train_log.jsonl")] == [1, 2, 3]

    r = run_engine(*args, f"hydra.run.dir={crashy}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "step 2" in r.stdout
    same = (crashy / "adapter" / "adapter_model.safetensors").read_bytes()
    assert same == (baseline / "adapter" / "adapter_model.safetensors").read_bytes()
    log, base_log = _log(crashy / "train_log.jsonl"), _log(baseline / "train_log.jsonl")
    assert [rec["step"] for rec in log] == [1, 2, 3, 4]
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in rec.items() if k not in drop} for rec in log] == [
        {k: v for k, v in rec.items() if k not in drop} for rec in base_log
    ]
    assert _log(crashy / "samples.jsonl") == _log(baseline / "samples.jsonl")
    assert json.loads((crashy / "metrics.json").read_text())["train_grpo"]["resumed_from_step"] == 2


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["reward=none"], ["reward: train_grpo", "reward=format_numeric", "presets:"]),
        (["adapter=none", "grpo.beta=0.1"], ["grpo.beta", "adapter=lora", "grpo.beta=0"]),
        (
            ["data=text", f"data.path={ROOT / 'engine' / 'samples' / 'env_numeric.jsonl'}", "data.fields.text=question"],
            ["data kind 'text' has no prompt"],
        ),
        (["stages=[prepare_data,train,train_grpo]"], ["both write checkpoints/"]),
    ],
)
def test_config_errors_exit_2_before_loading(extra, says):
    keys = {e.split("=")[0] for e in extra}

    def replaced(o: str) -> bool:  # an override of the same key or group (and that group's keys)
        key = o.split("=")[0]
        return any(key == k or key.startswith(f"{k}.") for k in keys) or ("data" in keys and key.startswith("reward."))

    args = [o for o in [*TINY_GRPO, "stages=[prepare_data,train_grpo]"] if not replaced(o)] + extra
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    for text in says:
        assert text in r.stderr, (text, r.stderr)
    assert "Traceback" not in r.stderr
    assert "[engine] stage" not in r.stdout  # nothing ran, nothing loaded


def test_adapter_none_without_kl_is_allowed():
    cfg = compose([*TINY_GRPO, "stages=[prepare_data,train_grpo]", "adapter=none", "grpo.beta=0"])
    assert cfg.grpo.beta == 0 and cfg.adapter.kind == "none"
