"""Every flag of train.py, generated: a wrong type and an out-of-range value are each one
UserError line naming the flag, at parse time; a valid value written in an args file parses as
on the command line."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.args import MAX_SEED, build_parser, parse_args
from utils.errors import UserError

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
NAME = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,11}", fullmatch=True).filter(
    lambda name: name not in (".", "..")
)
NOT_INT = TEXT.filter(lambda text: not _parses(int, text))
NOT_FLOAT = TEXT.filter(lambda text: not _parses(float, text))
BLANK = st.sampled_from(["", " ", "\t"]) | TEXT.map(lambda text: text + "\x00")


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def ints(low: int | None = None, high: int | None = None) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def floats(low: float, high: float, **bounds: bool) -> st.SearchStrategy[str]:
    return st.floats(low, high, allow_nan=False, **bounds).map(repr)


NOT_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN"])


@dataclass
class Spec:
    """How to write a flag: valid values, wrong-type ones, out-of-range ones (None: a switch,
    or nothing of that kind), and the flags it needs beside it ({T}: a scratch directory)."""

    valid: st.SearchStrategy[str] | None
    wrong: st.SearchStrategy[str] | None
    out: st.SearchStrategy[str] | None
    needs: tuple[str, ...] = ()


def positive_int(high: int = 10**6) -> Spec:
    return Spec(ints(1, high), NOT_INT, ints(None, 0))


def non_negative_int(high: int = 10**6) -> Spec:
    return Spec(ints(0, high), NOT_INT, ints(None, -1))


def positive_float(low: float = 1e-9, high: float = 1e6) -> Spec:
    return Spec(floats(low, high), NOT_FLOAT, floats(-1e9, 0) | NOT_FINITE)


def non_negative_float() -> Spec:
    return Spec(floats(0, 1e6), NOT_FLOAT, floats(-1e9, 0, exclude_max=True) | NOT_FINITE)


def choice(*choices: str, needs: tuple[str, ...] = ()) -> Spec:
    return Spec(st.sampled_from(choices), ints(), TEXT.filter(lambda t: t not in choices), needs)


def switch(needs: tuple[str, ...] = ()) -> Spec:
    return Spec(None, TEXT, None, needs)


def path(valid: st.SearchStrategy[str], wrong=None, needs: tuple[str, ...] = ()) -> Spec:
    return Spec(valid.filter(str.strip), wrong, BLANK, needs)


IN_T = NAME.map(lambda name: "{T}/made/" + name)  # a directory the parse may create
SLT = ("--enable_slt", "--slt_config={T}/slt.json")
TASKS = ("--eval_tasks=t", "--eval_tasks_every=1")
SPECS = {
    "--args_file": path(st.just("{T}/empty.yaml"), NAME.map(lambda n: "{T}/missing/" + n)),
    "--data_dir": path(TEXT),
    "--data_name": path(TEXT),
    "--local_cache_dir": path(IN_T, NAME.map(lambda n: "{T}/a_file/" + n)),
    "--tokenizer_dir": path(st.just("{T}"), NAME.map(lambda n: "{T}/missing/" + n)),
    "--strategy": path(st.sampled_from(["pack", "overflow", "trunc"])),
    "--seq_len": Spec(ints(2, 10**5), NOT_INT, ints(None, 1)),
    "--num_workers": non_negative_int(64),
    "--num_canonical_nodes": positive_int(),
    "--document_masking": switch(),
    "--config": path(TEXT),
    "--init_from": path(TEXT),
    "--enable_flash": switch(),
    "--sharding_strategy": choice("full_shard", "shard_grad_op", "hybrid_shard", "no_shard"),
    "--activation_checkpointing": choice("none", "full", "selective"),
    "--enable_ckpt": switch(),
    "--attention_kernel": choice("auto", "flash", "cudnn", "efficient"),
    "--float8": switch(),
    "--compile": switch(),
    "--no_compile": switch(),
    "--chunked_loss": switch(),
    "--no_chunked_loss": switch(),
    "--bf16": switch(),
    "--fp16": switch(),
    "--enable_slt": switch(needs=SLT[1:]),
    "--slt_config": path(TEXT, needs=SLT[:1]),
    "--global_batch": positive_int(),
    "--local_batch": positive_int(),
    "--train_steps": positive_int(),
    "--train_tokens": positive_float(1, 1e15),
    "--lr": positive_float(3e-5, 10),  # not below the default --min_lr
    "--min_lr": Spec(floats(0, 3e-4), NOT_FLOAT, floats(-1e9, 0, exclude_max=True) | NOT_FINITE
                     | floats(3e-4, 1e9, exclude_min=True)),  # fmt: skip
    "--warmup": non_negative_int(),
    "--lr_schedule": choice("cosine", "linear", "wsd", "constant"),
    "--decay_fraction": Spec(floats(0, 1, exclude_min=True), NOT_FLOAT,
                             floats(-1e9, 0) | floats(1, 1e9, exclude_min=True) | NOT_FINITE),
    "--decay_type": choice("linear", "cosine", "sqrt"),
    "--weight_decay": non_negative_float(),
    "--beta1": Spec(floats(0, 1, exclude_max=True), NOT_FLOAT,
                    floats(-1e9, 0, exclude_max=True) | floats(1, 1e9) | NOT_FINITE),
    "--beta2": Spec(floats(0, 1, exclude_max=True), NOT_FLOAT,
                    floats(-1e9, 0, exclude_max=True) | floats(1, 1e9) | NOT_FINITE),
    "--eps": positive_float(),
    "--slt_lr": Spec(floats(1e-9, 1e3), NOT_FLOAT, floats(-1e9, 0) | NOT_FINITE, SLT),
    "--slt_weight_decay": Spec(floats(0, 1e3), NOT_FLOAT,
                               floats(-1e9, 0, exclude_max=True) | NOT_FINITE, SLT),
    "--grad_clip": non_negative_float(),
    "--seed": Spec(ints(0, MAX_SEED), NOT_INT, ints(None, -1) | ints(MAX_SEED + 1)),
    "--nonfinite": choice("skip", "stop"),
    "--max_skipped": positive_int(),
    "--output_dir": path(IN_T, NAME.map(lambda n: "{T}/a_file/" + n)),
    "--run_name": Spec(NAME, None, st.sampled_from([".", "..", "", "a/b", "a\\b", "../x"])),
    "--save_every": non_negative_int(),
    "--ckpt_type": choice("shard", "full", "local"),
    "--resume_dir": path(st.just("{T}/step_000002"), st.just("{T}/made")),
    "--skip_optimizer": switch(needs=("--resume_dir={T}/step_000002",)),
    "--keep_last": non_negative_int(),
    "--async_save": switch(),
    "--exit_interval": non_negative_int(),
    "--exit_duration_mins": non_negative_float(),
    "--log_every": positive_int(),
    "--enable_tensorboard": switch(),
    "--peak_tflops": positive_float(),
    "--profile_steps": Spec(
        st.tuples(st.integers(1, 50), st.integers(0, 50)).map(lambda ab: f"{ab[0]}:{sum(ab)}"),
        TEXT.filter(lambda t: t.count(":") != 1),
        st.tuples(st.integers(1, 50), st.integers(1, 50)).map(lambda ab: f"{ab[0]}:{sum(ab) + 100}"),
        ("--train_steps=100",),
    ),  # fmt: skip
    "--memory_snapshot": switch(),
    "--eval_every": Spec(ints(1, 10**6), NOT_INT, ints(None, -1), ("--eval_data={T}",)),
    "--eval_data": path(TEXT, needs=("--eval_every=1",)),
    "--eval_max_windows": positive_int(),
    "--eval_batch": positive_int(),
    "--holdout_samples": positive_int(),  # without a train_holdout set: datas/eval_sets.py
    "--eval_tasks": Spec(NAME, None, BLANK | st.sampled_from(["a,,b", ",a", "a, ,b"]),
                         ("--eval_tasks_every=1",)),
    "--eval_tasks_every": Spec(ints(1, 10**6), NOT_INT, ints(None, -1), ("--eval_tasks=t",)),
    "--eval_tasks_include": path(TEXT, needs=TASKS),
    "--eval_tasks_limit": Spec(ints(1, 10**6), NOT_INT, ints(None, 0), TASKS),
    "--tensorboard_dir": path(IN_T, NAME.map(lambda n: "{T}/a_file/" + n),
                              needs=("--enable_tensorboard",)),
    "--wandb_project": path(TEXT),
    "--wandb_entity": path(TEXT, needs=("--wandb_project=p",)),
    "--wandb_run_name": path(TEXT, needs=("--wandb_project=p",)),
    "--wandb_group": path(TEXT, needs=("--wandb_project=p",)),
}  # fmt: skip
FLAGS = sorted(SPECS)
EXAMPLES = 20  # per flag and kind of value


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Iterator[Path]:
    """A tokenizer directory, a checkpoint, a file in the way, an empty args file; W&B offline."""
    root = tmp_path_factory.mktemp("flags")
    (root / "step_000002").mkdir()
    (root / "step_000002" / "trainer.pt").write_bytes(b"")
    (root / "a_file").write_text("not a directory")
    (root / "empty.yaml").write_text("{}\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("RANK", "1")  # no schedule warnings
        yield root


def base(root: Path) -> list[str]:
    return ["--data_dir=d", f"--tokenizer_dir={root}", "--config=tiny", f"--output_dir={root}",
            "--global_batch=8", "--seq_len=64"]  # fmt: skip


def command_line(root: Path, flag: str, value: str | None) -> list[str]:
    needs = [need.replace("{T}", str(root)) for need in SPECS[flag].needs]
    given = flag if value is None else f"{flag}={value.replace('{T}', str(root))}"
    kept = [b for b in base(root) if not b.startswith(f"{flag}=")]  # given once, last
    return [*kept, *needs, given]


def test_every_flag_of_the_parser_has_a_spec():
    options = {o for a in build_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    assert options == set(SPECS)


def assert_one_line_naming(flag: str, argv: list[str]) -> None:
    with pytest.raises(UserError) as refused:
        parse_args(argv)
    message = str(refused.value)
    assert "\n" not in message and "usage:" not in message, message
    assert flag in message, message


@pytest.mark.parametrize("flag", [f for f in FLAGS if SPECS[f].wrong is not None])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_wrong_type_is_one_line_naming_the_flag(scratch, flag, data):
    value = data.draw(SPECS[flag].wrong)
    assert_one_line_naming(flag, command_line(scratch, flag, value))


@pytest.mark.parametrize("flag", [f for f in FLAGS if SPECS[f].out is not None])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_out_of_range_value_is_one_line_naming_the_flag(scratch, flag, data):
    value = data.draw(SPECS[flag].out)
    assert_one_line_naming(flag, command_line(scratch, flag, value))


def yaml_entry(flag: str, value: str | None) -> str:
    """The flag as an args file's line: its name as the key, the value as written."""
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    if value is None:
        const = action.const
        return f"{action.dest}: {'true' if const is True else 'false' if const is False else const}"
    return yaml.safe_dump({action.dest: value}, default_style='"', width=10**6).strip()


@pytest.mark.parametrize("flag", [f for f in FLAGS if f != "--args_file"])
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_valid_value_in_an_args_file_parses_as_on_the_command_line(scratch, flag, data):
    spec = SPECS[flag]
    value = None if spec.valid is None else data.draw(spec.valid)
    argv = command_line(scratch, flag, value)
    expected = vars(parse_args(argv))
    run = scratch / "run.yaml"
    written = None if value is None else value.replace("{T}", str(scratch))
    run.write_text(yaml_entry(flag, written) + "\n")
    assert yaml.safe_load(run.read_text()) is not None
    from_file = vars(parse_args([*argv[:-1], f"--args_file={run}"]))
    from_file.pop("args_file")
    expected.pop("args_file")
    assert _same(from_file, expected), (flag, value)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )
