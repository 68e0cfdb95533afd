"""The flags (utils/args.py): what a value becomes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from utils.args import build_parser, grad_accum_steps, parse_args
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize(
    ("extra", "warning"),
    [
        (["--train_steps=4"], "warning: --warmup 2000 >= --train_steps 4: the learning rate "
         "never reaches --lr 0.0003 before the last step and never decays to --min_lr (it ends "
         "at 6e-07); lower --warmup for a run this short"),
        (["--train_steps=4", "--warmup=4", "--lr_schedule=constant"], "warning: --warmup 4 >= "
         "--train_steps 4: the learning rate never reaches --lr 0.0003 before the last step (it "
         "ends at 0.0003); lower --warmup for a run this short"),
        (["--train_steps=10", "--warmup=8", "--lr_schedule=wsd", "--decay_fraction=0.5"],
         "warning: --lr_schedule wsd: a decay of 5 steps (--decay_fraction 0.5 of 10) would "
         "start inside --warmup 8; it decays over the 2 steps after the warmup instead"),
        (["--train_steps=10", "--warmup=9"], None),
        (["--train_steps=10", "--warmup=5", "--lr_schedule=wsd", "--decay_fraction=0.5"], None),
    ],
)  # fmt: skip
def test_a_schedule_the_flags_cannot_give_is_one_warning_at_start_up(
    tmp_path, capsys, monkeypatch, extra, warning
):
    """Not refused: short test runs keep the default --warmup 2000. Printed once: by rank 0
    (or a world of one), not by every rank."""
    monkeypatch.delenv("RANK", raising=False)
    parse_args(flags(tmp_path, *extra))
    assert capsys.readouterr().err.splitlines() == ([warning] if warning else [])
    monkeypatch.setenv("RANK", "1")
    parse_args(flags(tmp_path, *extra))
    assert capsys.readouterr().err == ""


def readme_7b_example() -> tuple[list[str], str]:
    """The README's "7B on 32 GPUs" command's flags, and the sentence under it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### 7B on 32 GPUs", 1)[1].split("\n#", 1)[0]
    command, after = re.fullmatch(r"\s*```bash\n(.*?)```\s*(.*)", section, re.DOTALL).groups()
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["sbatch", "scripts/slurm_train.sbatch"], words
    return words[2:], after.split("\n\n", 1)[0]


def test_the_readme_7b_example_takes_the_steps_it_says(tmp_path):
    """The README's own flags, parsed (its paths swapped for writable ones; the later flag
    wins): the number of steps and the micro-steps it states are what train.py computes
    (1.3e11 / (512 x 2048) = 123,977.7, so 123,978 steps; the README said 123,979)."""
    readme_flags, sentence = readme_7b_example()
    local = [f"--tokenizer_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}",
             f"--local_cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    args = parse_args([*readme_flags, *local])
    nodes, gpus, micro, steps = re.search(
        r"(\d+) nodes x (\d+) GPUs, (\d+) micro-steps of .*?, ([\d,]+) steps\.", sentence,
        re.DOTALL,
    ).groups()  # fmt: skip
    assert args.train_steps == int(steps.replace(",", ""))
    world_size = int(nodes) * int(gpus)
    assert grad_accum_steps(args.global_batch, args.local_batch, world_size) == int(micro)
