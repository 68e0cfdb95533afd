"""What a run reports (utils/metrics.py): FLOPs per token for MFU, a log line's averages, and
the records a resumed run leaves in metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import metrics_records, tiny_run_flags, train_in_process
from utils.metrics import LogWindow, MetricsLogger, memory_estimate, model_flops_per_token
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


def window_of(steps: list[tuple[float, float, bool]], tokens: int = 10) -> LogWindow:
    window = LogWindow(torch.device("cpu"))
    for loss, norm, skipped in steps:
        window.add(torch.tensor(loss), torch.tensor(norm), torch.tensor(skipped), tokens)
    return window


# A step's loss, gradient norm and whether it was skipped; a skipped step's numbers are not
# finite, as a real one's are.
STEP_VALUES = st.tuples(st.floats(0.1, 20.0), st.floats(0.0, 50.0), st.booleans()).map(
    lambda s: (float("nan"), float("inf"), True) if s[2] else s
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(STEP_VALUES, min_size=1, max_size=9), cut=st.integers(0, 9))
def test_a_log_line_is_the_mean_loss_and_rms_norm_of_the_applied_steps_saved_or_not(
    world_of_one, steps, cut
):
    """The logged loss is the mean of the applied steps' losses, the grad norm the root mean
    square of their norms (what clip_grad_norm_ returned), skipped steps counted apart; a
    window saved after `cut` steps and restored into a fresh one logs exactly the same."""
    applied = [(loss, norm) for loss, norm, skipped in steps if not skipped]
    whole = window_of(steps).reduce_and_reset()
    assert whole["skipped_steps"] == len(steps) - len(applied)
    if applied:
        mean = sum(loss for loss, _ in applied) / len(applied)
        rms = math.sqrt(sum(norm**2 for _, norm in applied) / len(applied))
        assert whole["loss"] == pytest.approx(mean, rel=1e-6)
        assert whole["grad_norm"] == pytest.approx(rms, rel=1e-6)
    else:
        assert whole["loss"] is None and whole["grad_norm"] is None
    cut = min(cut, len(steps))
    resumed = LogWindow(torch.device("cpu"))
    resumed.load_state_dict(window_of(steps[:cut]).state_dict(), "checkpoint")
    for loss, norm, skipped in steps[cut:]:
        resumed.add(torch.tensor(loss), torch.tensor(norm), torch.tensor(skipped), 10)
    again = resumed.reduce_and_reset()
    assert {k: again[k] for k in ("loss", "grad_norm", "skipped_steps")} == {
        k: whole[k] for k in ("loss", "grad_norm", "skipped_steps")
    }


def test_a_metrics_line_cut_by_a_kill_is_moved_aside_on_resume(tmp_path):
    """A kill mid-write leaves half a line; the resumed run's metrics.jsonl is valid JSON lines
    (the cut line kept in metrics.dropped.jsonl), continuing after the checkpoint's step."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n{"st')
    logger = MetricsLogger(run, None, enabled=True, start_step=2)
    logger.log(3, {"loss": 4.8})
    logger.close()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1, 2, 3]
    assert (run / "metrics.dropped.jsonl").read_text() == '{"st\n'


def test_the_memory_estimate_of_the_readme_7b_example_and_of_a_tiny_model_by_hand():
    """Worked by hand. llama-7b (6,738,415,616 parameters), 32-way sharded, 4 x 2048 tokens per
    rank, selective checkpointing, bf16, chunked loss: fp32 weights 6,738,415,616 x 4 / 32 =
    842,301,952 bytes, gradients the same, AdamW twice that; each token keeps per layer
    q, attention, o, down (4 x 4096), the input (4096), k and v (2 x 4096), gate and up
    (2 x 11008) at 2 bytes = 101,376 bytes, x 32 layers x 8192 tokens = 26,575,110,144."""
    from utils.model import dense_parameters

    config = load_model_config("llama-7b", 0)
    assert dense_parameters(config) == 6_738_415_616
    estimate = memory_estimate(
        config, 6_738_415_616, shard_ways=32, tokens=8192,
        activation_checkpointing="selective", chunked_loss=True, compute_bytes=2,
    )  # fmt: skip
    assert estimate == pytest.approx(
        {
            "parameters": 0.842301952,
            "gradients": 0.842301952,
            "optimizer": 1.684603904,
            "activations": 26.575110144,
        }  # fmt: skip
    )
    # tiny (hidden 64, 2 layers, vocabulary 256) in fp32, 128 tokens, logits kept: a whole
    # layer keeps 34 x 64 x 4 / 2 = 4,352 bytes a token, the logits and their gradient
    # 2 x 4 x 256 = 2,048; full checkpointing keeps the input (64 x 4 = 256) and recomputes one
    # layer.
    tiny = load_model_config("tiny", 0)
    for checkpointing, per_token in (("none", 2 * 4352 + 2048), ("full", 2 * 256 + 4352 + 2048)):
        estimate = memory_estimate(
            tiny, 1000, shard_ways=2, tokens=128, activation_checkpointing=checkpointing,
            chunked_loss=False, compute_bytes=4,
        )  # fmt: skip
        assert estimate["activations"] == pytest.approx(128 * per_token / 1e9)
        assert estimate["parameters"] == pytest.approx(2000 / 1e9)
