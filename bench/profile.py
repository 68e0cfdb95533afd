"""Where a training step's time goes: a few steps under torch.profiler, their kernel time (on
CPU: operator time) summed by kind, and the share of the step no kernel covers.

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
    uncovered share, and the costliest kernels (operators on CPU)."""
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
    return summarize(_self_times(prof, on_cuda), wall_ms=1e3 * wall, steps=steps)


def _self_times(prof: profile, on_cuda: bool) -> dict[str, float]:
    """Milliseconds of self time by kernel name (CPU operator name without CUDA)."""
    wanted = DeviceType.CUDA if on_cuda else DeviceType.CPU
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != wanted:
            continue
        micros = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if micros > 0:
            times[event.key] = times.get(event.key, 0.0) + micros / 1e3
    return times


def summarize(times_ms: dict[str, float], *, wall_ms: float, steps: int) -> dict:
    """Per step. Collectives run on their own stream and overlap compute, so they are left out
    of the covered time; what remains uncovered is the device waiting (launches, the host,
    data) or, on CPU, Python and framework time outside operators."""
    by_kind: dict[str, float] = {}
    for name, ms in times_ms.items():
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms / steps
    step_ms = wall_ms / steps
    covered = sum(ms for kind, ms in by_kind.items() if kind != "communication")
    top = sorted(times_ms.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    return {
        "step_ms": step_ms,
        "kinds_ms": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "uncovered_fraction": max(0.0, 1.0 - covered / step_ms),
        "top_ms": [[name[:120], ms / steps] for name, ms in top],
    }


def print_profile(label: str, summary: dict) -> None:
    step_ms = summary["step_ms"]
    print(f"{label}: {step_ms:.1f} ms per step (profiled)")
    for kind, ms in summary["kinds_ms"].items():
        print(f"  {kind:<22} {ms:>9.2f} ms  {100 * ms / step_ms:5.1f}%")
    print(f"  {'uncovered':<22} {'':>9}     {100 * summary['uncovered_fraction']:5.1f}%")
    for name, ms in summary["top_ms"]:
        print(f"    {ms:>8.2f} ms  {name[:90]}")
