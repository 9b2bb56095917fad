"""Data by config alone: kind auto reads the shape from the file's columns, switching
data.kind brings that kind's columns, and every data mistake is a clear message (which
key or file, why, what would work) at validation, before any weight loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_TOKENIZER, compose, run_cli, run_engine
from test_data import write_rows

from engine.data import DataError, prepare
from engine.data.sources import read_rows
from engine.data.spec import DataSpec
from engine.data.templates import render, template_source
from engine.errors import ConfigError

N = 12
SHORT = ["model=tiny", "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.plot=false"]


def qa_rows(q: str = "question", a: str = "answer") -> list[dict]:
    return [{q: f"What is wetland type {i}?", a: f"Wetland type {i} is a marsh."} for i in range(N)]


def turns(style: str, column: str) -> list[dict]:
    role, text, user, bot = ("role", "content", "user", "assistant") if style == "chat" else ("from", "value", "human", "gpt")
    return [{column: [{role: user, text: q}, {role: bot, text: a}]} for q, a in (r.values() for r in qa_rows())]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


# --- kind auto -----------------------------------------------------------------------

# name -> (rows, expected kind, expected field renames, expected reason)
DETECT = {
    "instruction": ([{"instruction": "Define peat.", "input": "", "output": "Peat is soil."}], "instruction", {}, "columns"),
    "qa": (qa_rows(), "qa", {}, "columns 'question', 'answer'"),
    "chat": (turns("chat", "messages"), "chat", {}, "column 'messages'"),
    "sharegpt": (turns("sharegpt", "conversations"), "sharegpt", {}, "column 'conversations'"),
    "text": ([{"text": "Peat stores carbon."}], "text", {}, "column 'text'"),
    # the turns decide, whatever the column is called
    "chat_in_conversations": (turns("chat", "conversations"), "chat", {"messages": "conversations"}, "role/content turns"),
    "sharegpt_in_messages": (turns("sharegpt", "messages"), "sharegpt", {"conversations": "messages"}, "from/value turns"),
}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("name", sorted(DETECT))
def test_auto_detects_the_shape_from_the_columns(name, fmt, tmp_path):
    rows, kind, renames, why = DETECT[name]
    path = write_rows(rows, fmt, tmp_path / f"data.{fmt}")
    cfg = compose(["model=tiny", "data=auto", f"data.path={path}"])
    assert (cfg.data.kind, cfg.data.fields) == (kind, renames)
    assert why in cfg.data.detected


def test_auto_uses_the_users_column_renames(tmp_path):
    path = write_rows(qa_rows("q", "a"), "csv", tmp_path / "qa.csv")
    cfg = compose(["model=tiny", "data=auto", f"data.path={path}", "data.fields.prompt=q", "data.fields.response=a"])
    assert cfg.data.kind == "qa" and cfg.data.column("prompt") == "q"


def test_auto_unknown_columns_list_them_and_what_each_kind_reads(tmp_path):
    path = write_rows(qa_rows("q", "a"), "csv", tmp_path / "qa.csv")
    with pytest.raises(ConfigError) as e:
        compose(["model=tiny", "data=auto", f"data.path={path}"])
    msg = str(e.value)
    assert "data.kind: auto cannot tell the kind of" in msg and "its columns (q, a)" in msg
    for expects in (
        "instruction: instruction, output",
        "qa: question, answer",
        "chat: messages",
        "sharegpt: conversations",
        "text: text",
    ):
        assert expects in msg
    assert "data.kind=qa data.fields.prompt=q data.fields.response=a" in msg


def test_auto_ambiguous_columns_name_the_candidates(tmp_path):
    rows = [{"instruction": "Define peat.", "output": "Peat is soil.", "text": "Peat stores carbon."}]
    path = write_rows(rows, "jsonl", tmp_path / "both.jsonl")
    with pytest.raises(
        ConfigError, match=r"fit more than one kind: instruction .*; text .*data.kind=instruction or data.kind=text"
    ):
        compose(["model=tiny", "data=auto", f"data.path={path}"])


def test_auto_on_a_hub_dataset_asks_for_the_kind():
    with pytest.raises(ConfigError, match=r"data.kind: auto reads the columns of a file, but hf:someone/set .*name the kind"):
        compose(["model=tiny", "data=auto", "data.path=hf:someone/set"])


def test_the_default_preset_detects_the_shipped_set_and_reports_it(tok):
    cfg = compose(["model=tiny"])
    assert cfg.data.kind == "instruction" and cfg.data.detected
    bundle = prepare(cfg.data, tok, seed=0)
    assert bundle.metrics["kind"] == "instruction" and bundle.metrics["kind_detected"] == cfg.data.detected


def test_a_sharegpt_file_trains_with_no_kind_named(tmp_path):
    path = write_rows(turns("sharegpt", "conversations"), "jsonl", tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    r = run_engine(*SHORT, f"data.path={path}", "stages=[prepare_data,train]", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[engine] data: kind auto -> sharegpt (column 'conversations')" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prepare_data"]["kind"] == "sharegpt" and metrics["prepare_data"]["rows_used"] == N
    assert metrics["train"]["steps"] == 2


# --- changing data.kind brings that kind's columns ------------------------------------


def test_kind_qa_with_renamed_columns_trains_on_the_default_preset(tmp_path):
    path = write_rows(qa_rows("q", "a"), "csv", tmp_path / "qa.csv")
    out = tmp_path / "run"
    r = run_engine(
        *SHORT,
        "data.kind=qa",
        "data.fields.prompt=q",
        "data.fields.response=a",
        f"data.path={path}",
        "stages=[prepare_data,train]",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prepare_data"]["kind"] == "qa" and metrics["prepare_data"]["rows_used"] == N
    assert metrics["prepare_data"]["kind_detected"] is None
    assert metrics["train"]["steps"] == 2


@pytest.mark.parametrize("preset", ["env_science_qa", "env_numeric", "env_science_chat", "sharegpt", "text", "qa", "chat"])
def test_switching_kind_on_any_preset_gives_that_kinds_columns(preset, tmp_path):
    path = write_rows([{"instruction": "Define peat.", "input": "", "output": "Peat is soil."}], "jsonl", tmp_path / "i.jsonl")
    cfg = compose(["model=tiny", f"data={preset}", "data.kind=instruction", f"data.path={path}"])
    assert cfg.data.fields == {} and cfg.data.column("output") == "output"


@pytest.mark.parametrize("preset", ["qa", "chat", "instruction", "text", "sharegpt", "auto"])
def test_generic_presets_ask_for_a_path(preset):
    with pytest.raises(ConfigError, match=r"data.path: required: point data.path at a data file"):
        compose(["model=tiny", f"data={preset}"])


def test_a_missing_mapped_column_lists_the_columns_that_exist(tmp_path):
    path = write_rows(qa_rows("q", "a"), "csv", tmp_path / "qa.csv")
    with pytest.raises(ConfigError) as e:
        compose(["model=tiny", "data=qa", f"data.path={path}"])
    msg = str(e.value)
    assert "data.fields.prompt: kind qa reads its prompt from column 'question'" in msg and "(its columns: q, a)" in msg
    assert "data.fields.prompt=q" in msg and "data.fields.response=a" in msg
    assert "{" not in msg  # the key and the fix, not a dump of the data group


def test_a_missing_column_at_prepare_names_the_rows_columns(tok, tmp_path):
    """Rows read at prepare time (past the first rows validation saw) say which columns they have."""
    path = write_rows(qa_rows(), "jsonl", tmp_path / "qa.jsonl")
    spec = DataSpec(kind="qa", path=str(path), template="chatml")
    path.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n")  # changed after validation
    with pytest.raises(DataError, match=r"missing field 'question' \(the row has: q, a; map one with data.fields"):
        prepare(spec, tok, seed=0)


# --- files that hold no rows, or the wrong kind of JSON --------------------------------


def test_an_empty_file_says_it_is_empty(tmp_path):
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(ConfigError, match=rf"data.path: .*{name} is empty; point data.path at a file with at least one row"):
            compose(["model=tiny", "data=qa", f"data.path={tmp_path / name}"])
        with pytest.raises(DataError, match="is empty") as e:
            read_rows(str(tmp_path / name))
        assert "First problems" not in str(e.value)


def test_a_header_only_csv_says_it_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("question,answer\n")
    with pytest.raises(ConfigError, match=r"header.csv has a header \(question, answer\) but no rows"):
        compose(["model=tiny", "data=qa", f"data.path={path}"])


def test_a_jsonl_file_holding_one_array_suggests_json(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(qa_rows(), indent=2))
    with pytest.raises(ConfigError, match=r"holds one JSON array, not one JSON object per line; rename it to rows.json"):
        compose(["model=tiny", "data=qa", f"data.path={path}"])
    renamed = path.rename(tmp_path / "rows.json")
    assert compose(["model=tiny", "data=qa", f"data.path={renamed}"]).data.kind == "qa"


def test_an_over_long_row_is_truncated_alike_in_csv_and_jsonl(tok, tmp_path):
    """CSV used to stop at Python's 128 KiB field limit (row rejected) where JSONL truncated at max_length."""
    rows = [*qa_rows()[:4], {"question": "Describe peat.", "answer": "peat " * 40_000}]  # a 200,000-character answer
    metrics = {}
    for fmt in ("jsonl", "csv"):
        path = write_rows(rows, fmt, tmp_path / f"long.{fmt}")
        spec = DataSpec(
            kind="qa", path=str(path), template="chatml", max_length=64, split={"train": 1, "validation": 0, "test": 0}
        )
        metrics[fmt] = prepare(spec, tok, seed=0).metrics
        assert metrics[fmt]["rows_used"] == 5 and metrics[fmt]["rows_rejected"] == 0 and metrics[fmt]["truncated"] == 1
    assert metrics["csv"]["train_tokens"] == metrics["jsonl"]["train_tokens"]


def test_a_split_with_no_train_share_says_so(tok, tmp_path):
    path = write_rows(qa_rows(), "jsonl", tmp_path / "qa.jsonl")
    spec = DataSpec(kind="qa", path=str(path), split={"train": 0, "validation": 0.5, "test": 0.5})
    with pytest.raises(DataError, match=r"has 12 usable rows and data.split puts none in train"):
        prepare(spec, tok, seed=0)


# --- user chat templates ----------------------------------------------------------------


def write_template(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def test_a_template_escaping_the_sandbox_is_a_config_error(tmp_path):
    path = write_template(tmp_path, "my.jinja", "{% for m in messages %}{{ m.__class__.__mro__ }}{% endfor %}")
    with pytest.raises(
        ConfigError,
        match=r"data.template: template my.jinja tried to access attribute '__class__' of a dict, "
        r"which is not allowed in the sandbox",
    ) as e:
        compose(["model=tiny", f"data.template={path}"])
    assert "Traceback" not in str(e.value) and "SecurityError" not in str(e.value)


def test_a_sandbox_violation_at_render_time_is_a_config_error():
    """One only some rows reach (here: a system turn) is still caught when it is rendered."""
    source = "{% for m in messages %}{% if m.role == 'system' %}{{ messages.append(m) }}{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(ConfigError, match=r"tried to access attribute 'append' of a list, which is not allowed in the sandbox"):
        render(source, [{"role": "system", "content": "x"}], add_generation_prompt=False)


def test_a_template_syntax_error_names_file_and_line(tmp_path, tok):
    path = write_template(tmp_path, "my.jinja", "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"data.template: my.jinja line 2: unexpected '}'"):
        compose(["model=tiny", f"data.template={path}"])
    with pytest.raises(ConfigError, match=r"my.jinja line 2: unexpected '}'"):  # used without validation
        template_source(str(path), tok)


def test_template_errors_exit_2_from_the_cli_without_a_traceback(tmp_path):
    path = write_template(tmp_path, "my.jinja", "{{ messages.__class__.__mro__ }}")
    r = run_cli("model=tiny", f"data.template={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "template my.jinja tried to access attribute '__class__' of a list" in r.stderr


def test_csv_field_limit_is_lifted_for_reading(tmp_path):
    path = tmp_path / "wide.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["text"], ["x" * 300_000]])
    assert read_rows(str(path)) == [{"text": "x" * 300_000}]
