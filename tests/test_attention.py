"""The attention kernel choice: flash-attn 3 or 2 or SDPA, which SDPA backends a run allows, in
which order, that the order holds inside the training step's context only, and that selective
checkpointing keeps flash-attn's outputs as it keeps SDPA's."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from transformers import AutoModelForCausalLM

from utils import attention
from utils.attention import (
    AttentionFlags,
    attention_context,
    sdpa_backends,
    set_attention_kernels,
)
from utils.errors import UserError
from utils.metrics import model_flops_per_token
from utils.model import build_meta_model, load_model_config
from utils.parallelize import wrap_activation_checkpointing


def flags(
    kernel: str = "auto", enable_flash: bool = False, document_masking: bool = False
) -> AttentionFlags:
    return AttentionFlags(enable_flash, kernel, document_masking)


@pytest.mark.parametrize(
    "enable_flash, fa3, fa2, capability, expected",
    [
        (True, True, True, (9, 0), "flash_attention_3"),
        (True, True, True, (8, 0), "flash_attention_2"),  # FA3 runs on Hopper only
        (True, True, False, (10, 0), "causal_sdpa"),
        (True, False, True, (9, 0), "flash_attention_2"),
        (True, False, False, (9, 0), "causal_sdpa"),
        (False, True, True, (9, 0), "causal_sdpa"),
    ],
)
def test_enable_flash_takes_the_newest_installed_flash_attn_the_card_runs(
    monkeypatch, enable_flash, fa3, fa2, capability, expected
):
    monkeypatch.setattr(attention, "is_flash_attn_3_available", lambda: fa3)
    monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda: fa2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    assert attention.attention_implementation(flags(enable_flash=enable_flash)) == expected


def test_training_attention_is_sdpa_with_is_causal_and_no_mask(monkeypatch):
    model = AutoModelForCausalLM.from_config(
        load_model_config("tiny", 0),
        attn_implementation=attention.attention_implementation(flags()),
    )
    plain = AutoModelForCausalLM.from_config(
        load_model_config("tiny", 0), attn_implementation="sdpa"
    )
    plain.load_state_dict(model.state_dict())
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    input_ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        assert calls == [(None, True)] * model.config.num_hidden_layers
        torch.testing.assert_close(logits, plain(input_ids=input_ids).logits)
    assert "causal_sdpa" not in model.config.to_json_string()  # checkpoints name no such thing


def test_another_model_built_from_the_same_config_leaves_the_attention_as_it_was():
    config = load_model_config("tiny", 0)
    model = build_meta_model(config, attention.attention_implementation(flags()))
    model_flops_per_token(config, 64)  # builds a plain "sdpa" model from the run's config
    assert model.model.layers[0].self_attn.config._attn_implementation == "causal_sdpa"


def test_document_masking_under_enable_flash_needs_the_flash_attn_package(monkeypatch):
    monkeypatch.setattr(attention, "is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda: False)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    with pytest.raises(UserError) as refused:
        attention.check_attention_flags(flags(enable_flash=True, document_masking=True), bf16, cuda)
    assert str(refused.value) == (
        "--document_masking with --enable_flash needs the flash-attn package (SDPA's flash "
        "kernel takes no document mask); install flash-attn or drop --enable_flash"
    )
    monkeypatch.setattr(attention, "is_flash_attn_2_available", lambda: True)
    attention.check_attention_flags(flags(enable_flash=True, document_masking=True), bf16, cuda)


def test_document_masking_keeps_transformers_sdpa_which_builds_the_mask():
    assert attention.attention_implementation(flags(document_masking=True)) == "sdpa"
    assert sdpa_backends(flags("cudnn", document_masking=True), "sdpa")[0] == (
        SDPBackend.CUDNN_ATTENTION
    )


CALLS = Counter()


@torch.library.custom_op("flash_attn::_counting_forward", mutates_args=())
def counting_flash_forward(x: torch.Tensor) -> torch.Tensor:
    """Stands for flash-attn's kernel: a custom op in its namespace that counts its runs."""
    CALLS["flash_attn"] += 1
    return x.sin()


counting_flash_forward.register_autograd(
    lambda ctx, grad: grad * ctx.saved_tensors[0].cos(),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
)


class FlashLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return counting_flash_forward(x * 2)


@pytest.mark.parametrize("mode, runs", [("selective", 1), ("full", 2), ("none", 1)])
def test_selective_checkpointing_keeps_flash_attn_outputs(mode, runs):
    CALLS.clear()
    x = torch.randn(4, requires_grad=True)
    wrap_activation_checkpointing(FlashLayer(), mode)(x).sum().backward()
    assert CALLS["flash_attn"] == runs
    torch.testing.assert_close(x.grad, 2 * (2 * x.detach()).cos())


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
    assert sdpa_backends(flags(enable_flash=True), "causal_sdpa") == [SDPBackend.FLASH_ATTENTION]
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


def test_causal_attention_refuses_a_padding_mask_instead_of_dropping_it():
    """Training passes whole causal rows and no mask; a caller that hands the causal SDPA
    model a padding mask must hear about it, not get attention over the padding."""
    model = AutoModelForCausalLM.from_config(
        load_model_config("tiny", 0), attn_implementation=attention.CAUSAL_SDPA
    )
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    no_mask = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, no_mask)
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    with pytest.raises(ValueError, match="takes no padding mask"):
        model(input_ids=ids, attention_mask=padded)
