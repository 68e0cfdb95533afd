"""The training objective: next-token cross-entropy summed over labelled tokens.

Two ways to compute it, with the same value (fp32 sums) and gradients:
- `next_token_nll_sum` on the logits the model returns: simple, but the batch's full logits
  exist at once, in the compute dtype and again in fp32 (a [tokens, vocab] tensor each);
- `ChunkedLossHead`: the model's output layer, swapped in under the same parameter name
  (`lm_head.weight`), hands (a copy of) its input back during training, and
  `chunked_next_token_nll_sum` computes logits, loss and gradients a slice of tokens at a
  time, so only one slice of logits ever exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# Logit elements per chunk: 64M (256 MB in fp32), e.g. 2,097 tokens of a 32,000-token vocabulary.
# Large enough that each chunk's matmuls keep a GPU busy, small next to the full logits.
CHUNK_LOGITS = 1 << 26


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


def model_nll_sum(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Run the model on `inputs` (input_ids, and position_ids if any) and return its summed
    next-token NLL, chunked when it has the chunked head.

    The root forward must run whole: under FSDP2 it is what gathers the head's weight, which
    the root keeps unsharded after forward, so the loss can use it once the forward returns."""
    head = model.get_output_embeddings()
    if not isinstance(head, ChunkedLossHead):
        return next_token_nll_sum(model(**inputs).logits, labels)
    with head.returning_hidden_states():
        hidden = model(**inputs).logits
    return chunked_next_token_nll_sum(hidden, head.weight, labels, head.chunk_loss)


class ChunkedLossHead(nn.Linear):
    """The output projection, an nn.Linear in every way (name, weight, logits) except that
    inside `returning_hidden_states()` it returns (a copy of) its input: the final hidden states."""

    def __init__(self, linear: nn.Linear, compile_chunks: bool) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # the same Parameter, so tied embeddings stay tied
        self.chunk_loss = (
            torch.compile(chunk_loss_and_grad) if compile_chunks else chunk_loss_and_grad
        )
        self._return_hidden = False

    @contextmanager
    def returning_hidden_states(self) -> Iterator[None]:
        self._return_hidden = True
        try:
            yield
        finally:
            self._return_hidden = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self._return_hidden:
            return super().forward(hidden)
        # A copy, not the slice transformers hands in: the root would return a view, which FSDP2
        # warns about (an in-place op on it would skip its backward hook). Costs what the
        # next-token slice used to: chunked_next_token_nll_sum shifts the labels instead.
        return hidden.clone()


def use_chunked_loss(model: nn.Module, compile_chunks: bool) -> None:
    """Swap in the chunked head, on the meta model before sharding (names do not change)."""
    linear = model.get_output_embeddings()
    if linear.bias is not None:
        raise ValueError("the chunked loss supports output layers without bias only")
    model.set_output_embeddings(ChunkedLossHead(linear, compile_chunks))


def chunked_next_token_nll_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_loss: Callable | None = None,
) -> torch.Tensor:
    """`next_token_nll_sum(hidden @ weight.T, labels)` without materialising all the logits.

    Position t predicts label t + 1; the last position of each row, with nothing to predict,
    gets an ignored target (no loss, no gradient), so the hidden states need no slicing copy."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.size(-1))
    chunk_rows = max(1, CHUNK_LOGITS // weight.size(0))
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, targets, chunk_rows, chunk_loss or chunk_loss_and_grad
    )


def chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of one chunk (fp32) and its gradient with respect to the logits (softmax
    minus one-hot; zero on ignored rows), in the logits' dtype."""
    dtype = logits.dtype
    logits = logits.float()
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0)
    log_norm = logits.logsumexp(dim=-1)
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
    loss = torch.where(valid, log_norm - target_logits, 0.0).sum()
    grad = torch.exp(logits - log_norm[:, None]) * valid[:, None]
    rows = torch.arange(targets.size(0), device=targets.device)
    grad[rows, safe_targets] -= valid.float()
    return loss, grad.to(dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both input gradients are computed chunk by chunk in forward (the gradient of a
    summed loss does not depend on anything later), so backward only scales them: three matmuls
    per chunk, as without chunking, and no logits kept for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, chunk_loss):
        needs_grad = hidden.requires_grad or weight.requires_grad
        ctx.weight_dtype = weight.dtype
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk_loss_sum, grad_logits = chunk_loss(hidden[rows] @ weight.T, targets[rows])
            loss += chunk_loss_sum
            if needs_grad:
                grad_hidden[rows] = grad_logits @ weight
                grad_weight += grad_logits.T @ hidden[rows]
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in fp32 before the cast: with fp16 the loss scale can be large.
        weight_grad = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss, weight_grad, None, None, None
