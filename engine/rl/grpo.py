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
is short, so it is ours, and it runs on the scaffold it shares with engine/train/loop.py: job and
progress types, optimizer and schedule, outputs and loggers, signals, checkpoints and the final adapter.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import torch

from engine.errors import ConfigError, UserError
from engine.evaluate.generation import stop_config
from engine.files import shown_path
from engine.reward import RewardItem, items_from_examples
from engine.rl.job import GrpoJob, GrpoState
from engine.rl.objective import completion_logprobs, group_advantages, sequence_terms
from engine.rl.sampling import PromptStream, Samples, sample
from engine.runs import TRAIN_LOG, read_log
from engine.train import checkpoint as ckpt_io
from engine.train.guard import Diverged
from engine.train.job import Run
from engine.train.loggers import plot
from engine.train.optim import optimize, total_steps
from engine.train.saving import resume, save_adapter, save_checkpoint, uses_accelerate_state
from engine.train.scaffold import outputs, speed_switches
from engine.train.signals import raise_if_interrupted

SAMPLES = "samples.jsonl"


@dataclass(kw_only=True)
class GrpoRun(Run):
    """A Run of this loop: the prompts, their stream and how sampling stops."""

    job: GrpoJob
    state: GrpoState
    prompts: list[str]
    """Every prompt of the split, rendered up to the assistant's turn."""
    items: list[RewardItem]
    """The reward's view of each example, same order as ``prompts``."""
    stream: PromptStream
    eos_ids: list[int]
    stops: list[str]
    samples_log: IO | None = None
    """samples.jsonl (rank 0): every scored completion (step, prompt index in the split, text, reward, parts)."""


def train_grpo(job: GrpoJob) -> dict:
    """One GRPO run: set up, step until done (or stopped), finish. Returns its metrics."""
    with speed_switches(job, packing=False) as speed:
        run = set_up(job)
        with outputs(run, "grpo") as run.out, _samples_log(run) as run.samples_log:
            for step in range(run.state.step + 1, run.steps + 1):
                grpo_step(run, step)
                if run.stopped:
                    break
    return {**finish(run), "speedups": dict(speed.switches.status)}


# ---------------------------------------------------------------- set-up


def set_up(job: GrpoJob) -> GrpoRun:
    """Prompts and their stream, optimizer and schedule, then the resume point (RNG included)."""
    acc, tcfg, g = job.accelerator, job.train, job.grpo
    if acc.num_processes > 1:
        raise UserError(
            f"train_grpo runs in one process (sampling and updates share one model); this launch has "
            f"{acc.num_processes}: run it with plain `python -m engine`"
        )
    if job.reward is None:
        raise ConfigError("reward: train_grpo needs a reward to score completions; choose a preset, e.g. reward=format_numeric")
    torch.manual_seed(job.seed)

    # 1. Prompts: the split's examples rendered as generation prompts, in a seeded order per epoch.
    examples = job.data.splits.get(g.split) or []
    if not examples:
        raise UserError(
            f"grpo.split: the '{g.split}' split has no examples after prepare_data; use grpo.split=train "
            "or give data.split a share for it"
        )
    prompts = [job.data.prompt_text(ex, job.tokenizer) for ex in examples]
    eos_ids, stops = stop_config(job.data.template, job.tokenizer, [])
    steps = total_steps(tcfg, len(examples), g.prompts_per_step)

    # 2. Optimizer and schedule (the train group's) over the trainable parameters only.
    model, optimizer, scheduler, params = optimize(job, steps)
    sharded = uses_accelerate_state(acc)

    # 3. Resume from the newest intact checkpoint; its RNG state is restored with it, so the
    #    next step samples exactly what it would have sampled in an uninterrupted run.
    state, resumed_from = resume(job, model, optimizer, scheduler, sharded=sharded, steps=steps, fresh=GrpoState())
    return GrpoRun(
        job=job,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        sharded=sharded,
        steps=steps,
        state=state,
        resumed_from=resumed_from,
        prompts=prompts,
        items=items_from_examples(examples),
        stream=PromptStream(len(examples), job.seed),
        eos_ids=eos_ids,
        stops=stops,
    )


@contextlib.contextmanager
def _samples_log(run: GrpoRun) -> Iterator[IO | None]:
    """samples.jsonl, cut back to the resumed step like train_log.jsonl (rank 0; None elsewhere)."""
    if not run.job.is_main:
        yield None
        return
    path = run.job.run_dir / SAMPLES
    ckpt_io.truncate_log(path, run.state.step)
    with open(path, "a") as f:
        yield f


# ---------------------------------------------------------------- one step


def grpo_step(run: GrpoRun, step: int) -> None:
    """Sample, score, update ``grpo.iterations`` times, log, maybe checkpoint."""
    job, state, acc = run.job, run.state, run.job.accelerator
    g, tcfg = job.grpo, job.train
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
    run.out.record(rec)
    if run.samples_log:
        for k, (text, s) in enumerate(zip(samples.texts, scored, strict=True)):
            row = {"step": step, "prompt": picked[k // g.group_size], "text": text, "reward": s.value, "parts": s.parts}
            run.samples_log.write(json.dumps(row, ensure_ascii=False) + "\n")
        run.samples_log.flush()
    ckpt_io.crash_point("step", step)
    if run.out.stop.requested(acc):
        run.stopped = "signal"
    due = tcfg.save_every and step % tcfg.save_every == 0
    if due or run.stopped or step == run.steps:
        save_checkpoint(run, protect=set())
    run.out.advance(step, last=step == run.steps, reward=f"{rec['reward_mean']:.3f}", kl=f"{kl:.4f}")


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


def _logprobs(run: GrpoRun, samples: Samples, *, adapter: bool) -> torch.Tensor:
    acc = run.job.accelerator
    return sequence_logprobs(
        acc.unwrap_model(run.model),
        samples,
        rows=run.job.train.micro_batch_size,
        temperature=run.job.grpo.temperature,
        adapter=adapter,
        autocast=acc.autocast,
    )


def _update(run: GrpoRun, samples: Samples, advantages, old, ref) -> tuple[float, float, float]:
    """One optimizer step's gradients over every completion (micro-batches of train.micro_batch_size rows).

    Each micro-batch adds its completions' summed losses / all completions, so the gradient is
    that of the mean over the whole step whatever the micro-batch size. Returns the loss, the
    mean KL and the fraction of completion tokens clipped.
    """
    acc, g = run.job.accelerator, run.job.grpo
    rows = samples.input_ids.shape[0]
    loss_sum = kl_sum = clipped = tokens = 0.0
    for part in _chunks(rows, run.job.train.micro_batch_size):
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


# ---------------------------------------------------------------- finish


def finish(run: GrpoRun) -> dict:
    """After the last step: report a signal stop, save the adapter, summarise."""
    job, state, acc = run.job, run.state, run.job.accelerator
    raise_if_interrupted(run)
    elapsed = time.perf_counter() - run.out.t_start
    adapter_dir = save_adapter(job, run.model, sharded=run.sharded)
    recs = read_log(job.run_dir / TRAIN_LOG)
    if job.is_main and job.train.plot and recs:
        plot(recs, job.run_dir / "loss.png")
    window = max(1, min(5, len(recs) // 4 or 1))
    rewards = [r["reward_mean"] for r in recs if "reward_mean" in r]
    return {
        "steps": state.step,
        "resumed_from_step": run.resumed_from,
        "stopped": run.stopped or "completed",
        "prompts": state.data_position,
        "completions": state.completions,
        "group_size": job.grpo.group_size,
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
