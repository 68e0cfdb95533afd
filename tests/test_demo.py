"""scripts/demo.py's assets, built once under a cache: a build cut short is finished by the
next one."""

from __future__ import annotations

import importlib.util
import json

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
