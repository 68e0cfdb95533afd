"""Profiling inside a real run (docs/performance.md#profiling-a-run).

--profile_steps A:B records optimizer steps A to B with torch.profiler and writes one Chrome
trace per rank (open it in https://ui.perfetto.dev or chrome://tracing):

    RUN_DIR/profile/steps_A-B/rank_00000.json

--memory_snapshot records the CUDA allocator's history from the start of the run and dumps it
when a step runs out of memory, and at step B when profiling (open it in
https://pytorch.org/memory_viz):

    RUN_DIR/memory_snapshot/rank_00000_step_N.pickle
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import TracebackType

import torch
from torch.profiler import ProfilerActivity, profile

# Allocations kept in the history: enough for a few steps of a 7B model, a few hundred MB.
MEMORY_HISTORY_ENTRIES = 100_000


def step_range(text: str) -> tuple[int, int]:
    """argparse type of --profile_steps: 'A:B', 1 <= A <= B."""
    first, _, last = text.partition(":")
    try:
        steps = (int(first), int(last))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not A:B (e.g. 10:12)") from None
    if not 1 <= steps[0] <= steps[1]:
        raise argparse.ArgumentTypeError(f"'{text}' needs 1 <= A <= B")
    return steps


class RunProfiler:
    """Wraps the training loop: `with RunProfiler(...) as profiler:`, then
    `profiler.step_started(step)` and `profiler.step_finished(step)` around each step."""

    def __init__(
        self,
        steps: tuple[int, int] | None,
        memory_snapshot: bool,
        run_dir: Path,
        rank: int,
        device: torch.device,
    ) -> None:
        self.steps = steps
        self.run_dir = run_dir
        self.rank = rank
        self.device = device
        self.snapshots = memory_snapshot and device.type == "cuda"
        if memory_snapshot and not self.snapshots and rank == 0:
            print(f"--memory_snapshot records CUDA memory; skipped on {device.type}", flush=True)
        self._profiler: profile | None = None
        self._step = 0

    def __enter__(self) -> RunProfiler:
        if self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._profiler is not None:  # the run stopped inside the window: keep what it has
            self._write_trace()
        if self.snapshots and isinstance(error, torch.OutOfMemoryError):
            path = self._dump_memory_snapshot()
            print(f"rank {self.rank}: out of memory; allocator history in {path}", flush=True)
        if self.snapshots:
            torch.cuda.memory._record_memory_history(enabled=None)

    def step_started(self, step: int) -> None:
        self._step = step
        if self.steps and step == self.steps[0]:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities, record_shapes=True)
            self._profiler.start()

    def step_finished(self, step: int) -> None:
        if self._profiler is None:
            return
        self._profiler.step()  # marks the step boundary in the trace
        if step == self.steps[1]:
            self._write_trace()
            if self.snapshots:
                self._dump_memory_snapshot()

    def _write_trace(self) -> None:
        self._profiler.stop()
        first, last = self.steps
        path = self.run_dir / "profile" / f"steps_{first}-{last}" / f"rank_{self.rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")  # a killed export leaves no trace file
        self._profiler.export_chrome_trace(str(partial))
        os.replace(partial, path)
        self._profiler = None

    def _dump_memory_snapshot(self) -> Path:
        path = self.run_dir / "memory_snapshot" / f"rank_{self.rank:05d}_step_{self._step}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path
