"""data.streaming: the train file read as a stream; its position restored exactly after a crash."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUICK_TRAIN, TINY_TOKENIZER, compose, run_cli
from test_data import write_rows

from engine.data import prepare
from engine.data.spec import DataSpec
from engine.data.stream import TrainStream


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    t.pad_token = t.pad_token or t.eos_token
    return t


def rows(n: int) -> list:
    out = [{"instruction": f"What is wetland type {i}?", "input": "", "output": "A marsh. " * (1 + i % 5)} for i in range(n)]
    return [*out, {"instruction": "no output"}]  # a bad row, counted


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
@pytest.mark.parametrize("packing", [False, True])
def test_a_restored_stream_continues_with_the_same_batches(fmt, packing, tok, tmp_path):
    """Across epochs and buffer refills: batches after state() equal those of a stream started from it."""
    path = write_rows(rows(23), fmt, tmp_path / f"d.{fmt}")
    spec = DataSpec(kind="instruction", path=str(path), streaming=True, shuffle_buffer=5, packing=packing, max_length=48)
    bundle = prepare(spec, tok, seed=0)
    train = bundle.splits["train"]
    assert isinstance(train, TrainStream) and bundle.metrics["train_examples"] is None
    kw = {"micro_batch_size": 3, "pad_id": tok.pad_token_id, "seed": 7, "packing": packing}
    first = train.batches(**kw)
    for _ in range(11):  # past the end of the file: a second epoch
        next(first)
    state = json.loads(json.dumps(first.state()))  # what a checkpoint's state.json holds
    assert state["epoch"] >= 1 and sum(state["rejected"].values()) == state["epoch"]  # the bad row, once an epoch
    expected = [next(first) for _ in range(9)]
    resumed = train.batches(**kw, state=state)
    assert all(same(a, next(resumed)) for a in expected)
    # Another seed draws another order.
    other = train.batches(**{**kw, "seed": 8})
    fresh = train.batches(**kw)
    assert not all(same(next(other), next(fresh)) for _ in range(4))


def test_ranks_take_alternate_batches_of_one_stream(tok, tmp_path):
    path = write_rows(rows(20), "jsonl", tmp_path / "d.jsonl")
    train = prepare(DataSpec(kind="instruction", path=str(path), streaming=True, shuffle_buffer=4), tok, seed=0).splits["train"]
    kw = {"micro_batch_size": 2, "pad_id": tok.pad_token_id, "seed": 0}
    one = train.batches(**kw)
    both = [train.batches(**kw, rank=r, world=2) for r in (0, 1)]
    for _ in range(5):
        assert same(next(one), next(both[0])) and same(next(one), next(both[1]))


def test_held_out_files_are_prepared_and_kept_out_of_the_stream(tok, tmp_path):
    data = rows(12)
    path = write_rows(data, "jsonl", tmp_path / "d.jsonl")
    with open(path, "ab") as f:
        f.write(b"\n{broken\n")  # a blank line (not a row), then line 15: not JSON
    val = write_rows(data[:3], "jsonl", tmp_path / "v.jsonl")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = DataSpec(kind="instruction", path=str(path), validation_path=str(val), streaming=True)
    bundle = prepare(spec, tok, seed=0, run_dir=run_dir)
    assert len(bundle.splits["validation"]) == 3 and bundle.metrics["streaming"] is True
    batches = bundle.splits["train"].batches(micro_batch_size=9, pad_id=tok.pad_token_id, seed=0)
    next(batches), next(batches)  # every row of the first epoch drawn
    rejected = batches.state()["rejected"]
    assert rejected["duplicate across splits"] >= 3 and rejected["missing field"] >= 1
    assert len(bundle.splits["train"][:4]) == 4  # what preview_data prints: the first rows
    # Each row skipped in the first pass is reported once, with its row number, reason and content.
    report = [json.loads(line) for line in (run_dir / "rejected_stream.jsonl").read_text().splitlines()]
    by_row = {r["row"]: r for r in report}
    assert len(by_row) == len(report) == 5 and set(by_row) == {0, 1, 2, 12, 13}
    assert {by_row[i]["reason"] for i in (0, 1, 2)} == {"duplicate across splits"}
    assert by_row[0]["data"][1]["content"] == data[0]["output"].strip()
    assert by_row[12]["reason"] == "missing field" and by_row[12]["data"] == {"instruction": "no output"}
    assert by_row[13]["reason"] == "invalid JSON" and by_row[13]["detail"].startswith("line 15:")
    assert {r["file"] for r in report} == {"d.jsonl"}  # named, not a local path


def test_a_resumed_stream_reports_each_skipped_row_once(tok, tmp_path):
    """Rows skipped after a checkpoint are met again on resume: the report is cut back to the
    checkpoint's count first, so it ends as an uninterrupted run's does."""
    path = write_rows(rows(20), "jsonl", tmp_path / "d.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[12:12] = [b"{broken two\n"]
    lines[3:3] = [b"{broken one\n"]
    path.write_bytes(b"".join(lines))
    run = tmp_path / "run"
    run.mkdir()
    spec = DataSpec(kind="instruction", path=str(path), streaming=True, shuffle_buffer=4)
    train = prepare(spec, tok, seed=0, run_dir=run).splits["train"]
    report = run / "rejected_stream.jsonl"
    kw = {"micro_batch_size": 2, "pad_id": tok.pad_token_id, "seed": 3}
    whole = train.batches(**kw)
    while whole.epoch == 0 or whole.batch_index < 14:  # the whole first pass, and into the second
        next(whole)
    expected = report.read_text()
    assert sorted(json.loads(x)["reason"] for x in expected.splitlines()) == ["invalid JSON", "invalid JSON", "missing field"]

    crashed = train.batches(**kw)  # a new run: the report starts empty
    assert report.read_text() == ""
    next(crashed)
    state = json.loads(json.dumps(crashed.state()))
    while crashed.reported == state["reported"] or crashed.epoch == 0:  # skipped rows past the checkpoint
        next(crashed)
    resumed = train.batches(**kw, state=state)
    while resumed.epoch == 0 or resumed.batch_index < 14:
        next(resumed)
    assert report.read_text() == expected


def test_streaming_config_errors_exit_2(tmp_path):
    path = write_rows(rows(4), "json", tmp_path / "d.json")
    r = run_cli("model=tiny", "data=instruction", f"data.path={path}", "data.streaming=true")
    assert r.returncode == 2 and "data.streaming" in r.stderr and "Traceback" not in r.stderr
    jsonl = write_rows(rows(4), "jsonl", tmp_path / "d.jsonl")
    r = run_cli(
        "model=tiny", "data=instruction", f"data.path={jsonl}", "data.streaming=true", "train.max_steps=null", "train.epochs=1"
    )
    assert r.returncode == 2 and "train.max_steps" in r.stderr


def test_kill_and_resume_on_a_stream_is_bit_identical(tmp_path, monkeypatch):
    """Streamed and packed, a buffer smaller than the file: killed after step 5, resumed from step-4, same adapter."""
    from accelerate.state import AcceleratorState

    import engine.train.checkpoint as ckpt_io
    from engine.pipeline import run

    path = write_rows(rows(30), "jsonl", tmp_path / "d.jsonl")
    path.write_bytes(b"\n{broken\n" + path.read_bytes())  # a blank line, then row 0 on line 2: not JSON
    cfg = compose(
        [
            *QUICK_TRAIN,
            "data=instruction",
            f"data.path={path}",
            "data.streaming=true",
            "data.shuffle_buffer=6",
            "data.packing=true",
            "data.max_length=64",
            "stages=[prepare_data,train]",
            "train.max_steps=8",
            "train.save_every=2",
        ]
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    run(cfg, tmp_path / "whole")

    def die_after_step_5(where: str, step: int) -> None:
        if (where, step) == ("step", 5):
            raise RuntimeError("killed")

    monkeypatch.setattr(ckpt_io, "crash_point", die_after_step_5)
    resumed = tmp_path / "resumed"
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, resumed)
    state = json.loads((resumed / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["stream"]["batch"] == 4 and state["stream"]["buffer"]
    monkeypatch.setattr(ckpt_io, "crash_point", lambda where, step: None)
    AcceleratorState._reset_state(reset_partial_state=True)
    ctx = run(cfg, resumed)
    assert ctx.metrics["train"]["resumed_from_step"] == 4
    same_bytes = (resumed / "adapter" / "adapter_model.safetensors").read_bytes()
    assert same_bytes == (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    losses = [
        [json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()] for d in (resumed, tmp_path / "whole")
    ]
    assert losses[0] == losses[1]
    # The rows the stream skipped: reported once each, the same after a kill and a resume.
    reports = [(d / "rejected_stream.jsonl").read_text() for d in (resumed, tmp_path / "whole")]
    skipped = [json.loads(x) for x in reports[0].splitlines()]
    assert reports[0] == reports[1] and [(r["row"], r["reason"]) for r in skipped] == [(0, "invalid JSON")]
    assert skipped[0]["detail"].startswith("line 2:") and skipped[0]["file"] == "d.jsonl"
    assert ctx.metrics["train"]["stream_rows_skipped"]["invalid JSON"] >= 1
