"""Named validation sets (datas/eval_sets.py): the `--eval_data` grammar, bits per byte's byte
counts, and `train_holdout`: samples training never reads, the same ones on resume.

The sets in a real run (2 ranks against 1, the CLI against the in-training record) are
checked in tests/test_train.py, whose shared launch runs them."""

from __future__ import annotations

import gc
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datas.C4.c4_eval import cut_windows, predicted_bytes, token_byte_lengths, token_stream
from datas.eval_sets import MORE_SETS, SET_NAME, EvalSpec, holdout_windows, parse_eval_sets
from datas.tokenizer import encode_documents, load_tokenizer
from tests.test_data_loader import assert_resume_continues, make_loader, take
from utils.errors import UserError

HELD_OUT = 20

NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True)
PATHS = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1
).filter(lambda path: not MORE_SETS.search(path))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, PATHS), min_size=1, max_size=5, unique_by=lambda p: p[0]))
def test_named_sets_keep_their_names_and_paths(pairs):
    pairs = [(name, path) for name, path in pairs if path.strip()]
    if not pairs:
        return
    specs = parse_eval_sets([f"{name}={path}" for name, path in pairs])
    assert specs == [EvalSpec(name, path) for name, path in pairs]


@settings(max_examples=200, deadline=None)
@given(PATHS.filter(lambda p: p.strip() and "=" not in p))
def test_a_plain_path_is_the_c4_set(path):
    assert parse_eval_sets([path]) == [EvalSpec("c4", path)]


@pytest.mark.parametrize(
    "values, message",
    [
        (["/a", "/b"], "'c4' is given twice"),
        (["x=/a", "x=/b"], "'x' is given twice"),
        (["c4=/a", "/b"], "'c4' is given twice"),
        (["x="], "the path is empty"),
        (["x=  "], "the path is empty"),
        ([], "names no set"),
        (["my set=/a"], "the set name 'my set' is not letters"),
        (["_x=/a"], "the set name '_x' is not letters"),
        (["a=/x b=/y"], "holds several sets in one value"),
        (["a=/x\tb=train_holdout"], "holds several sets in one value"),
        (["a=train_holdout", "b=train_holdout"], "train_holdout is given twice"),
    ],
)
def test_bad_set_lists_are_one_line(values, message):
    with pytest.raises(UserError, match=message) as err:
        parse_eval_sets(values)
    assert "\n" not in str(err.value)


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0=/"),
                 min_size=1).filter(lambda name: not SET_NAME.fullmatch(name)),
    path=PATHS,
)  # fmt: skip
def test_a_name_that_is_not_one_is_refused_by_name(name, path):
    """Text before '=' without a directory is meant as a name: a bad one is named, not read
    as a path that does not exist."""
    with pytest.raises(UserError) as err:
        parse_eval_sets([f"{name}={path}"])
    assert f"the set name {name!r} is not letters" in str(err.value)


def test_an_existing_path_that_reads_like_two_sets_is_one(tmp_path):
    """A directory named `my dir x=1` exists: it is a path, not the sets `..my` and `x`."""
    directory = tmp_path / "my dir x=1"
    directory.mkdir()
    assert parse_eval_sets([str(directory)]) == [EvalSpec("c4", str(directory))]
    assert parse_eval_sets([f"v={directory}"]) == [EvalSpec("v", str(directory))]


def test_a_path_holding_an_equals_sign_without_a_name_stays_whole():
    assert parse_eval_sets(["/data/a=b"]) == [EvalSpec("c4", "/data/a=b")]
    assert parse_eval_sets(["wiki=/data/a=b"]) == [EvalSpec("wiki", "/data/a=b")]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir, "test")


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_byte_level_tokens_count_the_documents_utf8_bytes(tokenizer, text):
    byte_lengths = token_byte_lengths(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert byte_lengths[ids].sum() == len(text.encode("utf-8"))
    assert byte_lengths[tokenizer.eos_token_id] == 0


@pytest.fixture(scope="module")
def slow_tokenizer(tokenizer, tmp_path_factory):
    """The suite's byte-level BPE as transformers' Python GPT-2 tokenizer."""
    from transformers import GPT2Tokenizer

    directory = tmp_path_factory.mktemp("slow")
    vocab, merges = tokenizer.backend_tokenizer.model.save(str(directory))
    slow = GPT2Tokenizer(
        vocab, merges, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token
    )
    assert not slow.is_fast and len(slow) == len(tokenizer)
    return slow


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(["<|endoftext|>", "<|pad|>", "<|endoftext", "|>"]), st.text(max_size=12)
        ),
        max_size=8,
    )
)
def test_a_special_tokens_text_in_a_document_is_text(tokenizer, slow_tokenizer, pieces):
    """A page quoting `<|endoftext|>` keeps it as text: training does not end the document
    there, and bits per byte counts its bytes; the same through a Python (slow) tokenizer of
    the same vocabulary."""
    text = "".join(pieces)
    for one in (tokenizer, slow_tokenizer):
        assert_special_text_is_text(one, text)


def assert_special_text_is_text(tokenizer, text: str) -> None:
    eos = tokenizer.eos_token_id
    tokens, lengths = encode_documents(tokenizer, [text], eos)
    specials = set(tokenizer.all_special_ids)
    assert [t for t in tokens.tolist() if t in specials] == [eos] and tokens[-1] == eos
    assert lengths.tolist() == [len(tokens)]
    assert token_byte_lengths(tokenizer)[tokens].sum() == len(text.encode("utf-8"))
    assert tokenizer.decode(tokens[:-1]) == text


def test_sentencepiece_style_tokens_count_their_text(tmp_path):
    """A Metaspace BPE with byte fallback (Llama 2's kind): `▁` is a space, `<0xNN>` a byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>", *byte_tokens])
    backend.train_from_iterator(["the cat sat on the mat", "a dog ran"] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>"
    )
    byte_lengths = token_byte_lengths(tokenizer)
    for text in ("the cat", "héllo 日本", "the dog ran on"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert byte_lengths[ids].sum() == len((" " + text).encode()), text  # Metaspace's space


def test_predicted_bytes_are_the_text_after_each_windows_first_token(tokenizer):
    """ASCII documents: a window's predicted text is its tokens after the first, decoded."""
    docs = [f"plain ascii text number {i}, with words" for i in range(40)]
    windows = cut_windows(token_stream(iter(docs), tokenizer), 16, "test")
    selected = np.array([5, 0, 3])
    special = tokenizer.eos_token_id
    expected = sum(
        len(tokenizer.decode([t for t in windows[row][1:] if t != special]).encode())
        for row in selected
    )
    assert predicted_bytes(windows, selected, token_byte_lengths(tokenizer)) == expected


# ---------------------------------------------------------------- train_holdout
def test_training_never_reads_the_held_out_samples(mds_text, tokenizer_dir, data_docs):
    """A whole epoch of pack: every document but the last HELD_OUT once, and in their places
    the first HELD_OUT again (stand-ins keep every place of streaming's order filled)."""
    loader = make_loader(mds_text, tokenizer_dir, micro_blocks=32, holdout_samples=HELD_OUT)
    tokenizer = load_tokenizer(tokenizer_dir, "test")
    eos = loader.special_token_ids["eos_token_id"]
    batches = []
    for batch in loader:
        batches.append(batch["input_ids"].numpy().ravel())
        if loader.feed.epoch:
            break
    stream = np.concatenate(batches)
    documents = np.split(stream, np.flatnonzero(stream == eos) + 1)
    kept = len(data_docs) - HELD_OUT
    decoded = [tokenizer.decode(doc[:-1]) for doc in documents[: len(data_docs)]]
    assert Counter(decoded) == Counter(data_docs[:kept]) + Counter(data_docs[:HELD_OUT])
    assert not set(data_docs[kept:]) - set(data_docs[:kept]) & set(decoded)


def test_held_out_windows_are_the_last_samples_under_the_protocol(
    mds_text, mds_tokens, tokenizer_dir, data_docs, tokenizer
):
    text = make_loader(mds_text, tokenizer_dir, holdout_samples=HELD_OUT)
    expected = cut_windows(token_stream(iter(data_docs[-HELD_OUT:]), tokenizer), 64, "test")
    assert np.array_equal(holdout_windows(text.dataset, tokenizer, 64), expected)
    blocks = make_loader(mds_tokens, tokenizer_dir, holdout_samples=HELD_OUT)
    windows = holdout_windows(blocks.dataset, tokenizer, 64)
    index = json.loads((mds_tokens / "index.json").read_text())
    assert len(windows) == HELD_OUT <= sum(s["samples"] for s in index["shards"])
    last = [blocks.dataset._checked_item(i)["tokens"] for i in blocks.dataset.held_out_ids()]
    assert np.array_equal(windows, np.stack(last))


@pytest.mark.parametrize("strategy, before", [("pack", 9), ("trunc", 62)])
def test_resume_with_a_holdout_yields_the_uninterrupted_batches(
    mds_text, tokenizer_dir, tmp_path, strategy, before
):
    assert_resume_continues(
        mds_text, tokenizer_dir, tmp_path, before, strategy=strategy, holdout_samples=HELD_OUT
    )


def test_a_holdout_as_large_as_a_source_is_refused(mds_text, tokenizer_dir, data_docs):
    with pytest.raises(UserError, match="--holdout_samples 256 would hold out all 256"):
        make_loader(mds_text, tokenizer_dir, holdout_samples=len(data_docs))


@pytest.mark.parametrize("saved, resumed", [(HELD_OUT, 0), (0, HELD_OUT), (HELD_OUT, HELD_OUT + 1)])
def test_resuming_with_another_holdout_is_one_line(mds_text, tokenizer_dir, saved, resumed):
    """Another held-out slice on resume would train on samples the run evaluates on."""
    loader = make_loader(mds_text, tokenizer_dir, holdout_samples=saved)
    take(iter(loader), 2)
    state = loader.state_dict()
    del loader
    gc.collect()
    other = make_loader(mds_text, tokenizer_dir, holdout_samples=resumed)
    with pytest.raises(UserError) as caught:
        other.load_state_dict(state)
    assert "\n" not in str(caught.value)
    held = f"held out {saved} samples per source" if saved else "held out none"
    assert f"the checkpoint's run {held}" in str(caught.value)
    assert f"this one holds out {resumed}; resume with the same" in str(caught.value)
