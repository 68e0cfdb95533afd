"""Which attention kernel runs: the transformers implementation (flash-attn 3 or 2, or PyTorch
SDPA, with or without a mask) and, for SDPA, which of its backends, in forward and in the
recomputation of backward."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from utils.errors import UserError

# `--attention_kernel` names; "auto" keeps PyTorch's own order (flash, efficient, math, cuDNN).
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


# transformers' SDPA attention under a name with no mask function: transformers then builds no
# mask and SDPA runs with is_causal=True, which its flash and cuDNN kernels take. Under the name
# "sdpa", transformers 4.57 materializes a [batch, 1, seq, seq] mask in every training forward
# (it reads the default position ids as a packed batch), which rules those kernels out, and 5.17
# copies a device tensor to the host in every forward to find out that it need not. Every model
# call of this project passes whole causal rows (no padding mask), so the mask adds nothing.
CAUSAL_SDPA = "causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def _no_mask_but_causal(*, attention_mask: torch.Tensor | None = None, **_: object) -> None:
    """causal_sdpa's mask builder. Without one, transformers would drop a 2-D attention mask
    it is handed (it builds none for an implementation it does not know): a padding mask
    must not be ignored without a word, so it is refused. Training never passes one."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"the {CAUSAL_SDPA} attention runs whole causal rows and takes no padding mask; "
            "load the model with attn_implementation='sdpa' to use one"
        )


AttentionMaskInterface.register(CAUSAL_SDPA, _no_mask_but_causal)
SDPA_IMPLEMENTATIONS = ("sdpa", CAUSAL_SDPA)
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class AttentionFlags:
    """The attention choices of a run: --enable_flash, --attention_kernel, --document_masking."""

    enable_flash: bool = False
    kernel: str = "auto"
    document_masking: bool = False


def attention_implementation(flags: AttentionFlags) -> str:
    """With --enable_flash, the flash-attn package when installed: FlashAttention-3
    (`flash_attn_3`) on Hopper, the only cards it runs on, else FlashAttention-2 (`flash_attn`).
    PyTorch SDPA otherwise: causal without a mask, or with --document_masking transformers' own,
    which builds the block-diagonal mask from the position ids."""
    if flags.enable_flash:
        if is_flash_attn_3_available() and torch.cuda.get_device_capability()[0] == 9:
            return "flash_attention_3"
        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa" if flags.document_masking else CAUSAL_SDPA


def document_attention_kwargs(
    position_ids: torch.Tensor, implementation: str, device: torch.device
) -> dict[str, torch.Tensor | int]:
    """What flash-attn needs for --document_masking: where each document starts in the flattened
    micro-batch (`cu_seqlens`) and the longest one, for its variable-length kernel.

    transformers derives them from position ids only for a micro-batch of one row; with more
    rows it would run plain causal attention, across documents, without a word. Its own helper
    computes them here from the loader's position ids while they are still on the host, so
    nothing is read back from the GPU. SDPA needs none of this: transformers builds its mask
    from the position ids."""
    if implementation not in FLASH_IMPLEMENTATIONS:
        return {}
    (bounds, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    bounds = bounds.to(device, non_blocking=True)
    longest = int(longest)  # an int in transformers 4.57, a 0-d tensor in 5.x
    return dict(
        cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest
    )


def check_attention_flags(flags: AttentionFlags, dtype: torch.dtype, device: torch.device) -> None:
    """Before anything is built: the attention flags against each other, the compute dtype
    and the device."""
    if flags.enable_flash and device.type != "cuda":
        raise UserError("--enable_flash needs a CUDA GPU; drop the flag on CPU")
    if flags.enable_flash and dtype == torch.float32:
        raise UserError("--enable_flash needs --bf16 or --fp16 (flash kernels do not run in fp32)")
    if (
        flags.enable_flash
        and flags.document_masking
        and attention_implementation(flags) not in FLASH_IMPLEMENTATIONS
    ):
        raise UserError(
            "--document_masking with --enable_flash needs the flash-attn package (SDPA's flash "
            "kernel takes no document mask); install flash-attn or drop --enable_flash"
        )
    if flags.kernel != "auto" and device.type != "cuda":
        raise UserError(f"--attention_kernel {flags.kernel} picks a CUDA kernel; drop it on CPU")
    if flags.enable_flash and flags.kernel != "auto":
        raise UserError(f"--enable_flash and --attention_kernel {flags.kernel} exclude each other")


def sdpa_backends(flags: AttentionFlags, implementation: str) -> list[SDPBackend] | None:
    """SDPA's backends for this run, first choice first; None leaves PyTorch's choice.

    --enable_flash without the flash-attn package allows SDPA's flash kernel only, so a call
    it cannot run fails loudly instead of silently taking a slower kernel. --attention_kernel
    only moves its backend to the front: a call it cannot run (a document mask, say) falls
    back to the next."""
    if implementation not in SDPA_IMPLEMENTATIONS:
        return None
    if flags.enable_flash:
        return [SDPBackend.FLASH_ATTENTION]
    if flags.kernel == "auto":
        return None
    first = SDPA_BACKENDS[flags.kernel]
    return [first, *(b for b in (*SDPA_BACKENDS.values(), SDPBackend.MATH) if b != first)]


def set_attention_kernels(model: nn.Module, flags: AttentionFlags) -> None:
    model.sdpa_backends = sdpa_backends(flags, model.config._attn_implementation)


def attention_context(model: nn.Module) -> AbstractContextManager:
    """Around forward and backward: activation checkpointing recomputes attention in backward,
    and another kernel there would save tensors of other shapes than forward did."""
    backends = getattr(model, "sdpa_backends", None)
    return sdpa_kernel(backends, set_priority=True) if backends else nullcontext()
