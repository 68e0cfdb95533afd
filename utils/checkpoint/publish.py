"""How a checkpoint reaches the disk: durable writes, publishing a staged directory whole,
deleting by a hidden rename first, and a failed write agreed on by every rank."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from utils.distributed import DistEnv, broadcast_from_main, gather_from_every_rank
from utils.errors import UserError
from utils.files import discard_staging, new_staging, staging_dir


def save_durably(obj: Any, path: Path) -> None:
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


DELETING = "deleting"


def delete_dir(path: Path) -> None:
    """Renamed into a hidden staging directory first: a kill midway leaves a hidden directory
    that nothing reads (and the next prune removes), never a half-deleted checkpoint that still
    looks complete."""
    with staging_dir(path, DELETING) as hidden:
        path.rename(hidden)  # onto the empty directory made for it


# ---------------------------------------------------------------- failures
class Saving:
    """One checkpoint being written. A write that fails on one rank (the metadata and `full`
    weights are written by rank 0 alone) must not leave the others waiting in the next
    collective until the process-group timeout: each rank keeps its failure, `agree` gathers
    them (a collective every rank reaches), and every rank then raises the same error."""

    def __init__(self, step: int, final: Path, env: DistEnv) -> None:
        self.step = step
        self.final = final
        self.staging: Path | None = None  # made by rank 0 (`stage`), then known to every rank
        self.env = env
        self.failure: str | None = None

    def stage(self) -> None:
        """Rank 0 makes the staging directory; every rank learns where it is (a collective)."""
        if self.env.is_main:
            self.run(lambda: setattr(self, "staging", new_staging(self.final)))
        self.agree()
        if self.env.world_size > 1:
            self.staging = broadcast_from_main(self.staging)

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
        if self.env.is_main and self.staging is not None:
            discard_staging(self.staging)
        raise UserError(
            f"could not save step {self.step} in {self.final.parent} ({failed}); "
            "check its free space and permissions, or change --output_dir; "
            "the checkpoints saved before are intact"
        )


def _is_write_failure(err: Exception) -> bool:
    """An error of the file system rather than of the code: OSError, and what torch.save
    (`inline_container`) and safetensors (`I/O error`) make of an OSError they hit."""
    text = str(err)
    return isinstance(err, OSError | UserError) or "inline_container" in text or "I/O error" in text
