"""Convert text files into an MDS dataset the loader reads.

    python -m datas.prepare --input data/ more.jsonl --output mds/train
    python -m datas.prepare --input data/ --output mds/train_2048 --tokenizer tok/ --seq_len 2048

Inputs: .jsonl, .json, .jsonl.gz / .json.gz (one JSON object per line), .parquet, .txt
(one document per file), or directories holding them (searched recursively, in sorted path
order; hidden files skipped). Empty and whitespace-only texts are no documents: skipped and
counted. The rule is `datas.jsonl`'s, which the C4 evaluation shares. Without --tokenizer the documents are
stored as a `text` column; with it, as pre-packed `tokens` blocks of exactly seq_len tokens
(documents joined with EOS, the last partial block dropped), which the loader uses without
tokenizing. Shards are zstd-compressed with sha1 hashes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from datas.jsonl import (
    JSON_LINES_SUFFIXES,
    document_files,
    is_document,
    is_document_file,
    json_lines_texts,
    text_field,
)
from datas.mds import HASH_ALGO, TEXT_COLUMN, TOKENS_COLUMN
from datas.tokenizer import batched, encode_documents, load_tokenizer
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.files import check_output_dir, publish_dir, staging_dir

SUFFIXES = (*JSON_LINES_SUFFIXES, ".parquet", ".txt")
TOKENIZE_BATCH = 256
FIELD_HINT = "pass --text_field NAME"


@dataclass
class PrepareStats:
    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    tokens: int = 0  # tokens written (tokens mode only)
    dropped_tokens: int = 0  # the final partial block (tokens mode only)
    samples: int = 0


@dataclass(frozen=True)
class PrepareInputs:
    """Checked arguments of a preparation: what `check_prepare_args` returns."""

    files: list[Path]
    output: Path
    compression: str | None
    size_limit: int


def find_files(inputs: list[str | Path]) -> list[Path]:
    """Input files in a fixed order: each argument as given, directories recursively in
    sorted path order (`datas.jsonl.document_files`). A missing path, a file of another type
    and a directory without one input file are UserErrors naming it."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = document_files(item, SUFFIXES, recursive=True)
            if not found:
                raise UserError(
                    f"--input {item}: no documents found (no {', '.join(SUFFIXES)} files "
                    "in it); give the directory of your documents"
                )
            files += found
        elif item.is_file():
            if not is_document_file(item, SUFFIXES):
                raise UserError(f"--input {item}: unsupported file type; use {', '.join(SUFFIXES)}")
            files.append(item)
        elif item.exists():
            raise UserError(f"--input {item} is neither a file nor a directory")
        else:
            raise UserError(f"--input {item} does not exist")
    return files


def check_compression(compression: str | None) -> str | None:
    """`compression` if streaming knows it (None or "none": uncompressed), else a UserError."""
    from streaming.base.compression import get_compressions, is_compression

    if compression in (None, "none"):
        return None
    if not isinstance(compression, str) or not is_compression(compression):
        names = sorted(n for n in get_compressions() if ":" not in n)
        raise UserError(
            f"--compression {compression!r} is unknown; use one of {', '.join(names)} "
            "(with a level, e.g. zstd:7) or none"
        )
    return compression


def check_size_limit(size_limit: int | str) -> int:
    """`size_limit` in bytes (an int or a size such as 64mb), at least 1 kb; else a UserError."""
    from streaming.base.util import bytes_to_int

    try:
        if isinstance(size_limit, bool) or not isinstance(size_limit, int | str):
            raise ValueError(type(size_limit).__name__)
        size = bytes_to_int(
            size_limit.strip().lower() if isinstance(size_limit, str) else size_limit
        )
    except (ValueError, TypeError, OverflowError):
        size = None
    if size is None or size < 1024:
        raise UserError(
            f"--size_limit {size_limit!r} is not a shard size of at least 1kb; give bytes or a "
            "size such as 64mb"
        )
    return size


def check_prepare_args(
    inputs: list[str | Path],
    output: str | Path,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
) -> PrepareInputs:
    """Every input of a preparation checked before anything is written: the output (a new
    directory that can be created), the compression, the shard size and the input files."""
    compression = check_compression(compression)
    size = check_size_limit(size_limit)
    files = find_files(inputs)
    output = Path(output)
    check_output_dir(output, "--output", "choose a new directory or empty it")
    return PrepareInputs(files, output, compression, size)


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        text_field(dict.fromkeys(table.schema_arrow.names), field, str(path), FIELD_HINT)
    kind = table.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise UserError(
            f"--input {path}: column {field!r} holds {kind}, not text; {FIELD_HINT} naming "
            "the column of strings"
        )
    for batch in table.iter_batches(columns=[field]):
        yield from batch.column(0).to_pylist()


def read_documents(path: Path, field: str) -> Iterator[str]:
    """The documents of one input file; a file that is not what its name says is a UserError
    naming it."""
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        elif path.suffix == ".parquet":
            yield from _parquet_texts(path, field)
        else:
            yield from json_lines_texts(path, field, FIELD_HINT)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--input {path} is not readable as {path.suffix} ({reason})") from err


def _token_blocks(
    texts: Iterator[str], tokenizer_dir: str, seq_len: int, stats: PrepareStats
) -> Iterator[np.ndarray]:
    """Documents tokenized in batches, joined with EOS, cut into seq_len blocks."""
    tokenizer = load_tokenizer(tokenizer_dir, "--tokenizer")
    if tokenizer.eos_token_id is None:
        raise UserError(f"--tokenizer {tokenizer_dir} has no EOS token to join documents with")
    buffer = np.zeros(0, dtype=np.int32)
    for batch in batched(texts, TOKENIZE_BATCH):
        tokens, _ = encode_documents(tokenizer, batch, tokenizer.eos_token_id)
        buffer = np.concatenate([buffer, tokens])
        usable = len(buffer) - len(buffer) % seq_len
        yield from buffer[:usable].reshape(-1, seq_len)
        stats.tokens += usable
        buffer = buffer[usable:]
    stats.dropped_tokens = len(buffer)


def _validate(output: Path, column: str, first: Any, last: Any, samples: int) -> None:
    """Read the dataset back through streaming: sample count, first and last sample."""
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(output), batch_size=1)
    try:
        if dataset.num_samples != samples:
            raise UserError(f"{output}: wrote {samples} samples, read back {dataset.num_samples}")
        for index, expected in ((0, first), (samples - 1, last)):
            if not np.array_equal(np.asarray(dataset[index][column]), np.asarray(expected)):
                raise UserError(f"{output}: sample {index} reads back differently")
    finally:
        del dataset


def prepare_mds(
    inputs: list[str | Path],
    output: str | Path,
    *,
    text_field: str = "text",
    tokenizer: str | None = None,
    seq_len: int | None = None,
    compression: str | None = "zstd",
    size_limit: int | str = 1 << 26,
    progress: bool = True,
) -> PrepareStats:
    """Write `inputs` as MDS to `output` and validate it; returns counts."""
    if (tokenizer is None) != (seq_len is None):
        raise UserError("--tokenizer and --seq_len go together: give both or neither")
    if seq_len is not None and seq_len < 2:
        raise UserError(f"--seq_len must be at least 2 (got {seq_len})")
    checked = check_prepare_args(inputs, output, compression, size_limit)
    output, files = checked.output, checked.files
    compression, size_limit = checked.compression, checked.size_limit
    # Written beside under a hidden name, validated, then renamed: an interrupted run never
    # leaves a dataset that looks complete, nor an index.json that blocks the next attempt.
    with staging_dir(output) as staging:
        stats = _write_and_validate(files, staging, text_field, tokenizer, seq_len, compression,
                                    size_limit, progress)  # fmt: skip
        publish_dir(staging, output)
    return stats


def _write_and_validate(
    files: list[Path],
    output: Path,
    text_field: str,
    tokenizer: str | None,
    seq_len: int | None,
    compression: str | None,
    size_limit: int | str,
    progress: bool,
) -> PrepareStats:
    from streaming import MDSWriter  # slow to import: only once the arguments are fine
    from tqdm import tqdm

    stats = PrepareStats(files=len(files))

    def documents() -> Iterator[str]:
        for text in chain.from_iterable(read_documents(f, text_field) for f in files):
            if is_document(text):
                stats.documents += 1
                yield text
            else:
                stats.skipped_empty += 1

    # A progress bar on a terminal only: in a log it would be noise around an error line.
    texts = tqdm(documents(), unit=" docs", disable=None if progress else True, desc="prepare")
    column = TOKENS_COLUMN if tokenizer else TEXT_COLUMN
    samples = _token_blocks(texts, tokenizer, seq_len, stats) if tokenizer else texts
    encoding = "ndarray:int32" if tokenizer else "str"
    first = last = None
    with MDSWriter(
        out=str(output),
        columns={column: encoding},
        compression=compression,
        hashes=[HASH_ALGO],
        size_limit=size_limit,
    ) as writer:
        for sample in samples:
            writer.write({column: sample})
            first = sample if first is None else first
            last = sample
            stats.samples += 1
    if stats.samples == 0:
        raise UserError(
            f"--input {' '.join(map(str, files))}: no documents found"
            + (f" (or fewer than seq_len={seq_len} tokens)" if tokenizer else "")
        )
    _validate(output, column, first, last, stats.samples)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m datas.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--output", required=True, help="new MDS directory")
    parser.add_argument("--text_field", default="text", help="JSON/parquet field with the text")
    parser.add_argument("--tokenizer", help="tokenizer directory: write pre-packed tokens")
    parser.add_argument("--seq_len", type=int, help="block length for --tokenizer")
    parser.add_argument("--compression", default="zstd", help="shard compression, or 'none'")
    parser.add_argument("--size_limit", default="64mb", help="shard size, e.g. 64mb")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        stats = prepare_mds(
            args.input,
            args.output,
            text_field=args.text_field,
            tokenizer=args.tokenizer,
            seq_len=args.seq_len,
            compression=args.compression,
            size_limit=args.size_limit,
        )
    summary = f"{stats.documents} documents from {stats.files} files"
    if args.tokenizer:
        summary += f", {stats.tokens} tokens in {stats.samples} blocks of {args.seq_len}"
        summary += f" ({stats.dropped_tokens} tokens of the last partial block dropped)"
    if stats.skipped_empty:
        summary += f", {stats.skipped_empty} empty documents skipped"
    print(f"{summary} -> {args.output} (read back and validated)")


if __name__ == "__main__":
    main()
