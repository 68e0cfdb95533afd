"""AdamW with decoupled weight decay on matrices only, the learning rate as a function of the
step (warmup, then cosine, linear, constant or warmup-stable-decay), and skipping an update on
a flag that stays on the device."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import torch
from torch import nn

LR_SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_TYPES = ("linear", "cosine", "sqrt")


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    fp16: bool = False,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    own: Iterable[nn.Parameter] = (),
    own_lr: float | None = None,
    own_weight_decay: float | None = None,
) -> torch.optim.AdamW:
    """No decay on vectors (norm weights, biases): decaying them only hurts. Parameters in
    `own` (a sparse method's scores, factors and values) form a group of their own when
    `own_lr` or `own_weight_decay` is given. Each group's `lr_scale` is its peak learning rate
    over `lr`, which `set_lr` applies.

    The fused AdamW (on GPU and CPU alike) can skip a step on a flag that stays on the device
    (`skip_update_if`). With fp16 the grad scaler decides instead: its sharded version hands a
    fused step a 1-element inf flag, which the step cannot subtract from its 0-dim step
    counters (seen on an H200, torch 2.11), so fp16 takes the foreach step, which the scaler
    calls only when the gradients are finite."""
    separate = {id(p) for p in own} if own_lr is not None or own_weight_decay is not None else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in separate]
    groups = [
        {
            "params": [p for p in params if p.ndim >= 2],
            "weight_decay": weight_decay,
            "lr_scale": 1.0,
        },
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if separate:
        groups.append({
            "params": [p for p in model.parameters() if id(p) in separate],
            "weight_decay": weight_decay if own_weight_decay is None else own_weight_decay,
            "lr_scale": 1.0 if own_lr is None else own_lr / lr,
        })  # fmt: skip
    fused = not fp16
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=not fused)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimizer step (1-based): a linear warmup to `lr` over
    `warmup` steps, then by `shape`:

    - cosine: down to `min_lr` at step `total` along half a cosine;
    - linear: down to `min_lr` at step `total` along a line;
    - constant: `lr` to the end;
    - wsd (warmup-stable-decay): `lr` until the last `decay_steps(decay_fraction, total)`
      steps, which decay to `min_lr` along `decay_type` (linear, cosine, or 1 - sqrt); a
      decay that would start inside the warmup starts right after it instead (shorter).

    Every decaying shape is at `min_lr` at step `total` as long as `warmup < total`; with
    `warmup >= total` the run ends inside the warmup (utils/args.py warns at start-up).

    A pure function of the step: a resumed run takes exactly the uninterrupted run's rates,
    and a wsd run resumed with another `total` keeps `lr` until its own decay begins."""

    lr: float
    min_lr: float
    warmup: int
    total: int
    shape: str = "cosine"
    decay_fraction: float = 0.2
    decay_type: str = "linear"

    def lr_at(self, step: int) -> float:
        if step <= self.warmup:  # the share first: lr * W / W can round to above lr
            return self.lr * (step / max(self.warmup, 1))
        if self.shape == "constant":
            return self.lr
        if self.shape == "wsd":
            start = self.decay_start
            if step <= start:
                return self.lr
            curve = self.decay_type
        else:
            start, curve = self.warmup, self.shape
        progress = min((step - start) / max(self.total - start, 1), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * _remaining(progress, curve)

    @property
    def decay_start(self) -> int:
        """The last step before the decay: wsd's stable phase ends here, after the warmup."""
        if self.shape != "wsd":
            return self.warmup
        return max(self.total - decay_steps(self.decay_fraction, self.total), self.warmup)


def decay_steps(decay_fraction: float, total: int) -> int:
    """wsd's decay length: `decay_fraction x total` rounded half up, the fraction taken as
    written (0.25 of 10 is 3 steps, 0.35 of 10 is 4; Python's `round` would give 2 and 4, and
    the float product 0.2 x 110 = 22.000000000000004 would ceil to 23), and at least one step,
    so the last step is at `min_lr` however short the run."""
    exact = Decimal(repr(float(decay_fraction))) * total
    return max(int(exact.to_integral_value(rounding=ROUND_HALF_UP)), 1)


def _remaining(progress: float, curve: str) -> float:
    """The share of the way from min_lr to lr still left at `progress` (0 to 1) of a decay."""
    if curve == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if curve == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of the next step, scaled per group (`lr_scale`): set from the step
    number each step, so a resumed run (with or without its optimizer state) uses exactly
    the uninterrupted run's."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def skip_update_if(optimizer: torch.optim.AdamW, flag: torch.Tensor) -> None:
    """The next `optimizer.step()` leaves weights, moments and step counts unchanged where
    `flag` (a bool tensor on the device) is true; nothing waits for the device to know it."""
    optimizer.found_inf = flag.to(torch.float32)
