"""The loader on 2 ranks (one torchrun run, gloo): coverage, rollover, resume, elastic order."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from datas.SmolLM.load_data import build_train_loader
from tests.conftest import DATA_CANONICAL_NODES, DATA_SEQ_LEN
from tests.helpers import REPO, torchrun


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, mds_text, mds_tokens, tokenizer_dir) -> list[dict]:
    out = tmp_path_factory.mktemp("data_dist")
    script = REPO / "tests" / "scripts" / "data_dist.py"
    torchrun(script, str(out), str(mds_text), str(mds_tokens), str(tokenizer_dir), timeout=240)
    return [json.loads((out / f"rank{r}.json").read_text()) | {"out": out} for r in (0, 1)]


def test_ranks_cover_the_epoch_disjointly_then_reshuffle(two_ranks, data_docs, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    expected = Counter(
        tuple(ids) + (tokenizer.eos_token_id,)
        for ids in tokenizer(data_docs, add_special_tokens=False)["input_ids"]
    )
    for epoch in (0, 1):
        seen = [tuple(row) for rank in two_ranks for row in rank["epochs"][epoch]]
        assert Counter(seen) == expected, f"epoch {epoch} is not every document exactly once"
    assert two_ranks[0]["epochs"][0] != two_ranks[0]["epochs"][1], "same order in epoch 2"


def test_packing_ranks_roll_over_epochs_at_different_batches_without_hanging(two_ranks):
    firsts = [rank["rollover_epochs"].index(1) for rank in two_ranks]
    assert firsts[0] != firsts[1], "the ranks changed epoch at the same batch: nothing tested"


def test_resume_on_two_ranks_with_two_workers(two_ranks):
    assert all(rank["resume_equal"] for rank in two_ranks)
    # The ranks packed different numbers of documents, so the resume really used skip/buffers.
    assert any(rank["skip"] for rank in two_ranks) and all(r["leftover"] for r in two_ranks)


def test_token_blocks_have_the_same_global_order_on_one_and_two_ranks(
    two_ranks, mds_tokens, tokenizer_dir
):
    single = build_train_loader(
        mds_root=str(mds_tokens),
        tokenizer_name=str(tokenizer_dir),
        seq_len=DATA_SEQ_LEN,
        micro_blocks=4,
        num_workers=0,
        num_canonical_nodes=DATA_CANONICAL_NODES,
    )
    iterator = iter(single)
    for step, (rank0, rank1) in enumerate(
        zip(two_ranks[0]["token_blocks"], two_ranks[1]["token_blocks"], strict=True)
    ):
        # Rank r's i-th block is global block 2i + r.
        interleaved = [row for pair in zip(rank0, rank1, strict=True) for row in pair]
        assert next(iterator)["input_ids"].tolist() == interleaved, f"step {step}"


def test_elastic_resume_from_two_ranks_on_one_warns(two_ranks, mds_text, tokenizer_dir):
    state = torch.load(two_ranks[0]["out"] / "pack_state_rank0.pt", weights_only=True)
    loader = build_train_loader(
        mds_root=str(mds_text),
        tokenizer_name=str(tokenizer_dir),
        seq_len=DATA_SEQ_LEN,
        micro_blocks=4,
        num_workers=0,
        num_canonical_nodes=DATA_CANONICAL_NODES,
        pack_batch_texts=16,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader.load_state_dict(state)
    message = " ".join(str(w.message) for w in caught)
    assert f"{state['total_leftover_tokens']} tokens left in the saved buffers" in message
    assert "resuming on 1 node x 1 rank from a checkpoint of 1 node x 2 ranks" in message
    assert next(iter(loader))["input_ids"].shape == (4, DATA_SEQ_LEN)
    # It continues from the global position: the dataset restarts at the saved sample.
    assert loader.feed.epoch_offset == state["dataset"]["sample_in_epoch"]
