"""What a checkpoint directory holds and how it is found and read: the `step_<N:06d>` names,
`auto` resume, the checks that a checkpoint is whole, the transformers layout of weights and
model files, and reading a checkpoint of any format without a process group."""

from __future__ import annotations

import contextlib
import copy
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

from utils.checkpoint.trusted import TrustedReader, dcp_load, load_torch_file
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


def checkpoint_problem(step_dir: Path) -> str | None:
    """What is missing or cut short in a checkpoint, read from sizes and file headers only
    (cheap enough for start-up); None when everything is there."""
    archives = [step_dir / "trainer.pt"]
    if not archives[0].is_file():
        return "no trainer.pt: not a complete checkpoint"
    if not zipfile.is_zipfile(archives[0]):
        return f"{archives[0]} is damaged"
    try:  # a zip archive, but maybe not torch's, or not of a trainer state
        trainer = load_torch_file(archives[0])
        world_size, ckpt_type = trainer["world_size"], trainer["ckpt_type"]
    except UserError as err:  # its pickle names more than tensors and plain values
        return str(err)
    except (RuntimeError, EOFError, KeyError, TypeError) as err:
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
    """Every byte range the DCP metadata points to lies inside a file of the checkpoint."""
    if not (step_dir / ".metadata").is_file():
        return f"{step_dir / '.metadata'} is missing"
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


def _safetensors_problem(step_dir: Path) -> str | None:
    if not transformers_weight_files(step_dir):
        return f"no model.safetensors in {step_dir}"
    for path in step_dir.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # safetensors' own error type is not importable everywhere
            return f"{path} is cut short or damaged ({err})"
    return None


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


# ---------------------------------------------------------------- reading a checkpoint, any format
def read_trainer_state(step_dir: Path) -> dict:
    """The checkpoint's trainer.pt, once the checkpoint is found whole (a UserError says what
    is missing or cut short otherwise)."""
    problem = checkpoint_problem(step_dir)
    if problem:
        raise UserError(f"checkpoint {step_dir}: {problem}")
    return load_torch_file(step_dir / "trainer.pt")


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
