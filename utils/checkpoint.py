"""Checkpoints: `<run_dir>/step_<N:06d>/`, written to a temporary name and published whole.

`shard` format: torch.distributed.checkpoint (DCP) writes every rank's model and optimizer
shards in parallel, and loads them on any world size or sharding strategy (DCP reshards).
Beside them: `trainer.pt` (step, LR schedule, grad scaler, world size) from rank 0, and
`rank_<r>.pt` per rank (data loader position and leftover tokens, RNG states).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from utils.distributed import DistEnv

STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


class Checkpointer:
    def __init__(self, run_dir: Path, ckpt_type: str, env: DistEnv) -> None:
        self.run_dir = run_dir
        self.ckpt_type = ckpt_type
        self.env = env

    def save(self, step, model, optimizer, scheduler, scaler, loader, args: dict[str, Any]) -> Path:
        """Every rank calls this at the same step. Nothing appears under the final name
        until every rank has written and flushed its part."""
        loader_state = loader.state_dict()  # a collective: all ranks agree on the data position
        final = self.run_dir / step_dir_name(step)
        staging = self.run_dir / f".{step_dir_name(step)}.tmp"
        if self.env.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
        _save_durably(
            {"loader": loader_state, "rng": _rng_state()},
            staging / f"rank_{self.env.rank:05d}.pt",
        )
        if self.env.is_main:
            trainer = {
                "step": step,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "world_size": self.env.world_size,
                "ckpt_type": self.ckpt_type,
            }
            _save_durably(trainer, staging / "trainer.pt")
            (staging / "args.json").write_text(json.dumps(args, indent=2, default=str))
        dist.barrier()
        if self.env.is_main:
            _fsync_tree(staging)
            _publish(staging, final)
        dist.barrier()
        return final

    def load(
        self, step_dir, model, optimizer, scheduler, scaler, loader, *, weights_only: bool = False
    ) -> int:
        """Restore a checkpoint; returns its step. With `weights_only`, the optimizer starts
        fresh while the step count (and so the LR schedule position) is kept."""
        trainer = torch.load(step_dir / "trainer.pt", weights_only=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = (
            {"model": model_state} if weights_only else {"model": model_state, "optim": optim_state}
        )
        dcp.load(state, checkpoint_id=step_dir)
        set_state_dict(
            model,
            [] if weights_only else optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state.get("optim", {}),
            options=StateDictOptions(strict=True),
        )
        scheduler.last_epoch = trainer["step"]
        if not weights_only:
            scheduler.load_state_dict(trainer["scheduler"])
            if scaler and trainer["scaler"]:
                scaler.load_state_dict(trainer["scaler"])
        same_world = trainer["world_size"] == self.env.world_size
        rank_file = step_dir / f"rank_{self.env.rank if same_world else 0:05d}.pt"
        per_rank = torch.load(rank_file, weights_only=True)
        loader.load_state_dict(per_rank["loader"])
        if same_world:
            _set_rng_state(per_rank["rng"])
        return trainer["step"]


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


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(staging: Path, final: Path) -> None:
    """Rename into place; an older checkpoint of the same step is replaced only afterwards."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
