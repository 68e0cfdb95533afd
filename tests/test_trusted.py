"""Nothing untrusted runs (README, "What is guaranteed"): a crafted pickle, in every place the
project unpickles a file, is refused with one line and runs nothing.

The payloads are hand-built pickles that look a global up (STACK_GLOBAL, as the protocol 4
DCP writes does, and GLOBAL, the protocol 0-2 form) and call it with arguments that would
leave MARKER behind or delete KEEP. They name every attribute of every module a `.metadata`
may name that is not itself allowed, dotted walks that pickle would follow out of an allowed
module (`torch.distributed.checkpoint.metadata` + `os.system` reaches `os`), and the usual
suspects (os.system, exec, subprocess, shutil.rmtree, torch.save). Each is read in-process by
every public reader that can meet it: as a `shard` checkpoint's `.metadata`, and as the pickle
of a torch file (trainer.pt, a rank file, an `--init_from` .bin, an optimizer entry of DCP).
The args file, eval data and MDS data cannot be made to unpickle either (MDS `pkl` columns:
test_bad_input)."""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import io
import pickle
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from datas.C4.c4_eval import check_eval_data
from utils.args import parse_args
from utils.checkpoint import (
    checkpoint_problem,
    dcp_load,
    read_model_tensors,
    read_trainer_state,
    saved_shapes,
)
from utils.checkpoint.trusted import METADATA_GLOBALS, TrustedReader
from utils.errors import UserError
from utils.pretrained import load_initial_weights

# DCP says so on each save and load without a process group
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# Fixed paths: the payloads are built when the tests are collected.
MARKER = Path(tempfile.gettempdir()) / "llm_playground_test_trusted_ran"
KEEP = Path(tempfile.gettempdir()) / "llm_playground_test_trusted_keep"
TOUCH = f"touch {MARKER}"
WRITE = f"open({str(MARKER)!r}, 'w').close()"

# What a payload calls, by the name pickle looks up, with arguments that leave a trace.
CALLS: dict[str, tuple] = {
    "os.system": (TOUCH,),
    "posix.system": (TOUCH,),
    "os.popen": (TOUCH,),
    "builtins.exec": (WRITE,),
    "builtins.eval": (WRITE,),
    "subprocess.getoutput": (TOUCH,),
    "subprocess.call": (["touch", str(MARKER)],),
    "subprocess.Popen": (["touch", str(MARKER)],),
    "shutil.rmtree": (str(KEEP),),
    "torch.save": ("ran", str(MARKER)),
    "torch.load": (str(MARKER),),
    "torch.distributed.checkpoint.metadata.os.system": (TOUCH,),
}
ALLOWED_MODULES = sorted({module for module, _ in METADATA_GLOBALS})


def text(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    if len(data) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def argument(value: str | list[str]) -> bytes:
    if isinstance(value, str):
        return text(value)
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(map(text, value)) + pickle.APPENDS


def payload(module: str, name: str, args: tuple, form: str) -> bytes:
    """A pickle that calls `module`'s `name` (looked up as pickle does) with `args`."""
    if form == "STACK_GLOBAL":
        lookup = pickle.PROTO + b"\x04" + text(module) + text(name) + pickle.STACK_GLOBAL
    else:
        lookup = pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode()
    call = pickle.MARK + b"".join(map(argument, args)) + pickle.TUPLE + pickle.REDUCE
    return lookup + call + pickle.STOP


def cases(pairs: list[tuple[str, str, tuple]]) -> list:
    """Each (module, name, args) in both forms (GLOBAL cannot name a line break)."""
    return [
        pytest.param(payload(m, n, args, form), id=ascii(f"{form} {m} {n}")[1:-1][:100])
        for m, n, args in pairs
        for form in ("STACK_GLOBAL", "GLOBAL")
        if form == "STACK_GLOBAL" or "\n" not in m + n
    ]


def split(dotted: str) -> tuple[str, str]:
    module, _, name = dotted.rpartition(".")
    return module, name


# The dangerous calls themselves, and walked to from inside each allowed module or name.
SUSPECTS = [(*split(dotted), args) for dotted, args in CALLS.items()]
WALKS = [(module, dotted, args) for module in ALLOWED_MODULES for dotted, args in CALLS.items()]
WALKS += [(module, f"{name}.__class__", (TOUCH,)) for module, name in sorted(METADATA_GLOBALS)]
# Names no file should be able to print as more than one line or a page.
ODD = [("os", "system\nerror: all fine", (TOUCH,)), ("torch", "x" * 5000, (TOUCH,))]


def other_names(module: str) -> list[str]:
    """Every attribute of an allowed module but the allowed names (a module this Python lacks,
    such as 3.13's `pathlib._local`, has none)."""
    try:
        names = dir(importlib.import_module(module))
    except ImportError:
        return []
    return [name for name in names if (module, name) not in METADATA_GLOBALS]


# The sweep, about 1800 names in each form, runs as one test per module and form: a test
# each would spend most of its time in pytest.
SWEEP = [(module, form) for module in ALLOWED_MODULES for form in ("STACK_GLOBAL", "GLOBAL")]
CASES = cases(WALKS + SUSPECTS + ODD)


# ---------------------------------------------------------------- a genuine checkpoint
DTYPES = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn,
)  # fmt: skip
TRAINER = {"step": 1, "scaler": None, "world_size": 1, "sharding_strategy": "full_shard",
           "ckpt_type": "shard"}  # fmt: skip
LR_ENTRY = "optim.param_groups.0.lr"  # an optimizer setting: a pickled entry, not a tensor


def model_tensors() -> dict[str, torch.Tensor]:
    return {f"layer.{i}.weight": torch.ones(3, 2).to(dtype) for i, dtype in enumerate(DTYPES)}


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A `shard` checkpoint as DCP writes it (tensors of many dtypes, optimizer moments and
    settings, saved under a path), with trainer.pt and a rank file beside it."""
    step = tmp_path_factory.mktemp("run") / "step_000001"
    optim = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 2)}},
             "param_groups": [{"lr": 0.01, "betas": (0.9, 0.95), "params": [0]}]}  # fmt: skip
    dcp.save({"model": model_tensors(), "optim": optim}, checkpoint_id=step, no_dist=True)
    torch.save(TRAINER, step / "trainer.pt")
    rank_state = {"shapes": {"layer.0.weight": [3, 2]}, "loader": {},
                  "rng": {"cpu": torch.get_rng_state()}}  # fmt: skip
    torch.save(rank_state, step / "rank_00000.pt")
    return step


@pytest.fixture(scope="module")
def kept_copy(genuine, tmp_path_factory) -> Path:
    return shutil.copytree(genuine, tmp_path_factory.mktemp("crafted") / genuine.name)


@pytest.fixture(scope="module")
def originals(genuine) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in genuine.iterdir()}


@pytest.fixture
def step(kept_copy, originals) -> Iterator[Path]:
    """A copy of the genuine checkpoint for one test to craft, restored after it: far faster
    than a fresh copy for each of thousands of cases."""
    yield kept_copy
    for name, content in originals.items():
        (kept_copy / name).write_bytes(content)
    shutil.rmtree(kept_copy / "bin", ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def no_traces_left() -> Iterator[None]:
    yield
    MARKER.unlink(missing_ok=True)
    shutil.rmtree(KEEP, ignore_errors=True)


def refused(read: Callable[[], object]) -> str:
    """Run a reader on a crafted file: a one-line UserError (or, from checkpoint_problem, a
    one-line problem) saying it may run code, and nothing ran. Returns the line."""
    MARKER.unlink(missing_ok=True)
    KEEP.mkdir(exist_ok=True)
    try:
        problem = read()
    except UserError as err:
        problem = str(err)
    assert not MARKER.exists(), "a file's content ran as code"
    assert KEEP.is_dir(), "a file's content ran as code (deleted a directory)"
    assert isinstance(problem, str), f"read as {problem!r}"
    assert "\n" not in problem and len(problem) < 1000, problem
    assert "may run code, so it is not read" in problem, problem
    return problem


# ---------------------------------------------------------------- .metadata
METADATA_READERS: dict[str, Callable[[Path], object]] = {
    "dcp_load": lambda step: dcp_load({"model": model_tensors()}, step, no_dist=True),
    "checkpoint_problem": checkpoint_problem,
    "saved_shapes": lambda step: saved_shapes(step, "shard"),
    "read_model_tensors": read_model_tensors,
}


def metadata_refused(step: Path, crafted: bytes) -> None:
    (step / ".metadata").write_bytes(crafted)
    for name, read in METADATA_READERS.items():
        line = refused(lambda read=read: read(step))
        assert ".metadata" in line, f"{name}: {line}"


@pytest.mark.parametrize("crafted", CASES)
def test_a_crafted_metadata_is_refused_by_every_reader(crafted, step):
    metadata_refused(step, crafted)


@pytest.mark.parametrize(("module", "form"), SWEEP)
def test_no_other_name_of_an_allowed_module_is_read_from_metadata(module, form, step):
    failures = {}
    for name in other_names(module):
        try:
            metadata_refused(step, payload(module, name, (TOUCH,), form))
        except Exception as err:  # every name is tried, and each failure listed
            failures[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    assert not failures, f"{len(failures)} names not refused: {failures}"


# ---------------------------------------------------------------- torch files
def torch_file(pickled: bytes) -> bytes:
    """A torch.save archive whose data.pkl is `pickled`."""
    buffer = io.BytesIO()
    torch.save({"step": 1}, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as legit, zipfile.ZipFile(out, "w") as crafted:
        for entry in legit.namelist():
            content = pickled if entry.endswith("/data.pkl") else legit.read(entry)
            crafted.writestr(entry, content)  # stored, as torch writes (and needs) them
    return out.getvalue()


def with_lr_entry(step: Path, content: bytes) -> None:
    """Point the checkpoint's optimizer setting LR_ENTRY at `content`, appended to its data
    file, as if DCP had written it there."""
    metadata = TrustedReader(step).read_metadata()
    index = next(i for i in metadata.storage_data if i.fqn == LR_ENTRY)
    info = metadata.storage_data[index]
    data = step / info.relative_path
    offset = data.stat().st_size
    with data.open("ab") as file:
        file.write(content)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(content))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))


def init_from_bin(step: Path) -> None:
    """`--init_from` a transformers directory of .bin weights (the file is refused before any
    parameter of the model is looked at)."""
    load_initial_weights(nn.Linear(2, 3), str(step / "bin"), fresh=set())


# (the file the payload goes into, the reader), each on the checkpoint `step`
TORCH_FILE_READERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "checkpoint_problem": ("trainer.pt", checkpoint_problem),
    "read_trainer_state": ("trainer.pt", read_trainer_state),
    "saved_shapes local": ("rank_00000.pt", lambda step: saved_shapes(step, "local")),
    "init_from .bin": ("bin/pytorch_model.bin", init_from_bin),
    "dcp entry": (
        LR_ENTRY,
        lambda step: dcp_load({"optim": {"param_groups": [{"lr": 0.0}]}}, step, no_dist=True),
    ),
}


@pytest.mark.parametrize("crafted", CASES)
def test_a_crafted_torch_file_is_refused_by_every_reader(crafted, step):
    content = torch_file(crafted)
    for name, (where, read) in TORCH_FILE_READERS.items():
        if where == LR_ENTRY:
            with_lr_entry(step, content)
        else:
            (step / where).parent.mkdir(exist_ok=True)
            (step / where).write_bytes(content)
        line = refused(lambda read=read: read(step))
        assert Path(where).name in line, f"{name}: {line}"


# ---------------------------------------------------------------- what still reads
def test_a_genuine_checkpoint_reads_whole(genuine):
    assert checkpoint_problem(genuine) is None
    assert read_trainer_state(genuine) == TRAINER
    expected = model_tensors()
    assert saved_shapes(genuine, "shard") == {k: tuple(v.shape) for k, v in expected.items()}
    tensors = read_model_tensors(genuine)
    assert {k: v.dtype for k, v in tensors.items()} == {k: v.dtype for k, v in expected.items()}
    assert all(
        torch.equal(tensors[k].view(torch.uint8), v.view(torch.uint8)) for k, v in expected.items()
    )
    state = {"optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}}
    dcp_load(state, genuine, no_dist=True)  # through the planner's check of pickled entries
    assert state["optim"]["param_groups"][0] == {"lr": 0.01, "betas": (0.9, 0.95)}


def test_every_global_of_real_metadata_is_allowed_and_nothing_dotted(genuine):
    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with (genuine / ".metadata").open("rb") as file:
        Recording(file).load()
    assert seen <= METADATA_GLOBALS
    assert {("torch", str(dtype).removeprefix("torch.")) for dtype in DTYPES} <= seen
    assert not any("." in name for _, name in METADATA_GLOBALS)


# ---------------------------------------------------------------- other inputs
@pytest.mark.parametrize(
    "tag",
    [
        f"!!python/object/apply:os.system [{TOUCH!r}]",
        f"!!python/object/new:subprocess.Popen [[touch, {MARKER}]]",
        "!!python/name:os.system",
        f"!!python/object/apply:builtins.exec [{WRITE!r}]",
    ],
)
def test_an_args_file_cannot_construct_objects(tag, tmp_path):
    MARKER.unlink(missing_ok=True)
    (tmp_path / "run.yaml").write_text(f"lr: {tag}\n")
    with pytest.raises(UserError, match="is not valid YAML or JSON") as refusal:
        parse_args([f"--args_file={tmp_path / 'run.yaml'}"])
    assert "\n" not in str(refusal.value)
    assert not MARKER.exists()


@pytest.mark.parametrize("crafted", cases([SUSPECTS[0]]))
def test_eval_data_is_read_as_json_not_unpickled(crafted, tmp_path):
    MARKER.unlink(missing_ok=True)
    for name, content in (("c4-validation.json.gz", gzip.compress(crafted)), ("x.json", crafted)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError) as refusal:
            check_eval_data(tmp_path / name)
        assert "\n" not in str(refusal.value) and name in str(refusal.value)
    assert not MARKER.exists()


def rewritten_metadata(step: Path, change: Callable[[Any], None]) -> None:
    """The step's real metadata, changed in memory and written back with DCP's own types."""
    with (step / ".metadata").open("rb") as file:
        metadata = pickle.load(file)
    change(metadata)
    (step / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("target", ["../trainer.pt", "/etc/passwd", "sub/x.distcp", ".."])
def test_a_metadata_pointing_outside_its_checkpoint_is_refused(target, step):
    """Nothing runs either way; but the bytes of any file would be read as tensor data."""

    def elsewhere(metadata) -> None:
        for info in metadata.storage_data.values():
            info.relative_path = target

    rewritten_metadata(step, elsewhere)
    assert "points outside its checkpoint" in checkpoint_problem(step)


def test_a_metadata_of_allowed_types_built_wrong_is_damaged_not_a_traceback(step):
    def wrong(metadata) -> None:
        metadata.storage_data = {key: 7 for key in metadata.storage_data}

    rewritten_metadata(step, wrong)
    assert checkpoint_problem(step) == f"{step / '.metadata'} is damaged"
