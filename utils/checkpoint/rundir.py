"""What a run may do with its run directory, `output_dir/run_name/`.

One run writes there at a time: rank 0 holds a lock on `.lock` for the whole run, and a second
run of the same name is refused. A run only ever adds to what it finds there: it starts a
directory that holds no run, or continues a run from its newest checkpoint. Anything else
(branching from an earlier step or from another run's checkpoint, rerunning a finished run)
goes to a new --run_name, so nothing an earlier run wrote is overwritten, moved or deleted
(--keep_last aside, which the user asks for).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from utils.checkpoint.layout import (
    STEP_DIR,
    checkpoint_problem,
    complete_checkpoints,
    step_dir_name,
    step_number,
)
from utils.distributed import DistEnv, broadcast_from_main
from utils.errors import UserError
from utils.metrics import METRICS_FILE, last_logged_step, recorded_train_steps

LOCK_FILE = ".lock"


@contextlib.contextmanager
def own_run_dir(
    run_dir: Path, env: DistEnv, resume_flag: str | None, train_steps: int
) -> Iterator[Path | None]:
    """Hold the run directory for the body, which gets the checkpoint to resume from
    (resolve_resume_dir). Rank 0 takes the lock and applies the rules; every rank gets its
    answer (a collective), so ranks that see the file system differently still agree, and a
    refusal on rank 0 never leaves the others waiting. The lock goes with the process, so a
    killed or preempted run never leaves it held."""
    fd, answer = _own(run_dir, resume_flag, train_steps) if env.is_main else (None, None)
    refusal, resume_dir = broadcast_from_main(answer)
    if refusal:
        raise UserError(refusal)
    try:
        yield resume_dir
    finally:
        if fd is not None:
            os.close(fd)


def _own(
    run_dir: Path, resume_flag: str | None, train_steps: int
) -> tuple[int | None, tuple[str | None, Path | None]]:
    """Rank 0's part: the lock's descriptor, and (refusal, checkpoint to resume from)."""
    try:
        fd, refusal = _lock(run_dir)
    except OSError as err:
        return None, (f"--output_dir: cannot use {run_dir} ({err.strerror or err})", None)
    if refusal:
        return None, (refusal, None)
    try:
        return fd, (None, resolve_resume_dir(resume_flag, run_dir, train_steps))
    except (UserError, OSError) as err:
        os.close(fd)
        return None, (str(err), None)


def _lock(run_dir: Path) -> tuple[int | None, str | None]:
    foreign = _foreign_directory(run_dir)
    if foreign:  # before the lock file is made: nothing is written into such a directory
        return None, foreign
    lock = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        return None, f"--output_dir: cannot create {lock} ({err.strerror or err})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, (
            f"--run_name {run_dir.name}: {run_dir} is in use by another run ({holder}); "
            "wait for it to end, or pick a new --run_name"
        )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return fd, None


def _foreign_directory(run_dir: Path) -> str | None:
    """A run directory is new, empty, or a run's; anything else (a checkpoint, an export, a
    dataset, a file) is someone else's."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"--run_name {run_dir.name}: {run_dir} is a file; pick a new --run_name"
    others = sorted(p.name for p in _entries(run_dir) if p.name != LOCK_FILE)
    if others and not holds_a_run(run_dir):
        return (
            f"--run_name {run_dir.name}: {run_dir} holds files that are not a run's "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
            "pick a new --run_name or --output_dir"
        )
    return None


def holds_a_run(run_dir: Path) -> bool:
    return (run_dir / METRICS_FILE).exists() or any(
        STEP_DIR.match(p.name) for p in _entries(run_dir)
    )


def resolve_resume_dir(flag: str | None, run_dir: Path, train_steps: int) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), checked whole and against the
    rules above before anything is built; a UserError says what to do instead."""
    _refuse_linked_steps(run_dir)
    found = complete_checkpoints(run_dir)
    if flag is None:
        if holds_a_run(run_dir):
            raise UserError(
                f"--run_name {run_dir.name}: {run_dir} already holds a run; continue it with "
                "--resume_dir auto, or pick a new --run_name"
            )
        return None
    if flag == "auto":
        if not found:
            _refuse_finished_run_without_checkpoint(run_dir, train_steps)
            _refuse_entries_after(run_dir, 0)  # a damaged step_<N> is not this run's to replace
            return None
        _refuse_damaged_newest(found)
        chosen = found[-1]
    else:
        chosen = Path(flag)
        problem = checkpoint_problem(chosen)
        if problem:
            raise UserError(f"--resume_dir {flag}: {problem}; give an intact step_<N>")
        if holds_a_run(run_dir) and not _is_newest(chosen, found):
            newest = f"its newest checkpoint is {found[-1]}" if found else "it has no checkpoint"
            raise UserError(
                f"--resume_dir {flag}: {run_dir} already holds a run and {newest}; continue "
                "that run with --resume_dir auto, or branch from this checkpoint under a new "
                "--run_name"
            )
    _refuse_entries_after(run_dir, step_number(found[-1]) if _is_newest(chosen, found) else 0)
    return chosen


def _is_newest(chosen: Path, found: list[Path]) -> bool:
    return bool(found) and chosen.resolve() == found[-1].resolve()


def _refuse_linked_steps(run_dir: Path) -> None:
    """A run's checkpoints are directories it wrote: a link named like one would be resumed as
    the run's own, and pruned as such."""
    links = sorted(p.name for p in _entries(run_dir) if STEP_DIR.match(p.name) and p.is_symlink())
    if links:
        raise UserError(
            f"{run_dir} holds {', '.join(links)}, a link and not a checkpoint this run wrote; "
            "resume from its target under a new --run_name, or move the link away"
        )


def _refuse_damaged_newest(found: list[Path]) -> None:
    problem = checkpoint_problem(found[-1])
    if problem is None:
        return
    intact = next((p for p in reversed(found[:-1]) if checkpoint_problem(p) is None), None)
    fallback = (
        f"move it out of the run directory to resume from {intact}"
        if intact
        else "none before it is intact"
    )
    raise UserError(f"--resume_dir auto: the newest checkpoint {found[-1]}: {problem}; {fallback}")


def _refuse_finished_run_without_checkpoint(run_dir: Path, train_steps: int) -> None:
    """A run killed before its first checkpoint starts again from step 0; one that reached
    its last step (with --save_every 0) is done, and is not trained again in place, also when
    asked for more steps than it ran: its last step is the one its config.json records."""
    last = last_logged_step(run_dir)
    recorded = recorded_train_steps(run_dir)
    if last is not None and last >= min(train_steps, recorded or train_steps):
        raise UserError(
            f"--resume_dir auto: {run_dir} holds a finished run (step {last} logged) with no "
            "checkpoint to continue from; pick a new --run_name"
        )


def _refuse_entries_after(run_dir: Path, step: int) -> None:
    """Whatever is named like a later checkpoint (a user's file, a directory from elsewhere)
    would be in the way of this run's saves: it is never replaced."""
    later = sorted(
        p.name for p in _entries(run_dir) if (m := STEP_DIR.match(p.name)) and int(m[1]) > step
    )
    if later:
        raise UserError(
            f"{run_dir} holds {', '.join(later)}, after {step_dir_name(step)} where this run "
            "starts, which its saves would replace; move them away, or pick a new --run_name"
        )


def _entries(run_dir: Path) -> list[Path]:
    return list(run_dir.iterdir()) if run_dir.is_dir() else []
