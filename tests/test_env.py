"""The Gymnasium environment: passes gymnasium's own checker, and its rewards are eval's numbers."""

from __future__ import annotations

import warnings

import gymnasium
import pytest
from conftest import TINY
from gymnasium.utils.env_checker import check_env

import engine.env  # noqa: F401  (registers engine/TextReward-v0)
from engine.env import ENV_ID, TextRewardEnv
from engine.errors import ConfigError
from engine.evaluate import metrics, suites
from engine.evaluate.spec import DEFAULT_REFUSALS
from engine.reward import REWARDS, RewardItem, items_from_suite
from engine.reward.checks import SuiteRewardSpec
from engine.reward.numeric import NumericRewardSpec
from engine.reward.text import ExactMatchSpec, F1Spec

Q = "How does the climate change? Answer with a score from -1 to 1."
REFS = ["Score: -0.05", "Score: 0.40", "Score: 1", "Score: -0.30", "Score: 0.75"]
PREDS = ["Score: -0.1", "I think 0.9", "Score: 1.0", "no idea", "Score: 0.6 — a clear gain"]


def items() -> list[RewardItem]:
    return [RewardItem([{"role": "user", "content": f"{Q} (#{i})"}], r, id=str(i)) for i, r in enumerate(REFS)]


def step_rewards(env, answers: list[str]) -> list[float]:
    """Each answer as the completion of the prompt at its index, through reset + step."""
    out = []
    for i, answer in enumerate(answers):
        env.reset(options={"index": i})
        _, reward, terminated, truncated, _ = env.step(answer)
        assert terminated and not truncated
        out.append(reward)
    return out


def test_env_passes_gymnasiums_checker_without_warnings():
    # Made from plain values through gymnasium.make (with a spec, the checker tests render modes too).
    env = gymnasium.make(ENV_ID, items=items(), reward=REWARDS.build(NumericRewardSpec(kind="numeric"))).unwrapped
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_env(env)
    assert [str(w.message) for w in seen] == []


def test_reset_is_seeded_and_step_returns_the_breakdown():
    env = TextRewardEnv(items(), REWARDS.build(NumericRewardSpec(kind="numeric")))
    draws = [env.reset(seed=7)[0] for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in [f"{Q} (#{i})" for i in range(5)]
    firsts = {env.reset(seed=s)[1]["id"] for s in range(20)}
    assert len(firsts) > 1  # different seeds, different prompts
    obs, info = env.reset(options={"id": "3"})
    assert env.observation_space.contains(obs) and info["reference"] == "Score: -0.30"
    assert info["messages"] == items()[3].messages
    obs2, reward, terminated, truncated, info = env.step("Score: -0.25")
    assert (obs2, reward, terminated, truncated) == (obs, 1.0, True, False)
    assert info == {"id": "3", "reference": "Score: -0.30", "parts": {"within_tol": 1.0, "parsed": 1.0}}
    with pytest.raises(RuntimeError, match="reset"):
        TextRewardEnv(items(), REWARDS.build(F1Spec(kind="f1"))).step("x")


def test_env_rewards_equal_eval_text_and_numeric_metrics():
    numeric = TextRewardEnv(items(), REWARDS.build(NumericRewardSpec(kind="numeric", tolerance=0.2)))
    got = step_rewards(numeric, PREDS)
    assert sum(got) / len(got) == pytest.approx(metrics.numeric_scores(PREDS, REFS, tolerance=0.2)["within_tol"])
    want = metrics.score(["exact_match", "token_f1"], PREDS, REFS)
    em = step_rewards(TextRewardEnv(items(), REWARDS.build(ExactMatchSpec(kind="exact_match"))), PREDS)
    f1 = step_rewards(TextRewardEnv(items(), REWARDS.build(F1Spec(kind="f1"))), PREDS)
    assert round(sum(em) / len(em), 4) == want["exact_match"]
    assert round(sum(f1) / len(f1), 4) == want["token_f1"]


def test_env_suite_rewards_equal_eval_suite_scores():
    suite = suites.load("format")
    pool = ["1. CO2\n2. methane\n3. nitrous oxide", '{"pollutant": "NO2", "main_source": "traffic"}', "- a\n- b\n- c", "short"]
    answers = [pool[i % len(pool)] for i in range(len(suite.cases))]
    scores, rows = suites.score([suite], {"format": answers}, DEFAULT_REFUSALS)
    env = TextRewardEnv(items_from_suite(suite), REWARDS.build(SuiteRewardSpec(kind="suite", suites=["format"])))
    got = step_rewards(env, answers)
    assert got == [float(r["passed"]) for r in rows]
    assert round(sum(got) / len(got), 4) == scores["format"] and 0 < scores["format"] < 1


@pytest.fixture(scope="module")
def numeric_env():
    return gymnasium.make(ENV_ID, overrides=[*TINY, "data=env_numeric", "reward=format_numeric"], split="test")


def test_make_from_engine_config_offline_with_the_tiny_model(numeric_env):
    env = numeric_env.unwrapped
    assert isinstance(env, TextRewardEnv) and len(env.items) > 0
    obs, info = numeric_env.reset(seed=0)
    assert numeric_env.observation_space.contains(obs)
    assert info["messages"][-1]["content"] in obs and obs.endswith("<|im_start|>assistant\n")  # rendered as eval prompts it
    assert info["id"].startswith("test/") and info["reference"].startswith("Score:")
    _, reward, terminated, _, step_info = numeric_env.step(info["reference"])
    assert (reward, terminated) == (1.5, True)  # exact value and format: 1 x 1 + 0.5 x 1
    assert step_info["parts"]["accuracy.within_tol"] == 1.0 and step_info["parts"]["format.contains"] == 1.0
    _, reward, _, _, step_info = numeric_env.step("No idea.")
    assert reward == 0.5 * 0.5 and step_info["parts"]["format.max_words"] == 1.0


def test_made_env_passes_the_checker_and_matches_eval_within_tol(numeric_env):
    env = numeric_env.unwrapped
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_env(env)
    assert [str(w.message) for w in seen] == []
    refs = [i.reference for i in env.items]
    preds = [f"Score: {metrics.parse_number(r) + (0.1 if k % 2 else 0.5):.2f}" for k, r in enumerate(refs)]
    rewards = [step_infos["parts"]["accuracy"] for step_infos in _steps(env, preds)]
    assert sum(rewards) / len(rewards) == pytest.approx(metrics.numeric_scores(preds, refs)["within_tol"])


def _steps(env, answers):
    for i, a in enumerate(answers):
        env.reset(options={"index": i})
        yield env.step(a)[4]


def test_make_with_suite_prompts_and_config_errors():
    env = gymnasium.make(ENV_ID, overrides=[*TINY, "reward=suite_format"])
    ids = [i.id for i in env.unwrapped.items]
    assert ids == [f"format/{c.id}" for c in suites.load("format").cases]
    with pytest.raises(ConfigError, match="reward: none"):
        gymnasium.make(ENV_ID, overrides=[*TINY, "data=env_numeric"])
    with pytest.raises(ConfigError, match=r"reward.terms.format.wieght: unknown key 'wieght'"):
        gymnasium.make(ENV_ID, overrides=[*TINY, "reward=format_numeric", "reward.terms.format.wieght=2"])
    with pytest.raises(ConfigError, match="reward.kind: unknown reward 'numerc'"):
        gymnasium.make(ENV_ID, overrides=[*TINY, "reward=numeric", "reward.kind=numerc"])
    with pytest.raises(ConfigError, match="split: 'dev'"):
        gymnasium.make(ENV_ID, overrides=[*TINY, "reward=numeric"], split="dev")
