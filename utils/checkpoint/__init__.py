"""Checkpoints: `<run_dir>/step_<N:06d>/`, staged under a hidden name and published whole.

Every format writes, beside the weights: `config.json` + `generation_config.json` + the
tokenizer files (so the directory is a transformers model directory once it holds weights in
that layout), `trainer.pt` (step, grad scaler, world size, format, slt state) from rank 0,
`args.json`, and `rank_<r>.pt` per rank (data loader position and leftover tokens, RNG).
`training_record` reads what training made a model directory (seq_len, step, data, run) from
a checkpoint's `args.json` and `trainer.pt`, or from an export's `training.json`.

Weights and optimizer, by `--ckpt_type`:
- `shard`: torch.distributed.checkpoint (DCP); every rank writes its own shards in parallel;
  loads on any world size or sharding strategy (DCP reshards). `--async_save` overlaps the
  write with training.
- `full`: consolidated on rank 0: `model.safetensors` (transformers layout, loadable with
  `from_pretrained`) and `optimizer.pt`; loads on any world size (rank 0 reads, broadcasts).
- `local`: each rank's own shards of weights and optimizer in its `rank_<r>.pt`; the fastest,
  but it resumes only with the same world size and sharding strategy.

A sparse (slt) run also stores its thresholds and config in `trainer.pt`; its `full`
checkpoints hold the effective dense weights in `model.safetensors` and the sparse layers' own
tensors, which training resumes from, in `slt_state.safetensors`.

A directory is published under its final name only after every rank wrote and fsynced its
part, so a crash mid-write leaves at most a hidden `.step_<N>.partial-xxxxxxxx` that nothing
reads (and the next save of that step removes).

Where each part lives: `layout` (names, finding and checking checkpoints, the transformers
layout, reading any format), `checkpointer` (`Checkpointer`: save and load during training),
`publish` (durable writes and atomic publishing), `rundir` (what a run may do in its run
directory: one run at a time, only adding to it), `trusted` (reading pickles with no code run).
"""

from utils.checkpoint.checkpointer import Checkpointer, load_weights_and_optimizer
from utils.checkpoint.layout import (
    TRAINING_RECORD,
    check_shapes_match,
    checkpoint_problem,
    complete_checkpoints,
    load_transformers_weights,
    read_model_tensors,
    read_trainer_state,
    save_transformers_weights,
    saved_shapes,
    training_record,
    weight_files_problem,
    write_model_files,
)
from utils.checkpoint.publish import fsync_tree
from utils.checkpoint.rundir import own_run_dir, resolve_resume_dir
from utils.checkpoint.trusted import dcp_load, load_torch_file

__all__ = [
    "TRAINING_RECORD",
    "Checkpointer",
    "check_shapes_match",
    "checkpoint_problem",
    "complete_checkpoints",
    "dcp_load",
    "fsync_tree",
    "load_torch_file",
    "load_transformers_weights",
    "load_weights_and_optimizer",
    "read_model_tensors",
    "read_trainer_state",
    "own_run_dir",
    "resolve_resume_dir",
    "save_transformers_weights",
    "saved_shapes",
    "training_record",
    "weight_files_problem",
    "write_model_files",
]
