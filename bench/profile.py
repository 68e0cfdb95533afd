"""Where a training step's time goes: a few steps under torch.profiler, their kernel time (on
CPU: operator time) summed by kind, and the share of the step during which no kernel runs.

bench.throughput runs this after its timed steps with `--profile N`; the kinds are the ones
the speed work argues about (matmuls, attention, compiled element-wise kernels, FSDP's copies,
collectives, the optimizer)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins: attention kernels can carry GEMM-like names, and FSDP's copy-in kernels
# are compiled by neither Triton nor a GEMM library.
KINDS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        ("communication", r"nccl|gloo|all_?gather|reduce_?scatter|all_?reduce|broadcast"),
        ("attention", r"flash|fmha|attention|sdpa|cudnn"),
        ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|\b(aten::)?(mm|addmm|bmm|matmul|linear)\b"),
        ("optimizer", r"adam|multi_tensor"),
        ("compiled element-wise", r"triton"),
        ("copies", r"memcpy|memset|copy|chunk_cat|split_with_sizes|\bcat\b|fill"),
    )
)
OTHER = "other"
TOP_KERNELS = 8


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return OTHER


def profile_steps(
    step: Callable[[list[dict]], None],
    batches: Iterator[dict],
    steps: int,
    accum_steps: int,
    device: torch.device,
) -> dict:
    """Run `steps` optimizer steps under the profiler; per step: wall time, time by kind, the
    uncovered share, the costliest kernels (operators on CPU) and the copies back to the host."""
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    micro_batches = [[next(batches) for _ in range(accum_steps)] for _ in range(steps)]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for batch in micro_batches:
            step(batch)
        if on_cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    wanted = DeviceType.CUDA if on_cuda else DeviceType.CPU
    kernels = [event for event in prof.events() if is_kernel(event, wanted)]
    return summarize(
        _self_times(kernels, on_cuda),
        busy_ms=_busy_ms(kernels),
        wall_ms=1e3 * wall,
        steps=steps,
        host_reads=sum(is_host_read(event.key) for event in kernels),
    )


def is_host_read(name: str) -> bool:
    """A device-to-host copy: what `.item()`, `bool()` or `.tolist()` of a GPU tensor costs,
    a stall in which the host stops queueing work until the GPU has caught up."""
    return "DtoH" in name


def _self_times(kernels: list, on_cuda: bool) -> dict[str, float]:
    """Milliseconds of self time by kernel name (CPU operator name without CUDA)."""
    times: dict[str, float] = {}
    for event in kernels:
        micros = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if micros > 0:
            times[event.key] = times.get(event.key, 0.0) + micros / 1e3
    return times


def _busy_ms(kernels: list) -> float:
    """Milliseconds during which at least one kernel (operator on CPU) other than a collective
    runs: the union of their intervals, so kernels overlapping on several streams (FSDP's
    copies beside the matmuls) or nested CPU operators count once. Collectives are left out: a
    collective waiting for a slower rank keeps a stream busy without computing anything."""
    intervals = sorted(
        (event.time_range.start, event.time_range.end)
        for event in kernels
        if kind_of(event.key) != "communication"
    )
    return union_length(intervals) / 1e3


def is_kernel(event, wanted: DeviceType) -> bool:
    """A kernel or operator on the wanted device, not a `record_function` range (FSDP's and the
    optimizer's annotations, which the profiler also projects onto the GPU's timeline)."""
    return event.device_type == wanted and not event.is_user_annotation


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by intervals sorted by start."""
    covered, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def summarize(
    times_ms: dict[str, float], *, busy_ms: float, wall_ms: float, steps: int, host_reads: int
) -> dict:
    """Per step: time by kind (kernels on different streams overlap, so kinds can add up to
    more than the step), the uncovered share (the device waiting: launches, the host, data; on
    CPU, Python and framework time outside operators) and the device-to-host copies."""
    by_kind: dict[str, float] = {}
    for name, ms in times_ms.items():
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms / steps
    top = sorted(times_ms.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    return {
        "step_ms": wall_ms / steps,
        "kinds_ms": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "uncovered_fraction": max(0.0, 1.0 - busy_ms / wall_ms),
        "top_ms": [[name[:120], ms / steps] for name, ms in top],
        "host_reads_per_step": host_reads / steps,
    }


def print_profile(label: str, summary: dict) -> None:
    step_ms = summary["step_ms"]
    print(f"{label}: {step_ms:.1f} ms per step (profiled)")
    for kind, ms in summary["kinds_ms"].items():
        print(f"  {kind:<22} {ms:>9.2f} ms  {100 * ms / step_ms:5.1f}%")
    print(f"  {'uncovered':<22} {'':>9}     {100 * summary['uncovered_fraction']:5.1f}%")
    print(f"  device-to-host copies per step: {summary['host_reads_per_step']:g}")
    for name, ms in summary["top_ms"]:
        print(f"    {ms:>8.2f} ms  {name[:90]}")
