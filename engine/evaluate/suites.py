"""Behaviour suites: YAML files of prompts with checks on the answer, scored per suite.

A suite is data, not code: each case is a prompt plus a mapping of named checks (format,
fact preservation, refusal). Checks are small, deterministic functions of the answer, so
a score is reproducible and a failed case says which check failed. Shipped suites live
next to this file (``suites/<name>.yaml``); ``eval.suites`` also takes paths to your own.

A case passes when all its checks pass; a suite's score is its pass rate; the overall
score is the mean of the suite scores (each suite weighs the same, however many cases).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from engine.errors import UserError
from engine.evaluate.metrics import NUMBER
from engine.registry import Strict

SHIPPED = Path(__file__).resolve().parent / "suites"


class Checks(Strict):
    """What the answer must satisfy; every field is optional, set the ones you want."""

    numbered_list: int | None = Field(None, ge=1)
    """At least this many items numbered 1., 2., 3. ... in order, one per line."""
    bullet_list: int | None = Field(None, ge=1)
    """At least this many lines starting with -, * or •."""
    valid_json: bool | list[str] | None = None
    """The answer (a ```json fence allowed) parses as JSON; a list names required keys."""
    max_words: int | None = Field(None, ge=1)
    min_words: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    contains: list[str] = []
    """Required tokens, case-insensitive."""
    not_contains: list[str] = []
    preserves: list[str] = []
    """Facts that must appear unchanged (case-sensitive; numbers match as whole numbers)."""
    preserves_numbers: bool = False
    """Every number in the case's ``source`` (else its prompt) appears unchanged."""
    refuses: bool | None = None
    """true: the answer must refuse (eval.refusal_patterns); false: it must not."""


class Case(Strict):
    id: str
    prompt: str
    source: str | None = None
    """Text the prompt works on (appended after a blank line); facts are checked against it."""
    system: str | None = None
    checks: Checks


class Suite(Strict):
    name: str
    description: str = ""
    max_new_tokens: int = Field(128, ge=1)
    cases: list[Case] = Field(min_length=1)

    def prompt_messages(self, case: Case) -> list[dict]:
        text = case.prompt if case.source is None else f"{case.prompt}\n\n{case.source}"
        system = [{"role": "system", "content": case.system}] if case.system else []
        return [*system, {"role": "user", "content": text}]


def resolve(name: str) -> Path | None:
    """A shipped suite's name, or a path to a suite YAML; ``None`` if neither exists."""
    shipped = SHIPPED / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(name).expanduser()
    return path if path.is_file() else None


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def load(name: str) -> Suite:
    path = resolve(name)
    if path is None:
        raise UserError(f"eval.suites: no suite '{name}'; shipped: {', '.join(shipped_names())} (or a path to a YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
        return Suite.model_validate(data)
    except yaml.YAMLError as e:
        raise UserError(f"eval.suites: {path} is not valid YAML: {e}") from None
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = list(e["loc"])
            if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
                case_id = (data.get("cases") or [{}])[loc[1]].get("id", loc[1]) if isinstance(data, dict) else loc[1]
                loc[1] = f"[{case_id}]"
            problems.append(f"{'.'.join(map(str, loc))}: {e['msg']}")
        valid = ", ".join(Checks.model_fields)
        raise UserError(f"eval.suites: {path} has problems: {'; '.join(problems)} (valid checks: {valid})") from None


# --- checks: (answer, argument, case, refusal) -> bool -----------------------------------------


def _numbered(answer: str, n: int) -> bool:
    nums = [int(m) for m in re.findall(r"(?m)^\s*(\d+)[.)]\s+\S", answer)]
    return len(nums) >= n and nums[:n] == list(range(1, n + 1))


def _bullets(answer: str, n: int) -> bool:
    return len(re.findall(r"(?m)^\s*[-*•]\s+\S", answer)) >= n


def _json(answer: str, want: bool | list[str]) -> bool:
    text = answer.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fence:
        text = fence.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return not want
    if isinstance(want, list):
        return isinstance(value, dict) and all(k in value for k in want)
    return bool(want)


def _has_fact(answer: str, fact: str) -> bool:
    if re.fullmatch(NUMBER, fact):
        return re.search(rf"(?<![\w.]){re.escape(fact)}(?![\w]|\.\d)", answer) is not None
    return fact in answer


def numbers_in(text: str) -> list[str]:
    return [m.lstrip("+") for m in re.findall(NUMBER, text)]


def is_refusal(answer: str, patterns: list[str]) -> bool:
    return any(re.search(p, answer, flags=re.I) for p in patterns)


def check(answer: str, case: Case, refusal_patterns: list[str]) -> list[str]:
    """Names of the checks this answer fails (empty = the case passes)."""
    c, failed = case.checks, []
    words = len(answer.split())
    tests = {
        "numbered_list": lambda: _numbered(answer, c.numbered_list),
        "bullet_list": lambda: _bullets(answer, c.bullet_list),
        "valid_json": lambda: _json(answer, c.valid_json),
        "max_words": lambda: words <= c.max_words,
        "min_words": lambda: words >= c.min_words,
        "max_chars": lambda: len(answer) <= c.max_chars,
        "contains": lambda: all(t.lower() in answer.lower() for t in c.contains),
        "not_contains": lambda: not any(t.lower() in answer.lower() for t in c.not_contains),
        "preserves": lambda: all(_has_fact(answer, f) for f in c.preserves),
        "preserves_numbers": lambda: all(_has_fact(answer, n) for n in numbers_in(case.source or case.prompt)),
        "refuses": lambda: is_refusal(answer, refusal_patterns) == c.refuses,
    }
    for name, test in tests.items():
        value = getattr(c, name)
        if value is None or value == [] or value is False and name == "preserves_numbers":
            continue
        if not test():
            failed.append(name)
    return failed


def score(suites: list[Suite], answers: dict[str, list[str]], refusal_patterns: list[str]) -> tuple[dict, list[dict]]:
    """Per-suite pass rates + ``overall``, and one row per case (for suites.jsonl)."""
    scores, rows = {}, []
    for suite in suites:
        results = [check(a, case, refusal_patterns) for a, case in zip(answers[suite.name], suite.cases, strict=True)]
        scores[suite.name] = round(sum(not f for f in results) / len(results), 4)
        for case, answer, failed in zip(suite.cases, answers[suite.name], results, strict=True):
            rows.append({"suite": suite.name, "id": case.id, "answer": answer, "passed": not failed, "failed": failed})
    if scores:
        scores["overall"] = round(sum(scores.values()) / len(scores), 4)
    return scores, rows
