"""Sparse behaviours pinned on real runs in one process (CPU, fp32, a world of one): a resume
between two threshold refreshes keeps the saved thresholds, N:M logs its target sparsity as
1 - n/m, a sparse checkpoint is refused as --init_from (its export is taken), and an export
killed mid-way leaves nothing that breaks or joins the next one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert as convert_cli
from slt import SLTConfig, SparseTraining, refresh_due
from slt.export import dense_weights
from tests.helpers import (
    logged_losses,
    metrics_records,
    staging_of_a_gone_process,
    tiny_run_flags,
    train_in_process,
)
from utils.checkpoint.trusted import load_torch_file

STEPS = 6
# Thresholds refreshed before steps 1 and 4 (and 7): a run stopped after step 4 resumes at a
# step that is no refresh, so steps 5 and 6 run on the thresholds the checkpoint saved. The
# ramp moves between refreshes (about 0.48 at step 4, 0.498 at step 5), so thresholds
# recomputed at the resume would differ from the saved ones.
MAGNITUDE = {"method": "magnitude", "final_sparsity": 0.5, "end_step": STEPS, "update_every": 3}
STOP = 4
NM_1_4 = {"method": "nm", "n": 1, "m": 4}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sparse_behaviour")


def run_flags(out: Path, data: Path, tokenizer: Path, name: str, slt: dict | None, *extra: str):
    flags = tiny_run_flags(data, tokenizer, out, steps=STEPS, num_workers=0)
    flags += ["--local_batch=4", f"--run_name={name}", *extra]
    if slt is not None:
        config = out / f"{name}.json"
        config.write_text(json.dumps(slt))
        flags += ["--enable_slt", f"--slt_config={config}"]
    return flags


@pytest.fixture(scope="module")
def magnitude(out, mds_tokens, tokenizer_dir) -> dict[str, Path]:
    """Magnitude pruning for 6 steps, a `shard` checkpoint every step; then the same run
    resumed from its step 4."""
    original = run_flags(out, mds_tokens, tokenizer_dir, "magnitude", MAGNITUDE, "--save_every=1")
    train_in_process(*original)
    source = out / "magnitude" / f"step_{STOP:06d}"
    resumed = run_flags(
        out, mds_tokens, tokenizer_dir, "magnitude_resumed", MAGNITUDE, "--save_every=1",
        f"--resume_dir={source}",
    )  # fmt: skip
    train_in_process(*resumed)
    return {"original": out / "magnitude", "resumed": out / "magnitude_resumed"}


@pytest.fixture(scope="module")
def nm_run(out, mds_tokens, tokenizer_dir) -> Path:
    """1:4 N:M for 2 steps, a `full` checkpoint at step 2."""
    flags = run_flags(
        out, mds_tokens, tokenizer_dir, "nm_1_4", NM_1_4, "--train_steps=2", "--save_every=2",
        "--ckpt_type=full",
    )  # fmt: skip
    train_in_process(*flags)
    return out / "nm_1_4"


def thresholds(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_torch_file(step_dir / "trainer.pt")["slt"]["thresholds"]


def masks(step_dir: Path) -> dict[str, torch.Tensor]:
    return {
        name: weight == 0
        for name, weight in dense_weights(step_dir).items()
        if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS))
    }


def test_a_resume_between_refreshes_keeps_the_saved_thresholds(magnitude):
    settings = SLTConfig.from_dict(MAGNITUDE).settings
    assert refresh_due(STOP, settings) and refresh_due(STEPS + 1, settings)
    assert not any(refresh_due(step, settings) for step in range(STOP + 1, STEPS + 1))
    original, resumed = magnitude["original"], magnitude["resumed"]
    saved = thresholds(original / f"step_{STOP:06d}")
    assert len(saved) == 2 * len(PROJECTIONS)
    for step in range(STOP + 1, STEPS + 1):
        step_name = f"step_{step:06d}"
        kept = thresholds(resumed / step_name)
        assert kept.keys() == saved.keys()
        for name, threshold in saved.items():
            # No refresh since step 4: the thresholds are still the saved ones, bit for bit.
            assert torch.equal(kept[name], threshold), (step, name)
            assert torch.equal(thresholds(original / step_name)[name], threshold), (step, name)
        resumed_masks, original_masks = masks(resumed / step_name), masks(original / step_name)
        assert resumed_masks.keys() == original_masks.keys() and resumed_masks
        for name, mask in original_masks.items():
            assert torch.equal(resumed_masks[name], mask), (step, name)
    losses, uninterrupted = logged_losses(resumed), logged_losses(original)
    assert sorted(losses) == list(range(STOP + 1, STEPS + 1))
    assert all(losses[step] == uninterrupted[step] for step in losses), (losses, uninterrupted)


def test_nm_logs_one_minus_n_over_m_as_its_target(nm_run):
    records = [r for r in metrics_records(nm_run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["slt/target_sparsity"] == pytest.approx(0.75)
        assert record["sparsity"] == pytest.approx(0.75, abs=1e-3)  # 1 of every 4 kept


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (2, 8)])
def test_nm_measure_reports_the_target_it_keeps(n, m, world_of_one):
    from transformers import LlamaForCausalLM

    from utils.model import load_model_config

    model = LlamaForCausalLM(load_model_config("tiny", 1024))
    sparse = SparseTraining(model, SLTConfig.from_dict({"method": "nm", "n": n, "m": m}))
    generator = torch.Generator().manual_seed(0)
    for layer in sparse.layers.values():
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    for step in (1, 7):
        metrics = sparse.measure(step)
        assert metrics["slt/target_sparsity"] == pytest.approx(1 - n / m)
        assert metrics["sparsity"] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("source", ["magnitude_shard", "nm_full"])
def test_init_from_a_sparse_checkpoint_is_refused(
    source, magnitude, nm_run, out, mds_tokens, tokenizer_dir, capsys
):
    """docs/training.md: a sparse checkpoint is refused at start-up with one line, status 2
    (export it first); the run directory is never made. Refused for a sparse run of the same
    method and for a dense run alike."""
    step_dir = {
        "magnitude_shard": magnitude["original"] / f"step_{STEPS:06d}",
        "nm_full": nm_run / "step_000002",
    }[source]
    slt = MAGNITUDE if source == "magnitude_shard" else None
    name = f"from_{source}"
    flags = run_flags(out, mds_tokens, tokenizer_dir, name, slt, f"--init_from={step_dir}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train_in_process(*flags)
    assert stop.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: --init_from {step_dir}: start from its export")
    assert "python convert.py" in errors[0]
    assert not (out / name).exists()


def test_a_sparse_run_starts_from_the_export_of_a_sparse_checkpoint(
    nm_run, out, mds_tokens, tokenizer_dir, tmp_path
):
    """What the refusal says to do works: export, then --init_from the export (N:M again,
    its first masks from the loaded weights, which already are 1:4)."""
    exported = convert_cli.convert(nm_run / "step_000002", tmp_path / "nm_export")
    flags = run_flags(
        out, mds_tokens, tokenizer_dir, "from_nm_export", NM_1_4, "--train_steps=1",
        f"--init_from={exported}",
    )  # fmt: skip
    train_in_process(*flags)
    assert sorted(logged_losses(out / "from_nm_export")) == [1]


def leave_a_killed_export(out_dir: Path) -> Path:
    """What a convert killed mid-write leaves: its staging directory beside OUT, holding a
    weights file of other tensors under the real name and a half-written file."""
    staging = staging_of_a_gone_process(out_dir)
    save_file({"leftover": torch.zeros(3)}, str(staging / "model.safetensors"))
    (staging / "config.json").write_text('{"model_type": "lla')
    (staging / "partial.bin").write_bytes(b"\0" * 100)
    return staging


def convert_main(*argv: str, capsys) -> str:
    """convert.py's main with these arguments, as `python convert.py ...` runs it."""
    capsys.readouterr()
    convert_cli.main(list(argv))
    return capsys.readouterr().out


def test_a_killed_exports_leftover_neither_breaks_nor_joins_the_next(magnitude, tmp_path, capsys):
    step_dir = magnitude["original"] / f"step_{STEPS:06d}"
    clean = convert_cli.convert(step_dir, tmp_path / "clean")
    expected_files = sorted(p.name for p in clean.iterdir())
    expected = load_file(str(clean / "model.safetensors"))
    assert "model.safetensors" in expected_files and "config.json" in expected_files

    def check(out_dir: Path, staging: Path) -> None:
        assert not staging.exists()
        assert sorted(p.name for p in out_dir.iterdir()) == expected_files
        weights = load_file(str(out_dir / "model.safetensors"))
        assert weights.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(weights[name], tensor), name
        assert json.loads((out_dir / "config.json").read_text()) == json.loads(
            (clean / "config.json").read_text()
        )
        assert not list(out_dir.parent.glob(f".{out_dir.name}*"))

    out_dir = tmp_path / "exported"
    staging = leave_a_killed_export(out_dir)
    assert convert_main(str(step_dir), str(out_dir), capsys=capsys).strip() == f"wrote {out_dir}"
    check(out_dir, staging)
    # Killed again while replacing that export: --overwrite replaces it whole all the same.
    staging = leave_a_killed_export(out_dir)
    convert_main(str(step_dir), str(out_dir), "--overwrite", capsys=capsys)
    check(out_dir, staging)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out_dir))
    sparse = [m.weight for n, m in model.named_modules() if n.endswith(PROJECTIONS)]
    zeros = sum(int((w == 0).sum()) for w in sparse) / sum(w.numel() for w in sparse)
    logged = [r for r in metrics_records(magnitude["original"]) if r.get("step") == STEPS]
    assert zeros == pytest.approx(logged[-1]["sparsity"], rel=1e-9) and zeros > 0.3
