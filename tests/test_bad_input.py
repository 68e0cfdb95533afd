"""Every mistake costs one line: each command (train.py, the data preparation tool, the C4 eval
CLI, the converter) on a bad input exits with status 2 and a single `error: ...` line that
names the flag or file, with no traceback and no hang, and leaves every file a user saved
before it byte-identical. Commands run in this process (a world of one), on real files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import convert
import train
from datas import eval_sets, prepare
from datas.local_corpus import write_c4_validation
from tests.helpers import metrics_records, tiny_run_flags, train_in_process
from utils import errors
from utils.args import parse_args
from utils.errors import UserError, exit_on_user_error
from utils.model import NAMED_SHAPES

TINY_SHAPE = {k: v for k, v in NAMED_SHAPES["tiny"].items() if k != "vocab_size"}

MARKER = Path("/tmp/llm_playground_code_ran")


class RunsCode:
    """Pickles to a call that leaves MARKER behind: what a crafted file would do."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


# ---------------------------------------------------------------- files a user has saved
@pytest.fixture(scope="module")
def saved(tmp_path_factory, mds_tokens, mds_text, tokenizer_dir, docstrings) -> dict[str, Path]:
    """A user's files: a finished run with `shard` checkpoints (steps 2 and 4) and one with a
    `full` checkpoint, C4 validation data, and copies of the training data."""
    root = tmp_path_factory.mktemp("saved")
    runs = root / "runs"
    for name, ckpt in (("shard_run", "shard"), ("full_run", "full")):
        flags = tiny_run_flags(mds_tokens, tokenizer_dir, runs, steps=4, num_workers=0)
        train_in_process(*flags, "--local_batch=4", f"--run_name={name}", "--save_every=2",
                         f"--ckpt_type={ckpt}")  # fmt: skip
    c4 = write_c4_validation(docstrings[-60:], root / "c4")
    return {
        "runs": runs,
        "shard": runs / "shard_run" / "step_000004",
        "shard_2": runs / "shard_run" / "step_000002",
        "full": runs / "full_run" / "step_000004",
        "c4": c4,
        "tokens": shutil.copytree(mds_tokens, root / "tokens"),
        "text": shutil.copytree(mds_text, root / "text"),
        "tokenizer": tokenizer_dir,
    }


def fingerprints(roots: list[Path]) -> dict[Path, str]:
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest()
        for root in roots
        for path in ([root] if root.is_file() else root.rglob("*"))
        if path.is_file()
    }


def fails_with_one_line(command: Callable[[], object], capsys, saved: dict[str, Path]) -> str:
    """Run `command`: status 2, one `error:` line on stderr, every saved file unchanged (new
    files may appear: streaming decompresses shards beside their originals). Returns the line."""
    before = fingerprints([p for p in saved.values() if p.exists()])
    MARKER.unlink(missing_ok=True)
    with pytest.raises(SystemExit) as stop:
        command()
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    after = fingerprints([p for p in saved.values() if p.exists()])
    assert {p: h for p, h in after.items() if p in before} == before, "a saved file changed"
    assert not MARKER.exists(), "a file's content ran as code"
    return err[0]


# ---------------------------------------------------------------- damaged inputs, made per case
def mds_without_index(root: Path, saved) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def mds_with_garbled_index(root: Path, saved) -> Path:
    data = shutil.copytree(saved["text"], root / "data")
    (data / "index.json").write_text('{"version": 2, "shards": [')
    return data


def mds_with_a_short_shard(root: Path, saved) -> Path:
    data = shutil.copytree(saved["text"], root / "data")
    shard = sorted(data.glob("shard.*.mds.zstd"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return data


def mds_with_a_missing_shard(root: Path, saved) -> Path:
    data = shutil.copytree(saved["text"], root / "data")
    sorted(data.glob("shard.*.mds.zstd"))[-1].unlink()
    return data


def mds_with_wrong_counts(root: Path, saved) -> Path:
    data = shutil.copytree(saved["tokens"], root / "data")
    for shard in data.glob("shard.*.mds.zstd"):  # the raw shards hold their sample counts
        shard.unlink()
    shutil.copytree(saved["tokens"], root / "raw")
    index = json.loads((data / "index.json").read_text())
    for shard in index["shards"]:
        (data / shard["raw_data"]["basename"]).write_bytes(b"")
        shard["zip_data"] = None
    (data / "index.json").write_text(json.dumps(index))
    return data


def mds_with_pkl_column(root: Path, saved) -> Path:
    from streaming import MDSWriter

    with MDSWriter(out=str(root / "data"), columns={"text": "str", "meta": "pkl"}) as writer:
        writer.write({"text": "a document", "meta": RunsCode()})
    return root / "data"


def checkpoint_copy(saved, kind: str, root: Path) -> Path:
    return shutil.copytree(saved[kind], root / "ckpt" / saved[kind].name)


def shard_without_a_data_file(root: Path, saved) -> Path:
    step = checkpoint_copy(saved, "shard", root)
    next(step.glob("*.distcp")).unlink()
    return step


def shard_with_a_cut_rank_file(root: Path, saved) -> Path:
    step = checkpoint_copy(saved, "shard", root)
    rank = step / "rank_00000.pt"
    rank.write_bytes(rank.read_bytes()[:50])
    return step


def full_with_cut_weights(root: Path, saved) -> Path:
    step = checkpoint_copy(saved, "full", root)
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return step


def garbage_trainer_state(root: Path, saved) -> Path:
    step = checkpoint_copy(saved, "shard", root)
    (step / "trainer.pt").write_bytes(b"not a checkpoint")
    return step


def trainer_state_zip_not_from_torch(root: Path, saved) -> Path:
    step = checkpoint_copy(saved, "shard", root)
    with zipfile.ZipFile(step / "trainer.pt", "w") as archive:
        archive.writestr("notes.txt", "a zip archive, but no checkpoint")
    return step


def trainer_state_of_something_else(root: Path, saved) -> Path:
    step = checkpoint_copy(saved, "shard", root)
    torch.save({"weights": torch.zeros(2)}, step / "trainer.pt")
    return step


def crafted_metadata(root: Path, saved) -> Path:
    step = checkpoint_copy(saved, "shard", root)
    (step / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    return step


def run_whose_newest_checkpoint_is_damaged(root: Path, saved) -> Path:
    run = shutil.copytree(saved["shard"].parent, root / "runs" / "damaged")
    (run / "step_000004" / "rank_00000.pt").write_bytes(b"")
    return run


def a_file(root: Path, saved) -> Path:
    (root / "file").write_text("not a directory")
    return root / "file"


def empty_dir(root: Path, saved) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def args_file(text: str) -> Callable[[Path, dict], Path]:
    def make(root: Path, saved) -> Path:
        (root / "run.yaml").write_text(text)
        return root / "run.yaml"

    return make


def eval_file(lines: list[str]) -> Callable[[Path, dict], Path]:
    def make(root: Path, saved) -> Path:
        path = root / "c4" / "c4-validation.json.gz"
        path.parent.mkdir()
        with gzip.open(path, "wt") as f:
            f.writelines(line + "\n" for line in lines)
        return path.parent

    return make


GOOD_EVAL_LINES = [json.dumps({"text": "a document long enough " * 40})] * 3


def no_input(root: Path, saved) -> Path:
    return root


def model_dir(config: dict) -> Callable[[Path, dict], Path]:
    def make(root: Path, saved) -> Path:
        (root / "model").mkdir()
        (root / "model" / "config.json").write_text(json.dumps(config))
        return root / "model"

    return make


def slt_config_file(settings: dict) -> Callable[[Path, dict], Path]:
    def make(root: Path, saved) -> Path:
        (root / "slt.json").write_text(json.dumps(settings))
        return root / "slt.json"

    return make


# ---------------------------------------------------------------- train.py
# (extra flags, a function making the damaged input X used as {X} in them, message)
TRAIN_CASES = {
    "config missing": (["--config=missing.json"], no_input, "--config missing.json not found"),
    "config dir without file": (["--config={X}"], empty_dir, "not found"),
    "config not json": (["--config={X}"], a_file, "is not a readable model config"),
    "tokenizer missing": (["--tokenizer_dir=nowhere"], no_input, "--tokenizer_dir nowhere"),
    "tokenizer dir empty": (["--tokenizer_dir={X}"], empty_dir, "holds no tokenizer (none of"),
    "tokenizer is a file": (["--tokenizer_dir={X}"], a_file, "is not a directory"),
    "data missing": (["--data_dir=/nowhere"], no_input, "--data_dir /nowhere does not exist"),
    "data without index": (["--data_dir={X}"], mds_without_index, "no index.json"),
    "index garbled": (["--data_dir={X}"], mds_with_garbled_index, "is not a readable MDS index"),
    "shard cut short": (["--data_dir={X}"], mds_with_a_short_shard, "cut short or damaged"),
    "shard missing": (["--data_dir={X}"], mds_with_a_missing_shard, "is missing"),
    "index counts wrong": (["--data_dir={X}"], mds_with_wrong_counts, "does not match"),
    "pkl column": (["--data_dir={X}"], mds_with_pkl_column, "as pkl, which runs code"),
    "batch does not divide": (["--global_batch=6"], no_input, "--global_batch 6 is not divisible"),
    "seq_len 1": (["--seq_len=1"], no_input, "--seq_len must be at least 2"),
    "blocks of another length": (
        ["--seq_len=32"],
        no_input,
        "blocks of 64 tokens, not --seq_len 32",
    ),  # fmt: skip
    "lr nan": (["--lr=nan"], no_input, "--lr must be positive (got nan)"),
    "lr negative": (["--lr=-1"], no_input, "--lr must be positive (got -1.0)"),
    "min_lr above lr": (["--min_lr=1"], no_input, "--min_lr 1.0 is above --lr"),
    "warmup negative": (["--warmup=-1"], no_input, "--warmup must be zero or more"),
    "save_every negative": (["--save_every=-1"], no_input, "--save_every must be zero or more"),
    "exit_interval negative": (["--exit_interval=-2"], no_input, "--exit_interval must be zero"),
    "eval_every negative": (["--eval_every=-1"], no_input, "--eval_every must be zero or more"),
    "keep_last negative": (["--keep_last=-1"], no_input, "--keep_last must be zero or more"),
    "grad_clip negative": (["--grad_clip=-1"], no_input, "--grad_clip must be zero or more"),
    "weight_decay nan": (["--weight_decay=nan"], no_input, "--weight_decay must be zero or more"),
    "num_workers negative": (["--num_workers=-1"], no_input, "--num_workers must be zero or more"),
    "exit_duration negative": (["--exit_duration_mins=-5"], no_input, "--exit_duration_mins"),
    "log_every zero": (["--log_every=0"], no_input, "--log_every must be positive"),
    "max_skipped zero": (["--max_skipped=0"], no_input, "--max_skipped must be positive"),
    "peak_tflops zero": (["--peak_tflops=0"], no_input, "--peak_tflops must be positive"),
    "canonical nodes zero": (["--num_canonical_nodes=0"], no_input, "--num_canonical_nodes"),
    "train_steps zero": (["--train_steps=0"], no_input, "--train_steps must be positive"),
    "eval_batch zero": (["--eval_batch=0"], no_input, "--eval_batch must be positive"),
    "eval_max_windows zero": (["--eval_max_windows=0"], no_input, "--eval_max_windows must be"),
    "data_name unknown": (["--data_name=Nope"], no_input, "--data_name Nope is unknown"),
    "output under a file": (["--output_dir={X}/out"], a_file, "--output_dir"),
    "cache under a file": (["--local_cache_dir={X}/cache"], a_file, "--local_cache_dir"),
    "tensorboard under a file": (
        ["--enable_tensorboard", "--tensorboard_dir={X}/tb"],
        a_file,
        "--tensorboard_dir",
    ),
    "run_name with a path": (["--run_name=../../x"], no_input, "must be a plain name"),
    "run_name dot dot": (["--run_name=.."], no_input, "must be a plain name"),
    "auto without run_name": (["--resume_dir=auto", "--run_name="], no_input, "needs --run_name"),
    "resume not a checkpoint": (["--resume_dir={X}"], empty_dir, "not a complete checkpoint"),
    "resume without a data file": (
        ["--resume_dir={X}"],
        shard_without_a_data_file,
        ".distcp is missing",
    ),  # fmt: skip
    "resume rank file cut": (
        ["--resume_dir={X}"],
        shard_with_a_cut_rank_file,
        "rank_00000.pt is cut short",
    ),  # fmt: skip
    "resume weights cut": (
        ["--resume_dir={X}"],
        full_with_cut_weights,
        "model.safetensors is cut short",
    ),  # fmt: skip
    "resume trainer garbage": (
        ["--resume_dir={X}"],
        garbage_trainer_state,
        "trainer.pt is damaged",
    ),  # fmt: skip
    "resume trainer a zip not from torch": (
        ["--resume_dir={X}"],
        trainer_state_zip_not_from_torch,
        "trainer.pt is damaged (",
    ),  # fmt: skip
    "resume trainer of something else": (
        ["--resume_dir={X}"],
        trainer_state_of_something_else,
        "trainer.pt is damaged (",
    ),  # fmt: skip
    "resume crafted metadata": (["--resume_dir={X}"], crafted_metadata, "it may run code"),
    "args_file not yaml": (["--args_file={X}"], args_file("a: [1,"), "is not valid YAML or JSON"),
    "args_file not a mapping": (["--args_file={X}"], args_file("- 1\n"), "must hold a mapping"),
    "args_file choice case": (
        ["--args_file={X}"],
        args_file("ckpt_type: Full\n"),
        "invalid choice: 'Full'",
    ),  # fmt: skip
    "args_file choice prefix": (
        ["--args_file={X}"],
        args_file("sharding_strategy: hybrid\n"),
        "invalid choice: 'hybrid'",
    ),
    "args_file bool as string": (
        ["--args_file={X}"],
        args_file('bf16: "false"\n'),
        "bf16 must be true or false",
    ),
    "args_file float steps": (
        ["--args_file={X}"],
        args_file("train_steps: 1.0e+5\n"),
        "invalid int value: '1.0e+5'",  # as written
    ),
    "args_file unknown key": (
        ["--args_file={X}"],
        args_file("learning_rate: 1\n"),
        "unknown flags",
    ),  # fmt: skip
    "args_file list value": (["--args_file={X}"], args_file("lr: [1, 2]\n"), "lr takes one value"),
    "args_file missing": (["--args_file=nowhere.yaml"], no_input, "--args_file nowhere.yaml"),
    "eval data missing": (
        ["--eval_every=2", "--eval_data=/nowhere"],
        no_input,
        "/nowhere does not exist",
    ),  # fmt: skip
    "eval data bad past line 1": (
        ["--eval_every=2", "--eval_data={X}"],
        eval_file([*GOOD_EVAL_LINES, "not json"]),
        "is not JSON lines",
    ),
    "eval data shorter than a window": (
        ["--eval_every=2", "--eval_data={X}"],
        eval_file([json.dumps({"text": "short"})]),
        "fewer than one window",
    ),
    "eval data with pkl": (["--eval_every=2", "--eval_data={X}"], mds_with_pkl_column, "runs code"),
    "flash on cpu": (["--enable_flash"], no_input, "--enable_flash needs a CUDA GPU"),
    "bf16 and fp16": (["--bf16", "--fp16"], no_input, "--bf16 and --fp16 exclude each other"),
    "global_batch not a multiple": (
        ["--global_batch=6"],
        no_input,
        "--global_batch 6 is not divisible by --local_batch 4",
    ),
    "masking beyond the blocks": (
        ["--seq_len=128", "--document_masking"],
        no_input,
        "blocks of 64 tokens, not --seq_len 128",
    ),
    "output not writable": (
        ["--output_dir=/proc/forbidden"],
        no_input,
        "--output_dir /proc/forbidden is not writable",
    ),
    "async save of full": (
        ["--ckpt_type=full", "--async_save"],
        no_input,
        "--async_save works with --ckpt_type shard",
    ),
    "float8 with slt": (
        ["--float8", "--enable_slt", "--slt_config=x.json"],
        no_input,
        "--float8 and --enable_slt exclude",
    ),
    "stop with fp16": (["--fp16", "--nonfinite=stop"], no_input, "does not go with --fp16"),
    "slt config not json": (["--enable_slt", "--slt_config={X}"], a_file, "is not valid JSON"),
    "slt without config": (["--enable_slt"], no_input, "go together"),
    "async full": (["--ckpt_type=full", "--async_save"], no_input, "--async_save works with"),
    "cudnn on cpu": (["--attention_kernel=cudnn"], no_input, "--attention_kernel cudnn"),
    "unknown flag": (["--learning_rate=1"], no_input, "unrecognized arguments: --learning_rate"),
    "strategy unknown": (
        ["--strategy=bogus"],
        no_input,
        "--strategy bogus is unknown; choose one of: pack",
    ),
    "local_batch not a number": (["--local_batch=abc"], no_input, "invalid int value: 'abc'"),
    "nonfinite unknown": (["--nonfinite=ignore"], no_input, "invalid choice: 'ignore'"),
    "beta1 of one": (["--beta1=1"], no_input, "--beta1 must be in [0, 1)"),
    "eps zero": (["--eps=0"], no_input, "--eps must be positive"),
    "decay fraction zero": (["--decay_fraction=0"], no_input, "--decay_fraction must be in"),
    "schedule unknown": (["--lr_schedule=step"], no_input, "invalid choice: 'step'"),
    "slt_lr without slt": (["--slt_lr=1e-3"], no_input, "--slt_lr and --slt_weight_decay need"),
    "steps and tokens": (["--train_tokens=1e6"], no_input, "both set the budget; give one"),
    "wandb group alone": (["--wandb_group=g"], no_input, "--wandb_group: give --wandb_project too"),
    "profile steps reversed": (["--profile_steps=3:2"], no_input, "'3:2' needs 1 <= A <= B"),
    "profile steps not a range": (["--profile_steps=3"], no_input, "'3' is not A:B"),
    "init_from missing": (["--init_from=/nowhere"], no_input, "--init_from /nowhere is not a"),
    "init_from without config": (["--init_from={X}"], empty_dir, "has no config.json"),
    "init_from another model": (
        ["--init_from={X}"],
        model_dir(TINY_SHAPE | {"model_type": "llama", "hidden_size": 4096}),
        "is another model than --config (hidden_size: 4096 vs --config",
    ),
    "init_from without weights": (
        ["--init_from={X}"],
        model_dir(TINY_SHAPE | {"model_type": "llama"}),
        "holds no model*.safetensors or pytorch_model*.bin weights",
    ),
    "init_from damaged checkpoint": (
        ["--init_from={X}"],
        shard_with_a_cut_rank_file,
        "rank_00000.pt is cut short",
    ),
    "init_from into sltrain": (
        ["--init_from={shard}", "--enable_slt", "--slt_config={X}"],
        slt_config_file({"method": "sltrain"}),
        "--init_from with slt method sltrain",
    ),
    "init_from checkpoint into supermask": (
        ["--init_from={shard}", "--enable_slt", "--slt_config={X}"],
        slt_config_file({"method": "supermask", "final_sparsity": 0.5}),
        "start from its export instead (python convert.py",
    ),
}


def train_argv(saved: dict[str, Path], out: Path, extra: list[str]) -> list[str]:
    flags = tiny_run_flags(saved["tokens"], saved["tokenizer"], out, steps=4, num_workers=0)
    return [*flags, "--local_batch=4", "--run_name=bad", *extra]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train(case, saved, tmp_path, capsys):
    extra, make, message = TRAIN_CASES[case]
    made = make(tmp_path, saved)
    extra = [
        flag.replace("{X}", str(made)).replace("{shard}", str(saved["shard"])) for flag in extra
    ]
    argv = train_argv(saved, tmp_path / "out", extra)
    line = fails_with_one_line(lambda: train.main(argv), capsys, saved)
    assert message in line


def test_train_on_a_run_name_that_holds_a_run(saved, capsys):
    argv = train_argv(saved, saved["runs"], ["--run_name=shard_run"])
    line = fails_with_one_line(lambda: train.main(argv), capsys, saved)
    assert "already holds a run; continue it with --resume_dir auto" in line


def test_train_auto_names_the_newest_intact_checkpoint(saved, tmp_path, capsys):
    run = run_whose_newest_checkpoint_is_damaged(tmp_path, saved)
    argv = train_argv(saved, run.parent, ["--run_name=damaged", "--resume_dir=auto"])
    line = fails_with_one_line(lambda: train.main(argv), capsys, saved)
    assert f"{run / 'step_000004' / 'rank_00000.pt'} is cut short" in line
    assert line.endswith(f"move it out of the run directory to resume from {run / 'step_000002'}")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_canonical_nodes=4"], "num_canonical_nodes=2, this loader has 4"),
        (["--strategy=trunc"], "written with strategy=pack, seq_len=64"),
    ],
)
def test_train_resuming_with_another_loader_setting(saved, tmp_path, capsys, extra, message):
    argv = train_argv(saved, tmp_path, [f"--resume_dir={saved['shard']}", *extra])
    assert message in fails_with_one_line(lambda: train.main(argv), capsys, saved)


def test_train_with_an_uncreatable_eval_cache(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_PLAYGROUND_CACHE", str(a_file(tmp_path, saved)))
    argv = train_argv(saved, tmp_path, ["--eval_every=2", f"--eval_data={saved['c4']}"])
    line = fails_with_one_line(lambda: train.main(argv), capsys, saved)
    assert "the C4 eval cache" in line and "cannot be written" in line


# ---------------------------------------------------------------- python -m datas.prepare
def binary_file(suffix: str) -> Callable[[Path, dict], Path]:
    def make(root: Path, saved) -> Path:
        (root / f"data{suffix}").write_bytes(bytes(range(256)) * 8)
        return root / f"data{suffix}"

    return make


def jsonl_without_text(root: Path, saved) -> Path:
    (root / "docs.jsonl").write_text('{"body": "x"}\n')
    return root / "docs.jsonl"


def some_jsonl(root: Path, saved) -> Path:
    (root / "docs.jsonl").write_text('{"text": "a document"}\n')
    return root / "docs.jsonl"


PREPARE_CASES = {
    "input missing": (
        ["--input", "/nowhere", "--output", "{T}/out"],
        no_input,
        "/nowhere does not exist",
    ),  # fmt: skip
    "binary jsonl": (
        ["--input", "{X}", "--output", "{T}/out"],
        binary_file(".jsonl"),
        "is not readable",
    ),  # fmt: skip
    "binary txt": (
        ["--input", "{X}", "--output", "{T}/out"],
        binary_file(".txt"),
        "is not readable as .txt",
    ),  # fmt: skip
    "no text field": (
        ["--input", "{X}", "--output", "{T}/out"],
        jsonl_without_text,
        "no string field 'text'",
    ),  # fmt: skip
    "seq_len zero": (
        ["--input", "{X}", "--output", "{T}/out", "--tokenizer", "{K}", "--seq_len", "0"],
        some_jsonl,
        "--seq_len must be at least 2",
    ),  # fmt: skip
    "tokenizer dir empty": (
        ["--input", "{X}", "--output", "{T}/out", "--tokenizer", "{T}", "--seq_len", "8"],
        some_jsonl,
        "holds no tokenizer (none of",
    ),  # fmt: skip
    "tokenizer without seq_len": (
        ["--input", "{X}", "--output", "{T}/out", "--tokenizer", "{K}"],
        some_jsonl,
        "go together",
    ),
    "output holds files": (
        ["--input", "{X}", "--output", "{D}"],
        some_jsonl,
        "already holds files",
    ),
    "output under a file": (
        ["--input", "{X}", "--output", "{X}/out"],
        some_jsonl,
        "lies under a file",
    ),  # fmt: skip
    "no input flag": (["--output", "{T}/out"], no_input, "the following arguments are required"),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare(case, saved, tmp_path, capsys):
    argv, make, message = PREPARE_CASES[case]
    (tmp_path / "t").mkdir()
    made = make(tmp_path, saved)
    places = {"{X}": made, "{T}": tmp_path / "t", "{K}": saved["tokenizer"], "{D}": saved["text"]}
    for key, value in places.items():
        argv = [arg.replace(key, str(value)) for arg in argv]
    assert message in fails_with_one_line(lambda: prepare.main(argv), capsys, saved)
    assert not (tmp_path / "t" / "out").exists()


# ---------------------------------------------------------------- python convert.py
CONVERT_CASES = {
    "step missing": (["/nowhere/step_000004", "{T}/out"], "no trainer.pt"),
    "step not a checkpoint": (["{K}", "{T}/out"], "no trainer.pt"),
    "out is the step": (["{S}", "{S}"], "is, contains or lies inside the checkpoint"),
    "out holds the step": (["{S}", "{R}"], "is, contains or lies inside the checkpoint"),
    "out inside the step": (["{S}", "{S}/export"], "is, contains or lies inside the checkpoint"),
    "out is another checkpoint": (["{S}", "{F}"], "already holds files; choose a new directory"),
    "step damaged": (["{C}", "{T}/out"], "rank_00000.pt is cut short"),
    "no out given": (["{S}"], "the following arguments are required: out_dir"),
}


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert(case, saved, tmp_path, capsys):
    argv, message = CONVERT_CASES[case]
    places = {
        "{T}": tmp_path, "{K}": saved["tokenizer"], "{S}": saved["shard"],
        "{R}": saved["shard"].parent, "{F}": saved["full"],
        "{C}": shard_with_a_cut_rank_file(tmp_path, saved),
    }  # fmt: skip
    for key, value in places.items():
        argv = [arg.replace(key, str(value)) for arg in argv]
    assert message in fails_with_one_line(lambda: convert.main(argv), capsys, saved)


# ---------------------------------------------------------------- python -m datas.C4.c4_eval
EVAL_CASES = {
    "checkpoint missing": (
        ["--checkpoint", "/nowhere", "--data", "{E}"],
        no_input,
        "has no config.json",
    ),  # fmt: skip
    "data missing": (["--checkpoint", "{S}", "--data", "/nowhere"], no_input, "does not exist"),
    "seq_len 1": (
        ["--checkpoint", "{S}", "--data", "{E}", "--seq_len", "1"],
        no_input,
        "seq_len=1",
    ),
    "batch zero": (
        ["--checkpoint", "{S}", "--data", "{E}", "--batch_size", "0"],
        no_input,
        "batch_size=0",
    ),
    "seq_len above positions": (
        ["--checkpoint", "{S}", "--data", "{E}", "--seq_len", "4096"],
        no_input,
        "exceeds the model's max_position_embeddings 1024",
    ),  # fmt: skip
    "checkpoint damaged": (
        ["--checkpoint", "{X}", "--data", "{E}"],
        shard_without_a_data_file,
        "is missing",
    ),  # fmt: skip
    "checkpoint crafted": (
        ["--checkpoint", "{X}", "--data", "{E}"],
        crafted_metadata,
        "it may run code",
    ),  # fmt: skip
    "data with pkl": (["--tokenizer", "{K}", "--data", "{X}"], mds_with_pkl_column, "runs code"),
    "neither checkpoint nor tokenizer": (["--data", "{E}"], no_input, "give --checkpoint"),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_c4_eval(case, saved, tmp_path, capsys):
    argv, make, message = EVAL_CASES[case]
    made = make(tmp_path, saved)
    places = {"{X}": made, "{E}": saved["c4"], "{S}": saved["shard"], "{K}": saved["tokenizer"]}
    for key, value in places.items():
        argv = [arg.replace(key, str(value)) for arg in argv]
    argv += ["--cache_dir", str(tmp_path / "cache")]
    assert message in fails_with_one_line(lambda: eval_sets.main(argv), capsys, saved)


# ---------------------------------------------------------------- under torchrun: who prints
def exits_with(error: UserError, capsys) -> str:
    """`error` raised inside `exit_on_user_error`: status 2; returns what stderr got."""
    with pytest.raises(SystemExit) as stop, exit_on_user_error():
        raise error
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def torchrun_rank(monkeypatch):
    """Set this process's place as torchrun would; SIGTERM's handler is restored after."""
    handler = signal.getsignal(signal.SIGTERM)

    def place(rank: int, local_rank: int) -> None:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))

    yield place
    signal.signal(signal.SIGTERM, handler)


def test_rank_0_prints_the_error_and_another_rank_names_itself(torchrun_rank, capsys):
    """2 ranks used to print two identical `error:` lines, then torchrun its summary: which
    rank said what was not told."""
    torchrun_rank(0, 0)
    assert (
        exits_with(UserError("could not save step 2"), capsys) == "error: could not save step 2\n"
    )
    torchrun_rank(1, 1)
    assert exits_with(UserError("could not save step 2"), capsys) == (
        "error (rank 1): could not save step 2\n"
    )


def test_a_flag_error_is_one_line_per_node(torchrun_rank, capsys, monkeypatch, tmp_path):
    """A bad flag is found alike on every rank (parse_args says so: `every_rank`): the node's
    first rank prints it, the others wait silently for torchrun to end them once it has
    exited (exiting first could make torchrun kill the first rank before it printed); a rank
    that outlives the wait prints its own line, so the error is never lost."""
    with pytest.raises(UserError) as refused:
        parse_args(["--data_dir=d", f"--tokenizer_dir={tmp_path}", "--config=tiny", "--lr=-1"])
    error = refused.value
    assert error.every_rank
    waits = []

    def wait(seconds: float) -> None:
        assert capsys.readouterr().err == ""  # nothing printed before the wait
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # torchrun's SIGTERM ends it
        waits.append(seconds)

    monkeypatch.setattr(errors.time, "sleep", wait)
    torchrun_rank(1, 1)
    assert exits_with(error, capsys) == "error (rank 1): --lr must be positive (got -1.0)\n"
    assert waits == [errors.EVERY_RANK_GRACE_S]
    torchrun_rank(8, 0)  # the first rank of the second node: its node's log gets the line
    assert exits_with(error, capsys) == "error (rank 8): --lr must be positive (got -1.0)\n"
    torchrun_rank(0, 0)
    assert exits_with(error, capsys) == "error: --lr must be positive (got -1.0)\n"
    assert waits == [errors.EVERY_RANK_GRACE_S]


# ---------------------------------------------------------------- what a run may do in a run dir
def copied_run(root: Path, saved, name: str = "copy") -> Path:
    """A copy of the shard run (checkpoints at steps 2 and 4 of 4, its metrics)."""
    return shutil.copytree(saved["shard"].parent, root / "runs" / name)


def finished_without_checkpoint(root: Path, saved) -> Path:
    run = root / "runs" / "copy"
    run.mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json"):  # the config records its 4 steps
        shutil.copy(saved["shard"].parent / name, run)
    return run


def a_checkpoint_of_a_run(root: Path, saved) -> Path:
    """The run directory named is a published checkpoint (--run_name step_000004)."""
    return copied_run(root, saved) / "step_000004"


def with_linked_step(root: Path, saved) -> Path:
    run = copied_run(root, saved)
    (run / "step_000006").symlink_to(saved["full"])  # another run's step 4
    return run


def with_later_file(root: Path, saved) -> Path:
    run = copied_run(root, saved)
    (run / "step_000006").write_text("a user's notes")
    return run


def with_later_directory(root: Path, saved) -> Path:
    run = copied_run(root, saved)
    (run / "step_000005").mkdir()
    (run / "step_000005" / "notes.txt").write_text("a user's notes")
    return run


def only_checkpoint_damaged(root: Path, saved) -> Path:
    run = copied_run(root, saved)
    shutil.rmtree(run / "step_000002")
    (run / "step_000004" / "trainer.pt").unlink()
    metrics = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(metrics[:2]))  # not finished
    return run


# How the run directory was left, the resume flag, and what the refusal says.
RUN_DIR_CASES = {
    "another run's checkpoint into a run": (copied_run, "{full}", "its newest checkpoint is"),
    "an earlier step of the run itself": (copied_run, "{own_2}", "branch from this checkpoint"),
    "an earlier step, as a relative path": (copied_run, "{own_2_rel}", "under a new --run_name"),
    "auto on a finished run without a checkpoint": (
        finished_without_checkpoint, "auto", "holds a finished run (step 4 logged)",
    ),
    "auto with a file named like a later step": (with_later_file, "auto", "step_000006, after"),
    "auto with a later step directory of a user": (
        with_later_directory, "auto", "holds step_000005, after step_000004",
    ),
    "no resume into a run": (copied_run, None, "already holds a run"),
    "auto on a finished run without a checkpoint, asked for more steps": (
        finished_without_checkpoint, "auto --train_steps=6", "holds a finished run",
    ),
    "a checkpoint as a new run's directory": (
        a_checkpoint_of_a_run, None, "holds files that are not a run's",
    ),
    "auto with a step linked to another run": (
        with_linked_step, "auto", "a link and not a checkpoint this run wrote",
    ),
    "auto whose only checkpoint lost its trainer.pt": (
        only_checkpoint_damaged, "auto", "holds step_000004, after step_000000",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", RUN_DIR_CASES)
def test_train_never_writes_over_what_a_run_directory_holds(
    case, saved, tmp_path, capsys, monkeypatch
):
    """Refused in one line before the model is built; the run directory, its checkpoints and
    its metrics are left exactly as they were (fails_with_one_line compares every file)."""
    make, resume, message = RUN_DIR_CASES[case]
    run = make(tmp_path, saved)
    monkeypatch.chdir(tmp_path)
    resume_flag = []
    if resume:
        resume, *extra = resume.split()
        resume = resume.format(
            full=saved["full"], own_2=run / "step_000002",
            own_2_rel=Path("runs") / run.name / "step_000002",
        )  # fmt: skip
        resume_flag = [f"--resume_dir={resume}", *extra]
    argv = train_argv(saved, run.parent, [f"--run_name={run.name}", *resume_flag])
    entries = sorted(run.iterdir())
    line = fails_with_one_line(lambda: train.main(argv), capsys, saved | {"run": run})
    assert message in line
    if "not a run's" in message:  # not even a lock file is made in someone else's directory
        assert sorted(run.iterdir()) == entries


def test_train_refuses_a_run_directory_another_run_is_writing_to(saved, tmp_path, capsys):
    import fcntl

    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    with (run / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("process 1 on elsewhere")
        held.flush()
        argv = train_argv(saved, run.parent, ["--run_name=busy"])
        line = fails_with_one_line(lambda: train.main(argv), capsys, saved)
    assert line == (
        f"error: --run_name busy: {run} is in use by another run (process 1 on elsewhere); "
        "wait for it to end, or pick a new --run_name"
    )
    assert not (run / "metrics.jsonl").exists()
    train_in_process(*argv)  # the lock went with its holder
    assert (run / "metrics.jsonl").exists()


def test_a_branch_and_a_restart_before_the_first_checkpoint_leave_every_saved_file(saved, tmp_path):
    """Branching from another run's checkpoint under a new name trains, and changes nothing of
    the parent; a run killed before its first checkpoint starts again at step 0 with its old
    records moved aside, not deleted."""
    before = fingerprints([saved["runs"]])
    out = tmp_path / "runs"
    train_in_process(
        *train_argv(saved, out, ["--run_name=branch", f"--resume_dir={saved['shard_2']}"])
    )
    assert [r["step"] for r in metrics_records(out / "branch") if "loss" in r] == [3, 4]
    # Started from pretrained weights with an evaluation of step 0, killed before step 2.
    restarted = out / "restarted"
    restarted.mkdir()
    old_lines = [
        '{"step": 0, "eval/c4_ppl": 1000.0}',
        *(saved["shard"].parent / "metrics.jsonl").read_text().splitlines()[:1],
    ]
    (restarted / "metrics.jsonl").write_text("\n".join(old_lines) + "\n")
    evaluated = ["--eval_every=2", f"--eval_data={saved['c4']}", "--eval_max_windows=2"]
    train_in_process(*train_argv(saved, out, ["--run_name=restarted", "--resume_dir=auto",
                                              f"--init_from={saved['full']}", *evaluated]))  # fmt: skip
    steps = [(r["step"], "eval/c4_ppl" in r) for r in metrics_records(restarted)]
    assert steps == [
        (0, True),
        (1, False),
        (2, False),
        (2, True),
        (3, False),
        (4, False),
        (4, True),
    ]
    assert (restarted / "metrics.dropped.jsonl").read_text().splitlines() == old_lines
    assert fingerprints([saved["runs"]]) == before
