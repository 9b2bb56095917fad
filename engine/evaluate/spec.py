"""Schema of the ``eval`` group (no heavy imports: validation runs before anything loads).

Metric names, and where they land in metrics.json (``<split>`` is ``eval.split``):
  evaluate.<split>.<metric>          fine-tuned model
  evaluate.base.<split>.<metric>     base model (adapter disabled), same prompts
  evaluate.suites.<suite>|overall    behaviour-suite pass rates (and under evaluate.base.)
  evaluate.lm_eval.<task>.<metric>   lm-eval results (and under evaluate.base.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from engine.evaluate.metrics import unknown
from engine.registry import Strict


def pattern_compiles(v: str | None) -> str | None:
    """Validator body shared by every optional regex field (eval.numeric, reward numeric)."""
    if v is not None:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
    return v


def suites_exist(v: list[str]) -> list[str]:
    """Validator body shared by eval.suites and the suite reward: every name is shipped or a file."""
    from engine.evaluate.suites import resolve, shipped_names

    missing = [s for s in v if resolve(s) is None]
    if missing:
        raise ValueError(f"no suite {missing}; shipped: {', '.join(shipped_names())} (or a path to a suite YAML)")
    return v


DEFAULT_REFUSALS = [
    r"\bI (?:can(?:no|')t|won't|will not|am unable to|'m unable to|am not able to|'m not able to)\b",
    r"\b(?:sorry|apologi[sz]e)\b",
    r"\bI (?:do not|don't) (?:know|have (?:any )?(?:information|data|access))\b",
    r"\b(?:not aware of|no (?:reliable )?(?:information|record|evidence) (?:about|of|on)|does not exist|doesn't exist)\b",
]


class NumericSpec(Strict):
    tolerance: float = Field(0.2, ge=0)
    """within_tol counts |prediction - reference| <= tolerance as correct."""
    pattern: str | None = None
    """Regex whose first group holds the value (e.g. 'Score:\\s*(\\S+)'); null = the last number."""
    expected_value: bool = False
    """Also score the expected value of the answer's number under the model's digit/sign
    distributions (what ce_regression trains; engine/evaluate/numeric.py): metrics *_ev."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return pattern_compiles(v)


class LmEvalSpec(Strict):
    tasks: list[str] = []
    """lm-eval task names; [] = off. Shipped offline: envsci_mc."""
    limit: int | None = Field(20, ge=1)
    """Documents per task (null = all): lm-eval is slow on CPU."""
    num_fewshot: int | None = Field(None, ge=0)
    include_path: str | None = None
    """A directory of your own lm-eval task YAMLs."""


class EvalSpec(Strict):
    run_dir: str | None = None
    """Evaluate this finished run (its config.yaml + adapter/) instead of the model built here."""
    split: Literal["train", "validation", "test"] = "test"
    max_examples: int | None = Field(40, ge=1)
    """Examples of the split to generate for (null = all)."""
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    compare_base: bool = True
    """Also evaluate the base model (adapter disabled) on the same prompts."""
    metrics: list[str] = ["exact_match", "token_f1", "bleu", "rougeL", "cosine", "perplexity"]
    """Names registered in engine/evaluate/metrics.py (``METRICS``); an unknown name lists the valid ones."""
    stop: list[str] = []
    """Extra stop strings; the template's end-of-turn marker always stops generation."""
    embedding: Literal["auto", "minilm", "tfidf"] = "auto"
    """Back end of 'cosine': auto = all-MiniLM-L6-v2 when installed, else TF-IDF."""
    numeric: NumericSpec = NumericSpec()
    suites: list[str] = []
    """Behaviour suites: shipped names (format, facts, safety) or paths to suite YAMLs."""
    refusal_patterns: list[str] = DEFAULT_REFUSALS
    """Case-insensitive regexes; an answer matching any of them counts as a refusal."""
    lm_eval: LmEvalSpec = LmEvalSpec()
    report_examples: int = Field(5, ge=0)
    """Side-by-side generations shown in report.md / report.html."""
    compare_run: str | None = None
    """Another finished run dir (e.g. the same recipe with loss=ce): its fine-tuned metrics are
    shown beside this run's in the report, with which is better."""
    notes: list[str] = []
    """Paragraphs added to the report's evaluation section (e.g. reference numbers to compare with)."""

    @field_validator("metrics")
    @classmethod
    def _metrics_registered(cls, v: list[str]) -> list[str]:
        # Checked against the registry at validation time, not frozen into a Literal at import:
        # a metric a plugin registers is valid too.
        problem = unknown(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"[{i}] {p!r} is not a valid regular expression: {e}") from None
        return v

    @field_validator("suites")
    @classmethod
    def _suites_exist(cls, v: list[str]) -> list[str]:
        return suites_exist(v)

    @field_validator("run_dir", "compare_run")
    @classmethod
    def _run_dir_has_config(cls, v: str | None) -> str | None:
        if v is not None and not (Path(v).expanduser() / "config.yaml").is_file():
            raise ValueError(f"{v!r} is not a run dir (no config.yaml in it); point it at outputs/<recipe>/<time>")
        return v
