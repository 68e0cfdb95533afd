"""Tokenizers: loading a tokenizer directory (with one-line errors), and turning documents into
tokens the one way every part of the project does (training, data preparation, evaluation):
without special tokens, each document followed by EOS.

transformers is imported inside: importing `datas` must stay cheap (DataLoader workers,
`datas.prepare --help`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import UserError

# What a directory written by a tokenizer's save_pretrained holds, at least one of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, flag: str) -> Any:
    """The transformers tokenizer saved in `path`; `flag` names where the path came from."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{flag} {path} is not a directory; give a tokenizer directory")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{flag} {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); give "
            "the directory a tokenizer's save_pretrained wrote"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"{flag} {path} holds no loadable tokenizer ({reason})") from err


def encode_documents(
    tokenizer: Any, texts: list[str], eos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """`texts` tokenized in one batched call without special tokens, each followed by `eos_id`
    (none when None): the concatenated int32 tokens, and each document's length (its EOS
    included). A fast tokenizer's backend is called directly, without character offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    else:  # verbose=False: long documents are expected, not a truncation mistake
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    suffix = () if eos_id is None else (eos_id,)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + len(suffix)
    tokens = np.fromiter(  # chain() keeps the per-token iteration in C
        chain.from_iterable(chain(doc, suffix) for doc in ids),
        dtype=np.int32,
        count=int(lengths.sum()),
    )
    return tokens, lengths


def batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` texts (the last one shorter)."""
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch
