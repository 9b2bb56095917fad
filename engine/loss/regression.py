"""``ce_regression``: cross-entropy plus a regression term on a number in the answer.

Why: CE treats "0.42" vs "0.43" and "0.42" vs "-0.9" as equally wrong; a numeric term tells
the model how far off it is. The prediction must carry gradient, so it is not a parse of
argmax text: it is the *expected value* of the number under the model's own next-token
distributions at the number's positions (teacher-forced, like CE):

    pred = (1 - 2 * P(minus sign)) * sum_k E[value of digit token k] * 10^place(k)

* the sign: at the position that chooses how the number starts (after its leading
  whitespace), P(minus) is the probability of a minus-shaped token (``-``, `` -``, ``-4`` ...);
* each digit token: a softmax restricted to the tokens of the same shape (same leading
  whitespace, same number of digits: ``"4"`` competes with ``"0"..."9"``, ``"05"`` with the
  other two-digit tokens), and its expected value, times its place value.
Digit characters inside tokens of another shape (``"0.4"`` as one token) count as constants.

The number is located in each answer (a contiguous run of labelled tokens) with a regex over
its decoded text; answers with no parsable number contribute CE only, and are counted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from engine.loss.ce import LOSSES, CESpec, CrossEntropy

_SHAPE = re.compile(r"(\s*)(-?)(\d+)")
_MINUS = re.compile(r"\s*-\d*")


class RegressionSpec(CESpec):
    weight: float = Field(10.0, ge=0)
    """lambda in CE + lambda * error; 10 as in the seed experiment (values in [-1, 1])."""
    error: Literal["mse", "mae", "huber"] = "mse"
    """Regression error between predicted and target value."""
    huber_delta: float = Field(0.25, gt=0)
    """Huber: quadratic below this absolute error, linear above."""
    pattern: str = r"-?\d+(?:\.\d+)?"
    """Regex locating the value in the decoded answer; a group named ``value`` narrows it."""
    occurrence: Literal["first", "last"] = "last"
    """Which match counts when the answer has several numbers."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"is not a valid regular expression: {e}") from e
        return value


@dataclass(frozen=True)
class Target:
    """Where one answer's number is, relative to the answer's first token."""

    value: float
    sign_at: int
    """Answer-relative index of the token that starts the number (its sign or first digit)."""
    digits: tuple[tuple[int, tuple, float], ...]
    """(answer-relative token index, token shape class, place value of its last digit)."""
    constant: float
    """Magnitude contributed by digits inside tokens that are not modelled."""


class NumberVocab:
    """The tokenizer's number-shaped tokens: shape class -> (ids, values); minus-sign ids."""

    def __init__(self, tokenizer):
        classes: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        minus: list[int] = []
        raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        for i, tok in enumerate(raw):
            # Digits and '-' survive every tokenizer's raw spelling; decode only those candidates.
            if tok is None or not any(c.isdigit() or c == "-" for c in tok):
                continue
            text = tokenizer.decode([i])
            if _MINUS.fullmatch(text):
                minus.append(i)
            m = _SHAPE.fullmatch(text)
            if m:
                classes[(m[1], m[2], len(m[3]))].append((i, int(m[3])))
        self.classes = dict(classes)
        self.minus = minus

    @staticmethod
    def shape(text: str) -> tuple | None:
        m = _SHAPE.fullmatch(text)
        return (m[1], m[2], len(m[3])) if m else None


class CERegression:
    """CE + weight x error(expected value, target value); parts log both terms separately."""

    def __init__(self, spec: RegressionSpec, tokenizer):
        if tokenizer is None:
            raise ValueError("ce_regression needs the tokenizer to locate numbers in answers")
        self.spec = spec
        self.ce = CrossEntropy(spec)
        self.tokenizer = tokenizer
        self.vocab = NumberVocab(tokenizer)
        self.pattern = re.compile(spec.pattern)
        self._cache: dict[tuple[int, ...], Target | None] = {}
        self._tensors: dict = {}

    # -- locating the number ------------------------------------------------------------
    def parse(self, ids: tuple[int, ...]) -> Target | None:
        """Find the value in one answer's tokens (cached: the same answers recur every epoch)."""
        if ids not in self._cache:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[ids] = self._parse(ids)
        return self._cache[ids]

    def _parse(self, ids: tuple[int, ...]) -> Target | None:
        pieces = [self.tokenizer.decode([i]) for i in ids]
        starts, pos = [], 0
        for p in pieces:
            starts.append(pos)
            pos += len(p)
        text = "".join(pieces)
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        m = matches[-1] if self.spec.occurrence == "last" else matches[0]
        s, e = m.span("value") if "value" in self.pattern.groupindex else m.span()
        try:
            value = float(text[s:e])
        except ValueError:
            return None
        number = text[s:e].lstrip("+-")
        s_digits = e - len(number)  # first char of the magnitude
        point = number.find(".") if "." in number else len(number)

        def place(c: int) -> int:  # decimal exponent of the digit at absolute char c
            r = c - s_digits
            return point - r - 1 if r < point else -(r - point)

        lead = s
        while lead > 0 and text[lead - 1].isspace():
            lead -= 1
        sign_at, digits, constant = None, [], 0.0
        for j, (p, a) in enumerate(zip(pieces, starts, strict=True)):
            b = a + len(p)
            if b <= lead or a >= e or not p:
                continue
            if sign_at is None:
                sign_at = j
            shape = NumberVocab.shape(p)
            if shape is not None and a >= lead and b <= e and shape in self.vocab.classes:
                digits.append((j, shape, 10.0 ** place(b - 1)))
                continue
            for c in range(max(a, s_digits), min(b, e)):
                if text[c].isdigit():
                    constant += int(text[c]) * 10.0 ** place(c)
        if sign_at is None:
            return None
        return Target(value, sign_at, tuple(digits), constant)

    # -- the loss -----------------------------------------------------------------------
    def __call__(self, hidden, labels, lm_head, batch=None):
        import torch.nn.functional as F

        ce, parts = self.ce(hidden, labels, lm_head, batch)
        found, pred, missing = self.predict(hidden, labels, lm_head)
        parts.update(reg_values=len(found), reg_missing=missing)
        if pred is None:
            parts["reg"] = 0.0
            return ce, parts
        target = pred.new_tensor([t.value for _, _, t in found])
        if self.spec.error == "mse":
            reg = F.mse_loss(pred, target)
        elif self.spec.error == "mae":
            reg = F.l1_loss(pred, target)
        else:
            reg = F.huber_loss(pred, target, delta=self.spec.huber_delta)
        parts.update(reg=reg.detach().item(), reg_abs_err=(pred - target).abs().mean().item())
        return ce + self.spec.weight * reg, parts

    def read(self, hidden, labels, lm_head) -> list[float | None]:
        """Per row: the expected value of the (last) answer's number, or None if it has none.

        The same quantity the loss trains, read at evaluation time with the model's own
        answer as ``labels``: for squared error it is the Bayes-optimal point prediction,
        where greedy text picks the single likeliest digits (engine/evaluation/numeric.py).
        """
        found, pred, _ = self.predict(hidden, labels, lm_head)
        out: list[float | None] = [None] * labels.shape[0]
        for (b, _, _), v in zip(found, pred.tolist() if pred is not None else [], strict=True):
            out[b] = v
        return out

    def predict(self, hidden, labels, lm_head):
        """(found [(row, answer start, Target)], expected values [len(found)] or None, missing count)."""
        import torch

        found, missing = [], 0
        for b in range(labels.shape[0]):
            for start, ids in _answers(labels[b]):
                target = self.parse(ids)
                # The token that starts the number is predicted from the position before it.
                if target is None or start + target.sign_at < 1:
                    missing += 1
                    continue
                found.append((b, start, target))
        if not found:
            return found, None, missing

        # Gather the hidden states that predict sign and digit tokens; project only those.
        rows, cols = [], []
        for b, start, t in found:
            rows.append(b)
            cols.append(start + t.sign_at - 1)
            for j, _, _ in t.digits:
                rows.append(b)
                cols.append(start + j - 1)
        logits = lm_head(hidden[rows, cols]).float()
        device = logits.device
        minus = self._ids("minus", self.vocab.minus, device)
        preds, k = [], 0
        for _, _, t in found:
            sign_row = logits[k]
            k += 1
            p_minus = torch.softmax(sign_row, -1)[minus].sum() if minus.numel() else sign_row.new_zeros(())
            magnitude = sign_row.new_tensor(t.constant)
            for _, shape, scale in t.digits:
                ids, values = self._class(shape, device)
                p = torch.softmax(logits[k, ids], -1)
                magnitude = magnitude + (p * values).sum() * scale
                k += 1
            preds.append((1 - 2 * p_minus) * magnitude)
        return found, torch.stack(preds), missing

    def _ids(self, key, ids: list[int], device):
        if (key, device) not in self._tensors:
            import torch

            self._tensors[key, device] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._tensors[key, device]

    def _class(self, shape: tuple, device):
        if (shape, device) not in self._tensors:
            import torch

            ids, values = zip(*self.vocab.classes[shape], strict=True)
            self._tensors[shape, device] = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )
        return self._tensors[shape, device]


def _answers(row_labels):
    """(start, token ids) of each contiguous run of labelled positions: one answer each."""
    idx = (row_labels != -100).nonzero().flatten().tolist()
    runs, begin = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            if begin < i:
                start = idx[begin]
                runs.append((start, tuple(row_labels[start : idx[i - 1] + 1].tolist())))
            begin = i
    return runs


@LOSSES.register("ce_regression", RegressionSpec)
def build_ce_regression(spec: RegressionSpec, *, tokenizer=None):
    """CE + weight x (mse|mae|huber) on the number in each answer (expected-value prediction)."""
    return CERegression(spec, tokenizer)
