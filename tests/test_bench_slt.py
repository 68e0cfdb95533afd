"""bench.slt's CPU smoke run: every method it is asked for runs and is counted correctly."""

from __future__ import annotations

import json

import pytest

from bench.slt import main, parse_args
from tests.helpers import REPO
from utils.errors import UserError
from utils.model import build_meta_model, count_parameters, load_model_config


def test_slt_benchmark_reports_each_method(capsys, monkeypatch):
    """The parent runs in this process; each method runs in its own child, from the checkout."""
    monkeypatch.chdir(REPO)
    main(["--config=tiny", "--seq_len=64", "--local_batch=2", "--steps=2", "--warmup_steps=1",
          "--device=cpu", "--sltrain_r=8", "--json", "--methods=supermask,sltrain"])  # fmt: skip
    stdout = capsys.readouterr().out
    results = {r["method"]: r for r in json.loads(stdout.strip().splitlines()[-1])}
    assert sorted(results) == ["sltrain", "supermask"]
    supermask, sltrain = results["supermask"], results["sltrain"]
    dense = count_parameters(build_meta_model(load_model_config("tiny", 0), "sdpa"))
    for r in results.values():
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0
        assert r["optimizer_state"] == 2 * r["trainable_parameters"]  # AdamW's two moments
    # Supermask adds a frozen weight beside each score matrix; it trains as many as dense.
    assert supermask["trainable_parameters"] == dense
    assert dense < supermask["parameters"] < 2 * dense
    assert supermask["sparsity"] == 0.5 or abs(supermask["sparsity"] - 0.5) < 1e-3
    assert sltrain["trainable_parameters"] < dense / 2
    assert "| supermask |" in stdout


def test_slt_benchmark_rejects_unknown_methods():
    message = (
        "--methods: unknown ['lottery']; choose from "
        "['dense', 'magnitude', 'supermask', 'nm', 'sltrain']"
    )
    with pytest.raises(UserError) as refused:
        parse_args(["--config=tiny", "--methods=dense,lottery"])
    assert str(refused.value) == message
