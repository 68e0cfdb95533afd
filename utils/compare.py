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
from utils.files import why_not_writable


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


# The fields compare reads, and the JSON types each may hold (null: not logged that step).
NUMBER_FIELDS = ("loss", "eval/c4_ppl", "tokens_per_s_per_gpu", "mfu")
COUNT_FIELDS = ("step", "tokens_seen")
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
METRICS_FIX = "repair or delete that line (metrics.jsonl holds one JSON object per line)"


def read_metrics(metrics: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, every one checked: a JSON object per line with an
    integer `step`, and numbers (or null) in the fields compare reads. A bad line is a
    UserError naming the file and line number; a last line without its newline is left out
    (cut short by a kill, or still being written by a live run)."""
    if not metrics.is_file():
        raise UserError(
            f"{metrics.parent} has no metrics.jsonl; give run directories (output_dir/run_name)"
        )
    try:
        lines = metrics.read_bytes().splitlines(keepends=True)
    except OSError as err:
        raise UserError(f"{metrics} is not readable ({err.strerror or err})") from err
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(check_record(json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, ValueError) as err:
            if number == len(lines) and not line.endswith(b"\n"):
                break  # cut short by a kill, or still being written by a live run
            if isinstance(err, UnicodeDecodeError):
                why = "is not UTF-8 text"
            elif isinstance(err, json.JSONDecodeError):
                why = "is not JSON"
            else:
                why = str(err)
            raise UserError(f"{metrics}: line {number} {why}; {METRICS_FIX}") from None
    return records


def check_record(record: object) -> dict:
    """`record` if it is a metrics record compare can read, else a ValueError saying why."""
    if not isinstance(record, dict):
        raise ValueError(f"holds a JSON {type(record).__name__}, not an object")
    if "step" not in record:
        raise ValueError("has no `step`")
    for field in (*COUNT_FIELDS, *NUMBER_FIELDS):
        value = record.get(field)
        if value is None and field != "step":
            continue
        wanted = int if field in COUNT_FIELDS else int | float
        if isinstance(value, bool) or not isinstance(value, wanted):
            kind = "an integer" if field in COUNT_FIELDS else "a number or null"
            raise ValueError(f"has {field} {json.dumps(value)[:40]}, not {kind}")
    return record


def read_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give run directories (output_dir/run_name)")
    records = read_metrics(run_dir / "metrics.jsonl")
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


def check_plot_path(path: Path, run_dirs: list[Path]) -> None:
    """`--plot` names an image file that can be written and is none of the runs' files;
    matplotlib is installed. Checked before any run is read."""
    resolved = path.resolve()
    for run_dir in run_dirs:
        if resolved.parent == run_dir.resolve() and path.name in ("metrics.jsonl", "config.json"):
            raise UserError(
                f"--plot {path} is run {run_dir}'s {path.name}; give an image path such as "
                "compare.png"
            )
    if path.is_dir():
        raise UserError(
            f"--plot {path} is a directory; give an image path such as {path}/compare.png"
        )
    if path.suffix.lower() not in ("", *PLOT_SUFFIXES):
        raise UserError(
            f"--plot {path}: unknown image type {path.suffix!r}; end it with one of "
            f"{', '.join(PLOT_SUFFIXES)}"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install '.[plot]'") from None
    under_file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if under_file is not None:
        raise UserError(f"--plot {path} lies under a file ({under_file}); give another path")
    reason = why_not_writable(path.parent)
    if reason is not None:
        raise UserError(f"--plot {path} cannot be written in {path.parent} ({reason})")


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
    figure.savefig(partial, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
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
        if args.plot:
            check_plot_path(args.plot, args.run_dirs)
        runs = [read_run(run_dir) for run_dir in args.run_dirs]
        print(markdown_table([summary(run) for run in runs]))
        if args.plot:
            plot(runs, args.plot)
            print(f"plot: {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
