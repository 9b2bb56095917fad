"""The prepared-data cache: one entry per key, shared by every run, resume and sweep job.

Where: ``$ENGINE_CACHE/data/<key>/`` (default ``~/.cache/engine/data``). An entry holds the
prepared rows as one Arrow file (memory-mapped when read), each split as its row numbers
(``train.npy`` ...), the rejected rows with their reasons (so every run still writes its
rejected.jsonl) and meta.json (the counts).

The key is a hash of everything that changes the prepared examples (docs/data.md):
- each data file's real path, size and modification time (not its content: hashing a
  5 GB file would cost more than a hit saves; touching a file makes a new key);
- the data spec's keys that shape the examples (kind, fields, system prompt, max_length,
  train_on_prompt, split, limit) and the split seed;
- the template's Jinja source; the tokenizer (its serialised vocabulary, merges and
  normalisers, special tokens and chat template);
- the source of the data package itself, so a changed rule never serves a stale entry.
Batching keys (packing, group_by_length), ``num_proc`` and ``preview`` are not in it:
they do not change the examples.

Writing is atomic: an entry is built in ``.tmp-<key>-<pid>`` and renamed into place, so
a killed preparation never leaves an entry that is later read; another process that
built the same key meanwhile wins and ours is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from engine.data.build import ROWS_FILE, build, sources
from engine.data.example import DataBundle
from engine.data.rules import SPLITS, Rejects, batching_of, data_metrics, no_usable, write_rejected
from engine.data.sources import DataError
from engine.data.spec import DataSpec, DocumentsSpec
from engine.data.templates import template_source, templated
from engine.files import cache_root, shown_path, write_text_atomic
from engine.runs import alive

META = "meta.json"
REJECTED = "rejected.jsonl"
FORMAT = 2
"""Bump when the layout of an entry changes."""
NOT_KEYED = ("path", "validation_path", "test_path", "seed", "preview", "num_proc", "cache", "packing", "group_by_length")
"""Spec keys left out of the key: paths are fingerprinted instead, the seed is the split seed's."""
_CODE = ("build.py", "cache.py", "kinds.py", "rules.py", "shapes.py", "sources.py", "stored.py", "templates.py", "tokens.py")


def data_cache_dir() -> Path:
    """``$ENGINE_CACHE/data``, else ``~/.cache/engine/data``."""
    return cache_root() / "data"


def cacheable(spec: DataSpec) -> bool:
    """Local files and save_to_disk folders are; a documents folder (its own reports) and a hub set are not."""
    return not isinstance(spec, DocumentsSpec) and all(not s.path.startswith("hf:") for s in sources(spec))


def cache_key(spec: DataSpec, tokenizer, *, seed: int, source: str) -> str:
    """The entry's name: a hash of everything that changes the prepared examples (see the module docstring)."""
    parts = {
        "format": FORMAT,
        "code": _code_hash(),
        "files": {s.split: fingerprint(s.path) for s in sources(spec)},
        "spec": spec.model_dump(exclude=set(NOT_KEYED) & set(type(spec).model_fields)),
        "split_seed": spec.seed if spec.seed is not None else seed,
        "template": source,
        "tokenizer": tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fingerprint(path: str) -> list:
    """(real path, size, mtime) of a file, or of every file under a save_to_disk folder."""
    p = Path(path).expanduser().resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def tokenizer_identity(tokenizer) -> str:
    """A hash of what makes a tokenizer produce its ids: the serialised tokenizer, special tokens, template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "special": tokenizer.all_special_tokens,
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "size": len(tokenizer),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _code_hash() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _CODE)).hexdigest()[:16]


def prepare_cached(spec: DataSpec, tokenizer, *, seed: int, run_dir: Path | None) -> DataBundle:
    """Map the entry for this key, preparing it first on a miss; rejected.jsonl into ``run_dir`` either way."""
    source = template_source(spec.template, tokenizer) if templated(spec.kind) else ""
    split_seed = spec.seed if spec.seed is not None else seed
    key = cache_key(spec, tokenizer, seed=seed, source=source)
    entry = data_cache_dir() / key
    t0 = time.perf_counter()
    opened = _open(entry)
    hit = opened is not None
    if not hit:
        _prepare_entry(spec, tokenizer, seed=split_seed, source=source, entry=entry, run_dir=run_dir)
        opened = _open(entry)
        if opened is None:  # unreadable the moment it was written (said above), or removed by another process
            raise DataError(
                f"data: the cache entry {key} could not be read back right after it was prepared; check the free "
                f"space and permissions of {shown_path(data_cache_dir())} ($ENGINE_CACHE), or run with data.cache=false"
            )
    meta, splits = opened
    names = {s.index: s.path for s in sources(spec)}
    if run_dir is not None:
        rejected = _read_rejected(entry, names)
        if rejected:
            write_rejected(rejected, run_dir)
    metrics = data_metrics(spec, templated=bool(source), rejects=meta["rejected_by_reason"], **meta["counts"])
    metrics |= {"cache_key": key, "cache_hit": hit, "prepare_seconds": round(time.perf_counter() - t0, 2)}
    return DataBundle(splits, source or (tokenizer.chat_template or ""), metrics, batching_of(spec))


def _open(entry: Path) -> tuple[dict, dict] | None:
    """(meta, splits) of a complete entry; None for no entry. A damaged one (a file deleted or cut short
    by hand or by a full disk) is set aside with a notice and counts as a miss: it is prepared again."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')}, expected {FORMAT}")
        return meta, _splits(entry, pairs=meta["pairs"])
    except Exception as e:  # noqa: BLE001 - whatever broke the entry, preparing it again is the fix
        print(f"[engine] data: cache entry {entry.name} is damaged ({type(e).__name__}); preparing it again", flush=True)
        _set_aside(entry)
        return None


def _set_aside(entry: Path) -> None:
    """Move a damaged entry out of the way in one rename (a reader never sees half of it), then delete it."""
    aside = entry.parent / f".tmp-damaged-{entry.name}-{os.getpid()}"
    try:
        os.replace(entry, aside)
    except OSError:
        return  # another process moved or replaced it first
    shutil.rmtree(aside, ignore_errors=True)


def _splits(entry: Path, *, pairs: bool) -> dict:
    """Each split of an entry, memory-mapped (an empty split is an empty list)."""
    import numpy as np
    from datasets import Dataset

    from engine.data.stored import StoredSplit

    rows = Dataset.from_file(str(entry / ROWS_FILE))
    indices = {name: np.load(entry / f"{name}.npy") for name in SPLITS}
    n = len(rows)
    for name, idx in indices.items():
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"{name}.npy points past the {n} stored rows")
    return {name: StoredSplit(rows, idx, pairs=pairs) if len(idx) else [] for name, idx in indices.items()}


def _prepare_entry(spec: DataSpec, tokenizer, *, seed: int, source: str, entry: Path, run_dir: Path | None) -> None:
    """Build the entry in a private dir and rename it into place (or raise, writing rejected.jsonl first)."""
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    _clear_abandoned(root)
    tmp = root / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        procs = spec.num_proc or _cores()
        built = build(spec, tokenizer, seed=seed, source=source, out=tmp, num_proc=procs)
        names = {s.index: s.path for s in sources(spec)}
        if not built.counts["sizes"]["train"]:
            rejects = Rejects([_named(r, names) for r in built.rejects])
            if run_dir is not None and rejects.rows:
                write_rejected(rejects.rows, run_dir)
            raise no_usable(spec.path, built.counts["rows_read"], rejects)
        with open(tmp / REJECTED, "w") as f:
            for r in built.rejects:
                f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")
        by_reason: dict[str, int] = {}
        for r in built.rejects:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
        meta = {"key": entry.name, "format": FORMAT, "counts": built.counts, "rejected_by_reason": by_reason}
        meta |= {"pairs": built.pairs, "seconds": built.seconds, "processes": built.processes}
        write_text_atomic(tmp / META, json.dumps(meta, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same key first: use its entry
            if not (entry / META).is_file():
                raise
        rows = built.counts["rows_read"]
        rate = round(rows / built.seconds) if built.seconds else rows
        procs = f"{built.processes} process" + ("es" if built.processes != 1 else "")
        print(
            f"[engine] data: prepared {rows} rows in {built.seconds} s ({rate} rows/s, {procs}) -> cache {entry.name}",
            flush=True,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cores() -> int:
    """CPU cores this process may use (its affinity where the OS says; else all)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _clear_abandoned(root: Path) -> None:
    """Remove the private dirs of builds whose process is gone (killed): never read, only cleared."""
    for d in root.glob(".tmp-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _named(r: dict, names: dict[int, str]) -> dict:
    """A stored reject with its file named as this run's config names it."""
    return {"file": names.get(r["src"], "?"), **{k: v for k, v in r.items() if k != "src"}}


def _read_rejected(entry: Path, names: dict[int, str]) -> list[dict]:
    path = entry / REJECTED
    if not path.is_file():
        return []
    with open(path) as f:
        return [_named(json.loads(line), names) for line in f if line.strip()]
