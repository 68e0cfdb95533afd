"""The run's sparse layers as one object: schedule, measured sparsity, checkpoint state."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slt.config import SLTConfig
from slt.export import effective_dense_state, sparse_part
from slt.layers import SparseLinear, ThresholdedLinear
from slt.patch import patch_llama
from slt.schedule import last_refresh, refresh_due, scheduled_sparsity
from utils.errors import UserError
from utils.model import trainable_parameters


class SparseTraining:
    """Patches the model on construction (meta device, before sharding); then, before each
    step, recomputes the thresholded layers' thresholds when due, without a host sync.

    `compute_dtype` is the dtype the forward computes in (the run's --bf16/--fp16): masks are
    chosen among the weights as cast to it, and the export rebuilds them the same way."""

    def __init__(
        self, model: nn.Module, config: SLTConfig, compute_dtype: torch.dtype = torch.float32
    ) -> None:
        self.config = config
        self.compute_dtype = compute_dtype
        self.model_config = model.config
        self.layers = patch_llama(model, config)
        self.thresholded = {
            name: layer
            for name, layer in self.layers.items()
            if isinstance(layer, ThresholdedLinear)
        }
        self._has_thresholds = False

    def before_step(self, step: int) -> None:
        """Before the forward of optimizer step `step`: recompute the thresholds if due (also
        at the first step of a run whose thresholds did not come from a checkpoint). Every
        rank calls it: sharded importances are gathered. No host sync."""
        if not self.thresholded:
            return
        if refresh_due(step, self.config.settings) or not self._has_thresholds:
            sparsity = scheduled_sparsity(step, self.config.settings)
            for layer in self.thresholded.values():
                layer.refresh_threshold(sparsity, self.compute_dtype)
            self._has_thresholds = True

    def add_decay_gradients(self) -> None:
        """Once per optimizer step, after the gradients are accumulated and unscaled (SR-STE)."""
        for layer in self.layers.values():
            layer.add_decay_gradient(self.compute_dtype)

    @torch.no_grad()
    def measure(self, step: int) -> dict[str, float]:
        """The fraction of zeros in the effective weights of all sparse layers as the forward
        sees them, counted on each rank's shards and summed (a collective)."""
        counts = torch.zeros(2, dtype=torch.float64, device=_device_of(self.layers))
        for layer in self.layers.values():
            weight = layer.local_effective_weight(self.compute_dtype)
            counts[0] += (weight == 0).sum()
            counts[1] += weight.numel()
        dist.all_reduce(counts)
        zeros, total = counts.tolist()
        metrics = {"sparsity": zeros / total, "slt/trainable_params": self.trainable_parameters()}
        if self.thresholded:
            metrics["slt/target_sparsity"] = scheduled_sparsity(
                last_refresh(step, self.config.settings), self.config.settings
            )
        if self.config.method == "nm":
            metrics["slt/target_sparsity"] = (
                1 - self.config.settings["n"] / self.config.settings["m"]
            )
        return metrics

    def parameters_a_dense_start_lacks(self) -> set[str]:
        """Names of what a run started from dense weights (--init_from) keeps from its own
        initialization: a supermask's scores. Magnitude and N:M prune the loaded weights
        themselves (their first thresholds and masks come from them); SLTrain cannot start
        from dense weights (slt.config.check_dense_start)."""
        if self.config.method == "supermask":
            return {f"{name}.scores" for name in self.layers}
        return set()

    def own_parameters(self) -> list[nn.Parameter]:
        """What the sparse layers train besides plain weights and biases: supermask scores,
        SLTrain's factors and sparse values (--slt_lr, --slt_weight_decay). Read after
        sharding, which replaces the parameter objects."""
        return [
            param
            for layer in self.layers.values()
            for name, param in layer.named_parameters(recurse=False)
            if name not in ("weight", "bias") and param.requires_grad
        ]

    def trainable_parameters(self) -> int:
        return sum(trainable_parameters(layer) for layer in self.layers.values())

    def describe(self) -> str:
        dense = sum(layer.in_features * layer.out_features for layer in self.layers.values())
        trainable = self.trainable_parameters()
        return (
            f"slt {self.config.method}: {len(self.layers)} projections replaced; they train "
            f"{trainable / 1e6:.2f}M parameters where dense ones would train {dense / 1e6:.2f}M "
            f"({100 * trainable / dense:.1f}%)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "thresholds": {
                name: layer.threshold.detach().cpu() for name, layer in self.thresholded.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any] | None, source: str) -> None:
        """Restore the thresholds saved in checkpoint `source`. A checkpoint trained with another
        slt config is refused; a dense one (no state) is accepted, its weights then pruned from
        here on, and the thresholds computed at the first step."""
        if state is None:
            return
        saved = SLTConfig.from_dict(state["config"], source=f"in {source}")
        if saved != self.config:
            raise UserError(
                f"--resume_dir {source} was trained with slt config {saved.to_dict()}, not "
                f"{self.config.to_dict()}; resume with the same --slt_config"
            )
        for name, threshold in state["thresholds"].items():
            self.thresholded[name].threshold.copy_(threshold)
        self._has_thresholds = True

    def export_weights(self, full_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """A `full` checkpoint's contents: the dense transformers weights (each sparse layer's
        effective weight under its dense name) and the sparse layers' own tensors."""
        dense = effective_dense_state(self.model_config, self.state_dict(), full_state)
        return dense, sparse_part(full_state, self.layers)


def _device_of(layers: dict[str, SparseLinear]) -> torch.device:
    return next(next(iter(layers.values())).parameters()).device
