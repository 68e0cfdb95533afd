"""Training with slt on real runs (CPU, gloo, fp32 unless stated): masks and losses equal on 1
and 2 ranks, exact resume in every checkpoint format, and export to a transformers Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slt import SLTConfig, scheduled_sparsity
from slt.schedule import last_refresh
from tests.helpers import (
    REPO,
    logged_losses,
    metrics_records,
    python_train,
    tiny_run_flags,
    torchrun,
    train_in_process,
)
from utils.convert import convert, read_full_weights

STEPS = 8
MAGNITUDE = {"method": "magnitude", "final_sparsity": 0.5, "end_step": 6, "update_every": 2}
SLTRAIN = {"method": "sltrain", "r": 8, "delta": 0.1, "alpha": 16}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slt_runs")


def slt_flags(out: Path, data: Path, tokenizer: Path, name: str, slt: dict, *extra: str):
    config = out / f"{name}.json"
    config.write_text(json.dumps(slt))
    flags = tiny_run_flags(data, tokenizer, out, steps=STEPS, num_workers=0)
    return [*flags, "--local_batch=4", f"--run_name={name}", "--save_every=4", "--enable_slt",
            f"--slt_config={config}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks(out, mds_tokens, tokenizer_dir) -> Path:
    """Magnitude pruning on 2 ranks, `shard` checkpoints at steps 4 and 8."""
    torchrun("train.py", *slt_flags(out, mds_tokens, tokenizer_dir, "mag2", MAGNITUDE))
    return out / "mag2"


@pytest.fixture(scope="module")
def one_rank(out, mds_tokens, tokenizer_dir) -> Path:
    """The same run in one process (two micro-steps per step), `local` checkpoints."""
    train_in_process(
        *slt_flags(out, mds_tokens, tokenizer_dir, "mag1", MAGNITUDE, "--ckpt_type=local"),
        "--enable_tensorboard",
    )
    return out / "mag1"


def zero_pattern(step_dir: Path) -> dict[str, torch.Tensor]:
    weights = read_full_weights(step_dir)
    return {
        k: v == 0
        for k, v in weights.items()
        if k.endswith(tuple(p + ".weight" for p in PROJECTIONS))
    }


def test_every_method_gives_identical_masks_and_losses_on_one_and_two_ranks(tmp_path):
    """Every rank feeds the same batch, so the runs must agree bit for bit: thresholds, masks,
    measured sparsity and losses come from full weights, not from each rank's shards."""
    from tests.scripts.slt_dist import METHODS, run
    from utils.distributed import init_distributed, shutdown

    torchrun(REPO / "tests/scripts/slt_dist.py", str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    env = init_distributed()  # the world of one, in this process
    try:
        one = {method: run(env, slt) for method, slt in METHODS.items()}
    finally:
        shutdown()
    assert sorted(one) == ["magnitude", "nm", "sltrain", "supermask"]
    for method in one:
        assert one[method]["losses"] == two[method]["losses"], method
        assert one[method]["sparsity"] == two[method]["sparsity"], method
        for name, mask in one[method]["masks"].items():
            assert torch.equal(mask, two[method]["masks"][name]), (method, name)
        for name, threshold in one[method]["thresholds"].items():
            assert torch.equal(threshold, two[method]["thresholds"][name]), (method, name)
    assert one["nm"]["sparsity"] == [0.5, 0.5, 0.5]
    assert one["supermask"]["sparsity"][0] == pytest.approx(0.7, abs=1e-4)


def test_training_on_one_and_two_ranks_agrees(two_ranks, one_rank):
    """Real runs split the batch differently, so weights agree to float rounding only: the
    losses match closely and the masks may differ only in entries at the threshold."""
    two, one = logged_losses(two_ranks), logged_losses(one_rank)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    masks_two = zero_pattern(two_ranks / "step_000008")
    masks_one = zero_pattern(one_rank / "step_000008")
    assert masks_two.keys() == masks_one.keys() and len(masks_two) == 2 * len(PROJECTIONS)
    differing = sum(int((masks_two[k] != masks_one[k]).sum()) for k in masks_two)
    assert differing <= 1e-4 * sum(m.numel() for m in masks_two.values())


def test_measured_sparsity_is_logged(one_rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = metrics_records(one_rank)
    settings = SLTConfig.from_dict(MAGNITUDE).settings
    for record in records:
        target = scheduled_sparsity(last_refresh(record["step"], settings), settings)
        assert record["slt/target_sparsity"] == pytest.approx(target)
    # Measured after each step's update, which moves weights across the threshold in both
    # directions (pruned weights still train); the schedule still shows through.
    measured = [record["sparsity"] for record in records]
    assert measured[0] < 0.3 < 0.45 < measured[-1] <= 0.5
    events = EventAccumulator(str(one_rank.parent / "tensorboard" / "mag1"))
    events.Reload()
    assert {"train/sparsity", "slt/target_sparsity", "slt/trainable_params"} <= set(
        events.Tags()["scalars"]
    )


def test_resume_shard_on_two_ranks_is_exact(two_ranks, out, mds_tokens, tokenizer_dir):
    flags = slt_flags(out, mds_tokens, tokenizer_dir, "mag2_resumed", MAGNITUDE)
    torchrun("train.py", *flags, f"--resume_dir={two_ranks / 'step_000004'}")
    resumed, original = logged_losses(out / "mag2_resumed"), logged_losses(two_ranks)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == original[s] for s in resumed)


def test_resume_local_is_exact(one_rank, out, mds_tokens, tokenizer_dir):
    flags = slt_flags(
        out, mds_tokens, tokenizer_dir, "mag1_resumed", MAGNITUDE, "--ckpt_type=local"
    )
    train_in_process(*flags, f"--resume_dir={one_rank / 'step_000004'}")
    resumed, original = logged_losses(out / "mag1_resumed"), logged_losses(one_rank)
    assert all(resumed[s] == original[s] for s in range(5, STEPS + 1))


@pytest.fixture(scope="module")
def sltrain_full(out, mds_tokens, tokenizer_dir) -> Path:
    """SLTrain with bf16 compute and activation checkpointing, `full` checkpoints."""
    flags = slt_flags(
        out,
        mds_tokens,
        tokenizer_dir,
        "slt_full",
        SLTRAIN,
        "--ckpt_type=full",
        "--bf16",
        "--enable_ckpt",
    )
    train_in_process(*flags)
    return out / "slt_full"


def test_resume_full_is_exact_with_bf16_and_activation_checkpointing(
    sltrain_full, out, mds_tokens, tokenizer_dir
):
    flags = slt_flags(
        out,
        mds_tokens,
        tokenizer_dir,
        "slt_full_resumed",
        SLTRAIN,
        "--ckpt_type=full",
        "--bf16",
        "--enable_ckpt",
    )
    train_in_process(*flags, f"--resume_dir={sltrain_full / 'step_000004'}")
    resumed, original = logged_losses(out / "slt_full_resumed"), logged_losses(sltrain_full)
    assert all(resumed[s] == original[s] for s in range(5, STEPS + 1))
    assert original[STEPS] < original[1] - 0.3


def generates(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    assert out.shape == (1, ids.shape[1] + 4)
    return model


def test_full_checkpoint_is_a_dense_llama_with_sltrain_weights(sltrain_full):
    step_dir = sltrain_full / "step_000008"
    model = generates(step_dir)
    sidecar = load_file(str(step_dir / "slt_state.safetensors"))
    prefix = "model.layers.1.mlp.down_proj."
    a, b = sidecar[prefix + "lora_A"], sidecar[prefix + "lora_B"]
    values, columns = sidecar[prefix + "sparse_values"], sidecar[prefix + "sparse_columns"].long()
    expected = (16 / 8) * b @ a + torch.zeros_like(b @ a).scatter(1, columns, values)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight.detach(), expected)
    assert b.abs().sum() > 0  # the low-rank part trained away from its zero init


def test_converter_exports_the_pruned_weights(two_ranks, tmp_path):
    model = generates(convert(two_ranks / "step_000008", tmp_path / "exported"))
    sparse = [m.weight for n, m in model.named_modules() if n.endswith(PROJECTIONS)]
    zeros = sum(int((w == 0).sum()) for w in sparse) / sum(w.numel() for w in sparse)
    assert zeros == pytest.approx(0.5, abs=0.02)
    assert (model.model.embed_tokens.weight != 0).all() and (model.lm_head.weight != 0).all()


@pytest.mark.parametrize(
    ("slt", "message"),
    [
        (None, "was trained with --enable_slt; resume with the same --enable_slt --slt_config"),
        ({**MAGNITUDE, "final_sparsity": 0.7}, "resume with the same --slt_config"),
    ],
)
def test_resume_with_another_slt_setting_is_refused(
    one_rank, out, mds_tokens, tokenizer_dir, slt, message
):
    name = "mag1_other"
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, out, steps=STEPS, num_workers=0)
    flags += ["--local_batch=4", f"--run_name={name}", f"--resume_dir={one_rank / 'step_000004'}"]
    if slt:
        flags = slt_flags(
            out, mds_tokens, tokenizer_dir, name, slt, f"--resume_dir={one_rank / 'step_000004'}"
        )
    proc = python_train(*flags, status=2)
    errors = proc.stderr.strip().splitlines()
    assert (
        len(errors) == 1 and errors[0].startswith("error: --resume_dir ") and message in errors[0]
    )
