"""Checks on the file system that every command makes the same way, and the hidden siblings
commands write beside their outputs."""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    under_file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if under_file is not None:
        raise UserError(f"{flag} {path} lies under a file ({under_file}); give a directory path")
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


def check_replaceable(
    directory: Path, flag: str, what: str, is_ours: Callable[[str], bool]
) -> None:
    """`--overwrite` replaces `directory` whole: only when it is a real directory (no link)
    holding nothing but plain files a command writes (`is_ours(name)`), so that no file of the
    user's goes with it. `what` names the kind, e.g. "an export"; anything else is a UserError
    naming the first other entry."""
    if directory.is_symlink():
        raise UserError(
            f"{flag} {directory} is a symbolic link; --overwrite replaces a directory: give the "
            "directory it points to, or a new one"
        )
    foreign = sorted(
        entry.name
        for entry in directory.iterdir()
        if not is_ours(entry.name) or entry.is_symlink() or not entry.is_file()
    )
    if foreign:
        raise UserError(
            f"{flag} {directory} holds {foreign[0]} besides {what}; --overwrite replaces only "
            f"{what} (nothing of yours goes with it): choose a new directory"
        )
    reason = why_not_writable(directory.parent)
    if reason is not None:
        raise UserError(
            f"{flag} {directory} cannot be replaced: {directory.parent} allows no new file "
            f"({reason}); give a directory you can write"
        )


# tempfile's names: 8 characters of this alphabet after the prefix.
_SYSTEM_NAMED = re.compile(r"[a-z0-9_]{8}")


def hidden_sibling(final: Path, kind: str, directory: bool = True) -> Path:
    """A new, empty hidden sibling of `final` (`.NAME.KIND-xxxxxxxx`, a directory or a file),
    named by the system so that it is never a file of the user's: what a command writes before
    renaming it into place, or where an old output waits until the new one is in. Its mode is
    what the umask gives a new one (tempfile would make it private)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.{kind}-"
    if directory:
        path = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix))
        path.chmod(0o777 & ~_umask())
        return path
    handle, name = tempfile.mkstemp(dir=final.parent, prefix=prefix, suffix=final.suffix)
    os.close(handle)
    Path(name).chmod(0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_leftover_siblings(final: Path, kind: str, suffix: str = "") -> None:
    """What a killed run of the command left beside `final`: the siblings `hidden_sibling`
    names, and nothing else (a user's `.NAME.KIND` stays)."""
    prefix = f".{final.name}.{kind}-"
    for path in final.parent.glob(glob.escape(prefix) + "*"):
        name = path.name[len(prefix) :]
        if not (name.endswith(suffix) and _SYSTEM_NAMED.fullmatch(name.removesuffix(suffix))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def staging_dir(final: Path, kind: str = "partial") -> Iterator[Path]:
    """A new hidden sibling directory to write `final` into (a killed run's left over ones
    removed first); removed if the body fails. The caller publishes it with `replace_dir`."""
    remove_leftover_siblings(final, kind)
    staging = hidden_sibling(final, kind)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(staging: Path, final: Path) -> None:
    """Rename `staging` into place as `final`; an older `final` (an output being replaced, or
    the empty directory a user made for it) goes only once the new one is in."""
    remove_leftover_siblings(final, "old")
    old = hidden_sibling(final, "old")
    if final.exists():
        final.rename(old)  # onto the empty directory just made
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    handle = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
