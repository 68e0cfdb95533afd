"""Float8 training (`--float8`): the decoder layers' linear projections run their three matmuls
in float8 through torchao, with a dynamic scale per tensor (activations and weights in e4m3,
gradients in e5m2). Master weights, gradient reduction, the optimizer and checkpoints are
unchanged: a float8 run resumes from, and exports to, the same files as a bf16 one."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from utils.errors import UserError
from utils.model import decoder_layers

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada, Hopper and newer
DIM_MULTIPLE = 16  # what float8 matmuls (torch._scaled_mm) accept


def check_float8(device: torch.device) -> None:
    """Before anything is built: the package and the GPU generation."""
    if importlib.util.find_spec("torchao") is None:
        raise UserError("--float8 needs torchao: pip install torchao (or drop --float8)")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        raise UserError(
            f"--float8 needs float8 tensor cores (compute capability 8.9+, e.g. H100); "
            f"{torch.cuda.get_device_name(device)} has none: drop --float8"
        )


def convert_to_float8(model: nn.Module) -> None:
    """Swap each decoder layer's linear layers for float8 ones, on the meta model before it
    is compiled and sharded; embeddings and the output head stay in bf16, as torchtitan keeps
    them."""
    from torchao.float8 import convert_to_float8_training

    for layer in decoder_layers(model):
        convert_to_float8_training(layer, module_filter_fn=_fits_float8)


def _fits_float8(module: nn.Module, fqn: str) -> bool:
    return (
        isinstance(module, nn.Linear)
        and module.in_features % DIM_MULTIPLE == 0
        and module.out_features % DIM_MULTIPLE == 0
    )
