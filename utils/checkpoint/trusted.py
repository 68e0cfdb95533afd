"""The trust boundary: every pickle a checkpoint holds is read here, by unpicklers that accept
named record types and plain values only, so that no file can run code when it is read."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from utils.errors import UserError


# ---------------------------------------------------------------- reading DCP with no code
def dcp_load(state: dict, step_dir: Path, **kwargs: Any) -> None:
    """torch.distributed.checkpoint.load, reading nothing that can run code. DCP reads a `shard`
    checkpoint's `.metadata` with plain pickle and its non-tensor entries (optimizer settings)
    with torch.load's full unpickler (weights-only mode off): a crafted checkpoint would run
    code on every rank. Here the metadata may hold DCP's own record types only, and the
    entries plain values."""
    reader = TrustedReader(step_dir)
    try:
        # First here: inside dcp.load a refusal would come out as DCP's "metadata is None".
        reader.read_metadata()
        dcp.load(state, storage_reader=reader, planner=TrustedPlanner(), **kwargs)
    except (UserError, pickle.UnpicklingError) as err:
        raise UserError(f"checkpoint {step_dir}: {err}") from err  # resume, init or export
    except CheckpointException as err:
        exc = next(iter(err.failures.values()))[0]
        if isinstance(exc, UserError | pickle.UnpicklingError):
            raise UserError(f"checkpoint {step_dir}: {exc}") from err
        raise


class TrustedReader(dcp.FileSystemReader):
    def __init__(self, step_dir: Path) -> None:
        super().__init__(str(step_dir))
        self.step_dir = step_dir
        self._metadata: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """The checkpoint's metadata, checked once (DCP asks for it again)."""
        if self._metadata is None:
            with (self.step_dir / ".metadata").open("rb") as file:
                MetadataUnpickler(file).load()  # refuses anything but DCP's record types
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class MetadataUnpickler(pickle.Unpickler):
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


class TrustedPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: Any) -> None:
        torch.load(value, weights_only=True)  # refuses what plain values would not need
        value.seek(0)
        super().load_bytes(read_item, value)
