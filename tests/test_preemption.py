"""When a run stops early (utils/preemption.py): --exit_duration_mins counts from the start of
the process, so the time start-up takes is inside the budget, not added to it."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.helpers import REPO, child_env
from utils import preemption
from utils.preemption import ExitPolicy, process_start


def test_the_duration_counts_from_the_start_of_the_process(world_of_one, monkeypatch):
    """Asked for 15 s, a run whose start-up took 22 s used to go on until 37 s: the clock
    started when the training loop did. A process that started 20 s ago is past 15 s at its
    first step."""
    monkeypatch.setattr(preemption, "process_start", lambda: time.monotonic() - 20)
    policy = ExitPolicy(exit_duration_mins=0.25)
    assert policy.should_exit(1)
    assert policy.reason == "--exit_duration_mins"
    monkeypatch.setattr(preemption, "process_start", lambda: time.monotonic() - 5)
    assert not ExitPolicy(exit_duration_mins=0.25).should_exit(1)
    assert not ExitPolicy().should_exit(1)  # no deadline without the flag


def test_the_start_of_a_process_is_when_it_was_started():
    """A child's own reading of its start, on the monotonic clock every process shares on
    Linux: within half a second after this test started it (the kernel dates a process from
    its fork; the reading's tick is 10 ms), and before the child's Python start-up and its
    imports, which take a second or more."""
    code = (
        "from utils import preemption; "
        "print(repr(preemption.process_start()), repr(preemption._IMPORTED))"
    )
    before = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    after = time.monotonic()
    started, imported = map(float, out.split())
    if sys.platform != "linux":  # the fallback: when the child imported the module
        assert before <= started == imported <= after
        return
    assert before - 0.05 <= started <= before + 0.5, (started - before, imported - before)
    assert started < imported <= after


def test_without_proc_the_start_is_the_import(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/proc/self/stat")

    monkeypatch.setattr("builtins.open", no_proc)
    assert process_start() == preemption._IMPORTED
