"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, fp16: bool = False, betas=(0.9, 0.95)
) -> torch.optim.AdamW:
    """No decay on vectors (norm weights, biases): decaying them only hurts.

    Fused AdamW on GPU, except with fp16: the sharded grad scaler hands a fused step its
    1-element inf flag, which the step cannot subtract from its 0-dim step counters (seen on
    an H200, torch 2.11); the foreach step is unscaled by the scaler first instead."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = params[0].device.type == "cuda" and not fp16
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=not fused)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine to min_lr."""
    if step <= warmup:
        return lr * step / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup: int, total: int
) -> LambdaLR:
    """LambdaLR counts from 0 before the first step; step k+1 uses lr_at(k + 1)."""
    return LambdaLR(
        optimizer,
        lambda k: lr_at(k + 1, lr=lr, min_lr=min_lr, warmup=warmup, total=total) / lr,
    )
