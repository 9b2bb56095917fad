"""The prepared-data cache: keyed by what changes the examples, equal to the in-memory path,
written atomically, replayed on a hit (rejected.jsonl too), and resumed from bit-identically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import QUICK_TRAIN, ROOT, TINY, TINY_TOKENIZER, compose, run_engine
from test_data import write_rows

from engine.data import prepare, prepare_in_memory
from engine.data.spec import DataSpec
from engine.data.stored import StoredSplit
from engine.files import SAMPLES_DIR

QA = str(SAMPLES_DIR / "env_science_qa.jsonl")
CHAT = str(SAMPLES_DIR / "env_science_chat.jsonl")
PREFERENCE = str(SAMPLES_DIR / "env_science_preference.jsonl")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test its own empty cache ($ENGINE_CACHE)."""
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    t.pad_token = t.pad_token or t.eos_token
    return t


def messy_rows(n: int = 40) -> list:
    """Good rows, a duplicate, a missing field, a wrong type, a prompt too long to leave an answer."""
    rows = [{"instruction": f"What is wetland type {i}?", "input": "", "output": f"Type {i} is a marsh."} for i in range(n)]
    rows += [rows[3], {"instruction": "no output"}, ["a list"], {"instruction": "word " * 400, "output": "cut off"}]
    return rows


def bundles(spec: DataSpec, tok, tmp_path: Path):
    """The same spec through the cache (a miss, then a hit) and in memory, each with its run dir."""
    dirs = {name: tmp_path / name for name in ("miss", "hit", "memory")}
    for d in dirs.values():
        d.mkdir()
    miss = prepare(spec, tok, seed=0, run_dir=dirs["miss"])
    hit = prepare(spec, tok, seed=0, run_dir=dirs["hit"])
    memory = prepare_in_memory(spec, tok, seed=0, run_dir=dirs["memory"])
    return (miss, hit, memory), dirs


def same_examples(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.input_ids, x.labels, x.messages) == (y.input_ids, y.labels, y.messages)
        assert (x.rejected is None) == (y.rejected is None)
        if x.rejected is not None:
            assert (x.rejected.input_ids, x.rejected.labels, x.rejected.messages) == (
                y.rejected.input_ids,
                y.rejected.labels,
                y.rejected.messages,
            )


def without_cache(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(("cache_", "prepare_seconds")) and k != "seconds"}


@pytest.mark.parametrize(
    "case",
    ["messy_instruction", "chat", "preference", "text", "separate_validation", "limit", "csv"],
)
def test_cache_holds_what_the_in_memory_path_prepares(case, tok, tmp_path):
    """Examples, their order, metrics and rejected.jsonl: the same from a miss, a hit and in memory."""
    if case == "messy_instruction":
        spec = DataSpec(kind="instruction", path=str(write_rows(messy_rows(), "jsonl", tmp_path / "d.jsonl")), max_length=64)
    elif case == "chat":
        spec = DataSpec(kind="chat", path=CHAT, template="chatml")
    elif case == "preference":
        spec = DataSpec(kind="preference", path=PREFERENCE, template="chatml", max_length=96)
    elif case == "text":
        rows = [{"text": f"Peat stores carbon, note {i}."} for i in range(30)] + [{"text": ""}]
        spec = DataSpec(kind="text", path=str(write_rows(rows, "jsonl", tmp_path / "t.jsonl")))
    elif case == "separate_validation":
        rows = messy_rows()
        val = str(write_rows(rows[5:12] + [{"instruction": "held out", "output": "only here"}], "jsonl", tmp_path / "v.jsonl"))
        spec = DataSpec(kind="instruction", path=str(write_rows(rows, "jsonl", tmp_path / "d.jsonl")), validation_path=val)
    elif case == "limit":
        spec = DataSpec(kind="instruction", path=QA, limit=17)
    else:
        spec = DataSpec(kind="instruction", path=str(write_rows(messy_rows()[:40], "csv", tmp_path / "d.csv")))
    (miss, hit, memory), dirs = bundles(spec, tok, tmp_path)
    assert miss.metrics["cache_hit"] is False and hit.metrics["cache_hit"] is True
    assert miss.metrics["cache_key"] == hit.metrics["cache_key"]
    for name in ("train", "validation", "test"):
        assert isinstance(hit.splits[name], (StoredSplit, list))
        same_examples(hit.splits[name], memory.splits[name])
        same_examples(miss.splits[name], memory.splits[name])
    assert without_cache(miss.metrics) == without_cache(hit.metrics) == memory.metrics
    assert miss.template == hit.template == memory.template and miss.batching == memory.batching
    files = [d / "rejected.jsonl" for d in dirs.values()]
    if memory.metrics["rows_rejected"]:
        assert files[0].read_text() == files[1].read_text() == files[2].read_text()
    else:
        assert not any(f.exists() for f in files)


def test_rejected_jsonl_is_written_on_a_hit(tok, tmp_path):
    spec = DataSpec(kind="instruction", path=str(write_rows(messy_rows(), "jsonl", tmp_path / "d.jsonl")), max_length=64)
    (miss, hit, _), dirs = bundles(spec, tok, tmp_path)
    reasons = [json.loads(line)["reason"] for line in (dirs["hit"] / "rejected.jsonl").read_text().splitlines()]
    assert reasons == ["duplicate", "missing field", "wrong type", "no answer within max_length"]
    assert hit.metrics["rejected_by_reason"] == miss.metrics["rejected_by_reason"]
    assert str(tmp_path) not in (dirs["hit"] / "rejected.jsonl").read_text()  # no local path in the run dir


def test_what_changes_the_examples_changes_the_key(tok, tmp_path, cache_dir):
    path = write_rows(messy_rows(), "jsonl", tmp_path / "d.jsonl")
    base = {"kind": "instruction", "path": str(path), "template": "chatml", "max_length": 64}

    def key(tokenizer=tok, **change) -> str:
        return prepare(DataSpec(**{**base, **change}), tokenizer, seed=0).metrics["cache_key"]

    first = key()
    assert key() == first
    # Batching and process counts do not change the examples: the same entry serves them.
    assert key(packing=True, group_by_length=True, num_proc=1, preview=5) == first
    assert key(template="alpaca") != first
    assert key(max_length=65) != first
    other = tok.__class__.from_pretrained(TINY_TOKENIZER)
    other.add_tokens(["<wetland>"])
    assert key(tokenizer=other) != first
    before = path.stat()
    path.write_text(path.read_text().replace("marsh", "fen"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    changed = key()
    assert changed != first
    assert prepare(DataSpec(**base), tok, seed=0).metrics["cache_hit"] is True
    assert len([d for d in cache_dir.iterdir() if not d.name.startswith(".")]) == 5


def awkward_jsonl(path: Path, rows: list) -> Path:
    """``rows`` as JSONL with what a real file holds: a BOM, blank lines (one only a no-break space),
    a line of broken JSON and one that is not UTF-8."""
    lines = [json.dumps(r).encode() + b"\n" for r in rows]
    lines[5:5] = [b"\n", b"  \t\n", "\u00a0\n".encode()]
    lines[20:20] = [b'{"instruction": "broken\n', b"\xff\xfe not utf-8\n"]
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(lines) + b"\n\n")
    return path


def test_worker_processes_prepare_what_one_process_does(tok, tmp_path, monkeypatch):
    """More than two batches across 2 forked workers (a JSONL file read as blocks of lines): the same
    examples, metrics and rejected.jsonl (line and row numbers) as in one process and in memory."""
    import engine.data.build as build

    monkeypatch.setattr(build, "BATCH", 16)
    path = awkward_jsonl(tmp_path / "d.jsonl", messy_rows(60))
    spec = DataSpec(kind="instruction", path=str(path), max_length=64)
    runs = {name: tmp_path / name for name in ("two", "one", "memory")}
    for d in runs.values():
        d.mkdir()
    two = prepare(spec.model_copy(update={"num_proc": 2}), tok, seed=0, run_dir=runs["two"])
    shutil.rmtree(tmp_path / "cache")
    one = prepare(spec.model_copy(update={"num_proc": 1}), tok, seed=0, run_dir=runs["one"])
    memory = prepare_in_memory(spec, tok, seed=0, run_dir=runs["memory"])
    for name in ("train", "validation", "test"):
        same_examples(two.splits[name], memory.splits[name])
        same_examples(one.splits[name], memory.splits[name])
    assert without_cache(two.metrics) == without_cache(one.metrics) == memory.metrics
    rejected = [(d / "rejected.jsonl").read_text() for d in runs.values()]
    assert rejected[0] == rejected[1] == rejected[2]
    reasons = {json.loads(line)["reason"] for line in rejected[0].splitlines()}
    assert {"duplicate", "invalid JSON", "undecodable"} <= reasons, reasons


def test_a_killed_preparation_leaves_no_entry_that_is_read(tok, tmp_path, cache_dir, monkeypatch):
    import engine.data.build as build

    spec = DataSpec(kind="instruction", path=QA)
    real = build._split

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops half-way through writing its entry

    monkeypatch.setattr(build, "_split", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(spec, tok, seed=0)
    assert not [d for d in cache_dir.iterdir() if not d.name.startswith(".tmp-")]
    # A SIGKILLed build leaves its private dir behind: it is never read, and cleared by the next build.
    (cache_dir / ".tmp-0123-999999999").mkdir()
    monkeypatch.setattr(build, "_split", real)
    b = prepare(spec, tok, seed=0)
    assert b.metrics["cache_hit"] is False
    assert [d.name for d in cache_dir.iterdir()] == [b.metrics["cache_key"]]


@pytest.mark.parametrize("damage", ["rows.arrow", "train.npy", "meta.json"])
def test_a_damaged_entry_is_prepared_again_not_read(damage, tok, tmp_path, cache_dir, capsys):
    """A file of an entry deleted or cut short (by hand, a full disk) is a miss with a notice, not a traceback."""
    spec = DataSpec(kind="instruction", path=QA)
    first = prepare(spec, tok, seed=0)
    expected = list(first.splits["train"])
    entry = cache_dir / first.metrics["cache_key"]
    head = (entry / damage).read_bytes()[:40]
    (entry / damage).unlink()  # a new file, not truncated in place: ``first`` still maps the old one
    if damage != "meta.json":
        (entry / damage).write_bytes(head)
    capsys.readouterr()
    again = prepare(spec, tok, seed=0)
    out = capsys.readouterr().out
    assert again.metrics["cache_hit"] is False and again.metrics["cache_key"] == first.metrics["cache_key"]
    assert f"cache entry {first.metrics['cache_key']} is damaged" in out
    same_examples(list(again.splits["train"]), expected)
    assert prepare(spec, tok, seed=0).metrics["cache_hit"] is True
    assert [d.name for d in cache_dir.iterdir()] == [first.metrics["cache_key"]]


def test_an_entry_unreadable_right_after_it_was_written_is_an_error_that_says_what_to_check(tok, monkeypatch):
    """A full disk or a lost permission between writing an entry and reading it back: a DataError (exit 2)
    naming the cache and the way around it, not a traceback."""
    import engine.data.cache as cache
    from engine.data.sources import DataError

    monkeypatch.setattr(cache, "_open", lambda entry: None)
    with pytest.raises(DataError, match=r"could not be read back right after it was prepared.*data\.cache=false"):
        prepare(DataSpec(kind="instruction", path=QA), tok, seed=0)


def test_batching_reads_stored_lengths_not_examples(tok, tmp_path):
    from engine.data.collate import Batches

    b = prepare(DataSpec(kind="instruction", path=QA, packing=True), tok, seed=0)
    train = b.splits["train"]
    assert isinstance(train, StoredSplit)
    memory = prepare_in_memory(DataSpec(kind="instruction", path=QA, packing=True), tok, seed=0)
    kw = {"micro_batch_size": 2, "pad_id": tok.pad_token_id, "seed": 0, **b.batching}
    stored, lists = Batches(train, **kw), Batches(memory.splits["train"], **kw)
    assert stored.rows == lists.rows and stored.padding_efficiency() == lists.padding_efficiency()
    a, c = next(stored.stream(3)), next(lists.stream(3))
    assert all((a[k] == c[k]).all() for k in a)


def test_resume_on_a_cached_run_is_bit_identical(tmp_path, monkeypatch):
    """Uninterrupted with data.cache=false; cached: killed after step 5 (a miss), resumed (a hit): same adapter."""
    from accelerate.state import AcceleratorState

    import engine.train.checkpoint as ckpt_io
    from engine.pipeline import run

    args = [*QUICK_TRAIN, "stages=[prepare_data,train]", "train.max_steps=6", "train.save_every=2"]
    AcceleratorState._reset_state(reset_partial_state=True)
    plain = run(compose([*args, "data.cache=false"]), tmp_path / "plain")
    assert "cache_key" not in plain.metrics["prepare_data"]

    def die_after_step_5(where: str, step: int) -> None:
        if (where, step) == ("step", 5):
            raise RuntimeError("killed")

    cfg = compose(args)
    monkeypatch.setattr(ckpt_io, "crash_point", die_after_step_5)
    cached = tmp_path / "cached"
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, cached)
    assert json.loads((cached / "metrics.json").read_text())["prepare_data"]["cache_hit"] is False
    monkeypatch.setattr(ckpt_io, "crash_point", lambda where, step: None)
    AcceleratorState._reset_state(reset_partial_state=True)
    ctx = run(cfg, cached)
    assert ctx.metrics["prepare_data"]["cache_hit"] is True
    assert ctx.metrics["train"]["resumed_from_step"] == 4
    same = (cached / "adapter" / "adapter_model.safetensors").read_bytes()
    assert same == (tmp_path / "plain" / "adapter" / "adapter_model.safetensors").read_bytes()
    log = [json.loads(x)["loss"] for x in (cached / "train_log.jsonl").read_text().splitlines()]
    assert log == [json.loads(x)["loss"] for x in (tmp_path / "plain" / "train_log.jsonl").read_text().splitlines()]
    assert without_cache(ctx.metrics["prepare_data"]) == without_cache(plain.metrics["prepare_data"])


@pytest.mark.slow
def test_two_cpu_processes_prepare_once(tmp_path):
    """accelerate launch, 2 gloo processes, an empty cache: rank 0 prepares, rank 1 maps its entry."""
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), "ENGINE_CACHE": str(cache)}
    cmd = [
        "accelerate", "launch", "--config_file", str(ROOT / "engine/conf/accelerate/cpu_2proc.yaml"),
        "-m", "engine", *TINY, "stages=[prepare_data,train]", "precision=fp32", "device=cpu",
        "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=1", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("[engine] data: prepared ") == 1
    assert len(list((cache / "data").iterdir())) == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["prepare_data"]["cache_hit"] is False and metrics["train"]["processes"] == 2
    # The same command again: a hit, nothing prepared.
    shutil.rmtree(tmp_path / "run")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[engine] data: prepared " not in r.stdout + r.stderr and "cache hit" in r.stdout


def test_the_cli_says_hit_and_records_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "c"))
    args = [*TINY, "stages=[prepare_data]", "device=cpu"]
    first = run_engine(*args, f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "[engine] data: prepared " in first.stdout
    second = run_engine(*args, f"hydra.run.dir={tmp_path / 'b'}")
    assert second.returncode == 0 and "cache hit" in second.stdout
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text())["prepare_data"] for d in "ab")
    assert a["cache_key"] == b["cache_key"] and a["train_examples"] == b["train_examples"]
