"""The one error type for a user's mistake, and how every command reports it.

A `UserError` is bad input (a flag, a file, a checkpoint, data) or a run that has to stop for
a reason the user can act on; its message names the flag or file and says what to do. Each
command catches it in one place, `exit_on_user_error`, and prints it as one line with status 2.
Any other exception is a bug and keeps its traceback.

Under torchrun (docs/training.md#bad-input) rank 0 prints `error: ...`; another rank prints
`error (rank N): ...`, unless the error is one every rank raises alike (`every_rank`: a bad
flag or path, found before any rank-specific work) and the rank is not its node's first:
such a rank stays silent until torchrun, seeing its node's first rank exit, ends it. One
line per node, and never none: a rank still alive after `EVERY_RANK_GRACE_S` prints its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import NoReturn

USER_ERROR_STATUS = 2


EVERY_RANK_GRACE_S = 60.0  # how long a silent rank waits for torchrun to end it


class UserError(ValueError):
    """A mistake the user can fix; the message is one line naming the flag or file.
    `every_rank`: every rank raises this same error (the flags are checked alike everywhere),
    so one rank per node reporting it is enough."""

    every_rank: bool = False


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Around a command's whole body: a UserError ends it with one line and status 2."""
    try:
        yield
    except UserError as err:
        report_user_error(err)
        sys.exit(USER_ERROR_STATUS)


def report_user_error(err: UserError) -> None:
    """`error: ...` on stderr from rank 0 or a world of one, `error (rank N): ...` from
    another rank; nothing from a rank whose node's first rank reports the same error."""
    rank = os.environ.get("RANK")
    if rank in (None, "0"):
        print(f"error: {err}", file=sys.stderr, flush=True)
        return
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if err.every_rank and under_torchrun and os.environ.get("LOCAL_RANK", "0") != "0":
        # The node's first rank prints this line and exits; torchrun then sends SIGTERM to
        # the others. Exiting first instead would make torchrun end the first rank, maybe
        # before it printed anything. SIGTERM must kill now, whatever handler was set.
        with suppress(ValueError):  # not the main thread: leave the handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(EVERY_RANK_GRACE_S)
    print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line, without the usage block (train.py's
    runs to twenty lines)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")
