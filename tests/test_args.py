"""The flags (utils/args.py): what a value becomes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from utils.args import (
    MAX_SEED,
    PATH_FLAGS,
    build_parser,
    grad_accum_steps,
    parse_args,
    wandb_can_log,
)
from utils.errors import UserError
from utils.model import SEED_FACTOR

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


# ---- the args file, the flags' ranges and combinations: each one line, found at parse time


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "lr: 0.001\ntrue: 1\nnull: 2\n1: x\n",
            "key True is not a flag name (YAML reads it as bool); write the flag's name, e.g. "
            "'lr: 0.001'",
        ),
        (
            "null: 2\nlr: 0.001\n",
            "key None is not a flag name (YAML reads it as NoneType); write the flag's name, "
            "e.g. 'lr: 0.001'",
        ),
        ("lr: 0.001\nseed: 1\nlr: 0.002\n", "'lr' is set twice (lines 1 and 3); keep one"),
        ("bf16: true\nbf16: false\n", "'bf16' is set twice (lines 1 and 2); keep one"),
        ("{lr: 0.001, lr: 0.002}\n", "'lr' is set twice (both on line 1); keep one"),
    ],
)
def test_an_args_file_key_that_is_not_one_flag_name_is_one_line(tmp_path, text, message):
    """YAML reads `true:` and `null:` as a bool and None: sorting them beside the names was a
    TypeError; a key given twice kept the last value silently."""
    run = tmp_path / "run.yaml"
    run.write_text(text)
    with pytest.raises(UserError) as refused:
        parse_args(flags(tmp_path, f"--args_file={run}"))
    assert str(refused.value) == f"--args_file {run}: {message}"


def test_a_json_args_file_with_a_key_given_twice_is_refused(tmp_path):
    run = tmp_path / "run.json"
    run.write_text('{"lr": 0.001, "lr": 0.002}')
    with pytest.raises(UserError, match=r": 'lr' is set twice; keep one$"):
        parse_args(flags(tmp_path, f"--args_file={run}"))


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**64, 2**64 + 5])
def test_a_seed_out_of_range_is_refused_at_parse_time(tmp_path, seed):
    """-1 crashed in streaming (a negative shuffle seed), 2**64 in torch.manual_seed."""
    with pytest.raises(UserError) as refused:
        parse_args(flags(tmp_path, f"--seed={seed}"))
    assert str(refused.value) == f"--seed must be from 0 to {MAX_SEED} (got {seed})"


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_the_ends_of_the_seed_range_work_where_the_seed_is_used(tmp_path, seed):
    """The range is what the consumers take: torch.manual_seed, the per-parameter generator of
    utils/model.py (seed x 1_000_003 + crc32, the largest crc32 included) and streaming's
    shuffles (numpy generators, a non-negative seed)."""
    import numpy as np
    import torch
    from streaming.base.shuffle import get_shuffle

    assert parse_args(flags(tmp_path, f"--seed={seed}")).seed == seed
    torch.manual_seed(seed)
    torch.Generator().manual_seed(seed * SEED_FACTOR + 2**32 - 1)
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed((MAX_SEED + 1) * SEED_FACTOR + 2**32 - 1)
    get_shuffle("py1e", np.array([4, 4]), 2, seed, 0, 1 << 18)
    torch.manual_seed(42)


def test_an_abbreviated_flag_is_refused(tmp_path):
    """argparse took --train_step for --train_steps (and --lr_s for --lr_schedule)."""
    for short in ("--train_step=3", "--lr_s=wsd"):
        with pytest.raises(UserError, match=f"unrecognized arguments: {short}"):
            parse_args(flags(tmp_path, short))


@pytest.mark.parametrize("flag", PATH_FLAGS)
def test_an_empty_path_is_refused(tmp_path, flag):
    """--output_dir= wrote into the current directory; the others were ignored or failed later."""
    with pytest.raises(UserError) as refused:
        parse_args([*flags(tmp_path), f"--{flag}="])
    assert str(refused.value) == f"--{flag} is empty or blank; give a path, or leave the flag out"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tensorboard_dir={T}/tb"], "--tensorboard_dir: give --enable_tensorboard too "
         "(TensorBoard is off)"),
        (["--eval_data={T}"], "--eval_data: give --eval_every too (evaluation is off)"),
        (["--skip_optimizer"], "--skip_optimizer: give --resume_dir too (nothing is resumed)"),
        (["--eval_tasks=hellaswag"], "--eval_tasks and --eval_tasks_every go together; give "
         "both or neither"),
        (["--eval_tasks_every=5"], "--eval_tasks and --eval_tasks_every go together; give both "
         "or neither"),
        (["--eval_tasks_limit=5", "--eval_tasks_include={T}"], "--eval_tasks_include, "
         "--eval_tasks_limit: give --eval_tasks too (task evaluation is off)"),
        (["--train_steps=10", "--profile_steps=9:11"], "--profile_steps 9:11 ends after the last "
         "step, 10 (--train_steps or --train_tokens): steps past it are never traced; end it "
         "there or before"),
        (["--train_tokens=5120", "--profile_steps=2:11"], "--profile_steps 2:11 ends after the "
         "last step, 10 (--train_steps or --train_tokens): steps past it are never traced; end "
         "it there or before"),
    ],
)  # fmt: skip
def test_a_flag_that_would_be_ignored_is_refused(tmp_path, extra, message):
    """Each did nothing, without a word (the same as --wandb_group without --wandb_project)."""
    extra = [flag.replace("{T}", str(tmp_path)) for flag in extra]
    with pytest.raises(UserError) as refused:
        parse_args(flags(tmp_path, *extra))
    assert str(refused.value) == message


def test_the_combinations_that_do_something_still_parse(tmp_path):
    (tmp_path / "step_000002").mkdir()
    (tmp_path / "step_000002" / "trainer.pt").write_bytes(b"")
    args = parse_args(flags(
        tmp_path, "--enable_tensorboard", f"--tensorboard_dir={tmp_path}/tb", "--eval_every=5",
        f"--eval_data={tmp_path}", "--skip_optimizer", f"--resume_dir={tmp_path}/step_000002",
        "--train_tokens=5120", "--profile_steps=2:10",
    ))  # fmt: skip
    assert (args.train_steps, args.profile_steps) == (10, (2, 10))


def test_eval_sets_and_tasks_take_several_values_also_from_an_args_file(tmp_path):
    """--eval_data takes a list (one NAME=PATH each), --eval_tasks a comma-separated text."""
    line = ["--eval_every=5", "--eval_data", "c4=/c", "held=train_holdout", "--eval_tasks",
            "arc_easy, hellaswag", "--eval_tasks_every=10"]  # fmt: skip
    args = parse_args(flags(tmp_path, *line))
    assert args.eval_data == ["c4=/c", "held=train_holdout"]
    assert args.eval_tasks == "arc_easy,hellaswag"
    run = tmp_path / "run.yaml"
    run.write_text("eval_every: 5\neval_data: [c4=/c, held=train_holdout]\n")
    assert parse_args(flags(tmp_path, f"--args_file={run}")).eval_data == args.eval_data
    for bad in ("[]", "[[a]]", "[{a: 1}]", "[null]"):
        run.write_text(f"eval_every: 5\neval_data: {bad}\n")
        with pytest.raises(UserError, match="eval_data takes a list of plain values"):
            parse_args(flags(tmp_path, f"--args_file={run}"))


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """A machine where wandb finds no credentials: no key in the environment, an empty netrc,
    no settings files."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("machine example.com login u password p\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    return tmp_path / "netrc"


def test_wandb_without_a_login_is_refused_at_parse_time(tmp_path, monkeypatch, no_wandb_login):
    """It was a UsageError traceback after the model was built, leaving an empty
    metrics.jsonl."""
    with pytest.raises(UserError) as refused:
        parse_args(flags(tmp_path, "--wandb_project=p"))
    assert str(refused.value) == (
        "--wandb_project: this machine has no W&B login; run `wandb login` (or set "
        "WANDB_API_KEY), or set WANDB_MODE=offline to log locally"
    )
    for name, value in [("WANDB_MODE", "offline"), ("WANDB_MODE", "disabled"),
                        ("WANDB_MODE", "dryrun"), ("WANDB_API_KEY", "k" * 40)]:  # fmt: skip
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert parse_args(flags(tmp_path, "--wandb_project=p")).wandb_project == "p"
    no_wandb_login.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert parse_args(flags(tmp_path, "--wandb_project=p")).wandb_project == "p"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # another server
    with pytest.raises(UserError, match="no W&B login"):
        parse_args(flags(tmp_path, "--wandb_project=p"))
    settings = tmp_path / "wandb_config" / "settings"
    settings.parent.mkdir()
    settings.write_text("[default]\nmode = offline\n")  # what `wandb offline` writes
    assert parse_args(flags(tmp_path, "--wandb_project=p")).wandb_project == "p"


@pytest.mark.parametrize(
    "netrc_text",
    [
        "",
        "machine api.wandb.ai login user password kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\n",
        "machine api.wandb.ai login user\n",
        "machine other.host login user password kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\n",
        "default login user password kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\n",
        "machine api.wandb.ai login user password\n",
        "machine\n",
    ],
)
def test_the_login_check_agrees_with_wandb(netrc_text, no_wandb_login):
    """Ours reads the netrc without importing wandb; wandb's own reader decides the same."""
    from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

    no_wandb_login.write_text(netrc_text)
    assert wandb_can_log() == (read_netrc_auth(host="https://api.wandb.ai") is not None)
