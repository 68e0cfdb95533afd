"""The optimizer and the learning rate (utils/optim.py), against numbers worked out by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.model import build_meta_model, load_model_config
from utils.optim import DECAY_TYPES, LR_SCHEDULES, LRSchedule, build_optimizer, set_lr

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


def decaying_steps(schedule: LRSchedule) -> int:
    """How many steps after the warmup run below `lr`: the decay's length, measured."""
    rates = [schedule.lr_at(t) for t in range(schedule.warmup + 1, schedule.total + 1)]
    return sum(rate < schedule.lr for rate in rates)


def documented_decay_steps(fraction: float, total: int) -> int:
    """docs/training.md: `decay_fraction x train_steps` as written, rounded half up, at
    least 1. Worked out with fractions, not the way utils/optim.py does it."""
    return max(math.floor(Fraction(repr(fraction)) * total + Fraction(1, 2)), 1)


def test_a_short_wsd_run_still_decays_to_min_lr_at_its_last_step():
    """--decay_fraction 0.05 of 4 steps is 0.2 of a step: it used to round to no decay at all,
    the run ending at --lr."""
    schedule = LRSchedule(lr=1e-3, min_lr=1e-4, warmup=0, total=4, shape="wsd",
                          decay_fraction=0.05)  # fmt: skip
    assert [schedule.lr_at(t) for t in range(1, 5)] == [1e-3, 1e-3, 1e-3, 1e-4]


@pytest.mark.parametrize(
    ("fraction", "total", "steps"),
    [(0.25, 10, 3), (0.35, 10, 4), (0.15, 10, 2), (0.45, 10, 5), (0.2, 110, 22), (0.05, 4, 1)],
)
def test_the_wsd_decay_length_rounds_half_up(fraction, total, steps):
    """Python's round() rounds half to even: 0.25 of 10 decayed 2 steps, 0.35 of 10 decayed 4."""
    schedule = LRSchedule(lr=1e-3, min_lr=1e-4, warmup=0, total=total, shape="wsd",
                          decay_fraction=fraction)  # fmt: skip
    assert decaying_steps(schedule) == steps == documented_decay_steps(fraction, total)


def test_a_wsd_decay_that_would_start_inside_the_warmup_starts_after_it():
    """Half of 10 steps would decay from step 6, inside an 8-step warmup: the warmup runs
    whole, and the decay takes the 2 steps left (utils/args.py warns at start-up)."""
    schedule = LRSchedule(lr=1e-3, min_lr=1e-4, warmup=8, total=10, shape="wsd",
                          decay_fraction=0.5)  # fmt: skip
    rates = [schedule.lr_at(t) for t in range(1, 11)]
    assert rates[:8] == pytest.approx([1e-3 * t / 8 for t in range(1, 9)], rel=1e-12)
    assert rates[7] == 1e-3 and rates[8] == pytest.approx(5.5e-4) and rates[9] == 1e-4


FRACTIONS = st.one_of(
    st.integers(1, 100).map(lambda k: k / 100),  # as typed: many exact halves of a step
    st.integers(1, 1000).map(lambda k: k / 1000),
    st.floats(min_value=0, max_value=1, exclude_min=True),
)


@settings(max_examples=400, deadline=None)
@given(
    total=st.integers(1, 2000),
    warmup=st.integers(0, 2100),
    shape=st.sampled_from(LR_SCHEDULES),
    decay_type=st.sampled_from(DECAY_TYPES),
    fraction=FRACTIONS,
    lr=st.floats(1e-6, 1.0),
    min_share=st.floats(0.0, 0.9),
)
def test_the_schedule_over_its_space(total, warmup, shape, decay_type, fraction, lr, min_share):
    """Every step's rate lies in [min_lr, lr] after the warmup and in (0, lr] during it (the
    warmup starts at lr / warmup, below min_lr when the warmup is long); the warmup rises, the
    rest never rises; a decaying shape ends at min_lr exactly, after a decay as long as
    documented (wsd: the rounded fraction, at least 1, after the warmup at the latest)."""
    min_lr = lr * min_share
    schedule = LRSchedule(lr, min_lr, warmup, total, shape, fraction, decay_type)
    rates = [schedule.lr_at(t) for t in range(1, total + 1)]
    warming, after = rates[: min(warmup, total)], rates[min(warmup, total) :]
    assert all(0 < rate <= lr for rate in warming)
    assert all(a < b for a, b in zip(warming, warming[1:], strict=False))
    assert all(min_lr <= rate <= lr for rate in after)
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    if warmup >= total:  # the run ends inside the warmup (utils/args.py warns)
        assert rates[-1] == pytest.approx(lr * total / max(warmup, 1), rel=1e-12)
        return
    if shape == "constant":
        assert after == [lr] * len(after)
        return
    assert rates[-1] == min_lr
    if shape == "wsd":
        expected = min(documented_decay_steps(fraction, total), total - warmup)
    else:
        expected = total - warmup
    assert decaying_steps(schedule) == expected


@pytest.mark.parametrize(
    ("own_lr", "own_weight_decay", "expected"),
    [(3e-3, None, (1.5e-3, 0.1)), (None, 0.0, (5e-4, 0.0)), (None, None, None)],
)
def test_one_slt_setting_alone_leaves_the_other_at_the_runs_value(
    own_lr, own_weight_decay, expected
):
    """--slt_lr alone keeps the run's weight decay for the method's tensors, --slt_weight_decay
    alone keeps the run's rate; neither puts them in no group of their own."""
    from slt import SLTConfig, SparseTraining

    model = build_meta_model(load_model_config("tiny", 0), "sdpa")
    sparse = SparseTraining(model, SLTConfig.from_dict({"method": "supermask"}))
    model.to_empty(device="cpu")
    optimizer = build_optimizer(
        model, lr=1e-3, weight_decay=0.1, own=sparse.own_parameters(), own_lr=own_lr,
        own_weight_decay=own_weight_decay,
    )  # fmt: skip
    set_lr(optimizer, 5e-4)
    if expected is None:
        assert len(optimizer.param_groups) == 2
        return
    *_, scores = optimizer.param_groups
    assert (scores["lr"], scores["weight_decay"]) == (pytest.approx(expected[0]), expected[1])
