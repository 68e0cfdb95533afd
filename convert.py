"""Turn any training checkpoint into a transformers model directory.

    python convert.py runs/my_run/step_001000 exported/my_model

`full` checkpoints already are one (this copies them without optimizer and loader files);
`shard` (DCP) and `local` (per-rank shards) checkpoints are consolidated in one process, no
process group needed. A sparse (slt) run is written as its effective dense weights. The
result loads with `AutoModelForCausalLM.from_pretrained`. Its `training.json` records the
training that made it (seq_len, step, data, run: `utils.checkpoint.training_record` reads it),
and its tokenizer's `model_max_length` is the run's seq_len.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import PretrainedConfig

from datas.tokenizer import TOKENIZER_SAVED_FILES, load_tokenizer
from slt.export import dense_weights
from utils.checkpoint import (
    TRAINING_RECORD,
    fsync_tree,
    read_trainer_state,
    save_transformers_weights,
    training_record,
    write_model_files,
)
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.files import (
    Replaceable,
    Replacing,
    check_output_dir,
    publish_dir,
    staging_dir,
)
from utils.model import build_config, read_model_config_file


def convert(step_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the transformers directory of `step_dir` to `out_dir`, whole or not at all."""
    replacing = _check_destination(step_dir, out_dir, overwrite)
    read_trainer_state(step_dir)  # the checkpoint is whole (cheap: headers and trainer.pt)
    config = _read_config(step_dir)
    tokenizer = load_tokenizer(step_dir, "checkpoint")
    record = training_record(step_dir)  # its args.json: what training.json records
    # what a reader that asks the tokenizer (lm-eval, truncation=True) takes as the model's length
    tokenizer.model_max_length = record["seq_len"]
    weights = dense_weights(step_dir)
    with staging_dir(out_dir) as staging:
        save_transformers_weights(config, weights, staging)
        write_model_files(config, staging, tokenizer)
        (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        fsync_tree(staging)
        publish_dir(staging, out_dir, replacing)
    return out_dir


def _read_config(step_dir: Path) -> PretrainedConfig:
    """The model config saved in the checkpoint, through the one config validator."""
    if not (step_dir / "config.json").is_file():
        raise UserError(
            f"checkpoint {step_dir} has no config.json; copy the whole step directory as "
            "training wrote it"
        )
    values = read_model_config_file(step_dir / "config.json", "checkpoint")
    return build_config(values, f"checkpoint {step_dir / 'config.json'}")


# What an export holds: the weights (sharded past 5 GB), the configs, its training record and
# the tokenizer's files.
EXPORT_FILE = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|config\.json|generation_config\.json|" + re.escape(TRAINING_RECORD)
)


def is_export_file(name: str) -> bool:
    return bool(EXPORT_FILE.fullmatch(name)) or name in TOKENIZER_SAVED_FILES


AN_EXPORT = Replaceable("OUT", "an export", is_export_file, marker=TRAINING_RECORD)


def _check_destination(step_dir: Path, out_dir: Path, overwrite: bool) -> Replacing | None:
    """OUT is never the checkpoint, inside it or around it, and never a directory that holds
    files, unless --overwrite says so: nothing a user saved is replaced by its export. Returns
    the export to replace, if any."""
    step, out = step_dir.resolve(), out_dir.resolve()
    if out == step or step in out.parents or out in step.parents:
        raise UserError(
            f"OUT {out_dir} is, contains or lies inside the checkpoint {step_dir}; "
            "choose a directory elsewhere"
        )
    return check_output_dir(
        out_dir, "OUT", "choose a new directory, or pass --overwrite to replace it",
        AN_EXPORT if overwrite else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python convert.py", description=__doc__)
    parser.add_argument("step_dir", type=Path, help="a step_<N> checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="where to write the transformers directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        out = convert(args.step_dir, args.out_dir, args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
