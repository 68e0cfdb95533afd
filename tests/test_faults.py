"""A run that fails or stops anywhere keeps its newest completed checkpoint, and resuming from it
gives the records of a run that never stopped.

A fault is an exception injected at one point of the loop, by replacing the function that runs
there: in worlds of one in this process (tests.helpers.train_in_process), and on 2 ranks in
torchrun launches (tests/scripts/fault_runs.py).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import train
from datas.local_corpus import write_c4_validation
from tests.helpers import REPO, metrics_records, tiny_run_flags, torchrun, train_in_process
from utils.args import grad_accum_steps
from utils.checkpoint import checkpointer as checkpointer_module
from utils.checkpoint import complete_checkpoints, rundir
from utils.metrics import MetricsLogger

STEPS = 4
# What a record holds that depends on the machine's speed, not on the run.
TIMING = {"tokens_per_s", "step_time", "data_wait_fraction", "tokens_per_s_per_gpu", "mfu",
          "peak_mem_gb"}  # fmt: skip


class Injected(RuntimeError):
    """The fault: not a write failure, not a UserError, so nothing handles it on purpose."""


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics_records(run_dir)]


@pytest.fixture(scope="module")
def eval_data(docstrings, tmp_path_factory) -> Path:
    return write_c4_validation(docstrings[-20:], tmp_path_factory.mktemp("faults_eval"))


def run_flags(mds_tokens, tokenizer_dir, out: Path, name: str, *extra: str) -> list[str]:
    return [
        *tiny_run_flags(mds_tokens, tokenizer_dir, out, steps=STEPS, num_workers=0),
        "--local_batch=4", f"--run_name={name}", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------ resume at every stop step
def test_a_run_stopped_at_any_step_and_resumed_logs_the_uninterrupted_records(
    mds_tokens, tokenizer_dir, tmp_path
):
    """--log_every 4 over 6 steps, stopped after each step s in 1..5 and resumed: every record
    (loss, gradient norm, skipped steps, tokens seen, learning rate) equals the run that never
    stopped. Before, the first line after a resume averaged only the steps since the resume."""
    common = ("--train_steps=6", "--log_every=4", "--save_every=100")

    def run(name: str, *extra: str) -> None:
        train_in_process(*run_flags(mds_tokens, tokenizer_dir, tmp_path, name, *common, *extra))

    run("whole")
    expected = records(tmp_path / "whole")
    assert [r["step"] for r in expected] == [4, 6]
    for stop in range(1, 6):
        run(f"stopped_{stop}", f"--exit_interval={stop}")
        run(f"stopped_{stop}", "--resume_dir=auto")
        assert records(tmp_path / f"stopped_{stop}") == expected, f"stopped after step {stop}"
        config = json.loads((tmp_path / f"stopped_{stop}" / "config.json").read_text())
        assert config["args"]["exit_interval"] == 0  # the resumed segment's own arguments
        assert [args["exit_interval"] for args in config["earlier_args"]] == [stop]


# ------------------------------------------------------------------ the fault matrix
class Fault:
    """Raise at the call of `module.name` for which `when(call_number, args)` holds (calls
    count from 1); `wrap` builds the faulty result from the original when the fault is not a
    plain raise."""

    def __init__(self, module, name: str, when, wrap=None) -> None:
        self.module, self.name, self.when, self.wrap = module, name, when, wrap
        self.original = getattr(module, name)
        self.calls, self.reached = 0, False

    def install(self, monkeypatch) -> None:
        def faulty(*args, **kwargs):
            self.calls += 1
            if not self.reached and self.when(self.calls, args):
                self.reached = True
                if self.wrap:
                    return self.wrap(self.original, *args, **kwargs)
                raise Injected(f"{self.name} call {self.calls}")
            return self.original(*args, **kwargs)

        monkeypatch.setattr(self.module, self.name, faulty)


def failing_future(original, *args, **kwargs):
    """The background write starts, then fails (a lost mount, found when it is waited on)."""
    future = original(*args, **kwargs)
    future.result()

    class Failed:
        def result(self):
            raise Injected("background write")

    return Failed()


def failing_batches(original, args, env, **options):
    """The loader, whose iterator fails at the first micro-batch of step 3."""
    loader = original(args, env, **options)
    fail_at = 2 * grad_accum_steps(args.global_batch, args.local_batch, env.world_size)

    def batches():
        for index, batch in enumerate(loader):
            if index == fail_at:
                raise Injected("data fetch")
            yield batch

    return _Iterable(loader, batches)


class _Iterable:
    """The loader as train.py sees it, with its iterator replaced."""

    def __init__(self, loader, batches) -> None:
        self._loader, self._batches = loader, batches

    def __iter__(self):
        return self._batches()

    def __getattr__(self, name):
        return getattr(self._loader, name)


# A fault at step 3 or in the save of step 2 (saves at every step: 1, 2, 3, 4): the point, how
# to inject it, and the newest step that must be published afterwards.
def nth(n: int):
    return lambda calls, args: calls == n


def in_save_of(step: int):
    """A call whose path lies in the staging directory of step `step`'s checkpoint."""
    return lambda calls, args: Path(args[-1]).parent.parent.name.startswith(
        f".step_{step:06d}.partial-"
    )


POINTS = {
    "data fetch": (lambda: Fault(train, "build_loader", nth(1), failing_batches), 2),
    "forward and backward": (lambda: Fault(train, "model_nll_sum", nth(5)), 2),  # step 3
    "optimizer step": (lambda: Fault(train, "skip_update_if", nth(3)), 2),
    "logging": (lambda: Fault(MetricsLogger, "log", nth(3)), 2),  # step 2's evaluation
    "evaluation": (lambda: Fault(train, "evaluate_sets", nth(1)), 2),  # step 2's
    "checkpoint write": (lambda: Fault(checkpointer_module, "save_durably", in_save_of(2)), 1),
    "publish": (lambda: Fault(checkpointer_module, "publish_dir", nth(2)), 1),
    "--keep_last pruning": (lambda: Fault(checkpointer_module, "delete_dir", nth(1)), 2),
}


def disk_full(original, *args, **kwargs):
    raise OSError(28, "No space left on device")


def unreadable(original, *args, **kwargs):
    raise OSError(13, "Permission denied")


# Faults of one rank that the ranks agree on (a write failure): every rank stops with the same
# one-line error, which names the rank that failed.
AGREED = {
    "rank 1's checkpoint write": (
        lambda: Fault(checkpointer_module, "save_durably", in_save_of(2), disk_full),
        1,
    ),
    # Rank 0 alone looks at the run directory: what it finds reaches every rank.
    "rank 0's look at its run directory": (
        lambda: Fault(rundir, "_foreign_directory", nth(1), unreadable),
        None,
    ),
}
FORMATS = {
    "shard": ("--ckpt_type=shard",),
    "shard async": ("--ckpt_type=shard", "--async_save"),
    "full": ("--ckpt_type=full",),
    "local": ("--ckpt_type=local",),
}
CASES = [*itertools.product(POINTS, FORMATS), ("background write", "shard async")]


@pytest.fixture(scope="module")
def uninterrupted(mds_tokens, tokenizer_dir, eval_data, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("faults_whole")
    train_in_process(*run_flags(mds_tokens, tokenizer_dir, out, "whole", *fault_flags(eval_data)))
    return records(out / "whole")


def fault_flags(eval_data: Path) -> tuple[str, ...]:
    return ("--save_every=1", "--keep_last=1", "--eval_every=2", f"--eval_data={eval_data}",
            "--eval_max_windows=2")  # fmt: skip


@pytest.mark.parametrize(("point", "ckpt"), CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_after_a_fault_anywhere_the_newest_completed_step_is_published_and_resumes_exactly(
    point, ckpt, mds_tokens, tokenizer_dir, eval_data, uninterrupted, tmp_path, monkeypatch
):
    if point == "background write":
        fault, newest = Fault(checkpointer_module.dcp, "async_save", nth(2), failing_future), 1
    else:
        make, newest = POINTS[point]
        fault = make()
    flags = run_flags(mds_tokens, tokenizer_dir, tmp_path, "run", *FORMATS[ckpt],
                      *fault_flags(eval_data))  # fmt: skip
    with monkeypatch.context() as patched:
        fault.install(patched)
        with pytest.raises(Injected):
            train_in_process(*flags)
    assert fault.reached, "the fault was never reached"
    run_dir = tmp_path / "run"
    assert complete_checkpoints(run_dir)[-1].name == f"step_{newest:06d}"
    train_in_process(*flags, "--resume_dir=auto")
    assert records(run_dir) == uninterrupted


# ------------------------------------------------------------------ two ranks
FAULT_RUNS = REPO / "tests" / "scripts" / "fault_runs.py"
ON_EVERY_RANK = ["data fetch", "optimizer step", "logging", "evaluation"]


def test_on_two_ranks_a_fault_on_one_rank_or_on_all_publishes_the_newest_step_and_resumes_exactly(
    mds_tokens, tokenizer_dir, eval_data, tmp_path
):
    """`shard` with --async_save on 2 ranks, where the save of step 2 is still being written
    when the fault comes: rank 1's evaluation of step 2 failing alone (an out-of-memory error
    on one GPU) ends the launch; the same fault on both ranks, and faults at the other points,
    end the run. Each leaves step 2 published, and resuming it logs the uninterrupted records."""

    def flags(name: str, *extra: str) -> list[str]:
        return run_flags(mds_tokens, tokenizer_dir, tmp_path, name, "--ckpt_type=shard",
                         "--async_save", *fault_flags(eval_data), *extra)  # fmt: skip

    def launch(plan: list, check: bool = True):
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        return torchrun(FAULT_RUNS, str(tmp_path / "plan.json"), str(tmp_path / "newest.json"),
                        check=check)  # fmt: skip

    alone = launch([[flags("one_rank"), "evaluation", [1]]], check=False)
    assert alone.returncode != 0
    assert complete_checkpoints(tmp_path / "one_rank")[-1].name == "step_000002", alone.stderr
    names = [point.replace(" ", "_") for point in ON_EVERY_RANK]
    launch(
        [[flags("whole"), None, []]]
        + [[flags(name), point, [0, 1]] for name, point in zip(names, ON_EVERY_RANK, strict=True)]
        + [[flags("disk_full_on_rank_1"), "rank 1's checkpoint write", [1]]]
        + [[flags("unreadable"), "rank 0's look at its run directory", [0]]]
        + [[flags(name, "--resume_dir=auto"), None, []]
           for name in [*names, "one_rank", "disk_full_on_rank_1"]]
    )  # fmt: skip
    result = json.loads((tmp_path / "newest.json").read_text())
    newest = result.pop("newest")
    assert newest == dict.fromkeys(names, "step_000002") | {
        "disk_full_on_rank_1": "step_000001", "unreadable": None,
    }  # fmt: skip
    # Rank 0 wrote its part of step 2 and stopped with rank 1's failure: the ranks agreed.
    # And rank 0's refusal, from a directory only it looks at, reached rank 1.
    assert result["errors"] == {
        "disk_full_on_rank_1": (
            f"could not save step 2 in {tmp_path / 'disk_full_on_rank_1'} (rank 1: [Errno 28] "
            "No space left on device); check its free space and permissions, or change "
            "--output_dir; the checkpoints saved before are intact"
        ),
        "unreadable": f"--output_dir: cannot use {tmp_path / 'unreadable'} (Permission denied)",
    }  # fmt: skip
    expected = records(tmp_path / "whole")
    for name in [*names, "one_rank", "disk_full_on_rank_1"]:
        assert records(tmp_path / name) == expected, name
