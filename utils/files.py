"""Checks on the file system that every command makes the same way, and the hidden siblings
commands write beside their outputs."""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError


def why_not_writable(directory: Path) -> str | None:
    """Why no file can be created in `directory` (made first, with its parents), or None.
    Creating one is the only check root cannot fool (permission bits do not stop it)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_new_output_dir(path: Path, flag: str, if_full: str) -> None:
    """`path` can become a new directory of a command's output: it lies under no file, its
    parent can be written (made first, with its parents), and it is no file and holds no
    files. `flag` names it and `if_full` says what to do about a directory that holds files;
    anything else is a UserError saying why."""
    path = absolute(path)
    under_file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if under_file is not None:
        raise UserError(f"{flag} {path} lies under a file ({under_file}); give a directory path")
    if path.is_symlink():
        raise UserError(
            f"{flag} {path} is a symbolic link; give the directory it points to, or a new one"
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a new directory")
    reason = why_not_writable(path.parent)
    if reason is not None:
        raise UserError(
            f"{flag} {path} cannot be written: {path.parent} allows no new file ({reason}); "
            "give a directory you can write"
        )
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{flag} {path} already holds files; {if_full}")
    check_stageable(path, flag)


def check_stageable(path: Path, flag: str) -> None:
    """`path`'s name leaves room for the hidden siblings it is staged in (`.NAME.KIND-xxxxxxxx`),
    so that a long name fails now rather than after all the work."""
    final = absolute(path)
    longest = os.pathconf(final.parent, "PC_NAME_MAX") - _SIBLING_EXTRA
    if len(os.fsencode(final.name)) > longest:
        raise UserError(
            f"{flag} {path}: the name is too long to stage a hidden copy beside it; give a name "
            f"of at most {longest} bytes"
        )


@dataclass(frozen=True)
class Replaceable:
    """What `--overwrite` may replace whole: a real directory (no link) of `what` (e.g. "an
    export") that holds `marker` and nothing but plain files the command writes
    (`is_ours(name)`), so that no file of the user's goes with it. `flag` names it in errors."""

    flag: str
    what: str
    is_ours: Callable[[str], bool]
    marker: str

    def check(self, directory: Path) -> None:
        """A UserError unless `directory` may be replaced (checked before the work starts, and
        again on what is swapped out when the new output goes in)."""
        if directory.is_symlink():
            raise UserError(
                f"{self.flag} {directory} is a symbolic link; --overwrite replaces a directory: "
                "give the directory it points to, or a new one"
            )
        problem = self.problem(directory)
        if problem:
            raise UserError(
                f"{self.flag} {directory} {problem}; --overwrite replaces only {self.what} "
                "(nothing of yours goes with it): choose a new directory"
            )
        reason = why_not_writable(directory.parent)
        if reason is not None:
            raise UserError(
                f"{self.flag} {directory} cannot be replaced: {directory.parent} allows no new "
                f"file ({reason}); give a directory you can write"
            )
        check_stageable(directory, self.flag)

    def problem(self, directory: Path) -> str | None:
        """Why `directory` (a real one) is not only `what`, or None."""
        foreign = sorted(
            entry.name
            for entry in directory.iterdir()
            if not self.is_ours(entry.name) or entry.is_symlink() or not entry.is_file()
        )
        if foreign:
            return f"holds {foreign[0]} besides {self.what}"
        if not (directory / self.marker).is_file():
            return f"holds no {self.marker}, so it is not {self.what}"
        return None


# A staging directory is `.NAME.KIND-xxxxxxxx/` (the name tempfile picks) holding OWNER_FILE,
# which says which process made it, and OUTPUT, what is written and then renamed into place.
# Only a directory holding an owner file of ours whose process is gone is ever removed as a
# leftover: a sibling of the user's, whatever its name, or one another command is still
# writing, is never touched.
OWNER_FILE = "owner.json"
OUTPUT = "output"
_WRITER = "llm-playground"
_SIBLING_EXTRA = len("..deleting-") + 8  # what a hidden sibling adds to NAME, at the most


def absolute(path: Path | str) -> Path:
    """`path` made absolute without following links: `.` or `..` has no name to stage beside."""
    return Path(os.path.abspath(path))


def _sibling_prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-"


def new_staging(final: Path, kind: str = "partial") -> Path:
    """A new, empty directory to write `final` into, inside a hidden sibling of `final` marked
    as this process's (a killed run's left over ones removed first). Publish it with
    `publish_dir`; `discard_staging` removes what is left."""
    final = absolute(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_stagings(final.parent, glob.escape(_sibling_prefix(final, kind)) + "*")
    wrapper = Path(tempfile.mkdtemp(dir=final.parent, prefix=_sibling_prefix(final, kind)))
    owner = {"writer": _WRITER, "host": socket.gethostname(), "pid": os.getpid(),
             "started": _process_start(os.getpid())}  # fmt: skip
    (wrapper / OWNER_FILE).write_text(json.dumps(owner))
    staging = wrapper / OUTPUT
    staging.mkdir()  # the mode the umask gives, which the published output keeps
    return staging


def discard_staging(staging: Path) -> None:
    """Remove the hidden sibling `staging` lies in, with whatever is left in it."""
    shutil.rmtree(staging.parent, ignore_errors=True)


@contextmanager
def staging_dir(final: Path, kind: str = "partial") -> Iterator[Path]:
    """`new_staging` for the body, which writes there and calls `publish_dir`; what is left
    (all of it if the body fails) is removed at the end."""
    staging = new_staging(final, kind)
    try:
        yield staging
    finally:
        discard_staging(staging)


def remove_dead_stagings(directory: Path, pattern: str) -> None:
    """The staging directories in `directory` matching `pattern` whose process is gone (a
    killed run's); anything else is left alone."""
    for wrapper in directory.glob(pattern):
        if _made_by_a_gone_process(wrapper):
            shutil.rmtree(wrapper, ignore_errors=True)


def _made_by_a_gone_process(wrapper: Path) -> bool:
    if wrapper.is_symlink() or not wrapper.is_dir():
        return False
    try:
        owner = json.loads((wrapper / OWNER_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # not a staging directory of ours
    if not isinstance(owner, dict) or owner.get("writer") != _WRITER:
        return False
    if owner.get("host") != socket.gethostname():
        return False  # another machine's: whether it still runs cannot be told from here
    pid = owner.get("pid")
    started = owner.get("started")
    return started is not None and (not isinstance(pid, int) or _process_start(pid) != started)


def _process_start(pid: int) -> str | None:
    """When process `pid` started (so that a reused pid is told apart), or None if it is gone
    or this system has no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19]  # field 22 of proc(5), counted from the state (field 3)


def publish_dir(staging: Path, final: Path, replace: Replaceable | None = None) -> None:
    """Rename `staging` into place as `final` in one step. `final` may be missing or an empty
    directory; with `replace`, also an output it allows, which is swapped out whole and then
    removed with the staging. Files that appeared in `final` while the command ran are never
    replaced: a UserError says so, and the new output is not published."""
    final = absolute(final)
    _give_umask_modes(staging)
    if replace is not None and final.is_dir() and not final.is_symlink() and any(final.iterdir()):
        _swap_in(staging, final, replace)
    else:
        try:
            staging.rename(final)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise _changed_meanwhile(final, replace, "it gained files") from err
    _sync_directory(final.parent)


def _give_umask_modes(staging: Path) -> None:
    """The modes the umask gives new files and directories, on everything in `staging`:
    safetensors writes its files private (0600), which would hide an export or a checkpoint
    from the rest of a group sharing the disk."""
    mask = _umask()
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    """This process's umask, read without changing it (/proc), else set and put back."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8
        )
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _swap_in(staging: Path, final: Path, replace: Replaceable) -> None:
    try:
        _exchange(staging, final)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        _replace_in_two_renames(staging, final, replace)
        return
    problem = replace.problem(staging)  # the old output, now at the staging path
    if problem:
        _exchange(staging, final)  # put it back as it was
        raise _changed_meanwhile(final, replace, problem)


def _replace_in_two_renames(staging: Path, final: Path, replace: Replaceable) -> None:
    """Where the file system cannot swap two directories: the old output moves to a hidden
    sibling that nothing removes but this call (a kill between the renames leaves it there, and
    no `final`), the new one takes its place, then the old one goes."""
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=_sibling_prefix(final, "old")))
    final.rename(old)
    problem = replace.problem(old)
    try:
        if problem:
            raise _changed_meanwhile(final, replace, problem)
        staging.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _changed_meanwhile(final: Path, replace: Replaceable | None, problem: str) -> UserError:
    flag = f"{replace.flag} " if replace is not None else ""
    return UserError(
        f"{flag}{final} changed while this command ran ({problem}); it was left as it is and "
        "the new output was not written: run again with a new directory"
    )


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> None:
    """Swap two directories in one step (Linux's renameat2 with RENAME_EXCHANGE)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    paths = os.fsencode(first), os.fsencode(second)
    if renameat2(_AT_FDCWD, paths[0], _AT_FDCWD, paths[1], _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


def _sync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
