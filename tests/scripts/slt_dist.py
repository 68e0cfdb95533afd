"""Run under torchrun by tests/test_slt_training.py: a few steps of each slt method on an
FSDP2-sharded tiny Llama, every rank feeding the same batch, so any world size must give
bit-identical results if masks depend only on full weights.

Writes (rank 0) a torch file: method -> losses, thresholds, measured sparsity, effective
weights' zero masks.

Usage: slt_dist.py OUT_FILE
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from slt import SLTConfig, SparseTraining
from slt.export import effective_dense_state
from utils.distributed import build_mesh, init_distributed, shutdown
from utils.model import build_meta_model, init_weights, load_model_config
from utils.optim import build_optimizer
from utils.parallelize import parallelize_model

METHODS = {
    "magnitude": {"method": "magnitude", "end_step": 3, "update_every": 1},
    "supermask": {"method": "supermask", "final_sparsity": 0.7},
    "nm": {"method": "nm", "srste_lambda": 0.01},
    "sltrain": {"method": "sltrain", "r": 8, "delta": 0.1},
}
STEPS = 3


def sharded_sparse_llama(env, slt: dict, **layout) -> tuple[torch.nn.Module, SparseTraining]:
    """The tiny Llama with `slt` applied, sharded over all ranks and initialized."""
    model = build_meta_model(load_model_config("tiny", 0), "sdpa")
    sparse = SparseTraining(model, SLTConfig.from_dict(slt))
    parallelize_model(
        model, build_mesh(env, "full_shard"), sharding_strategy="full_shard",
        param_dtype=torch.float32, **layout,
    )  # fmt: skip
    init_weights(model, seed=0, device=env.device)
    return model, sparse


def train_steps(model, sparse: SparseTraining) -> tuple[list[float], list[float]]:
    """STEPS AdamW steps on one fixed batch; the losses and the measured sparsity."""
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    losses, sparsity = [], []
    for step in range(1, STEPS + 1):
        sparse.before_step(step, torch.float32)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        sparsity.append(sparse.measure(step, torch.float32)["sparsity"])
    return losses, sparsity


def run(env, slt: dict) -> dict:
    model, sparse = sharded_sparse_llama(env, slt)
    losses, sparsity = train_steps(model, sparse)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = sparse.state_dict()
    dense = effective_dense_state(model.config, state, full)
    masks = {name: dense[f"{name}.weight"] == 0 for name in sparse.layers}
    return {"losses": losses, "sparsity": sparsity, "thresholds": state["thresholds"],
            "masks": masks}  # fmt: skip


def main() -> None:
    env = init_distributed()
    try:
        results = {method: run(env, slt) for method, slt in METHODS.items()}
        if env.is_main:
            torch.save(results, sys.argv[1])
    finally:
        shutdown()


if __name__ == "__main__":
    main()
