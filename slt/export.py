"""From a sparse model's full state to a dense transformers Llama, and the sparse sidecar.

A `full` checkpoint and `python -m utils.convert` write each sparse layer's effective weight
(masked, or B @ A + S) under the dense name `<layer>.weight`, so the directory is a standard
Llama; the sparse layers' own tensors go to a sidecar file that training resumes from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from slt.config import SLTConfig
from slt.layers import SLTLinear
from slt.patch import patch_llama
from utils.model import build_meta_model

SIDECAR = "slt_state.safetensors"


def meta_model(model_config: PretrainedConfig, slt_state: dict[str, Any] | None) -> nn.Module:
    """The model a checkpoint was trained as, on the meta device: patched if it was sparse."""
    if slt_state is None:
        return build_meta_model(model_config, "sdpa")
    return _sparse_meta_model(model_config, slt_state)[0]


def _sparse_meta_model(model_config, slt_state) -> tuple[nn.Module, dict[str, SLTLinear]]:
    model = build_meta_model(model_config, "sdpa")
    return model, patch_llama(model, SLTConfig.from_dict(slt_state["config"]))


def sparse_layer_of(key: str, layers) -> str | None:
    """The sparse layer a state-dict key belongs to, if any."""
    owner = key.rpartition(".")[0]
    return owner if owner in layers else None


def sparse_part(full_state: dict[str, torch.Tensor], layers) -> dict[str, torch.Tensor]:
    """The tensors of the sparse layers: what the sidecar file holds."""
    return {k: v for k, v in full_state.items() if sparse_layer_of(k, layers)}


def with_sparse_state(dense: dict[str, Any], sparse: dict[str, Any]) -> dict[str, Any]:
    """A full checkpoint's dense entries with each sparse layer's own entries (from the
    sidecar) in place of its effective weight: the state the training model has."""
    layers = {key.rpartition(".")[0] for key in sparse}
    return {k: v for k, v in dense.items() if not sparse_layer_of(k, layers)} | sparse


@torch.no_grad()
def effective_dense_state(
    model_config: PretrainedConfig, slt_state: dict[str, Any], full_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The dense Llama state dict: every sparse layer's tensors replaced by its effective
    weight, computed by the layer's own code from the full tensors cast to the run's compute
    dtype, as the training forward computed it (masks chosen among bf16 weights differ from
    masks chosen among their fp32 masters where values round together). Stored in fp32; cast
    back to the compute dtype, it is the trained weight bit for bit."""
    _, layers = _sparse_meta_model(model_config, slt_state)
    compute_dtype = getattr(torch, slt_state.get("compute_dtype", "float32"))
    dense = {k: v for k, v in full_state.items() if not sparse_layer_of(k, layers)}
    for name, layer in layers.items():
        _fill_layer(layer, name, full_state, slt_state["thresholds"].get(name))
        dense[f"{name}.weight"] = layer.effective_weight(compute_dtype).float().contiguous()
        if layer.bias is not None:
            dense[f"{name}.bias"] = layer.bias
    return dense


def _fill_layer(layer: SLTLinear, name: str, full_state: dict, threshold) -> None:
    prefix = f"{name}."
    tensors = {k[len(prefix) :]: v for k, v in full_state.items() if k.startswith(prefix)}
    layer.load_state_dict(tensors, assign=True)
    if threshold is not None:
        layer.threshold = threshold
