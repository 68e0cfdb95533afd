"""Tokenizers: loading a tokenizer directory (with one-line errors), and turning documents into
tokens the one way every part of the project does (training, data preparation, evaluation):
without special tokens, each document followed by EOS.

transformers is imported inside: importing `datas` must stay cheap (DataLoader workers,
`datas.prepare --help`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import UserError

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
