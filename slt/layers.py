"""Sparse linear layers: drop-ins for nn.Linear whose weight is computed from other tensors.

Every layer computes its effective weight in forward from its FULL parameters (FSDP2 has
gathered them by then), so masks never depend on how the parameters are sharded. No mask is
stored: thresholded methods keep one scalar threshold per layer, N:M derives its mask from
the weight each time, and SLTrain keeps its sparse support as an integer parameter, whole on
every rank (utils.parallelize), beside its sharded values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from utils.distributed import local_tensor


class StraightThroughMask(torch.autograd.Function):
    """weight * mask in forward; in backward the gradient reaches every entry, pruned or not
    (straight-through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class StraightThroughScores(torch.autograd.Function):
    """The 0/1 mask in forward; in backward the mask's gradient goes to the scores unchanged
    (edge-popup's straight-through estimator)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class SparseLinear(nn.Module):
    """Same inputs, outputs and (optional) bias as nn.Linear(in_features, out_features); the
    weight used is `effective_weight()`. Subclasses define their tensors and `compose`."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the forward multiplies by; with `dtype`, computed from the parameters
        cast to it, as a forward in that compute dtype computes it."""
        tensors = self._weight_tensors()
        if dtype is not None:
            tensors = {k: _cast(v, dtype) for k, v in tensors.items()}
        return self.compose(**tensors)

    def compose(self, **tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters(recurse=False) if n != "bias"}

    @torch.no_grad()
    def local_effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """This rank's rows of the effective weight, in the compute dtype the forward sees
        (FSDP casts shard by shard, so the rows are exactly the forward's)."""
        return self.compose(**{k: _cast(v, dtype) for k, v in self._local_tensors().items()})

    def _local_tensors(self) -> dict[str, torch.Tensor]:
        return {n: local_tensor(p) for n, p in self._weight_tensors().items()}

    def add_decay_gradient(self, dtype: torch.dtype) -> None:
        """Gradient terms of the method itself (SR-STE's decay), added once per optimizer step
        to the accumulated, unscaled gradient; `dtype` is the compute dtype of the forward."""

    def initial_value(self, name: str, generator: torch.Generator, std: float) -> torch.Tensor:
        """The full initial value of parameter `name` (see utils.model.init_weights)."""
        if name == "bias":
            return torch.zeros(self.out_features, device=generator.device)
        return _normal((self.out_features, self.in_features), std, generator)

    def reset_buffers(self) -> None:
        """Called after the layer is materialized; layers with buffers set them here."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ThresholdedLinear(SparseLinear):
    """A mask keeping the entries whose |importance| exceeds one per-layer threshold; the
    importance is the parameter named by `ranked_by`."""

    ranked_by = "weight"

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("threshold", torch.full((), -math.inf), persistent=False)

    def reset_buffers(self) -> None:
        self.threshold.fill_(-math.inf)

    @torch.no_grad()
    def refresh_threshold(self, sparsity: float, dtype: torch.dtype) -> None:
        """Set the threshold from the full importance tensor, in the dtype the forward sees.

        Done between steps, not in forward: a forward that sometimes computes a threshold
        would save other tensors than its activation-checkpoint recomputation, and would
        need two compiled graphs. Sharded, this gathers the one tensor (a collective)."""
        importance = _cast(getattr(self, self.ranked_by), dtype)
        if isinstance(importance, DTensor):
            importance = importance.full_tensor()
        self.threshold.copy_(threshold_for(importance.abs(), sparsity))


def threshold_for(importance: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The value at or below which round(sparsity * numel) entries lie: masking `> threshold`
    prunes that many (more only where values tie), on the device, without a host sync."""
    pruned = round(sparsity * importance.numel())
    if pruned == 0:
        return torch.full((), -math.inf, device=importance.device)
    return importance.flatten().float().kthvalue(pruned).values


class MagnitudeLinear(ThresholdedLinear):
    """Gradual magnitude pruning: `weight` is dense and trained; the effective weight keeps its
    largest-|w| entries. Pruned entries still get gradients and may grow back."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def compose(self, weight: torch.Tensor) -> torch.Tensor:
        return StraightThroughMask.apply(weight, weight.detach().abs() > self.threshold)


class SupermaskLinear(ThresholdedLinear):
    """Edge-popup: `weight` is frozen at its initialization, `scores` are trained; the effective
    weight is weight * (|scores| above the threshold)."""

    ranked_by = "scores"

    def __init__(
        self, in_features: int, out_features: int, bias: bool, *, weight_init: str, score_init: str
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight_init = weight_init
        self.score_init = score_init
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.scores = nn.Parameter(torch.empty(out_features, in_features))

    def compose(self, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = scores.detach().abs() > self.threshold
        return weight * StraightThroughScores.apply(scores, mask)

    def initial_value(self, name: str, generator: torch.Generator, std: float) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        kaiming_std = math.sqrt(2.0 / self.in_features)
        if name == "weight" and self.weight_init == "signed_constant":
            return _normal(shape, 1.0, generator).sign() * kaiming_std
        if name == "weight" or (name == "scores" and self.score_init == "kaiming_normal"):
            return _normal(shape, kaiming_std, generator)
        if name == "scores":
            return _uniform(shape, 1.0 / math.sqrt(self.in_features), generator)
        return super().initial_value(name, generator, std)


class NMLinear(SparseLinear):
    """N:M sparsity: in every group of `m` consecutive inputs of an output row, the `n` largest
    |w| are kept. SR-STE decays the pruned entries: `srste_lambda * w` is added to their
    gradient once per optimizer step (`add_decay_gradient`), whatever the number of micro-steps
    or the loss scale."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, *, n: int, m: int, srste_lambda
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.n, self.m, self.srste_lambda = n, m, srste_lambda
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def compose(self, weight: torch.Tensor) -> torch.Tensor:
        return StraightThroughMask.apply(weight, nm_mask(weight.detach(), self.n, self.m))

    @torch.no_grad()
    def add_decay_gradient(self, dtype: torch.dtype) -> None:
        """The mask is this step's forward's: groups lie within a row and FSDP shards whole
        rows, so each rank recomputes it from its own rows cast to the compute dtype."""
        if not self.srste_lambda or self.weight.grad is None:
            return
        weight = local_tensor(self.weight)
        pruned = ~nm_mask(_cast(weight, dtype), self.n, self.m)
        local_tensor(self.weight.grad).add_(weight * pruned, alpha=self.srste_lambda)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the n largest-|w| entries of each group of m along the input dimension. Of
    equal magnitudes (frequent in bf16) the earlier entry is kept: a stable sort decides the
    same on every device, where topk's choice among ties is the kernel's own."""
    groups = weight.abs().reshape(weight.shape[0], -1, m)
    keep = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(weight.shape)


class SLTrainLinear(SparseLinear):
    """SLTrain: W = (alpha / r) * lora_B @ lora_A + S, where S holds `sparse_values` at the
    fixed columns `sparse_columns`: round(delta * in_features) random columns per output row
    (the same count in every row, so the support is a rectangular tensor)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, *, r: int, alpha: float, delta
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.scale = alpha / r
        nonzeros_per_row = max(1, round(delta * in_features))
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.sparse_values = nn.Parameter(torch.empty(out_features, nonzeros_per_row))
        self.sparse_columns = nn.Parameter(
            torch.empty(out_features, nonzeros_per_row, dtype=torch.int32), requires_grad=False
        )

    def compose(self, lora_A, lora_B, sparse_values, sparse_columns) -> torch.Tensor:
        low_rank = (lora_B @ lora_A) * self.scale
        return low_rank.scatter_add(1, sparse_columns.long(), sparse_values)

    def _local_tensors(self) -> dict[str, torch.Tensor]:
        """lora_A is needed whole for any row of B @ A (it is small: r x in_features); the
        support is whole on every rank (utils.parallelize), and this rank's rows are cut from
        it exactly as FSDP cut the values."""
        tensors = super()._local_tensors()
        values = self.sparse_values
        if isinstance(values, DTensor):
            tensors["lora_A"] = self.lora_A.full_tensor()
            tensors["sparse_columns"] = distribute_tensor(
                self.sparse_columns, values.device_mesh, values.placements, src_data_rank=None
            ).to_local()
        return tensors

    def initial_value(self, name: str, generator: torch.Generator, std: float) -> torch.Tensor:
        """B = 0 and A, S ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's default bound), so training
        starts from the sparse part alone; the support is a random subset of each row."""
        bound = 1.0 / math.sqrt(self.in_features)
        shape = tuple(getattr(self, name).shape)
        if name == "lora_B":
            return torch.zeros(shape, device=generator.device)
        if name in ("lora_A", "sparse_values"):
            return _uniform(shape, bound, generator)
        if name == "sparse_columns":
            noise = torch.rand(
                (self.out_features, self.in_features), generator=generator, device=generator.device
            )
            columns = noise.argsort(dim=1)[:, : shape[1]].sort(dim=1).values
            return columns.to(torch.int32)
        return super().initial_value(name, generator, std)


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, device=generator.device).normal_(0.0, std, generator=generator)


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, device=generator.device).uniform_(-bound, bound, generator=generator)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def layer_class_and_options(method: str, settings: dict[str, Any]) -> tuple[type, dict]:
    """The layer class of a method and the settings its constructor takes."""
    if method == "magnitude":
        return MagnitudeLinear, {}
    if method == "supermask":
        return SupermaskLinear, {k: settings[k] for k in ("weight_init", "score_init")}
    if method == "nm":
        return NMLinear, {k: settings[k] for k in ("n", "m", "srste_lambda")}
    return SLTrainLinear, {k: settings[k] for k in ("r", "alpha", "delta")}
