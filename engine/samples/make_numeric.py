"""Generate env_numeric.jsonl, a small regression dataset for engine.

Each row describes one to three percentage changes to environmental drivers
and asks for the net effect on an outcome on a -1..1 scale. The target is a
deterministic function of the stated numbers (see README.md):

    score = clip(sum(sign_i * change_i) / 100, -1, 1)

where change_i is the stated percentage (positive for a rise, negative for a
fall) and sign_i is +1 for a driver that benefits the outcome and -1 for one
that harms it. The answer is always written as "Score: X.XX".

Run from anywhere:  python engine/samples/make_numeric.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
N_ROWS = 300
OUT = Path(__file__).resolve().parent / "env_numeric.jsonl"

# outcome -> (benefit drivers, harm drivers). Each driver belongs to exactly
# one outcome so its sign is never ambiguous.
OUTCOMES: dict[str, tuple[list[str], list[str]]] = {
    "water quality": (
        [
            "forest cover in the watershed",
            "wetland area",
            "the length of riparian buffer strips",
            "wastewater treatment capacity",
        ],
        ["fertiliser use", "livestock numbers", "paved surface area", "the number of sewage overflows", "manure spreading"],
    ),
    "air quality": (
        ["public transit ridership", "urban tree canopy", "the number of daily cycling trips", "the electric bus fleet"],
        ["car traffic", "coal power generation", "industrial smokestack emissions", "wood stove use", "diesel truck traffic"],
    ),
    "biodiversity": (
        ["protected area", "native habitat area", "hedgerow length", "wildflower margins on farms"],
        ["pesticide use", "road density", "invasive species cover", "grazing pressure", "artificial light at night"],
    ),
    "soil health": (
        ["cover crop planting", "compost application", "no-till area", "crop rotation diversity"],
        ["tillage intensity", "bare fallow area", "heavy machinery traffic", "irrigation with salty water"],
    ),
    "the climate": (
        ["renewable electricity generation", "building insulation", "reforested land", "rail freight"],
        ["coal consumption", "air travel", "the cattle herd", "natural gas flaring"],
    ),
    "ocean health": (
        ["marine protected area", "seagrass meadow area", "mangrove cover"],
        ["fishing effort", "plastic waste entering the sea", "nutrient runoff to the coast", "bottom trawling"],
    ),
}

PLACES = [
    "a river catchment",
    "a coastal city",
    "a farming district",
    "a mountain valley",
    "an island nation",
    "a lowland watershed",
    "an industrial town",
    "a national park region",
    "a small country",
    "a metropolitan area",
    "a delta region",
    "a rural county",
]

UP = ["rises by", "increases by", "grows by", "goes up by", "expands by"]
DOWN = ["falls by", "drops by", "decreases by", "is cut by", "declines by"]
UP_PLURAL = ["rise by", "increase by", "grow by", "go up by", "expand by"]
DOWN_PLURAL = ["fall by", "drop by", "decrease by", "are cut by", "decline by"]
PLURAL_DRIVERS = {"livestock numbers", "industrial smokestack emissions", "wildflower margins on farms"}

QUESTION_TEMPLATES = [
    "{changes}. Rate the net effect on {outcome} from -1 (much worse) to 1 (much better).",
    "In {place}, {changes}. On a scale from -1 (much worse) to 1 (much better), how does {outcome} change overall?",
    "Scenario: {changes}. Score the overall impact on {outcome} between -1 and 1, where -1 is much worse and 1 is much better.",
    "{changes}. What is the net effect on {outcome}? Answer with a score from -1 (much worse) to 1 (much better).",
    "Over ten years in {place}, {changes}. Give a score from -1 to 1 for the change in {outcome} (1 means much better).",
    "Consider {place} where {changes}. How much better or worse is {outcome}, on a -1 to 1 scale?",
]


def fmt_pct(value: int, rng: random.Random) -> str:
    return f"{value}%" if rng.random() < 0.6 else f"{value} percent"


def describe(driver: str, change: int, rng: random.Random) -> str:
    if driver in PLURAL_DRIVERS:
        verb = rng.choice(UP_PLURAL if change > 0 else DOWN_PLURAL)
    else:
        verb = rng.choice(UP if change > 0 else DOWN)
    return f"{driver} {verb} {fmt_pct(abs(change), rng)}"


def join_changes(parts: list[str], rng: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + rng.choice([" while ", " and ", ", and ", " whereas "]) + parts[1]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def score_of(terms: list[tuple[int, int]]) -> float:
    """terms: (sign, signed percentage change). Returns the clipped score."""
    total = sum(sign * change for sign, change in terms) / 100.0
    return max(-1.0, min(1.0, total))


def fmt_score(score: float) -> str:
    text = f"{score:.2f}"
    return "0.00" if text == "-0.00" else text


def make_row(rng: random.Random) -> dict[str, str]:
    outcome = rng.choice(sorted(OUTCOMES))
    benefit, harm = OUTCOMES[outcome]
    n_drivers = rng.choices([1, 2, 3], weights=[20, 65, 15])[0]
    pool = [(d, 1) for d in benefit] + [(d, -1) for d in harm]
    chosen = rng.sample(pool, n_drivers)
    max_step = {1: 16, 2: 10, 3: 6}[n_drivers]  # multiples of 5 up to 80 / 50 / 30
    terms, parts = [], []
    for driver, sign in chosen:
        change = 5 * rng.randint(1, max_step) * rng.choice([1, -1])
        terms.append((sign, change))
        parts.append(describe(driver, change, rng))
    changes = join_changes(parts, rng)
    template = rng.choice(QUESTION_TEMPLATES)
    question = template.format(changes=changes, outcome=outcome, place=rng.choice(PLACES))
    question = question[0].upper() + question[1:]
    return {"question": question, "answer": f"Score: {fmt_score(score_of(terms))}"}


def main() -> None:
    rng = random.Random(SEED)
    rows, seen = [], set()
    while len(rows) < N_ROWS:
        row = make_row(rng)
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        rows.append(row)
    with OUT.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
