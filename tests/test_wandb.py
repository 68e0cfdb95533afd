"""Weights & Biases in offline mode, read back from the run files it writes: a run stopped by
SIGTERM (to its whole process group, W&B's own process included) and resumed keeps one W&B
run, whose history holds every logged metric of metrics.jsonl, tokens_seen included."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from tests.helpers import (
    REPO,
    child_env,
    losses_by_step_safe,
    metrics_records,
    tiny_run_flags,
    train_in_process,
    wait_for,
)

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log of 32 KiB blocks


def wandb_records(path: Path) -> Iterator:
    """The protobuf records of an offline run's `run-<id>.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline run segment, oldest first: its id, name, group and history by step."""
    segments = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        segment = {"history": {}}
        for record in wandb_records(next(directory.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                segment |= {"id": run.run_id, "name": run.display_name, "group": run.run_group}
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                segment["history"][row["_step"]] = row
        segments.append(segment)
    return segments


def test_a_preempted_run_keeps_its_wandb_run(mds_tokens, tokenizer_dir, tmp_path, monkeypatch):
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=10_000, num_workers=0)
    flags += ["--local_batch=8", "--save_every=0", "--run_name=run", "--resume_dir=auto",
              "--wandb_project=proj", "--wandb_group=sweep"]  # fmt: skip
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", *flags], cwd=REPO, env=child_env(WANDB_MODE="offline"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    wait_for(lambda: len(losses_by_step_safe(run_dir)) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "(SIGTERM)" in output, output[-3000:]
    [checkpoint] = run_dir.glob("step_*")
    saved = int(checkpoint.name.split("_")[1])

    monkeypatch.setenv("WANDB_MODE", "offline")
    train_in_process(*flags, f"--train_steps={saved + 2}")

    run_id = torch.load(checkpoint / "trainer.pt", weights_only=True)["progress"]["wandb_run_id"]
    first, resumed = offline_runs(run_dir)
    for segment in (first, resumed):
        assert (segment["id"], segment["name"], segment["group"]) == (run_id, "run", "sweep")
    assert sorted(first["history"]) == list(range(1, saved + 1))
    assert sorted(resumed["history"]) == [saved + 1, saved + 2]
    history = first["history"] | resumed["history"]
    for record in metrics_records(run_dir):
        if "loss" in record:
            row = history[record["step"]]
            assert row["train/loss"] == record["loss"]
            assert row["train/tokens_seen"] == record["tokens_seen"] == record["step"] * 8 * 64

    # A branch from that checkpoint under a new name is a W&B run of its own, not the parent's.
    branch = [f for f in flags if f not in ("--run_name=run", "--resume_dir=auto")]
    train_in_process(*branch, "--run_name=branch", f"--resume_dir={checkpoint}",
                     f"--train_steps={saved + 1}")  # fmt: skip
    [branched] = offline_runs(tmp_path / "branch")
    assert branched["id"] != run_id and branched["name"] == "branch"
    assert sorted(branched["history"]) == [saved + 1]
    assert len(offline_runs(run_dir)) == 2, "the branch wrote into its parent's W&B files"
