"""Tokenizers: loading a tokenizer directory (with one-line errors), and turning documents into
tokens the one way every part of the project does (training, data preparation, evaluation):
without special tokens, each document followed by EOS. And training one:

    python -m datas.tokenizer --input corpus/ more.jsonl mds/text --vocab_size 32000 --out tok/

trains a byte-level BPE (`tokenizers`) with EOS and pad tokens on the documents of text files
as `datas.prepare` reads them and of MDS directories with a `text` column, streamed, and saves
it where `--tokenizer_dir` and `AutoTokenizer.from_pretrained` read it.

transformers is imported inside: importing `datas` must stay cheap (DataLoader workers,
`datas.prepare --help`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.files import Replaceable, Replacing, check_output_dir, publish_dir, staging_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# What a directory written by a tokenizer's save_pretrained holds, at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# The JSON files a tokenizer directory may hold; each must be a JSON object when present.
TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)

# Everything a tokenizer's save_pretrained may write (an export carries any tokenizer).
TOKENIZER_SAVED_FILES = (
    *TOKENIZER_JSON_FILES,
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)

# What `python -m datas.tokenizer` writes, and so all its --overwrite replaces.
TRAINED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
A_TRAINED_TOKENIZER = Replaceable(
    "--out", "a tokenizer this command trained", TRAINED_TOKENIZER_FILES.__contains__,
    marker="tokenizer.json",
)  # fmt: skip


def check_tokenizer_dir(path: str | Path, flag: str) -> Path:
    """The one validator of a tokenizer directory: it exists and is a directory, it holds a
    tokenizer file (`TOKENIZER_FILES`), and each of its JSON files (`TOKENIZER_JSON_FILES`)
    is a non-empty JSON object. The first problem is one UserError naming the file."""
    directory = Path(path)
    if not directory.exists():
        raise UserError(f"{flag} {path} does not exist; give a tokenizer directory")
    if not directory.is_dir():
        raise UserError(f"{flag} {path} is not a directory; give a tokenizer directory")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{flag} {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); give "
            "the directory a tokenizer's save_pretrained wrote"
        )
    for name in TOKENIZER_JSON_FILES:
        file = directory / name
        if not file.exists():
            continue
        try:
            text = file.read_text(encoding="utf-8")
            content = json.loads(text) if text.strip() else None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise UserError(
                f"{flag} {path}: {file} is not valid JSON ({reason}); re-save the tokenizer "
                "with save_pretrained"
            ) from err
        if not isinstance(content, dict):
            what = "empty" if content is None else f"a JSON {type(content).__name__}"
            raise UserError(
                f"{flag} {path}: {file} is {what}, not a JSON object; re-save the tokenizer "
                "with save_pretrained"
            )
    return directory


def load_tokenizer(path: str | Path, flag: str) -> Any:
    """The transformers tokenizer saved in `path` (checked by `check_tokenizer_dir`); `flag`
    names where the path came from. Every command loads tokenizers through here."""
    directory = check_tokenizer_dir(path, flag)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exception on bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{flag} {path} holds no loadable tokenizer ({reason}); re-save it with save_pretrained"
        ) from err


def encode_documents(
    tokenizer: Any, texts: list[str], eos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """`texts` tokenized in one batched call without special tokens, each followed by `eos_id`
    (none when None): the concatenated int32 tokens, and each document's length (its EOS
    included). A fast tokenizer's backend is called directly, without character offsets.

    A special token's text inside a document (a web page quoting `<|endoftext|>`) is text:
    read as the token itself it would end the document early for training and count none of
    its bytes for bits per byte."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        with _flag_set(backend, "encode_special_tokens"):
            ids = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    else:  # verbose=False: long documents are expected, not a truncation mistake
        with _flag_set(tokenizer, "split_special_tokens"):
            ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    suffix = () if eos_id is None else (eos_id,)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + len(suffix)
    tokens = np.fromiter(  # chain() keeps the per-token iteration in C
        chain.from_iterable(chain(doc, suffix) for doc in ids),
        dtype=np.int32,
        count=int(lengths.sum()),
    )
    return tokens, lengths


@contextmanager
def _flag_set(holder: Any, attribute: str) -> Iterator[None]:
    """`holder.attribute` True for the body, then as it was; nothing where it has none (a fast
    tokenizer's backend has `encode_special_tokens`, a Python tokenizer `split_special_tokens`,
    which the call's keyword does not reach in a batch)."""
    before = getattr(holder, attribute, None)
    if before is not None:
        setattr(holder, attribute, True)
    try:
        yield
    finally:
        if before is not None:
            setattr(holder, attribute, before)


def batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` texts (the last one shorter)."""
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch


# ---------------------------------------------------------------- training a tokenizer
# The one trainer of a byte-level BPE (`byte_level_bpe`), shared by this command, the demo
# (which runs it) and the tests' fixtures (`datas.local_corpus.train_byte_bpe`).

EOS_TOKEN = "<|endoftext|>"
# A pad of its own rather than pad = EOS: training never needs one (the loader pads with EOS
# when a tokenizer has none, and the embedding has no padding_idx), but tools that mask the
# labels equal to the pad token (transformers' DataCollatorForLanguageModeling) would then
# mask every EOS, and a model fine-tuned with them would never learn to stop. It costs one
# row of the embedding.
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# No BOS and no UNK: every document is tokenized without special tokens (a BOS that the
# tokenizer added at generation time would be a token the model never saw in training), and a
# byte-level BPE spells any text with its 256 byte tokens, so nothing is ever unknown.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Llama-family vocabularies hold 32k to 256k tokens; a million is a typo, not a tokenizer.
MAX_VOCAB_SIZE = 1 << 20
# A pair seen once is one document's spelling, not a unit of the language. On a corpus of
# real size the vocabulary is full long before such pairs come up.
DEFAULT_MIN_FREQUENCY = 2
TRAIN_BATCH = 1024  # documents handed to the Rust trainer per call from Python


def byte_level_bpe(
    documents: Iterable[str],
    vocab_size: int,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    progress: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens (its 256 bytes and `SPECIAL_TOKENS`
    included) trained on `documents`, read once as a stream, as a transformers
    `PreTrainedTokenizerFast` with EOS and pad. The same documents in the same order give
    the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    backend.train_from_iterator(batched(documents, TRAIN_BATCH), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # No token_type_ids, which a Llama does not take: an export's
        # `generate(**tokenizer(text, return_tensors="pt"))` works.
        model_input_names=["input_ids", "attention_mask"],
        # decode(encode(text)) == text: no spaces dropped before punctuation.
        clean_up_tokenization_spaces=False,
    )


@dataclass(frozen=True)
class TokenizerCorpus:
    """Checked inputs of a tokenizer training: what `check_train_args` returns. `sources`
    keep the order given: document files as `datas.prepare` reads them, and MDS directories."""

    sources: list[Path]
    out: Path
    replacing: Replacing | None  # the tokenizer --overwrite replaces, as checked


@dataclass
class TrainStats:
    documents: int = 0
    vocab_size: int = 0  # what the corpus gave: at most the size asked for


def check_vocab_size(vocab_size: int) -> int:
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab_size {vocab_size} is out of range; give {MIN_VOCAB_SIZE} (256 bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens) to {MAX_VOCAB_SIZE}, e.g. 32000"
        )
    return vocab_size


def check_min_frequency(min_frequency: int) -> int:
    if min_frequency < 1:
        raise UserError(f"--min_frequency {min_frequency} must be at least 1, e.g. 2")
    return min_frequency


def is_mds_dir(path: Path) -> bool:
    return path.is_dir() and (path / "index.json").is_file()


def check_mds_text(directory: Path) -> None:
    """An MDS directory a tokenizer can learn from: a valid index, every shard present and
    holding a `text` column of strings (a pre-tokenized dataset holds no text)."""
    from datas.mds import TEXT_COLUMN, TOKENS_COLUMN, check_safe_columns, read_index, shard_file

    where = f"--input {directory}"
    for shard in read_index(directory)["shards"]:
        check_safe_columns(shard, where)
        columns = dict(zip(shard["column_names"], shard["column_encodings"], strict=True))
        if columns.get(TEXT_COLUMN) == "str":
            shard_file(directory, shard)
            continue
        if TOKENS_COLUMN in columns:
            raise UserError(
                f"{where} is pre-tokenized MDS (a `{TOKENS_COLUMN}` column, no text); give the "
                "text it was prepared from, or an MDS written without --tokenizer"
            )
        raise UserError(
            f"{where} has no `{TEXT_COLUMN}` str column (found {columns}); write it with "
            "`python -m datas.prepare` without --tokenizer"
        )


def find_sources(inputs: list[str | Path]) -> list[Path]:
    """Each input in the order given: an MDS directory (it holds index.json) as it is, else
    the document files `datas.prepare` would read from it."""
    from datas.prepare import find_files  # here: datas.prepare imports this module

    sources = []
    for item in map(Path, inputs):
        if is_mds_dir(item):
            check_mds_text(item)
            sources.append(item)
        else:
            sources += find_files([item])
    return sources


def corpus_documents(sources: list[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of `sources`, in order, by `datas.jsonl`'s rule (null, empty and
    whitespace-only texts are none), read lazily: a corpus of any size streams through."""
    from datas.jsonl import is_document
    from datas.mds import text_documents
    from datas.prepare import read_documents

    for source in sources:
        if is_mds_dir(source):
            yield from text_documents(source)
        else:
            yield from filter(is_document, read_documents(source, text_field))


def check_out_dir(out: Path, inputs: list[Path], overwrite: bool) -> Replacing | None:
    """--out is never an input, inside one or around one (a later run would read the
    tokenizer's .json files as documents); it is a new or empty directory, or with
    --overwrite a tokenizer directory (returned): nothing else a user saved is replaced."""
    resolved = out.resolve()
    for item in inputs:
        source = item.resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise UserError(
                f"--out {out} is, contains or lies inside the input {item}; choose a "
                "directory elsewhere"
            )
    return check_output_dir(
        out, "--out", "choose a new directory, or pass --overwrite to replace the tokenizer in it",
        A_TRAINED_TOKENIZER if overwrite else None,
    )  # fmt: skip


def check_train_args(
    inputs: list[str | Path],
    out: str | Path,
    vocab_size: int,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    overwrite: bool = False,
) -> TokenizerCorpus:
    """Every flag checked before any document is read: the sizes, --out, and the inputs (they
    exist and are of a kind this reads; last, since checking an MDS imports streaming)."""
    check_vocab_size(vocab_size)
    check_min_frequency(min_frequency)
    out = Path(os.path.abspath(out))  # `.` or `..` would have no name to stage beside
    replacing = check_out_dir(out, [Path(item) for item in inputs], overwrite)
    sources = find_sources(inputs)
    return TokenizerCorpus(sources, out, replacing)


def at_least_one(documents: Iterator[str], inputs: list[str | Path]) -> Iterator[str]:
    """`documents`, once its first one is found: a corpus without any is a UserError before
    training starts."""
    first = next(documents, None)
    if first is None:
        raise UserError(
            f"--input {' '.join(map(str, inputs))}: no documents found (only empty or "
            "whitespace texts); give the text to train the tokenizer on"
        )
    return chain((first,), documents)


def save_new_dir(
    tokenizer: PreTrainedTokenizerFast, out: Path, replacing: Replacing | None
) -> None:
    """Save into a hidden sibling, then rename it into place: an interrupted run leaves no
    directory that looks like a tokenizer, and an --overwrite's old one goes only once the
    new one is in."""
    with staging_dir(out) as staging:
        tokenizer.save_pretrained(str(staging))
        publish_dir(staging, out, replacing)


def train_tokenizer(
    inputs: list[str | Path],
    out: str | Path,
    vocab_size: int,
    *,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool = False,
) -> TrainStats:
    """Train a byte-level BPE on `inputs` and save it to `out` as a tokenizer directory
    (`load_tokenizer` and `AutoTokenizer.from_pretrained` read it); returns counts."""
    checked = check_train_args(inputs, out, vocab_size, min_frequency, overwrite)
    stats = TrainStats()

    def counted(documents: Iterator[str]) -> Iterator[str]:
        for document in documents:
            stats.documents += 1
            yield document

    documents = at_least_one(corpus_documents(checked.sources, text_field), inputs)
    tokenizer = byte_level_bpe(counted(documents), vocab_size, min_frequency, progress)
    save_new_dir(tokenizer, checked.out, checked.replacing)
    stats.vocab_size = len(tokenizer)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m datas.tokenizer",
        description="Train a byte-level BPE tokenizer (EOS and pad tokens) on a text or MDS "
        "corpus and save it as a tokenizer directory for train.py --tokenizer_dir.",
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="files or directories as datas.prepare reads them, or MDS "
                        "directories with a text column")  # fmt: skip
    parser.add_argument("--vocab_size", type=int, required=True,
                        help=f"tokens in all, {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE}")  # fmt: skip
    parser.add_argument("--out", required=True, help="new tokenizer directory")
    parser.add_argument("--min_frequency", type=int, default=DEFAULT_MIN_FREQUENCY,
                        help="fewest occurrences of a pair to merge it")  # fmt: skip
    parser.add_argument("--text_field", default="text",
                        help="JSON/parquet field with the text (an MDS's column is `text`)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a tokenizer in --out")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        stats = train_tokenizer(
            args.input,
            args.out,
            args.vocab_size,
            min_frequency=args.min_frequency,
            text_field=args.text_field,
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),  # a progress bar on a terminal, not in a log
        )
    documents = f"{stats.documents} document{'s' * (stats.documents != 1)}"
    summary = f"byte-level BPE of {stats.vocab_size} tokens from {documents}"
    if stats.vocab_size < args.vocab_size:
        summary += (f", not the {args.vocab_size} asked for: the corpus holds no more pairs "
                    f"seen {args.min_frequency} times or more (add text or lower "
                    "--min_frequency)")  # fmt: skip
    print(f"{summary} -> {args.out} (EOS {EOS_TOKEN}, pad {PAD_TOKEN})")


if __name__ == "__main__":
    main()
