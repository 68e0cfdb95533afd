"""How the model is laid out on the devices: activation checkpointing, per-layer compile and
FSDP2, in one place."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from utils.model import decoder_layers

# Selective checkpointing keeps what is expensive to recompute (matmul and attention outputs)
# and recomputes the cheap element-wise rest (norms, rotary, SiLU, products) in backward.
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)
SAVED_BY_SELECTIVE_CHECKPOINTING = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,  # --float8 matmuls, as a compiled graph names them
    *(
        getattr(torch.ops.aten, name).default
        for name in _ATTENTION_OPS
        if hasattr(torch.ops.aten, name)
    ),
}
# --enable_flash with the flash-attn package: its kernels are custom ops in these namespaces.
FLASH_ATTN_NAMESPACES = ("flash_attn", "flash_attn_3")


def compute_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def parallelize_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    sharding_strategy: str,
    param_dtype: torch.dtype,
    activation_checkpointing: str = "none",
    compile: bool = False,
) -> nn.Module:
    """Checkpoint, then compile, then shard each decoder layer; finally shard the root.

    Parameters stay fp32 in their shards (the master weights); they are cast to `param_dtype`
    when gathered for compute, and gradients are reduced in fp32. `shard_grad_op` keeps the
    gathered layer parameters from forward to backward (ZeRO-2), the others free them after
    each layer's forward (ZeRO-3); `hybrid_shard` and `no_shard` differ only in the mesh.

    Each layer is compiled on its own (the layers share one compiled graph): FSDP's hooks stay
    outside the graph, while one graph per layer fuses its element-wise work. The compiled
    wrapper adds `_orig_mod.` to parameter names, which checkpoints strip (`canonical_name`).
    """
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer = wrap_activation_checkpointing(layer, activation_checkpointing)
        layers[index] = torch.compile(layer) if compile else layer
    shard = partial(
        fully_shard,
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        ignored_params=integer_parameters(model),
    )
    for index, layer in enumerate(layers):
        # The last layer is the first one backward needs: freeing it would only gather it again.
        last = index == len(layers) - 1
        shard(layer, reshard_after_forward=sharding_strategy != "shard_grad_op" and not last)
    # The root's parameters (embeddings, final norm, head) are needed again first in backward.
    shard(model, reshard_after_forward=False)
    return model


def integer_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Index parameters (SLTrain's sparse support) stay whole on every rank, outside FSDP:
    FSDP2 before torch 2.14 cannot shard a tensor that takes no gradient, and indices are
    neither cast nor reduced. They are small (int32, a few percent of a layer's entries)."""
    return {p for p in model.parameters() if not p.is_floating_point()}


def keep_matmul_and_attention_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's choice for each operation of a layer's forward."""
    expensive = (
        op in SAVED_BY_SELECTIVE_CHECKPOINTING
        or getattr(op, "namespace", None) in FLASH_ATTN_NAMESPACES
    )
    return CheckpointPolicy.MUST_SAVE if expensive else CheckpointPolicy.PREFER_RECOMPUTE


def wrap_activation_checkpointing(layer: nn.Module, mode: str) -> nn.Module:
    """`full` recomputes the whole layer in backward, `selective` only its cheap operations."""
    if mode == "full":
        return checkpoint_wrapper(layer)
    if mode == "selective":
        policy = partial(create_selective_checkpoint_contexts, keep_matmul_and_attention_outputs)
        return checkpoint_wrapper(layer, context_fn=policy)
    return layer


def build_grad_scaler(fp16: bool, device: torch.device) -> ShardedGradScaler | None:
    """fp16 needs loss scaling; the sharded scaler makes every rank agree on inf/nan."""
    return ShardedGradScaler(device=device.type) if fp16 else None
