"""A step with a NaN loss or gradient on any rank is never applied (utils/nonfinite.py): real
runs with one rank's loss made NaN (tests/scripts/poisoned_train.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from tests.helpers import (
    REPO,
    metrics_records,
    tiny_run_flags,
    torchrun,
    train_in_process,
)
from tests.scripts.poisoned_train import poison
from utils.checkpoint import read_model_tensors
from utils.errors import UserError
from utils.nonfinite import NonFiniteGuard


def run_flags(data: Path, tokenizer: Path, out: Path, name: str, *extra: str) -> list[str]:
    flags = tiny_run_flags(data, tokenizer, out, steps=6, num_workers=0)
    return [*flags, "--local_batch=2", f"--run_name={name}", *extra]


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(mds_tokens, tokenizer_dir, tmp_path):
    """Rank 1's loss is NaN at step 3 of 6 on 2 ranks: step 3 changes no weight, the run goes
    on, the log window holding step 3 counts it and keeps a finite loss and gradient norm,
    and the event names the rank and each rank's loader position."""
    flags = run_flags(mds_tokens, tokenizer_dir, tmp_path, "nan", "--save_every=1", "--log_every=2")
    torchrun(REPO / "tests/scripts/poisoned_train.py", "1", "3", *flags)
    run_dir = tmp_path / "nan"
    records = metrics_records(run_dir)
    windows = {r["step"]: r for r in records if "loss" in r}
    assert [windows[s]["skipped_steps"] for s in (2, 4, 6)] == [0, 1, 0]
    assert all(math.isfinite(windows[s][k]) for s in (2, 4, 6) for k in ("loss", "grad_norm"))
    (event,) = [r for r in records if "event" in r]
    assert event["step"] == 3 and event["event"] == "nonfinite_step_skipped"
    assert event["ranks_with_nonfinite_loss"] == [1]
    # pre-tokenized blocks: 2 per micro-step, 2 micro-steps per step, on each rank
    assert event["loader_positions"] == [{"documents": 12, "epoch": 0}] * 2
    weights = {s: read_model_tensors(run_dir / f"step_{s:06d}") for s in (2, 3, 4)}
    for name, before in weights[2].items():
        assert torch.equal(weights[3][name], before), name
    assert not torch.equal(weights[4]["lm_head.weight"], weights[3]["lm_head.weight"])


@pytest.mark.parametrize(
    ("extra", "poisoned", "message"),
    [
        (["--nonfinite=stop"], {3}, "step 3: loss or gradients not finite (--nonfinite stop)"),
        (["--max_skipped=2"], {3, 4}, "steps 3-4: loss or gradients not finite (--max_skipped 2)"),
        # the step-2 save is still being written in the background when step 3 is settled
        (
            ["--nonfinite=stop", "--async_save"],
            {3},
            "step 3: loss or gradients not finite (--nonfinite stop)",
        ),
    ],
    ids=["stop", "max_skipped", "stop_during_async_save"],
)
def test_stopping_saves_nothing_and_names_the_last_good_checkpoint(
    extra, poisoned, message, mds_tokens, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(train, "train_step", train.train_step)  # restored after the test
    monkeypatch.setattr(train, "model_nll_sum", train.model_nll_sum)
    poison(0, poisoned)
    flags = run_flags(mds_tokens, tokenizer_dir, tmp_path, "stop", "--save_every=2", *extra)
    with pytest.raises(SystemExit) as stop:
        train_in_process(*flags)
    assert stop.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    good = tmp_path / "stop" / "step_000002"
    assert errors == [f"error: {message}; stopped without saving; resume from {good} with a lower "
                      "--lr or --grad_clip (metrics.jsonl names each rank's loader position)"]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "stop").glob("step_*")) == ["step_000002"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bad=st.sets(st.integers(1, 12), max_size=8),
    max_skipped=st.integers(1, 4),
    saves=st.sets(st.integers(1, 12)),
)
def test_only_a_streak_of_max_skipped_stops_and_it_names_the_checkpoint_before_it(
    world_of_one, bad, max_skipped, saves
):
    """Isolated non-finite steps never add up: the run stops at the first step ending
    max_skipped in a row, and the message names the newest checkpoint saved before that streak
    began, even when a save fell inside it."""
    events, asked = [], []

    def checkpoint_before(step: int) -> Path | None:
        asked.append(step)
        before = [s for s in saves if s < step]
        return Path(f"step_{max(before):06d}") if before else None

    guard = NonFiniteGuard("skip", max_skipped, lambda s, d: events.append(s), checkpoint_before)
    streak_end = next(
        (s for s in range(1, 13) if all(s - k in bad for k in range(max_skipped))), None
    )
    try:
        for step in range(1, 13):
            guard.record(step, torch.tensor(step in bad), torch.tensor(1.0), {"sample": step})
        guard.flush()
    except UserError as err:
        assert streak_end is not None, err
        start = streak_end - max_skipped + 1
        assert asked == [start]
        assert events == sorted(s for s in bad if s <= streak_end)
        good = [s for s in saves if s < start]
        expected = (
            f"resume from step_{max(good):06d}"
            if good
            else "no checkpoint came before it: start again"
        )
        assert f"{expected} with a lower --lr" in str(err)
    else:
        assert streak_end is None
        assert events == sorted(bad)
