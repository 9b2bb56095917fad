"""Generate env_science_preference.jsonl: preference pairs on the environmental-science questions.

Each row is ``{"prompt", "chosen", "rejected", "flaw"}``. The prompt and the chosen answer are a
question and its answer from env_science_qa.jsonl (correct, concise, the house style). The
rejected answer is a flawed version, of one of four kinds (``flaw``):

* ``number``: the answer with its figure changed to a made-up one (a year moved by decades, a
  percentage or quantity scaled);
* ``fact``: the answer with one word turned into its opposite (warming -> cooling, absorbs ->
  releases ...), which makes the statement false while it still reads fluently;
* ``off_topic``: a correct answer to another question of a different topic;
* ``rambling``: a long, vague non-answer that repeats the question's subject;
* ``evasive``: a one-line non-answer ("It depends on many factors."). A base model tends to
  prefer these (a short text has a high total probability): the pairs it gets wrong.

Deterministic (no randomness but a seeded order): ``python engine/samples/make_preference.py``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20
PAIRS = 150
FACTS = 60

# One swap per answer makes it false; words are matched whole and case-sensitively.
OPPOSITES = {
    "warming": "cooling",
    "cooling": "warming",
    "warmer": "cooler",
    "increases": "decreases",
    "decreases": "increases",
    "increasing": "decreasing",
    "increased": "decreased",
    "reduces": "raises",
    "reducing": "raising",
    "reduce": "raise",
    "absorbs": "releases",
    "absorb": "release",
    "releases": "absorbs",
    "rises": "falls",
    "rising": "falling",
    "falling": "rising",
    "higher": "lower",
    "lower": "higher",
    "more": "less",
    "less": "more",
    "fewer": "more",
    "faster": "slower",
    "slower": "faster",
    "slowly": "quickly",
    "northward": "southward",
    "southward": "northward",
    "stronger": "weaker",
    "weaker": "stronger",
    "protects": "harms",
    "protect": "harm",
    "improves": "worsens",
    "improve": "worsen",
    "removes": "adds",
    "remove": "add",
    "traps": "lets out",
    "acidic": "alkaline",
    "thinning": "thickening",
    "renewable": "non-renewable",
    "large": "small",
    "larger": "smaller",
    "smaller": "larger",
}

EVASIVE = [
    "It depends on many factors.",
    "That is hard to say.",
    "Scientists are still debating this.",
    "It is complicated, and there is no single answer.",
    "You should look that up in a textbook.",
    "Nobody really knows for sure.",
]

RAMBLING = [
    "That is a really interesting question, and {topic} is something people talk about a lot. There are many "
    "different views, and a lot depends on the situation, the place and who you ask, so it is hard to say anything "
    "definite. In general it is a complex topic with many factors involved, and it is always worth reading more "
    "about it and keeping an open mind before drawing conclusions.",
    "Well, when it comes to {topic}, there are many things to consider. Some experts say one thing and others say "
    "something else, and the science keeps changing over time. It really depends on many factors, and everyone "
    "should think about it carefully and do their own research, because the environment matters to all of us.",
    "Great question! In a way, {topic} is part of the bigger picture of how our planet works, and the planet is a very "
    "complicated system. Nature is full of connections, and everything affects everything else in some way, so "
    "it would be too simple to give one answer. The important thing is to stay curious and to learn more about it.",
    "There is no simple answer about {topic}. It has been discussed for many years by scientists, governments and "
    "ordinary people, and opinions differ a lot. Some aspects are well understood and others are not, and the "
    "details vary from one case to another, so it is best to look at each situation on its own.",
]


def topic_of(question: str) -> str:
    """The subject of a "What is X?" question ("drip irrigation"), else "this topic"."""
    m = re.fullmatch(r"What (?:is|are) ((?:the |a |an )?[^,?]+)\?", question)
    return m.group(1) if m else "this topic"


def made_up_number(answer: str) -> str | None:
    """The answer with its first figure changed (a year by decades, other figures scaled)."""
    m = re.search(r"(?<![\w.])(\d+(?:[.,]\d+)?)(?![\w])", answer)
    if not m:
        return None
    raw = m.group(1)
    value = float(raw.replace(",", ""))
    percent = re.match(r"\s*(?:%|percent)", answer[m.end(1) :]) is not None
    if raw.isdigit() and 1000 <= value <= 2100:  # a year
        new = str(int(value) - 40 if value > 1900 else int(value) + 60)
    elif "." in raw:  # a fraction or a rate: four times smaller or larger
        scaled = value * 4 if value * 4 < 1 or value >= 1 else value / 4
        new = f"{scaled:.{len(raw.split('.')[1])}f}"
    elif percent:  # a share stays a share
        new = str(int(value) * 2) if value * 2 <= 100 else str(int(value) // 3)
    elif value <= 10:
        new = str(int(value) * 5)
    else:
        new = str(int(value) * 3) if value < 100 else str(int(value) // 4)
    return answer[: m.start(1)] + new + answer[m.end(1) :] if new != raw else None


def factual_error(answer: str) -> str | None:
    """The answer with the first word that has an opposite turned into it."""
    for m in re.finditer(r"[A-Za-z-]+", answer):
        if m.group() in OPPOSITES:
            return answer[: m.start()] + OPPOSITES[m.group()] + answer[m.end() :]
    return None


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "env_science_qa.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r["input"]]  # the question alone is the prompt
    rng = random.Random(SEED)
    rng.shuffle(rows)
    rows = rows[:PAIRS]
    out = []
    # Every answer with a figure gets a made-up one; up to FACTS others get a word turned into its
    # opposite; the rest alternate between another question's answer and a non-answer (evasive or rambling).
    facts = 0
    for i, row in enumerate(rows):
        question, answer = row["instruction"], row["output"]
        rejected, flaw = made_up_number(answer), "number"
        if rejected is None and facts < FACTS:
            rejected, flaw = factual_error(answer), "fact"
            facts += rejected is not None
        if rejected is None and i % 2:
            rejected, flaw = rows[(i + len(rows) // 2) % len(rows)]["output"], "off_topic"
        elif rejected is None and i % 4 == 0:
            rejected, flaw = EVASIVE[i // 4 % len(EVASIVE)], "evasive"
        elif rejected is None:
            topic = topic_of(question)
            rejected, flaw = RAMBLING[i // 4 % len(RAMBLING)].format(topic=topic), "rambling"
        out.append({"prompt": question, "chosen": answer, "rejected": rejected, "flaw": flaw})
    path = HERE / "env_science_preference.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    counts: dict[str, int] = {}
    for r in out:
        counts[r["flaw"]] = counts.get(r["flaw"], 0) + 1
    print(f"wrote {len(out)} pairs to {path.name}: {counts}")


if __name__ == "__main__":
    main()
