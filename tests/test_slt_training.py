"""Training with slt on real runs (CPU, gloo, fp32 unless stated): every method logs the same
loss curve however the global batch is split, resumes exactly in every checkpoint format, and
exports a transformers Llama that is the trained network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convert import convert
from datas.local_corpus import write_c4_validation
from slt import SLTConfig, nm_mask, scheduled_sparsity
from slt.export import dense_weights
from slt.schedule import last_refresh
from tests.helpers import (
    logged_losses,
    metrics_records,
    python_train,
    tiny_run_flags,
    torchrun_runs,
    train_in_process,
)
from utils.checkpoint import read_model_tensors

STEPS = 8
METHODS = {
    "magnitude": {"method": "magnitude", "final_sparsity": 0.5, "end_step": 6, "update_every": 2},
    "supermask": {"method": "supermask", "final_sparsity": 0.5},
    # A strong SR-STE decay: applied once per micro-step instead of once per step, it would
    # change the curve of a run with more micro-steps.
    "nm": {"method": "nm", "srste_lambda": 0.1},
    "sltrain": {"method": "sltrain", "r": 8, "delta": 0.1, "alpha": 16},
}
MAGNITUDE, SLTRAIN = METHODS["magnitude"], METHODS["sltrain"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL_WINDOWS = 6


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
def two_ranks(out, mds_tokens, tokenizer_dir) -> dict[str, Path]:
    """Every method on 2 ranks x 4 sequences x 1 micro-step, `shard` checkpoints at steps 4
    and 8; then magnitude again, resumed from its step 4. One torchrun launch."""
    runs = [slt_flags(out, mds_tokens, tokenizer_dir, f"{m}2", c) for m, c in METHODS.items()]
    resumed = f"--resume_dir={out / 'magnitude2' / 'step_000004'}"
    runs.append(slt_flags(out, mds_tokens, tokenizer_dir, "magnitude2_resumed", MAGNITUDE, resumed))
    torchrun_runs(runs, out)
    return {m: out / f"{m}2" for m in METHODS} | {"magnitude_resumed": out / "magnitude2_resumed"}


@pytest.fixture(scope="module")
def one_rank(out, mds_tokens, tokenizer_dir) -> dict[str, Path]:
    """The same runs in one process as 1 rank x 2 sequences x 4 micro-steps (every factor of
    the split differs), `local` checkpoints."""
    for method, slt in METHODS.items():
        flags = ["--local_batch=2", "--ckpt_type=local", "--enable_tensorboard"]
        train_in_process(*slt_flags(out, mds_tokens, tokenizer_dir, f"{method}1", slt, *flags))
    return {method: out / f"{method}1" for method in METHODS}


def zero_pattern(step_dir: Path) -> dict[str, torch.Tensor]:
    weights = dense_weights(step_dir)
    return {
        k: v == 0
        for k, v in weights.items()
        if k.endswith(tuple(p + ".weight" for p in PROJECTIONS))
    }


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_the_same_however_the_batch_is_split(method, two_ranks, one_rank):
    """Ranks, micro-batch and accumulation all differ, so weights agree to float rounding
    only: the losses and every trained tensor (pruned entries too) match closely, and the
    masks may differ only in entries at the threshold. Masks and thresholds come from full
    weights, never from a rank's shards."""
    two, one = logged_losses(two_ranks[method]), logged_losses(one_rank[method])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert two[STEPS] < two[1] - 0.3, two
    tensors_two = read_model_tensors(two_ranks[method] / "step_000008")
    tensors_one = read_model_tensors(one_rank[method] / "step_000008")
    assert tensors_two.keys() == tensors_one.keys()
    for name, tensor in tensors_two.items():
        torch.testing.assert_close(tensor, tensors_one[name], rtol=1e-3, atol=1e-3, msg=name)
    masks_two = zero_pattern(two_ranks[method] / "step_000008")
    masks_one = zero_pattern(one_rank[method] / "step_000008")
    assert masks_two.keys() == masks_one.keys() and len(masks_two) == 2 * len(PROJECTIONS)
    differing = sum(int((masks_two[k] != masks_one[k]).sum()) for k in masks_two)
    assert differing <= 1e-4 * sum(m.numel() for m in masks_two.values())


def test_srste_decay_is_added_once_per_step_whatever_the_loss_scale(mds_tokens, tokenizer_dir):
    """An fp16 step of two micro-steps: the gradient the optimizer receives differs from the
    one without decay by exactly srste_lambda * w on the pruned entries (not twice that, not
    divided by the loss scale)."""
    import train
    from utils.args import apply_device_defaults, parse_args
    from utils.distributed import init_distributed, local_tensor, shutdown
    from utils.model import load_model_config
    from utils.optim import build_optimizer
    from utils.parallelize import build_grad_scaler

    env = init_distributed()
    try:
        flags = tiny_run_flags(mds_tokens, tokenizer_dir, Path("."), steps=1, num_workers=0)
        args = parse_args([*flags, "--fp16"])
        apply_device_defaults(args, env.device)
        tokens = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(0))
        batches = [{"input_ids": t, "labels": t} for t in tokens.split(2)]
        gradients, weights = {}, {}
        for decay in (0.0, 0.5):
            slt = SLTConfig.from_dict({"method": "nm", "srste_lambda": decay})
            options = train.ModelOptions.from_flags(args, torch.float16)
            model, sparse = train.build_model(options, load_model_config("tiny", 1024), env, slt)
            optimizer = build_optimizer(model, lr=0.0, weight_decay=0.0, fp16=True)
            seen = gradients.setdefault(decay, {})
            optimizer.register_step_pre_hook(
                lambda *_, model=model, seen=seen: seen.update(
                    (n, local_tensor(p.grad).clone()) for n, p in model.named_parameters()
                )
            )
            weights = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
            scaler = build_grad_scaler(True, env.device)
            train.train_step(model, optimizer, scaler, batches, env, 0.0, sparse)
            assert seen, "the scaler skipped the step: nothing was compared"
    finally:
        shutdown()
    name = "model.layers.0.mlp.down_proj.weight"
    pruned = ~nm_mask(weights[name].half(), 2, 4)
    torch.testing.assert_close(
        gradients[0.5][name] - gradients[0.0][name], 0.5 * weights[name] * pruned
    )


def test_measured_sparsity_is_logged(one_rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = metrics_records(one_rank["magnitude"])
    settings = SLTConfig.from_dict(MAGNITUDE).settings
    for record in records:
        target = scheduled_sparsity(last_refresh(record["step"], settings), settings)
        assert record["slt/target_sparsity"] == pytest.approx(target)
    # Measured after each step's update, which moves weights across the threshold in both
    # directions (pruned weights still train); the schedule still shows through.
    measured = [record["sparsity"] for record in records]
    assert measured[0] < 0.3 and 0.45 < measured[-1] <= 0.5
    events = EventAccumulator(str(one_rank["magnitude"].parent / "tensorboard" / "magnitude1"))
    events.Reload()
    assert {"train/sparsity", "slt/target_sparsity", "slt/trainable_params"} <= set(
        events.Tags()["scalars"]
    )


def test_resume_shard_on_two_ranks_is_exact(two_ranks):
    resumed = logged_losses(two_ranks["magnitude_resumed"])
    original = logged_losses(two_ranks["magnitude"])
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == original[s] for s in resumed)


def test_resume_local_is_exact(one_rank, out, mds_tokens, tokenizer_dir):
    flags = slt_flags(
        out, mds_tokens, tokenizer_dir, "magnitude1_resumed", MAGNITUDE, "--local_batch=2",
        "--ckpt_type=local", f"--resume_dir={one_rank['magnitude'] / 'step_000004'}",
    )  # fmt: skip
    train_in_process(*flags)
    resumed, original = (
        logged_losses(out / "magnitude1_resumed"),
        logged_losses(one_rank["magnitude"]),
    )
    assert all(resumed[s] == original[s] for s in range(5, STEPS + 1))


@pytest.fixture(scope="module")
def c4_dir(docstrings, tmp_path_factory) -> Path:
    return write_c4_validation(docstrings[-100:], tmp_path_factory.mktemp("c4"))


@pytest.fixture(scope="module")
def bf16_full(out, mds_tokens, tokenizer_dir, c4_dir):
    """bf16 compute, `full` checkpoints and C4 evaluation at the last step, for the method
    named (SLTrain also with activation checkpointing). Returns (run dir, its stdout)."""
    done: dict[str, tuple[Path, str]] = {}

    def run(method: str) -> tuple[Path, str]:
        if method not in done:
            name = f"{method}_bf16_full"
            extra = ["--enable_ckpt"] if method == "sltrain" else []
            flags = slt_flags(
                out, mds_tokens, tokenizer_dir, name, METHODS[method], "--ckpt_type=full",
                "--bf16", f"--eval_every={STEPS}", f"--eval_data={c4_dir}",
                f"--eval_max_windows={EVAL_WINDOWS}", *extra,
            )  # fmt: skip
            done[method] = (out / name, train_in_process(*flags))
        return done[method]

    return run


def test_resume_full_is_exact_with_bf16_and_activation_checkpointing(
    bf16_full, out, mds_tokens, tokenizer_dir, c4_dir
):
    run_dir, _ = bf16_full("sltrain")
    flags = slt_flags(
        out, mds_tokens, tokenizer_dir, "slt_full_resumed", SLTRAIN, "--ckpt_type=full",
        "--bf16", "--enable_ckpt", f"--resume_dir={run_dir / 'step_000004'}",
    )  # fmt: skip
    train_in_process(*flags)
    resumed, original = logged_losses(out / "slt_full_resumed"), logged_losses(run_dir)
    assert all(resumed[s] == original[s] for s in range(5, STEPS + 1))
    assert original[STEPS] < original[1] - 0.3


@pytest.mark.parametrize("method", ["magnitude", "nm", "sltrain"])
def test_exported_bf16_model_is_the_trained_network(method, bf16_full, c4_dir, tokenizer_dir):
    """Masks chosen among the bf16 weights the forward saw, not among their fp32 masters:
    loaded in bf16, the export scores exactly the perplexity measured during training."""
    from transformers import AutoModelForCausalLM

    from datas.C4.c4_eval import evaluate_c4_ppl
    from tests.conftest import DATA_SEQ_LEN

    run_dir, _ = bf16_full(method)
    in_training = [r for r in metrics_records(run_dir) if "eval/c4_ppl" in r][-1]
    assert in_training["step"] == STEPS
    model = AutoModelForCausalLM.from_pretrained(
        str(run_dir / f"step_{STEPS:06d}"), dtype=torch.bfloat16
    )
    ppl, _ = evaluate_c4_ppl(
        model, tokenizer_dir, c4_dir, seq_len=DATA_SEQ_LEN, max_windows=EVAL_WINDOWS
    )
    assert ppl == in_training["eval/c4_ppl"]


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


def test_full_checkpoint_is_a_dense_llama_with_sltrain_weights(bf16_full):
    step_dir = bf16_full("sltrain")[0] / "step_000008"
    model = generates(step_dir)
    sidecar = load_file(str(step_dir / "slt_state.safetensors"))
    prefix = "model.layers.1.mlp.down_proj."
    a, b = sidecar[prefix + "lora_A"], sidecar[prefix + "lora_B"]
    values, columns = sidecar[prefix + "sparse_values"], sidecar[prefix + "sparse_columns"].long()
    expected = (16 / 8) * b @ a + torch.zeros_like(b @ a).scatter(1, columns, values)
    exported = model.model.layers[1].mlp.down_proj.weight.detach()
    torch.testing.assert_close(exported, expected, rtol=1e-2, atol=1e-3)  # composed in bf16
    assert b.abs().sum() > 0  # the low-rank part trained away from its zero init


def test_trainable_parameters_are_printed_beside_the_dense_model(bf16_full):
    """The tiny Llama (vocab 1024, hidden 64, FFN 176, 2 layers, 4 heads, 2 KV heads) has
    223,552 parameters. SLTrain (r 8, delta 0.1) trains, per projection, 8 * (in + out)
    low-rank values and out * round(0.1 * in) sparse values: 13,760 per layer, plus the norms,
    embeddings and head; its 8,832 integer support indices are not parameters it trains."""
    run_dir, stdout = bf16_full("sltrain")
    recorded = json.loads((run_dir / "config.json").read_text())["parameters"]
    assert recorded == {"trainable": 158_912, "dense_model": 223_552}
    assert "0.16M trainable parameters (0.22M in the dense model)" in stdout


def test_converter_exports_the_pruned_weights(two_ranks, tmp_path):
    model = generates(convert(two_ranks["magnitude"] / "step_000008", tmp_path / "exported"))
    sparse = [m.weight for n, m in model.named_modules() if n.endswith(PROJECTIONS)]
    zeros = sum(int((w == 0).sum()) for w in sparse) / sum(w.numel() for w in sparse)
    assert zeros == pytest.approx(0.5, abs=0.02)
    assert (model.model.embed_tokens.weight != 0).all() and (model.lm_head.weight != 0).all()


@pytest.mark.parametrize(
    ("slt", "message"),
    [
        (None, "was trained with --enable_slt; resume with the same --enable_slt flags"),
        ({**MAGNITUDE, "final_sparsity": 0.7}, "resume with the same --slt_config"),
    ],
)
def test_resume_with_another_slt_setting_is_refused(
    one_rank, out, mds_tokens, tokenizer_dir, slt, message
):
    name = "magnitude1_other"
    step = one_rank["magnitude"] / "step_000004"
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, out, steps=STEPS, num_workers=0)
    flags += ["--local_batch=4", f"--run_name={name}", f"--resume_dir={step}"]
    if slt:
        flags = slt_flags(out, mds_tokens, tokenizer_dir, name, slt, f"--resume_dir={step}")
    proc = python_train(*flags, status=2)
    errors = proc.stderr.strip().splitlines()
    assert (
        len(errors) == 1 and errors[0].startswith("error: --resume_dir ") and message in errors[0]
    )
