"""Checks on the file system that every command makes the same way."""

from __future__ import annotations

import tempfile
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
