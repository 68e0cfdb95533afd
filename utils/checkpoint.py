"""Checkpoints: `<run_dir>/step_<N:06d>/`, staged under a hidden name and published whole.

Every format writes, beside the weights: `config.json` + `generation_config.json` + the
tokenizer files (so the directory is a transformers model directory once it holds weights in
that layout), `trainer.pt` (step, grad scaler, world size, format, slt state) from rank 0,
`args.json`, and `rank_<r>.pt` per rank (data loader position and leftover tokens, RNG).

Weights and optimizer, by `--ckpt_type`:
- `shard`: torch.distributed.checkpoint (DCP); every rank writes its own shards in parallel;
  loads on any world size or sharding strategy (DCP reshards). `--async_save` overlaps the
  write with training.
- `full`: consolidated on rank 0: `model.safetensors` (transformers layout, loadable with
  `from_pretrained`) and `optimizer.pt`; loads on any world size (rank 0 reads, broadcasts).
- `local`: each rank's own shards of weights and optimizer in its `rank_<r>.pt`; the fastest,
  but it resumes only with the same world size and sharding strategy.

A sparse (slt) run also stores its thresholds and config in `trainer.pt`; its `full`
checkpoints hold the effective dense weights in `model.safetensors` and the sparse layers' own
tensors, which training resumes from, in `slt_state.safetensors`.

A directory is published under its final name only after every rank wrote and fsynced its
part, so a crash mid-write leaves at most a hidden `.step_<N>.tmp` that nothing reads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

from utils.distributed import DistEnv, gather_from_every_rank, local_tensor
from utils.errors import UserError
from utils.model import canonical_name

STEP_DIR = re.compile(r"^step_(\d+)$")
OWN_STATE_SUFFIX = "_state.safetensors"  # a component's tensors in a `full` checkpoint
# What every trainer.pt holds; any other key is a component's state ("scheduler": older runs).
TRAINER_KEYS = {"step", "scaler", "world_size", "sharding_strategy", "ckpt_type", "scheduler"}
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


def resolve_resume_dir(resume_dir: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, checked whole before anything is built (a UserError
    names its first missing or cut-short file); `auto`: the run's newest complete
    checkpoint, or None to start fresh."""
    if resume_dir is None:
        return None
    if resume_dir != "auto":
        problem = checkpoint_problem(Path(resume_dir))
        if problem:
            raise UserError(f"--resume_dir {resume_dir}: {problem}; give an intact step_<N>")
        return Path(resume_dir)
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    problem = checkpoint_problem(found[-1])
    if problem:
        intact = next((p for p in reversed(found[:-1]) if checkpoint_problem(p) is None), None)
        fallback = (
            f"resume from {intact} with --resume_dir {intact}"
            if intact
            else "none before it is intact"
        )
        raise UserError(
            f"--resume_dir auto: the newest checkpoint {found[-1]}: {problem}; {fallback}"
        )
    return found[-1]


def checkpoint_problem(step_dir: Path) -> str | None:
    """What is missing or cut short in a checkpoint, read from sizes and file headers only
    (cheap enough for start-up); None when everything is there."""
    archives = [step_dir / "trainer.pt"]
    if not archives[0].is_file():
        return "no trainer.pt: not a complete checkpoint"
    if not zipfile.is_zipfile(archives[0]):
        return f"{archives[0]} is damaged"
    try:  # a zip archive, but maybe not torch's, or not of a trainer state
        trainer = torch.load(archives[0], weights_only=True)
        world_size, ckpt_type = trainer["world_size"], trainer["ckpt_type"]
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{archives[0]} is damaged ({type(err).__name__}: {reason})"
    archives += [step_dir / f"rank_{rank:05d}.pt" for rank in range(world_size)]
    if ckpt_type == "full":
        archives.append(step_dir / "optimizer.pt")
    for path in archives:
        if not path.is_file():
            return f"{path} is missing"
        if not zipfile.is_zipfile(path):
            return f"{path} is cut short or damaged"
    if ckpt_type == "shard":
        return _dcp_files_problem(step_dir)
    if ckpt_type == "full":
        return _safetensors_problem(step_dir)
    return None


def _dcp_files_problem(step_dir: Path) -> str | None:
    """Every byte range the DCP metadata points to lies inside its file."""
    if not (step_dir / ".metadata").is_file():
        return f"{step_dir / '.metadata'} is missing"
    try:
        storage = _TrustedReader(step_dir).read_metadata().storage_data
    except (UserError, pickle.UnpicklingError, EOFError) as err:
        return f"{step_dir / '.metadata'} is unreadable ({err})"
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size < end:
            return f"{path} is cut short ({path.stat().st_size} of {end} bytes)"
    return None


def _safetensors_problem(step_dir: Path) -> str | None:
    if not _transformers_weight_files(step_dir):
        return f"no model.safetensors in {step_dir}"
    for path in step_dir.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # safetensors' own error type is not importable everywhere
            return f"{path} is cut short or damaged ({err})"
    return None


class Checkpointer:
    """One run's checkpoints. Built once with what it saves and restores: the (sharded) model
    and optimizer, the fp16 grad scaler, the data loader, the RNG, and `components`, named
    objects with a state of their own (the sparse layers', under "slt"); then `save(step,
    args)` and `load(step_dir)`.

    A component has `state_dict()` and `load_state_dict(state, source)`, which is given None
    for a checkpoint without its state (it decides whether that resumes). One whose layers
    have other tensors than a transformers model also has `export_weights(full_state) ->
    (dense_state, own_state)`: a `full` checkpoint holds the dense weights in
    model.safetensors and its own tensors, which training resumes from, in
    `<name>_state.safetensors`."""

    def __init__(
        self,
        run_dir: Path,
        ckpt_type: str,
        env: DistEnv,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        loader: Any,
        model_config: PretrainedConfig,
        tokenizer_dir: Path | None,
        sharding_strategy: str,
        keep_last: int = 0,
        async_save: bool = False,
        components: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.ckpt_type = ckpt_type
        self.env = env
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.loader = loader
        self.model_config = model_config
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None  # loaded on rank 0 at the first save
        self.sharding_strategy = sharding_strategy
        self.keep_last = keep_last
        self.async_save = async_save
        self.components = components or {}
        # Background DCP writes need their own group so they never interleave with training's.
        self._async_group = dist.new_group(backend="gloo") if async_save else None
        self._pending: tuple[Any, _Saving, Path] | None = None

    # ---------------------------------------------------------------- save
    def save(self, step: int, args: dict[str, Any]) -> Path:
        """Every rank calls this at the same step. A failure to write on any rank (a full disk,
        a lost mount) ends every rank promptly with the same UserError; the checkpoints saved
        before are untouched and the half-written one is removed."""
        self.wait()
        loader_state = self.loader.state_dict()  # a collective: the ranks agree on the data
        final = self.run_dir / step_dir_name(step)
        staging = self.run_dir / f".{final.name}.tmp"
        saving = _Saving(step, staging, self.env)
        if self.env.is_main:
            saving.run(lambda: self._stage_metadata(staging, step, args))
        saving.agree()  # also the barrier: the staging directory exists for every rank
        rank_state = {"loader": loader_state, "rng": _rng_state()}
        if self.ckpt_type == "local":
            rank_state |= _local_shards(self.model, self.optimizer)
        saving.run(lambda: _save_durably(rank_state, staging / f"rank_{self.env.rank:05d}.pt"))
        if self.ckpt_type == "full":
            self._save_full(staging, saving)
        elif self.ckpt_type == "shard":
            saving.agree()
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optim": optim_state}
            if self.async_save:
                future = dcp.async_save(
                    state, checkpoint_id=staging, process_group=self._async_group
                )
                self._pending = (future, saving, final)
                return final
            saving.run_collective(lambda: dcp.save(state, checkpoint_id=staging))
        self._publish(saving, final)
        return final

    def wait(self) -> None:
        """Finish and publish a background save (before the next one, and at the end)."""
        if self._pending is None:
            return
        future, saving, final = self._pending
        self._pending = None
        saving.run_collective(future.result)
        self._publish(saving, final)

    def checkpoint_before(self, step: int) -> Path | None:
        """The newest complete checkpoint of this run written for a step before `step`, a
        background save finished first (a collective: the ranks stop at the same step)."""
        self.wait()
        found = [p for p in complete_checkpoints(self.run_dir) if step_number(p) < step]
        return found[-1] if found else None

    def _stage_metadata(self, staging: Path, step: int, args: dict[str, Any]) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        trainer = {
            "step": step,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "world_size": self.env.world_size,
            "sharding_strategy": self.sharding_strategy,
            "ckpt_type": self.ckpt_type,
        } | {name: component.state_dict() for name, component in self.components.items()}
        _save_durably(trainer, staging / "trainer.pt")
        (staging / "args.json").write_text(json.dumps(args, indent=2, default=str))
        if self._tokenizer is None and self.tokenizer_dir is not None:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        write_model_files(self.model_config, staging, self._tokenizer)

    def _save_full(self, staging: Path, saving: _Saving) -> None:
        model_state = get_model_state_dict(self.model, options=FULL_STATE)  # collectives
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE)
        if self.env.is_main:
            saving.run(lambda: self._write_full(model_state, optim_state, staging))

    def _write_full(self, model_state: dict, optim_state: dict, staging: Path) -> None:
        for name, component in self.components.items():
            if hasattr(component, "export_weights"):
                model_state, own = component.export_weights(model_state)
                save_file(own, str(staging / f"{name}{OWN_STATE_SUFFIX}"))
        save_transformers_weights(self.model_config, model_state, staging)
        _save_durably(optim_state, staging / "optimizer.pt")

    def _publish(self, saving: _Saving, final: Path) -> None:
        saving.agree()  # every rank wrote its part
        if self.env.is_main:
            saving.run(lambda: self._publish_on_main(saving.staging, final))
        saving.agree()
        if self.env.is_main:  # after the save is in: housekeeping that fails costs a warning
            self._prune(step_number(final))

    def _publish_on_main(self, staging: Path, final: Path) -> None:
        fsync_tree(staging)
        replace_dir(staging, final)

    def _prune(self, saved_step: int) -> None:
        """--keep_last K: the checkpoint just saved and the K - 1 newest before it stay. Newer
        ones (a run resumed from an earlier step) are not this save's to judge, and stay."""
        for leftover in self.run_dir.glob(".step_*.deleting"):  # a prune that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        if self.keep_last <= 0:
            return
        older = [p for p in complete_checkpoints(self.run_dir) if step_number(p) < saved_step]
        for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
            try:
                _delete_dir(old)
            except OSError as err:
                print(f"warning: --keep_last {self.keep_last}: could not delete {old} ({err}); "
                      "delete it by hand", file=sys.stderr, flush=True)  # fmt: skip

    # ---------------------------------------------------------------- load
    def load(self, step_dir: Path, *, skip_optimizer: bool = False) -> int:
        """Restore a checkpoint of any format; returns its step. With `skip_optimizer` the
        optimizer starts fresh while the step count (hence the learning rate) is kept."""
        trainer = read_trainer_state(step_dir)
        same_world = trainer["world_size"] == self.env.world_size
        self._check_components(step_dir, trainer)
        for name, component in self.components.items():  # first: its refusal is the clearest
            component.load_state_dict(trainer.get(name), str(step_dir))
        check_shapes_match(saved_shapes(step_dir, trainer["ckpt_type"]), self.model)
        if trainer["ckpt_type"] == "local":
            self._check_local_compatible(step_dir, trainer)
        rank_file = step_dir / f"rank_{self.env.rank if same_world else 0:05d}.pt"
        rank_state = torch.load(rank_file, weights_only=True)
        optimizer = None if skip_optimizer else self.optimizer
        load_weights_and_optimizer(
            step_dir, trainer["ckpt_type"], self.model, optimizer, rank_state
        )
        if not skip_optimizer and self.scaler and trainer["scaler"]:
            self.scaler.load_state_dict(trainer["scaler"])
        self.loader.load_state_dict(rank_state["loader"])
        if same_world:
            _set_rng_state(rank_state["rng"])
        return trainer["step"]

    def _check_components(self, step_dir: Path, trainer: dict) -> None:
        """State of a component this run does not have (a sparse run resumed as dense)."""
        for name in trainer.keys() - TRAINER_KEYS - self.components.keys():
            if trainer[name] is not None:
                raise UserError(
                    f"--resume_dir {step_dir} was trained with --enable_{name}; resume with the "
                    f"same --enable_{name} flags, or export it to a dense model with convert.py"
                )

    def _check_local_compatible(self, step_dir: Path, trainer: dict) -> None:
        saved = (trainer["world_size"], trainer["sharding_strategy"])
        if saved != (self.env.world_size, self.sharding_strategy):
            raise UserError(
                f"--resume_dir {step_dir} is a 'local' checkpoint of world size {saved[0]} "
                f"with {saved[1]}; it resumes only on the same (now {self.env.world_size}, "
                f"{self.sharding_strategy}). Convert it with convert.py or save "
                "with --ckpt_type shard/full"
            )


def load_weights_and_optimizer(step_dir: Path, ckpt_type: str, model, optimizer, rank_state):
    """Fill the sharded model (and optimizer unless None) from a checkpoint directory.

    The optimizer takes its moments and step counts from the checkpoint and its hyperparameters
    (betas, eps, weight decay, each group's learning-rate scale) from this run's flags, as the
    learning rate already does: a checkpoint written before a hyperparameter existed still
    loads, and the flags a run is resumed with are the ones it trains with."""
    if ckpt_type == "shard":
        model_state, optim_state = get_state_dict(model, optimizer or [])
        moments = {"optim": {"state": optim_state["state"]}} if optimizer else {}
        state = {"model": model_state} | moments
        dcp_load(state, step_dir)
        if optimizer:
            optim_state["state"] = state["optim"]["state"]
        set_state_dict(
            model, optimizer or [], model_state_dict=state["model"], optim_state_dict=optim_state
        )
    elif ckpt_type == "full":
        is_main = dist.get_rank() == 0
        weights = full_checkpoint_weights(step_dir) if is_main else {}
        set_model_state_dict(model, weights, options=FULL_STATE_FROM_RANK0)
        if optimizer:
            groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
            optim = {}
            if is_main:
                saved = torch.load(step_dir / "optimizer.pt", weights_only=True)
                optim = {"state": saved["state"], "param_groups": groups}
            set_optimizer_state_dict(model, optimizer, optim, options=FULL_STATE_FROM_RANK0)
    else:
        _load_local_shards(model, optimizer, rank_state, step_dir)


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
    the tokenizer as transformers saves it (chat template and added tokens included)."""
    config = inference_config(config)
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def load_transformers_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in _transformers_weight_files(step_dir):
        weights |= load_file(str(file))
    return weights


def _transformers_weight_files(step_dir: Path) -> list[Path]:
    return sorted(f for f in step_dir.glob("*.safetensors") if f not in _own_state_files(step_dir))


def _own_state_files(step_dir: Path) -> list[Path]:
    return sorted(step_dir.glob(f"*{OWN_STATE_SUFFIX}"))


def full_checkpoint_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The training model's tensors in a `full` checkpoint (a sparse layer's own, from its
    component's file)."""
    return _with_own_states(step_dir, load_transformers_weights(step_dir), load_file)


def _with_own_states(step_dir: Path, dense: dict[str, Any], read: Callable) -> dict[str, Any]:
    """What a `full` checkpoint holds for the training model (tensors or their shapes, by
    `read`): a module whose tensors a component file holds takes them from there, not from its
    exported dense weight."""
    for path in _own_state_files(step_dir):
        own = read(str(path))
        modules = {key.rpartition(".")[0] for key in own}
        dense = {k: v for k, v in dense.items() if k.rpartition(".")[0] not in modules} | own
    return dense


# ---------------------------------------------------------------- reading a checkpoint, any format
def read_trainer_state(step_dir: Path) -> dict:
    """The checkpoint's trainer.pt, once the checkpoint is found whole (a UserError says what
    is missing or cut short otherwise)."""
    problem = checkpoint_problem(step_dir)
    if problem:
        raise UserError(f"checkpoint {step_dir}: {problem}")
    return torch.load(step_dir / "trainer.pt", weights_only=True)


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
    metadata = _TrustedReader(step_dir).read_metadata().state_dict_metadata
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
    ranks = [torch.load(f, weights_only=True) for f in sorted(step_dir.glob("rank_*.pt"))]
    replica = sorted(
        (r for r in ranks if r["mesh"].get("replicate", 0) == 0), key=lambda r: r["mesh"]["shard"]
    )
    shapes = replica[0]["shapes"]
    return {
        name: torch.cat([r["model"][name] for r in replica])[: shape[0]].reshape(shape)
        for name, shape in shapes.items()
    }


# ---------------------------------------------------------------- reading DCP with no code
def dcp_load(state: dict, step_dir: Path, **kwargs: Any) -> None:
    """torch.distributed.checkpoint.load, reading nothing that can run code. DCP reads a `shard`
    checkpoint's `.metadata` with plain pickle and its non-tensor entries (optimizer settings)
    with torch.load's full unpickler (weights-only mode off): a crafted checkpoint would run
    code on every rank. Here the metadata may hold DCP's own record types only, and the
    entries plain values."""
    reader = _TrustedReader(step_dir)
    try:
        # First here: inside dcp.load a refusal would come out as DCP's "metadata is None".
        reader.read_metadata()
        dcp.load(state, storage_reader=reader, planner=_TrustedPlanner(), **kwargs)
    except (UserError, pickle.UnpicklingError) as err:
        raise UserError(f"checkpoint {step_dir}: {err}") from err  # resume, init or export
    except CheckpointException as err:
        exc = next(iter(err.failures.values()))[0]
        if isinstance(exc, UserError | pickle.UnpicklingError):
            raise UserError(f"checkpoint {step_dir}: {exc}") from err
        raise


class _TrustedReader(dcp.FileSystemReader):
    def __init__(self, step_dir: Path) -> None:
        super().__init__(str(step_dir))
        self.step_dir = step_dir
        self._metadata: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """The checkpoint's metadata, checked once (DCP asks for it again)."""
        if self._metadata is None:
            with (self.step_dir / ".metadata").open("rb") as file:
                _MetadataUnpickler(file).load()  # refuses anything but DCP's record types
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _MetadataUnpickler(pickle.Unpickler):
    """What a `.metadata` file of torch.distributed.checkpoint is made of, and nothing else."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        known = module in self.MODULES or (module, name) in self.NAMES
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not (known or dtype):
            raise UserError(
                f"its .metadata refers to {module}.{name}, which a checkpoint never holds: "
                "it may run code, so it is not read; resume only from checkpoints you trust"
            )
        return super().find_class(module, name)


class _TrustedPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: Any) -> None:
        torch.load(value, weights_only=True)  # refuses what plain values would not need
        value.seek(0)
        super().load_bytes(read_item, value)


# ---------------------------------------------------------------- local format
def _local_shards(model: nn.Module, optimizer) -> dict[str, Any]:
    """This rank's slices of every parameter and optimizer state, as plain tensors."""
    params = {
        canonical_name(n): local_tensor(p).detach().cpu() for n, p in model.named_parameters()
    }
    shapes = {canonical_name(n): list(p.shape) for n, p in model.named_parameters()}
    optim = optimizer.state_dict()
    optim_state = {
        index: {key: local_tensor(value).cpu() for key, value in entry.items()}
        for index, entry in optim["state"].items()
    }
    return {
        "model": params,
        "shapes": shapes,
        "mesh": _mesh_coordinates(model),
        "optim": {"state": optim_state, "param_groups": optim["param_groups"]},
    }


def _load_local_shards(model: nn.Module, optimizer, rank_state: dict, step_dir: Path) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            local_tensor(param).copy_(rank_state["model"][canonical_name(name)])
    if optimizer is None:
        return
    saved = rank_state["optim"]
    if [len(g["params"]) for g in saved["param_groups"]] != [
        len(g["params"]) for g in optimizer.param_groups
    ]:  # its state is numbered in group order, which another grouping changes
        raise UserError(
            f"--resume_dir {step_dir} is a 'local' checkpoint whose optimizer groups its "
            "parameters otherwise (--slt_lr, --slt_weight_decay); resume with the same flags, "
            "or with --skip_optimizer"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    hyperparameters = [
        {key: value for key, value in group.items() if key != "params"}
        for group in optimizer.param_groups
    ]
    state = {
        index: {key: _like_param(value, params[index]) for key, value in entry.items()}
        for index, entry in saved["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    for group, values in zip(optimizer.param_groups, hyperparameters, strict=True):
        group.update(values)


def _like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Optimizer moments are sharded like their parameter; scalars such as `step` are not."""
    if isinstance(param, DTensor) and value.shape == param.to_local().shape and value.ndim > 0:
        return DTensor.from_local(
            value.to(param.device), param.device_mesh, param.placements,
            shape=param.shape, stride=param.stride(),
        )  # fmt: skip
    return value


def _mesh_coordinates(model: nn.Module) -> dict[str, int]:
    """Where this rank sits in the sharding mesh, so a converter can stitch shards."""
    param = next(model.parameters())
    if not isinstance(param, DTensor):
        return {}
    mesh = param.device_mesh
    return dict(zip(mesh.mesh_dim_names, mesh.get_coordinate(), strict=True)) | {
        f"{name}_size": size for name, size in zip(mesh.mesh_dim_names, mesh.shape, strict=True)
    }


# ---------------------------------------------------------------- shapes
def saved_shapes(step_dir: Path, ckpt_type: str) -> dict[str, tuple[int, ...]]:
    """Full shapes of the model tensors in a checkpoint, read from metadata only."""
    if ckpt_type == "shard":
        metadata = _TrustedReader(step_dir).read_metadata().state_dict_metadata
        prefix = "model."
        return {
            k[len(prefix) :]: tuple(v.size) for k, v in metadata.items() if k.startswith(prefix)
        }
    if ckpt_type == "full":
        shapes: dict[str, tuple[int, ...]] = {}
        for file in _transformers_weight_files(step_dir):
            shapes |= _safetensors_shapes(file)
        return _with_own_states(step_dir, shapes, _safetensors_shapes)
    rank0 = torch.load(step_dir / "rank_00000.pt", weights_only=True)
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


# ---------------------------------------------------------------- files
def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_durably(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _delete_dir(path: Path) -> None:
    """Renamed to a hidden name first: a kill midway leaves a hidden directory that nothing
    reads, never a half-deleted checkpoint that still looks complete."""
    hidden = path.with_name(f".{path.name}.deleting")
    path.rename(hidden)
    shutil.rmtree(hidden)


def replace_dir(staging: Path, final: Path) -> None:
    """Rename into place; an older directory of the same name goes only once the new is in."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- failures
class _Saving:
    """One checkpoint being written. A write that fails on one rank (the metadata and `full`
    weights are written by rank 0 alone) must not leave the others waiting in the next
    collective until the process-group timeout: each rank keeps its failure, `agree` gathers
    them (a collective every rank reaches), and every rank then raises the same error."""

    def __init__(self, step: int, staging: Path, env: DistEnv) -> None:
        self.step = step
        self.staging = staging
        self.env = env
        self.failure: str | None = None

    def run(self, write: Callable[[], Any]) -> None:
        """This rank's part; a write failure is kept for `agree`, a bug propagates."""
        if self.failure is not None:
            return
        try:
            write()
        except Exception as err:
            if not _is_write_failure(err):
                raise
            self.failure = f"rank {self.env.rank}: {err}"

    def run_collective(self, write: Callable[[], Any]) -> None:
        """A collective write (DCP), which raises the same error on every rank itself."""
        try:
            write()
        except CheckpointException as err:
            failures = err.failures.items()  # rank -> (exception, its stack)
            self.failure = "; ".join(f"rank {rank}: {exc}" for rank, (exc, _) in failures)
        self.agree()

    def agree(self) -> None:
        failures = (
            [self.failure] if self.env.world_size == 1 else gather_from_every_rank(self.failure)
        )
        failed = next((failure for failure in failures if failure), None)
        if failed is None:
            return
        if self.env.is_main:
            shutil.rmtree(self.staging, ignore_errors=True)
        raise UserError(
            f"could not save step {self.step} in {self.staging.parent} ({failed}); "
            "check its free space and permissions, or change --output_dir; "
            "the checkpoints saved before are intact"
        )


def _is_write_failure(err: Exception) -> bool:
    """An error of the file system rather than of the code: OSError, and what torch.save
    (`inline_container`) and safetensors (`I/O error`) make of an OSError they hit."""
    text = str(err)
    return isinstance(err, OSError) or "inline_container" in text or "I/O error" in text
