"""Loading a tokenizer directory, with one-line errors.

transformers is imported inside: importing `datas` must stay cheap (DataLoader workers,
`datas.prepare --help`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
