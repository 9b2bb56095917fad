"""The reward group: every kind on hand-written completions, equal to the evaluate stage's numbers.

"The metric you evaluate is the reward you train on" holds only if the numbers are the same:
each kind is checked against the engine.evaluate function it wraps, on the same texts.
"""

from __future__ import annotations

import textwrap

import pytest
from conftest import TINY, compose

from engine.errors import ConfigError, UserError
from engine.evaluate import metrics, suites
from engine.evaluate.spec import DEFAULT_REFUSALS
from engine.reward import REWARDS, RewardItem, Scored, items_from_examples, items_from_suite
from engine.reward.checks import ChecksRewardSpec, SuiteRewardSpec
from engine.reward.numeric import NumericRewardSpec
from engine.reward.text import ExactMatchSpec, F1Spec

Q = [{"role": "user", "content": "How does the climate change? Answer with a score."}]
REFS = ["Score: -0.05", "Score: 0.40", "Score: 1", "Paris is the capital of France.", "Score: -0.30"]
PREDS = ["Score: -0.1", "I think 0.9", "Score: 1.0", "The capital of France is the city of Paris", "no idea"]


def items(refs=REFS) -> list[RewardItem]:
    return [RewardItem(messages=Q, reference=r, id=str(i)) for i, r in enumerate(refs)]


def build(kind: str, **keys):
    return REWARDS.build(REWARDS.get(kind).spec(kind=kind, **keys))


def values(reward, preds=PREDS, refs=REFS) -> list[float]:
    return [s.value for s in reward.score(preds, items(refs))]


# --- text kinds -------------------------------------------------------------------------------


def test_exact_match_and_f1_means_equal_eval_metrics_score():
    want = metrics.score(["exact_match", "token_f1"], PREDS, REFS)
    em = values(REWARDS.build(ExactMatchSpec(kind="exact_match")))
    f1 = values(REWARDS.build(F1Spec(kind="f1")))
    assert em == [metrics.exact_match(p, r) for p, r in zip(PREDS, REFS, strict=True)]
    assert round(sum(em) / len(em), 4) == want["exact_match"]
    assert round(sum(f1) / len(f1), 4) == want["token_f1"]
    assert 0 < f1[3] < 1 and em[3] == 0.0  # most words shared: partial credit in F1 only


def test_a_reference_reward_refuses_items_without_a_reference():
    with pytest.raises(UserError, match="item 'q1' has no reference"):
        build("f1").score(["x"], [RewardItem(messages=Q, id="q1")])


# --- numeric ----------------------------------------------------------------------------------


def test_numeric_within_tol_mean_equals_eval_within_tol():
    numeric_refs = [r for r in REFS if metrics.parse_number(r) is not None]
    numeric_preds = [p for p, r in zip(PREDS, REFS, strict=True) if metrics.parse_number(r) is not None]
    for tol in (0.1, 0.2, 0.5):
        got = values(REWARDS.build(NumericRewardSpec(kind="numeric", tolerance=tol)), numeric_preds, numeric_refs)
        want = metrics.numeric_scores(numeric_preds, numeric_refs, tolerance=tol)["within_tol"]
        assert sum(got) / len(got) == pytest.approx(want)
    assert values(build("numeric"), numeric_preds, numeric_refs) == [1.0, 0.0, 1.0, 0.0]  # -0.1 vs -0.05 is within 0.2


def test_numeric_neg_abs_error_is_clipped_and_missing_is_configurable():
    reward = build("numeric", shape="neg_abs_error", clip=0.3, missing=-1.0)
    out = reward.score(["Score: -0.1", "Score: 0.9", "Score: 1", "nothing to say"], items(["-0.05", "0.40", "Score: -5", "0.2"]))
    assert [s.value for s in out] == pytest.approx([-0.05, -0.3, -0.3, -1.0])
    assert out[0].parts == {"neg_abs_error": pytest.approx(-0.05), "parsed": 1.0}
    assert out[3].parts == {"neg_abs_error": -1.0, "parsed": 0.0}


def test_numeric_pattern_reads_the_value_where_eval_reads_it():
    reward = build("numeric", pattern=r"Score:\s*(\S+)")
    # The last number is 3 (a restated step), the pattern's group is the answer.
    assert values(reward, ["Score: 0.4 after 3 steps"], ["Score: 0.40"]) == [1.0]
    assert values(build("numeric"), ["Score: 0.4 after 3 steps"], ["Score: 0.40"]) == [0.0]


# --- checks and suite -------------------------------------------------------------------------


def test_checks_share_passed_with_parts_per_check():
    spec = ChecksRewardSpec(kind="checks", checks={"contains": ["Score:"], "max_words": 4, "numbered_list": 2})
    out = REWARDS.build(spec).score(["Score: 0.5", "1. a\n2. b", "1. Score: x\n2. y"], items(["", "", ""]))
    assert out[0] == Scored(2 / 3, {"numbered_list": 0.0, "max_words": 1.0, "contains": 1.0})
    assert out[1].parts == {"numbered_list": 1.0, "max_words": 1.0, "contains": 0.0}
    assert out[2].value == 2 / 3 and out[2].parts["max_words"] == 0.0  # 5 words
    strict = REWARDS.build(spec.model_copy(update={"all_or_nothing": True}))
    assert [s.value for s in strict.score(["Score: 0.5", "1. Score:\n2. b"], items(["", ""]))] == [0.0, 1.0]


def test_checks_refuses_uses_the_refusal_patterns():
    reward = REWARDS.build(ChecksRewardSpec(kind="checks", checks={"refuses": True}))
    assert values(reward, ["I can't help with that.", "Sure, here it is."], ["", ""]) == [1.0, 0.0]
    custom = REWARDS.build(ChecksRewardSpec(kind="checks", checks={"refuses": True}, refusal_patterns=[r"\bnope\b"]))
    assert values(custom, ["I can't help with that.", "Nope."], ["", ""]) == [0.0, 1.0]


@pytest.mark.parametrize("name", ["format", "facts", "safety"])
def test_suite_rewards_equal_eval_suite_scores_per_case(name):
    suite = suites.load(name)
    # Answers that pass some cases and fail others: the case's own prompt, a refusal, a list, JSON.
    pool = ["1. CO2\n2. methane\n3. nitrous oxide", "I'm sorry, I can't help with that.", '{"pollutant": "NO2"}', "- a\n- b\n- c"]
    answers = [pool[i % len(pool)] for i in range(len(suite.cases))]
    scores, rows = suites.score([suite], {name: answers}, DEFAULT_REFUSALS)
    reward = REWARDS.build(SuiteRewardSpec(kind="suite", suites=[name]))
    got = reward.score(answers, items_from_suite(suite))
    assert [s.value for s in got] == [float(r["passed"]) for r in rows]
    assert round(sum(s.value for s in got) / len(got), 4) == scores[name]
    for s, row in zip(got, rows, strict=True):
        assert [k for k, v in s.parts.items() if v == 0.0] == row["failed"]
    assert name == "facts" or 0 < scores[name] < 1  # the answers above both pass and fail cases


def test_suite_partial_credit_and_refuses_items_without_a_case():
    suite = suites.load("format")
    reward = REWARDS.build(SuiteRewardSpec(kind="suite", suites=["format"], all_or_nothing=False))
    case_items = items_from_suite(suite)
    three = next(i for i in case_items if i.id == "format/numbered-three-greenhouse-gases")
    (s,) = reward.score(["1. CO2\n2. methane"], [three])  # numbered_list 3 fails, max_words passes
    assert s == Scored(0.5, {"numbered_list": 0.0, "max_words": 1.0})
    with pytest.raises(UserError, match="not a behaviour-suite prompt"):
        reward.score(["x"], items(["ref"])[:1])


def test_items_from_examples_and_suite():
    from engine.data import Example

    exs = [Example([1], [1], [{"role": "system", "content": "s"}, *Q, {"role": "assistant", "content": "Score: 1"}])]
    (item,) = items_from_examples(exs, prefix="test/")
    assert item == RewardItem(messages=[{"role": "system", "content": "s"}, *Q], reference="Score: 1", id="test/0")
    suite = suites.load("format")
    made = items_from_suite("format")
    assert [i.case for i in made] == suite.cases and made[0].messages == suite.prompt_messages(suite.cases[0])


# --- combined and plugin ----------------------------------------------------------------------


def test_combined_is_the_weighted_sum_with_prefixed_parts():
    cfg = compose([*TINY, "reward=format_numeric"])
    reward = REWARDS.build(cfg.reward)
    out = reward.score(["Score: -0.1", "I guess the score is about 0.9 overall", "Score:"], items(["Score: -0.05"] * 3))
    assert [s.value for s in out] == pytest.approx([1.0 * 1 + 0.5 * 1, 1.0 * 0 + 0.5 * 0, 0 + 0.5 * 1])
    assert out[1].parts == {
        "accuracy": 0.0,
        "accuracy.within_tol": 0.0,
        "accuracy.parsed": 1.0,
        "format": 0.0,
        "format.max_words": 0.0,
        "format.contains": 0.0,
    }
    heavier = REWARDS.build(compose([*TINY, "reward=format_numeric", "reward.terms.format.weight=-2"]).reward)
    assert [s.value for s in heavier.score(["Score: -0.1"], items(["Score: -0.05"]))] == [1.0 - 2.0]


PLUGIN = textwrap.dedent(
    '''
    """A reward plugin, as a user would write one."""
    from engine.reward import Scored, register_function


    @register_function("test_short_answer")
    def short_answer(completion, item, *, limit=3):
        words = len(completion.split())
        return Scored(float(words <= limit), {"words": float(words)})


    @register_function("test_mentions_reference")
    def mentions_reference(completion, item):
        return float(item.reference.lower() in completion.lower())
    '''
)


@pytest.fixture(scope="module")
def plugin_module(tmp_path_factory):
    import sys

    folder = tmp_path_factory.mktemp("plugins")
    (folder / "engine_test_reward_plugin.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    yield "engine_test_reward_plugin"
    sys.path.remove(str(folder))


def test_plugin_function_by_name_from_a_plugins_module(plugin_module):
    base = [*TINY, f"plugins=[{plugin_module}]", "reward=plugin"]
    reward = REWARDS.build(compose([*base, "reward.function=test_short_answer", "reward.args.limit=2"]).reward)
    out = reward.score(["Score: 1", "it is one"], items(["1", "1"]))
    assert out == [Scored(1.0, {"words": 2.0}), Scored(0.0, {"words": 3.0})]
    mentions = REWARDS.build(compose([*base, "reward.function=test_mentions_reference"]).reward)
    assert values(mentions, ["It is Paris.", "Rome"], ["paris", "paris"]) == [1.0, 0.0]
    # In a combined reward too.
    combined = compose(
        [
            *TINY,
            f"plugins=[{plugin_module}]",
            "reward=format_numeric",
            "+reward.terms.short={kind: plugin, function: test_short_answer}",
        ]
    )
    (s,) = REWARDS.build(combined.reward).score(["Score: -0.05"], items(["Score: -0.05"]))
    assert s.value == 1.0 + 0.5 + 1.0 and s.parts["short.words"] == 2.0


# --- config errors ----------------------------------------------------------------------------


def problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        compose([*TINY, *overrides])
    return str(err.value)


def test_unknown_kind_lists_the_valid_ones():
    msg = problems(["reward=f1", "reward.kind=numerc"])
    assert "reward.kind: unknown reward 'numerc' (did you mean 'numeric'?)" in msg
    for kind in ("checks", "combined", "exact_match", "f1", "numeric", "plugin", "suite"):
        assert kind in msg


def test_bad_term_keys_are_named_with_their_full_key():
    msg = problems(
        [
            "reward=format_numeric",
            "reward.terms.format.checks.max_wrds=3",
            "reward.terms.format.wieght=2",
            "reward.terms.accuracy.tolerance=-1",
            "reward.terms.accuracy.kind=numerc",
        ]
    )
    assert "reward.terms.format.checks.max_wrds: unknown key 'max_wrds' (did you mean 'max_words'" in msg
    assert "reward.terms.format.wieght: unknown key 'wieght' (did you mean 'weight'?); valid keys here: weight, checks" in msg
    assert "reward.terms.accuracy.kind: unknown reward kind 'numerc' (did you mean 'numeric'?)" in msg
    msg = problems(["reward=format_numeric", "reward.terms.accuracy.tolerance=-1"])
    assert "reward.terms.accuracy.tolerance: should be greater than or equal to 0" in msg


def test_checks_and_suite_errors():
    assert "reward.checks.max_wrds: unknown key 'max_wrds'" in problems(["reward=checks", "reward.checks.max_wrds=3"])
    assert "reward.suites: no suite ['nope']" in problems(["reward=suite_format", "reward.suites=[nope]"])
    with pytest.raises(ValueError, match="none is set"):
        ChecksRewardSpec(kind="checks", checks={})


def test_unknown_plugin_function_names_the_registered_ones(plugin_module):
    msg = problems([f"plugins=[{plugin_module}]", "reward=plugin", "reward.function=test_short_answr"])
    assert "reward.function: no reward function 'test_short_answr' is registered (did you mean 'test_short_answer'?)" in msg
    assert "test_mentions_reference" in msg and "register_function" in msg
    assert "reward.function: '???' (not set)" in problems(["reward=plugin"])
