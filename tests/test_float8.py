"""Float8 training through torchao on CPU (torch._scaled_mm runs there): which layers are
swapped, that a float8 run on 2 ranks really computes differently yet trains, reports no MFU,
and writes checkpoints a bf16/fp32 run resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from tests.helpers import REPO, logged_losses, tiny_run_flags, torchrun
from utils.float8 import convert_to_float8
from utils.model import build_meta_model, load_model_config

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_only_the_decoder_projections_become_float8_and_names_stay():
    model = build_meta_model(load_model_config("tiny", 0), "sdpa")
    names_before = list(model.state_dict())
    convert_to_float8(model)
    float8 = {name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    layers = model.config.num_hidden_layers
    assert len(float8) == layers * len(PROJECTIONS)
    assert all(name.rpartition(".")[2] in PROJECTIONS for name in float8)
    assert type(model.lm_head) is nn.Linear
    assert list(model.state_dict()) == names_before  # checkpoints are format-compatible


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_float8_run_trains_on_two_ranks_and_a_plain_run_resumes_from_it(
    mds_tokens: Path, tokenizer_dir: Path, tmp_path: Path
):
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=4, num_workers=0)
    flags += ["--local_batch=2", "--peak_tflops=1"]
    torchrun(REPO / "train.py", *flags, "--run_name=plain")
    torchrun(REPO / "train.py", *flags, "--run_name=f8", "--float8", "--save_every=2")
    plain, float8 = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "f8")
    # Same weights and batches: float8 rounding moves the loss a little, and only a little.
    assert float8[1] != plain[1] and float8[1] == pytest.approx(plain[1], rel=2e-2)
    assert float8[4] < float8[1]
    assert all(r["mfu"] is None for r in metrics(tmp_path / "f8") if "loss" in r)
    assert all(r["mfu"] > 0 for r in metrics(tmp_path / "plain") if "loss" in r)

    checkpoint = tmp_path / "f8" / "step_000002"
    torchrun(REPO / "train.py", *flags, "--run_name=resumed", f"--resume_dir={checkpoint}")
    resumed = logged_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert resumed[4] == pytest.approx(float8[4], rel=2e-2)
