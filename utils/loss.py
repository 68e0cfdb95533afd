"""The training objective: next-token cross-entropy summed over labelled tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def predicted_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: every position whose next label is not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def next_token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed (not averaged) NLL in fp32, so micro-batches and ranks add up exactly."""
    vocab = logits.size(-1)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
