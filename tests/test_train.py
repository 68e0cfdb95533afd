"""train.py end to end: real torchrun process groups (gloo), real MDS data, real metrics.

The baseline is a 2-rank fp32 run on pre-tokenized blocks; other layouts of the same global
batch (1 rank, other sharding strategies, two "nodes") must log the same loss curve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from datas.local_corpus import write_c4_validation
from tests.conftest import DATA_SEQ_LEN
from tests.helpers import (
    logged_losses,
    metrics_records,
    python_train,
    tiny_run_flags,
    torchrun_runs,
    torchrun_two_nodes,
)
from tests.test_eval_tasks import DATA as TASK_DATA
from tests.test_eval_tasks import MC_YAML, write_task
from utils.loss import IGNORE_INDEX

STEPS = 8


def common_flags(data: Path, tokenizer: Path, out: Path, run_name: str | None) -> list[str]:
    flags = tiny_run_flags(data, tokenizer, out, steps=STEPS, num_workers=0)
    return flags + ([f"--run_name={run_name}"] if run_name else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mds_tokens, mds_text, tokenizer_dir, docstrings) -> dict[str, Path]:
    """The module's runs: the 2-rank ones in one torchrun launch, then `python train.py` on
    one rank. Returns each run's directory by name."""
    out = tmp_path_factory.mktemp("train_runs")
    c4 = write_c4_validation(docstrings[-100:], out / "c4")
    tasks = out / "tasks" / "tasks"
    tasks.mkdir(parents=True)
    write_task(tasks, "mc", MC_YAML, TASK_DATA / "multiple_choice.jsonl")
    args_file = out / "args.yaml"
    args_file.write_text("lr: 0.01\nlocal_batch: 2\nstrategy: overflow\n")
    two_ranks = {
        "baseline": (mds_tokens, ["--local_batch=2", "--peak_tflops=1"]),
        "zero2_chunked_selective": (mds_tokens, [
            "--local_batch=2", "--sharding_strategy=shard_grad_op", "--chunked_loss",
            "--activation_checkpointing=selective",
        ]),
        "no_shard_ac": (
            mds_tokens, ["--local_batch=2", "--sharding_strategy=no_shard", "--enable_ckpt"]
        ),
        "bf16_overflow": (mds_text, [
            f"--args_file={args_file}", "--bf16", "--num_workers=1",
            f"--local_cache_dir={out / 'cache'}", "--enable_tensorboard", "--eval_every=4",
            f"--eval_data={c4}", "--eval_max_windows=6", "--peak_tflops=0.5",
        ]),
        "holdout": (mds_tokens, [
            "--local_batch=2", "--save_every=8", *holdout_eval_flags(c4), "--eval_tasks=mc",
            "--eval_tasks_every=8", f"--eval_tasks_include={tasks}",
        ]),
        "fp16_trunc": (mds_text, [
            "--local_batch=2", "--fp16", "--strategy=trunc", "--sharding_strategy=hybrid_shard",
        ]),
    }  # fmt: skip
    torchrun_runs(
        [common_flags(data, tokenizer_dir, out, name) + extra
         for name, (data, extra) in two_ranks.items()],
        out,
    )  # fmt: skip
    python_train(
        *common_flags(mds_tokens, tokenizer_dir, out, "one_rank"), "--local_batch=8",
        "--peak_tflops=1",
    )  # fmt: skip
    return {name: out / name for name in [*two_ranks, "one_rank"]} | {"c4": c4, "tasks": tasks}


def holdout_eval_flags(c4: Path) -> list[str]:
    """Two named sets: C4-format files, and 16 pre-tokenized blocks training never reads."""
    return [
        "--eval_every=4", "--eval_data", f"c4={c4}", "held=train_holdout",
        "--holdout_samples=16", "--eval_max_windows=20",
    ]  # fmt: skip


def list_losses(run_dir: Path) -> list[float]:
    return list(logged_losses(run_dir).values())


def assert_same_curve(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert abs(x - y) <= rel * abs(x), f"step {step}: {x} vs {y}"


def test_global_batch_split_does_not_change_the_loss_curve(runs):
    # 2 ranks x 2 sequences x 2 micro-steps vs plain `python train.py`: 1 rank x 8 x 1, so
    # ranks, micro-batch and accumulation all differ.
    two = list_losses(runs["baseline"])
    one = list_losses(runs["one_rank"])
    for run in ("baseline", "one_rank"):  # 8 sequences of 64 tokens a step, on every layout
        seen = [r["tokens_seen"] for r in metrics_records(runs[run]) if "loss" in r]
        assert seen == [512 * step for step in range(1, STEPS + 1)]
    assert_same_curve(two, one, rel=1e-4)
    assert two[-1] < two[0] - 0.3, f"loss did not fall: {two}"


def test_mfu_is_per_gpu_on_one_rank_and_on_two(runs):
    """Per GPU: tokens per second per GPU is the run's over its world size, and MFU is that
    times the model's FLOPs per token over the peak, so the same model scores MFU by the same
    rule however many ranks run it (timings differ, the ratios do not)."""
    ratios = {}
    for run, world in (("baseline", 2), ("one_rank", 1)):
        records = [r for r in metrics_records(runs[run]) if "loss" in r]
        for r in records:
            assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / world)
        ratios[run] = {r["mfu"] / r["tokens_per_s_per_gpu"] for r in records}
    values = ratios["baseline"] | ratios["one_rank"]
    assert max(values) == pytest.approx(min(values), rel=1e-9)


def test_sharding_strategies_and_speed_options_match_full_shard(runs):
    """Two runs cover ZeRO-2, replication, both checkpointing modes and the chunked head; the
    chunked head uses the output weight gathered by the root forward across 2 ranks, and its
    loss and gradients must equal the plain head's."""
    baseline = list_losses(runs["baseline"])
    zero2 = list_losses(runs["zero2_chunked_selective"])
    replicated = list_losses(runs["no_shard_ac"])
    assert_same_curve(baseline, zero2, rel=1e-5)
    assert_same_curve(baseline, replicated, rel=1e-5)


def test_two_nodes_on_localhost_match_one_node(runs, mds_tokens, tokenizer_dir, tmp_path):
    """`torchrun --nnodes=2`, one process per "node", hybrid sharding."""
    baseline = list_losses(runs["baseline"])
    flags = common_flags(mds_tokens, tokenizer_dir, tmp_path, "two_nodes")
    torchrun_two_nodes([*flags, "--local_batch=2", "--sharding_strategy=hybrid_shard"], tmp_path)
    assert_same_curve(baseline, list_losses(tmp_path / "two_nodes"), rel=1e-5)


def test_mixed_precision_text_strategies_eval_and_logging(runs):
    bf16, fp16 = runs["bf16_overflow"], runs["fp16_trunc"]
    for run_dir in (bf16, fp16):
        losses = list_losses(run_dir)
        assert len(losses) == STEPS and losses[-1] < losses[0], losses
    # tokens_seen grows by the real tokens of each step (padding is excluded: test_data_packing)
    seen = [r["tokens_seen"] for r in metrics_records(fp16) if "loss" in r]
    assert all(0 < b - a <= 8 * 64 for a, b in zip([0, *seen], seen, strict=False))
    records = metrics_records(bf16)
    record = [r for r in records if "loss" in r][-1]
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb"}
    assert 0 < record["mfu"] < 1  # from --peak_tflops; without it MFU is undefined on CPU:
    fp16_records = metrics_records(fp16)
    assert fp16_records[-1]["mfu"] is None
    config = json.loads((bf16 / "config.json").read_text())
    assert config["args"]["strategy"] == "overflow" and config["args"]["bf16"] is True
    assert config["model"]["vocab_size"] == 1024  # grown to the tokenizer's vocabulary
    evals = [r for r in records if "eval/c4_ppl" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["eval/tokens"] == 6 * (DATA_SEQ_LEN - 1) for r in evals)
    assert evals[1]["eval/c4_ppl"] < evals[0]["eval/c4_ppl"]
    assert abs(math.log(evals[1]["eval/c4_ppl"]) - evals[1]["eval/c4_loss"]) < 1e-9

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(bf16.parent / "tensorboard" / "bf16_overflow"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    expected = {
        "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second",
        "train/tokens_per_second_per_gpu", "train/step_time", "train/data_wait_fraction",
        "train/peak_mem_gb", "eval/c4_ppl", "eval/c4_loss", "eval/tokens",
    }  # fmt: skip
    assert expected <= tags, expected - tags
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert board.Tags()["tensors"], "the run's arguments are not recorded as text"
    assert any((bf16.parent / "cache").iterdir()), "--local_cache_dir was not used"


# ---------------------------------------------------------------- bad input
# (the flags' and files' mistakes are in tests/test_bad_input.py; these two need text data
# or a tokenizer of their own)
def run_in_process(argv: list[str], capsys) -> str:
    """train.main in this process: bad input must stop it before the model is built."""
    import train

    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_seq_len_beyond_the_models_positions_is_refused(mds_text, tokenizer_dir, tmp_path, capsys):
    argv = common_flags(mds_text, tokenizer_dir, tmp_path, "long") + ["--seq_len=4096"]
    message = "--seq_len 4096 exceeds the model's max_position_embeddings 1024"
    assert message in run_in_process(argv + ["--local_batch=4"], capsys)


def test_tokenizer_without_eos_is_refused_for_packing(mds_tokens, tokenizer_dir, tmp_path, capsys):
    import shutil

    no_eos = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    special = no_eos / "special_tokens_map.json"
    if special.exists():
        special.write_text(
            json.dumps(
                {k: v for k, v in json.loads(special.read_text()).items() if k != "eos_token"}
            )
        )
    argv = common_flags(mds_tokens, no_eos, tmp_path, "no_eos") + ["--local_batch=4"]
    assert "EOS" in run_in_process(argv, capsys)


def test_sparse_layers_that_do_not_fit_the_model_are_refused(
    mds_tokens, tokenizer_dir, tmp_path, capsys
):
    slt_config = tmp_path / "nm.json"
    slt_config.write_text(json.dumps({"method": "nm", "m": 5}))
    argv = common_flags(mds_tokens, tokenizer_dir, tmp_path, "bad_slt") + [
        "--local_batch=4", "--enable_slt", f"--slt_config={slt_config}",
    ]  # fmt: skip
    assert "nm needs in_features divisible by m=5" in run_in_process(argv, capsys)


# ---------------------------------------------------------------- one optimizer step
def tiny_step_model(env, dtype=torch.float32):
    import train
    from utils.attention import AttentionFlags
    from utils.model import load_model_config
    from utils.optim import build_optimizer

    options = train.ModelOptions(AttentionFlags(), dtype=dtype)
    model, _ = train.build_model(options, load_model_config("tiny", 0), env)
    return model, build_optimizer(model, lr=1e-3, weight_decay=0.0, fp16=dtype == torch.float16)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows of 16 tokens; rows 1 and 2 padded (ignored labels) to different lengths, so
    that their two micro-batches hold different numbers of predicted tokens."""
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[1, 10:] = IGNORE_INDEX
    labels[2, 3:] = IGNORE_INDEX
    return tokens, labels


def test_the_step_is_that_of_the_token_mean_over_the_global_batch_however_it_is_split():
    """One micro-step of 4 rows, or two of 2: the loss is transformers' own mean over every
    predicted token of the batch, and the gradients the optimizer receives are the same;
    neither a mean of micro-batch means nor a count that takes first labels or padding in."""
    import train
    from utils.distributed import init_distributed, local_tensor, shutdown

    env = init_distributed()
    losses, gradients = [], []
    try:
        for micro_steps in (1, 2):
            model, optimizer = tiny_step_model(env)
            tokens, labels = padded_batch()
            with torch.no_grad():
                expected = model(input_ids=tokens, labels=labels).loss.item()
            optimizer.register_step_pre_hook(
                lambda *_, model=model: gradients.append(
                    [local_tensor(p.grad).clone() for p in model.parameters()]
                )
            )
            rows = len(tokens) // micro_steps
            pairs = zip(tokens.split(rows), labels.split(rows), strict=True)
            batches = [{"input_ids": t, "labels": y} for t, y in pairs]
            result = train.train_step(model, optimizer, None, batches, env, 0.0)
            losses.append((result.loss.item(), expected))
    finally:
        shutdown()
    for loss, expected in losses:
        assert loss == pytest.approx(expected, rel=1e-6)
    for one, two in zip(*gradients, strict=True):
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_optimizer_receives_gradients_clipped_to_grad_clip(dtype):
    """The global norm the optimizer sees is --grad_clip's when the gradient's is larger:
    clipped once, after fp16's loss scale is taken off (not before, on scaled gradients)."""
    import train
    from utils.distributed import init_distributed, local_tensor, shutdown
    from utils.parallelize import build_grad_scaler

    env = init_distributed()
    norms = []
    try:
        for clip in (0.0, 0.05):  # 0 turns clipping off: the raw norm
            model, optimizer = tiny_step_model(env, dtype)
            optimizer.register_step_pre_hook(
                lambda *_, model=model: norms.append(
                    torch.stack([local_tensor(p.grad).norm() for p in model.parameters()])
                    .norm()
                    .item()
                )
            )
            tokens, labels = padded_batch()
            batches = [{"input_ids": tokens, "labels": labels}]
            scaler = build_grad_scaler(dtype == torch.float16, env.device)
            train.train_step(model, optimizer, scaler, batches, env, clip)
    finally:
        shutdown()
    raw, clipped = norms  # both steps ran: the scaler skipped neither
    assert raw > 0.2 and clipped == pytest.approx(0.05, rel=1e-3)


def test_a_log_line_averages_the_steps_of_its_window(mds_tokens, tokenizer_dir, tmp_path):
    from tests.helpers import train_in_process

    for every in (1, 3):
        flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=6, num_workers=0)
        train_in_process(
            *flags, "--local_batch=4", f"--run_name=every{every}", f"--log_every={every}"
        )
    each = logged_losses(tmp_path / "every1")
    windows = logged_losses(tmp_path / "every3")
    assert sorted(windows) == [3, 6]
    for last in (3, 6):
        mean = sum(each[step] for step in range(last - 2, last + 1)) / 3
        assert windows[last] == pytest.approx(mean, rel=1e-6)


# ---------------------------------------------------------------- validation sets
SET_KEYS = ("loss", "ppl", "bits_per_byte", "tokens", "bytes")


def set_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_records(run_dir) if "eval/held/ppl" in r}


def test_validation_sets_agree_across_world_size_eval_batch_and_the_cli(runs, tmp_path):
    """The same run on 2 ranks (eval batch 8) and on 1 (eval batch 3) logs the same curve and
    the same numbers for both sets; the eval command on the saved step agrees with the record
    training wrote at that step."""
    from datas import eval_sets
    from tests.helpers import train_in_process

    two = runs["holdout"]
    config = json.loads((two / "config.json").read_text())["args"]
    flags = common_flags(
        Path(config["data_dir"]), Path(config["tokenizer_dir"]), tmp_path, "one"
    ) + ["--local_batch=8", "--eval_batch=3", *holdout_eval_flags(runs["c4"])]
    train_in_process(*flags)
    assert_same_curve(list_losses(two), list_losses(tmp_path / "one"), rel=1e-4)
    two_sets, one_sets = set_records(two), set_records(tmp_path / "one")
    assert list(two_sets) == list(one_sets) == [4, 8]
    for step in (4, 8):
        for name in ("c4", "held"):
            for key in SET_KEYS:
                want, got = (
                    two_sets[step][f"eval/{name}/{key}"],
                    one_sets[step][f"eval/{name}/{key}"],
                )
                assert got == pytest.approx(want, rel=1e-4), (step, name, key)
    record = two_sets[8]
    assert record["eval/held/tokens"] == 16 * (DATA_SEQ_LEN - 1)
    assert record["eval/c4/tokens"] == 20 * (DATA_SEQ_LEN - 1) == record["eval/tokens"]
    assert record["eval/c4_ppl"] == record["eval/c4/ppl"]  # the names of older runs
    cli = eval_sets.main([  # windows of the run's --seq_len, read from the checkpoint
        "--checkpoint", str(two / "step_000008"), "--data", f"c4={runs['c4']}",
        "held=train_holdout", "--max_windows", "20", "--cache_dir", str(tmp_path / "cache"),
    ])  # fmt: skip
    for name in ("c4", "held"):
        for key in SET_KEYS:
            assert cli[f"eval/{name}/{key}"] == pytest.approx(
                record[f"eval/{name}/{key}"], rel=1e-5
            )
    # python -m utils.compare reads both sets from what training wrote
    from utils import compare

    row = compare.summary(compare.read_run(two))
    for name in ("c4", "held"):
        assert row.sets[f"{name} ppl"] == record[f"eval/{name}/ppl"]
        assert row.sets[f"{name} bpb"] == record[f"eval/{name}/bits_per_byte"]
    assert (row.main["method"], row.main["steps"]) == ("dense", STEPS)


def test_tasks_in_training_on_two_ranks_equal_the_command_on_the_saved_step(runs):
    """--eval_tasks on the 2-rank sharded model at step 8 against `python -m datas.eval_tasks`
    on that step's checkpoint in one process (its length: the run's seq_len, from the record)."""
    from datas import eval_tasks

    two = runs["holdout"]
    in_training = {
        k: v for r in metrics_records(two) if r["step"] == 8 for k, v in r.items()
        if k.startswith("eval/task/")
    }  # fmt: skip
    assert set(in_training) == {"eval/task/mc/acc", "eval/task/mc/acc_norm"}
    cli = eval_tasks.main([
        "--checkpoint", str(two / "step_000008"), "--tasks", "mc", "--include_path",
        str(runs["tasks"]),
    ])  # fmt: skip
    assert cli["max_length"] == DATA_SEQ_LEN
    for key, value in in_training.items():
        assert cli[key] == pytest.approx(value, rel=1e-6), key
    assert not any(
        k.startswith("eval/task/") for r in metrics_records(two) if r["step"] == 4 for k in r
    )
