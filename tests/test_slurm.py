"""scripts/slurm_train.sbatch under stand-ins for srun and scontrol: SIGTERM to the batch
script (what `--signal=B:TERM@120` sends before the time limit) makes the ranks save and the
job requeue itself; the requeued job resumes from that checkpoint through --resume_dir auto."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.helpers import REPO, child_env, free_port, losses_by_step_safe, tiny_run_flags, wait_for

# srun: drop its options, run the task in its own process group and pass SIGTERM to all of it,
# as slurmstepd signals every process of a step.
SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
setsid "$@" &
task=$!
trap 'kill -TERM -- -$task' TERM
wait $task
status=$?
if [ $status -ge 128 ]; then wait $task; status=$?; fi
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
case $1 in
  show) echo localhost ;;
  *) echo "$*" >> "$SCONTROL_LOG" ;;
esac
"""


def slurm_job(tmp_path: Path) -> dict[str, str]:
    """The environment of job 4242 on one node with one task ("GPU"), stubs first on PATH."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = child_env(
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="job", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
        SLURM_GPUS_PER_NODE="1", MASTER_PORT=str(free_port()), SCONTROL_LOG=str(tmp_path / "log"),
    )  # fmt: skip
    env["PATH"] = f"{stubs}:{env['PATH']}"
    env["PYTHON"] = str(Path(__import__("sys").executable))
    return env


def sbatch(env: dict[str, str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "scripts/slurm_train.sbatch", *args], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_a_preempted_job_saves_requeues_and_resumes(mds_tokens, tokenizer_dir, tmp_path):
    env = slurm_job(tmp_path)
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=10_000, num_workers=0)
    flags += ["--local_batch=8", "--save_every=0"]
    run_dir = tmp_path / "job-4242"

    job = sbatch(env, flags)
    wait_for(lambda: len(losses_by_step_safe(run_dir)) >= 2, job)
    job.send_signal(signal.SIGTERM)  # to the batch script only
    output, _ = job.communicate(timeout=180)
    assert job.returncode == 0, output[-3000:]
    assert (tmp_path / "log").read_text() == "requeue 4242\n"
    [saved] = run_dir.glob("step_*")
    saved_step = int(saved.name.split("_")[1])

    requeued = sbatch(env, [*flags, f"--train_steps={saved_step + 2}"])
    output, _ = requeued.communicate(timeout=180)
    assert requeued.returncode == 0, output[-3000:]
    assert f"resumed from {saved} at step {saved_step}" in output
    assert max(losses_by_step_safe(run_dir)) == saved_step + 2
    assert (tmp_path / "log").read_text() == "requeue 4242\n"  # a finished job stays finished
