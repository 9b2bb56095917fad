"""Data: shapes x templates render exactly and label only what should be trained on;
sources read every format alike; bad rows are rejected with reasons, never lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ASSETS, ROOT, TINY_TOKENIZER, compose, run_cli

from engine.data import DataError, prepare, split, tokenize
from engine.data.shapes import SHAPES, normalize
from engine.data.sources import read_rows
from engine.data.spec import DataSpec, DocumentsSpec
from engine.data.templates import TEMPLATES, render, template_source
from engine.errors import ConfigError

DATA = ASSETS / "data"
SAMPLES = ROOT / "engine" / "samples"
IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    t.pad_token = t.pad_token or t.eos_token
    return t


# --- shapes x templates: the exact text and the exact label mask ---------------------------

Q, A = "What is a wetland?", "Land covered by shallow water."
SINGLE = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
SYS, Q2, A2 = "Be brief.", "And a bog?", "A wetland of peat."
MULTI = [
    {"role": "system", "content": SYS},
    {"role": "user", "content": Q},
    {"role": "assistant", "content": A},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]
E = "<|im_end|>"  # the tiny tokenizer's EOS

# template -> (single-turn text, multi-turn text); trained-on pieces are inside [[ ]].
EXPECTED = {
    "chatml": (
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n[[{A}<|im_end|>]]\n",
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n[[{A}<|im_end|>]]\n"
        f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n[[{A2}<|im_end|>]]\n",
    ),
    "alpaca": (
        f"### Instruction:\n{Q}\n\n### Response:\n[[{A}{E}]]\n\n",
        f"{SYS}\n\n### Instruction:\n{Q}\n\n### Response:\n[[{A}{E}]]\n\n"
        f"### Instruction:\n{Q2}\n\n### Response:\n[[{A2}{E}]]\n\n",
    ),
    "llama2": (
        f"[INST] {Q} [/INST][[ {A} {E}]]",
        f"[INST] <<SYS>>\n{SYS}\n<</SYS>>\n\n{Q} [/INST][[ {A} {E}]][INST] {Q2} [/INST][[ {A2} {E}]]",
    ),
    "mistral": (
        f"[INST] {Q} [/INST][[{A}{E}]]",
        f"[INST] {SYS}\n\n{Q} [/INST][[{A}{E}]][INST] {Q2} [/INST][[{A2}{E}]]",
    ),
    "phi": (
        f"Instruct: {Q}\nOutput:[[ {A}{E}]]\n",
        f"{SYS}\nInstruct: {Q}\nOutput:[[ {A}{E}]]\nInstruct: {Q2}\nOutput:[[ {A2}{E}]]\n",
    ),
}
EXPECTED["model"] = EXPECTED["chatml"]  # the tiny tokenizer's own template is ChatML

# shape -> (row, which expected conversation it becomes)
ROWS = {
    "instruction": ({"instruction": Q, "input": "", "output": A}, 0),
    "qa": ({"question": Q, "answer": A}, 0),
    "chat": ({"messages": MULTI}, 1),
    "sharegpt": (
        {
            "conversations": [
                {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in MULTI
            ]
        },
        1,
    ),
}


def expected_ids_and_labels(marked: str, tok) -> tuple[list[int], list[int]]:
    """Token ids and labels built independently: tokenize the pieces between [[ ]] markers."""
    ids, labels, rest = [], [], marked
    while rest:
        head, _, tail = rest.partition("[[")
        trained, _, rest = tail.partition("]]")
        for piece, on in ((head, False), (trained, True)):
            if piece:
                p = tok(piece, add_special_tokens=False)["input_ids"]
                ids += p
                labels += p if on else [IGNORE] * len(p)
    return ids, labels


@pytest.mark.parametrize("template", sorted(EXPECTED))
@pytest.mark.parametrize("shape", sorted(ROWS))
def test_shape_x_template_exact_text_and_label_mask(shape, template, tok, tmp_path):
    row, which = ROWS[shape]
    spec = DataSpec(kind=shape, path=str(write_rows([row], "jsonl", tmp_path / "row.jsonl")), template=template)
    msgs = SHAPES.get(shape).builder(spec, row)
    assert msgs == [SINGLE, MULTI][which]
    marked = EXPECTED[template][which]
    ex, cut = tokenize(template_source(template, tok), msgs, tok, 512, train_on_prompt=False)
    assert tok.decode(ex.input_ids) == marked.replace("[[", "").replace("]]", "")
    ids, labels = expected_ids_and_labels(marked, tok)
    assert ex.input_ids == ids
    assert [i for i, t in enumerate(ex.labels) if t == IGNORE] == [i for i, t in enumerate(labels) if t == IGNORE]
    assert cut == 0
    # train_on_prompt: every token is a label.
    ex_all, _ = tokenize(template_source(template, tok), msgs, tok, 512, train_on_prompt=True)
    assert ex_all.labels == ex_all.input_ids


@pytest.mark.parametrize("kind", ["tiny", "llama3_bpe", "sp_first", "sp_always"])
def test_span_ends_found_from_the_encoding_equal_bisecting_every_offset(kind, tok, tmp_path):
    """Where a label span starts and ends is read from the encoding (``char_to_token``) instead of every
    token's offsets: the same token index as bisecting the offsets, at every character of awkward text."""
    from bisect import bisect_left

    from test_export_presets import tokenizer_of

    from engine.data.tokens import _FirstAt

    t = tok if kind == "tiny" else tokenizer_of(kind, tmp_path / kind)
    texts = [
        "<|im_start|>user\nWhat is a wetland?<|im_end|>\n<|im_start|>assistant\nLand, under   water.<|im_end|>\n",
        "Café naïve — ünïcödé 🌊🌱 mixed\twith\ttabs\n\n\nand  double  spaces ",
        "  leading blanks, 12345 digits, 😀😀 and a trailing emoji 🌍",
        "x",
    ]
    for text in texts:
        enc = t._tokenizer.encode(text, add_special_tokens=False)
        first_at = _FirstAt(enc, len(text))
        for pos in range(len(text) + 1):
            assert first_at(pos) == bisect_left(enc.offsets, pos, key=lambda o: o[0]), (kind, text, pos)


@pytest.mark.parametrize(
    "messages",
    [
        SINGLE,
        MULTI,
        [{"role": "user", "content": 'quotes " \\ back\\slash, \x00\x1f\t control, \u2028 sep, café 🌊 \ud7ff'}],
        [{"role": "user", "content": "x", "name": "extra key"}],
        [{"content": "keys the other way", "role": "user"}],
        [{"role": "user", "content": ["not", "text"]}],
        [],
    ],
)
def test_messages_json_writes_what_json_dumps_does(messages):
    """The stored messages and the dedupe key, written in one pass, are byte for byte ``json.dumps``'s."""
    from engine.data.rules import dedupe_key, messages_json

    assert messages_json(messages) == (json.dumps(messages, ensure_ascii=False), dedupe_key(messages))
    assert dedupe_key(messages) == json.dumps(messages, sort_keys=True, ensure_ascii=False)


def test_text_shape_trains_on_every_token_and_ends_with_eos(tok, tmp_path):
    spec = DataSpec(kind="text", path=str(write_rows([{"text": "x"}], "jsonl", tmp_path / "text.jsonl")))
    msgs = SHAPES.get("text").builder(spec, {"text": "  Peat stores  carbon.\r\n"})
    ex, _ = tokenize("", msgs, tok, 512, train_on_prompt=False)
    assert ex.input_ids == tok("Peat stores carbon.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_generation_prompt_matches_the_trained_prefix(tok):
    for name, source in TEMPLATES.items():
        prompt = render(source, SINGLE[:1], add_generation_prompt=True, tokenizer=tok)
        full = EXPECTED[name][0].replace("[[", "").replace("]]", "")
        assert full.startswith(prompt), name


def test_truncation_is_counted_and_prompt_only_examples_rejected(tok, tmp_path):
    long_q = " ".join(["wetland"] * 200)
    rows = [{"question": Q, "answer": A}, {"question": long_q, "answer": A}, {"question": "Q3?", "answer": A2}]
    f = tmp_path / "long.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(kind="qa", path=str(f), template="chatml", max_length=40, split={"train": 1, "validation": 0, "test": 0})
    b = prepare(spec, tok, seed=0, run_dir=tmp_path)
    assert b.metrics["truncated"] == 1
    assert b.metrics["rejected_by_reason"] == {"no answer within max_length": 1}
    assert all(len(e.input_ids) <= 40 for e in b.splits["train"])


# --- sources: every format reads the same rows ------------------------------------------

QA_ROWS = [{"question": f"What is habitat {i}?", "answer": f"Habitat {i} is a wetland."} for i in range(20)]


def write_rows(rows: list[dict], fmt: str, path: Path) -> Path:
    """Write rows in a real file format (nested values as JSON text in CSV cells)."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "disk":
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "disk"])
def test_every_source_format_reads_the_same_rows(fmt, tmp_path):
    path = write_rows(QA_ROWS, fmt, tmp_path / (f"rows.{fmt}" if fmt != "disk" else "rows_ds"))
    assert read_rows(str(path)) == QA_ROWS


def test_json_wrapper_object_and_hub_offline(tmp_path, monkeypatch):
    f = tmp_path / "wrapped.json"
    f.write_text(json.dumps({"data": QA_ROWS[:3]}))
    assert read_rows(str(f)) == QA_ROWS[:3]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline.*save_to_disk"):
        read_rows("hf:someone/some_dataset")


def test_unreadable_file_and_folder_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON") as e:
        read_rows(str(bad))
    assert e.value.exit_code == 2
    with pytest.raises(DataError, match="data=documents"):
        read_rows(str(tmp_path))
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        (tmp_path / "x.xlsx").write_text("")
        read_rows(str(tmp_path / "x.xlsx"))


# --- cleaning: bad rows rejected with reasons, counted, written --------------------------


def test_broken_csv_rejects_rows_with_reasons(tok, tmp_path):
    spec = DataSpec(kind="qa", path=str(DATA / "broken.csv"), template="chatml", split={"train": 1, "validation": 0, "test": 0})
    b = prepare(spec, tok, seed=0, run_dir=tmp_path)
    assert b.metrics["rows_read"] == 10
    assert b.metrics["rows_used"] == 4
    assert b.metrics["rejected_by_reason"] == {"wrong column count": 2, "empty field": 2, "duplicate": 1, "undecodable": 1}
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejected] == [2, 3, 4, 5, 7, 8]
    # The file as the run dir shows it: relative (to the working dir here), never a local absolute path.
    assert all(r["file"].endswith("broken.csv") and not r["file"].startswith("/") for r in rejected)
    assert all(r["detail"] and r["data"] is not None for r in rejected)
    answers = sorted(e.reference for e in b.splits["train"])
    assert "The dark, stable organic matter in soil." in answers


def test_jsonl_bad_lines_wrong_types_and_roles(tok, tmp_path):
    f = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    lines = [
        json.dumps(good),
        "{broken json",
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": "not a list"}),
        json.dumps({"other": 1}),
        json.dumps([1, 2]),
    ]
    f.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    spec = DataSpec(kind="chat", path=str(f), template="chatml", split={"train": 1, "validation": 0, "test": 0})
    b = prepare(spec, tok, seed=0, run_dir=tmp_path)
    assert b.metrics["rows_used"] == 1
    assert b.metrics["rejected_by_reason"] == {
        "invalid JSON": 1,
        "bad role": 1,
        "no assistant turn at the end": 1,
        "wrong type": 2,
        "missing field": 1,
        "undecodable": 1,
    }
    assert len((tmp_path / "rejected.jsonl").read_text().splitlines()) == 7


def test_all_bad_file_is_a_data_error_naming_file_and_problems(tok, tmp_path):
    spec = DataSpec(kind="qa", path=str(DATA / "all_bad.csv"))
    with pytest.raises(DataError) as e:
        prepare(spec, tok, seed=0, run_dir=tmp_path)
    msg = str(e.value)
    assert e.value.exit_code == 2
    assert "all_bad.csv" in msg and "no usable training row" in msg and "line 2" in msg and "empty" in msg


def test_all_bad_file_exits_2_from_the_cli(tmp_path):
    r = run_cli(
        "model=tiny",
        "stages=[prepare_data]",
        f"data.path={DATA / 'all_bad.csv'}",
        "data=env_numeric",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr
    assert "all_bad.csv" in r.stderr and "no usable training row" in r.stderr
    assert "Traceback" not in r.stderr


def test_normalize_keeps_indentation_and_collapses_blanks():
    assert normalize("  a  b\t c \r\n\r\n\r\n\n   indented  x ") == "a b c\n\n   indented x"


# --- splits ---------------------------------------------------------------------------


def test_split_is_seeded_exact_and_disjoint():
    items = [[{"role": "user", "content": str(i)}] for i in range(100)]
    ratios = {"train": 0.8, "validation": 0.1, "test": 0.1}
    a, b, c = split(items, ratios, 1), split(list(reversed(items)), ratios, 1), split(items, ratios, 2)
    assert a == b  # order of the input does not matter: content hash
    assert a != c
    assert [len(a[k]) for k in ("train", "validation", "test")] == [80, 10, 10]
    keys = [json.dumps(x) for part in a.values() for x in part]
    assert len(keys) == len(set(keys)) == 100


def test_separate_validation_file_wins_and_is_deduped_from_train(tok, tmp_path):
    train = write_rows(QA_ROWS, "jsonl", tmp_path / "train.jsonl")
    val = write_rows(QA_ROWS[:3] + [{"question": "New?", "answer": "Yes."}], "jsonl", tmp_path / "val.jsonl")
    spec = DataSpec(kind="qa", path=str(train), validation_path=str(val), template="chatml")
    b = prepare(spec, tok, seed=0, run_dir=tmp_path)
    assert b.metrics["validation_examples"] == 4
    assert b.metrics["rejected_by_reason"] == {"duplicate across splits": 3}
    seen = {}
    for name, exs in b.splits.items():
        for e in exs:
            key = json.dumps(e.messages)
            assert key not in seen, f"in {seen.get(key)} and {name}"
            seen[key] = name
    assert b.metrics["train_examples"] + b.metrics["test_examples"] == 17  # 20 minus the 3 in validation


# --- config --------------------------------------------------------------------------


def test_field_mapping_reads_other_column_names(tok, tmp_path):
    f = write_rows([{"q": "Why?", "a": "Because."}, {"q": "How?", "a": "Slowly."}], "csv", tmp_path / "qa.csv")
    cfg = compose(["model=tiny", "data=env_numeric", f"data.path={f}", "data.fields.prompt=q", "data.fields.response=a"])
    assert cfg.data.column("prompt") == "q"
    b = prepare(cfg.data, tok, seed=0)
    assert sorted(e.reference for s in b.splits.values() for e in s) == ["Because.", "Slowly."]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data.fields.question: 'question' is a column.*data.fields.prompt=q$") as e:
        compose(["model=tiny", "data=env_numeric", "data.fields.question=q"])
    assert "{" not in str(e.value)  # names the key; does not dump the data group
    with pytest.raises(ConfigError, match=r"data.path: .*required"):
        compose(["model=tiny", "data=sharegpt"])
    with pytest.raises(ConfigError, match=r"data.template: .*unknown template 'vicuna'"):
        compose(["model=tiny", "data.template=vicuna"])
    with pytest.raises(ConfigError, match=r"data.path: .*no such file"):
        compose(["model=tiny", "data.path=/nope.jsonl"])


# --- documents -----------------------------------------------------------------------


def test_documents_folder_scores_chunks_and_reports(tok, tmp_path):
    import shutil

    from pypdf import PdfWriter

    folder = tmp_path / "inbox"
    shutil.copytree(SAMPLES / "documents", folder, ignore=shutil.ignore_patterns("*.py"))
    w = PdfWriter()
    w.add_blank_page(612, 792)
    with open(folder / "scan_without_text.pdf", "wb") as f:
        w.write(f)
    (folder / "notes.txt").write_text("Too short.")
    spec = DocumentsSpec(kind="documents", path=str(folder), chunk_tokens=64, overlap=8, max_length=128)
    run = tmp_path / "run"
    run.mkdir()
    b = prepare(spec, tok, seed=0, run_dir=run)
    docs = {d["file"]: d for d in json.loads((run / "documents.json").read_text())}
    assert docs["ocean_acidification_brief.pdf"]["usable"] and docs["ocean_acidification_brief.pdf"]["pages"] == 2
    assert docs["scan_without_text.pdf"]["reason"].startswith("no text extracted")
    assert docs["notes.txt"]["reason"].startswith("too short")
    assert docs["scanned_page_ocr_failure.txt"]["reason"].startswith("garbage characters")
    assert b.metrics["documents_used"] == 4 and len(b.metrics["documents_skipped"]) == 3
    n_chunks = sum(d["chunks"] for d in docs.values())
    assert n_chunks == sum(len(v) for v in b.splits.values()) > 10
    ex = b.splits["train"][0]
    assert ex.labels == ex.input_ids and len(ex.input_ids) <= 66  # chunk + EOS (re-tokenizing may shift by one)
    # neighbouring chunks overlap
    from engine.data.documents import chunk

    pieces = chunk("one two three four five six seven eight nine ten " * 5, tok, 16, 4)
    assert len(pieces) > 2 and pieces[1].split()[0] in pieces[0]


def test_preview_and_archive_stages(tmp_path):
    import shutil

    from engine.pipeline import run

    folder = tmp_path / "inbox"
    shutil.copytree(SAMPLES / "documents", folder)
    cfg = compose(
        [
            "model=tiny",
            "data=documents",
            f"data.path={folder}",
            f"data.archive_dir={tmp_path / 'done'}",
            "data.preview=2",
            "train.max_steps=1",
            "stages=[prepare_data,preview_data,train,archive_documents]",
        ]
    )
    ctx = run(cfg, tmp_path / "run")
    preview = (tmp_path / "run" / "preview.txt").read_text()
    assert preview.count("--- example") == 2 and "[[" in preview
    assert ctx.metrics["archive_documents"]["archived"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["scanned_page_ocr_failure.txt"]
    assert (tmp_path / "done" / "ocean_acidification_brief.pdf").exists()
