"""scripts/demo.py's assets, built once under a cache: a build cut short is finished by the
next one."""

from __future__ import annotations

import importlib.util
import json

import pytest

from datas.local_corpus import write_c4_validation
from tests.helpers import REPO


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_a_build_stopped_after_the_held_out_set_is_finished_by_the_next(
    docstrings, tmp_path, monkeypatch
):
    demo = load_demo()
    texts = docstrings[:400]
    monkeypatch.setattr(demo, "CACHE", tmp_path)
    monkeypatch.setattr(demo, "stdlib_docstrings", lambda: iter(texts))
    commands = []  # the MDS step is datas.prepare's own business (tests/test_data_prepare.py)
    monkeypatch.setattr(demo, "run", commands.append)
    write_c4_validation(texts[-demo.EVAL_DOCS :], tmp_path / "eval")  # and then it was killed
    assets = demo.build_assets()
    corpus = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").open()]
    assert corpus == texts[: -demo.EVAL_DOCS]
    assert commands == [[*commands[0][:3], "--input", str(tmp_path / "corpus.jsonl"),
                         "--output", str(assets["data"])]]  # fmt: skip
    assert (assets["tokenizer"] / "tokenizer.json").is_file()


def test_help_only_prints_the_usage(tmp_path, monkeypatch, capsys):
    """`python scripts/demo.py --help` used to delete the last demo run and start training."""
    demo = load_demo()
    monkeypatch.setattr(demo, "OUTPUT", tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    did = []
    for step in ("build_assets", "train", "summarize", "run"):
        monkeypatch.setattr(demo, step, lambda *args, step=step: did.append(step))
    with pytest.raises(SystemExit) as stop:
        demo.main(["--help"])
    assert stop.value.code == 0 and did == []
    assert capsys.readouterr().out.startswith("usage: scripts/demo.py [-h]")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"
    with pytest.raises(SystemExit) as stop:
        demo.main(["--steps=3"])
    assert stop.value.code == 2 and did == []
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --steps=3")


def test_a_rerun_keeps_the_earlier_demos(tmp_path, monkeypatch):
    """`make demo` twice used to delete the first run: now the first is run/ (and run.png),
    the next run-2/, then run-3/, every earlier one left as it was."""
    demo = load_demo()
    monkeypatch.setattr(demo, "OUTPUT", tmp_path)
    monkeypatch.setattr(demo, "build_assets", dict)
    commands = []
    monkeypatch.setattr(demo, "run", commands.append)
    monkeypatch.setattr(demo, "train", lambda assets, name: (tmp_path / name).mkdir())
    demo.main([])
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    demo.main([])
    (tmp_path / "run-3.png").write_bytes(b"a plot")  # any file of the name keeps it taken
    demo.main([])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-2", "run-3.png", "run-4"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"
    plots = [cmd[-1] for cmd in commands]  # utils.compare RUN --plot=RUN.png
    assert plots == [f"--plot={tmp_path / name}.png" for name in ("run", "run-2", "run-4")]


def test_the_run_is_named_on_the_command_line_only_once(monkeypatch, tmp_path):
    demo = load_demo()
    monkeypatch.setattr(demo, "OUTPUT", tmp_path)
    commands = []
    monkeypatch.setattr(demo, "run", commands.append)
    demo.train({"data": "d", "tokenizer": "t", "config": "c", "eval": "e"}, "run-2")
    assert [arg for arg in commands[0] if arg.startswith("--run_name")] == ["--run_name=run-2"]
