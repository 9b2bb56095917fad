"""The training loop: our own, on HF accelerate, read top to bottom.

Why not HF Trainer: we need exact control of what a checkpoint holds (adapter, optimizer,
scheduler, RNG, data position) for bit-exact resume, a loss that projects to the
vocabulary only at labelled positions, and packed batches with block-diagonal masks.
Accelerate still does device placement, mixed precision and DDP/FSDP/DeepSpeed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from engine.data.collate import Batches
from engine.loss import LOSSES


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def total_steps(tcfg, n_micro_per_epoch: int) -> int:
    if tcfg.max_steps:
        return tcfg.max_steps
    return max(1, math.ceil(tcfg.epochs * n_micro_per_epoch / tcfg.grad_accum))


def forward_loss(model, batch: dict, loss_fn):
    """One forward: hidden states from the model, loss only where labels are set."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    lm_head = _unwrap(model).get_output_embeddings()
    return loss_fn(out.hidden_states[-1], batch["labels"], lm_head, batch)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def train(ctx) -> dict:
    cfg, acc = ctx.cfg, ctx.accelerator
    tcfg = cfg.train
    torch.manual_seed(cfg.seed)
    model = ctx.model()
    tokenizer = ctx.tokenizer()
    loss_fn = LOSSES.build(cfg.loss, tokenizer=tokenizer)

    # 1. Data: deterministic order per epoch (seed + epoch), sharded across processes.
    batches = Batches(
        ctx.data.splits["train"],
        micro_batch_size=tcfg.micro_batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=cfg.seed,
        rank=acc.process_index,
        world=acc.num_processes,
    )
    steps = total_steps(tcfg, len(batches))

    # 2. Optimizer and schedule over the trainable parameters only.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tcfg.schedule, tcfg.warmup_steps, steps)
    )
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    model.train()

    log_path = ctx.run_dir / "train_log.jsonl"
    log = open(log_path, "a") if ctx.is_main else None
    stream = batches.stream(start=0)
    t_start = time.perf_counter()
    tokens_seen, loss_sum, first_step_s = 0, 0.0, None
    progress = _progress(steps, disable=not ctx.is_main)

    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        step_tokens, step_loss = 0, 0.0
        # 3. Gradient accumulation over micro-batches.
        for micro in range(tcfg.grad_accum):
            batch = {k: v.to(acc.device) for k, v in next(stream).items()}
            real = int(batch.pop("real_tokens"))
            sync = micro == tcfg.grad_accum - 1
            with acc.no_sync(model) if not sync and acc.num_processes > 1 else _null():
                with acc.autocast():
                    loss, parts = forward_loss(model, batch, loss_fn)
                acc.backward(loss / tcfg.grad_accum)
            step_loss += loss.item() / tcfg.grad_accum
            step_tokens += real
        # 4. Clip, step, schedule.
        if tcfg.max_grad_norm:
            acc.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        first_step_s = first_step_s or (time.perf_counter() - t_start)
        tokens_seen += step_tokens
        loss_sum += step_loss
        rec = {
            "step": step,
            "loss": round(step_loss, 6),
            "lr": scheduler.get_last_lr()[0],
            "tokens": step_tokens,
            "tokens_per_s": round(step_tokens / dt, 1),
        }
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}")
    progress.close()
    if log:
        log.close()

    elapsed = time.perf_counter() - t_start
    adapter_dir = save_adapter(ctx, model)
    first = _read_losses(log_path)
    return {
        "steps": steps,
        "first_loss": first[0] if first else None,
        "final_loss": first[-1] if first else None,
        "train_seconds": round(elapsed, 2),
        "tokens": tokens_seen,
        "tokens_per_s": round(tokens_seen / elapsed, 1),
        "time_to_first_step_s": round(first_step_s or 0.0, 2),
        "precision": acc.mixed_precision,
        "device": str(acc.device),
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
    }


def save_adapter(ctx, model) -> Path | None:
    """PEFT adapter dir (loadable with PeftModel.from_pretrained); full model if no adapter."""
    acc = ctx.accelerator
    acc.wait_for_everyone()
    inner = acc.unwrap_model(model)
    out = ctx.run_dir / ("adapter" if hasattr(inner, "peft_config") else "model")
    if acc.is_main_process:
        inner.save_pretrained(out, safe_serialization=True)
        if out.name == "model":
            ctx.tokenizer().save_pretrained(out)
    acc.wait_for_everyone()
    return out


def _read_losses(path: Path) -> list[float]:
    if not path.exists():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def _progress(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", disable=disable, dynamic_ncols=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
