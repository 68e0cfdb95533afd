"""When to stop early and cleanly: every N steps, after M minutes, or on SIGTERM.

SLURM and most schedulers send SIGTERM some time before killing a job. The handler only sets a
flag; the loop asks at each step boundary, and the ranks agree (one tiny all-reduce) so that
all of them save the same step and exit together with status 0.

`--exit_duration_mins` counts from the start of the process, not from the end of start-up
(imports, data checks, the model build and a resume can take minutes): a job given M minutes
by its scheduler can ask for M minus the time a save takes.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

_IMPORTED = time.monotonic()  # the fallback start where /proc is not there


def process_start() -> float:
    """When this process started, on the `time.monotonic()` clock. On Linux from
    /proc/self/stat (field 22: clock ticks after boot) and /proc/uptime; elsewhere the time
    this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # The command name (field 2) is in parentheses and may hold spaces: count after it.
        started_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    return time.monotonic() - max(age, 0.0)


class ExitPolicy:
    def __init__(self, exit_interval: int = 0, exit_duration_mins: float = 0.0) -> None:
        self.exit_interval = exit_interval
        self.deadline = process_start() + 60 * exit_duration_mins if exit_duration_mins else None
        self.reason = ""
        self.signalled = False  # SIGTERM reached some rank (agreed at the last `should_exit`)
        self._sigterm = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def should_exit(self, step: int) -> bool:
        """A collective: True on every rank when any rank has a reason to stop after `step`."""
        local = [
            self._sigterm,
            bool(self.exit_interval) and step % self.exit_interval == 0,
            self.deadline is not None and time.monotonic() >= self.deadline,
        ]
        flags = torch.tensor(local, dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        agreed = flags.tolist()
        self.signalled = bool(agreed[0])
        reasons = ["SIGTERM", f"--exit_interval {self.exit_interval}", "--exit_duration_mins"]
        self.reason = ", ".join(r for r, flag in zip(reasons, agreed, strict=True) if flag)
        return bool(self.reason)
