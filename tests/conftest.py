"""Fixtures shared by the whole suite: built once per session, kept tiny."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from datas.local_corpus import stdlib_docstrings, train_byte_bpe


@pytest.fixture(scope="session")
def docstrings() -> list[str]:
    """Real English documents (standard-library docstrings), in a fixed order."""
    return list(stdlib_docstrings())


@pytest.fixture(scope="session")
def tokenizer_dir(docstrings: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer directory with EOS and PAD tokens (vocab 1024)."""
    return train_byte_bpe(docstrings, tmp_path_factory.mktemp("tokenizer"), vocab_size=1024)


# Data-layer fixtures. 256 documents, a multiple of num_canonical_nodes (2) x world size (2),
# so streaming pads nothing and every document appears exactly once per epoch.
DATA_DOCS = 256
DATA_CANONICAL_NODES = 2
DATA_SEQ_LEN = 64


@pytest.fixture(scope="session")
def data_docs(docstrings: list[str]) -> list[str]:
    return docstrings[:DATA_DOCS]


@pytest.fixture(scope="session")
def mds_text(data_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MDS dataset with a `text` column (zstd, sha1), written by the prepare tool."""
    from datas.local_corpus import write_jsonl
    from datas.prepare import prepare_mds

    root = tmp_path_factory.mktemp("mds_text")
    write_jsonl(data_docs, root / "in" / "docs.jsonl")
    prepare_mds([root / "in"], root / "mds", progress=False, size_limit=1 << 16)
    return root / "mds"


@pytest.fixture(scope="session")
def mds_tokens(
    data_docs: list[str], tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An MDS dataset of pre-packed `tokens` blocks of DATA_SEQ_LEN tokens."""
    from datas.local_corpus import write_jsonl
    from datas.prepare import prepare_mds

    root = tmp_path_factory.mktemp("mds_tokens")
    write_jsonl(data_docs, root / "in" / "docs.jsonl")
    prepare_mds(
        [root / "in"],
        root / "mds",
        tokenizer=str(tokenizer_dir),
        seq_len=DATA_SEQ_LEN,
        progress=False,
        size_limit=1 << 16,
    )
    return root / "mds"


@pytest.fixture
def world_of_one():
    """A gloo group of one in this process, for code that makes collectives (SIGTERM's handler
    restored afterwards: an ExitPolicy sets its own)."""
    from tests.helpers import free_port

    handler = signal.getsignal(signal.SIGTERM)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, handler)
