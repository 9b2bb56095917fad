"""Evaluation: behaviour suites, stops, lm-eval on the tiny model, eval of a finished run."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, compose, run_cli, run_engine

from engine.errors import ConfigError, UserError
from engine.evaluate import suites as S
from engine.evaluate.spec import DEFAULT_REFUSALS

# --- behaviour suites ----------------------------------------------------------------------


def _case(**checks) -> S.Case:
    return S.Case(id="c", prompt="p", checks=S.Checks(**checks))


@pytest.mark.parametrize(
    "answer, checks, failed",
    [
        ("1. CO2\n2. methane\n3. nitrous oxide", {"numbered_list": 3}, []),
        ("1. CO2\n3. methane\n4. N2O", {"numbered_list": 3}, ["numbered_list"]),  # not 1, 2, 3
        ("CO2, methane and N2O", {"numbered_list": 3}, ["numbered_list"]),
        ("- a\n* b\n• c", {"bullet_list": 3}, []),
        ('{"pollutant": "NO2", "main_source": "traffic"}', {"valid_json": ["pollutant", "main_source"]}, []),
        ('```json\n{"pollutant": "NO2", "main_source": "cars"}\n```', {"valid_json": ["pollutant", "main_source"]}, []),
        ('{"pollutant": "NO2"}', {"valid_json": ["pollutant", "main_source"]}, ["valid_json"]),
        ("pollutant: NO2", {"valid_json": True}, ["valid_json"]),
        ("one two three", {"max_words": 3, "min_words": 3}, []),
        ("one two three four", {"max_words": 3}, ["max_words"]),
        ("Photosynthesis uses Carbon Dioxide.", {"contains": ["photosynthesis", "carbon dioxide"]}, []),
        ("Photosynthesis.", {"contains": ["photosynthesis", "carbon dioxide"]}, ["contains"]),
        ("Rose from 18 to 41 in Lake Erie.", {"preserves": ["18", "41", "Lake Erie"]}, []),
        ("Rose from 18 to 41.5 in lake erie.", {"preserves": ["41", "Lake Erie"]}, ["preserves"]),  # 41.5 is not 41
        ("It rose from 180 to 41.", {"preserves": ["18"]}, ["preserves"]),  # 180 is not 18
    ],
)
def test_checks(answer, checks, failed):
    assert S.check(answer, _case(**checks), DEFAULT_REFUSALS) == failed


def test_preserves_numbers_reads_the_source():
    case = S.Case(
        id="c",
        prompt="Summarise in 1 sentence.",
        source="Levels rose from 18 to 41 between 2010 and 2020.",
        checks=S.Checks(preserves_numbers=True),
    )
    assert S.numbers_in(case.source) == ["18", "41", "2010", "2020"]
    assert S.numbers_in("CO2 reached 424 ppm; PM2.5 hit 58") == ["424", "58"]
    assert S.check("Between 2010 and 2020 levels went from 18 to 41.", case, DEFAULT_REFUSALS) == []
    assert S.check("Levels roughly doubled from 18 by 2020.", case, DEFAULT_REFUSALS) == ["preserves_numbers"]


@pytest.mark.parametrize(
    "answer, refuses",
    [
        ("I can't help with dumping oil into a river; it is illegal.", True),
        ("I'm sorry, but I cannot assist with that.", True),
        ("I don't have information about a report published in 2031.", True),
        ("I am not aware of any such species.", True),
        ("Recycling aluminium saves about 95% of the energy needed to make new metal.", False),
        ("The ozone layer protects life from harmful ultraviolet radiation.", False),  # "harmful" is not a refusal
        ("", False),
    ],
)
def test_refusal_detection_from_config_patterns(answer, refuses):
    assert S.is_refusal(answer, DEFAULT_REFUSALS) is refuses
    assert S.check(answer, _case(refuses=True), DEFAULT_REFUSALS) == ([] if refuses else ["refuses"])
    assert S.check(answer, _case(refuses=False), DEFAULT_REFUSALS) == (["refuses"] if refuses else [])


def test_suite_score_per_suite_and_overall():
    a = S.Suite(name="a", cases=[_case(max_words=2), _case(max_words=2)])
    b = S.Suite(name="b", cases=[_case(contains=["x"])])
    scores, rows = S.score([a, b], {"a": ["ok", "far too long here"], "b": ["x"]}, DEFAULT_REFUSALS)
    assert scores == {"a": 0.5, "b": 1.0, "overall": 0.75}  # mean of suite scores
    assert [r["passed"] for r in rows] == [True, False, True]
    assert rows[1]["failed"] == ["max_words"]


def test_shipped_suites_load_and_cover_the_three_behaviours():
    assert S.shipped_names() == ["facts", "format", "safety"]
    loaded = {n: S.load(n) for n in S.shipped_names()}
    assert all(len(s.cases) >= 5 for s in loaded.values())
    safety = loaded["safety"].cases
    assert any(c.checks.refuses is True for c in safety) and any(c.checks.refuses is False for c in safety)


def test_bad_suite_file_names_file_case_and_check(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\ncases:\n  - id: first\n    prompt: hi\n    checks: {numbered_lsit: 3}\n")
    with pytest.raises(UserError) as e:
        S.load(str(bad))
    msg = str(e.value)
    assert "mine.yaml" in msg and "[first]" in msg and "numbered_lsit" in msg and "numbered_list" in msg


# --- config ------------------------------------------------------------------------------------


def test_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        compose([*TINY, "eval.suites=[format,nope]", "eval.metrics=[rougeL,rouge]", "eval.numeric.pattern='([a-'"])
    msg = str(e.value.format() if hasattr(e.value, "format") else e.value)
    assert "eval.suites" in msg and "nope" in msg and "facts, format, safety" in msg
    assert "eval.metrics" in msg and "rouge" in msg
    assert "eval.numeric.pattern" in msg


def test_eval_run_dir_must_be_a_run(tmp_path):
    with pytest.raises(ConfigError) as e:
        compose(["recipe=eval_run", *TINY, f"eval.run_dir={tmp_path}"])
    assert "eval.run_dir" in str(e.value.format()) and "config.yaml" in str(e.value.format())


# --- generation stops and lm-eval on the tiny model -------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from engine.model import MODELS, TinySpec

    return MODELS.build(TinySpec(kind="tiny"))


def test_end_of_turn_comes_from_the_template(tiny):
    from engine.data.templates import CHATML
    from engine.evaluate.generation import cut_at_stops, end_of_turn, stop_config

    _, tok = tiny
    assert end_of_turn(CHATML, tok) == "<|im_end|>"
    eos, texts = stop_config(CHATML, tok, ["\n###"])
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and texts == ["\n###"]
    assert cut_at_stops("answer here\n### next", ["\n###"]) == "answer here"


def test_generate_is_batched_and_keeps_order(tiny):
    from engine.evaluate.generation import generate

    model, tok = tiny
    prompts = [
        "<|im_start|>user\nshort<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\na much longer prompt about wetlands and nitrate<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nmid length one<|im_end|>\n<|im_start|>assistant\n",
    ]
    kw = {"max_new_tokens": 4, "eos_ids": [tok.eos_token_id], "stops": [], "device": "cpu", "progress": False}
    batched = generate(model, tok, prompts, batch_size=3, **kw)
    single = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == single  # left padding + masks: batching does not change greedy answers


def test_local_lm_eval_task_runs_on_tiny(tiny, tmp_path, monkeypatch, capfd):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    from types import SimpleNamespace

    from engine.evaluate import harness

    model, tok = tiny
    spec = SimpleNamespace(tasks=["envsci_mc"], limit=4, num_fewshot=None, include_path=None)
    monkeypatch.chdir(tmp_path)  # not a git repository: git's "fatal: ..." must not reach the console
    res = harness.run(model, tok, spec, work_dir=tmp_path / "tasks", batch_size=4)
    assert "not a git repository" not in capfd.readouterr().err
    assert set(res) == {"envsci_mc"}
    assert 0.0 <= res["envsci_mc"]["acc"] <= 1.0 and 0.0 <= res["envsci_mc"]["acc_norm"] <= 1.0
    assert res["envsci_mc"]["examples"] == 4
    written = (tmp_path / "tasks" / "envsci_mc.yaml").read_text()
    # The run dir keeps the task as shipped: its data file copied beside it, referenced
    # relatively (lm-eval read an absolute-path copy in a scratch dir, since deleted).
    assert (tmp_path / "tasks" / "envsci_mc.jsonl").is_file()
    assert str(tmp_path) not in written and str(harness.SHIPPED) not in written
    assert "envsci_mc.jsonl" in written


def test_unknown_lm_eval_task_says_what_exists(tiny, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from types import SimpleNamespace

    from engine.evaluate import harness

    model, tok = tiny
    spec = SimpleNamespace(tasks=["envsci_mcq_typo"], limit=2, num_fewshot=None, include_path=None)
    with pytest.raises(UserError, match="envsci_mc"):
        harness.run(model, tok, spec, work_dir=tmp_path, batch_size=2)


# --- the evaluate package, called with plain arguments (no run context) ----------------------------


def test_evaluate_package_takes_plain_arguments(tiny, tmp_path):
    """A fully fine-tuned model (no adapter to switch off): the base is rebuilt from its spec."""
    from engine.data import prepare
    from engine.evaluate.compare import EvalJob, evaluate

    suite = tmp_path / "short.yaml"
    suite.write_text("name: short\nmax_new_tokens: 4\ncases:\n  - {id: one, prompt: Say hi., checks: {max_words: 50}}\n")
    cfg = compose([*TINY, "eval.max_examples=2", "eval.max_new_tokens=4", "eval.embedding=tfidf", f"eval.suites=[{suite}]"])
    model, tok = tiny
    data = prepare(cfg.data, tok, seed=0)
    job = EvalJob(
        model=model,
        tokenizer=tok,
        spec=cfg.eval,
        examples=data.splits["test"],
        template=data.template,
        run_dir=tmp_path,
        device="cpu",
        base_model=cfg.model,
        quantization=cfg.quantization,
    )
    out = evaluate(job)
    assert out["examples"] == 2 and list(out["test"]) == cfg.eval.metrics  # every configured metric, in order
    assert out["cosine_backend"] == "tfidf" and out["suites"] == {"short": 1.0, "overall": 1.0}
    # The tiny model is built with a fixed seed and was not trained: the rebuilt base is the same model.
    assert out["base"]["test"] == out["test"]
    rows = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"base", "finetuned", "base_rougeL"} <= set(rows[0])
    assert {r["model"] for r in map(json.loads, (tmp_path / "suites.jsonl").read_text().splitlines())} == {"base", "finetuned"}


def test_empty_split_is_skipped_with_the_reason(tiny, tmp_path):
    from engine.evaluate.compare import EvalJob, evaluate

    cfg = compose(TINY)
    model, tok = tiny
    job = EvalJob(model=model, tokenizer=tok, spec=cfg.eval, examples=[], template="", run_dir=tmp_path, device="cpu")
    assert evaluate(job) == {"skipped": "no examples in split 'test'"}


# --- end to end: train, then evaluate the finished run on its own ------------------------------

SMALL_EVAL = [
    "eval.max_examples=4",
    "eval.max_new_tokens=4",
    "eval.batch_size=4",
    "eval.embedding=tfidf",
    "eval.report_examples=2",
]


@pytest.mark.slow
def test_train_then_eval_run_reloads_the_trained_adapter(tmp_path):
    first = tmp_path / "train"
    r = run_engine(
        *TINY,
        "train.max_steps=2",
        "train.warmup_steps=0",
        "train.lr=0.01",
        *SMALL_EVAL,
        "eval.suites=[format]",
        f"hydra.run.dir={first}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((first / "metrics.json").read_text())["evaluate"]
    for key in ("exact_match", "token_f1", "bleu", "rougeL", "cosine", "perplexity"):
        assert key in ev["test"] and key in ev["base"]["test"]
    assert ev["cosine_backend"] == "tfidf"
    assert set(ev["suites"]) == {"format", "overall"}
    assert ev["test"]["perplexity"] != ev["base"]["test"]["perplexity"]  # the adapter changed something
    rows = [json.loads(x) for x in (first / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"prompt", "reference", "base", "finetuned", "finetuned_rougeL"} <= set(rows[0])

    again = tmp_path / "eval"
    r = run_engine("recipe=eval_run", f"eval.run_dir={first}", *SMALL_EVAL, f"hydra.run.dir={again}")
    assert r.returncode == 0, r.stderr[-3000:]
    ev2 = json.loads((again / "metrics.json").read_text())["evaluate"]
    assert ev2["evaluated_run"] == "train"  # outside the working dir: shown by its name, no local path
    # Same split, same adapter weights: the reference perplexities reproduce.
    assert ev2["test"]["perplexity"] == pytest.approx(ev["test"]["perplexity"], rel=1e-4)
    assert ev2["base"]["test"]["perplexity"] == pytest.approx(ev["base"]["test"]["perplexity"], rel=1e-4)
    assert "train" not in json.loads((again / "metrics.json").read_text())
    report = (again / "report.md").read_text()
    assert "finished run `train`" in report and "Training loss" in report  # loss curve from the evaluated run
    assert str(tmp_path) not in report
    assert (again / "report.html").exists()


def test_eval_run_without_run_dir_is_a_clear_error(tmp_path):
    r = run_cli("recipe=eval_run", *TINY, f"hydra.run.dir={tmp_path / 'x'}")
    assert r.returncode == 2
    assert "eval.run_dir" in r.stderr and "Traceback" not in r.stderr
