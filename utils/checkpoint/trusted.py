"""The trust boundary: every pickle a checkpoint holds is read here, by unpicklers that accept
named record types and plain values only, so that no file can run code when it is read."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from utils.errors import UserError


# ---------------------------------------------------------------- torch files
def load_torch_file(file: Path | str | IO[bytes], what: str | None = None, **kwargs: Any) -> Any:
    """torch.load(file, weights_only=True, **kwargs): tensors and plain values, or a one-line
    UserError naming `what` (by default the file) when its pickle names anything else."""
    try:
        with warnings.catch_warnings():
            # torch warns of a pickle protocol it does not write, then refuses the file anyway
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph; what it refused is in the error it was raised from
        reason = str(err.__context__ or err).strip().partition("\n")[0]
        raise UserError(
            f"{what or file} holds more than tensors and plain values ({_printable(reason)}): "
            "it may run code, so it is not read; use only files you trust"
        ) from err


def _printable(text: str) -> str:
    """Text taken from a file, as one line of at most 200 characters for an error message."""
    return text.encode("unicode_escape").decode()[:200]


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
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's `.metadata`, unpickled once by MetadataUnpickler and kept: DCP asks
        for it again (a second read with DCP's plain pickle would run a file swapped in
        meanwhile). DCP's fallback to per-rank metadata (`rank=`) is never taken: a refusal
        here is final."""
        if self._metadata is None:
            with (self.step_dir / ".metadata").open("rb") as file:
                metadata = MetadataUnpickler(file).load()
            if not isinstance(metadata, Metadata):
                raise UserError(
                    f"its .metadata holds a {type(metadata).__name__}, not DCP's metadata"
                )
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata
            self._metadata = metadata
        return self._metadata


# What DCP's metadata is made of, as (module, name) pairs: the globals a pickled `.metadata`
# names (tensors of every dtype, optimizer settings, the path it was saved under), and nothing
# else. A module alone would not do: pickle looks a dotted name up attribute by attribute, so
# `os.system` "inside" an allowed module reaches `os`. None of these names holds a dot.
DCP_RECORDS = (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
)  # fmt: skip
METADATA_GLOBALS = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in DCP_RECORDS}
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each entry lies
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # TensorProperties' layout, by its name
        ("pathlib", "PosixPath"),  # the checkpoint_id it was saved with
        ("pathlib._local", "PosixPath"),  # the same, pickled by Python 3.13
        ("collections", "OrderedDict"),
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """What a `.metadata` file of torch.distributed.checkpoint is made of, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in METADATA_GLOBALS:
            raise UserError(
                f"its .metadata refers to {_printable(f'{module}.{name}')}, which a checkpoint "
                "never holds: it may run code, so it is not read; resume only from checkpoints "
                "you trust"
            )
        return super().find_class(module, name)


class TrustedPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: Any) -> None:
        # DCP's own load_bytes unpickles with weights-only mode off: this in-memory copy is
        # read first with it on, which refuses what plain values would not need.
        load_torch_file(value, f"its entry {read_item.dest_index.fqn}")
        value.seek(0)
        super().load_bytes(read_item, value)
