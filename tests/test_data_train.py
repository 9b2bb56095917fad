"""Each shape in each file format trains with model=tiny from config alone (one step)."""

from __future__ import annotations

import json

import pytest
from conftest import ASSETS, compose, run_engine
from test_data import write_rows

from engine.pipeline import run

SHORT = [
    "model=tiny",
    "train.max_steps=1",
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.plot=false",
    "stages=[prepare_data,train]",
]
N = 12


def turn(i: int) -> tuple[str, str]:
    return f"What is wetland type {i}?", f"Wetland type {i} is a marsh."


# shape -> (data preset it starts from, extra overrides, rows)
CASES = {
    "instruction": ("env_science_qa", [], [{"instruction": turn(i)[0], "input": "", "output": turn(i)[1]} for i in range(N)]),
    "qa": ("env_numeric", [], [{"question": turn(i)[0], "answer": turn(i)[1]} for i in range(N)]),
    "qa_fields": (
        "env_numeric",
        ["data.fields.prompt=q", "data.fields.response=a"],
        [{"q": turn(i)[0], "a": turn(i)[1]} for i in range(N)],
    ),
    "chat": (
        "env_science_chat",
        [],
        [{"messages": [{"role": "user", "content": turn(i)[0]}, {"role": "assistant", "content": turn(i)[1]}]} for i in range(N)],
    ),
    "sharegpt": (
        "sharegpt",
        [],
        [{"conversations": [{"from": "human", "value": turn(i)[0]}, {"from": "gpt", "value": turn(i)[1]}]} for i in range(N)],
    ),
    "text": ("text", [], [{"text": " ".join(turn(i))} for i in range(N)]),
}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("shape", sorted(CASES))
def test_shape_in_format_trains(shape, fmt, tmp_path):
    preset, extra, rows = CASES[shape]
    path = write_rows(rows, fmt, tmp_path / f"data.{fmt}")
    cfg = compose([*SHORT, f"data={preset}", f"data.path={path}", *extra])
    ctx = run(cfg, tmp_path / "run")
    prep, train = ctx.metrics["prepare_data"], ctx.metrics["train"]
    assert prep["rows_used"] == N and prep["rows_rejected"] == 0
    assert prep["train_examples"] + prep["validation_examples"] + prep["test_examples"] == N
    assert train["steps"] == 1 and train["final_loss"] > 0


def test_save_to_disk_folder_trains(tmp_path):
    path = write_rows(CASES["qa"][2], "disk", tmp_path / "ds")
    ctx = run(compose([*SHORT, "data=env_numeric", f"data.path={path}"]), tmp_path / "run")
    assert ctx.metrics["prepare_data"]["rows_used"] == N


def test_documents_folder_trains_with_packing(tmp_path):
    ctx = run(compose([*SHORT, "data=documents"]), tmp_path / "run")
    prep = ctx.metrics["prepare_data"]
    assert prep["documents_used"] == 4 and (tmp_path / "run" / "documents.json").exists()
    assert prep["padding_efficiency"] >= 0.9 and ctx.metrics["train"]["steps"] == 1


@pytest.mark.slow
def test_broken_csv_trains_from_the_cli_and_reports(tmp_path):
    out = tmp_path / "run"
    r = run_engine(
        *SHORT,
        "data=env_numeric",
        f"data.path={ASSETS / 'data' / 'broken.csv'}",
        "data.split={train: 1.0, validation: 0.0, test: 0.0}",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prepare_data"]["rejected_by_reason"] == {
        "wrong column count": 2,
        "empty field": 2,
        "duplicate": 1,
        "undecodable": 1,
    }
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 6
    assert metrics["train"]["steps"] == 1
    assert "6 rejected -> rejected.jsonl" in r.stdout


@pytest.mark.slow
def test_preview_from_the_cli(tmp_path):
    out = tmp_path / "run"
    r = run_engine("model=tiny", "stages=[prepare_data,preview_data]", "data.preview=5", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    text = (out / "preview.txt").read_text()
    assert text.count("--- example") == 5
    # Only the answer (and its end-of-turn) is trained on; the prompt is outside the markers.
    assert "[[<|im_start|>" not in text and "<|im_start|>assistant\n[[" in text
    assert text in r.stdout.replace("\r", "") or text.strip() in r.stdout
