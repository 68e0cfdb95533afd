"""Behaviours of the data layer and the C4 evaluation that nothing else pins down: overflow
windows always carry a label, a resume chain across an epoch rollover loses and repeats
nothing, a resume with another seq_len is refused, and bf16 evaluation sums in fp32+."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from datas.C4.c4_eval import evaluate_c4_ppl
from datas.packing import DocChunk, DocumentFeed, make_packer
from tests.conftest import DATA_SEQ_LEN
from tests.test_data_loader import make_loader as loader_over_test_data
from utils.errors import UserError
from utils.loss import IGNORE_INDEX

EOS, PAD = 0, 1


def make_loader(mds_root: Path, tokenizer_dir: Path, **kwargs):
    """test_data_loader's loader, refilling 4 texts at a time (short epochs cross refills)."""
    return loader_over_test_data(mds_root, tokenizer_dir, **({"pack_batch_texts": 4} | kwargs))


# --- 1. overflow with a stride never emits a row without a label ------------------------


def overflow_packer(lengths: list[int], seq_len: int, stride: int, rows: int):
    """The real feed and packer over documents of `lengths` tokens (ids >= 2, EOS last),
    handed out in chunks of 3 documents; returns the packer and the documents."""
    docs = []
    for index, length in enumerate(lengths):
        body = 2 + (np.arange(length - 1, dtype=np.int32) + 7 * index) % 998
        docs.append(np.append(body, np.int32(EOS)))

    def epoch():
        for i in range(0, len(docs), 3):
            part = docs[i : i + 3]
            yield DocChunk(np.concatenate(part), np.array([len(d) for d in part]))

    packer = make_packer(
        "overflow",
        DocumentFeed(epoch),
        rows=rows,
        seq_len=seq_len,
        eos_id=EOS,
        pad_id=PAD,
        overflow_stride=stride,
        emit_position_ids=False,
    )
    return packer, docs


@st.composite
def overflow_cases(draw):
    seq_len = draw(st.integers(2, 24))
    stride = draw(st.integers(1, seq_len - 1))
    step = seq_len - stride
    # Lengths around the window edges (stride + k * step, +-1) as well as arbitrary ones.
    edge = st.builds(
        lambda k, d: max(1, stride + k * step + d), st.integers(0, 4), st.integers(-1, 1)
    )
    lengths = draw(st.lists(st.one_of(edge, st.integers(1, 4 * seq_len)), min_size=1, max_size=12))
    rows = draw(st.integers(1, 5))
    return seq_len, stride, lengths, rows


@settings(max_examples=300, deadline=None)
@given(case=overflow_cases())
@example(case=(8, 4, [12], 1))  # a window starting at len - stride would hold only overlap
@example(case=(8, 4, [8, 9, 4, 5], 2))
def test_overflow_with_a_stride_never_emits_a_row_without_a_label(case):
    seq_len, stride, lengths, rows = case
    packer, docs = overflow_packer(lengths, seq_len, stride, rows)
    trained, total = [], sum(lengths)
    while sum(map(len, trained)) < total:  # each batch trains at least `rows` tokens
        batch = packer.next_batch()
        labels = batch["labels"].numpy()
        assert labels.shape[1] <= seq_len + 7
        labelled = (labels != IGNORE_INDEX).sum(1)
        assert (labelled > 0).all(), f"a row has no label: {labels.tolist()}"
        trained += [row[row != IGNORE_INDEX] for row in labels]
    # And nothing is lost or trained twice: the labels are the documents, in order.
    stream = np.concatenate(trained)
    assert np.array_equal(stream[:total], np.concatenate(docs))


@pytest.mark.parametrize("stride", [1, 8, DATA_SEQ_LEN - 1])
def test_overflow_rows_of_the_real_loader_all_carry_labels(mds_text, tokenizer_dir, stride):
    loader = make_loader(mds_text, tokenizer_dir, strategy="overflow", overflow_stride=stride)
    iterator = iter(loader)
    for _ in range(20):
        labels = next(iterator)["labels"]
        assert ((labels != IGNORE_INDEX).sum(1) > 0).all()


# --- 2. resume, rollover, save, resume: nothing lost or repeated -------------------------

TINY_DOCS = 16  # a multiple of num_canonical_nodes (2): streaming pads nothing


@pytest.fixture(scope="module")
def mds_tiny(data_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MDS `text` dataset of 16 documents, written by the prepare tool: an epoch is a
    handful of batches."""
    from datas.local_corpus import write_jsonl
    from datas.prepare import prepare_mds

    # Short documents, so that 16 of them make a few batches of 4 x 64 tokens.
    short = sorted(data_docs, key=len)[64 : 64 + TINY_DOCS]
    root = tmp_path_factory.mktemp("mds_tiny")
    write_jsonl(short, root / "in" / "docs.jsonl")
    prepare_mds([root / "in"], root / "mds", progress=False, size_limit=1 << 12)
    return root / "mds"


def flat_labels(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """What was trained on, in order: every label that is not masked."""
    parts = [b["labels"].numpy().ravel() for b in batches]
    stream = np.concatenate(parts)
    return stream[stream != IGNORE_INDEX]


def take(iterator, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize(
    "dataset, options",
    [
        ("mds_tiny", dict(strategy="pack")),
        ("mds_tiny", dict(strategy="trunc", micro_blocks=3)),
        ("mds_tiny", dict(strategy="overflow", overflow_stride=8, micro_blocks=3)),
        ("mds_tokens", dict(strategy="pack", micro_blocks=200)),
    ],
    ids=["pack", "trunc", "overflow", "tokens"],
)
def test_resume_rollover_save_resume_loses_and_repeats_nothing(
    request, tokenizer_dir, tmp_path, dataset, options
):
    data = request.getfixturevalue(dataset)
    # The uninterrupted run over more than two epochs; where its epochs turn.
    loader = make_loader(data, tokenizer_dir, **options)
    iterator = iter(loader)
    expected, epochs = [], []
    while loader.feed.epoch < 2 or len(expected) < epochs.index(2) + 2:
        expected.append(next(iterator))
        epochs.append(loader.feed.epoch)
    del iterator, loader
    gc.collect()
    rollover = epochs.index(1)  # the first batch holding documents of epoch 1
    assert rollover >= 2, f"an epoch should be several batches, not {rollover}"
    first_save = rollover // 2  # in epoch 0
    second_save = rollover + 1  # in epoch 1, reached by a resumed loader

    got = []
    # Run 1: from the start to the first save.
    loader = make_loader(data, tokenizer_dir, **options)
    iterator = iter(loader)
    got += take(iterator, first_save)
    state = loader.state_dict()
    assert state["dataset"]["epoch"] == 0 and state["dataset"]["sample_in_epoch"] > 0
    torch.save(state, tmp_path / "first.pt")
    del iterator, loader
    gc.collect()
    # Run 2: resumed, across the rollover, to the second save.
    loader = make_loader(data, tokenizer_dir, **options)
    loader.load_state_dict(torch.load(tmp_path / "first.pt", weights_only=True))
    iterator = iter(loader)
    got += take(iterator, second_save - first_save)
    state = loader.state_dict()
    assert state["dataset"]["epoch"] == 1, "the second save should come after the rollover"
    torch.save(state, tmp_path / "second.pt")
    del iterator, loader
    gc.collect()
    # Run 3: resumed again, to the end of the uninterrupted run.
    loader = make_loader(data, tokenizer_dir, **options)
    loader.load_state_dict(torch.load(tmp_path / "second.pt", weights_only=True))
    iterator = iter(loader)
    got += take(iterator, len(expected) - second_save)
    del iterator, loader
    gc.collect()

    # The same token stream: no sample lost or repeated over the whole sequence.
    want, have = flat_labels(expected), flat_labels(got)
    assert len(want) == len(have)
    assert np.array_equal(want, have)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


# --- 3. resuming with another seq_len is refused, in one line ---------------------------


@pytest.mark.parametrize("strategy", ["pack", "overflow", "trunc"])
def test_resuming_with_another_seq_len_is_one_line(mds_text, tokenizer_dir, strategy):
    loader = make_loader(mds_text, tokenizer_dir, strategy=strategy)
    take(iter(loader), 2)
    state = loader.state_dict()
    del loader
    gc.collect()
    other = make_loader(mds_text, tokenizer_dir, strategy=strategy, seq_len=DATA_SEQ_LEN // 2)
    with pytest.raises(UserError) as caught:
        other.load_state_dict(state)
    message = str(caught.value)
    assert "\n" not in message
    assert f"written with strategy={strategy}, seq_len={DATA_SEQ_LEN}" in message
    assert "resume with the same values" in message
    del other
    gc.collect()
    same = make_loader(mds_text, tokenizer_dir, strategy=strategy)
    same.load_state_dict(state)  # the same settings load


# --- 4. evaluating a bf16 model accumulates in fp32 or wider ----------------------------

EVAL_SEQ_LEN = 64


class LookupLM(nn.Module):
    """logits = table[input_ids]: the same numbers in bf16 and in fp32 when the table holds
    bf16 values, so any difference in perplexity comes from how the losses are summed."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def vocab(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def test_bf16_model_scores_the_same_perplexity_as_its_fp32_weights(
    mds_text, tokenizer_dir, vocab, tmp_path
):
    table = (torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    common = dict(seq_len=EVAL_SEQ_LEN, batch_size=16, cache_dir=tmp_path)
    ppl_bf16, ntokens = evaluate_c4_ppl(LookupLM(table), tokenizer_dir, mds_text, **common)
    ppl_fp32, ntokens32 = evaluate_c4_ppl(
        LookupLM(table.float()), tokenizer_dir, mds_text, **common
    )
    assert ntokens == ntokens32 >= 10_000
    assert ppl_bf16 == pytest.approx(ppl_fp32, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_constant_token_loss_sums_without_drift(mds_text, tokenizer_dir, vocab, tmp_path, dtype):
    """Uniform logits: every predicted token costs the same loss, log(vocab), so ppl is
    exp(loss); a sum of 10^4+ token losses held in bf16 anywhere (or windows summed in fp32)
    would be off by more than 1e-6."""
    model = LookupLM(torch.zeros(vocab, vocab, dtype=dtype))
    ppl, ntokens = evaluate_c4_ppl(
        model, tokenizer_dir, mds_text, seq_len=EVAL_SEQ_LEN, batch_size=16, cache_dir=tmp_path
    )
    # The loss of one token as fp32 computes it (log(vocab) up to fp32 rounding).
    token_loss = F.cross_entropy(torch.zeros(1, vocab), torch.zeros(1, dtype=torch.long)).item()
    assert token_loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert ntokens >= 10_000
    assert ppl == pytest.approx(math.exp(token_loss), rel=1e-6)
