"""Checkpoints and resume, on real 2-process torchrun runs (CPU, gloo, fp32).

An interrupted run, resumed, must log bit-identical losses to the uninterrupted one; a crash
must never leave a checkpoint that `--resume_dir auto` would pick while incomplete.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    child_env,
    logged_losses,
    losses_by_step_safe,
    metrics_records,
    staging_of_a_gone_process,
    tiny_run_flags,
    torchrun,
    torchrun_background,
    torchrun_command,
    torchrun_runs,
    torchrun_two_nodes,
    train_in_process,
    wait_for,
)

STEPS = 12


def flags(data: Path, tokenizer: Path, out: Path, name: str, *extra: str) -> list[str]:
    flags = tiny_run_flags(data, tokenizer, out, steps=STEPS, num_workers=1)
    return [*flags, "--local_batch=2", f"--run_name={name}", *extra]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt_runs")


EXIT_FLAGS = ["--exit_interval=6", "--save_every=2", "--keep_last=2", "--resume_dir=auto"]


@pytest.fixture(scope="module")
def runs(out, mds_text, mds_tokens, tokenizer_dir) -> dict[str, Path]:
    """The module's plain 2-rank runs, in two torchrun launches; their run directories.

    - text_baseline: uninterrupted, on text packed on the fly (loader buffers and skips in
      play); token_baseline: the same on pre-tokenized blocks;
    - exit_full, exit_local: stopped by --exit_interval 6, then the same command again (as
      after a preemption) with --resume_dir auto;
    - elastic_shard, elastic_full: stopped at step 4, for a resume on one rank;
    - skip_optimizer: exit_full's step 10 resumed with --skip_optimizer.
    """
    exits = [
        flags(mds_text, tokenizer_dir, out, f"exit_{ckpt}", f"--ckpt_type={ckpt}", *EXIT_FLAGS)
        for ckpt in ("full", "local")
    ]
    elastic = [
        flags(mds_tokens, tokenizer_dir, out, f"elastic_{ckpt}", f"--ckpt_type={ckpt}")
        + ["--exit_interval=4"]
        for ckpt in ("shard", "full")
    ]
    baselines = [
        flags(mds_text, tokenizer_dir, out, "text_baseline"),
        flags(mds_tokens, tokenizer_dir, out, "token_baseline"),
    ]
    torchrun_runs([*baselines, *exits, *elastic], out)
    for ckpt in ("full", "local"):
        kept = sorted(p.name for p in (out / f"exit_{ckpt}").glob("step_*"))
        assert kept == ["step_000004", "step_000006"]
    step_10 = out / "exit_full" / f"step_{STEPS - 2:06d}"  # kept by --keep_last 2
    skip = flags(mds_text, tokenizer_dir, out, "skip_optimizer", f"--resume_dir={step_10}")
    torchrun_runs([*exits, [*skip, "--skip_optimizer"]], out)
    names = ["text_baseline", "token_baseline", "exit_full", "exit_local", "skip_optimizer"]
    return {name: out / name for name in names}


@pytest.fixture(scope="module")
def text_baseline(runs) -> dict[int, float]:
    return logged_losses(runs["text_baseline"])


@pytest.fixture(scope="module")
def token_baseline(runs) -> dict[int, float]:
    return logged_losses(runs["token_baseline"])


@pytest.fixture(scope="module")
def interrupted(runs):
    """The run directory of exit_<ckpt_type> (see `runs`)."""
    return lambda ckpt_type: runs[f"exit_{ckpt_type}"]


@pytest.mark.parametrize("ckpt_type", ["full", "local"])
def test_exit_interval_then_auto_resume_is_bit_identical(
    ckpt_type, interrupted, text_baseline, runs
):
    run_dir = interrupted(ckpt_type)
    assert logged_losses(run_dir) == text_baseline  # exact equality, every step
    seen = [[r["tokens_seen"] for r in metrics_records(d) if "loss" in r]
            for d in (run_dir, runs["text_baseline"])]  # fmt: skip
    assert seen[0] == seen[1]  # restored at the resume, not counted from 0
    kept = sorted(p.name for p in run_dir.glob("step_*"))
    assert kept == [f"step_{STEPS - 2:06d}", f"step_{STEPS:06d}"]  # --keep_last 2


@pytest.fixture(scope="module")
def sigterm_run(out, mds_text, tokenizer_dir) -> Path:
    """A shard-format run (written in the background) whose last rank alone gets SIGTERM
    mid-run: every rank must stop after the same step (the ranks vote, and one vote to stop
    is enough), save, and exit with status 0; then the run is resubmitted with
    --resume_dir auto."""
    name = "sigterm_shard"
    run = flags(mds_text, tokenizer_dir, out, name, "--ckpt_type=shard", "--resume_dir=auto")
    run += ["--async_save"]
    proc = torchrun_background("train.py", *run)
    wait_for(lambda: len(losses_by_step_safe(out / name)) >= 2, proc)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGTERM)
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
    name = f"elastic_{ckpt_type}"  # stopped at step 4 on 2 ranks (see `runs`)
    run = flags(mds_tokens, tokenizer_dir, out, name, f"--ckpt_type={ckpt_type}")
    # Pre-tokenized blocks leave no partial buffers behind, so nothing is skipped or re-read.
    nothing_lost = "1 node x 2 ranks: 0 tokens left in the saved buffers are skipped; 0 documents"
    with pytest.warns(
        UserWarning, match=f"resuming on 1 node x 1 rank from a checkpoint of {nothing_lost}"
    ):
        train_in_process(*run, "--local_batch=4", f"--resume_dir={out / name / 'step_000004'}")
    resumed = logged_losses(out / name)
    assert resumed.keys() == token_baseline.keys()
    for step, loss in token_baseline.items():
        assert abs(resumed[step] - loss) <= 1e-4 * loss, (step, resumed[step], loss)


def test_the_same_world_size_on_another_node_layout_resumes_elastically(
    interrupted, mds_text, tokenizer_dir, tmp_path
):
    """2 ranks on 1 node, resumed as 2 nodes x 1 rank. streaming deals samples to (node, rank
    on node): from 4 ranks up, another layout gives global ranks other samples (1 x 4 -> 2 x 2
    swaps ranks 1 and 2), so each rank's saved skip count and leftover tokens belong to
    another stream. Any layout change takes the elastic path, and says so."""
    step = interrupted("full") / f"step_{STEPS - 2:06d}"
    run = flags(mds_text, tokenizer_dir, tmp_path, "relayout", f"--resume_dir={step}")
    output = torchrun_two_nodes([*run, "--ckpt_type=full"], tmp_path)[0]
    assert "resuming on 2 nodes x 1 rank from a checkpoint of 1 node x 2 ranks" in output
    assert sorted(logged_losses(tmp_path / "relayout")) == [STEPS - 1, STEPS]


def test_an_elastic_resume_at_an_odd_document_count_restarts_at_the_global_position(
    mds_text, tokenizer_dir, tmp_path
):
    """The elastic path's promise (docs/data.md, "Elastic resume") at a checkpoint where the 2
    ranks had packed an odd number of documents in all (rank 0 ahead by an odd count), resumed
    as 2 nodes x 1 rank: every rank restarts at the saved global position (rank r's i-th
    document is global sample 2i + r) with empty buffers, so the saved leftover tokens are
    skipped and the documents rank 0 was ahead are read again, as many as the warning says.
    Nothing else is lost or repeated: the run trains exactly as an exact resume on 1 node x 2
    ranks of that checkpoint with both ranks put at the global position (no skip, no
    buffers) - the same losses, and the same documents read to the end."""
    steps = ["--train_steps=6", "--save_every=3", "--ckpt_type=full"]
    whole = flags(mds_text, tokenizer_dir, tmp_path, "whole", *steps)
    torchrun_runs([whole], tmp_path)  # uninterrupted; saves steps 3 and 6
    step_3 = tmp_path / "whole" / "step_000003"

    def loader_states(step_dir: Path) -> list[dict]:
        files = [step_dir / f"rank_{rank:05d}.pt" for rank in (0, 1)]
        return [torch.load(file, weights_only=True)["loader"] for file in files]

    saved = loader_states(step_3)
    read = [state["position"] + state["skip"] for state in saved]  # documents each rank read
    assert sum(read) % 2 == 1, read  # an odd count: the ranks stand at different documents
    behind, ahead = saved[0]["position"], saved[0]["total_ahead_documents"]
    assert ahead == abs(read[0] - read[1]) == sum(state["skip"] for state in saved)
    assert saved[0]["dataset"]["sample_in_epoch"] == 2 * behind  # the global position

    # The reference: the same checkpoint, each rank at the global position, resumed exactly.
    at_global = tmp_path / "at_global_position"
    shutil.copytree(step_3, at_global)
    for rank, state in enumerate(saved):
        empty = {key: value[:0] for key, value in state["buffer"].items()}
        file = at_global / f"rank_{rank:05d}.pt"
        torch.save(
            torch.load(file, weights_only=True) | {"loader": state | {"skip": 0, "buffer": empty}},
            file,
        )
    reference = flags(mds_text, tokenizer_dir, tmp_path, "reference", *steps)
    torchrun_runs([[*reference, f"--resume_dir={at_global}"]], tmp_path)

    elastic = flags(mds_text, tokenizer_dir, tmp_path, "elastic", *steps)
    output = torchrun_two_nodes([*elastic, f"--resume_dir={step_3}"], tmp_path)[0]
    warning = (
        "resuming on 2 nodes x 1 rank from a checkpoint of 1 node x 2 ranks: "
        f"{saved[0]['total_leftover_tokens']} tokens left in the saved buffers are skipped; "
        f"{ahead} documents (about {saved[0]['total_ahead_tokens']} tokens and more) are "
        "read again"
    )
    assert warning in output, output[-3000:]

    assert logged_losses(tmp_path / "elastic") == logged_losses(tmp_path / "reference")
    ends = [loader_states(tmp_path / name / "step_000006") for name in ("elastic", "reference")]
    for got, want in zip(*ends, strict=True):
        assert got["layout"] == [2, 1]
        for key in ("position", "skip", "total_ahead_documents", "total_leftover_tokens"):
            assert got[key] == want[key], key
        assert got["dataset"]["sample_in_epoch"] == want["dataset"]["sample_in_epoch"]
        assert torch.equal(got["buffer"]["tokens"], want["buffer"]["tokens"])
    # The rank that was ahead has read those documents again, and gone on past them.
    assert ends[0][0]["position"] + ends[0][0]["skip"] > read[0] > behind


def test_resume_restores_the_random_state(mds_tokens, tokenizer_dir, tmp_path, monkeypatch):
    """Each rank's RNG comes back as it was saved (dropout, or anything else drawing from it,
    then continues as uninterrupted)."""
    from utils.checkpoint import Checkpointer

    run = flags(mds_tokens, tokenizer_dir, tmp_path, "rng", "--ckpt_type=full", "--save_every=2")
    run += ["--local_batch=4", "--num_workers=0", "--train_steps=2"]
    train_in_process(*run)
    step = tmp_path / "rng" / "step_000002"
    saved = torch.load(step / "rank_00000.pt", weights_only=True)["rng"]["cpu"]
    seen = []
    load = Checkpointer.load

    def load_then_look(self, *args, **kwargs):
        result = load(self, *args, **kwargs)
        seen.append(torch.get_rng_state())
        return result

    monkeypatch.setattr(Checkpointer, "load", load_then_look)
    train_in_process(*run, "--train_steps=3", f"--resume_dir={step}")
    assert not torch.equal(saved, torch.manual_seed(42).get_state())  # the run drew from it
    assert torch.equal(seen[0], saved)


@pytest.mark.parametrize("ckpt_type", ["shard", "full", "local"])
def test_the_optimizer_takes_its_moments_from_the_checkpoint_and_its_settings_from_the_flags(
    mds_tokens, tokenizer_dir, tmp_path, monkeypatch, ckpt_type
):
    """A checkpoint written before the optimizer groups had `lr_scale` (before #17) still
    resumes, and the resumed run trains with its own --beta2 and --weight_decay."""
    import train
    from utils.checkpoint import Checkpointer

    def without_lr_scale(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        for group in optimizer.param_groups:
            del group["lr_scale"]
        return optimizer

    build_optimizer = train.build_optimizer
    run = flags(mds_tokens, tokenizer_dir, tmp_path, "old", f"--ckpt_type={ckpt_type}")
    run += ["--local_batch=8", "--num_workers=0", "--save_every=2", "--train_steps=2"]
    with monkeypatch.context() as patch:
        patch.setattr(train, "build_optimizer", without_lr_scale)
        train_in_process(*run)
    groups, steps = [], set()
    load = Checkpointer.load

    def load_then_look(self, *args, **kwargs):
        result = load(self, *args, **kwargs)
        groups.extend(self.optimizer.param_groups)
        steps.update(float(state["step"]) for state in self.optimizer.state.values())
        return result

    monkeypatch.setattr(Checkpointer, "load", load_then_look)
    step = tmp_path / "old" / "step_000002"
    train_in_process(*run, "--run_name=new", f"--resume_dir={step}", "--train_steps=3",
                     "--beta2=0.99", "--weight_decay=0.05")  # fmt: skip
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.99)] * 2  # `full` gives a list
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0)]
    assert steps == {2.0}  # the moments of 2 steps
    assert logged_losses(tmp_path / "new").keys() == {3}


def test_a_wsd_cooldown_branched_from_a_stable_checkpoint_is_the_longer_run(
    mds_tokens, tokenizer_dir, tmp_path
):
    """One 4-step WSD run saves step 2 (its stable phase); resumed with --train_steps 6, it is
    the 6-step run from scratch: the schedule is recomputed from the new budget."""
    wsd = ["--lr_schedule=wsd", "--decay_fraction=0.5", "--local_batch=8", "--num_workers=0"]
    train_in_process(*flags(mds_tokens, tokenizer_dir, tmp_path, "long", *wsd, "--train_steps=6"))
    short = flags(mds_tokens, tokenizer_dir, tmp_path, "short", *wsd, "--save_every=2")
    train_in_process(*short, "--train_steps=4")
    branch = tmp_path / "short" / "step_000002"
    train_in_process(*short, "--run_name=branch", "--train_steps=6", f"--resume_dir={branch}")
    long, short_run, branched = (
        {r["step"]: (r["lr"], r["loss"]) for r in metrics_records(tmp_path / name) if "loss" in r}
        for name in ("long", "short", "branch")
    )
    assert short_run[3][0] < long[3][0]  # the short run was already cooling down at step 3
    assert branched == {step: long[step] for step in range(3, 7)}


def test_sigkill_of_a_rank_during_a_save_then_resubmit_recovers_exactly(
    text_baseline, out, mds_text, tokenizer_dir
):
    """A rank killed mid-write: the half-written checkpoint stays hidden, `auto` takes the
    previous one, and the re-submitted run ends with the uninterrupted run's losses."""
    name = "sigkill"
    run = flags(mds_text, tokenizer_dir, out, name, "--ckpt_type=shard", "--resume_dir=auto")
    run += ["--save_every=1"]
    proc = torchrun_background("train.py", *run)
    staging = wait_for(lambda: staging_dir_after_first(out / name), proc, poll=0.005)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run survived the kill: nothing was tested"
    killed_step = int(re.match(r"\.step_(\d+)\.partial-", staging.name)[1])
    complete = [int(p.name.split("_")[1]) for p in (out / name).glob("step_*")]
    assert killed_step not in complete and max(complete) == killed_step - 1, output[-2000:]
    resumed = torchrun("train.py", *run)
    assert f"resumed from {out / name / f'step_{killed_step - 1:06d}'}" in resumed.stdout
    assert logged_losses(out / name) == text_baseline
    assert not list((out / name).glob(".step_*")), "a staging directory was left behind"


def test_sigkill_of_a_rank_mid_run_under_max_restarts_recovers_exactly(
    text_baseline, out, mds_text, tokenizer_dir
):
    """Plain `torchrun --standalone --max-restarts=1` restarts the group in place; `auto`
    resumes it from the newest checkpoint. torchrun keeps one rendezvous store across
    restarts, where the restarted group read the killed group's gloo addresses and failed to
    connect or hung; each attempt now has a namespace of its own in it."""
    name = "max_restarts"
    run = flags(mds_text, tokenizer_dir, out, name, "--ckpt_type=shard", "--resume_dir=auto")
    run += ["--save_every=2"]
    proc = torchrun_background("train.py", *run, launcher=("--standalone", "--max-restarts=1"))
    wait_for(lambda: (out / name / "step_000004").is_dir(), proc, poll=0.01)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    resumed = re.search(rf"resumed from {out / name}/step_(\d+)", output)
    assert resumed and 4 <= int(resumed.group(1)) < STEPS, output[-3000:]
    assert logged_losses(out / name) == text_baseline


def test_converter_and_full_checkpoint_load_and_generate_in_transformers(
    interrupted, sigterm_run, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert import convert

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


def test_saving_transformers_weights_prints_nothing_and_leaves_progress_bars_as_they_were(
    tmp_path, capfd, monkeypatch
):
    """transformers 5 draws a progress bar on stderr for every save_pretrained: on rank 0 of a
    run it landed between the log lines at each `full` checkpoint, and before a save error's
    one line. transformers 4 draws none, so the save here draws one as 5 does, through
    transformers' own tqdm."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
    from transformers.utils import logging as hf_logging

    from utils.checkpoint import save_transformers_weights

    save_pretrained = PreTrainedModel.save_pretrained

    def save_with_a_bar(self, *args, **kwargs):
        for _ in hf_logging.tqdm(range(1), desc="Writing model shards"):
            pass
        return save_pretrained(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_with_a_bar)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    state = LlamaForCausalLM(config).state_dict()
    capfd.readouterr()
    hf_logging.enable_progress_bar()
    save_transformers_weights(config, state, tmp_path / "model")
    assert capfd.readouterr() == ("", "")
    assert hf_logging.is_progress_bar_enabled()
    assert (tmp_path / "model" / "model.safetensors").is_file()


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


def test_skip_optimizer_keeps_the_step_and_weights_but_not_the_moments(runs, text_baseline):
    resumed = logged_losses(runs["skip_optimizer"])
    first = STEPS - 1
    assert sorted(resumed) == [first, STEPS]  # the step count is kept
    # Same weights and data at the first step, so the same loss; then a fresh Adam differs.
    assert abs(resumed[first] - text_baseline[first]) <= 1e-4 * text_baseline[first]
    assert resumed[STEPS] != text_baseline[STEPS]
    # The learning rate is the step's own from the first resumed step on, not warm-up's start.
    rates = {r["step"]: r["lr"] for r in metrics_records(runs["skip_optimizer"])}
    baseline_rates = {r["step"]: r["lr"] for r in metrics_records(runs["text_baseline"])}
    assert rates == {step: baseline_rates[step] for step in (first, STEPS)}


def test_a_write_failure_on_one_rank_stops_every_rank_with_one_line(
    mds_tokens, tokenizer_dir, tmp_path
):
    """The run directory is on a 256 kB disk: step 2's `full` weights, which rank 0 alone
    writes, do not fit. Every rank must stop at once with the same line (rank 1 used to wait
    in a barrier until the process-group timeout), and nothing half-written may remain."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    run = flags(mds_tokens, tokenizer_dir, disk, "full_disk", "--ckpt_type=full", "--save_every=2")
    on_small_disk = f'mount -t tmpfs -o size=256k tmpfs {disk} && exec "$@"'
    launcher = ("--standalone", f"--log-dir={logs}", "--redirects=2")
    cmd = ["unshare", "--mount", "--", "sh", "-c", on_small_disk, "_"]
    cmd += torchrun_command("train.py", *run, launcher=launcher)
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, timeout=120)
    assert proc.returncode != 0
    errors = [f.read_text().strip().splitlines() for f in sorted(logs.rglob("stderr.log"))]
    assert len(errors) == 2, errors
    (line,) = errors[0]
    assert errors[1] == [line.replace("error: ", "error (rank 1): ", 1)], errors
    assert line.startswith(f"error: could not save step 2 in {disk / 'full_disk'} (rank 0: ")
    assert line.endswith("or change --output_dir; the checkpoints saved before are intact")


def test_an_old_checkpoint_that_cannot_be_deleted_costs_a_warning_not_the_run(
    mds_tokens, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    """--keep_last 1 on a file system that refuses to delete step 2: step 4 is saved and the
    run finishes (the failed prune used to be reported as a failed save of step 4)."""
    from utils import checkpoint
    from utils.checkpoint import checkpointer

    def refused(path):
        raise PermissionError(13, "Operation not permitted", str(path))

    monkeypatch.setattr(checkpointer, "delete_dir", refused)
    run = flags(mds_tokens, tokenizer_dir, tmp_path, "undeletable", "--save_every=2")
    train_in_process(*run, "--keep_last=1", "--local_batch=4", "--train_steps=4")
    run_dir = tmp_path / "undeletable"
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == [
        "step_000002",
        "step_000004",
    ]
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == (f"warning: --keep_last 1: could not delete {run_dir / 'step_000002'} "
                       f"([Errno 13] Operation not permitted: '{run_dir / 'step_000002'}'); "
                       "delete it by hand")  # fmt: skip


def test_a_run_removes_its_killed_leftovers_and_no_hidden_entry_of_the_users(
    mds_tokens, tokenizer_dir, tmp_path
):
    """Saving and --keep_last pruning stage under names the system picks: a user's entries
    named like them stay, whatever their names; what a killed save or prune left goes."""
    from utils import checkpoint

    run_dir = tmp_path / "kept"
    run = flags(mds_tokens, tokenizer_dir, tmp_path, "kept", "--save_every=2", "--local_batch=4")
    train_in_process(*run, "--train_steps=2")
    users = [".step_000002.tmp", ".step_000004.partial-original", ".step_000002.deleting",
             ".step_000002.deleting-backup_1", ".step_000004.old-20240101"]  # fmt: skip
    for name in users:
        (run_dir / name).mkdir()
        (run_dir / name / "notes.txt").write_text("mine")
    killed = [staging_of_a_gone_process(run_dir / "step_000004"),
              staging_of_a_gone_process(run_dir / "step_000002", "deleting")]  # fmt: skip
    train_in_process(*run, "--keep_last=1", "--train_steps=4", "--resume_dir=auto")
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["step_000004"]
    hidden = sorted(p.name for p in run_dir.glob(".step_*"))
    assert hidden == sorted(users), [path.parent.name for path in killed]
    assert all((run_dir / name / "notes.txt").read_text() == "mine" for name in users)


def test_a_checkpoint_whose_deletion_is_interrupted_no_longer_looks_complete(
    interrupted, tmp_path, monkeypatch
):
    import shutil

    from utils import checkpoint, files
    from utils.checkpoint import publish

    run_dir = tmp_path / "run"
    shutil.copytree(interrupted("full") / f"step_{STEPS:06d}", run_dir / "step_000012")

    def killed_midway(path, *args, **kwargs):
        next(Path(path).rglob("model.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(files.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        publish.delete_dir(run_dir / "step_000012")
    assert checkpoint.complete_checkpoints(run_dir) == []


def test_sigterm_to_the_whole_process_group_still_saves(mds_text, tokenizer_dir, tmp_path):
    """What SLURM's srun and many schedulers do: SIGTERM to every process of the job, the
    DataLoader worker included. The worker leaves it to its parent, which finishes the step,
    saves and exits with status 0 (a dead worker used to take it down first)."""
    run = flags(mds_text, tokenizer_dir, tmp_path, "group", "--ckpt_type=full")
    proc = subprocess.Popen(
        [sys.executable, "train.py", *run], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    wait_for(lambda: len(losses_by_step_safe(tmp_path / "group")) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "(SIGTERM)" in output
    assert len(list((tmp_path / "group").glob("step_*"))) == 1


def test_a_failing_evaluation_comes_after_the_save(
    mds_tokens, tokenizer_dir, tmp_path, monkeypatch
):
    import gzip

    import train

    c4 = tmp_path / "c4" / "c4-validation.json.gz"
    c4.parent.mkdir()
    with gzip.open(c4, "wt") as f:
        f.write(json.dumps({"text": "a document long enough " * 40}) + "\n")

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(train, "evaluate_sets", broken)
    run = flags(mds_tokens, tokenizer_dir, tmp_path, "eval_breaks", "--save_every=2")
    run += ["--local_batch=4", "--num_workers=0", "--eval_every=2", f"--eval_data={c4.parent}"]
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        train_in_process(*run)
    assert (tmp_path / "eval_breaks" / "step_000002" / "trainer.pt").is_file()


def test_a_crafted_optimizer_entry_is_not_run(tmp_path):
    """A `shard` checkpoint's non-tensor entries are pickles that DCP itself loads with
    the full unpickler (weights-only mode off); here they must be plain values."""
    import torch.distributed.checkpoint as dcp

    from utils.checkpoint import dcp_load
    from utils.errors import UserError

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    dcp.save({"optim": {"lr": RunsCode()}}, checkpoint_id=tmp_path / "crafted", no_dist=True)
    # Named as a checkpoint, not as --resume_dir: init_from and the converter read it too.
    crafted = re.escape(f"checkpoint {tmp_path / 'crafted'}: ")
    with pytest.raises(UserError, match=f"^{crafted}.*may run code"):
        dcp_load({"optim": {"lr": 0.0}}, tmp_path / "crafted", no_dist=True)
    assert not (tmp_path / "ran").exists()
    # and a crafted .metadata, which DCP's own fallback would report as "metadata is None"
    (tmp_path / "crafted" / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(UserError, match=f"^{crafted}its .metadata refers to posix.system"):
        dcp_load({"optim": {"lr": 0.0}}, tmp_path / "crafted", no_dist=True)
    assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def tied_runs(out, mds_tokens, tokenizer_dir) -> dict[str, Path]:
    """A Llama with tied embeddings, its tokenizer carrying a chat template, trained 2 steps
    with `full` and with `local` checkpoints (in this process)."""
    from transformers import AutoTokenizer

    config = out / "tied.json"
    config.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "tie_word_embeddings": True,
    }))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(str(out / "chat_tokenizer"))
    for ckpt in ("full", "local"):
        run = flags(mds_tokens, out / "chat_tokenizer", out, f"tied_{ckpt}", f"--ckpt_type={ckpt}")
        run += [f"--config={config}", "--train_steps=2", "--save_every=2", "--local_batch=4"]
        train_in_process(*run)
    return {ckpt: out / f"tied_{ckpt}" / "step_000002" for ckpt in ("full", "local")}


def test_exports_stop_at_the_tokenizers_eos_and_keep_its_files(tied_runs, tokenizer_dir, tmp_path):
    """Checkpoints and exports carry the tokenizer's special ids (not Llama's 1 and 2), the KV
    cache on, and the tokenizer as transformers saves it; a tied model converts from any
    format (a `full` or `local` one used to crash on the meta head and leave OUT.tmp)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from convert import convert

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    exported = {ckpt: convert(step, tmp_path / ckpt) for ckpt, step in tied_runs.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "local"]  # no OUT.tmp left
    for directory in [tied_runs["full"], *exported.values()]:
        config = json.loads((directory / "config.json").read_text())
        generation = GenerationConfig.from_pretrained(str(directory))
        assert config["eos_token_id"] == generation.eos_token_id == tokenizer.eos_token_id
        assert config["pad_token_id"] == tokenizer.pad_token_id and config["bos_token_id"] is None
        assert config["use_cache"] is True
        assert (directory / "chat_template.jinja").is_file()
    models = [AutoModelForCausalLM.from_pretrained(str(d)) for d in exported.values()]
    for model in models:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, tensor in models[0].state_dict().items():
        assert torch.equal(tensor, models[1].state_dict()[name]), name


def test_converting_onto_an_export_needs_overwrite(tied_runs, tmp_path):
    from convert import convert
    from utils.errors import UserError

    out = convert(tied_runs["full"], tmp_path / "model")
    with pytest.raises(UserError, match="already holds files"):
        convert(tied_runs["local"], out)
    assert convert(tied_runs["local"], out, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_converting_into_the_current_directory(tied_runs, tmp_path, monkeypatch):
    """OUT `.` is the directory itself, empty or (with --overwrite) an export."""
    from convert import convert

    umask = os.umask(0o022)
    os.umask(umask)
    (tmp_path / "here").mkdir()
    for overwrite in (False, True):
        monkeypatch.chdir(tmp_path / "here")  # a new directory took the old one's name
        convert(tied_runs["full"], Path("."), overwrite=overwrite)
        weights = tmp_path / "here" / "model.safetensors"
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask  # not private (0600)
        assert (tmp_path / "here" / "config.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


@pytest.mark.parametrize(
    "other",
    ["step_000002/", "notes.txt", "trainer.pt", "metrics.jsonl", "config.json/", "link",
     "no config.json (a tokenizer)", "no training.json (a model saved elsewhere)"],
)  # fmt: skip
def test_overwrite_replaces_an_export_and_nothing_else(tied_runs, tmp_path, other):
    """--overwrite onto a run directory, a tokenizer, or an export a user added files to, would
    take them with it: only a directory of an export's own files is replaced."""
    from convert import convert, main

    out = convert(tied_runs["full"], tmp_path / "model")
    if other.startswith("no training.json"):
        (out / "training.json").unlink()
    elif other.startswith("no config.json"):
        for path in out.iterdir():
            if not path.name.startswith(("tokenizer", "special_tokens")):
                path.unlink()
    elif other == "link":
        (out / "tokenizer.json").unlink()
        (out / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
        (tmp_path / "elsewhere.json").write_text("{}")
    elif other.endswith("/"):
        if other == "config.json/":
            (out / "config.json").unlink()
        (out / other.rstrip("/")).mkdir()
    else:
        (out / other).write_text("mine")
    before = sorted((p.name, p.is_dir()) for p in out.iterdir())
    with pytest.raises(SystemExit) as stop:
        main([str(tied_runs["local"]), str(out), "--overwrite"])
    assert stop.value.code == 2
    assert sorted((p.name, p.is_dir()) for p in out.iterdir()) == before


def test_auto_ignores_staging_directories(interrupted, tmp_path):
    import shutil

    from utils.checkpoint import resolve_resume_dir
    from utils.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(interrupted("full") / f"step_{STEPS:06d}", run / "step_000002")
    staging_of_a_gone_process(run / "step_000004")
    assert resolve_resume_dir("auto", run, STEPS) == run / "step_000002"
    assert resolve_resume_dir("auto", tmp_path / "fresh", STEPS) is None
    (run / "step_000006").mkdir()  # no trainer.pt: not this run's, and in the way of its saves
    with pytest.raises(UserError, match="holds step_000006, after step_000002"):
        resolve_resume_dir("auto", run, STEPS)


# ---------------------------------------------------------------- process helpers
def staging_dir_after_first(run_dir: Path) -> Path | None:
    """A checkpoint being written, once a complete one exists to fall back on."""
    staging = (
        p for p in run_dir.glob(".step_*.partial-*") if not p.name.startswith(".step_000001.")
    )
    return next(staging, None)


def worker_pids(torchrun_pid: int) -> list[int]:
    """The training processes torchrun started (its children running train.py)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    return sorted(int(pid) for pid in children)


@pytest.mark.parametrize("ckpt", ["shard", "full", "local"])
def test_a_tied_embedding_model_resumes_and_starts_others_from_every_format(
    ckpt, mds_tokens, tokenizer_dir, tmp_path
):
    """A `full` checkpoint holds a tied head once, under the embedding; resuming it (every
    SLURM requeue) failed with `Missing key(s) in state_dict: "lm_head.weight"`."""
    from utils.model import NAMED_SHAPES

    config = tmp_path / "tied.json"
    config.write_text(json.dumps(NAMED_SHAPES["tiny"] | {"model_type": "llama",
                                                         "tie_word_embeddings": True}))  # fmt: skip
    run = [*flags(mds_tokens, tokenizer_dir, tmp_path, "tied", f"--ckpt_type={ckpt}"),
           f"--config={config}", "--local_batch=4", "--save_every=2", "--train_steps=4"]  # fmt: skip
    train_in_process(*run, "--exit_interval=2")
    train_in_process(*run, "--resume_dir=auto")
    assert logged_losses(tmp_path / "tied").keys() == {1, 2, 3, 4}
    if ckpt != "local":  # a local checkpoint is refused as --init_from, as any model's is
        started = [arg.replace("--run_name=tied", "--run_name=started") for arg in run]
        train_in_process(*started, f"--init_from={tmp_path / 'tied' / 'step_000004'}")
