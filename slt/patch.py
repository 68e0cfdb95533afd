"""Replacing a Llama's projections with sparse layers, on the meta model, before sharding."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slt.config import SLTConfig, sltrain_rank_and_alpha
from slt.layers import SparseLinear, layer_class_and_options
from utils.errors import UserError


def patch_llama(model: nn.Module, config: SLTConfig) -> dict[str, SparseLinear]:
    """Swap every targeted nn.Linear of the decoder layers for the method's sparse layer;
    returns the new layers by module name. Embeddings and lm_head are never targets."""
    settings = resolved_settings(config, model.config.hidden_size)
    layer_class, options = layer_class_and_options(config.method, settings)
    replaced: dict[str, SparseLinear] = {}
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in config.targets or not isinstance(module, nn.Linear):
            continue
        _check_layer_shape(name, module, config.method, settings)
        with torch.device(module.weight.device):
            layer = layer_class(
                module.in_features, module.out_features, module.bias is not None, **options
            )
        setattr(model.get_submodule(parent_name), leaf, layer)
        replaced[name] = layer
    if not replaced:
        raise UserError(f"--slt_config targets {list(config.targets)} match no linear layer")
    return replaced


def resolved_settings(config: SLTConfig, hidden_size: int) -> dict[str, Any]:
    """The settings with SLTrain's automatic r and alpha filled in for this model."""
    if config.method != "sltrain":
        return config.settings
    r, alpha = sltrain_rank_and_alpha(config.settings, hidden_size)
    return config.settings | {"r": r, "alpha": alpha}


def _check_layer_shape(name: str, module: nn.Linear, method: str, settings: dict) -> None:
    if method == "nm" and module.in_features % settings["m"]:
        raise UserError(
            f"--slt_config: nm needs in_features divisible by m={settings['m']}, but {name} "
            f"has {module.in_features}; choose another m"
        )
    smallest = min(module.in_features, module.out_features)
    if method == "sltrain" and settings["r"] >= smallest:
        raise UserError(
            f"--slt_config: sltrain r={settings['r']} is not below {name}'s smallest dimension "
            f"{smallest}; set a smaller r"
        )
