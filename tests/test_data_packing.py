"""Packers on synthetic documents: what each strategy puts in a batch (no streaming)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from datas import get_loader_builder
from datas.packing import DocChunk, DocumentFeed, make_packer, token_count
from tests.helpers import REPO, child_env

EOS, PAD = 0, 1


def synthetic_docs(count: int = 40, seed: int = 0) -> list[np.ndarray]:
    """Documents of 1..150 tokens (ids >= 2), each ending in EOS like the tokenizer's output."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        body = rng.integers(2, 1000, size=int(rng.integers(1, 150)), dtype=np.int32)
        docs.append(np.append(body, np.int32(EOS)))
    return docs


def feed_of(docs: list[np.ndarray], chunk: int = 7) -> DocumentFeed:
    def epoch():
        for i in range(0, len(docs), chunk):
            part = docs[i : i + chunk]
            yield DocChunk(np.concatenate(part), np.array([len(d) for d in part]))

    return DocumentFeed(epoch)


def packer(strategy: str, docs: list[np.ndarray], **kwargs):
    options = dict(rows=4, seq_len=32, eos_id=EOS, pad_id=PAD, overflow_stride=0)
    options |= kwargs
    return make_packer(strategy, feed_of(docs), emit_position_ids=True, **options)


def test_pack_is_the_concatenation_cut_into_blocks():
    docs = synthetic_docs()
    p = packer("pack", docs)
    batches = [p.next_batch() for _ in range(10)]
    stream = np.concatenate([b["input_ids"].numpy().ravel() for b in batches])
    assert np.array_equal(stream, np.concatenate(docs)[: len(stream)])
    for b in batches:
        assert b["input_ids"].shape == (4, 32)
        assert (b["labels"] == b["input_ids"]).all() and "attention_mask" not in b


def test_pack_position_ids_restart_after_each_eos():
    p = packer("pack", synthetic_docs())
    batch = p.next_batch()
    for row, positions in zip(
        batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True
    ):
        expected, current = [], 0
        for token in row:
            expected.append(current)
            current = 0 if token == EOS else current + 1
        assert positions == expected


@pytest.mark.parametrize("stride", [0, 8])
def test_overflow_trains_every_token_once(stride: int):
    docs = synthetic_docs()
    p = packer("overflow", docs, overflow_stride=stride)
    trained = []
    for _ in range(12):
        batch = p.next_batch()
        labels, mask = batch["labels"].numpy(), batch["attention_mask"].numpy()
        assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] <= 32
        assert (labels[mask == 0] == -100).all()
        assert (batch["input_ids"].numpy()[mask == 0] == PAD).all()
        trained += [row[row != -100] for row in labels]
    stream = np.concatenate(trained)
    assert np.array_equal(stream, np.concatenate(docs)[: len(stream)])
    if stride:
        overlapping = [
            row for row in labels if (row[:stride] == -100).all() and (row != -100).any()
        ]
        assert overlapping, "some window should start with a masked overlap"


def test_trunc_keeps_each_document_start_and_masks_padding():
    docs = synthetic_docs()
    p = packer("trunc", docs)
    batch = p.next_batch()
    width = batch["input_ids"].shape[1]
    for doc, ids, mask in zip(
        docs, batch["input_ids"].numpy(), batch["attention_mask"].numpy(), strict=False
    ):
        n = min(len(doc), 32)
        assert np.array_equal(ids[:n], doc[:n]) and mask[:n].all() and not mask[n:].any()
    assert width % 8 == 0 and width <= 32


@pytest.mark.parametrize("strategy", ["trunc", "pack"])
def test_token_count_counts_what_is_not_padding(strategy):
    """tokens/s and tokens_seen count real tokens: a trunc row holds min(len(doc), 32) of its
    document, whatever its padding; a pack row holds 32."""
    docs = synthetic_docs()
    batch = packer(strategy, docs).next_batch()
    real = sum(min(len(doc), 32) for doc in docs[:4]) if strategy == "trunc" else 4 * 32
    assert token_count(batch) == real
    assert strategy == "pack" or real < batch["input_ids"].numel()  # there was padding


def test_buffer_state_round_trip_continues_identically():
    docs = synthetic_docs(80)
    for strategy in ("pack", "overflow"):
        a = packer(strategy, docs, overflow_stride=4)
        for _ in range(3):
            a.next_batch()
        state, position = a.buffer_state(), a.feed.position
        expected = [a.next_batch()["input_ids"] for _ in range(3)]
        b = packer(strategy, docs, overflow_stride=4)
        b.feed.discard(position)
        b.load_buffer_state(state)
        got = [b.next_batch()["input_ids"] for _ in range(3)]
        assert all((x == y).all() for x, y in zip(expected, got, strict=True)), strategy


def test_feed_rolls_over_epochs_and_counts_documents():
    docs = synthetic_docs(10)
    feed = feed_of(docs, chunk=3)
    taken = feed.take_documents(25)
    assert [len(d) for d in taken] == [len(d) for d in (docs * 3)[:25]]
    assert (feed.epoch, feed.in_epoch, feed.position) == (2, 5, 25)


def test_registry_names_and_unknown_name():
    builder = get_loader_builder("FineWeb-Edu")
    assert builder is get_loader_builder("SmolLM")
    assert builder.__name__ == "build_train_loader"
    with pytest.raises(ValueError, match="--data_name Nope is unknown; choose one of: FineWeb-Edu"):
        get_loader_builder("Nope")


def test_importing_datas_does_not_import_streaming_or_transformers():
    code = (
        "import sys, datas, datas.SmolLM.load_data; "
        "print(sorted(m for m in ('streaming', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr
