"""The optimizer and the learning rate (utils/optim.py), against numbers worked out by hand."""

from __future__ import annotations

import pytest

from utils.model import build_meta_model, load_model_config
from utils.optim import build_optimizer, lr_at

SCHEDULE = dict(lr=1e-3, min_lr=1e-4, warmup=10, total=110)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (1, 1e-4),  # warm-up from lr / warmup at the first step...
        (5, 5e-4),
        (10, 1e-3),  # ...to lr at its last
        (35, 8.681980515339464e-4),  # a quarter of the cosine: 1e-4 + 4.5e-4 (1 + cos(pi/4))
        (60, 5.5e-4),  # halfway: the mean of lr and min_lr
        (110, 1e-4),  # min_lr at the last step, not 0
        (200, 1e-4),  # and after it
    ],
)
def test_warmup_then_cosine_to_min_lr(step, expected):
    assert lr_at(step, **SCHEDULE) == pytest.approx(expected, rel=1e-12)


def test_weight_decay_on_matrices_only():
    """The tiny Llama: 16 matrices (embeddings, head, 7 projections in each of 2 layers) decay;
    its 5 norm weights (2 per layer and the final one) do not."""
    model = build_meta_model(load_model_config("tiny", 0), "sdpa").to_empty(device="cpu")
    decayed, plain = build_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(decayed["params"]) == 16
    assert sorted(names[id(p)] for p in plain["params"]) == [
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ]  # fmt: skip
    assert all(p.ndim == 2 for p in decayed["params"])
