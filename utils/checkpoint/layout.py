"""What a checkpoint directory holds and how it is found and read: the `step_<N:06d>` names,
`auto` resume, the checks that a checkpoint is whole, the transformers layout of weights and
model files, the record of the training that made a model directory, and reading a checkpoint
of any format without a process group."""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
)
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

from utils.args import CKPT_TYPES, SHARDING_STRATEGIES
from utils.checkpoint.trusted import TrustedReader, dcp_load, load_torch_file
from utils.errors import UserError
from utils.model import canonical_name

STEP_DIR = re.compile(r"^step_(\d+)$")
OWN_STATE_SUFFIX = "_state.safetensors"  # a component's tensors in a `full` checkpoint
# What every trainer.pt holds; any other key is a component's state ("scheduler": older runs).
TRAINER_KEYS = {"step", "scaler", "world_size", "sharding_strategy", "ckpt_type", "scheduler"}
TRAINER_FIELDS = TRAINER_KEYS - {"scheduler"}  # checked one by one; the rest are components
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_STATE_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_number(step_dir: Path) -> int:
    return int(STEP_DIR.match(step_dir.name).group(1))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Published step directories, oldest first (staging directories are hidden and skipped)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer.pt").is_file()]


class _Damaged(Exception):
    """What is wrong with one file of a checkpoint: the line checkpoint_problem returns."""


def checkpoint_problem(step_dir: Path) -> str | None:
    """The one check of a checkpoint's files, cheap enough for start-up (None: it is whole).
    trainer.pt, every rank's rank_<r>.pt and a `full` optimizer.pt are read (the last two memory
    mapped, not read) and checked field by field; the weights by sizes and headers: every byte
    range of DCP's metadata inside its file, every safetensors header whole and its tensors
    there. The weights' shapes are checked against the model later (check_shapes_match).
    Otherwise a line naming the file, and the field, that is missing, cut short or wrong."""
    try:
        _check_checkpoint(step_dir)
    except _Damaged as err:
        return str(err)
    return None


def _check_checkpoint(step_dir: Path) -> dict:
    """checkpoint_problem's checks; returns trainer.pt's state."""
    path = step_dir / "trainer.pt"
    if not path.is_file():
        raise _Damaged("no trainer.pt: not a complete checkpoint")
    if not zipfile.is_zipfile(path):
        raise _Damaged(f"{path} is damaged")
    trainer = _read_torch_file(path)
    _check_trainer(path, trainer)
    ckpt_type = trainer["ckpt_type"]
    # the weights first: a crafted `.metadata` is named as such, whatever else is wrong
    problem = None
    if ckpt_type == "shard":
        problem = _dcp_files_problem(step_dir)
    elif ckpt_type == "full":
        problem = _safetensors_problem(step_dir, trainer)
    if problem:
        raise _Damaged(problem)
    for rank in range(trainer["world_size"]):
        path = step_dir / f"rank_{rank:05d}.pt"
        _check_rank_state(path, _read_torch_file(path, mmap=True), ckpt_type)
    if ckpt_type == "full":
        path = step_dir / "optimizer.pt"
        _check_full_optimizer(path, _read_torch_file(path, mmap=True))
    return trainer


def _read_torch_file(path: Path, **kwargs: Any) -> Any:
    """A torch file of the checkpoint, through the weights-only reader."""
    if not path.is_file():
        raise _Damaged(f"{path} is " + ("not a file" if path.exists() else "missing"))
    if not zipfile.is_zipfile(path):
        raise _Damaged(f"{path} is cut short or damaged")
    try:
        return load_torch_file(path, map_location="cpu", **kwargs)
    except UserError as err:  # its pickle names more than tensors and plain values
        raise _Damaged(str(err)) from err
    except Exception as err:  # a zip archive, but not torch's, or torch's cut or garbled
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _Damaged(f"{path} is damaged ({type(err).__name__}: {reason[:200]})") from err


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _shown(value: Any) -> str:
    """A value read from a file, short, for an error line."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    text = repr(value).encode("unicode_escape").decode()
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _field(path: Path, state: Any, key: str, ok: Callable[[Any], bool], wanted: str) -> Any:
    """`state[key]`, which `ok` accepts (a `wanted` thing); the file is damaged otherwise."""
    if key not in state:
        raise _Damaged(f"{path} is damaged (no {key!r})")
    if not ok(state[key]):
        raise _Damaged(f"{path} is damaged (its {key!r} is {_shown(state[key])}, not {wanted})")
    return state[key]


def _check_dict(path: Path, state: Any, what: str) -> None:
    if not isinstance(state, dict):
        raise _Damaged(f"{path} is damaged (it holds {_shown(state)}, not {what})")
    odd = next((key for key in state if not isinstance(key, str)), None)
    if odd is not None:
        raise _Damaged(f"{path} is damaged (a key {_shown(odd)} of {what})")


def _check_trainer(path: Path, trainer: Any) -> None:
    _check_dict(path, trainer, "a trainer state")
    _field(path, trainer, "step", lambda v: _is_int(v, 0), "an int >= 0")
    _field(path, trainer, "world_size", lambda v: _is_int(v, 1), "an int >= 1")
    _field(path, trainer, "ckpt_type", lambda v: v in CKPT_TYPES, " or ".join(CKPT_TYPES))
    strategies = " or ".join(SHARDING_STRATEGIES)
    _field(path, trainer, "sharding_strategy", lambda v: v in SHARDING_STRATEGIES, strategies)
    _field(path, trainer, "scaler", lambda v: v is None or isinstance(v, dict), "None or a dict")
    for name in sorted(trainer.keys() - TRAINER_FIELDS):
        # a component's state ("progress", "log_window", "slt"; "scheduler" of older runs)
        _field(path, trainer, name, lambda v: v is None or isinstance(v, dict), "None or a dict")


def _is_dict_of(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, kind) for k, v in value.items()
    )


def _is_shape(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(_is_int(n, 0) for n in value)


def _is_rng(value: Any) -> bool:
    """torch's RNG states: the CPU's, and the GPU's of a run that had one."""
    return isinstance(value, dict) and all(
        isinstance(value.get(device), torch.Tensor) and value[device].dtype == torch.uint8
        for device in ("cpu", *(["cuda"] if "cuda" in value else []))
    )


def _is_optimizer_state(value: Any, keys: type) -> bool:
    """An optimizer's state_dict: `state` by parameter (its index, or its name in a full one),
    `param_groups` a list of dicts, each with its `params`."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("state"), dict)
        and all(isinstance(k, keys) and isinstance(v, dict) for k, v in value["state"].items())
        and isinstance(value.get("param_groups"), list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                for g in value["param_groups"])
    )  # fmt: skip


def _check_rank_state(path: Path, state: Any, ckpt_type: str) -> None:
    """A rank's file: its loader's position and RNG states, and a `local` one's shards."""
    _check_dict(path, state, "a rank's state")
    _field(path, state, "loader", lambda v: isinstance(v, dict), "a dict")
    _field(path, state, "rng", _is_rng, "a dict of uint8 tensors under 'cpu' (and 'cuda')")
    if ckpt_type != "local":
        return
    model = _field(path, state, "model", lambda v: _is_dict_of(v, torch.Tensor), "tensors by name")
    shapes = _field(path, state, "shapes", lambda v: _is_dict_of(v, list | tuple), "shapes by name")
    bad = next((name for name, shape in shapes.items() if not _is_shape(shape)), None)
    if bad is not None:
        raise _Damaged(f"{path} is damaged (its 'shapes' of {bad!r} is {_shown(shapes[bad])}, "
                       "not a list of ints >= 0)")  # fmt: skip
    if model.keys() != shapes.keys():
        name = sorted(model.keys() ^ shapes.keys())[0]
        raise _Damaged(f"{path} is damaged ({name!r} is in one of 'model' and 'shapes' only)")
    _field(path, state, "mesh", lambda v: _is_dict_of(v, int) and "shard" in v,
           "ints by mesh dimension, 'shard' among them")  # fmt: skip
    _field(path, state, "optim", lambda v: _is_optimizer_state(v, int),
           "an optimizer state ('state' by index, 'param_groups')")  # fmt: skip


def _check_full_optimizer(path: Path, state: Any) -> None:
    _check_dict(path, state, "an optimizer state")
    _field(path, state, "state", lambda v: _is_dict_of(v, dict), "moments by parameter name")
    _field(path, state, "param_groups", lambda v: _is_optimizer_state(state, str),
           "a list of parameter groups")  # fmt: skip


def _dcp_files_problem(step_dir: Path) -> str | None:
    """Every byte range the DCP metadata points to lies inside a file of the checkpoint."""
    if not (step_dir / ".metadata").is_file():
        exists = (step_dir / ".metadata").exists()
        return f"{step_dir / '.metadata'} is {'not a file' if exists else 'missing'}"
    try:
        storage = TrustedReader(step_dir).read_metadata().storage_data
        ends: dict[str, int] = {}
        for info in storage.values():
            end = info.offset + info.length
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    except UserError as err:
        return f"{step_dir / '.metadata'} is unreadable ({err})"
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, AttributeError):
        # DCP's own record types built from arguments they never hold: damaged, not crafted
        return f"{step_dir / '.metadata'} is damaged"
    outside = sorted(name for name in ends if Path(name).name != name or name in (".", ".."))
    if outside:
        return f"{step_dir / '.metadata'} points outside its checkpoint ({outside[0]!r})"
    for name, end in sorted(ends.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size < end:
            return f"{path} is cut short ({path.stat().st_size} of {end} bytes)"
    return None


def _safetensors_problem(step_dir: Path, trainer: dict) -> str | None:
    """A `full` checkpoint's weights: the transformers files and a component's own."""
    files = transformers_weight_files(step_dir)
    if not files:
        return f"no model.safetensors in {step_dir}"
    if trainer.get("slt") is not None and not (step_dir / f"slt{OWN_STATE_SUFFIX}").is_file():
        return f"{step_dir / f'slt{OWN_STATE_SUFFIX}'} is missing (a sparse run's own tensors)"
    return weight_files_problem(step_dir, files + own_state_files(step_dir))


def weight_files_problem(directory: Path, files: list[Path]) -> str | None:
    """The one check of weight files in the transformers layout (a `full` checkpoint, an
    `--init_from` directory), from headers only: every safetensors file whole and readable,
    every `.bin` a torch file of tensors by name (memory mapped, not read), and the files and
    tensors an index (`model.safetensors.index.json`) names all there. None when they are."""
    try:
        held = {path.name: _weight_names(path) for path in files}
        kinds = {path.suffix for path in files}  # model.safetensors.index.json: of .safetensors
        for index in sorted(directory.glob("*.index.json")):
            if Path(index.name.removesuffix(".index.json")).suffix in kinds:
                _check_weight_index(directory, index, held)
    except _Damaged as err:
        return str(err)
    return None


def _weight_names(path: Path) -> set[str]:
    if not path.is_file():
        raise _Damaged(f"{path} is " + ("not a file" if path.exists() else "missing"))
    if path.suffix != ".safetensors":
        state = _read_torch_file(path, mmap=True)
        if not _is_dict_of(state, torch.Tensor):
            raise _Damaged(f"{path} is damaged (it holds {_shown(state)}, not tensors by name)")
        return set(state)
    try:
        with safe_open(str(path), framework="pt") as file:
            return set(file.keys())
    except Exception as err:  # safetensors' own error type is not importable everywhere
        raise _Damaged(f"{path} is cut short or damaged ({err})") from err


def _check_weight_index(directory: Path, index: Path, held: dict[str, set[str]]) -> None:
    """transformers' index of sharded weights: each tensor it maps is in the file it names."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        raise _Damaged(f"{index} is not a readable weight index ({type(err).__name__}: "
                       f"{str(err)[:200]})") from err  # fmt: skip
    if not _is_dict_of(weight_map, str):
        raise _Damaged(f"{index} is damaged (its 'weight_map' is not file names by tensor)")
    for name, file in sorted(weight_map.items(), key=lambda item: item[1]):
        if Path(file).name != file or file in (".", ".."):
            raise _Damaged(f"{index} names {file!r}, outside {directory}")
        if file not in held:
            if not (directory / file).exists():
                raise _Damaged(f"{directory / file}, named in {index.name}, is missing")
            held[file] = _weight_names(directory / file)
        if name not in held[file]:
            raise _Damaged(f"{directory / file} has no tensor {name!r}, which {index.name} "
                           "puts there")  # fmt: skip


# ---------------------------------------------------------------- transformers layout
def save_transformers_weights(config: PretrainedConfig, state: dict, out_dir: Path) -> None:
    """Write full weights as transformers safetensors files (sharded past 5 GB)."""
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    shell.load_state_dict(state, assign=True, strict=False)
    shell.tie_weights()  # a tied head has no tensor of its own in `state`
    with transformers_progress_bars_off():
        shell.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size="5GB")
    inference_config(config).save_pretrained(str(out_dir))  # the run's, not the shell's copy


@contextlib.contextmanager
def transformers_progress_bars_off() -> Iterator[None]:
    """transformers 5 draws a progress bar on stderr for each save, which would land between a
    run's log lines and before a save error's one line."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def inference_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config a model directory is saved with: the run's, with the KV cache that training
    turns off back on (generation is twice as slow without it)."""
    saved = copy.deepcopy(config)
    saved.use_cache = True
    return saved


def write_model_files(config: PretrainedConfig, out_dir: Path, tokenizer) -> None:
    """Everything of a transformers model directory but the weights: config.json,
    generation_config.json (special token ids from the config, which has the tokenizer's) and
    the tokenizer as transformers saves it (chat template and added tokens included), returning
    only what a Llama takes: `generate(**tokenizer(text, return_tensors="pt"))` works."""
    config = inference_config(config)
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    if tokenizer is not None:
        # transformers 4's tokenizers return token_type_ids unless told otherwise, and generate()
        # refuses an input the model does not take. save_pretrained writes init_kwargs, so both
        # are set, on a shallow copy: the caller's tokenizer stays as it is.
        tokenizer = copy.copy(tokenizer)
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
        tokenizer.init_kwargs = {
            **tokenizer.init_kwargs,
            "model_input_names": tokenizer.model_input_names,
        }
        tokenizer.save_pretrained(str(out_dir))


def load_transformers_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in transformers_weight_files(step_dir):
        weights |= load_file(str(file))
    return weights


def transformers_weight_files(step_dir: Path) -> list[Path]:
    return sorted(f for f in step_dir.glob("*.safetensors") if f not in own_state_files(step_dir))


def own_state_files(step_dir: Path) -> list[Path]:
    return sorted(step_dir.glob(f"*{OWN_STATE_SUFFIX}"))


def full_checkpoint_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The training model's tensors in a `full` checkpoint (a sparse layer's own, from its
    component's file)."""
    return _with_own_states(step_dir, load_transformers_weights(step_dir), load_file)


def _with_own_states(step_dir: Path, dense: dict[str, Any], read: Callable) -> dict[str, Any]:
    """What a `full` checkpoint holds for the training model (tensors or their shapes, by
    `read`): a module whose tensors a component file holds takes them from there, not from its
    exported dense weight."""
    for path in own_state_files(step_dir):
        own = read(str(path))
        modules = {key.rpartition(".")[0] for key in own}
        dense = {k: v for k, v in dense.items() if k.rpartition(".")[0] not in modules} | own
    return dense


# ---------------------------------------------------------------- the training record
TRAINING_RECORD = "training.json"  # in an export: the training that made it (convert.py)
RECORD_TEXT_FIELDS = ("data_dir", "run_name", "tokenizer_dir", "checkpoint")


def training_record(directory: Path) -> dict | None:
    """The training that made the model in `directory`: `seq_len`, `step`, `data_dir`,
    `run_name`, `tokenizer_dir` and `checkpoint` (the step directory the weights come from).
    A step checkpoint's comes from its args.json (the run's flags) and trainer.pt; an export's
    from its training.json; a directory from elsewhere (a plain transformers model) has none:
    None. A missing or damaged file is a one-line UserError naming it."""
    directory = Path(directory)
    if (directory / "trainer.pt").is_file():
        return _checkpoint_record(directory)
    path = directory / TRAINING_RECORD
    if path.exists():
        fix = "export the checkpoint again with convert.py"
        return _checked_record(path, _json_object(path, fix), fix)
    return None


def run_seq_len(directory: Path) -> int | None:
    """The --seq_len the model in `directory` was trained at (a step checkpoint's args.json, an
    export's training.json), or None for a model from elsewhere."""
    record = training_record(directory)
    return None if record is None else record.get("seq_len")


def _checkpoint_record(step_dir: Path) -> dict:
    fix = "copy the whole step directory as training wrote it"
    step = read_trainer_state(step_dir)["step"]
    path = step_dir / "args.json"
    args = _json_object(path, fix)
    record = {key: args[key] for key in ("seq_len", "data_dir", "tokenizer_dir") if key in args}
    record |= {
        "step": step,
        # a run named by default has no --run_name in its flags; its run directory has the name
        "run_name": args.get("run_name") or step_dir.resolve().parent.name,
        "checkpoint": str(step_dir.resolve()),
    }
    return _checked_record(path, record, fix)


def _json_object(path: Path, fix: str) -> dict:
    """The JSON object in `path`, or a UserError naming the file and `fix`."""
    if not path.is_file():
        what = "not a file" if path.exists() else "missing"
        raise UserError(f"{path} is {what}; {fix}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        _check_dict(path, content, "a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is damaged ({type(err).__name__}: {reason[:200]}); {fix}") from err
    except _Damaged as err:
        raise UserError(f"{err}; {fix}") from err
    return content


def _checked_record(path: Path, content: dict, fix: str) -> dict:
    """The record's fields, each of its kind: what reads it (a default max length, a seq_len
    check) trusts them."""
    try:
        record = {
            "seq_len": _field(path, content, "seq_len", lambda v: _is_int(v, 1), "an int >= 1"),
            "step": _field(path, content, "step", lambda v: _is_int(v, 0), "an int >= 0"),
        }
        for key in RECORD_TEXT_FIELDS:
            if key in content:
                _field(path, content, key, lambda v: v is None or isinstance(v, str), "a string")
            record[key] = content.get(key)
    except _Damaged as err:
        raise UserError(f"{err}; {fix}") from err
    return record


# ---------------------------------------------------------------- reading a checkpoint, any format
def read_trainer_state(step_dir: Path, source: str | None = None) -> dict:
    """The checkpoint's trainer.pt, once the checkpoint is found whole (a UserError, starting
    with `source`, says what is missing or cut short otherwise)."""
    try:
        return _check_checkpoint(step_dir)  # trainer.pt read once, for the check and for us
    except _Damaged as err:
        raise UserError(f"{source or f'checkpoint {step_dir}'}: {err}") from err


def read_model_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """The training model's full tensors, on the CPU, with no process group: a sparse layer's
    own (its weight before masking, its scores, its factors), not its effective weight."""
    ckpt_type = read_trainer_state(step_dir)["ckpt_type"]
    if ckpt_type == "full":
        return full_checkpoint_weights(step_dir)
    if ckpt_type == "shard":
        return _read_dcp_model(step_dir)
    return _stitch_local_shards(step_dir)


def _read_dcp_model(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every `model.` tensor of a DCP checkpoint, shaped from its metadata."""
    metadata = TrustedReader(step_dir).read_metadata().state_dict_metadata
    prefix = "model."
    weights = {
        key[len(prefix) :]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for key, entry in metadata.items()
        if key.startswith(prefix)
    }
    dcp_load({"model": weights}, step_dir, no_dist=True)
    return weights


def _stitch_local_shards(step_dir: Path) -> dict[str, torch.Tensor]:
    """Concatenate the dim-0 shards of one replica, in shard order, cut to the full shape."""
    ranks = [load_torch_file(f) for f in sorted(step_dir.glob("rank_*.pt"))]
    replica = sorted(
        (r for r in ranks if r["mesh"].get("replicate", 0) == 0), key=lambda r: r["mesh"]["shard"]
    )
    shapes = replica[0]["shapes"]
    return {
        name: torch.cat([r["model"][name] for r in replica])[: shape[0]].reshape(shape)
        for name, shape in shapes.items()
    }


# ---------------------------------------------------------------- shapes
def saved_shapes(step_dir: Path, ckpt_type: str) -> dict[str, tuple[int, ...]]:
    """Full shapes of the model tensors in a checkpoint, read from metadata only."""
    if ckpt_type == "shard":
        metadata = TrustedReader(step_dir).read_metadata().state_dict_metadata
        prefix = "model."
        return {
            k[len(prefix) :]: tuple(v.size) for k, v in metadata.items() if k.startswith(prefix)
        }
    if ckpt_type == "full":
        shapes: dict[str, tuple[int, ...]] = {}
        for file in transformers_weight_files(step_dir):
            shapes |= _safetensors_shapes(file)
        return _with_own_states(step_dir, shapes, _safetensors_shapes)
    rank0 = load_torch_file(step_dir / "rank_00000.pt")
    return {k: tuple(v) for k, v in rank0["shapes"].items()}


def _safetensors_shapes(file: Path | str) -> dict[str, tuple[int, ...]]:
    with safe_open(str(file), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def check_shapes_match(
    saved: dict[str, tuple[int, ...]],
    model: nn.Module,
    source: str = "checkpoint",
    fresh: Iterable[str] = (),
) -> None:
    """Weights of another model shape are refused with the list of differing tensors; `fresh`
    names parameters the model initializes itself, which the file need not hold."""
    fresh = set(fresh)
    expected = {
        name: tuple(p.shape)
        for name, p in ((canonical_name(n), p) for n, p in model.named_parameters())
        if name not in fresh
    }
    if getattr(model.config, "tie_word_embeddings", False):
        saved = {k: v for k, v in saved.items() if k != "lm_head.weight"}
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    problems = [
        f"{name}: checkpoint {saved.get(name, 'missing')} vs model {shape}"
        for name, shape in expected.items()
        if saved.get(name) != shape
    ]
    problems += [f"{name}: not in the model" for name in saved.keys() - expected.keys()]
    if problems:
        raise UserError(
            f"{source} does not match the model (--config): " + "; ".join(sorted(problems))
        )
