"""How the model is laid out (utils/parallelize.py)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from utils.distributed import build_mesh, init_distributed, shutdown
from utils.model import build_meta_model, load_model_config
from utils.parallelize import parallelize_model


def test_layers_and_root_compute_in_bf16_and_reduce_gradients_in_fp32():
    """bf16 gathers for compute, but gradients summed over ranks in bf16 would lose the low
    bits of every rank's contribution: the reduction stays fp32."""
    env = init_distributed()
    try:
        model = build_meta_model(load_model_config("tiny", 0), "sdpa")
        mesh = build_mesh(env, "full_shard")
        parallelize_model(model, mesh, sharding_strategy="full_shard", param_dtype=torch.bfloat16)
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        policies = [m._get_fsdp_state()._mp_policy for m in sharded]  # no public accessor
    finally:
        shutdown()
    assert len(sharded) == 3  # the 2 decoder layers and the root
    assert all(
        p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32 for p in policies
    )


@pytest.mark.parametrize("master_addr", [None, "localhost"])
def test_a_single_process_world_leaves_the_environment_as_it_found_it(monkeypatch, master_addr):
    """Without torchrun, init_distributed sets RANK/WORLD_SIZE for the loader; left behind, they
    make a later library in the same process (accelerate, under lm-eval's hf model) take them
    for a torchrun launch with no MASTER_ADDR and fail."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    if master_addr:  # exported by a cluster's shell, without torchrun
        monkeypatch.setenv("MASTER_ADDR", master_addr)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "7")
    before = dict(os.environ)
    env = init_distributed()
    inside = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    shutdown()
    assert (env.world_size, inside) == (
        1, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"},
    )  # fmt: skip
    assert dict(os.environ) == before
