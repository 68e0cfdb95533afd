"""The preparation tool: every input format, tokens blocks, counts, errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datas.prepare import prepare_mds
from tests.helpers import REPO, child_env
from utils.errors import UserError


def test_every_input_format_is_read(tmp_path, data_docs):
    docs = data_docs[:12]
    inputs = tmp_path / "in"
    inputs.mkdir()
    # a null text is an empty document, skipped, in JSON as in parquet
    (inputs / "a.jsonl").write_text(
        "".join(json.dumps({"body": d}) + "\n" for d in [*docs[:3], None])
    )
    with gzip.open(inputs / "b.json.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[3:6])
    pq.write_table(pa.table({"body": [*docs[6:9], None]}), inputs / "c.parquet")
    for i, doc in enumerate(docs[9:]):
        (inputs / f"d{i}.txt").write_text(doc)
    stats = prepare_mds([inputs], tmp_path / "mds", text_field="body", progress=False)
    assert (stats.files, stats.documents, stats.samples, stats.skipped_empty) == (6, 12, 12, 2)

    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(tmp_path / "mds"), batch_size=1)
    assert sorted(dataset[i]["text"] for i in range(12)) == sorted(docs)
    index = json.loads((tmp_path / "mds" / "index.json").read_text())
    assert all(
        s["compression"] == "zstd" and "sha1" in s["zip_data"]["hashes"] for s in index["shards"]
    )


def test_tokens_blocks_are_exactly_seq_len(mds_tokens, tokenizer_dir, data_docs):
    from streaming import StreamingDataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dataset = StreamingDataset(local=str(mds_tokens), batch_size=1)
    blocks = np.stack([dataset[i]["tokens"] for i in range(dataset.num_samples)])
    assert blocks.dtype == np.int32 and blocks.shape[1] == 64
    ids = tokenizer(data_docs, add_special_tokens=False)["input_ids"]
    joined = np.concatenate([np.append(x, tokenizer.eos_token_id) for x in ids])
    assert np.array_equal(blocks.ravel(), joined[: blocks.size])
    assert len(joined) - blocks.size < 64


def test_missing_field_and_empty_input(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(
        UserError, match=r"a.jsonl:1: no string field 'text' \(fields: content\); pass --text_field"
    ):
        prepare_mds([tmp_path / "a.jsonl"], tmp_path / "out1", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no documents found"):
        prepare_mds([tmp_path / "empty"], tmp_path / "out2", progress=False)


def test_cli_prints_counts_and_one_line_errors(tmp_path, data_docs):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in data_docs[:5])
    )
    cli = [sys.executable, "-m", "datas.prepare", "--input", str(tmp_path / "a.jsonl")]
    done = subprocess.run(
        [*cli, "--output", str(tmp_path / "mds")],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "5 documents from 1 files" in done.stdout and "validated" in done.stdout
    again = subprocess.run(
        [*cli, "--output", str(tmp_path / "mds")],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: --output {tmp_path / 'mds'} already holds files; choose a new directory or empty it"
    ]


def test_an_interrupted_preparation_leaves_nothing_and_can_be_run_again(
    tmp_path, data_docs, monkeypatch
):
    """Interrupted mid-write (streaming's writer would finish an index on the way out), it
    leaves neither a dataset that looks complete nor an index.json that blocks the retry."""
    from datas import prepare
    from datas.local_corpus import write_jsonl

    docs = write_jsonl(data_docs, tmp_path / "in" / "docs.jsonl")
    read = prepare.read_documents

    def interrupted_after_ten(path, field):
        for number, text in enumerate(read(path, field)):
            if number == 10:
                raise KeyboardInterrupt
            yield text

    monkeypatch.setattr(prepare, "read_documents", interrupted_after_ten)
    with pytest.raises(KeyboardInterrupt):
        prepare_mds([docs], tmp_path / "mds", progress=False, size_limit=1 << 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    monkeypatch.setattr(prepare, "read_documents", read)
    stats = prepare_mds([docs], tmp_path / "mds", progress=False, size_limit=1 << 12)
    assert stats.samples == len(data_docs)
