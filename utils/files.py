"""Checks on the file system that every command makes the same way, and the hidden siblings
commands write beside their outputs."""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import socket
import stat
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


def check_output_dir(
    path: Path, flag: str, if_full: str, replaceable: Replaceable | None = None
) -> Replacing | None:
    """`path` can become the directory of a command's output: it lies under no file and is
    no link or file, its parent can be written (made first, with its parents), and it holds no
    files, or with `replaceable` (an --overwrite) holds that kind of output, which is returned
    for `publish_dir` to replace. `flag` names it and `if_full` says what to do about a
    directory that holds files; anything else is a UserError saying why."""
    path = absolute(path)
    check_stageable(path, flag)
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
    if not (path.is_dir() and _entries(path, flag)):
        return None
    if replaceable is None:
        raise UserError(f"{flag} {path} already holds files; {if_full}")
    return replaceable.check(path)


def _entries(directory: Path, flag: str) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError as err:
        raise UserError(
            f"{flag} {directory} cannot be read ({err.strerror}); give a directory you can read"
        ) from None


def check_stageable(path: Path, flag: str) -> None:
    """`path`'s name leaves room for the hidden siblings it is staged in (`.NAME.KIND-xxxxxxxx`),
    so that a long name fails now rather than after all the work."""
    final = absolute(path)
    try:
        str(final).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} {path}: the path is not valid UTF-8; give a UTF-8 name") from None
    existing = next(p for p in final.parents if p.is_dir())
    longest = os.pathconf(existing, "PC_NAME_MAX") - _SIBLING_EXTRA
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

    def check(self, directory: Path) -> Replacing:
        """A UserError unless the real, writable-beside `directory` (`check_output_dir` checks
        that) may be replaced; else what `publish_dir` replaces: this directory as it is now,
        and nothing it becomes meanwhile."""
        problem = self.problem(directory)
        if problem:
            raise UserError(
                f"{self.flag} {directory} {problem}; --overwrite replaces only {self.what} "
                "(nothing of yours goes with it): choose a new directory"
            )
        return Replacing(self.flag, directory_state(directory))

    def problem(self, directory: Path) -> str | None:
        """Why `directory` (a real one) is not only `what`, or None."""
        foreign = sorted(
            entry.name
            for entry in _entries(directory, self.flag)
            if not self.is_ours(entry.name) or entry.is_symlink() or not entry.is_file()
        )
        if foreign:
            return f"holds {foreign[0]} besides {self.what}"
        if not (directory / self.marker).is_file():
            return f"holds no {self.marker}, so it is not {self.what}"
        return None


@dataclass(frozen=True)
class Replacing:
    """An output `--overwrite` may replace (`Replaceable.check`), as it was when checked."""

    flag: str
    state: tuple


def directory_state(directory: Path) -> tuple:
    """What tells that a directory is still the one checked: its identity, and each entry's
    name, identity, size and times of change."""
    own = directory.lstat()
    if not stat.S_ISDIR(own.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory))
    entries = sorted(
        (entry.name, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        for entry in directory.iterdir()
        for info in [entry.lstat()]
    )
    return own.st_dev, own.st_ino, tuple(entries)


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
    owner = {"writer": _WRITER, "host": socket.gethostname(), "pid_namespace": _pid_namespace(),
             "pid": os.getpid(), "started": _process_start(os.getpid())}  # fmt: skip
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
        if _SYSTEM_NAMED.fullmatch(wrapper.name.rsplit("-", 1)[-1]) and _made_by_a_gone_process(
            wrapper
        ):
            shutil.rmtree(wrapper, ignore_errors=True)


# tempfile's names: 8 characters of this alphabet after the prefix.
_SYSTEM_NAMED = re.compile(r"[a-z0-9_]{8}")
_OWNER_MAX_BYTES = 4096


def _made_by_a_gone_process(wrapper: Path) -> bool:
    """True only for a staging directory of ours whose process, on this machine and in this
    process namespace, is gone; anything else (unreadable, odd, elsewhere) is kept."""
    owner_file = wrapper / OWNER_FILE
    if wrapper.is_symlink() or not wrapper.is_dir() or owner_file.is_symlink():
        return False
    try:
        if not owner_file.is_file() or owner_file.stat().st_size > _OWNER_MAX_BYTES:
            return False
        owner = json.loads(owner_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(owner, dict) or owner.get("writer") != _WRITER:
        return False
    here = {"host": socket.gethostname(), "pid_namespace": _pid_namespace()}
    if any(owner.get(key) != value for key, value in here.items()) or None in here.values():
        return False  # another machine's or container's: whether it runs cannot be told
    pid, started = owner.get("pid"), owner.get("started")
    if type(pid) is not int or not isinstance(started, str):
        return False
    return _process_start(pid) != started


def _pid_namespace() -> int | None:
    """The process-ID namespace this runs in (containers on one host share its name)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started (so that a reused pid is told apart), or None if it is gone
    or this system has no /proc."""
    try:  # field 22 of proc(5), the 20th after the command's closing parenthesis
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def publish_dir(staging: Path, final: Path, replacing: Replacing | None = None) -> None:
    """Rename `staging` into place as `final` in one step. `final` may be missing or an empty
    directory; with `replacing`, it is the output checked then, which is swapped out whole and
    then removed with the staging. Anything else (files that appeared in `final`, or a
    replaced output that changed, while the command ran) is never replaced: a UserError says
    so, and the new output is not published."""
    final = absolute(final)
    _give_umask_modes(staging)
    if replacing is not None:
        _swap_in(staging, final, replacing)
    else:
        try:
            staging.rename(final)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise _changed_meanwhile(final, None) from err
    _sync_directory(final.parent)


def _give_umask_modes(staging: Path) -> None:
    """The modes the umask gives new files and directories, on everything in `staging`:
    safetensors writes its files private (0600), which would hide an export or a checkpoint
    from the rest of a group sharing the disk."""
    mask = _umask()
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():  # the setgid bit a shared directory passes on is kept
            special = path.stat().st_mode & 0o7000
            path.chmod(special | (0o777 if path.is_dir() else 0o666) & ~mask)


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


def _swap_in(staging: Path, final: Path, replacing: Replacing) -> None:
    try:
        _exchange(staging, final)
    except FileNotFoundError:
        raise _changed_meanwhile(final, replacing) from None
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        _replace_in_two_renames(staging, final, replacing)
        return
    try:
        unchanged = _state_or_none(staging) == replacing.state  # the old output, swapped out
    except BaseException:
        _exchange(staging, final)
        raise
    if not unchanged:
        _exchange(staging, final)  # put it back as it was
        raise _changed_meanwhile(final, replacing)


def _replace_in_two_renames(staging: Path, final: Path, replacing: Replacing) -> None:
    """Where the file system cannot swap two directories: the old output moves to a hidden
    sibling that nothing removes but this call (a kill between the renames leaves it there, and
    no `final`), the new one takes its place, then the old one goes."""
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=_sibling_prefix(final, "old")))
    try:
        final.rename(old)  # onto the empty directory just made: only a directory goes there
    except OSError as err:
        old.rmdir()
        if err.errno in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
            raise _changed_meanwhile(final, replacing) from None
        raise
    try:
        if _state_or_none(old) != replacing.state:
            raise _changed_meanwhile(final, replacing)
        staging.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _state_or_none(directory: Path) -> tuple | None:
    try:
        return directory_state(directory)
    except OSError:
        return None


def _changed_meanwhile(final: Path, replacing: Replacing | None) -> UserError:
    if replacing is None:
        what, flag = "it is no longer missing or empty", ""
    else:
        what, flag = "it is no longer the output checked at the start", f"{replacing.flag} "
    return UserError(
        f"{flag}{final} changed while this command ran ({what}); it was left as it is and the "
        "new output was not written: run again with a new directory"
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
