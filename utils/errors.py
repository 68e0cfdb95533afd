"""The one error type for a user's mistake, and how every command reports it.

A `UserError` is bad input (a flag, a file, a checkpoint, data) or a run that has to stop for
a reason the user can act on; its message names the flag or file and says what to do. Each
command catches it in one place, `exit_on_user_error`, and prints it as one line with status 2.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

USER_ERROR_STATUS = 2


class UserError(ValueError):
    """A mistake the user can fix; the message is one line naming the flag or file."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Around a command's whole body: a UserError ends it with one line and status 2."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line, without the usage block (train.py's
    runs to twenty lines)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")
