"""The optimizer and the learning rate (utils/optim.py), against numbers worked out by hand."""

from __future__ import annotations

import pytest

from utils.model import build_meta_model, load_model_config
from utils.optim import LRSchedule, build_optimizer, set_lr

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
    assert LRSchedule(**SCHEDULE).lr_at(step) == pytest.approx(expected, rel=1e-12)


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


@pytest.mark.parametrize(
    ("shape", "decay_type", "expected"),
    [
        ("linear", "linear", [1e-3, 5.5e-4, 1e-4]),  # steps 10, 60, 110: a line to min_lr
        ("constant", "linear", [1e-3, 1e-3, 1e-3]),
        # wsd: stable to step 88 (the last 22 of 110 decay), then down to min_lr at 110
        ("wsd", "linear", [1e-3, 1e-3, 1e-4]),
    ],
)
def test_the_other_shapes(shape, decay_type, expected):
    schedule = LRSchedule(**SCHEDULE, shape=shape, decay_type=decay_type)
    assert [schedule.lr_at(step) for step in (10, 60, 110)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("decay_type", "expected"),
    [("linear", 5.5e-4), ("cosine", 5.5e-4), ("sqrt", 3.636038969321072e-4)],
)
def test_wsd_decays_along_its_decay_type(decay_type, expected):
    """Halfway through the decay (step 99 of 110: it runs from step 88)."""
    schedule = LRSchedule(**SCHEDULE, shape="wsd", decay_type=decay_type)
    assert schedule.lr_at(88) == 1e-3
    assert schedule.lr_at(99) == pytest.approx(expected, rel=1e-12)


def test_a_wsd_run_resumed_with_more_steps_keeps_its_stable_rate_until_its_own_decay():
    """Branching cooldowns from one stable-phase checkpoint: the rate is a function of the
    step and of --train_steps, so a branch with 220 steps decays over steps 176-220 and is
    stable wherever the 110-step run was."""
    short = LRSchedule(**SCHEDULE, shape="wsd")
    long = LRSchedule(**{**SCHEDULE, "total": 220}, shape="wsd")
    assert [long.lr_at(s) for s in range(1, 89)] == [short.lr_at(s) for s in range(1, 89)]
    assert long.lr_at(176) == 1e-3 and long.lr_at(220) == pytest.approx(1e-4, rel=1e-12)


def test_slt_parameters_take_their_own_rate_and_decay():
    """--slt_lr 3e-3 with --lr 1e-3: the group of the method's own tensors runs at 3x the
    schedule's rate and with its own weight decay."""
    from slt import SLTConfig, SparseTraining

    model = build_meta_model(load_model_config("tiny", 0), "sdpa")
    sparse = SparseTraining(model, SLTConfig.from_dict({"method": "supermask"}))
    model.to_empty(device="cpu")
    optimizer = build_optimizer(
        model, lr=1e-3, weight_decay=0.1, own=sparse.own_parameters(), own_lr=3e-3,
        own_weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6,
    )  # fmt: skip
    set_lr(optimizer, 5e-4)
    *_, scores = optimizer.param_groups
    assert len(scores["params"]) == 14  # the 7 projections of 2 layers
    assert (scores["lr"], scores["weight_decay"]) == (pytest.approx(1.5e-3), 0.0)
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-6
