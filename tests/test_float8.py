"""Float8 training through torchao on CPU (torch._scaled_mm runs there): which layers are
swapped, that a float8 run on 2 ranks trains, reports no MFU and writes checkpoints a plain
run resumes from, which then computes slightly differently, and selective checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchao.float8 import convert_to_float8_training

from tests.helpers import logged_losses, metrics_records, tiny_run_flags, torchrun_runs
from utils.float8 import convert_to_float8
from utils.model import build_meta_model, load_model_config
from utils.parallelize import wrap_activation_checkpointing

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


def test_float8_run_trains_on_two_ranks_and_a_plain_run_resumes_from_it(
    mds_tokens: Path, tokenizer_dir: Path, tmp_path: Path
):
    """The plain run resumed from the float8 run's step 2 computes step 3 from the same weights
    and batch: the two losses differ only by float8 rounding, which must be there and small."""
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=4, num_workers=0)
    flags += ["--local_batch=2", "--peak_tflops=1"]
    checkpoint = tmp_path / "f8" / "step_000002"
    torchrun_runs(
        [
            [*flags, "--run_name=f8", "--float8", "--save_every=2"],
            [*flags, "--run_name=plain", f"--resume_dir={checkpoint}"],
        ],
        tmp_path,
    )
    float8, plain = logged_losses(tmp_path / "f8"), logged_losses(tmp_path / "plain")
    assert sorted(plain) == [3, 4]
    assert float8[3] != plain[3] and float8[3] == pytest.approx(plain[3], rel=1e-3)
    assert float8[4] < float8[1]
    assert all(r["mfu"] is None for r in metrics_records(tmp_path / "f8") if "loss" in r)
    assert all(r["mfu"] > 0 for r in metrics_records(tmp_path / "plain") if "loss" in r)


class CountFloat8Matmuls(TorchDispatchMode):
    """Matmuls on torchao's float8 tensors (which run them as torch._scaled_mm below)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        float8 = any("Float8" in type(a).__name__ for a in args)
        self.calls += func is torch.ops.aten.mm.default and float8
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_float8_matmul_outputs():
    """Forward and the two gradients: 3 float8 matmuls per layer; recomputing the forward's
    in backward, as full checkpointing does, would make it 4."""
    torch.manual_seed(0)
    counts = {}
    for mode in ("selective", "full"):
        block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        convert_to_float8_training(block)
        block = wrap_activation_checkpointing(block, mode)
        x = torch.randn(16, 32, requires_grad=True)
        with CountFloat8Matmuls() as counter:
            block(x).sum().backward()
        counts[mode] = counter.calls
    assert counts == {"selective": 6, "full": 8}
