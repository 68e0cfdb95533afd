"""Turn any training checkpoint into a transformers model directory.

    python -m utils.convert runs/my_run/step_001000 exported/my_model

`full` checkpoints already are one (this copies them without optimizer and loader files);
`shard` (DCP) and `local` (per-rank shards) checkpoints are consolidated in one process, no
process group needed. A sparse (slt) run is written as its effective dense weights. The
result loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, GenerationConfig

from slt.export import effective_dense_state, meta_model
from utils.checkpoint import (
    TOKENIZER_FILES,
    full_checkpoint_weights,
    load_transformers_weights,
    save_transformers_weights,
)
from utils.errors import UserError, exit_on_user_error


def read_trainer_state(step_dir: Path) -> dict:
    trainer = step_dir / "trainer.pt"
    if not trainer.is_file():
        raise UserError(f"{step_dir} is not a training checkpoint (no trainer.pt)")
    return torch.load(trainer, weights_only=True)


def read_full_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) dense model weights of a checkpoint of any format, on the CPU."""
    trainer = read_trainer_state(step_dir)
    if trainer["ckpt_type"] == "full":
        return load_transformers_weights(step_dir)  # sparse layers already effective
    weights = read_model_tensors(step_dir)
    slt_state = trainer.get("slt")
    if slt_state is None:
        return weights
    return effective_dense_state(AutoConfig.from_pretrained(str(step_dir)), slt_state, weights)


def read_model_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """The training model's full tensors, on the CPU: a sparse layer's own (its weight before
    masking, its scores, its factors), not its effective weight."""
    trainer = read_trainer_state(step_dir)
    if trainer["ckpt_type"] == "full":
        return full_checkpoint_weights(step_dir)
    if trainer["ckpt_type"] == "shard":
        return _read_dcp_weights(step_dir, trainer.get("slt"))
    return _stitch_local_shards(step_dir)


def _read_dcp_weights(step_dir: Path, slt_state: dict | None) -> dict[str, torch.Tensor]:
    shell = meta_model(AutoConfig.from_pretrained(str(step_dir)), slt_state)
    weights = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shell.state_dict().items()}
    dcp.load({"model": weights}, checkpoint_id=step_dir, no_dist=True)
    return weights


def _stitch_local_shards(step_dir: Path) -> dict[str, torch.Tensor]:
    """Concatenate the dim-0 shards of one replica, in shard order, cut to the full shape."""
    ranks = [torch.load(f, weights_only=True) for f in sorted(step_dir.glob("rank_*.pt"))]
    replica = sorted(
        (r for r in ranks if r["mesh"].get("replicate", 0) == 0), key=lambda r: r["mesh"]["shard"]
    )
    shapes = replica[0]["shapes"]
    return {
        name: torch.cat([r["model"][name] for r in replica])[: shape[0]].reshape(shape)
        for name, shape in shapes.items()
    }


def convert(step_dir: Path, out_dir: Path) -> Path:
    config = AutoConfig.from_pretrained(str(step_dir))
    weights = read_full_weights(step_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_transformers_weights(config, weights, staging)
    GenerationConfig.from_model_config(config).save_pretrained(str(staging))
    for name in TOKENIZER_FILES:
        if (step_dir / name).is_file():
            shutil.copy2(step_dir / name, staging / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.convert", description=__doc__)
    parser.add_argument("step_dir", type=Path, help="a step_<N> checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="where to write the transformers directory")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        out = convert(args.step_dir, args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
