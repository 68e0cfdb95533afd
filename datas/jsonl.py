"""Documents from JSON-lines files (`.jsonl`, `.json`, gzipped or not), with one-line errors,
and the one rule for which files and texts are documents: the data preparation tool and the
C4 evaluation read them the same way.

The rule (docs/data.md#preparing, docs/eval.md):
- a document file is a regular, non-hidden file whose name ends with one of the suffixes a
  command reads (`JSON_LINES_SUFFIXES` for both; `datas.prepare` adds `.parquet` and `.txt`);
  a directory's files come in sorted path order, never in the file system's;
- a document is a text with something besides whitespace: an empty, whitespace-only or null
  text is dropped.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from utils.errors import UserError

JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def is_document_file(path: Path, suffixes: Iterable[str] = JSON_LINES_SUFFIXES) -> bool:
    """Whether `path` names a document file: regular, not hidden, with one of `suffixes`."""
    return not path.name.startswith(".") and path.name.endswith(tuple(suffixes)) and path.is_file()


def document_files(
    directory: Path, suffixes: Iterable[str] = JSON_LINES_SUFFIXES, *, recursive: bool = False
) -> list[Path]:
    """The document files of `directory` (of its subdirectories too when `recursive`, hidden
    ones skipped) in sorted path order, whatever order the file system lists them in."""
    suffixes = tuple(suffixes)
    found = directory.rglob("*") if recursive else directory.iterdir()
    relative = [p.relative_to(directory) for p in found if is_document_file(p, suffixes)]
    visible = [p for p in relative if not any(part.startswith(".") for part in p.parts)]
    return [directory / p for p in sorted(visible, key=lambda p: p.parts)]


def is_document(text: str | None) -> bool:
    """Whether a text counts as a document: not null, not empty, not only whitespace."""
    return bool(text) and not text.isspace()


def json_lines_texts(path: Path, field: str, hint: str) -> Iterator[str]:
    """The `field` string of each JSON object in `path`, one per non-blank line, in order. A
    file that cannot be read (cut short, damaged, not gzip, not UTF-8, a directory), a line
    that is not JSON, or a record without that string field is a UserError naming the file
    (and line); `hint` says what to do about a missing field."""
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield text_field(json.loads(line), field, f"{path}:{number}", hint)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}:{number} is not JSON lines ({err}); need one JSON object per line"
        ) from err
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{path} is not readable after line {number} ({reason}); re-copy it"
        ) from err


def text_field(record: Any, field: str, where: str, hint: str) -> str:
    """`record[field]` if `record` is a mapping with a string there, "" if it holds null (an
    empty document, as a parquet null is); else a UserError."""
    if isinstance(record, dict) and field in record and record[field] is None:
        return ""
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        if isinstance(record, dict):
            found = f"fields: {', '.join(record) or 'none'}"
            if field in record:
                found = f"{field!r} holds a {type(record[field]).__name__}"
        else:
            found = f"the line holds a {type(record).__name__}, not an object"
        raise UserError(f"{where}: no string field {field!r} ({found}); {hint}")
    return record[field]
