"""How the model is laid out on the devices: activation checkpointing and FSDP2, in one place."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from utils.model import decoder_layers


def compute_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def parallelize_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    sharding_strategy: str,
    param_dtype: torch.dtype,
    activation_checkpointing: bool,
) -> nn.Module:
    """Wrap each decoder layer, then the root, with fully_shard.

    Parameters stay fp32 in their shards (the master weights); they are cast to `param_dtype`
    when gathered for compute, and gradients are reduced in fp32. `shard_grad_op` keeps the
    gathered layer parameters from forward to backward (ZeRO-2), the others free them after
    each layer's forward (ZeRO-3); `hybrid_shard` and `no_shard` differ only in the mesh.
    """
    layers = decoder_layers(model)
    if activation_checkpointing:
        for index, layer in enumerate(layers):
            layers[index] = checkpoint_wrapper(layer)
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard_after_forward = sharding_strategy != "shard_grad_op"
    for layer in layers:
        fully_shard(
            layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward
        )
    # The root's parameters (embeddings, final norm, head) are needed again first in backward.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def build_grad_scaler(fp16: bool, device: torch.device) -> ShardedGradScaler | None:
    """fp16 needs loss scaling; the sharded scaler makes every rank agree on inf/nan."""
    return ShardedGradScaler(device=device.type) if fp16 else None
