"""python -m utils.compare on run directories written by hand in the format train.py writes
(metrics.jsonl, config.json): the tables, --group, the plot, runs logged before tokens_seen
and before there were several validation sets, and one-line errors."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from utils import compare

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, SEQ_LEN = 8, 64  # 512 tokens per step
ARGS = {
    "global_batch": GLOBAL_BATCH, "local_batch": 4, "seq_len": SEQ_LEN, "lr": 3e-4, "seed": 1,
    "enable_slt": False, "slt_config": None, "output_dir": "runs", "run_name": "x",
    "eval_every": 2, "eval_data": ["c4=/data/c4", "wiki=/data/wiki"],
}  # fmt: skip


def train_record(step: int, loss: float, **extra) -> dict:
    """A log line as train.py writes it (the fields compare reads, and some it does not)."""
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "skipped_steps": 0,
            "tokens_seen": step * GLOBAL_BATCH * SEQ_LEN, "tokens_per_s_per_gpu": 1000.0,
            "mfu": None} | extra  # fmt: skip


def eval_record(step: int, sets: dict[str, tuple], tasks: dict[str, float] | None = None) -> dict:
    """An evaluation record: each set NAME -> (ppl, bits per byte) under its eval/NAME/ keys,
    c4 also under the old names (as datas/eval_sets.py logs it); tasks as eval/task/..."""
    record: dict = {"step": step, "tokens_seen": step * GLOBAL_BATCH * SEQ_LEN}
    for name, (ppl, bpb) in sets.items():
        loss = math.log(ppl) if ppl else None
        record |= {f"eval/{name}/loss": loss, f"eval/{name}/ppl": ppl,
                   f"eval/{name}/bits_per_byte": bpb, f"eval/{name}/tokens": 252,
                   f"eval/{name}/bytes": 1000}  # fmt: skip
        if name == "c4":
            record |= {"eval/c4_ppl": ppl, "eval/c4_loss": loss, "eval/tokens": 252}
    return record | {f"eval/task/{metric}": value for metric, value in (tasks or {}).items()}


def old_eval_record(step: int, ppl: float) -> dict:
    """What runs logged before there were several validation sets."""
    return {"step": step, "eval/c4_ppl": ppl, "eval/c4_loss": math.log(ppl), "eval/tokens": 252}


def make_run(root: Path, name: str, records: list[dict], config: dict | None = None) -> Path:
    """A run directory; `config` holds what differs from a dense run's config.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        whole = {"args": ARGS | {"run_name": name}, "model": {"hidden_size": 64},
                 "parameters": {"trainable": 158_912}, "earlier_args": []}  # fmt: skip
        for key, value in config.items():
            whole[key] = whole[key] | value if isinstance(value, dict) else value
        (run / "config.json").write_text(json.dumps(whole))
    return run


def tables(printed: str) -> list[dict[str, dict[str, str]]]:
    """Each printed table as {run: {column: cell}}."""
    found = []
    for block in printed.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        header, *rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
        found.append({row[0]: dict(zip(header, row, strict=True)) for row in rows[1:]})
    return found


def compare_printed(capsys, *argv: object) -> list[dict[str, dict[str, str]]]:
    compare.main([str(a) for a in argv])
    return tables(capsys.readouterr().out)


def test_the_run_table_summarizes_each_run(tmp_path, capsys):
    (tmp_path / "slt.json").write_text('{"method": "magnitude", "final_sparsity": 0.8}')
    dense = [train_record(1, 7.0), train_record(2, 6.0, tokens_per_s_per_gpu=900.0),
             train_record(3, 6.5, tokens_per_s_per_gpu=1100.0, mfu=0.25),
             train_record(4, 6.25, tokens_per_s_per_gpu=1200.0, mfu=0.35)]  # fmt: skip
    sparse = [train_record(1, 7.5, tokens_per_s_per_gpu=1.0)]
    sparse_config = {"args": {"enable_slt": True, "slt_config": str(tmp_path / "slt.json")},
                     "parameters": {"trainable": 1_234_567, "dense_model": 2_000_000}}  # fmt: skip
    runs = [
        make_run(tmp_path, "dense", dense, {}),
        make_run(tmp_path, "sparse", sparse, sparse_config),
    ]
    [table] = compare_printed(capsys, *runs)  # no evaluation: no other table
    assert table["dense"] == {
        "run": "dense", "method": "dense", "sparsity": "0%", "trainable": "158.9K",
        "dense params": "158.9K", "steps": "4", "tokens seen": "2,048", "final loss": "6.2500",
        "best loss": "6.0000", "tokens/s/GPU": "1,100", "MFU": "30.0%",
    }  # fmt: skip
    assert table["sparse"] == {
        "run": "sparse", "method": "magnitude", "sparsity": "80%", "trainable": "1.235M",
        "dense params": "2M", "steps": "1", "tokens seen": "512", "final loss": "7.5000",
        "best loss": "7.5000", "tokens/s/GPU": "1", "MFU": "-",
    }  # fmt: skip


def test_validation_sets_and_tasks_are_the_union_over_the_runs(tmp_path, capsys):
    first = eval_record(2, {"c4": (30.0, 1.5), "wiki": (40.0, 1.75)},
                        {"arc_easy/acc": 0.25, "arc_easy/acc_norm": 0.5})  # fmt: skip
    last = eval_record(4, {"c4": (20.0, 1.25), "wiki": (None, None)}, {"arc_easy/acc": 0.375})
    new = [train_record(1, 7.0), first, train_record(2, 6.0), last]
    # Logged before there were several sets: the old c4 names only.
    old = [train_record(2, 6.5), old_eval_record(2, 90.0), old_eval_record(4, 80.0)]
    holdout = [eval_record(2, {"train_holdout": (50.0, 2.0)}, {"hellaswag/acc": 0.3})]
    runs = [make_run(tmp_path, n, r, {}) for n, r in (("new", new), ("old", old), ("ho", holdout))]
    _, sets, tasks = compare_printed(capsys, *runs)
    assert list(sets["new"]) == ["run", "c4 ppl", "c4 bpb", "train_holdout ppl",
                                 "train_holdout bpb", "wiki ppl", "wiki bpb"]  # fmt: skip
    # each set's last evaluation; a value it logged as null (not finite) shows "-"
    assert [sets["new"][c] for c in ("c4 ppl", "c4 bpb", "wiki ppl", "wiki bpb")] == [
        "20.0000", "1.2500", "-", "-"]  # fmt: skip
    assert (sets["old"]["c4 ppl"], sets["old"]["c4 bpb"], sets["old"]["wiki ppl"]) == (
        "80.0000", "-", "-")  # fmt: skip
    assert (sets["ho"]["train_holdout ppl"], sets["ho"]["c4 ppl"]) == ("50.0000", "-")
    assert tasks["new"] == {"run": "new", "arc_easy/acc": "0.3750", "arc_easy/acc_norm": "0.5000",
                            "hellaswag/acc": "-"}  # fmt: skip
    assert (tasks["old"]["arc_easy/acc"], tasks["ho"]["hellaswag/acc"]) == ("-", "0.3000")


def test_a_new_c4_record_is_read_by_its_new_names_not_the_old_ones(tmp_path):
    record = eval_record(2, {"c4": (30.0, 1.5)}) | {"eval/c4_ppl": 999.0}
    run = compare.read_run(make_run(tmp_path, "r", [train_record(2, 6.0), record], {}))
    assert list(run.sets) == ["c4"]
    assert [(p["ppl"], p["bits_per_byte"]) for p in run.sets["c4"]] == [(30.0, 1.5)]


SPARSE_CASES = {
    "dense": ({"enable_slt": False}, "dense", "0%"),
    "magnitude file": ({"slt_config": "FILE"}, "magnitude", "80%"),
    "supermask inline, default": ({"slt_config": {"method": "supermask"}}, "supermask", "50%"),
    "nm inline, 1:4": ({"slt_config": {"method": "nm", "n": 1, "m": 4}}, "nm", "75%"),
    "nm default 2:4": ({"slt_config": {"method": "nm"}}, "nm", "50%"),
    "sltrain default": ({"slt_config": {"method": "sltrain"}}, "sltrain", "97%"),
    "file gone": ({"slt_config": "GONE"}, "?", "?"),
    "file not JSON": ({"slt_config": "BROKEN"}, "?", "?"),
    "unknown method": ({"slt_config": {"method": "lottery"}}, "lottery", "?"),
}


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_the_sparse_method_and_sparsity_come_from_the_runs_slt_config(tmp_path, case):
    args, method, sparsity = SPARSE_CASES[case]
    (tmp_path / "slt.json").write_text('{"method": "magnitude", "final_sparsity": 0.8}')
    (tmp_path / "broken.json").write_text('{"method": ')
    paths = {"FILE": "slt.json", "GONE": "gone.json", "BROKEN": "broken.json"}
    if isinstance(args.get("slt_config"), str):
        args = args | {"slt_config": str(tmp_path / paths[args["slt_config"]])}
    args = {"enable_slt": True} | args
    row = compare.summary(compare.read_run(make_run(tmp_path, "r", [], {"args": args})))
    shown = [compare._cell(column, row.main[column]) for column in ("method", "sparsity")]
    assert shown == [method, sparsity]


def test_a_run_without_config_json_shows_dashes_where_it_would_tell():
    assert compare.sparse_setting(None) == (None, None)
    assert compare.parameter_counts(None) == (None, None)


def test_the_sparsity_defaults_are_those_of_slt_config(monkeypatch):
    # slt/config.py alone: the package would load its layers and torch, seconds for a dict
    spec = importlib.util.spec_from_file_location("slt_config", REPO / "slt" / "config.py")
    slt_config = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "slt_config", slt_config)  # its dataclass looks itself up
    spec.loader.exec_module(slt_config)
    METHOD_DEFAULTS = slt_config.METHOD_DEFAULTS
    for method, defaults in compare.SPARSITY_DEFAULTS.items():
        assert defaults == {key: METHOD_DEFAULTS[method][key] for key in defaults}
    assert set(compare.SPARSITY_DEFAULTS) == set(METHOD_DEFAULTS)


def seed_run(root: Path, name: str, seed: int, loss: float, ppl: float | None, acc: float,
             config: dict | None = None, last_step: int = 4) -> Path:  # fmt: skip
    sets = {"c4": (ppl, 1.0)} if ppl is not None else {}
    records = [train_record(2, loss + 1, tokens_per_s_per_gpu=1000.0 + seed),
               train_record(last_step, loss, tokens_per_s_per_gpu=1000.0 + seed),
               eval_record(last_step, sets, {"arc_easy/acc": acc})]  # fmt: skip
    config = {"args": {"seed": seed, **(config or {})}}
    return make_run(root, name, records, config)


def test_group_averages_the_seeds_of_a_setting(tmp_path, capsys):
    other_lr = {"lr": 1e-3}
    # Names, output and W&B settings differ too: they say nothing about the setting.
    renamed = {"output_dir": "elsewhere", "wandb_run_name": "a3", "wandb_project": "p",
               "tensorboard_dir": "tb", "resume_dir": "auto"}  # fmt: skip
    runs = [seed_run(tmp_path, "a1", 1, 3.0, 20.0, 0.5),
            seed_run(tmp_path, "b1", 1, 4.0, 30.0, 0.25, other_lr),
            seed_run(tmp_path, "a2", 2, 3.2, 22.0, 0.6),
            seed_run(tmp_path, "a3", 3, 3.4, None, 0.7, renamed),
            seed_run(tmp_path, "b2", 2, 4.0, 30.0, 0.25, other_lr)]  # fmt: skip
    main, sets, tasks = compare_printed(capsys, *runs, "--group")
    assert list(main) == ["a1, a2, a3", "b1, b2"]  # in the order given
    a, b = main["a1, a2, a3"], main["b1, b2"]
    assert (a["n"], a["method"], a["trainable"], a["steps"]) == ("3", "dense", "158.9K", "4")
    # 3.0, 3.2, 3.4: mean 3.2, sample std sqrt(((-0.2)^2 + 0 + 0.2^2) / 2) = 0.2
    assert (a["final loss"], a["best loss"]) == ("3.2000 ± 0.2000", "3.2000 ± 0.2000")
    assert (a["tokens seen"], a["tokens/s/GPU"], a["MFU"]) == ("2,048 ± 0", "1,002 ± 1", "-")
    assert tasks["a1, a2, a3"]["arc_easy/acc"] == "0.6000 ± 0.1000"
    # a3 has no c4 evaluation: 20 and 22 over 2 runs, std sqrt(2) = 1.4142
    assert sets["a1, a2, a3"]["c4 ppl"] == "21.0000 ± 1.4142 (n=2)"
    assert (b["n"], b["final loss"], sets["b1, b2"]["c4 ppl"]) == (
        "2",
        "4.0000 ± 0.0000",
        "30.0000 ± 0.0000",
    )


def test_a_group_of_one_shows_its_values_without_a_spread(tmp_path, capsys):
    [main, *_] = compare_printed(capsys, seed_run(tmp_path, "a1", 1, 3.0, 20.0, 0.5), "--group")
    assert (main["a1"]["n"], main["a1"]["final loss"]) == ("1", "3.0000")


@pytest.mark.parametrize("case", ["steps differ", "no config.json", "given twice"])
def test_group_mistakes_cost_one_line(tmp_path, capsys, case):
    a1 = seed_run(tmp_path, "a1", 1, 3.0, 20.0, 0.5)
    if case == "steps differ":
        second, message = seed_run(tmp_path, "a2", 2, 3.2, 22.0, 0.6, last_step=3), (
            "--group: runs a1 at step 4, a2 at step 3 differ only by seed but stopped at "
            "different steps")  # fmt: skip
    elif case == "no config.json":
        second = seed_run(tmp_path, "a2", 2, 3.2, 22.0, 0.6)
        (second / "config.json").unlink()
        message = "--group: run a2 has no config.json args"
    else:
        second, message = a1 / ".." / "a1", f"run {a1 / '..' / 'a1'} is given twice"
    with pytest.raises(SystemExit) as stop:
        compare.main([str(a1), str(second), "--group"])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_a_run_from_before_tokens_seen_counts_its_tokens_from_its_config(tmp_path, capsys):
    records = [
        {k: v for k, v in train_record(s, 6.0).items() if k != "tokens_seen"} for s in (1, 6)
    ]
    [main] = compare_printed(capsys, make_run(tmp_path, "old", records, {}))
    assert main["old"]["tokens seen"] == "3,072"


def test_a_last_line_cut_short_by_a_kill_is_left_out_and_a_bad_line_before_is_refused(
    tmp_path, capsys
):
    killed = make_run(tmp_path, "small", [train_record(s, 6.0) for s in (1, 2, 3)], {})
    metrics = killed / "metrics.jsonl"
    logged = metrics.read_text()
    metrics.write_text(logged + '{"step": 4, "loss": 6.')
    assert compare_printed(capsys, killed)[0]["small"]["steps"] == "3"
    metrics.write_text('{"step": 4, "loss": 6.\n' + logged)
    with pytest.raises(SystemExit):
        compare.main([str(killed)])
    assert f"error: {metrics}: line 1 is not JSON" in capsys.readouterr().err


def curves_run(root: Path, name: str, ppl_scale: float, sets=("c4", "wiki")) -> compare.Run:
    """Six log lines and three evaluations; perplexity within 20-30, inside one decade."""
    records = []
    for step in range(1, 7):
        records.append(train_record(step, 7.0 - step / 4 + ppl_scale))
        if step % 2 == 0:
            ppl = (30 - step) * ppl_scale
            records.append(eval_record(step, dict.fromkeys(sets, (ppl, 1.0))))
    return compare.read_run(make_run(root, name, records, {}))


def test_the_plot_has_a_labelled_panel_per_set_and_a_legend_beside_them(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    runs = [curves_run(tmp_path, "a", 1.0), curves_run(tmp_path, "b", 1.0, sets=("c4", "arc"))]
    figure = compare.draw_figure([compare.Series(run.name, [run]) for run in runs])
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # lays the figure out: legend and axes where the file has them
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["train loss", "validation ppl: arc", "validation ppl: c4",
                      "validation ppl: wiki"]  # fmt: skip
    assert [a.get_xlabel() for a in figure.axes] == ["tokens seen"] * 4
    assert [a.get_ylabel() for a in figure.axes] == ["train loss"] + ["perplexity"] * 3
    assert [a.get_yscale() for a in figure.axes] == ["linear"] + ["log"] * 3
    [legend] = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["a", "b"]
    renderer = canvas.get_renderer()
    for axis in figure.axes:  # below every panel, its tick labels and axis labels included
        assert not legend.get_window_extent(renderer).overlaps(axis.get_tightbbox(renderer))
    # the two runs' identical c4 curves: told apart by line style and marker, not colour only
    a, b = figure.axes[2].get_lines()
    assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())
    assert list(a.get_ydata()) == list(b.get_ydata()) == [28.0, 26.0, 24.0]
    assert [len(axis.get_lines()) for axis in figure.axes] == [2, 1, 2, 1]
    for axis in figure.axes[1:]:  # 24-28 lies within a decade: still four labels or more
        low, high = axis.get_ylim()
        labelled = [t for t in axis.yaxis.get_major_ticks() if low <= t.get_loc() <= high]
        assert len([t for t in labelled if t.label1.get_text()]) >= 4


def test_the_plot_of_a_group_draws_its_mean_and_a_band(tmp_path):
    pytest.importorskip("matplotlib")
    seeds = [
        curves_run(tmp_path, f"s{i}", scale, sets=("c4",)) for i, scale in enumerate((1.0, 1.5))
    ]
    lone = curves_run(tmp_path, "lone", 2.0, sets=("c4",))
    series = [compare.Series("s0, s1", seeds), compare.Series("lone", [lone])]
    figure = compare.draw_figure(series)
    loss, c4 = figure.axes
    mean, _ = c4.get_lines()
    assert list(mean.get_ydata()) == [35.0, 32.5, 30.0]  # (28 + 42) / 2, ...
    [band] = c4.collections  # the group's ±std; none for the lone run
    extent = band.get_paths()[0].get_extents()
    # top at step 2: 28 and 42, mean 35, std 14 / sqrt(2); bottom at step 6: 24 and 36
    assert (extent.y0, extent.y1) == pytest.approx((30 - math.sqrt(72), 35 + math.sqrt(98)))
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        "s0, s1 (mean ± std, n=2)", "lone"]  # fmt: skip


def test_the_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    runs = [
        make_run(tmp_path, name, [train_record(s, 7.0 - s) for s in (1, 2)], {}) for name in "ab"
    ]
    plot = tmp_path / "plots" / "compare.png"
    compare.main([*map(str, runs), f"--plot={plot}"])
    height, width, _ = imread(plot).shape
    assert width > 100 and height > 100
    assert [p.name for p in plot.parent.iterdir()] == ["compare.png"]  # no partial file left
    assert capsys.readouterr().out.endswith(f"plot: {plot}\n")


@pytest.mark.parametrize("case", ["not a run", "no matplotlib"])
def test_mistakes_cost_one_line(tmp_path, capsys, monkeypatch, case):
    if case == "not a run":
        argv, message = [str(tmp_path)], f"{tmp_path} has no metrics.jsonl"
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        run = make_run(tmp_path, "small", [train_record(1, 6.0)], {})
        argv = [str(run), f"--plot={tmp_path / 'x.png'}"]
        message = "--plot needs matplotlib: pip install '.[plot]'"
    with pytest.raises(SystemExit) as stop:
        compare.main(argv)
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_runs_of_the_same_name_in_two_sweeps_are_told_apart(tmp_path, capsys):
    """Two sweeps' `lr1` rows (and curves): each named with as much of its path as tells it
    from the others."""
    records = [train_record(2, 6.0), eval_record(2, {"c4": (30.0, 1.0)})]
    runs = [make_run(tmp_path / sweep, name, records, {})
            for sweep, name in (("a", "lr1"), ("b", "lr1"), ("a", "lr2"), ("c/a", "lr1"))]  # fmt: skip
    [main, sets] = compare_printed(capsys, *runs)
    names = [f"{tmp_path.name}/a/lr1", "b/lr1", "lr2", "c/a/lr1"]
    assert list(main) == list(sets) == names


def test_a_flat_perplexity_curve_has_distinct_exact_tick_labels(tmp_path):
    """Late in training perplexity moves in its first decimal: labels such as 1001 1001 1002
    would read as one value twice."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = [train_record(2, 6.0)]
    records += [eval_record(s, {"c4": (1001.2 + s / 20, 1.0)}) for s in (2, 4, 6)]
    figure = compare.draw_figure(
        [compare.Series("r", [compare.read_run(make_run(tmp_path, "r", records))])]
    )
    FigureCanvasAgg(figure).draw()
    axis = figure.axes[1]
    low, high = axis.get_ylim()
    shown = {t.get_loc(): t.label1.get_text() for t in axis.yaxis.get_major_ticks()
             if low <= t.get_loc() <= high}  # fmt: skip
    assert len(shown) >= 2 and len(set(shown.values())) == len(shown)
    assert [float(text) for text in shown.values()] == pytest.approx(list(shown), rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(low=st.floats(1.0, 1e7), width=st.floats(1e-13, 1e3))
@example(low=100.00000000001, width=2e-13)
@example(low=1234567.891, width=4e-10)
def test_log_axis_ticks_are_labelled_distinctly_and_exactly(low, width):
    """Any perplexity range, down to a flat curve's: at least two ticks, each label the tick's
    value to within a millionth of the space between ticks (no two alike, none rounded off
    its place)."""
    pytest.importorskip("matplotlib")
    high = low * (1 + width)
    ticks = compare.log_axis_ticks(low, high)
    labels = compare.tick_labels(ticks)
    assert len(ticks) >= 2
    assert len(set(labels)) == len(labels)
    space = min(b - a for a, b in itertools.pairwise(ticks))
    pairs = zip(labels, ticks, strict=True)
    assert all(abs(float(label) - tick) <= 1e-6 * space for label, tick in pairs)


def test_a_run_reached_through_a_link_is_told_apart_from_its_namesake(tmp_path, capsys):
    """`link/../r1` is another directory than `r1` when `link` points elsewhere: the labels
    are those of the directories themselves."""
    records = [train_record(2, 6.0)]
    make_run(tmp_path / "deep", "r1", records, {})
    (tmp_path / "deep" / "inner").mkdir()
    plain = make_run(tmp_path, "r1", records, {})
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "inner")
    [main] = compare_printed(capsys, tmp_path / "link" / ".." / "r1", plain)
    assert list(main) == ["deep/r1", f"{tmp_path.name}/r1"]
