"""A sparse run as a dense transformers Llama: each sparse layer's effective weight (masked, or
B @ A + S) under the dense name `<layer>.weight`.

`full` checkpoints hold this export (and the sparse layers' own tensors beside it, see
`SparseTraining.export_weights`); `dense_weights` computes it for a checkpoint of any format,
for the converter and the C4 evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from slt.config import SLTConfig
from slt.layers import SparseLinear
from slt.patch import patch_llama
from utils.checkpoint import load_transformers_weights, read_model_tensors, read_trainer_state
from utils.model import build_meta_model


def dense_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The dense weights of a checkpoint of any format, on the CPU, with no process group: a
    `full` checkpoint's as stored, the others' with every sparse layer's effective weight
    composed here."""
    trainer = read_trainer_state(step_dir)
    if trainer["ckpt_type"] == "full":
        return load_transformers_weights(step_dir)
    weights = read_model_tensors(step_dir)
    if trainer.get("slt") is None:
        return weights
    return effective_dense_state(AutoConfig.from_pretrained(str(step_dir)), trainer["slt"], weights)


def sparse_layer_of(key: str, layers) -> str | None:
    """The sparse layer a state-dict key belongs to, if any."""
    owner = key.rpartition(".")[0]
    return owner if owner in layers else None


def sparse_part(full_state: dict[str, torch.Tensor], layers) -> dict[str, torch.Tensor]:
    """The tensors of the sparse layers: what a `full` checkpoint keeps beside the export."""
    return {k: v for k, v in full_state.items() if sparse_layer_of(k, layers)}


@torch.no_grad()
def effective_dense_state(
    model_config: PretrainedConfig, slt_state: dict[str, Any], full_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The dense Llama state dict: every sparse layer's tensors replaced by its effective
    weight, computed by the layer's own code from the full tensors cast to the run's compute
    dtype, as the training forward computed it (masks chosen among bf16 weights differ from
    masks chosen among their fp32 masters where values round together). Stored in fp32; cast
    back to the compute dtype, it is the trained weight bit for bit."""
    layers = patch_llama(
        build_meta_model(model_config, "sdpa"), SLTConfig.from_dict(slt_state["config"])
    )
    compute_dtype = getattr(torch, slt_state.get("compute_dtype", "float32"))
    dense = {k: v for k, v in full_state.items() if not sparse_layer_of(k, layers)}
    for name, layer in layers.items():
        _fill_layer(layer, name, full_state, slt_state["thresholds"].get(name))
        dense[f"{name}.weight"] = layer.effective_weight(compute_dtype).float().contiguous()
        if layer.bias is not None:
            dense[f"{name}.bias"] = layer.bias
    return dense


def _fill_layer(layer: SparseLinear, name: str, full_state: dict, threshold) -> None:
    prefix = f"{name}."
    tensors = {k[len(prefix) :]: v for k, v in full_state.items() if k.startswith(prefix)}
    layer.load_state_dict(tensors, assign=True)
    if threshold is not None:
        layer.threshold = threshold
