"""python -m utils.compare on real run directories: the table, the plot, runs logged before
tokens_seen existed, and one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from datas.local_corpus import write_c4_validation
from tests.helpers import metrics_records, tiny_run_flags, train_in_process
from utils import compare


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mds_tokens, tokenizer_dir, docstrings) -> Path:
    """Two 3-step runs with an evaluation at step 3: global batch 8, and 16 with an MFU."""
    out = tmp_path_factory.mktemp("compare")
    c4 = write_c4_validation(docstrings[-40:], out / "c4")
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, out, steps=3, num_workers=0)
    flags += ["--eval_every=3", f"--eval_data={c4}", "--eval_max_windows=4"]
    train_in_process(*flags, "--run_name=small", "--local_batch=8")
    train_in_process(*flags, "--run_name=big", "--local_batch=16", "--global_batch=16",
                     "--peak_tflops=1")  # fmt: skip
    return out


def table_rows(printed: str) -> dict[str, list[str]]:
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {cells[0]: cells for cells in rows}


def test_the_table_summarizes_each_run(runs, capsys):
    compare.main([str(runs / "small"), str(runs / "big")])
    rows = table_rows(capsys.readouterr().out)
    for name, tokens in (("small", "1,536"), ("big", "3,072")):
        records = metrics_records(runs / name)
        losses = [r["loss"] for r in records if "loss" in r]
        ppl = [r["eval/c4_ppl"] for r in records if "eval/c4_ppl" in r]
        run, steps, seen, final, best, c4_ppl, _, mfu = rows[name]
        assert (steps, seen) == ("3", tokens)
        assert float(final) == pytest.approx(losses[-1], abs=1e-4)
        assert float(best) == pytest.approx(min(losses), abs=1e-4)
        assert float(c4_ppl) == pytest.approx(ppl[-1], abs=1e-4)
    assert rows["small"][7] == "-" and rows["big"][7].endswith("%")  # MFU needs a known peak


def test_a_run_from_before_tokens_seen_counts_its_tokens_from_its_config(runs, tmp_path, capsys):
    old = shutil.copytree(runs / "big", tmp_path / "big")
    records = [{k: v for k, v in r.items() if k != "tokens_seen"} for r in metrics_records(old)]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    compare.main([str(old)])
    assert table_rows(capsys.readouterr().out)["big"][2] == "3,072"


def test_a_last_line_cut_short_by_a_kill_is_left_out_and_a_bad_line_before_is_refused(
    runs, tmp_path, capsys
):
    killed = shutil.copytree(runs / "small", tmp_path / "small")
    metrics = killed / "metrics.jsonl"
    logged = metrics.read_text()
    metrics.write_text(logged + '{"step": 4, "loss": 6.')
    compare.main([str(killed)])
    assert table_rows(capsys.readouterr().out)["small"][1] == "3"
    metrics.write_text('{"step": 4, "loss": 6.\n' + logged)
    with pytest.raises(SystemExit):
        compare.main([str(killed)])
    assert f"error: {metrics}: line 1 is not JSON" in capsys.readouterr().err


def test_the_plot_is_written(runs, tmp_path):
    from matplotlib.image import imread

    plot = tmp_path / "plots" / "compare.png"
    compare.main([str(runs / "small"), str(runs / "big"), f"--plot={plot}"])
    height, width, _ = imread(plot).shape
    assert width > height > 100
    assert [p.name for p in plot.parent.iterdir()] == ["compare.png"]


@pytest.mark.parametrize("case", ["not a run", "no matplotlib"])
def test_mistakes_cost_one_line(runs, tmp_path, capsys, monkeypatch, case):
    if case == "not a run":
        argv, message = [str(tmp_path)], f"{tmp_path} has no metrics.jsonl"
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        argv = [str(runs / "small"), f"--plot={tmp_path / 'x.png'}"]
        message = "--plot needs matplotlib: pip install '.[plot]'"
    with pytest.raises(SystemExit) as stop:
        compare.main(argv)
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")
