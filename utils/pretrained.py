"""`--init_from PATH`: a run's first weights from a transformers model directory or from one of
this project's checkpoints; step 0, a fresh optimizer and schedule.

Each rank reads only the rows of its own shards: from safetensors files by slicing (the rest
of the file is never read), from `.bin` files through a memory map (`torch.load(...,
weights_only=True, mmap=True)`: only the pages of its rows are touched), from a `shard`
checkpoint through torch.distributed.checkpoint. So a 7B start never holds the whole model in
one process's memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import PretrainedConfig

from utils.checkpoint import (
    check_shapes_match,
    load_torch_file,
    load_weights_and_optimizer,
    read_trainer_state,
    saved_shapes,
    weight_files_problem,
)
from utils.errors import UserError
from utils.model import canonical_name, read_model_config_file

# Config fields that change what the weights compute without changing a shape.
ARCHITECTURE_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
)  # fmt: skip


def check_initial_weights(path: str, model_config: PretrainedConfig) -> None:
    """Refuse, before anything is built, a --init_from that cannot start this model."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(
            f"--init_from {path} is not a directory; give a model directory or step_<N>"
        )
    _check_same_architecture(directory, model_config)
    if _is_checkpoint(directory):
        trainer = read_trainer_state(directory, f"--init_from {directory}")
        if trainer["ckpt_type"] == "local" or trainer.get("slt") is not None:
            raise _start_from_export(directory)
        return
    files = _weight_files(directory)
    if not files:
        raise UserError(
            f"--init_from {directory} holds no model*.safetensors or pytorch_model*.bin weights"
        )
    problem = weight_files_problem(directory, files)
    if problem:
        raise UserError(f"--init_from {directory}: {problem}")


def load_initial_weights(model: nn.Module, path: str, fresh: set[str]) -> None:
    """Fill the (sharded, initialized) model from `path`, checked by check_initial_weights.
    `fresh` names the parameters the model keeps from its own initialization (a supermask's
    scores)."""
    directory = Path(path)
    if not _is_checkpoint(directory):
        _load_transformers_directory(directory, model, fresh)
        return
    if fresh:  # a checkpoint restores every parameter it names, so none can stay fresh
        raise _start_from_export(directory)
    ckpt_type = load_torch_file(directory / "trainer.pt")["ckpt_type"]  # check_initial_weights
    check_shapes_match(saved_shapes(directory, ckpt_type), model, f"--init_from {directory}")
    load_weights_and_optimizer(directory, ckpt_type, model, None, rank_state={})


def _is_checkpoint(directory: Path) -> bool:
    return (directory / "trainer.pt").is_file()


def _start_from_export(step_dir: Path) -> UserError:
    return UserError(
        f"--init_from {step_dir}: start from its export instead (python convert.py "
        "STEP_DIR OUT_DIR, then --init_from OUT_DIR); a checkpoint is taken as it is only "
        "when it is dense, in shard or full format, and the run has no supermask"
    )


def _check_same_architecture(directory: Path, model_config: PretrainedConfig) -> None:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"--init_from {directory} has no config.json; give the directory "
                        "save_pretrained wrote, or a step_<N> checkpoint")  # fmt: skip
    saved = read_model_config_file(config_file, "--init_from")  # the one config validator
    ours = model_config.to_dict()
    differing = [
        f"{field}: {saved.get(field)} vs --config {ours.get(field)}"
        for field in ARCHITECTURE_FIELDS
        if field in saved and saved.get(field) != ours.get(field)
    ]
    if differing:
        raise UserError(
            f"--init_from {directory} is another model than --config ({'; '.join(differing)}); "
            f"train with --config {directory}"
        )


def _load_transformers_directory(directory: Path, model: nn.Module, fresh: set[str]) -> None:
    with ExitStack() as stack:
        tensors = dict(_weight_sources(directory, stack))
        shapes = {name: tuple(source.get_shape()) for name, source in tensors.items()}
        check_shapes_match(shapes, model, f"--init_from {directory}", fresh)
        with torch.no_grad():
            for name, param in model.named_parameters():
                name = canonical_name(name)
                if name not in fresh and name in tensors:  # a tied head has no tensor of its own
                    _copy_own_rows(tensors[name], param)


def _copy_own_rows(source: Any, param: torch.Tensor) -> None:
    """This rank's rows of `source` into `param` (FSDP2 shards whole rows)."""
    if not isinstance(param, DTensor):
        param.copy_(source[:])
        return
    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    if local_shape[0]:
        param.to_local().copy_(source[offset[0] : offset[0] + local_shape[0]])


def _weight_sources(directory: Path, stack: ExitStack) -> Iterator[tuple[str, Any]]:
    """name -> something that slices like a tensor and has `get_shape()`, read lazily."""
    for file in _weight_files(directory):
        if file.suffix == ".safetensors":
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, handle.get_slice(name)
            continue
        state = load_torch_file(file, f"--init_from {file}", map_location="cpu", mmap=True)
        for name, tensor in state.items():
            yield name, _Sliceable(tensor)


def _weight_files(directory: Path) -> list[Path]:
    """save_pretrained's weight files (safetensors first, as transformers prefers them), not
    other files that share a suffix (a Trainer's training_args.bin)."""
    safetensors = sorted(directory.glob("model*.safetensors"))
    return safetensors or sorted(directory.glob("pytorch_model*.bin"))


class _Sliceable:
    """A memory-mapped tensor with safetensors' slice interface."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.tensor[index]
