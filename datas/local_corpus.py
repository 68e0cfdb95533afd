"""Offline data for the demo and the tests: real English text found on every machine.

Nothing can be downloaded in CI, so the corpus is the docstrings of the Python standard
library (prose written by people, ~1.3 MB) and the tokenizer is a byte-level BPE trained on
it with the `tokenizers` library, by the trainer `python -m datas.tokenizer` uses.
"""

from __future__ import annotations

import ast
import gzip
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from datas.tokenizer import byte_level_bpe


def stdlib_docstrings(min_chars: int = 200) -> Iterator[str]:
    """Yield every module, class and function docstring of at least `min_chars` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idle_test"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def write_jsonl(texts: list[str], path: Path) -> Path:
    """Write one `{"text": ...}` object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_c4_validation(texts: list[str], directory: Path) -> Path:
    """Write `texts` as a validation set in C4's file format (one gzipped JSON-lines shard);
    returns the directory, which --eval_data takes."""
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / "c4-validation.00000-of-00001.json.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    return directory


def train_byte_bpe(texts: Iterable[str], out_dir: Path, vocab_size: int = 2048) -> Path:
    """Train the project's byte-level BPE (`datas.tokenizer.byte_level_bpe`, which
    `python -m datas.tokenizer` runs) on `texts` and save it into `out_dir`, made if need be;
    returns `out_dir`. For fixtures: it writes in place, unlike the command."""
    tokenizer = byte_level_bpe(texts, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
