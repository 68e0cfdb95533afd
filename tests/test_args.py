"""The flags (utils/args.py): what a value becomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.args import build_parser, parse_args
from utils.errors import UserError


def flags(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data_dir=d", f"--tokenizer_dir={tmp_path}", "--config=tiny", f"--output_dir={tmp_path}",
            "--global_batch=8", "--seq_len=64", *extra]  # fmt: skip


def test_a_token_budget_becomes_whole_steps(tmp_path):
    """1,000,000 tokens at 8 x 64 = 512 tokens a step: 1,954 steps (the last one partial)."""
    assert parse_args(flags(tmp_path, "--train_tokens=1e6")).train_steps == 1954
    assert parse_args(flags(tmp_path)).train_steps == 100_000  # neither given: the default
    with pytest.raises(UserError, match="--train_steps and --train_tokens both set the budget"):
        parse_args(flags(tmp_path, "--train_tokens=1e6", "--train_steps=10"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--global_batch=0"], "--global_batch must be positive (got 0)"),
        (["--train_tokens=inf"], "--train_tokens must be positive (got inf)"),
        (["--train_tokens=nan"], "--train_tokens must be positive (got nan)"),
    ],
)
def test_a_token_budget_over_bad_numbers_is_one_error_not_a_crash(tmp_path, extra, message):
    with pytest.raises(UserError) as refused:
        parse_args(flags(tmp_path, "--train_tokens=1e6", *extra))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "argv, mode",
    [
        ([], "none"),
        (["--enable_ckpt"], "full"),
        (["--activation_checkpointing"], "full"),
        (["--activation_checkpointing=selective"], "selective"),
    ],
)
def test_activation_checkpointing_flag_keeps_the_seed_spellings(argv, mode):
    assert build_parser().parse_args(argv).activation_checkpointing == mode


def test_wandb_without_its_package_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name)
    )
    with pytest.raises(UserError, match=r"needs the wandb package: pip install '\.\[wandb\]'"):
        parse_args(flags(tmp_path, "--wandb_project=p"))


def test_an_args_file_passes_its_values_as_written(tmp_path):
    """YAML 1.1 reads 10:11 as the number 611 (base 60) and 010 as 8 (octal); a flag's value
    is what the user wrote, converted by the flag as on the command line."""
    run = tmp_path / "run.yaml"
    run.write_text("profile_steps: 10:11\nrun_name: 010\nlr: 0.01\nbf16: true\nseed:\n")
    args = parse_args(flags(tmp_path, f"--args_file={run}"))
    assert (args.profile_steps, args.run_name, args.lr, args.bf16, args.seed) == (
        (10, 11), "010", 0.01, True, 42)  # fmt: skip
