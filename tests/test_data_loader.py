"""The loader on real MDS files in one process: fidelity, exact resume, bad input."""

from __future__ import annotations

import gc
import json
import multiprocessing
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from datas.SmolLM.load_data import build_train_loader
from tests.conftest import DATA_CANONICAL_NODES, DATA_SEQ_LEN
from utils.errors import UserError


def make_loader(mds_root: Path, tokenizer_dir: Path, **kwargs):
    """The loader train.py builds, over the suite's data: pack, 4 blocks a micro-batch, no
    workers; `kwargs` change any of it."""
    options = dict(
        strategy="pack",
        seq_len=DATA_SEQ_LEN,
        micro_blocks=4,
        num_workers=0,
        pack_batch_texts=16,
        num_canonical_nodes=DATA_CANONICAL_NODES,
    )
    options |= kwargs
    return build_train_loader(mds_root=str(mds_root), tokenizer_name=str(tokenizer_dir), **options)


def take(iterator, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(iterator) for _ in range(count)]


def test_pack_fidelity_every_document_decodes_verbatim(mds_text, tokenizer_dir, data_docs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    loader = make_loader(mds_text, tokenizer_dir, micro_blocks=32, emit_position_ids=True)
    eos = loader.special_token_ids["eos_token_id"]
    assert loader.vocab_size == len(tokenizer)
    batches = []
    for batch in loader:  # until the packer has reached into the second epoch
        batches.append(batch["input_ids"].numpy().ravel())
        if loader.feed.epoch:
            break
    stream = np.concatenate(batches)
    documents = np.split(stream, np.flatnonzero(stream == eos) + 1)
    decoded = [tokenizer.decode(doc[:-1]) for doc in documents[: len(data_docs)]]
    # One epoch holds each input document once, verbatim (the corpus repeats a few
    # docstrings, hence multisets).
    assert Counter(decoded) == Counter(data_docs)


@pytest.mark.parametrize(
    "strategy, before",
    # trunc reads 4 documents per batch, 64 batches per epoch: resuming at 62 crosses it.
    [("pack", 5), ("overflow", 7), ("trunc", 62)],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_uninterrupted_batches(
    mds_text, tokenizer_dir, tmp_path, strategy, before, workers
):
    options = dict(strategy=strategy, num_workers=workers, overflow_stride=8)
    assert_resume_continues(mds_text, tokenizer_dir, tmp_path, before, **options)


def assert_resume_continues(mds_root, tokenizer_dir, tmp_path, before: int, **options) -> None:
    """A loader saved after `before` batches and loaded into a new one yields the next 6
    batches of the uninterrupted loader."""
    loader = make_loader(mds_root, tokenizer_dir, **options)
    iterator = iter(loader)
    take(iterator, before)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = take(iterator, 6)
    del iterator, loader
    gc.collect()

    resumed = make_loader(mds_root, tokenizer_dir, **options)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got = take(iter(resumed), 6)
    for want, have in zip(expected, got, strict=True):
        assert want.keys() == have.keys()
        for key in want:
            assert torch.equal(want[key], have[key]), key


# trunc at a long seq_len, so that short documents are padded.
@pytest.mark.parametrize("strategy, seq_len", [("overflow", DATA_SEQ_LEN), ("trunc", 1001)])
def test_padding_is_masked(mds_text, tokenizer_dir, strategy, seq_len):
    loader = make_loader(
        mds_text, tokenizer_dir, strategy=strategy, overflow_stride=8, seq_len=seq_len
    )
    padded = 0
    for batch in take(iter(loader), 10):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape[1] % 8 == 0 and ids.shape[1] <= 1008
        assert (labels[mask == 0] == -100).all()
        assert (ids[mask == 0] == loader.pad_token_id).all()
        # Real tokens come first: no hole in the mask.
        assert (mask.cumsum(1).max(1).values == mask.sum(1)).all()
        padded += int((mask == 0).sum())
    assert padded > 0


def test_loading_a_state_with_other_num_canonical_nodes_fails(mds_text, tokenizer_dir):
    loader = make_loader(mds_text, tokenizer_dir)
    state = loader.state_dict()
    state["dataset"]["num_canonical_nodes"] = 64
    with pytest.raises(UserError, match="num_canonical_nodes=64"):
        loader.load_state_dict(state)


def test_state_holds_only_checkpointable_types(mds_text, tokenizer_dir):
    loader = make_loader(mds_text, tokenizer_dir)
    take(iter(loader), 2)

    def check(value):
        if isinstance(value, dict):
            for item in value.values():
                check(item)
        elif isinstance(value, list):
            for item in value:
                check(item)
        else:
            assert isinstance(value, int | float | str | bool | torch.Tensor), type(value)

    check(loader.state_dict())


def test_dropping_a_loader_mid_epoch_stops_its_workers_at_once(mds_text, tokenizer_dir):
    before = set(multiprocessing.active_children())
    loader = make_loader(mds_text, tokenizer_dir, num_workers=2)
    iterator = iter(loader)
    take(iterator, 2)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    # No gc.collect(): a reference cycle through the loader would leave the workers to the
    # garbage collector, whose shutdown order makes DataLoader wait 5 s for each of them.
    del iterator, loader
    assert not any(worker.is_alive() for worker in workers)


@pytest.mark.parametrize("column", ["text", "tokens"])
def test_mapped_reads_match_streamings_own_reads(mds_text, mds_tokens, tokenizer_dir, column):
    dataset = make_loader(mds_text if column == "text" else mds_tokens, tokenizer_dir).dataset
    for sample_id in range(dataset.num_samples):
        shard_id, index = dataset.spanner[sample_id]
        mapped, read = dataset.get_item(sample_id)[column], dataset.shards[shard_id][index][column]
        assert np.array_equal(mapped, read) if column == "tokens" else mapped == read
    assert dataset._shard_maps, "no shard was read through a memory map"


# --- bad input -------------------------------------------------------------------------


def test_directory_without_index(tmp_path, tokenizer_dir):
    with pytest.raises(UserError, match=r"is not an MDS dataset: no index.json; convert it with"):
        make_loader(tmp_path, tokenizer_dir)


def test_no_usable_column(tmp_path, tokenizer_dir):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "mds"), columns={"body": "str"}) as writer:
        writer.write({"body": "hello"})
    with pytest.raises(UserError, match=r"has no usable column: need `text`.*body"):
        make_loader(tmp_path / "mds", tokenizer_dir)


def test_corrupt_shard_is_named(mds_text, tokenizer_dir, tmp_path):
    copy = shutil.copytree(mds_text, tmp_path / "mds")
    shard = json.loads((copy / "index.json").read_text())["shards"][1]
    (copy / shard["raw_data"]["basename"]).unlink(missing_ok=True)  # force decompression
    zipped = copy / shard["zip_data"]["basename"]
    data = bytearray(zipped.read_bytes())
    data[-1] ^= 0xFF
    zipped.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {zipped} is corrupt: its sha1 does not match"):
        make_loader(copy, tokenizer_dir)


def test_tokenizer_without_eos_in_pack_mode(mds_text, tokenizer_dir, tmp_path):
    copy = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"has no EOS token, which pack needs"):
        make_loader(mds_text, copy)


def test_read_only_directory_needing_decompression(mds_text, tokenizer_dir, tmp_path, monkeypatch):
    import datas.mds

    copy = shutil.copytree(mds_text, tmp_path / "mds")
    for raw in copy.glob("*.mds"):
        raw.unlink()
    assert datas.mds.why_not_writable(copy) is None
    # Tests run as root, for whom permission bits do not apply: simulate a read-only mount.
    monkeypatch.setattr(datas.mds, "why_not_writable", lambda directory: "Read-only file system")
    with pytest.raises(UserError, match=r"not writable; pass --local_cache_dir"):
        make_loader(copy, tokenizer_dir)


def test_bad_settings(mds_text, tokenizer_dir):
    with pytest.raises(UserError, match="--strategy packed is unknown"):
        make_loader(mds_text, tokenizer_dir, strategy="packed")
    with pytest.raises(UserError, match="is remote; give --local_cache_dir"):
        make_loader("s3://bucket/data", tokenizer_dir)
    with pytest.raises(UserError, match="mixes sources with and without a proportion"):
        make_loader(f"{mds_text}:0.5,{mds_text}", tokenizer_dir)


def test_blocks_of_another_length_than_seq_len_are_refused(mds_tokens, tokenizer_dir):
    """Checked at start for a local dataset; for a remote one, in the workers' collate."""
    from datas.SmolLM.load_data import TokenizeCollate

    with pytest.raises(UserError, match="pre-tokenized blocks of 64 tokens, not --seq_len 48"):
        build_train_loader(
            mds_root=str(mds_tokens), tokenizer_name=str(tokenizer_dir), seq_len=48, num_workers=0
        )
    blocks = [{"tokens": np.arange(64, dtype=np.int32)}] * 2
    with pytest.raises(UserError, match="pre-tokenized blocks of 64 tokens, not --seq_len 48"):
        TokenizeCollate(str(tokenizer_dir), eos_id=0, seq_len=48)(blocks)
