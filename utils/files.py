"""Checks on the file system that every command makes the same way."""

from __future__ import annotations

import tempfile
from pathlib import Path


def why_not_writable(directory: Path) -> str | None:
    """Why no file can be created in `directory` (made first, with its parents), or None.
    Creating one is the only check root cannot fool (permission bits do not stop it)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        return err.strerror or str(err)
    return None
