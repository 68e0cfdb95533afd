"""Checkpoint save/load time per format against plain torch.save/torch.load, in one run.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.checkpoint \
        [--config llama-130m] [--layers 8] [--repeats 1] [--json]

A Llama (the llama-130m shape cut to 8 layers: ~106M parameters) is sharded with FSDP2
(full_shard) over the ranks and takes one AdamW step, so the optimizer holds its two moments.
Each format is saved and loaded through `utils.checkpoint.Checkpointer`, the code training uses;
the baseline is every rank's `torch.save` of the same local shards (model and optimizer) and
`torch.load(weights_only=True)` of them. Times are the slowest rank's, between barriers; with
`--repeats N` the best of N. Files are read back right after being written, so loads come from
the page cache for every row alike. The stall table times `shard` saves with and without
`async_save`: how long `save` blocks training, and how long until the checkpoint is published.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from utils.checkpoint import Checkpointer
from utils.distributed import (
    DistEnv,
    broadcast_from_main,
    build_mesh,
    init_distributed,
    local_tensor,
    shutdown,
)
from utils.model import build_meta_model, count_parameters, init_weights, load_model_config
from utils.optim import build_optimizer
from utils.parallelize import parallelize_model

FORMATS = ("shard", "full", "local")
STRATEGY = "full_shard"
SEQ_LEN = 128


class StubLoader:
    """The two methods Checkpointer needs of a data loader; the position is all it stores."""

    def __init__(self, rank: int) -> None:
        self.state = {"position": rank}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def slowest_rank(seconds: float) -> float:
    """A collective operation finishes when its slowest rank does."""
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Best over `repeats` of the slowest rank's time; barriers keep ranks from overlapping runs."""
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        dist.barrier()
        best = min(best, slowest_rank(elapsed))
    return best


def tree_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def build_training(env: DistEnv, config_name: str, layers: int):
    """The sharded model and optimizer, after one step so AdamW's moments exist."""
    config = load_model_config(config_name, tokenizer_vocab=0)
    config.num_hidden_layers = layers
    model = build_meta_model(config, "sdpa")
    model = parallelize_model(
        model,
        build_mesh(env, STRATEGY),
        sharding_strategy=STRATEGY,
        param_dtype=torch.float32,
    )
    init_weights(model, seed=0, device=env.device)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    tokens = torch.randint(0, config.vocab_size, (1, SEQ_LEN), device=env.device)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return config, model, optimizer


def local_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards as plain tensors: what a format has to write, with no format."""
    optim = optimizer.state_dict()["state"]
    return {
        "model": {name: local_tensor(p).detach() for name, p in model.named_parameters()},
        "optim": {i: {k: local_tensor(v) for k, v in entry.items()} for i, entry in optim.items()},
    }


def bench_baseline(env: DistEnv, work: Path, model, optimizer, repeats: int) -> dict[str, float]:
    path = work / "baseline" / f"rank_{env.rank:05d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save = timed(lambda: torch.save(local_tensors(model, optimizer), path), repeats)
    load = timed(lambda: torch.load(path, weights_only=True), repeats)
    dist.barrier()  # rank 0 sizes every rank's file
    return {"save_s": save, "load_s": load, "size_mb": tree_mb(path.parent)}


def bench_format(
    env: DistEnv, work: Path, ckpt_type: str, config, training, repeats: int, args: dict
) -> dict[str, float]:
    checkpointer = make_checkpointer(env, work / ckpt_type, ckpt_type, config, training)
    step_dir: list[Path] = []

    def save() -> None:
        step_dir[:] = [checkpointer.save(1, args)]

    save_s = timed(save, repeats)
    load_s = timed(lambda: checkpointer.load(step_dir[0]), repeats)
    return {"save_s": save_s, "load_s": load_s, "size_mb": tree_mb(step_dir[0])}


def bench_stall(env: DistEnv, work: Path, config, training, async_save: bool, args: dict):
    """Seconds until `save` returns (training resumes) and until the checkpoint is published."""
    name = "shard_async" if async_save else "shard_sync"
    checkpointer = make_checkpointer(env, work / name, "shard", config, training, async_save)
    dist.barrier()
    start = time.perf_counter()
    checkpointer.save(1, args)
    returned = time.perf_counter() - start
    checkpointer.wait()  # nothing pending for a sync save
    done = time.perf_counter() - start
    return {"stall_s": slowest_rank(returned), "published_s": slowest_rank(done)}


def make_checkpointer(
    env: DistEnv, run_dir: Path, ckpt_type: str, config, training, async_save: bool = False
) -> Checkpointer:
    model, optimizer = training
    return Checkpointer(
        run_dir,
        ckpt_type,
        env,
        model=model,
        optimizer=optimizer,
        scaler=None,
        loader=StubLoader(env.rank),
        model_config=config,
        tokenizer_dir=None,  # the benchmark has no tokenizer to save
        sharding_strategy=STRATEGY,
        async_save=async_save,
    )


def print_tables(results: dict[str, Any]) -> None:
    base = results["baseline"]
    print(
        f"\n{results['params'] / 1e6:.0f}M parameters ({results['config']}, "
        f"{results['layers']} layers), fp32 + AdamW, {results['world_size']} CPU ranks, "
        f"{STRATEGY}"
    )
    print("| format | save s | load s | size MB | vs torch.save (save) | vs torch.load (load) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in [("torch.save/load", base), *results["formats"].items()]:
        print(
            f"| {name} | {row['save_s']:.2f} | {row['load_s']:.2f} | {row['size_mb']:.0f} "
            f"| {row['save_s'] / base['save_s']:.2f}x | {row['load_s'] / base['load_s']:.2f}x |"
        )
    print("\n| shard save | stall s (save returns) | published s (after wait) |")
    print("|---|---:|---:|")
    for name, row in results["stall"].items():
        print(f"| {name} | {row['stall_s']:.2f} | {row['published_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama-130m", help="shape name or config.json")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8: ~106M)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args()
    env = init_distributed()
    torch.manual_seed(env.rank)
    config, *training = build_training(env, args.config, args.layers)
    # One directory for all ranks: the formats' files must meet in the same step directory.
    work = Path(
        broadcast_from_main(tempfile.mkdtemp(prefix="bench_ckpt_") if env.is_main else None)
    )
    try:
        results: dict[str, Any] = {
            "config": args.config,
            "layers": args.layers,
            "params": count_parameters(training[0]),
            "world_size": env.world_size,
            "baseline": bench_baseline(env, work, *training[:2], args.repeats),
            "formats": {
                fmt: bench_format(env, work, fmt, config, training, args.repeats, vars(args))
                for fmt in FORMATS
            },
            "stall": {
                label: bench_stall(env, work, config, training, is_async, vars(args))
                for label, is_async in (("sync", False), ("async_save", True))
            },
        }
        if env.is_main:
            print_tables(results)
            if args.json:
                print(json.dumps(results))
    finally:
        dist.barrier()
        if env.is_main:
            shutil.rmtree(work, ignore_errors=True)
        shutdown()


if __name__ == "__main__":
    main()
