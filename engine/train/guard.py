"""Stop a run whose training blew up, before anything is saved from it.

Why: with a far too high learning rate a run can go on to a constant loss with weights of
1e9 and exit 0, writing checkpoints and an adapter of garbage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from engine.errors import UserError
from engine.train import checkpoint as ckpt_io
from engine.train.job import Run

# Growth over the start of this process that no healthy run shows (measured on the tiny model
# at lr 1e-2 over 30 steps: weights x1.4, loss falling; at lr 1e9: weights x1.5e10 in one step).
LOSS_GROWTH = 1e3
WEIGHT_GROWTH = 1e3


class Diverged(UserError):
    """Training blew up (non-finite or exploding loss, gradients or weights); nothing was saved from it."""


@dataclass
class Guard:
    """What "training blew up" is measured against: the weights' size at the start and the first loss."""

    lr: float
    weight_norm: float
    first_loss: float | None = None

    def problem(self, loss: float, grad_norm: float | None, weight_norm: float) -> str | None:
        """Why this step's numbers mean divergence, or None."""
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm became {grad_norm}"
        if not math.isfinite(weight_norm):
            return "the trainable weights became non-finite"
        if self.weight_norm > 0 and weight_norm > WEIGHT_GROWTH * self.weight_norm:
            return f"the trainable weights grew {_num(weight_norm / self.weight_norm)} times larger than at the start"
        first = self.first_loss = loss if self.first_loss is None else self.first_loss
        if abs(loss) > LOSS_GROWTH * max(abs(first), 1.0):
            return f"loss grew from {first:.4g} to {loss:.4g}"
        return None

    def check(self, run: Run, step: int, loss: float, grad_norm) -> None:
        """Raise Diverged (before this step is logged or saved) when the step blew training up.

        Every rank sees the same reduced loss, global gradient norm and (summed when sharded)
        weight norm, so all stop together.
        """
        if grad_norm is not None:  # a tensor (a DTensor under FSDP2); None when not clipping or under DeepSpeed
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        why = self.problem(loss, grad_norm, weight_norm(run.params, run.job.accelerator, run.sharded))
        if why is None:
            return
        kept = ckpt_io.latest_checkpoint(run.job.run_dir)
        last = f"the last good checkpoint {kept.path.name} is kept" if kept else "no checkpoint was written before it"
        raise Diverged(
            f"step {step}: {why}; training stopped and nothing was saved from this step "
            f"(train.lr={_num(self.lr)} is likely too high; {last})"
        )


def _num(x: float) -> str:
    """1e9 as people write it (not 1e+09)."""
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", f"{x:.2g}")


def weight_norm(params: list, acc, sharded: bool) -> float:
    """L2 norm of the trainable weights (over all ranks' shards when sharded)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    if not local:
        return 0.0
    sq = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum()
    if sharded and acc.num_processes > 1:
        sq = acc.reduce(sq.to(acc.device), "sum")
    return float(sq.sqrt())
