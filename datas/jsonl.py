"""Documents from JSON-lines files (`.jsonl`, `.json`, gzipped or not), with one-line errors:
the data preparation tool and the C4 evaluation read them the same way."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import UserError


def json_lines_texts(path: Path, field: str, hint: str) -> Iterator[str]:
    """The `field` string of each JSON object in `path`, one per non-blank line, in order. A
    file that cannot be read, a line that is not JSON, or a record without that string field
    is a UserError naming the file (and line); `hint` says what to do about a missing field."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield text_field(json.loads(line), field, f"{path}:{number}", hint)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not JSON lines ({err}); need one JSON object per line") from err
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not readable ({err}); re-copy it") from err


def text_field(record: Any, field: str, where: str, hint: str) -> str:
    """`record[field]` if `record` is a mapping with a string there, "" if it holds null (an
    empty document, as a parquet null is); else a UserError."""
    if isinstance(record, dict) and field in record and record[field] is None:
        return ""
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        names = ", ".join(record) if isinstance(record, dict) else "none"
        raise UserError(f"{where}: no string field {field!r} (fields: {names or 'none'}); {hint}")
    return record[field]
