"""Every rule that spans config groups or stages, checked at validation — one home for them.

Each group's schema checks its own values; this module checks how the chosen presets fit
together (quantization x adapter x device, optimizer x device, attention kernel x device,
adapter x stages, evaluate x a trained adapter, eval.run_dir), so an impossible run fails
with exit status 2 before any weight loads, with the reason and a fix.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def cross_checks(specs: dict[str, Any], top: Any, problems: list[str]) -> None:
    """Append a problem for each impossible combination; groups that failed their own schema are skipped."""
    quant, adapter, model = specs.get("quantization"), specs.get("adapter"), specs.get("model")
    stages = list(getattr(top, "stages", None) or [])
    device = getattr(top, "device", "auto")
    quantized = quant is not None and quant.kind != "none"

    if quantized:
        if adapter is not None and adapter.kind == "none":
            problems.append(
                f"quantization: {quant.kind} weights are frozen integer codes and cannot be fully fine-tuned "
                "(adapter=none); train an adapter on top (adapter=lora: QLoRA) or use quantization=none"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                f"quantization: {quant.kind} needs the bitsandbytes package; `pip install 'engine[quant]'` "
                "or use quantization=none"
            )
        dora = adapter is not None and (adapter.kind == "dora" or getattr(adapter, "method", None) == "dora")
        if quant.kind == "int8" and dora and _resolved_device(device) == "cpu":
            # Measured with bitsandbytes 0.50.2: DoRA's weight-norm pass drops the int8 scales
            # (state.SCB) on CPU and the next forward fails.
            problems.append(
                "quantization: int8 with DoRA fails on CPU (bitsandbytes' CPU int8 path loses the weight "
                "scales after DoRA's weight-norm pass); use quantization=nf4 with DoRA, or adapter=lora with int8"
            )
        if _resolved_device(device) == "mps":
            problems.append(
                f"quantization: bitsandbytes has no kernels for Apple MPS, so {quant.kind} cannot run there; "
                "use quantization=none on MPS, or device=cpu (slow) / a CUDA machine for quantized training"
            )

    if model is not None and model.attn_implementation == "flash_attention_2" and _resolved_device(device) != "cuda":
        problems.append(
            f"model.attn_implementation: flash_attention_2 runs only on CUDA GPUs; use sdpa on {_resolved_device(device)}"
        )

    train = specs.get("train")
    if train is not None:
        from engine.train.spec import optimizer_problem

        if why := optimizer_problem(train.optimizer, _resolved_device(device)):
            problems.append(why)

    _check_stages(specs, stages, problems)
    _check_lm_eval(specs, stages, problems)
    _check_export(specs, stages, problems)
    _check_serve(specs, stages, problems)
    _check_sweep(specs, stages, problems)
    _check_retrieval(specs, stages, problems)
    _check_preference(specs, stages, problems)
    _check_grpo(specs, stages, problems)
    _check_streaming(specs, stages, problems)

    if adapter is not None and top is not None:
        layered = adapter.kind == "layered"
        if layered and "train" in stages:
            problems.append(
                "stages: adapter=layered trains its levels in the train_layered stage; "
                "replace 'train' with 'train_layered' in stages"
            )
        if "train_layered" in stages and not layered:
            problems.append(
                f"stages: train_layered needs adapter=layered (got adapter kind '{adapter.kind}'); "
                "use adapter=layered or the plain 'train' stage"
            )


def _resolved_device(device: str) -> str:
    if device != "auto":
        return device
    from engine.runtime import resolve_device

    return resolve_device("auto")


def _check_stages(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """Stage-order rules: what a stage needs comes earlier; evaluate needs trained weights from this run
    or from eval.run_dir."""
    from engine.stages import STAGES

    known = [s for s in stages if s in STAGES]
    _check_needs(known, problems)
    trains = [s for s in known if "trains" in STAGES.get(s).traits]
    ev, adapter = specs.get("eval"), specs.get("adapter")
    if "evaluate" in known and ev is not None and adapter is not None:
        if not ev.run_dir and not trains and adapter.kind != "none":
            problems.append(
                "eval.run_dir: not set, and no stage of this run trains, so there is no trained adapter to evaluate; "
                "set eval.run_dir=outputs/<recipe>/<time> (a finished run), add a training stage "
                "(train or train_layered) before evaluate, or use adapter=none to evaluate the base alone"
            )
        if trains and "evaluate" in known and known.index("evaluate") < known.index(trains[0]):
            problems.append(f"stages: evaluate runs before {trains[0]}; put it after the training stage")
    docs = specs.get("data")
    if "archive_documents" in known and docs is not None:
        if docs.kind != "documents" or not getattr(docs, "archive_dir", None):
            problems.append(
                "stages: archive_documents moves used documents to data.archive_dir: it needs data=documents "
                f"and data.archive_dir=<folder> (got data kind '{docs.kind}')"
            )
        elif not trains or known.index("archive_documents") < known.index(trains[-1]):
            problems.append(
                "stages: archive_documents must come after the training stage (files move only once training on them finished)"
            )


NEEDS = {
    "data": "prepared data (ctx.data)",
    "merged": "the merged model (run_dir/merged)",
}
"""What a ``needs:X`` / ``gives:X`` stage trait means, in the words a stage-order problem uses."""


def stage_traits(stage: str, kind: str) -> set[str]:
    """What a stage ``needs`` or ``gives`` (its ``needs:X`` / ``gives:X`` traits): {X, ...}; none for an unknown stage."""
    from engine.stages import STAGES

    traits = STAGES.get(stage).traits if stage in STAGES else frozenset()
    return {t.split(":", 1)[1] for t in traits if t.startswith(f"{kind}:")}


def _check_needs(known: list[str], problems: list[str]) -> None:
    """Every ``needs:X`` trait has a ``gives:X`` stage earlier in the list: no stage runs another, so the
    recipe's stage list is all that runs. One problem per missing X, with the list that works."""
    from engine.stages import STAGES

    reported: set[str] = set()
    for i, stage in enumerate(known):
        for need in sorted(stage_traits(stage, "needs")):
            if need in reported or any(need in stage_traits(s, "gives") for s in known[:i]):
                continue
            reported.add(need)
            givers = [k for k in STAGES.keys() if need in stage_traits(k, "gives")]
            what = NEEDS.get(need, need)
            if not givers:
                problems.append(f"stages: {stage} needs {what}, but no registered stage gives it (trait 'gives:{need}')")
                continue
            fixed = [*known[:i], givers[0], *(s for s in known[i:] if s != givers[0])]
            problems.append(f"stages: {stage} needs {what}: put {givers[0]} before it, e.g. stages=[{','.join(fixed)}]")


def stages_as_ran(stages: list[str]) -> list[str]:
    """A recorded stage list as it ran: before stages declared their needs, a stage ran what it needed
    on its way (prepare_data, merge) when the list left it out, and build_index ran before prepare_data.
    ``eval.run_dir`` reads such records; their lists are upgraded, as their missing groups get defaults."""
    from engine.stages import STAGES

    moved = "build_index" in stages and "prepare_data" in stages  # it goes right after prepare_data
    out: list[str] = []
    for stage in [s for s in stages if not (moved and s == "build_index")]:
        for need in sorted(stage_traits(stage, "needs")):
            if not any(need in stage_traits(s, "gives") for s in out):
                out += [k for k in STAGES.keys() if need in stage_traits(k, "gives")][:1]
        if stage not in out:
            out.append(stage)
        if stage == "prepare_data" and moved:
            out.append("build_index")
    return out


def _check_lm_eval(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """lm-eval tasks need the lm-eval package: said before training, not after it (the evaluate stage
    would otherwise find out once the run's minutes of training are spent)."""
    lm_eval = getattr(specs.get("eval"), "lm_eval", None)
    tasks = getattr(lm_eval, "tasks", None)
    if tasks and "evaluate" in stages and importlib.util.find_spec("lm_eval") is None:
        problems.append(
            f"eval.lm_eval.tasks: {list(tasks)} need the lm-eval package, which is not installed; "
            "`pip install -r requirements.txt .` installs it (or pip install lm-eval==0.4.13), or set eval.lm_eval.tasks=[]"
        )


def _check_sweep(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """metrics.json is nested by stage: an objective or plotted metric of a stage that does not run never appears."""
    sweep = specs.get("sweep")
    for key in ("objective", "metric"):
        value = getattr(sweep, key, None)
        if value and stages and value.split(".")[0] not in stages:
            problems.append(
                f"sweep.{key}: '{value}' is under '{value.split('.')[0]}' in metrics.json, but that stage does not run "
                f"(stages: {', '.join(stages)}); name a key of a stage that runs, e.g. train.final_loss"
            )


EXPORT_STAGES = ("merge", "export_gguf", "export_onnx", "check_export")
GGUF_ALTERNATIVES = "drop export_gguf from stages (merge still writes run_dir/merged, a plain HF dir; export_onnx writes ONNX)"


def _check_export(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """Export stages need trained weights, come in order, and the model must be one the GGUF writer can
    write (architecture, tokenizer kind, rope type): refused here, not after training."""
    from engine.export import export_refusal
    from engine.stages import STAGES

    known = [s for s in stages if s in STAGES]
    used = [s for s in known if s in EXPORT_STAGES]  # in run order: used[0] is the first export stage
    if not used:
        return
    ev, adapter, model, export = specs.get("eval"), specs.get("adapter"), specs.get("model"), specs.get("export")
    trains = [s for s in known if "trains" in STAGES.get(s).traits]
    if ev is not None and not ev.run_dir and not trains:
        problems.append(
            f"stages: {used[0]} exports trained weights, but no stage of this run trains and eval.run_dir is not set; "
            "add a training stage before it, or export a finished run with eval.run_dir=outputs/<recipe>/<time>"
        )
    if trains and known.index(used[0]) < known.index(trains[-1]):
        problems.append(f"stages: {used[0]} runs before {trains[-1]}; put the export stages after training")
    before_check = known[: known.index("check_export")] if "check_export" in known else None
    if before_check is not None and "export_gguf" not in before_check and "export_onnx" not in before_check:
        problems.append("stages: check_export checks the exported files; put export_gguf before it (or export_onnx)")
    if "export_gguf" in known and model is not None and not (ev is not None and ev.run_dir):
        if why := export_refusal(model):  # with eval.run_dir: that run's model, in evaluated_run
            problems.append(f"model: {why}; {GGUF_ALTERNATIVES}")
    dora = adapter is not None and (adapter.kind == "dora" or getattr(adapter, "method", None) == "dora")
    if "export_gguf" in known and dora and export is not None and getattr(export, "lora", False):
        problems.append(
            "export.lora: llama.cpp's LoRA adapters cannot hold DoRA's trained magnitudes; set export.lora=false "
            "(the merged model files carry the DoRA update)"
        )


def _check_serve(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """A server off loopback needs a key, and a required key must exist (ENGINE_API_KEY, env or .env)."""
    serve = specs.get("serve")
    if serve is None or "serve" not in stages:
        return
    from engine.serve.server import is_loopback
    from engine.settings import settings

    has_key = settings().engine_api_key is not None and bool(settings().engine_api_key.get_secret_value())
    if serve.api_key and not has_key:
        problems.append(
            "serve.api_key: true, but no key is set; export ENGINE_API_KEY=<a long random string> "
            "(or put it in .env), or use serve.api_key=false on a loopback host"
        )
    if not serve.api_key and not is_loopback(serve.host):
        problems.append(
            f"serve.host: {serve.host} is reachable from other machines, and serve.api_key is false, so anyone there "
            "could use the model; set serve.api_key=true with ENGINE_API_KEY set, or keep serve.host=127.0.0.1"
        )


def _check_retrieval(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """build_index needs an index kind; passages go into prompts only where the data has prompts.

    With eval.run_dir the retrieval and data groups are that run's: checked once it is read (evaluated_run)."""
    from engine.data.templates import templated

    if getattr(specs.get("eval"), "run_dir", None):
        return
    retrieval, data = specs.get("retrieval"), specs.get("data")
    off = retrieval is None or retrieval.kind == "none"
    if "build_index" in stages and retrieval is not None and off:
        problems.append(
            "stages: build_index builds the retrieval index, but retrieval is none; choose an index kind, "
            "e.g. retrieval=flat_ip (or flat_l2, hnsw, ivf_pq), or drop build_index from stages"
        )
    if not off and retrieval.k > 0 and data is not None and not templated(data.kind):
        problems.append(
            f"retrieval.k: {retrieval.k} passages would go into each prompt, but data kind '{data.kind}' has no prompt "
            "(every token is trained on); use retrieval.k=0 (build and score the index only) or retrieval=none"
        )
    if not off:
        _check_index_order(retrieval, stages, problems)


def _check_index_order(retrieval: Any, stages: list[str], problems: list[str]) -> None:
    """build_index puts the passages into the prepared prompts: after prepare_data (when it reads the data),
    before every stage that reads them; with retrieval on and data prepared, it must be listed."""
    from engine.retrieval.run import needs_examples
    from engine.stages import STAGES

    known = [s for s in stages if s in STAGES]
    gives = [i for i, s in enumerate(known) if "data" in stage_traits(s, "gives")]
    readers = [s for s in known if "data" in stage_traits(s, "needs")]
    plain = [s for s in known if s != "build_index"]  # the list that works: build_index right after prepare_data
    g = next((i for i, s in enumerate(plain) if "data" in stage_traits(s, "gives")), None)
    if g is None:
        plain, g = ["prepare_data", *plain], 0
    fixed = ",".join([*plain[: g + 1], "build_index", *plain[g + 1 :]])
    if "build_index" not in known:
        if gives or readers:
            problems.append(
                f"stages: retrieval={retrieval.kind} puts passages into the prompts in the build_index stage, which is not "
                f"listed; add it after prepare_data, e.g. stages=[{fixed}] (or use retrieval=none)"
            )
        return
    index = known.index("build_index")
    early = [s for s in readers if known.index(s) < index]
    if early:
        problems.append(
            f"stages: {early[0]} runs before build_index, so it would not see the retrieved passages; put build_index "
            f"right after prepare_data, e.g. stages=[{fixed}]"
        )
    why = "indexes the training split (retrieval.corpus=examples)" if needs_examples(retrieval) else None
    if retrieval.k > 0:
        why = f"puts retrieval.k={retrieval.k} passages into each prepared prompt"
    if why and not any(i < index for i in gives):
        problems.append(f"stages: build_index {why}: put prepare_data before it, e.g. stages=[{fixed}]")


def _check_grpo(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """train_grpo needs a reward, prompts to answer from an existing split, a reference when beta > 0,
    and the run dir's checkpoints/ and adapter/ to itself."""
    if "train_grpo" not in stages:
        return
    from pathlib import Path

    from engine.data.templates import templated

    reward, grpo, adapter, data = specs.get("reward"), specs.get("grpo"), specs.get("adapter"), specs.get("data")
    if reward is not None and reward.kind == "none":
        presets = sorted(p.stem for p in (Path(__file__).parent / "conf" / "reward").glob("*.yaml") if p.stem != "none")
        problems.append(
            "reward: train_grpo scores sampled answers with a reward, but reward is none; choose a preset, "
            f"e.g. reward=format_numeric (presets: {', '.join(presets)})"
        )
    if grpo is not None and adapter is not None and grpo.beta > 0 and adapter.kind == "none":
        problems.append(
            f"grpo.beta: {grpo.beta:g} keeps the policy near the reference, which is the base with the adapter switched "
            "off; adapter=none trains every weight, so there is no reference without a second model copy. Use "
            "adapter=lora, or grpo.beta=0 (no KL term)"
        )
    if data is not None and not templated(data.kind):
        problems.append(
            f"data: train_grpo samples answers to prompts, but data kind '{data.kind}' has no prompt (every token is "
            "text); use a data kind with prompts and answers, e.g. data=env_numeric (qa) or data=env_science_chat (chat)"
        )
    elif data is not None and grpo is not None and hasattr(data, "split"):
        separate = {"validation": data.validation_path, "test": data.test_path}.get(grpo.split)
        if not separate and getattr(data.split, grpo.split, 0) == 0:
            problems.append(
                f"grpo.split: '{grpo.split}' gets no examples (data.split.{grpo.split} is 0 and no separate file "
                f"gives it); use grpo.split=train, or give data.split.{grpo.split} a share"
            )
    if "train" in stages or "train_layered" in stages:
        other = "train" if "train" in stages else "train_layered"
        problems.append(
            f"stages: {other} and train_grpo both write checkpoints/ and adapter/ in the run dir; run one training "
            "stage per run (GRPO starts from the model preset, e.g. an instruction-tuned model)"
        )


PREFERENCE_METRICS = ("pref_accuracy", "pref_margin")


def _check_preference(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """Preference losses need preference pairs and pairs need them; dpo needs an adapter to switch off; no packing."""
    from engine.loss import PREFERENCE_KINDS

    loss, data, adapter, ev = specs.get("loss"), specs.get("data"), specs.get("adapter"), specs.get("eval")
    pairs = data is not None and data.kind == "preference"
    if loss is not None and data is not None:
        if loss.kind in PREFERENCE_KINDS and not pairs:
            problems.append(
                f"loss: {loss.kind} learns from pairs of answers, but data kind is '{data.kind}'; use preference data "
                "(data=env_science_preference, or data.kind=preference with prompt/chosen/rejected columns), or loss=ce"
            )
        if pairs and loss.kind not in PREFERENCE_KINDS:
            problems.append(
                f"loss: {loss.kind} trains on one answer per example, but data kind preference holds pairs; "
                f"use a preference loss ({', '.join(f'loss={k}' for k in PREFERENCE_KINDS)})"
            )
    if loss is not None and loss.kind == "dpo" and adapter is not None and adapter.kind == "none":
        problems.append(
            "loss: dpo compares against the base model, which it gets by switching the adapter off (no second copy in "
            "memory); with adapter=none there is nothing to switch off: use adapter=lora, or loss=orpo / loss=simpo "
            "(no reference model)"
        )
    if pairs and getattr(data, "packing", False):
        problems.append(
            "data.packing: preference pairs are compared row against row (chosen vs rejected), so they are not packed; "
            "set data.packing=false"
        )
    if pairs and getattr(data, "train_on_prompt", False):
        problems.append(
            "data.train_on_prompt: preference losses compare the two answers only (the prompt is the same in both); "
            "set data.train_on_prompt=false"
        )
    asked = [m for m in PREFERENCE_METRICS if ev is not None and m in ev.metrics]
    if asked and "evaluate" in stages and data is not None and not pairs:
        problems.append(
            f"eval.metrics: {', '.join(asked)} compare the chosen and the rejected answer of held-out pairs, but data "
            f"kind '{data.kind}' has no pairs; drop them from eval.metrics or use preference data"
        )


def evaluated_run(cfg, validate):
    """Resolve ``eval.run_dir`` (a finished run to evaluate again) into the config, or raise ConfigError.

    Model, data, template and seed come from that run's config.yaml (so the held-out split
    is the one it never trained on); stages, recipe and eval settings stay this run's. The
    trained weights are its adapter/, its layered levels (adapter/level_K, stacked with its
    adapter.scales) or its full model/.
    """
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    from engine.context import EvaluatedRun
    from engine.errors import ConfigError, UserError

    run = Path(cfg.eval.run_dir).expanduser().resolve()
    record = run / "config.yaml"
    if not record.is_file():
        raise ConfigError(
            f"eval.run_dir: {cfg.eval.run_dir} has no config.yaml; point it at a finished run dir (outputs/<recipe>/<time>)"
        )
    try:
        raw = OmegaConf.to_container(OmegaConf.load(record), resolve=True)
    except Exception as e:  # a damaged record is the user's to fix
        raise ConfigError(f"eval.run_dir: cannot read {record.name} of {cfg.eval.run_dir}: {type(e).__name__}: {e}") from None
    raw.setdefault("eval", {})["run_dir"] = None
    raw.setdefault("export", cfg.raw.get("export"))  # runs from before the export group
    raw.setdefault("serve", cfg.raw.get("serve"))  # runs from before the serve group
    raw.setdefault("retrieval", {"kind": "none"})  # runs from before the retrieval group: they retrieved nothing
    raw.setdefault("reward", {"kind": "none"})  # runs from before the reward group
    raw["stages"] = stages_as_ran(list(raw.get("stages") or []))  # runs from before stages declared their needs
    try:
        old = validate(raw)
    except UserError as e:
        raise ConfigError(f"eval.run_dir: its config.yaml no longer validates: {e}") from None
    # train_layered writes adapter/level_K, one PEFT dir per level; they load stacked with that
    # run's adapter.scales, as its own evaluation used them and as the merge stage folds them.
    levels = sorted(int(p.parent.name.rsplit("_", 1)[1]) for p in (run / "adapter").glob("level_*/adapter_config.json"))
    if levels and old.adapter.kind == "layered" and levels != list(range(1, old.adapter.levels + 1)):
        raise ConfigError(
            f"eval.run_dir: {cfg.eval.run_dir} was trained with {old.adapter.levels} adapter levels but adapter/ holds "
            f"level(s) {levels}; point it at a run whose train_layered stage finished"
        )
    if (run / "adapter" / "adapter_config.json").is_file() or (levels and old.adapter.kind == "layered"):
        found = EvaluatedRun(path=run, adapter_dir=run / "adapter")
        model = old.model
    elif (run / "model" / "config.json").is_file():
        from engine.model import HfSpec

        found = EvaluatedRun(path=run, adapter_dir=None, base_model=old.model)
        keep = ("dtype", "chat_template", "lora_targets", "attn_implementation")
        model = HfSpec(kind="hf", name_or_path=str(run / "model"), **{k: getattr(old.model, k) for k in keep})
    else:
        raise ConfigError(
            f"eval.run_dir: {cfg.eval.run_dir} has no trained weights (adapter/, adapter/level_K of a layered run, "
            "or model/); did its train stage finish?"
        )
    if "export_gguf" in cfg.stages:
        from engine.export import export_refusal

        if why := export_refusal(model):
            raise ConfigError(f"eval.run_dir: that run's model {why}; {GGUF_ALTERNATIVES}")
    problems: list[str] = []  # its retrieval (or none) with this run's stages: build_index listed exactly when it retrieved
    _check_retrieval({"retrieval": old.retrieval, "data": old.data}, list(cfg.stages), problems)
    if problems:
        alone = " (or use retrieval=none)"  # not here: the retrieval group is that run's
        raise ConfigError(
            [f"eval.run_dir: that run's retrieval is '{old.retrieval.kind}'; {p.replace(alone, '')}" for p in problems]
        )
    return dataclasses.replace(
        old,
        model=model,
        eval=cfg.eval,
        export=cfg.export,
        serve=cfg.serve,
        stages=cfg.stages,
        recipe=cfg.recipe,
        raw=cfg.raw,
        evaluated_run=found,
    )


def _check_streaming(specs: dict[str, Any], stages: list[str], problems: list[str]) -> None:
    """A streamed train split has no length: training needs a step count, and the stages that read every
    training example (retrieval passages into prompts, GRPO prompts, layered training) need map-style data."""
    data, train = specs.get("data"), specs.get("train")
    if data is None or not getattr(data, "streaming", False):
        return
    if train is not None and not train.max_steps:
        problems.append(
            "train.max_steps: data.streaming=true reads the train file as a stream of unknown length, so "
            "train.epochs cannot be counted; set train.max_steps (e.g. train.max_steps=1000)"
        )
    whole = [s for s in stages if s in ("build_index", "train_grpo", "train_layered")]
    if whole:
        problems.append(f"data.streaming: stage {whole[0]} reads the whole train split; use data.streaming=false")
