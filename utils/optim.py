"""AdamW with decoupled weight decay on matrices only, the warmup + cosine learning rate, and
skipping an update on a flag that stays on the device."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, fp16: bool = False, betas=(0.9, 0.95)
) -> torch.optim.AdamW:
    """No decay on vectors (norm weights, biases): decaying them only hurts.

    The fused AdamW (on GPU and CPU alike) can skip a step on a flag that stays on the device
    (`skip_update_if`). With fp16 the grad scaler decides instead: its sharded version hands a
    fused step a 1-element inf flag, which the step cannot subtract from its 0-dim step
    counters (seen on an H200, torch 2.11), so fp16 takes the foreach step, which the scaler
    calls only when the gradients are finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=not fp16, foreach=fp16)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine to min_lr."""
    if step <= warmup:
        return lr * step / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of the next step: a pure function of the step number, so a resumed
    run (with or without its optimizer state) uses exactly the uninterrupted run's."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def skip_update_if(optimizer: torch.optim.AdamW, flag: torch.Tensor) -> None:
    """The next `optimizer.step()` leaves weights, moments and step counts unchanged where
    `flag` (a bool tensor on the device) is true; nothing waits for the device to know it."""
    optimizer.found_inf = flag.to(torch.float32)
