"""`Checkpointer`: one run's saves and loads, in every format (see utils/checkpoint/__init__.py),
and the `local` format's per-rank shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, PretrainedConfig

from utils.checkpoint.layout import (
    FULL_STATE,
    FULL_STATE_FROM_RANK0,
    OWN_STATE_SUFFIX,
    TRAINER_KEYS,
    check_shapes_match,
    complete_checkpoints,
    full_checkpoint_weights,
    read_trainer_state,
    save_transformers_weights,
    saved_shapes,
    step_dir_name,
    step_number,
    write_model_files,
)
from utils.checkpoint.publish import DELETING, Saving, delete_dir, fsync_tree, save_durably
from utils.checkpoint.trusted import dcp_load, load_torch_file
from utils.distributed import DistEnv, local_tensor
from utils.errors import UserError
from utils.files import discard_staging, publish_dir, remove_dead_stagings
from utils.model import canonical_name


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
        self._pending: tuple[Any, Saving, Path] | None = None

    # ---------------------------------------------------------------- save
    def save(self, step: int, args: dict[str, Any]) -> Path:
        """Every rank calls this at the same step. A failure to write on any rank (a full disk,
        a lost mount) ends every rank promptly with the same UserError; the checkpoints saved
        before are untouched and the half-written one is removed."""
        self.wait()
        loader_state = self.loader.state_dict()  # a collective: the ranks agree on the data
        # On every rank: a component's state may need a collective; rank 0's is saved.
        component_states = {name: c.state_dict() for name, c in self.components.items()}
        final = self.run_dir / step_dir_name(step)
        saving = Saving(step, final, self.env)
        saving.stage()
        staging = saving.staging
        if self.env.is_main:
            saving.run(lambda: self._stage_metadata(staging, step, args, component_states))
        saving.agree()  # also the barrier: the staging directory is ready for every rank
        rank_state = {"loader": loader_state, "rng": _rng_state()}
        if self.ckpt_type == "local":
            rank_state |= _local_shards(self.model, self.optimizer)
        saving.run(lambda: save_durably(rank_state, staging / f"rank_{self.env.rank:05d}.pt"))
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

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        """Leaving the training loop: a background save is finished and published, also when
        the loop failed (an evaluation, the loader, out of memory) after it was started."""
        if exc_type is None:
            self.wait()
        else:
            self._publish_background_save_alone()

    def _publish_background_save_alone(self) -> None:
        """No collective here: a failure may have reached one rank only. Rank 0's background
        write completes only after every rank's part and DCP's metadata are written (its
        coordinator gathers them), so rank 0 alone can tell that the save is whole."""
        if self._pending is None:
            return
        future, saving, final = self._pending
        self._pending = None
        try:
            future.result()  # on every rank: its part is on disk before the process ends
            if self.env.is_main:
                self._publish_on_main(saving.staging, final)
        except Exception as err:  # the loop's own error is the one to report
            print(f"warning: the background save of step {saving.step} could not be "
                  f"published ({err})", file=sys.stderr, flush=True)  # fmt: skip

    def checkpoint_before(self, step: int) -> Path | None:
        """The newest complete checkpoint of this run written for a step before `step`, a
        background save finished first (a collective: the ranks stop at the same step)."""
        self.wait()
        found = [p for p in complete_checkpoints(self.run_dir) if step_number(p) < step]
        return found[-1] if found else None

    def _stage_metadata(
        self, staging: Path, step: int, args: dict[str, Any], component_states: dict[str, Any]
    ) -> None:
        trainer = {
            "step": step,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "world_size": self.env.world_size,
            "sharding_strategy": self.sharding_strategy,
            "ckpt_type": self.ckpt_type,
        } | component_states
        save_durably(trainer, staging / "trainer.pt")
        (staging / "args.json").write_text(json.dumps(args, indent=2, default=str))
        if self._tokenizer is None and self.tokenizer_dir is not None:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        write_model_files(self.model_config, staging, self._tokenizer)

    def _save_full(self, staging: Path, saving: Saving) -> None:
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
        save_durably(optim_state, staging / "optimizer.pt")

    def _publish(self, saving: Saving, final: Path) -> None:
        saving.agree()  # every rank wrote its part
        if self.env.is_main:
            saving.run(lambda: self._publish_on_main(saving.staging, final))
        saving.agree()
        if self.env.is_main:  # after the save is in: housekeeping that fails costs a warning
            self._prune(step_number(final))

    def _publish_on_main(self, staging: Path, final: Path) -> None:
        fsync_tree(staging)
        publish_dir(staging, final)
        discard_staging(staging)

    def _prune(self, saved_step: int) -> None:
        """--keep_last K: the checkpoint just saved and the K - 1 newest before it stay. Newer
        ones (a run resumed from an earlier step) are not this save's to judge, and stay."""
        for kind in ("partial", DELETING):  # what killed saves and prunes left, of any step
            remove_dead_stagings(self.run_dir, f".step_*.{kind}-*")
        if self.keep_last <= 0:
            return
        older = [p for p in complete_checkpoints(self.run_dir) if step_number(p) < saved_step]
        for old in older[: max(len(older) - (self.keep_last - 1), 0)]:
            try:
                delete_dir(old)
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
        rank_state = load_torch_file(rank_file)
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
        if is_main and model.config.tie_word_embeddings:  # saved once, under the embedding
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        set_model_state_dict(model, weights, options=FULL_STATE_FROM_RANK0)
        if optimizer:
            groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
            optim = {}
            if is_main:
                saved = load_torch_file(step_dir / "optimizer.pt")
                optim = {"state": saved["state"], "param_groups": groups}
            set_optimizer_state_dict(model, optimizer, optim, options=FULL_STATE_FROM_RANK0)
    else:
        _load_local_shards(model, optimizer, rank_state, step_dir)


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
