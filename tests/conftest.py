"""Fixtures shared by the whole suite: built once per session, kept tiny."""

from __future__ import annotations

from pathlib import Path

import pytest

from datas.local_corpus import stdlib_docstrings, train_byte_bpe


@pytest.fixture(scope="session")
def docstrings() -> list[str]:
    """Real English documents (standard-library docstrings), in a fixed order."""
    return list(stdlib_docstrings())


@pytest.fixture(scope="session")
def tokenizer_dir(docstrings: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer directory with EOS and PAD tokens (vocab 1024)."""
    return train_byte_bpe(docstrings, tmp_path_factory.mktemp("tokenizer"), vocab_size=1024)
