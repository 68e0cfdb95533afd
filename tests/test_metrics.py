"""What a run reports (utils/metrics.py): FLOPs per token for MFU, and the records a resumed
run leaves in metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import metrics_records, tiny_run_flags, train_in_process
from utils.metrics import model_flops_per_token
from utils.model import load_model_config


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_count_the_output_head_tied_or_not(tied):
    """The tiny shape at seq 64: N = 158,016 matmul parameters (223,552 less the 65,536 of the
    input embedding; a tied head is the embedding's own tensor but still multiplies every
    token), 6N = 948,096, plus 12 * 2 layers * 4 heads * 16 * 64 = 98,304 for attention."""
    config = load_model_config("tiny", tokenizer_vocab=1024)
    config.tie_word_embeddings = tied
    assert model_flops_per_token(config, seq_len=64) == 1_046_400


def test_resuming_from_an_earlier_step_logs_each_step_once(mds_tokens, tokenizer_dir, tmp_path):
    """Steps 1-6, killed before the save of step 6 (its checkpoint removed), then resumed by
    auto from step 4: metrics.jsonl holds each step once (steps 5-6 of the first pass move to
    metrics.dropped.jsonl) and TensorBoard shows each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=6, num_workers=0)
    flags += ["--local_batch=4", "--run_name=again", "--save_every=2", "--enable_tensorboard"]
    train_in_process(*flags)
    run_dir = tmp_path / "again"
    first = {r["step"]: r["loss"] for r in metrics_records(run_dir)}
    shutil.rmtree(run_dir / "step_000006")
    train_in_process(*flags, "--resume_dir=auto")
    records = metrics_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {r["step"]: r["loss"] for r in records} == first  # the same steps, computed again
    dropped = [json.loads(line) for line in (run_dir / "metrics.dropped.jsonl").open()]
    assert [r["step"] for r in dropped] == [5, 6]
    board = EventAccumulator(str(tmp_path / "tensorboard" / "again"))
    board.Reload()
    assert [event.step for event in board.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
