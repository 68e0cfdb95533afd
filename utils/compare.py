"""Compare runs at a glance, from the files each run writes (metrics.jsonl, config.json):

    python -m utils.compare runs/a runs/b [--group] [--plot compare.png]

prints Markdown tables, padded to read in a terminal too: per run its sparse method and
sparsity, trainable and dense parameters, steps, tokens seen, final and best training loss,
tokens/s per GPU and MFU; then every validation set's final perplexity and bits per byte, and
every downstream task metric's final value (the union over the runs, "-" where a run lacks
one). --group makes one row of `mean ± std` per setting, over runs that differ only by seed
(GROUP_IGNORES). --plot draws training loss and each validation set's perplexity against
tokens seen (matplotlib: `pip install '.[plot]'`); curves against tokens rather than steps
line up across global batch sizes. docs/training.md#comparing-runs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.files import check_stageable, staging_dir, why_not_writable


@dataclass
class Run:
    """What a run directory says about the run."""

    name: str
    train: list[dict]  # records with a loss, in step order
    # validation set -> its evaluations in step order:
    # {"step", "tokens_seen", "ppl", "bits_per_byte"}
    sets: dict[str, list[dict]]
    # "task/metric" -> its evaluations in step order: {"step", "tokens_seen", "value"}
    tasks: dict[str, list[dict]]
    tokens_per_step: int | None  # for records written before tokens_seen was logged
    config: dict | None = None  # config.json; None where the run has none

    def tokens_seen(self, record: dict) -> int | None:
        if record.get("tokens_seen") is not None:
            return record["tokens_seen"]
        return record["step"] * self.tokens_per_step if self.tokens_per_step else None


@dataclass
class Spread:
    """A --group cell: the mean and sample standard deviation over the `count` runs of the
    group's `size` that have the value (std None for a single value)."""

    mean: float
    std: float | None
    count: int
    size: int


Cell = float | int | str | Spread | None


@dataclass
class Row:
    """One line of each table: the run columns, the validation sets', the tasks'."""

    main: dict[str, Cell]
    sets: dict[str, Cell] = field(default_factory=dict)
    tasks: dict[str, Cell] = field(default_factory=dict)


@dataclass
class Series:
    """Runs shown as one row and one curve: a single run, or a --group of seeds."""

    label: str
    runs: list[Run]


# The fields compare reads, and the JSON types each may hold (null: not logged that step).
NUMBER_FIELDS = ("loss", "tokens_per_s_per_gpu", "mfu")
COUNT_FIELDS = ("step", "tokens_seen")
# A validation set NAME logs eval/NAME/<field>; compare reads ppl and bits_per_byte.
SET_FIELDS = ("loss", "ppl", "bits_per_byte", "tokens", "bytes")
SET_FIELDS_READ = ("ppl", "bits_per_byte")
# Runs from before there were several validation sets logged only these, for the set c4.
OLD_C4_FIELDS = {"eval/c4_ppl": "ppl", "eval/c4_loss": "loss", "eval/tokens": "tokens"}
TASK_PREFIX = "eval/task/"  # eval/task/<task>/<metric>
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
METRICS_FIX = "repair or delete that line (metrics.jsonl holds one JSON object per line)"
CONFIG_FIX = 'repair it (train.py writes {"args": {...}, "parameters": {"trainable": N, ...}})'

# Flags that name a run or say where its outputs go: runs that differ only in these (and
# `seed`) are seeds of one setting for --group. Any other flag, the data included, separates.
GROUP_IGNORES = (
    "seed", "run_name", "output_dir", "resume_dir", "args_file", "tensorboard_dir",
    "wandb_project", "wandb_entity", "wandb_run_name", "wandb_group",
)  # fmt: skip
# Columns that a group's runs share (equal flags give equal models; steps are checked).
SHARED_COLUMNS = ("method", "sparsity", "trainable", "dense params", "steps")
TEXT_COLUMNS = ("run", "method")  # left-aligned; the others are numbers, right-aligned

# The settings of slt.config.METHOD_DEFAULTS that fix each method's sparsity: compare must
# not import slt (it loads torch, seconds for a table); a test keeps the two equal.
SPARSITY_DEFAULTS: dict[str, dict[str, float]] = {
    "magnitude": {"final_sparsity": 0.5},
    "supermask": {"final_sparsity": 0.5},
    "nm": {"n": 2, "m": 4},
    "sltrain": {"delta": 0.03},
}

LOSS_PANEL = None  # the plot's first panel; the others are named by their validation set
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")  # 5 against 4 line styles: 20 runs before a repeat


def read_metrics(metrics: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, every one checked: a JSON object per line with an
    integer `step`, and finite numbers (or null) in the fields compare reads. A bad line is a
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
    for key in COUNT_FIELDS:
        value = record.get(key)
        if (value is not None or key == "step") and not (_is_integer(value) and value >= 0):
            raise ValueError(f"has {key} {json.dumps(value)[:40]}, not an integer >= 0")
    for key in record:
        if _looks_like_a_set_key(key) and parse_eval_key(key) is None:
            raise ValueError(f"has {json.dumps(key)[:60]}, not eval/NAME/FIELD of a set NAME")
    for key in (*NUMBER_FIELDS, *filter(_is_read_eval_key, record)):
        value = record.get(key)
        if value is not None and not _is_finite_number(value):
            # The logger writes a non-finite value as null: anything else is not its line.
            raise ValueError(f"has {key} {json.dumps(value)[:40]}, not a finite number or null")
        parsed = parse_eval_key(key)
        if value is not None and parsed and parsed[0] == "set" and not value > 0:
            raise ValueError(f"has {key} {json.dumps(value)[:40]}, not a positive number")
    return record


def _looks_like_a_set_key(key: str) -> bool:
    return key.startswith("eval/") and key.rpartition("/")[2] in SET_FIELDS_READ


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_read_eval_key(key: str) -> bool:
    """A validation set's ppl or bits per byte, or a task metric: the eval keys compare shows."""
    parsed = parse_eval_key(key)
    return parsed is not None and (parsed[0] == "task" or parsed[2] in SET_FIELDS_READ)


def parse_eval_key(key: str) -> tuple[str, str, str] | None:
    """("set", NAME, FIELD) for eval/NAME/FIELD and the old c4 names, ("task", TASK, METRIC)
    for eval/task/TASK/METRIC, None for any other key. Set names hold no slash; a set named
    `task` logs eval/task/ppl, one level short of a task metric."""
    if key in OLD_C4_FIELDS:
        return "set", "c4", OLD_C4_FIELDS[key]
    if key.startswith(TASK_PREFIX):
        task, _, metric = key.removeprefix(TASK_PREFIX).rpartition("/")
        if task and metric:
            return "task", task, metric
    if key.startswith("eval/"):
        name, _, set_field = key.removeprefix("eval/").rpartition("/")
        if name and "/" not in name and set_field in SET_FIELDS:
            return "set", name, set_field
    return None


def read_run(run_dir: Path, name: str | None = None) -> Run:
    """The run in `run_dir`, called `name` in tables and plots (default: the directory's)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give run directories (output_dir/run_name)")
    records = read_metrics(run_dir / "metrics.jsonl")
    config = read_config(run_dir / "config.json")
    return Run(
        name=name or run_dir.name,
        train=[r for r in records if r.get("loss") is not None],
        sets=validation_sets(records),
        tasks=task_metrics(records),
        tokens_per_step=_tokens_per_step(config),
        config=config,
    )


def validation_sets(records: list[dict]) -> dict[str, list[dict]]:
    """Each validation set's evaluations, in step order. The set c4 of a new run also logs the
    old names: they count only where a record lacks the new ones (a run from before)."""
    sets: dict[str, list[dict]] = {}
    for record in records:
        new: dict[str, dict] = {}
        old: dict[str, Any] = {}
        for key, value in record.items():
            parsed = parse_eval_key(key)
            if parsed is not None and parsed[0] == "set":
                (old if key in OLD_C4_FIELDS else new.setdefault(parsed[1], {}))[parsed[2]] = value
        if old and "c4" not in new:
            new["c4"] = old
        for name, values in new.items():
            point = {"step": record["step"], "tokens_seen": record.get("tokens_seen")}
            sets.setdefault(name, []).append(point | {f: values.get(f) for f in SET_FIELDS_READ})
    return sets


def task_metrics(records: list[dict]) -> dict[str, list[dict]]:
    """Each downstream task metric's evaluations ("task/metric"), in step order."""
    tasks: dict[str, list[dict]] = {}
    for record in records:
        for key, value in record.items():
            parsed = parse_eval_key(key)
            if parsed is not None and parsed[0] == "task":
                point = {"step": record["step"], "tokens_seen": record.get("tokens_seen")}
                tasks.setdefault(f"{parsed[1]}/{parsed[2]}", []).append(point | {"value": value})
    return tasks


def read_config(path: Path) -> dict | None:
    """The run's config.json, checked where compare reads it; None if the run has none (its
    columns then show "-"). A file that is there but unreadable is a UserError."""
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path} is not readable ({err.strerror or err})") from err
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; {CONFIG_FIX}") from None
    except ValueError:
        raise UserError(f"{path} is not JSON; {CONFIG_FIX}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object; {CONFIG_FIX}")
    for key in ("args", "parameters"):
        if not isinstance(config.get(key, {}), dict):
            raise UserError(f"{path}: {key} is not an object; {CONFIG_FIX}")
    for key, count in config.get("parameters", {}).items():
        if key in ("trainable", "dense_model") and not _is_integer(count):
            shown = json.dumps(count)[:40]
            raise UserError(f"{path}: parameters.{key} is {shown}, not an integer; {CONFIG_FIX}")
    return config


def _tokens_per_step(config: dict | None) -> int | None:
    try:
        args = config["args"]  # type: ignore[index]
        return int(args["global_batch"]) * int(args["seq_len"])
    except (ValueError, KeyError, TypeError):
        return None


def sparse_setting(config: dict | None) -> tuple[str | None, float | str | None]:
    """(method, sparsity) of the run: "dense" and 0 without --enable_slt; "?" and "?" when its
    --slt_config file is gone (or no longer JSON); None and None without config.json."""
    if config is None or "args" not in config:
        return None, None
    args = config["args"]
    if not args.get("enable_slt"):
        return "dense", 0.0
    values = slt_values(args.get("slt_config"))
    if values is None:
        return "?", "?"
    method = str(values.get("method"))
    return method, configured_sparsity(method, values)


def slt_values(slt_config: object) -> dict | None:
    """The --slt_config mapping: given inline, or read from its file (relative paths from the
    current directory); None where the file is gone or holds no JSON object."""
    if isinstance(slt_config, dict):
        return slt_config
    if not isinstance(slt_config, str):
        return None
    try:
        values = json.loads(Path(slt_config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def configured_sparsity(method: str, values: dict) -> float | str:
    """The fraction of zero weights the method's settings ask for (defaults filled in): the
    final sparsity of magnitude and supermask, 1 - n/m of N:M, and for sltrain that of its
    sparse part S, 1 - delta (its low-rank part is dense). "?" for settings it cannot read."""
    if method not in SPARSITY_DEFAULTS:
        return "?"
    settings = SPARSITY_DEFAULTS[method] | values
    try:
        if method == "nm":
            sparsity = 1 - settings["n"] / settings["m"]
        elif method == "sltrain":
            sparsity = 1 - settings["delta"]
        else:
            sparsity = settings["final_sparsity"]
    except (TypeError, ZeroDivisionError):
        return "?"
    return float(sparsity) if _is_finite_number(sparsity) else "?"


def parameter_counts(config: dict | None) -> tuple[int | None, int | None]:
    """(trainable, dense model) from config.json; a dense run's dense model is what it trains."""
    if config is None:
        return None, None
    parameters = config.get("parameters", {})
    trainable = parameters.get("trainable")
    dense = parameters.get("dense_model")
    if dense is None and not config.get("args", {}).get("enable_slt"):
        dense = trainable
    return trainable, dense


def summary(run: Run) -> Row:
    """The run's row. Throughput and MFU are medians over the logged windows but the first,
    which holds start-up (compilation, the loader's first fetch)."""
    steady = run.train[1:] or run.train
    last = run.train[-1] if run.train else None
    method, sparsity = sparse_setting(run.config)
    trainable, dense = parameter_counts(run.config)
    main: dict[str, Cell] = {
        "run": run.name,
        "method": method,
        "sparsity": sparsity,
        "trainable": trainable,
        "dense params": dense,
        "steps": last["step"] if last else None,
        "tokens seen": run.tokens_seen(last) if last else None,
        "final loss": last["loss"] if last else None,
        "best loss": min(r["loss"] for r in run.train) if run.train else None,
        "tokens/s/GPU": _median(r.get("tokens_per_s_per_gpu") for r in steady),
        "MFU": _median(r.get("mfu") for r in steady),
    }
    sets: dict[str, Cell] = {}
    for name, points in run.sets.items():  # each value from the set's last evaluation
        sets[f"{name} ppl"] = points[-1]["ppl"]
        sets[f"{name} bpb"] = points[-1]["bits_per_byte"]
    tasks: dict[str, Cell] = {metric: points[-1]["value"] for metric, points in run.tasks.items()}
    return Row(main, sets, tasks)


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def group_runs(runs: list[Run]) -> list[Series]:
    """Runs whose flags are equal but for GROUP_IGNORES, as one series each, in the order the
    first of each was given. Each group's runs must have logged the same last step."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    for members in groups.values():
        check_same_steps(members)
    return [Series(", ".join(run.name for run in members), members) for members in groups.values()]


def group_key(run: Run) -> str:
    """The run's flags without GROUP_IGNORES, its --slt_config by content (seeds may each have
    their copy of one file), and its parameter counts, as comparable text."""
    if run.config is None or "args" not in run.config:
        raise UserError(
            f"--group: run {run.name} has no config.json args to tell its setting by; leave the "
            "run out, or leave --group out"
        )
    args = {k: v for k, v in run.config["args"].items() if k not in GROUP_IGNORES}
    if args.get("enable_slt"):
        args["slt_config"] = slt_values(args.get("slt_config")) or args.get("slt_config")
    return json.dumps([args, run.config.get("parameters")], sort_keys=True, default=str)


def check_same_steps(runs: list[Run]) -> None:
    steps = [(run.name, run.train[-1]["step"] if run.train else None) for run in runs]
    if len({step for _, step in steps}) > 1:
        shown = ", ".join(f"{name} at step {step}" for name, step in steps)
        raise UserError(
            f"--group: runs {shown} differ only by seed but stopped at different steps; compare "
            "them once they agree, or leave --group out"
        )


def group_row(series: Series) -> Row:
    """The series' row: columns SHARED_COLUMNS once, every other number as mean ± std."""
    rows = [summary(run) for run in series.runs]
    main: dict[str, Cell] = {"run": series.label, "n": len(rows)}
    for column in rows[0].main:
        if column != "run":
            values = [row.main[column] for row in rows]
            main[column] = values[0] if column in SHARED_COLUMNS else spread(values)
    sets = {c: spread([row.sets.get(c) for row in rows]) for c in _union(r.sets for r in rows)}
    tasks = {c: spread([row.tasks.get(c) for row in rows]) for c in _union(r.tasks for r in rows)}
    return Row(main, sets, tasks)


def spread(values: list[Cell]) -> Spread | None:
    present = [float(v) for v in values if isinstance(v, int | float)]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else None
    return Spread(statistics.fmean(present), std, len(present), len(values))


def _union(columns) -> list[str]:
    return list(dict.fromkeys(column for keys in columns for column in keys))


def render_tables(rows: list[Row]) -> str:
    """The run table, then the validation sets' and the tasks' where any run has one; each
    table's columns are the union over the rows, sets and tasks sorted by name."""
    tables = [markdown_table(_union(row.main for row in rows), [row.main for row in rows])]
    for part in ("sets", "tasks"):
        columns = sorted(_union(getattr(row, part) for row in rows), key=_column_order)
        if columns:
            cells = [{"run": row.main["run"], **getattr(row, part)} for row in rows]
            tables.append(markdown_table(["run", *columns], cells))
    return "\n\n".join(tables)


def _column_order(column: str) -> tuple[str, int]:
    """A validation set's ppl before its bpb; the rest by name."""
    name, _, kind = column.rpartition(" ")
    return (name, 0) if kind == "ppl" else (name, 1) if kind == "bpb" else (column, 0)


def markdown_table(columns: list[str], rows: list[dict[str, Cell]]) -> str:
    """A Markdown table whose cells are padded to their column's width, so that it reads as
    well in a terminal; numbers right-aligned."""
    cells = [[_cell(column, row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)
    ]
    text = [column not in TEXT_COLUMNS for column in columns]

    def line(values: list[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, text, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, text, strict=True))
        + "|"
    )
    return "\n".join([line(columns), rule, *(line(values) for values in cells)])


def _cell(column: str, value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, Spread):
        text = _cell(column, value.mean)
        if value.std is not None:
            text += f" ± {_cell(column, value.std)}"
        return text + (f" (n={value.count})" if value.count < value.size else "")
    if isinstance(value, str):
        return value.replace("|", "\\|")  # a run name must not split its cell
    if column == "MFU":
        return f"{value:.1%}"
    if column == "sparsity":
        return f"{100 * value:.4g}%"
    if column in ("trainable", "dense params"):
        return short_count(value)
    if column in ("tokens seen", "tokens/s/GPU", "steps", "n"):
        return f"{value:,.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def short_count(value: float) -> str:
    """1234567 -> 1.235M: parameter and token counts at a glance."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.4g}{unit}"
    return f"{value:g}"


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
    check_stageable(path, "--plot")
    if path.is_symlink() or (path.exists() and not is_image_of_its_type(path)):
        raise UserError(
            f"--plot {path} exists and is no {plot_format(path)} image a plot would replace; "
            "give a new path"
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


# How each format's files begin (SVG: an XML declaration or the svg element).
IMAGE_STARTS = {"png": (b"\x89PNG\r\n\x1a\n",), "pdf": (b"%PDF-",), "svg": (b"<?xml", b"<svg"),
                "jpg": (b"\xff\xd8\xff",), "jpeg": (b"\xff\xd8\xff",)}  # fmt: skip


def plot_format(path: Path) -> str:
    return path.suffix.lstrip(".").lower() or "png"


def is_image_of_its_type(path: Path) -> bool:
    """`path` is a plain file holding an image of the format its name says: an earlier plot,
    which a new one may replace (and not, say, notes saved under that name)."""
    if path.is_symlink() or not path.is_file():  # a FIFO's open would wait for a writer
        return False
    try:
        with path.open("rb") as file:
            return file.read(16).startswith(IMAGE_STARTS[plot_format(path)])
    except OSError:
        return False


def plot(series: list[Series], path: Path) -> None:
    """draw_figure, written to `path` whole or not at all; a file that appeared at `path`
    since the checks is never replaced."""
    figure = draw_figure(series)
    replacing = path.exists()
    with staging_dir(path) as staging:
        partial = staging / path.name
        figure.savefig(partial, format=plot_format(path), dpi=120)
        if replacing and is_image_of_its_type(path):
            os.replace(partial, path)
            return
        try:
            os.link(partial, path)  # fails, rather than replaces, if a file is there
        except FileExistsError:
            raise UserError(
                f"--plot {path} appeared while the plot was drawn; it was left as it is: give "
                "a new path"
            ) from None


def draw_figure(series: list[Series]):
    """One figure: training loss, then each validation set's perplexity (log scale), against
    tokens seen; a line per series in its own colour, line style and marker, so that a curve
    under another stays visible, a --group's mean with a ±std band; one legend below them."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install '.[plot]'") from None
    set_names = sorted(_union(run.sets for one in series for run in one.runs))
    panels = [LOSS_PANEL, *set_names]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    # Figure, not pyplot: no display backend, no global figure left open.
    figure = Figure(figsize=(4.8 * columns, 3.6 * rows + 0.6), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).flatten()
    for unused in grid[len(panels) :]:
        unused.remove()
    axes = grid[: len(panels)]
    handles = []
    for index, one in enumerate(series):
        style = line_style(index)
        for axis, panel in zip(axes, panels, strict=True):
            _draw_series(axis, one, panel, style)
        handles.append(Line2D([], [], label=_legend_label(one), **style))
    for axis, panel in zip(axes, panels, strict=True):
        _label_panel(axis, panel)
    figure.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)))
    return figure


def line_style(index: int) -> dict[str, Any]:
    return {
        "color": f"C{index % 10}",
        "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
        "marker": MARKERS[index % len(MARKERS)],
        "markersize": 4,
    }


def _legend_label(series: Series) -> str:
    size = len(series.runs)
    return series.label if size == 1 else f"{series.label} (mean ± std, n={size})"


def _draw_series(axis, series: Series, panel: str | None, style: dict[str, Any]) -> None:
    x, mean, std = curve(series.runs, panel)
    if not x:
        return
    axis.plot(x, mean, markevery=max(1, len(x) // 12), **style)
    if len(series.runs) > 1:
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        axis.fill_between(x, low, high, color=style["color"], alpha=0.2, linewidth=0)


def curve(runs: list[Run], panel: str | None) -> tuple[list[float], list[float], list[float]]:
    """Tokens seen, mean and sample standard deviation (0 for one run) of the panel's values,
    at the steps logged by every run that has the panel (a run from before a validation set
    existed has none of it)."""
    points = [p for p in (panel_points(run, panel) for run in runs) if p]
    if not points:
        return [], [], []
    steps = sorted(set.intersection(*(set(p) for p in points)))
    x = [statistics.fmean(p[step][0] for p in points) for step in steps]
    values = [[p[step][1] for p in points] for step in steps]
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return x, [statistics.fmean(v) for v in values], std


def panel_points(run: Run, panel: str | None) -> dict[int, tuple[int, float]]:
    """step -> (tokens seen, value): the training loss, or the perplexity of set `panel`."""
    if panel is LOSS_PANEL:
        logged = [(r, r["loss"]) for r in run.train]
    else:
        logged = [(r, r["ppl"]) for r in run.sets.get(panel, []) if r["ppl"] is not None]
    points = {r["step"]: (run.tokens_seen(r), value) for r, value in logged}
    return {step: (x, y) for step, (x, y) in points.items() if x is not None}


def _label_panel(axis, panel: str | None) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_xlabel("tokens seen")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: short_count(value)))
    axis.grid(alpha=0.3)
    if panel is LOSS_PANEL:
        axis.set(title="train loss", ylabel="train loss")
        return
    axis.set(title=f"validation ppl: {panel}", ylabel="perplexity", yscale="log")
    if axis.has_data():
        _readable_log_ticks(axis)


def _readable_log_ticks(axis) -> None:
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    ticks = log_axis_ticks(*axis.get_ylim())
    axis.yaxis.set_major_locator(FixedLocator(ticks))
    axis.yaxis.set_major_formatter(FixedFormatter(tick_labels(ticks)))
    axis.yaxis.set_minor_formatter(NullFormatter())


def log_axis_ticks(low: float, high: float) -> list[float]:
    """At least four ticks on a log axis from `low` to `high`: matplotlib labels only powers
    of ten, none at all on a range within one decade, as perplexity late in training is. The
    sparsest of 1-2-5, 1-2-3-5-7 and every digit that gives four, else evenly spaced."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(range(1, 10))):
        ticks = [t for t in LogLocator(subs=subs).tick_values(low, high) if low <= t <= high]
        if len(ticks) >= 4:
            return ticks
    return [t for t in MaxNLocator(5).tick_values(low, high) if low <= t <= high]


def tick_labels(ticks: list[float]) -> list[str]:
    """Each tick written with the fewest decimals that write every tick to within a millionth
    of the space between ticks (so no two read alike and none is rounded off its place)."""
    steps = [high - low for low, high in itertools.pairwise(ticks)]
    tolerance = 1e-6 * min(steps, default=max(map(abs, ticks), default=1.0))
    for decimals in range(21):
        labels = [f"{tick:.{decimals}f}" for tick in ticks]
        pairs = zip(labels, ticks, strict=True)
        if all(abs(float(text) - tick) <= tolerance for text, tick in pairs):
            return labels
    return [repr(tick) for tick in ticks]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m utils.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--group",
        action="store_true",
        help="one row (and curve) per setting: mean ± std over runs that differ only by seed",
    )
    parser.add_argument("--plot", type=Path, help="write loss and perplexity curves here (.png)")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        if args.plot:
            check_plot_path(args.plot, args.run_dirs)
        check_given_once(args.run_dirs)
        labels = run_labels(args.run_dirs)
        runs = [
            read_run(run_dir, label) for run_dir, label in zip(args.run_dirs, labels, strict=True)
        ]
        if args.group:
            series = group_runs(runs)
            rows = [group_row(one) for one in series]
        else:
            series = [Series(run.name, [run]) for run in runs]
            rows = [summary(run) for run in runs]
        print(render_tables(rows))
        if args.plot:
            plot(series, args.plot)
            print(f"plot: {args.plot}")


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's name: its directory's, with as many parent directories in front as tell it
    from the others' (two sweeps' `runs_a/lr3e-4` and `runs_b/lr3e-4`), so no two rows or
    curves read alike. The directories are distinct (check_given_once)."""
    parts = [run_dir.resolve().parts for run_dir in run_dirs]  # distinct: check_given_once
    depth = [1] * len(parts)

    def label(index: int) -> str:
        return "/".join(parts[index][-depth[index] :])

    while True:
        seen: dict[str, list[int]] = {}
        for index in range(len(parts)):
            seen.setdefault(label(index), []).append(index)
        clashes = [index for same in seen.values() if len(same) > 1 for index in same]
        if not clashes:
            return [label(index) for index in range(len(parts))]
        for index in clashes:
            depth[index] += 1


def check_given_once(run_dirs: list[Path]) -> None:
    """A run given twice would count twice in a --group's mean."""
    seen: set[Path] = set()
    for run_dir in run_dirs:
        if run_dir.resolve() in seen:
            raise UserError(f"run {run_dir} is given twice; give each run directory once")
        seen.add(run_dir.resolve())


if __name__ == "__main__":
    main(sys.argv[1:])
