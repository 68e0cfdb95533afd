"""mosaicml-streaming set up the way it is meant to be used, plus the checks it lacks.

- `parse_sources`: "a:0.7,b:0.3" -> one `Source` per stream with its proportion.
- `check_source`: one-line errors for bad input before any worker starts.
- `clean_stale_shared_memory`: remove what a killed run left in /dev/shm and the temp dir,
  never what a live one uses.
- `make_streaming_dataset`: one `Stream` per source, one cache directory per node.

`streaming` is imported inside the functions: importing it takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import UserError
from utils.files import why_not_writable

TEXT_COLUMN = "text"
TOKENS_COLUMN = "tokens"
HASH_ALGO = "sha1"
SHARD_KEYS = {"column_names", "column_encodings", "samples", "raw_data"}  # what we read
SHM_DIR = Path("/dev/shm")
_PREFIX = re.compile(r"^(\d{6})_")
_MAPPED_SHM = re.compile(rf"{SHM_DIR}/(\d{{6}})_")
# Samples streaming's ready thread may run ahead of the reader. Its default, 8 batches, is
# reached within one of that thread's 7 ms sleeps when batches are small and samples cheap,
# and then the reader sleeps too: profiled, the main thread idled a third of the time.
MIN_READ_AHEAD = 4096


@dataclass
class Source:
    """One stream of a mix: where it lives and its share of each epoch."""

    path: str
    proportion: float | None = None

    @property
    def is_remote(self) -> bool:
        return "://" in self.path


def parse_sources(mds_root: str) -> list[Source]:
    """Split "a:0.7,b:0.3" into sources; a ':' starts a proportion only if a float follows,
    so "s3://bucket/x" and plain paths are sources without one."""
    sources = []
    for item in filter(None, (part.strip() for part in mds_root.split(","))):
        path, sep, tail = item.rpartition(":")
        try:
            proportion = float(tail) if sep else None
        except ValueError:
            proportion = None
        sources.append(Source(path, proportion) if proportion is not None else Source(item))
    if not sources:
        raise UserError("--data_dir is empty; give an MDS directory or a mix like a:0.7,b:0.3")
    with_weight = [s.proportion is not None for s in sources]
    if any(with_weight) and not all(with_weight):
        raise UserError(
            f"--data_dir {mds_root!r} mixes sources with and without a proportion; "
            "give every source one, like a:0.7,b:0.3"
        )
    return sources


def read_index(directory: Path) -> dict[str, Any]:
    path = directory / "index.json"
    if not path.is_file():
        raise UserError(
            f"{directory} is not an MDS dataset: no index.json; "
            "convert it with `python -m datas.prepare --input ... --output DIR`"
        )
    try:
        index = json.loads(path.read_text())
        for shard in index["shards"]:
            if not (SHARD_KEYS <= set(shard) and {"basename", "bytes"} <= set(shard["raw_data"])):
                raise ValueError(f"a shard entry lacks one of {sorted(SHARD_KEYS)}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{path} is not a readable MDS index ({type(err).__name__}: {err}); re-copy it or "
            "re-create the dataset with `python -m datas.prepare`"
        ) from err
    return index


def check_shard_files(directory: Path, index: dict[str, Any]) -> None:
    """Every shard the index lists is there, at the size it records (and a raw shard holds the
    samples it records): a shard cut short or missing is named now, not met by a worker
    mid-run, where streaming fails in a background thread or waits for it."""
    for shard in index["shards"]:
        # The compressed file when there is one (streaming reads the shard from it), and the
        # raw one too once streaming has decompressed it beside.
        listed = shard.get("zip_data") or shard["raw_data"]
        if not (directory / listed["basename"]).is_file():
            raise UserError(
                f"{directory / listed['basename']} (listed in {directory}/index.json) is "
                "missing; re-copy the dataset"
            )
        present = [
            info
            for info in (shard["raw_data"], shard.get("zip_data"))
            if info and (directory / info["basename"]).is_file()
        ]
        for info in present:
            path = directory / info["basename"]
            size = path.stat().st_size
            samples = shard["samples"]
            if info is shard["raw_data"] and size >= 4:
                with path.open("rb") as file:
                    samples = int.from_bytes(file.read(4), "little")
            if size != info["bytes"] or samples != shard["samples"]:
                raise UserError(
                    f"shard {path} does not match {directory}/index.json ({size} bytes, "
                    f"{samples} samples; the index says {info['bytes']} and "
                    f"{shard['samples']}): it is cut short or damaged; re-copy the dataset or "
                    "re-create it with `python -m datas.prepare`"
                )


def check_safe_columns(shard: dict[str, Any], where: str) -> None:
    """A `pkl` column runs code when a sample is read: such data is never read."""
    from streaming.base.format.mds.encodings import is_mds_encoding_safe

    for name, encoding in zip(shard["column_names"], shard["column_encodings"], strict=True):
        if not is_mds_encoding_safe(encoding):
            raise UserError(
                f"{where} stores column {name!r} as {encoding}, which runs code when read; "
                "only data you trust may use it, and this project reads none: re-write it "
                "without that column"
            )


def data_column(index: dict[str, Any], where: str) -> str:
    """The column to train on: `tokens` (pre-tokenized) wins over `text`."""
    for shard in index["shards"]:
        check_safe_columns(shard, where)
    columns = {
        name: encoding
        for shard in index["shards"]
        for name, encoding in zip(shard["column_names"], shard["column_encodings"], strict=True)
    }
    if columns.get(TOKENS_COLUMN, "").startswith("ndarray"):
        return TOKENS_COLUMN
    if columns.get(TEXT_COLUMN) == "str":
        return TEXT_COLUMN
    raise UserError(
        f"{where} has no usable column: need `text` (str) or `tokens` (ndarray), found "
        f"{columns or 'none'}; re-create it with `python -m datas.prepare --text_field FIELD`"
    )


def shard_file(directory: Path, shard: dict[str, Any]) -> Path:
    """A shard's raw file if it is there, else its compressed one."""
    raw = directory / shard["raw_data"]["basename"]
    if raw.is_file():
        return raw
    zipped = shard.get("zip_data")
    if zipped and (directory / zipped["basename"]).is_file():
        return directory / zipped["basename"]
    raise UserError(f"{raw} (listed in {directory}/index.json) is missing; re-copy the dataset")


def shard_samples(directory: Path, shard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every sample of one MDS shard, decoded, in order: a plain read (decompressed in memory
    if need be), with no StreamingDataset and so no shared memory or cache."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    check_safe_columns(shard, str(directory))
    path = shard_file(directory, shard)
    blob = path.read_bytes()
    if path.name != shard["raw_data"]["basename"]:
        blob = decompress(shard["compression"], blob)
    reader = reader_from_json(str(directory), None, shard)
    # An MDS shard starts with its sample count, then count + 1 byte offsets.
    offsets = np.frombuffer(blob, np.uint32, count=shard["samples"] + 1, offset=4)
    for begin, end in zip(offsets[:-1], offsets[1:], strict=True):
        yield reader.decode_sample(blob[begin:end])


def _shards_to_decompress(directory: Path, index: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        shard
        for shard in index["shards"]
        if shard.get("zip_data") and not (directory / shard["raw_data"]["basename"]).exists()
    ]


def _check_hashes(directory: Path, shards: list[dict[str, Any]]) -> None:
    from streaming.base.hashing import get_hash

    for shard in shards:
        zip_info = shard["zip_data"]
        expected = zip_info.get("hashes", {}).get(HASH_ALGO)
        path = directory / zip_info["basename"]
        if expected and path.exists() and get_hash(HASH_ALGO, path.read_bytes()) != expected:
            raise UserError(
                f"shard {path} is corrupt: its {HASH_ALGO} does not match index.json; "
                "re-copy it or re-create the dataset with `python -m datas.prepare`"
            )


@dataclass
class SourceInfo:
    """What the checks learned about a source: its training column and, for pre-tokenized
    blocks, their length (None for a remote source: known only once streaming fetched it),
    and whether shards carry hashes."""

    column: str | None
    has_hashes: bool
    block_length: int | None = None


def check_source(source: Source, cached: bool) -> SourceInfo:
    """Validate a local source. `cached`: its shards are copied to a local cache."""
    if source.is_remote:
        if not cached:
            raise UserError(
                f"--data_dir {source.path} is remote; give --local_cache_dir to copy it to"
            )
        return SourceInfo(column=None, has_hashes=False)
    directory = Path(source.path)
    if not directory.is_dir():
        raise UserError(f"--data_dir {directory} does not exist")
    index = read_index(directory)
    column = data_column(index, str(directory))
    check_shard_files(directory, index)
    if not cached:
        pending = _shards_to_decompress(directory, index)
        if pending and why_not_writable(directory):
            raise UserError(
                f"{directory} holds compressed shards that must be decompressed beside them, "
                "but it is not writable; pass --local_cache_dir (local_cache=) to read it "
                "through a writable cache"
            )
        _check_hashes(directory, pending)
    has_hashes = all(
        HASH_ALGO in (shard.get("zip_data") or shard["raw_data"]).get("hashes", {})
        for shard in index["shards"]
    )
    block_length = None
    if column == TOKENS_COLUMN:
        block_length = len(next(shard_samples(directory, index["shards"][0]))[TOKENS_COLUMN])
    return SourceInfo(column=column, has_hashes=has_hashes, block_length=block_length)


def check_block_length(infos: list[SourceInfo], sources: list[Source], seq_len: int) -> None:
    """Pre-tokenized blocks are cut from a stream of documents, so their edges are mid-document:
    rows made of two blocks (or half of one) would join unrelated text without an EOS between,
    and attend across it. Their length must be the run's."""
    for info, source in zip(infos, sources, strict=True):
        if info.block_length not in (None, seq_len):
            raise UserError(
                f"--data_dir {source.path} holds pre-tokenized blocks of {info.block_length} "
                f"tokens, not --seq_len {seq_len}; train with --seq_len {info.block_length} or "
                f"prepare the data again with --seq_len {seq_len}"
            )


def training_column(infos: list[SourceInfo], sources: list[Source]) -> str | None:
    """The column shared by all sources; mixing text and tokens sources is an error."""
    columns = {info.column for info in infos if info.column}
    if len(columns) > 1:
        raise UserError(
            f"--data_dir {','.join(s.path for s in sources)} mixes text and tokens datasets; "
            "prepare them the same way (both text, or both with --tokenizer/--seq_len)"
        )
    return columns.pop() if columns else None


def local_dirs(sources: list[Source], local_cache: str | None) -> list[str]:
    """Where streaming keeps each stream's shards on this node: one directory per stream,
    shared by all local ranks (streaming requires it; per-rank copies break its locking)."""
    if local_cache is None:
        return [os.path.abspath(s.path) for s in sources]
    return [os.path.abspath(os.path.join(local_cache, str(i))) for i in range(len(sources))]


def _shm_locals(name: str) -> list[str] | None:
    """The local directories recorded in a `NNNNNN_locals` shared memory file."""
    try:
        data = (SHM_DIR / name).read_bytes()
    except OSError:
        return None
    if len(data) < 4:
        return []
    size = int.from_bytes(data[:4], "little")
    return data[4:size].decode("utf-8", "replace").split("\0")[:-1]


def _prefix_files() -> dict[str, list[Path]]:
    """Every streaming shared memory and filelock file, grouped by its six-digit prefix."""
    groups: dict[str, list[Path]] = {}
    roots = [(SHM_DIR, "*"), (Path(tempfile.gettempdir()), "*filelock*")]
    for root, pattern in roots:
        if not root.is_dir():
            continue
        for path in root.glob(pattern):
            match = _PREFIX.match(path.name)
            if match:
                groups.setdefault(match.group(1), []).append(path)
    return groups


def prefixes_in_use() -> set[str]:
    """Prefixes whose shared memory another running process has mapped: a live job's
    (streaming keeps its memory mapped as long as a dataset exists, in its workers too). Read
    from every process's /proc/<pid>/maps; a process we may not read holds files we may not
    remove. This process is left out: it builds a loader only once it is done with the last
    (whose memory streaming leaves mapped)."""
    used: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if maps.parent.name == str(os.getpid()):
            continue
        try:
            used.update(_MAPPED_SHM.findall(maps.read_text()))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return used


def stale_prefixes(our_locals: list[str]) -> list[str]:
    """Prefixes no other running process uses that are registered for one of our directories,
    or for none (no registry entry, or one a finished dataset emptied). A live job's prefix
    stays, even on our very directory (a sweep on one node); so do other directories'."""
    ours = set(our_locals)
    in_use = prefixes_in_use()
    stale = []
    for prefix in _prefix_files():
        registered = _shm_locals(f"{prefix}_locals")
        if prefix not in in_use and (not registered or ours & set(registered)):
            stale.append(prefix)
    return sorted(stale)


def clean_stale_shared_memory(our_locals: list[str]) -> list[str]:
    """Remove leftovers of killed runs on our directories (local rank 0 only; the caller
    synchronizes). streaming's own helper stops at the first clean prefix and so misses
    leaks behind it, after which a new run fails with "Reused local directory"."""
    removed = stale_prefixes(our_locals)
    groups = _prefix_files()
    for prefix in removed:
        for path in groups.get(prefix, []):
            with contextlib.suppress(OSError):  # gone meanwhile, or another user's
                path.unlink()
    return removed


def make_streaming_dataset(
    sources: list[Source],
    infos: list[SourceInfo],
    *,
    local_cache: str | None,
    batch_size: int,
    num_canonical_nodes: int,
    shuffle_seed: int,
    predownload: int | None,
    cache_limit: int | str | None,
) -> Any:
    """A shuffled StreamingDataset over all sources with deterministic partitioning."""
    from streaming import Stream

    from datas.mapped_dataset import MappedStreamingDataset

    locals_ = local_dirs(sources, local_cache)
    streams = [
        Stream(
            remote=source.path if local_cache is not None else None,
            local=local,
            proportion=source.proportion,
            validate_hash=HASH_ALGO if info.has_hashes and local_cache is not None else None,
        )
        for source, info, local in zip(sources, infos, locals_, strict=True)
    ]
    return MappedStreamingDataset(
        streams=streams,
        batch_size=batch_size,
        num_canonical_nodes=num_canonical_nodes,
        shuffle=True,
        shuffle_seed=shuffle_seed,
        predownload=max(8 * batch_size, MIN_READ_AHEAD) if predownload is None else predownload,
        cache_limit=cache_limit,
    )
