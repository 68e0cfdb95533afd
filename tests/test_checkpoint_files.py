"""Bad input is one line (README, "What is guaranteed"): a checkpoint's files are checked by
one validator, `checkpoint_problem`, before anything is built, and `--init_from`'s weights by
the same checks of the transformers layout.

One real checkpoint of each format (`shard`, `full`, `local`) is written by a 2-step run in
this process, and laid out as a 2-rank checkpoint too (trainer.pt saying world size 2, rank 1's
file beside rank 0's: what the validator reads of a 2-rank checkpoint). Then every file that
holds state is cut at a spread of lengths, replaced by garbage, by a directory, or deleted, and
every field of trainer.pt, the rank files and a `full` optimizer.pt is deleted or given each
wrong type and out-of-range value. Each case: `checkpoint_problem` names the file (and the
field), and `read_trainer_state`, `resolve_resume_dir` with the path and with `auto` each give
one UserError line, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tests.helpers import tiny_run_flags, train_in_process
from utils.checkpoint import checkpoint_problem, read_trainer_state, resolve_resume_dir
from utils.checkpoint.layout import _dcp_files_problem
from utils.errors import UserError
from utils.pretrained import check_initial_weights

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FORMATS = ("shard", "full", "local")
STEP = "step_000002"
# The files that hold a checkpoint's state, by format (config.json and the tokenizer files are
# a model directory's, checked where they are read).
STATE_FILES = {
    "shard": ("trainer.pt", "rank_00000.pt", "rank_00001.pt", ".metadata", "__0_0.distcp"),
    "full": ("trainer.pt", "rank_00000.pt", "rank_00001.pt", "model.safetensors", "optimizer.pt"),
    "local": ("trainer.pt", "rank_00000.pt", "rank_00001.pt"),
}


def replace_file(path: Path, content: bytes) -> None:
    """Write under a new inode: a file an earlier check memory-mapped is never changed."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(content)
    os.replace(staged, path)


def torch_rewrite(path: Path, state: object) -> None:
    staged = path.with_name(path.name + ".new")
    torch.save(state, staged)
    os.replace(staged, path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, mds_tokens, tokenizer_dir) -> dict[str, Path]:
    """The step_000002 of a 2-step run of each format, as written (world size 1), and each
    laid out for 2 ranks ("<format>2")."""
    out = tmp_path_factory.mktemp("formats")
    found = {}
    for ckpt in FORMATS:
        flags = tiny_run_flags(mds_tokens, tokenizer_dir, out, steps=2, num_workers=0)
        train_in_process(*flags, "--local_batch=8", "--warmup=1", f"--run_name={ckpt}",
                         "--save_every=2", f"--ckpt_type={ckpt}")  # fmt: skip
        found[ckpt] = out / ckpt / STEP
        two = shutil.copytree(found[ckpt], out / f"{ckpt}2" / STEP)
        trainer = torch.load(two / "trainer.pt", weights_only=True)
        torch_rewrite(two / "trainer.pt", trainer | {"world_size": 2})
        shutil.copyfile(two / "rank_00000.pt", two / "rank_00001.pt")
        found[f"{ckpt}2"] = two
    return found


@pytest.fixture(scope="module")
def workdirs(pristine, tmp_path_factory) -> dict[str, Path]:
    """Per format, a run directory to damage: an intact step_000001 and the 2-rank step_000002
    (restored after each case)."""
    root = tmp_path_factory.mktemp("damaged")
    work = {}
    for ckpt in FORMATS:
        run = root / ckpt
        shutil.copytree(pristine[ckpt], run / "step_000001")
        work[ckpt] = shutil.copytree(pristine[f"{ckpt}2"], run / STEP)
    return work


def restore(path: Path, original: Path) -> None:
    """`path` as `original` again, by a hard link: damage always writes a new file, so the
    original's bytes are never changed."""
    if path.is_file() and path.samefile(original):  # not damaged
        return
    if path.is_dir():
        shutil.rmtree(path)
    staged = path.with_name(path.name + ".restored")
    os.link(original, staged)
    os.replace(staged, path)


@pytest.fixture
def step(request, workdirs, pristine) -> Iterator[Path]:
    """The 2-rank checkpoint of the format `request.param`, restored after the case."""
    ckpt = request.param
    yield workdirs[ckpt]
    for name in STATE_FILES[ckpt]:
        restore(workdirs[ckpt] / name, pristine[f"{ckpt}2"] / name)


def one_line(read: Callable[[], object]) -> str:
    """`read` raises a UserError of one line (and nothing else)."""
    with pytest.raises(UserError) as refusal:
        read()
    line = str(refusal.value)
    assert line and "\n" not in line and len(line) < 1000, line
    return line


def refused_everywhere(step: Path, *names: str) -> str:
    """The validator finds the damage and names `names`; every way in refuses in one line."""
    problem = checkpoint_problem(step)
    assert isinstance(problem, str) and "\n" not in problem, problem
    for name in names:
        assert name in problem, f"{name!r} not in: {problem}"
    assert one_line(lambda: read_trainer_state(step)).endswith(problem)
    assert problem in one_line(lambda: resolve_resume_dir(str(step), step.parent, 2))
    line = one_line(lambda: resolve_resume_dir("auto", step.parent, 2))
    if (step / "trainer.pt").is_file():  # else auto finds step_000001, and step_000002 after it
        assert problem in line and "step_000001" in line, line
    return problem


# ---------------------------------------------------------------- damaged files
@dataclass(frozen=True)
class FileDamage:
    name: str
    apply: Callable[[Path], None]


def cut_to(length: Callable[[int], int]) -> Callable[[Path], None]:
    def cut(path: Path) -> None:
        content = path.read_bytes()
        replace_file(path, content[: length(len(content))])

    return cut


def garbage(same_length: bool) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        size = path.stat().st_size if same_length else 100
        replace_file(path, (b"\x00not a checkpoint\xff" * (size // 18 + 1))[:size])

    return write


def a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


FILE_DAMAGES = [
    FileDamage("empty", cut_to(lambda n: 0)),
    FileDamage("1 byte", cut_to(lambda n: 1)),
    FileDamage("header", cut_to(lambda n: 8)),
    FileDamage("64 bytes", cut_to(lambda n: 64)),
    FileDamage("half", cut_to(lambda n: n // 2)),
    FileDamage("3 bytes short", cut_to(lambda n: n - 3)),
    FileDamage("1 byte short", cut_to(lambda n: n - 1)),
    FileDamage("short garbage", garbage(same_length=False)),
    FileDamage("garbage", garbage(same_length=True)),
    FileDamage("a directory", a_directory),
    FileDamage("deleted", lambda path: path.unlink()),
]
# DCP's data files carry no checksum: bytes changed in place (same length) are not found.
FILE_CASES = [
    pytest.param(ckpt, name, damage, id=f"{ckpt}-{name}-{damage.name}")
    for ckpt in FORMATS
    for name in STATE_FILES[ckpt]
    for damage in FILE_DAMAGES
    if not (name.endswith(".distcp") and damage.name == "garbage")
]


@pytest.mark.parametrize(("step", "name", "damage"), FILE_CASES, indirect=["step"])
def test_a_damaged_file_is_named(step, name, damage):
    damage.apply(step / name)
    refused_everywhere(step, name)


def test_a_data_file_a_few_bytes_short_is_found_by_its_byte_ranges(pristine, tmp_path):
    step = shutil.copytree(pristine["shard"], tmp_path / STEP)
    assert _dcp_files_problem(step) is None
    data = step / "__0_0.distcp"
    size = data.stat().st_size
    for cut in (1, 2, 3, 7):
        replace_file(data, (pristine["shard"] / data.name).read_bytes()[: size - cut])
        assert _dcp_files_problem(step) == f"{data} is cut short ({size - cut} of {size} bytes)"


# ---------------------------------------------------------------- damaged fields
TYPES = {
    "str": "1", "float": 1.0, "bool": True, "None": None, "list": [1], "dict": {"a": 1},
    "tensor": torch.tensor(1), "int": 1,
}  # fmt: skip


def wrong_types(*allowed: str) -> dict[str, object]:
    return {f"a {kind}": value for kind, value in TYPES.items() if kind not in allowed}


RANK = {"shard", "full", "local"}
# (file, field, formats): the values it must refuse (None: delete the field)
TRAINER_FIELDS: dict[str, dict[str, object]] = {
    "step": wrong_types("int") | {"-1": -1, "deleted": None},
    "world_size": wrong_types("int") | {"0": 0, "-2": -2, "'2'": "2", "deleted": None},
    "ckpt_type": wrong_types() | {"'shards'": "shards", "'FULL'": "FULL", "deleted": None},
    "sharding_strategy": wrong_types() | {"'hybrid'": "hybrid", "deleted": None},
    "scaler": wrong_types("None", "dict") | {"deleted": None},
    "progress": wrong_types("None", "dict"),
    "log_window": wrong_types("None", "dict"),
}
UINT8 = torch.zeros(4, dtype=torch.uint8)
RANK_FIELDS: dict[str, dict[str, object]] = {
    "loader": wrong_types("dict") | {"deleted": None},
    "rng": wrong_types()
    | {
        "deleted": None,
        "no cpu": {"cuda": UINT8},
        "cpu float": {"cpu": torch.zeros(4)},
        "cpu list": {"cpu": [0, 1]},
        "cuda float": {"cpu": UINT8, "cuda": torch.zeros(4)},
    },
}
LOCAL_FIELDS: dict[str, dict[str, object]] = {
    "model": wrong_types("dict")
    | {"deleted": None, "of lists": {"x": [1.0]}, "int keys": {1: UINT8}},
    "shapes": wrong_types("dict")
    | {"deleted": None, "of str": {"x": "3"}, "negative": {"x": [-1]}, "one more": "EXTRA"},
    "mesh": wrong_types("dict")
    | {"deleted": None, "no shard": {"shard_size": 1}, "str": {"shard": "0"}},
    "optim": wrong_types("dict")
    | {
        "deleted": None,
        "empty": {},
        "state list": {"state": [], "param_groups": []},
        "group no params": "NO_PARAMS",
    },  # fmt: skip
}
OPTIMIZER_FIELDS: dict[str, dict[str, object]] = {
    "state": wrong_types("dict") | {"deleted": None, "entries": {"w": 1}},
    "param_groups": wrong_types("list") | {"deleted": None, "of ints": [1], "no params": [{}]},
}
WHOLE = {"a list": [1, 2], "None": None, "a tensor": torch.zeros(2), "int keys": {1: 2}}


def changed(state: dict, field: str, label: str, value: object) -> object:
    state = dict(state)
    if label == "deleted":
        del state[field]
    elif value == "EXTRA":  # a name in 'shapes' that 'model' lacks
        state[field] = state[field] | {"extra.weight": [2]}
    elif value == "NO_PARAMS":
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in state[field]["param_groups"]
        ]
        state[field] = state[field] | {"param_groups": groups}
    else:
        state[field] = value
    return state


FIELD_CASES = [
    pytest.param(ckpt, file, field, label, value, id=f"{ckpt}-{file}-{field}-{label}")
    for ckpt in FORMATS
    for file, fields in (
        [("trainer.pt", TRAINER_FIELDS)]
        + [
            (f"rank_0000{r}.pt", RANK_FIELDS | (LOCAL_FIELDS if ckpt == "local" else {}))
            for r in (0, 1)
        ]
        + ([("optimizer.pt", OPTIMIZER_FIELDS)] if ckpt == "full" else [])
    )
    for field, values in fields.items()
    for label, value in values.items()
] + [
    pytest.param(ckpt, file, None, label, value, id=f"{ckpt}-{file}-whole-{label}")
    for ckpt in FORMATS
    for file in ("trainer.pt", "rank_00001.pt", *(("optimizer.pt",) if ckpt == "full" else ()))
    for label, value in WHOLE.items()
]


@pytest.mark.parametrize(
    ("step", "file", "field", "label", "value"), FIELD_CASES, indirect=["step"]
)
def test_a_wrong_field_is_named(step, file, field, label, value):
    path = step / file
    state = torch.load(path, weights_only=True)
    torch_rewrite(path, value if field is None else changed(state, field, label, value))
    names = [file] if field is None else [file, repr(field)]
    refused_everywhere(step, *names)


# ---------------------------------------------------------------- genuine checkpoints
@pytest.mark.parametrize("ckpt", [*FORMATS, *(f"{f}2" for f in FORMATS)])
def test_a_genuine_checkpoint_passes(ckpt, pristine):
    step = pristine[ckpt]
    started = time.perf_counter()
    assert checkpoint_problem(step) is None
    assert time.perf_counter() - started < 1.0  # headers, pickles and memory maps only
    assert read_trainer_state(step)["world_size"] == (2 if ckpt.endswith("2") else 1)
    assert resolve_resume_dir("auto", step.parent, 2) == step


def test_an_slt_full_checkpoint_without_its_own_tensors_is_named(pristine, tmp_path):
    step = shutil.copytree(pristine["full"], tmp_path / STEP)
    trainer = torch.load(step / "trainer.pt", weights_only=True)
    torch_rewrite(step / "trainer.pt", trainer | {"slt": {"config": {}}})
    assert (
        checkpoint_problem(step) == f"{step / 'slt_state.safetensors'} is missing (a sparse "
        "run's own tensors)"
    )


# ---------------------------------------------------------------- --init_from
@pytest.fixture(scope="module")
def model_config(pristine):
    return AutoConfig.from_pretrained(str(pristine["full"]))


@pytest.fixture
def model_dir(pristine, tmp_path) -> Path:
    """A transformers directory: the `full` checkpoint's config and weights."""
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(pristine["full"] / name, directory / name)
    return directory


def sharded(directory: Path) -> list[str]:
    """model.safetensors split in two files with transformers' index."""
    weights = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(weights)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for file, half in zip(files, halves, strict=True):
        save_file({n: weights[n] for n in half}, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(half, file)
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def test_a_genuine_transformers_directory_passes(model_dir, model_config):
    check_initial_weights(str(model_dir), model_config)
    sharded(model_dir)
    check_initial_weights(str(model_dir), model_config)


@pytest.mark.parametrize("damage", FILE_DAMAGES[:-2], ids=lambda d: d.name)
def test_init_from_a_damaged_safetensors_file_is_refused_before_the_model(
    damage, model_dir, model_config
):
    damage.apply(model_dir / "model.safetensors")
    line = one_line(lambda: check_initial_weights(str(model_dir), model_config))
    assert "model.safetensors" in line and line.startswith("--init_from"), line


@pytest.mark.parametrize("damage", FILE_DAMAGES[:-2], ids=lambda d: d.name)
def test_init_from_a_damaged_bin_file_is_refused(damage, model_dir, model_config):
    weights = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(weights, model_dir / "pytorch_model.bin")
    check_initial_weights(str(model_dir), model_config)
    damage.apply(model_dir / "pytorch_model.bin")
    line = one_line(lambda: check_initial_weights(str(model_dir), model_config))
    assert "pytorch_model.bin" in line, line


def test_init_from_a_missing_shard_is_named_not_its_tensors(model_dir, model_config):
    files = sharded(model_dir)
    (model_dir / files[1]).unlink()
    line = one_line(lambda: check_initial_weights(str(model_dir), model_config))
    assert line == (
        f"--init_from {model_dir}: {model_dir / files[1]}, named in "
        "model.safetensors.index.json, is missing"
    )


def test_init_from_an_index_naming_a_tensor_its_file_lacks(model_dir, model_config):
    sharded(model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    line = one_line(lambda: check_initial_weights(str(model_dir), model_config))
    assert "model-00001-of-00002.safetensors has no tensor" in line, line


@pytest.mark.parametrize(
    "content", [b"", b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'"a string"', b"null"]
)
@pytest.mark.parametrize("kind", ["transformers", "checkpoint"])
def test_init_from_a_garbage_config_is_one_line_naming_it(
    content, kind, model_dir, pristine, model_config, tmp_path
):
    directory = (
        model_dir if kind == "transformers" else shutil.copytree(pristine["shard"], tmp_path / STEP)
    )
    (directory / "config.json").write_bytes(content)
    line = one_line(lambda: check_initial_weights(str(directory), model_config))
    assert str(directory / "config.json") in line, line


def test_init_from_a_checkpoint_whose_rank_1_file_is_cut(pristine, model_config, tmp_path):
    step = shutil.copytree(pristine["shard2"], tmp_path / STEP)
    cut_to(lambda n: n // 2)(step / "rank_00001.pt")
    line = one_line(lambda: check_initial_weights(str(step), model_config))
    assert f"{step / 'rank_00001.pt'} is cut short or damaged" in line, line
