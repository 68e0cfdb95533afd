"""The attention kernel choice: which SDPA backends a run allows, in which order, and that the
order holds inside the training step's context only."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from torch.nn.attention import SDPBackend

from utils.attention import attention_context, sdpa_backends, set_attention_kernels
from utils.model import build_meta_model, load_model_config


def flags(kernel: str = "auto", enable_flash: bool = False) -> Namespace:
    return Namespace(attention_kernel=kernel, enable_flash=enable_flash)


def test_auto_leaves_pytorch_its_choice():
    assert sdpa_backends(flags(), "sdpa") is None


@pytest.mark.parametrize(
    "kernel, first",
    [
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ],
)
def test_a_chosen_kernel_goes_first_and_the_others_stay_as_fallbacks(kernel, first):
    backends = sdpa_backends(flags(kernel), "sdpa")
    assert backends[0] == first
    assert set(backends) == {
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    }


def test_enable_flash_without_flash_attn_allows_sdpa_flash_only():
    assert sdpa_backends(flags(enable_flash=True), "sdpa") == [SDPBackend.FLASH_ATTENTION]
    assert sdpa_backends(flags(enable_flash=True), "flash_attention_2") is None


def test_the_order_holds_inside_the_step_context_and_is_restored_after():
    model = build_meta_model(load_model_config("tiny", 0), "sdpa")
    set_attention_kernels(model, flags("cudnn"))
    before = torch._C._get_sdp_priority_order()
    with attention_context(model):
        inside = torch._C._get_sdp_priority_order()
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert inside[0] == int(SDPBackend.CUDNN_ATTENTION) and inside != before
    assert torch._C._get_sdp_priority_order() == before
