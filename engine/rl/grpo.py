"""The GRPO loop: sample a group of answers per prompt, score them, move towards the better ones.

Read it like engine/train/loop.py: ``set_up`` (prompt stream, optimizer, schedule, resume),
``grpo_step`` (one step, numbered comments) and ``finish`` (final adapter, summary). One step:
take ``grpo.prompts_per_step`` prompts from a deterministic stream over the ``grpo.split``
examples -> sample ``grpo.group_size`` completions for each (``generate``, stopping at the
template's end of turn) -> score them with the run's reward -> group-normalised advantages ->
``grpo.iterations`` updates of the clipped surrogate plus ``beta`` x KL to the reference
(engine/rl/objective.py) -> log (train_log.jsonl per step, samples.jsonl per answer) -> maybe
checkpoint. A step is one round of sampling; the learning-rate schedule and ``train.max_steps``
count those rounds.

The reference is the base model with the LoRA adapter switched off (peft's
``disable_adapter()``, no gradients): no second copy of the model in memory.

Why not TRL's GRPOTrainer: engine's contract is that a run killed at any moment resumes
bit-identically from its last complete checkpoint (engine/train/checkpoint.py: trainable
weights, optimizer, scheduler, the RNG states that sampling draws from, the prompt position,
a config hash; written atomically, verified by checksum, a changed config refused). GRPOTrainer
checkpoints through HF Trainer: its checkpoint dirs are not written atomically or verified,
resume skips data by replaying its sampler, and an identical continuation of the sampled
completions is not part of its contract. It also wants its own dataset, template and reward
function objects rather than engine's prepared splits, stops and reward group. The loop itself
is short, so it is ours, and it reuses the train loop's optimizer, schedule, checkpoint files,
loggers and signal handling.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError, UserError
from engine.evaluate.generation import stop_config
from engine.files import portable_config, shown_path
from engine.rl.objective import completion_logprobs, group_advantages, sequence_terms
from engine.rl.sampling import PromptStream, Samples, sample
from engine.speed.apply import speedups
from engine.train import checkpoint as ckpt_io
from engine.train.loop import (
    Diverged,
    Interrupted,
    StopOnSignal,
    load_trainable,
    lr_lambda,
    make_optimizer,
    reapply_hyperparameters,
    save_adapter,
)

SAMPLES = "samples.jsonl"


@dataclass(frozen=True)
class GrpoJob:
    """What one GRPO run needs, as plain values (the train_grpo stage builds it from the run context)."""

    cfg: Any
    """The validated RunConfig (grpo, train, model, seed and raw are read)."""
    run_dir: Path
    accelerator: Any
    model: Any
    """The policy: base + a trainable adapter (a PEFT model when grpo.beta > 0)."""
    tokenizer: Any
    data: Any
    """The prepared DataBundle: prompts of ``grpo.split``, rendered with its template."""
    reward: Any
    """An ``engine.reward`` Reward: ``score(completions, items) -> [Scored]``."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class GrpoState:
    """Progress a checkpoint carries besides tensors."""

    step: int = 0
    data_position: int = 0
    """Prompts taken from the stream so far: where resume continues."""
    completions: int = 0
    tokens: int = 0
    """Completion tokens sampled so far."""


@dataclass
class _Run:
    """What set-up hands to every step and to finish."""

    job: GrpoJob
    model: Any
    optimizer: Any
    scheduler: Any
    params: list
    prompts: list[str]
    """Every prompt of the split, rendered up to the assistant's turn."""
    items: list
    """The reward's view of each example (RewardItem), same order as ``prompts``."""
    stream: PromptStream
    eos_ids: list[int]
    stops: list[str]
    steps: int
    state: GrpoState
    resumed_from: int | None
    t_start: float = 0.0
    tokens_now: int = 0
    stopped: str | None = None
    log: Any = None
    samples_log: Any = None
    """samples.jsonl: every scored completion (step, prompt index in the split, text, reward, parts)."""
    sinks: Any = None
    progress: Any = None
    stop: Any = None


def train_grpo(job: GrpoJob) -> dict:
    """One GRPO run: set up, step until done (or stopped), finish. Returns its metrics."""
    tcfg = job.cfg.train
    with speedups(
        job.model,
        device_type=job.accelerator.device.type,
        packing=False,
        keep_freed_memory=tcfg.keep_freed_memory,
        fused_ops=tcfg.fused_ops,
        compile=tcfg.compile,
        mixed_precision=job.accelerator.mixed_precision,
    ) as speed:
        if job.is_main:
            print(f"[engine] speed-ups: {speed.switches.summary()}", flush=True)
        run = set_up(job)
        with _outputs(run):
            for step in range(run.state.step + 1, run.steps + 1):
                grpo_step(run, step)
                if run.stopped:
                    break
    return {**finish(run), "speedups": dict(speed.switches.status)}


# ---------------------------------------------------------------- set-up


def set_up(job: GrpoJob) -> _Run:
    """Prompts and their stream, optimizer and schedule, then the resume point (RNG last)."""
    cfg, acc, tcfg, g = job.cfg, job.accelerator, job.cfg.train, job.cfg.grpo
    if acc.num_processes > 1:
        raise UserError(
            f"train_grpo runs in one process (sampling and updates share one model); this launch has "
            f"{acc.num_processes}: run it with plain `python -m engine`"
        )
    if job.reward is None:
        raise ConfigError("reward: train_grpo needs a reward to score completions; choose a preset, e.g. reward=format_numeric")
    torch.manual_seed(cfg.seed)

    # 1. Prompts: the split's examples rendered as generation prompts, in a seeded order per epoch.
    from engine.reward import items_from_examples

    examples = job.data.splits.get(g.split) or []
    if not examples:
        raise UserError(
            f"grpo.split: the '{g.split}' split has no examples after prepare_data; use grpo.split=train "
            "or give data.split a share for it"
        )
    prompts = [job.data.prompt_text(ex, job.tokenizer) for ex in examples]
    eos_ids, stops = stop_config(job.data.template, job.tokenizer, [])
    steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * len(examples) / g.prompts_per_step))

    # 2. Optimizer and schedule (the train group's) over the trainable parameters only.
    model = job.model
    optimizer = make_optimizer(tcfg, [p for p in model.parameters() if p.requires_grad], acc.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.schedule, tcfg.warmup_steps, steps))
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    # 3. Resume from the newest intact checkpoint; its RNG state is restored last, so the next
    #    step samples exactly what it would have sampled in an uninterrupted run.
    state, resumed_from = GrpoState(), None
    found = ckpt_io.resume_checkpoint(job.run_dir, is_main=job.is_main) if tcfg.resume != "never" else None
    if found is not None:
        data = ckpt_io.load_checkpoint(found)
        load_trainable(acc, model, data["tensors"])
        optimizer.load_state_dict(data["optimizer"])
        scheduler.load_state_dict(data["scheduler"])
        fields = GrpoState.__dataclass_fields__
        state = GrpoState(**{k: v for k, v in data["state"].items() if k in fields})
        resumed_from = state.step
        if steps < state.step:
            raise ConfigError(
                f"train.max_steps: this run now has {steps} steps, but its checkpoint is at step {state.step}: "
                f"set train.max_steps to at least {state.step}, or start over with train.resume=never"
            )
        ckpt_io.set_rng_state(data["rng"][0])
    reapply_hyperparameters(optimizer, scheduler, tcfg)
    return _Run(
        job=job,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        prompts=prompts,
        items=items_from_examples(examples),
        stream=PromptStream(len(examples), cfg.seed),
        eos_ids=eos_ids,
        stops=stops,
        steps=steps,
        state=state,
        resumed_from=resumed_from,
    )


@contextlib.contextmanager
def _outputs(run: _Run):
    """train_log.jsonl, the metric sinks, the progress bar and the signal handler while steps run."""
    from tqdm.auto import tqdm

    from engine.train.loggers import Loggers

    job = run.job
    log_path = job.run_dir / "train_log.jsonl"
    if job.is_main:
        ckpt_io.truncate_log(log_path, run.state.step)
        ckpt_io.truncate_log(job.run_dir / SAMPLES, run.state.step)
        run.log = open(log_path, "a")
        run.samples_log = open(job.run_dir / SAMPLES, "a")
        run.sinks = Loggers(job.cfg.train.loggers, job.run_dir, start_step=run.state.step, config=portable_config(job.cfg.raw))
    run.stop = StopOnSignal()
    run.progress = tqdm(total=run.steps, initial=run.state.step, desc="grpo", disable=not job.is_main, dynamic_ncols=True)
    run.t_start = time.perf_counter()
    try:
        yield
    finally:
        run.stop.restore()
        run.progress.close()
        if run.log:
            run.log.close()
            run.samples_log.close()
            run.sinks.close()


# ---------------------------------------------------------------- one step


def grpo_step(run: _Run, step: int) -> None:
    """Sample, score, update ``grpo.iterations`` times, log, maybe checkpoint."""
    job, state, acc = run.job, run.state, run.job.accelerator
    g, tcfg = job.cfg.grpo, job.cfg.train
    t0 = time.perf_counter()

    # 4. The next prompts from the stream, each repeated group_size times for the reward.
    picked = run.stream.take(state.data_position, g.prompts_per_step)
    items = [run.items[i] for i in picked for _ in range(g.group_size)]

    # 5. Sample the groups with the current policy (eval mode: no dropout).
    run.model.eval()
    samples = sample(
        acc.unwrap_model(run.model),
        job.tokenizer,
        [run.prompts[i] for i in picked],
        group_size=g.group_size,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        eos_ids=run.eos_ids,
        stops=run.stops,
        device=acc.device,
        autocast=acc.autocast,
    )

    # 6. Score every completion; advantages within each prompt's group.
    scored = job.reward.score(samples.texts, items)
    rewards = torch.tensor([s.value for s in scored], dtype=torch.float32)
    advantages = group_advantages(rewards, g.group_size, scale=g.scale_rewards)

    # 7. Log-probs at sampling time (only needed when the policy moves between iterations) and of
    #    the reference (adapter off), without gradients.
    old = _logprobs(run, samples, adapter=True) if g.iterations > 1 else None
    ref = _logprobs(run, samples, adapter=False) if g.beta > 0 else None

    # 8. Policy updates on the clipped surrogate; one schedule step per round of sampling.
    run.model.train()
    for _ in range(g.iterations):
        loss, kl, clipped = _update(run, samples, advantages, old, ref)
        grad_norm = acc.clip_grad_norm_(run.params, tcfg.max_grad_norm) if tcfg.max_grad_norm else None
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
            raise Diverged(
                f"train_grpo: the loss or gradient norm is not finite at step {step}; nothing was saved from it "
                f"(the last checkpoint stays). Lower train.lr (now {tcfg.lr:g}) or grpo.beta, or raise grpo.clip_eps"
            )
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()

    # 9. Log first, then checkpoint: a crash in between only repeats logged steps.
    tokens = int(samples.completion_mask.sum())
    state.step, state.data_position = step, state.data_position + g.prompts_per_step
    state.completions += len(samples.texts)
    state.tokens += tokens
    run.tokens_now += tokens
    rec = _record(step, loss, lr, scored, rewards, g.group_size, kl, clipped, samples, time.perf_counter() - t0)
    if run.log:
        run.log.write(json.dumps(rec) + "\n")
        run.log.flush()
        run.sinks.log(rec)
        for k, (text, s) in enumerate(zip(samples.texts, scored, strict=True)):
            row = {"step": step, "prompt": picked[k // g.group_size], "text": text, "reward": s.value, "parts": s.parts}
            run.samples_log.write(json.dumps(row, ensure_ascii=False) + "\n")
        run.samples_log.flush()
    ckpt_io.crash_point("step", step)
    if run.stop.requested(acc):
        run.stopped = "signal"
    due = tcfg.save_every and step % tcfg.save_every == 0
    if due or run.stopped or step == run.steps:
        _save(run)
    run.progress.update(1)
    if step % tcfg.log_every == 0 or step == run.steps:
        run.progress.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{kl:.4f}")


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def sequence_logprobs(model, samples: Samples, *, rows: int, temperature: float, adapter: bool = True, autocast=None):
    """Completion log-probs without gradients, ``rows`` at a time: the policy's, or (``adapter=False``)
    the reference's, which is the same module with its adapter switched off (``disable_adapter``)."""
    switch = contextlib.nullcontext() if adapter else model.disable_adapter()
    out = []
    with torch.no_grad(), switch:
        for part in _chunks(samples.input_ids.shape[0], rows):
            with autocast() if autocast else contextlib.nullcontext():
                out.append(
                    completion_logprobs(model, samples.input_ids[part], samples.attention_mask[part], samples.width, temperature)
                )
    return torch.cat(out)


def _logprobs(run: _Run, samples: Samples, *, adapter: bool) -> torch.Tensor:
    acc = run.job.accelerator
    return sequence_logprobs(
        acc.unwrap_model(run.model),
        samples,
        rows=run.job.cfg.train.micro_batch_size,
        temperature=run.job.cfg.grpo.temperature,
        adapter=adapter,
        autocast=acc.autocast,
    )


def _update(run: _Run, samples: Samples, advantages, old, ref) -> tuple[float, float, float]:
    """One optimizer step's gradients over every completion (micro-batches of train.micro_batch_size rows).

    Each micro-batch adds its completions' summed losses / all completions, so the gradient is
    that of the mean over the whole step whatever the micro-batch size. Returns the loss, the
    mean KL and the fraction of completion tokens clipped.
    """
    acc, g = run.job.accelerator, run.job.cfg.grpo
    rows = samples.input_ids.shape[0]
    loss_sum = kl_sum = clipped = tokens = 0.0
    for part in _chunks(rows, run.job.cfg.train.micro_batch_size):
        with acc.autocast():
            logp = completion_logprobs(
                run.model, samples.input_ids[part], samples.attention_mask[part], samples.width, g.temperature
            )
        terms = sequence_terms(
            logp,
            logp.detach() if old is None else old[part],
            None if ref is None else ref[part],
            advantages[part],
            samples.completion_mask[part],
            clip_eps=g.clip_eps,
            beta=g.beta,
        )
        acc.backward(terms.loss.sum() / rows)
        loss_sum += float(terms.loss.detach().sum())
        kl_sum += float(terms.kl.sum())
        clipped += float(terms.clipped.sum())
        tokens += float(terms.tokens.sum())
    return loss_sum / rows, kl_sum / rows, clipped / max(tokens, 1.0)


def _record(step, loss, lr, scored, rewards, group_size, kl, clipped, samples: Samples, seconds: float) -> dict:
    """One train_log.jsonl line: loss, lr, reward mean/std and each part's mean, KL, clipping, lengths."""
    groups = rewards.reshape(-1, group_size)
    lengths = samples.completion_mask.sum(1).tolist()
    rec = {
        "step": step,
        "loss": round(loss, 6),
        "lr": lr,
        "reward_mean": round(float(rewards.mean()), 6),
        "reward_std": round(float(rewards.std()) if rewards.numel() > 1 else 0.0, 6),
    }
    for name in sorted({k for s in scored for k in s.parts}):
        values = [float(s.parts[name]) for s in scored if name in s.parts]
        rec[f"reward_{name}"] = round(statistics.fmean(values), 6)
    rec.update(
        {
            "kl": round(kl, 6),
            "clip_frac": round(clipped, 6),
            "completion_len": round(statistics.fmean(lengths), 2),
            "groups_without_signal": int((groups.std(dim=1) == 0).sum()) if group_size > 1 else 0,
            "tokens": int(sum(lengths)),
            "tokens_per_s": round(sum(lengths) / seconds, 1) if seconds else None,
        }
    )
    return rec


# ---------------------------------------------------------------- checkpoints


def _save(run: _Run) -> None:
    """The train loop's checkpoint files: trainable weights, optimizer, scheduler, RNG, progress."""
    job, acc, state = run.job, run.job.accelerator, run.state
    if not job.is_main:
        return
    inner = acc.unwrap_model(run.model)
    ckpt_io.write_checkpoint(
        job.run_dir,
        state.step,
        tensors={n: p for n, p in inner.named_parameters() if p.requires_grad},
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        rng=[ckpt_io.rng_state()],
        state={
            **asdict(state),
            "config_hash": ckpt_io.config_hash(job.cfg.raw),
            "config": ckpt_io.hashed_config(job.cfg.raw),
            "processes": 1,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    ckpt_io.rotate(job.run_dir, job.cfg.train.keep_last, set())


# ---------------------------------------------------------------- finish


def finish(run: _Run) -> dict:
    """After the last step: report a signal stop, save the adapter, summarise."""
    job, state, acc = run.job, run.state, run.job.accelerator
    if run.stopped == "signal":
        where = ckpt_io.checkpoints_dir(job.run_dir) / f"step-{state.step}"
        raise Interrupted(
            f"interrupted by {signal.Signals(run.stop.signum).name} after step {state.step}; checkpoint {where} written. "
            f"Re-run the same command with hydra.run.dir={job.run_dir} to continue.",
            run.stop.signum,
        )
    elapsed = time.perf_counter() - run.t_start
    adapter_dir = save_adapter(job, run.model)
    log_path = job.run_dir / "train_log.jsonl"
    recs = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
    if job.is_main and job.cfg.train.plot and recs:
        from engine.train.loggers import plot

        plot(log_path, job.run_dir / "loss.png")
    window = max(1, min(5, len(recs) // 4 or 1))
    rewards = [r["reward_mean"] for r in recs if "reward_mean" in r]
    return {
        "steps": state.step,
        "resumed_from_step": run.resumed_from,
        "stopped": run.stopped or "completed",
        "prompts": state.data_position,
        "completions": state.completions,
        "group_size": job.cfg.grpo.group_size,
        "first_loss": recs[0]["loss"] if recs else None,
        "final_loss": recs[-1]["loss"] if recs else None,
        "reward_first": round(statistics.fmean(rewards[:window]), 4) if rewards else None,
        "reward_last": round(statistics.fmean(rewards[-window:]), 4) if rewards else None,
        "reward_window": window,
        "final_kl": recs[-1].get("kl") if recs else None,
        "train_seconds": round(elapsed, 2),
        "tokens": state.tokens,
        "tokens_per_s": round(run.tokens_now / elapsed, 1) if elapsed else None,
        "precision": acc.mixed_precision,
        "device": str(acc.device),
        "adapter_dir": shown_path(adapter_dir, job.run_dir) if adapter_dir else None,
    }
