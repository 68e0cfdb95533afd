"""Compare runs at a glance, from the files each run writes (metrics.jsonl, config.json):

    python -m utils.compare runs/a runs/b [--plot compare.png]

prints a Markdown table (final and best training loss, last C4 perplexity, tokens seen,
tokens/s per GPU and MFU) and, with --plot, draws training loss and C4 perplexity against
tokens seen (matplotlib: `pip install '.[plot]'`). Curves against tokens rather than steps
line up across global batch sizes. docs/training.md#comparing-runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.errors import ArgumentParser, UserError, exit_on_user_error


@dataclass
class Run:
    """What a run directory says about the run."""

    name: str
    train: list[dict]  # records with a loss, in step order
    evals: list[dict]  # records with eval/c4_ppl, in step order
    tokens_per_step: int | None  # for records written before tokens_seen was logged

    def tokens_seen(self, record: dict) -> int | None:
        if record.get("tokens_seen") is not None:
            return record["tokens_seen"]
        return record["step"] * self.tokens_per_step if self.tokens_per_step else None


def read_run(run_dir: Path) -> Run:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(
            f"{run_dir} has no metrics.jsonl; give run directories (output_dir/run_name)"
        )
    records = []
    lines = metrics.read_text().splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break  # cut short by a kill, or still being written by a live run
            raise UserError(f"{metrics}: line {number} is not JSON") from None
    return Run(
        name=run_dir.name,
        train=[r for r in records if r.get("loss") is not None],
        evals=[r for r in records if r.get("eval/c4_ppl") is not None],
        tokens_per_step=_tokens_per_step(run_dir / "config.json"),
    )


def _tokens_per_step(config: Path) -> int | None:
    try:
        args = json.loads(config.read_text())["args"]
        return int(args["global_batch"]) * int(args["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summary(run: Run) -> dict[str, float | int | str | None]:
    """One row of the table. Throughput and MFU are medians over the logged windows but the
    first, which holds start-up (compilation, the loader's first fetch)."""
    steady = run.train[1:] or run.train
    last = run.train[-1] if run.train else None
    last_eval = run.evals[-1] if run.evals else None
    return {
        "run": run.name,
        "steps": last["step"] if last else None,
        "tokens seen": run.tokens_seen(last) if last else None,
        "final loss": last["loss"] if last else None,
        "best loss": min(r["loss"] for r in run.train) if run.train else None,
        "C4 ppl": last_eval["eval/c4_ppl"] if last_eval else None,
        "tokens/s/GPU": _median(r.get("tokens_per_s_per_gpu") for r in steady),
        "MFU": _median(r.get("mfu") for r in steady),
    }


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(column, row[column]) for column in columns) + " |")
    return "\n".join(lines)


def _cell(column: str, value: float | int | str | None) -> str:
    if value is None:
        return "-"
    if column == "MFU":
        return f"{value:.1%}"
    if column in ("tokens seen", "tokens/s/GPU", "steps"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def plot(runs: list[Run], path: Path) -> None:
    """Training loss and C4 perplexity against tokens seen, one line per run."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install '.[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, (loss_axis, ppl_axis) = pyplot.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        _draw(loss_axis, run, run.train, "loss")
        _draw(ppl_axis, run, run.evals, "eval/c4_ppl", marker=".")
    loss_axis.set(title="training loss", xlabel="tokens seen")
    ppl_axis.set(title="C4 perplexity", xlabel="tokens seen", yscale="log")
    for axis in (loss_axis, ppl_axis):
        if axis.has_data():
            axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format=path.suffix.lstrip(".") or "png", dpi=120)
    os.replace(partial, path)


def _draw(axis, run: Run, records: list[dict], key: str, marker: str | None = None) -> None:
    points = [(run.tokens_seen(r), r[key]) for r in records]
    points = [(x, y) for x, y in points if x is not None]
    if points:
        axis.plot(*zip(*points, strict=True), marker=marker, label=run.name)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m utils.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--plot", type=Path, help="write loss and perplexity curves here (.png)")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        runs = [read_run(run_dir) for run_dir in args.run_dirs]
        print(markdown_table([summary(run) for run in runs]))
        if args.plot:
            plot(runs, args.plot)
            print(f"plot: {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
