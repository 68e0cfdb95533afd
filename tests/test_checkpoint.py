"""Checkpoints and resume, on real 2-process torchrun runs (CPU, gloo, fp32).

An interrupted run, resumed, must log bit-identical losses to the uninterrupted one; a crash
must never leave a checkpoint that `--resume_dir auto` would pick while incomplete.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    child_env,
    logged_losses,
    tiny_run_flags,
    torchrun,
    train_in_process,
)

STEPS = 12


def flags(data: Path, tokenizer: Path, out: Path, name: str, *extra: str) -> list[str]:
    flags = tiny_run_flags(data, tokenizer, out, steps=STEPS, num_workers=1)
    return [*flags, "--local_batch=2", f"--run_name={name}", *extra]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt_runs")


@pytest.fixture(scope="module")
def text_baseline(out, mds_text, tokenizer_dir) -> dict[int, float]:
    """Uninterrupted 2-rank run on text packed on the fly (loader buffers and skips in play)."""
    torchrun("train.py", *flags(mds_text, tokenizer_dir, out, "text_baseline"))
    return logged_losses(out / "text_baseline")


@pytest.fixture(scope="module")
def token_baseline(out, mds_tokens, tokenizer_dir) -> dict[int, float]:
    torchrun("train.py", *flags(mds_tokens, tokenizer_dir, out, "token_baseline"))
    return logged_losses(out / "token_baseline")


@pytest.fixture(scope="module")
def interrupted(out, mds_text, tokenizer_dir):
    """A run stopped by --exit_interval 6, then the same command again (as after a
    preemption) with --resume_dir auto; once per format. Returns the run directory."""
    done: dict[str, Path] = {}

    def run(ckpt_type: str) -> Path:
        if ckpt_type not in done:
            name = f"exit_{ckpt_type}"
            args = flags(mds_text, tokenizer_dir, out, name, f"--ckpt_type={ckpt_type}")
            args += ["--exit_interval=6", "--save_every=2", "--keep_last=2", "--resume_dir=auto"]
            first = torchrun("train.py", *args)
            assert "stopping after step 6" in first.stdout
            kept = sorted(p.name for p in (out / name).glob("step_*"))
            assert kept == ["step_000004", "step_000006"]
            torchrun("train.py", *args)
            done[ckpt_type] = out / name
        return done[ckpt_type]

    return run


@pytest.mark.parametrize("ckpt_type", ["full", "local"])
def test_exit_interval_then_auto_resume_is_bit_identical(ckpt_type, interrupted, text_baseline):
    run_dir = interrupted(ckpt_type)
    assert logged_losses(run_dir) == text_baseline  # exact equality, every step
    kept = sorted(p.name for p in run_dir.glob("step_*"))
    assert kept == [f"step_{STEPS - 2:06d}", f"step_{STEPS:06d}"]  # --keep_last 2


@pytest.fixture(scope="module")
def sigterm_run(out, mds_text, tokenizer_dir) -> Path:
    """A shard-format run (written in the background) signalled mid-run, then resubmitted
    with --resume_dir auto."""
    name = "sigterm_shard"
    run = flags(mds_text, tokenizer_dir, out, name, "--ckpt_type=shard", "--resume_dir=auto")
    run += ["--async_save"]
    proc = launch(run)
    wait_for(lambda: len(losses_by_step_safe(out / name)) >= 2, proc)
    for child in worker_pids(proc.pid):
        os.kill(child, signal.SIGTERM)  # what SLURM sends to every process of the job
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "(SIGTERM)" in output, output[-3000:]
    saved = sorted((out / name).glob("step_*"))
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) < STEPS
    torchrun("train.py", *run)
    return out / name


def test_sigterm_saves_and_exits_then_resume_is_bit_identical(sigterm_run, text_baseline):
    assert logged_losses(sigterm_run) == text_baseline


@pytest.mark.parametrize("ckpt_type", ["shard", "full"])
def test_elastic_resume_from_two_ranks_on_one(
    ckpt_type, token_baseline, out, mds_tokens, tokenizer_dir
):
    name = f"elastic_{ckpt_type}"
    run = flags(mds_tokens, tokenizer_dir, out, name, f"--ckpt_type={ckpt_type}")
    torchrun("train.py", *run, "--exit_interval=4")
    # Pre-tokenized blocks leave no partial buffers behind, so nothing is skipped or re-read.
    nothing_lost = "checkpoint of 2: 0 tokens left in the saved buffers are skipped; 0 documents"
    with pytest.warns(UserWarning, match=f"resuming on 1 ranks from a {nothing_lost}"):
        train_in_process(*run, "--local_batch=4", f"--resume_dir={out / name / 'step_000004'}")
    resumed = logged_losses(out / name)
    assert resumed.keys() == token_baseline.keys()
    for step, loss in token_baseline.items():
        assert abs(resumed[step] - loss) <= 1e-4 * loss, (step, resumed[step], loss)


def test_sigkill_of_a_rank_during_a_save_then_resubmit_recovers_exactly(
    text_baseline, out, mds_text, tokenizer_dir
):
    """A rank killed mid-write: the half-written checkpoint stays hidden, `auto` takes the
    previous one, and the re-submitted run ends with the uninterrupted run's losses."""
    name = "sigkill"
    run = flags(mds_text, tokenizer_dir, out, name, "--ckpt_type=shard", "--resume_dir=auto")
    run += ["--save_every=1"]
    proc = launch(run)
    staging = wait_for(lambda: staging_dir_after_first(out / name), proc, poll=0.005)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run survived the kill: nothing was tested"
    killed_step = int(staging.name.split("_")[1].split(".")[0])
    complete = [int(p.name.split("_")[1]) for p in (out / name).glob("step_*")]
    assert killed_step not in complete and max(complete) == killed_step - 1, output[-2000:]
    resumed = torchrun("train.py", *run)
    assert f"resumed from {out / name / f'step_{killed_step - 1:06d}'}" in resumed.stdout
    assert logged_losses(out / name) == text_baseline
    assert not list((out / name).glob(".step_*")), "a staging directory was left behind"


def test_sigkill_of_a_rank_mid_run_under_max_restarts_recovers_exactly(
    text_baseline, out, mds_text, tokenizer_dir
):
    """torchrun restarts the group in place; `auto` resumes it from the newest checkpoint.
    With torchrun's rendezvous store shared across restarts, the restarted group read the
    killed group's gloo addresses and failed to connect or hung; a store per round fixes it."""
    name = "max_restarts"
    run = flags(mds_text, tokenizer_dir, out, name, "--ckpt_type=shard", "--resume_dir=auto")
    run += ["--save_every=2"]
    proc = launch(
        run,
        extra_torchrun=("--max-restarts=1",),
        env=child_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
    )
    wait_for(lambda: (out / name / "step_000004").is_dir(), proc, poll=0.01)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    resumed = re.search(rf"resumed from {out / name}/step_(\d+)", output)
    assert resumed and 4 <= int(resumed.group(1)) < STEPS, output[-3000:]
    assert logged_losses(out / name) == text_baseline


@pytest.mark.parametrize("shared", ["True", "False"])
def test_max_restarts_with_a_store_shared_across_restarts_warns(monkeypatch, shared):
    import warnings

    from utils.distributed import warn_if_restarts_share_a_store

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_restarts_share_a_store()
    messages = [str(w.message) for w in caught]
    assert any("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in m for m in messages) == (shared == "True")


def test_converter_and_full_checkpoint_load_and_generate_in_transformers(
    interrupted, sigterm_run, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.convert import convert

    full = interrupted("full") / f"step_{STEPS:06d}"
    reference = AutoModelForCausalLM.from_pretrained(str(full))
    tokenizer = AutoTokenizer.from_pretrained(str(full))
    prompt = tokenizer("Return the", return_tensors="pt", return_token_type_ids=False)
    generated = reference.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    for ckpt_type in ("local", "full"):
        step_dir = interrupted(ckpt_type) / f"step_{STEPS:06d}"
        exported = convert(step_dir, tmp_path / ckpt_type)
        converted = AutoModelForCausalLM.from_pretrained(str(exported)).state_dict()
        for name, tensor in reference.state_dict().items():
            assert torch.equal(tensor, converted[name]), f"{ckpt_type}: {name} differs"
    shard_dir = sorted(sigterm_run.glob("step_*"))[-1]
    exported = convert(shard_dir, tmp_path / "shard")
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model.generate(**prompt, max_new_tokens=4, do_sample=False).shape[1] > 0


def test_resume_refuses_another_model_shape_and_local_on_another_world_size(
    interrupted, mds_text, tokenizer_dir, tmp_path, capsys
):
    import train

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 1024,
            }
        )
    )  # fmt: skip
    step = interrupted("full") / f"step_{STEPS:06d}"
    argv = flags(mds_text, tokenizer_dir, tmp_path, "other", f"--resume_dir={step}")
    for extra, message in [
        ([f"--config={config}"], "mlp.up_proj.weight: checkpoint (176, 64) vs model (128, 64)"),
        (["--local_batch=4", f"--resume_dir={interrupted('local') / f'step_{STEPS:06d}'}"],
         "it resumes only on the same"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            train.main(argv + extra)
        assert stop.value.code == 2
        assert message in capsys.readouterr().err


def test_skip_optimizer_keeps_the_step_and_weights_but_not_the_moments(
    interrupted, text_baseline, out, mds_text, tokenizer_dir
):
    step_dir = interrupted("full") / f"step_{STEPS - 2:06d}"  # kept by --keep_last 2
    name = "skip_optimizer"
    torchrun(
        "train.py",
        *flags(mds_text, tokenizer_dir, out, name, f"--resume_dir={step_dir}", "--skip_optimizer"),
    )
    resumed = logged_losses(out / name)
    first = STEPS - 1
    assert sorted(resumed) == [first, STEPS]  # the step count is kept
    # Same weights and data at the first step, so the same loss; then a fresh Adam differs.
    assert abs(resumed[first] - text_baseline[first]) <= 1e-4 * text_baseline[first]
    assert resumed[STEPS] != text_baseline[STEPS]


def test_auto_ignores_staging_directories(tmp_path):
    from utils.checkpoint import resolve_resume_dir

    run = tmp_path / "run"
    (run / "step_000002").mkdir(parents=True)
    (run / "step_000002" / "trainer.pt").write_bytes(b"x")
    (run / ".step_000004.tmp").mkdir()
    (run / "step_000006").mkdir()  # no trainer.pt: not complete
    assert resolve_resume_dir("auto", run) == run / "step_000002"
    assert resolve_resume_dir("auto", tmp_path / "fresh") is None


# ---------------------------------------------------------------- process helpers
def launch(
    args: list[str], extra_torchrun: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*cmd, *extra_torchrun, "train.py", *args],
        cwd=REPO,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"run ended first:\n{proc.stdout.read()[-3000:]}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError("timed out")


def staging_dir_after_first(run_dir: Path) -> Path | None:
    """A checkpoint being written, once a complete one exists to fall back on."""
    return next((p for p in run_dir.glob(".step_*.tmp") if p.name != ".step_000001.tmp"), None)


def losses_by_step_safe(run_dir: Path) -> dict[int, float]:
    try:
        return logged_losses(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def worker_pids(torchrun_pid: int) -> list[int]:
    """The training processes torchrun started (its children running train.py)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    return sorted(int(pid) for pid in children)
