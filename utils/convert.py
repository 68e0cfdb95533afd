"""Turn any training checkpoint into a transformers model directory.

    python -m utils.convert runs/my_run/step_001000 exported/my_model

`full` checkpoints already are one (this copies them without optimizer and loader files);
`shard` (DCP) and `local` (per-rank shards) checkpoints are consolidated in one process, no
process group needed. A sparse (slt) run is written as its effective dense weights. The
result loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

from datas.tokenizer import load_tokenizer
from slt.export import effective_dense_state, meta_model
from utils.checkpoint import (
    checkpoint_problem,
    dcp_load,
    full_checkpoint_weights,
    load_transformers_weights,
    save_transformers_weights,
    write_model_files,
)
from utils.errors import ArgumentParser, UserError, exit_on_user_error


def read_trainer_state(step_dir: Path) -> dict:
    """The checkpoint's trainer.pt, once the checkpoint is found whole (a UserError says what
    is missing or cut short otherwise)."""
    problem = checkpoint_problem(step_dir)
    if problem:
        raise UserError(f"checkpoint {step_dir}: {problem}")
    return torch.load(step_dir / "trainer.pt", weights_only=True)


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
    dcp_load({"model": weights}, step_dir, no_dist=True)
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


def convert(step_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the transformers directory of `step_dir` to `out_dir`, whole or not at all."""
    _check_destination(step_dir, out_dir, overwrite)
    weights = read_full_weights(step_dir)
    config = AutoConfig.from_pretrained(str(step_dir))
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_transformers_weights(config, weights, staging)
        write_model_files(config, staging, load_tokenizer(step_dir, "checkpoint"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():  # --overwrite
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _check_destination(step_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """OUT is never the checkpoint, inside it or around it, and never a directory that holds
    files, unless --overwrite says so: nothing a user saved is replaced by its export."""
    step, out = step_dir.resolve(), out_dir.resolve()
    if out == step or step in out.parents or out in step.parents:
        raise UserError(
            f"OUT {out_dir} is, contains or lies inside the checkpoint {step_dir}; "
            "choose a directory elsewhere"
        )
    if out_dir.is_file():
        raise UserError(f"OUT {out_dir} is a file; choose a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(
            f"OUT {out_dir} already holds files; choose a new directory, or pass --overwrite "
            "to replace it"
        )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m utils.convert", description=__doc__)
    parser.add_argument("step_dir", type=Path, help="a step_<N> checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="where to write the transformers directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        out = convert(args.step_dir, args.out_dir, args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
