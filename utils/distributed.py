"""Process-group setup: one process per device, launched by torchrun or as plain python."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from utils.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world, its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(self.world_size // self.local_world_size, 1)

    @property
    def layout(self) -> list[int]:
        """[nodes, ranks per node]: streaming deals samples to (node, rank on node), so the
        same world size on another layout gives each global rank other samples."""
        return [self.num_nodes, self.local_world_size]


def environment_world() -> DistEnv:
    """The world torchrun's environment variables describe (a world of one without them),
    with no process group needed: what the data loader reads, as streaming does."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


_SINGLE_PROCESS_WORLD = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
_environment_before: dict[str, str | None] = {}


def _default_to_single_process() -> bool:
    """`python train.py` without torchrun (which always sets these four; a shell on a cluster
    may export MASTER_ADDR alone): a world of one. The loader reads these variables too;
    `shutdown` puts back what was there before, since a later library in the same process
    (accelerate) would take WORLD_SIZE without MASTER_ADDR for a torchrun launch and fail to
    join it."""
    if all(name in os.environ for name in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False
    for name, value in _SINGLE_PROCESS_WORLD.items():
        _environment_before.setdefault(name, os.environ.get(name))
        os.environ[name] = value
    return True


def _store_of_this_attempt() -> dict[str, Any]:
    """Under torchrun, the rendezvous store with a namespace of its own per restart attempt.

    torchrun hands its workers one TCPStore and keeps it across `--max-restarts` rounds (always
    with a static rendezvous; with c10d and --standalone unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). A restarted group would read the killed group's
    keys there, the gloo/NCCL addresses of dead processes, and fail to connect or hang
    (pytorch/pytorch#135712). Keys under `attempt_<TORCHELASTIC_RESTART_COUNT>/` are new."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://"))
    return {
        "store": dist.PrefixStore(f"attempt_{attempt}", store),
        "rank": rank,
        "world_size": world_size,
    }


def init_distributed() -> DistEnv:
    """Join the process group: NCCL on one GPU per local rank, gloo on CPU.

    On GPU the group also gets a gloo backend for CPU tensors (loader state, metrics
    gathered on the host), so no collective ever needs a device round trip for them.
    """
    alone = _default_to_single_process()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        # Alone, an in-memory store: no port to pick, so none to lose to another process.
        alone_store = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        store = alone_store if alone else _store_of_this_attempt()
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None, **store
        )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        device=device,
    )


def shard_ways(env: DistEnv, sharding_strategy: str) -> int:
    """Into how many shards each parameter is cut (the mesh's shard dimension below)."""
    return {"hybrid_shard": env.local_world_size, "no_shard": 1}.get(
        sharding_strategy, env.world_size
    )


def build_mesh(env: DistEnv, sharding_strategy: str) -> DeviceMesh:
    """The data-parallel mesh for FSDP2: 1-D for sharding, 2-D (replicate, shard) otherwise.

    `hybrid_shard` shards within a node and replicates across nodes; `no_shard` replicates
    everywhere (a shard dimension of size 1).
    """
    device_type = env.device.type
    shards = shard_ways(env, sharding_strategy)
    if sharding_strategy in ("hybrid_shard", "no_shard"):
        shape, names = (env.world_size // shards, shards), ("replicate", "shard")
    else:
        shape, names = (shards,), ("shard",)
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank (e.g. a run name holding a timestamp)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_from_every_rank(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (a collective every rank reaches)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown() -> None:
    """Destroy the process group once nothing else holds it. A group kept alive by a leftover
    reference cycle (a sharded model, a device mesh) is freed only at interpreter exit, where
    its gloo worker thread can still be releasing a finished collective and abort the process
    ("terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    while _environment_before:
        name, value = _environment_before.popitem()
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextmanager
def command_group() -> Iterator[None]:
    """The body of an evaluation command, plain or under torchrun: a process group it joins
    (WORLD_SIZE set, no caller's group) is left at the end, and a file it cannot read is a
    one-line UserError (the command wraps this in `exit_on_user_error`)."""
    joins_a_group = "WORLD_SIZE" in os.environ and not dist.is_initialized()
    try:
        yield
    except OSError as err:
        raise UserError(str(err)) from err
    finally:
        if joins_a_group:  # not a caller's group: it leaves with it
            shutdown()
