"""--profile_steps writes one Chrome trace per rank covering exactly the steps asked for;
--memory_snapshot says it is skipped on CPU."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import tiny_run_flags, train_in_process


def traced(path: Path) -> list[str]:
    return [event.get("name", "") for event in json.loads(path.read_text())["traceEvents"]]


def optimizer_steps(names: list[str]) -> int:
    return sum(name.startswith("Optimizer.step#") for name in names)


def test_the_trace_covers_the_steps_asked_for(mds_tokens, tokenizer_dir, tmp_path):
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=4, num_workers=0)
    printed = train_in_process(
        *flags, "--local_batch=8", "--run_name=run", "--profile_steps=2:3", "--memory_snapshot"
    )
    assert "--memory_snapshot records CUDA memory; skipped on cpu" in printed
    trace_dir = tmp_path / "run" / "profile" / "steps_2-3"
    assert [p.name for p in trace_dir.iterdir()] == ["rank_00000.json"]
    names = traced(trace_dir / "rank_00000.json")
    assert optimizer_steps(names) == 2
    assert {"aten::mm", "aten::scaled_dot_product_attention"} <= set(names)
    assert not (tmp_path / "run" / "memory_snapshot").exists()
