"""mosaicml-streaming set up the way it is meant to be used, plus the checks it lacks.

- `parse_sources`: "a:0.7,b:0.3" -> one `Source` per stream with its proportion.
- `validate_index`: the one validator of an MDS `index.json` (every field this project and
  streaming read), shared by every reader.
- `check_source`: one-line errors for bad input before any worker starts.
- `check_sample`: what a worker checks of each sample it reads (decodable, token ids in range).
- `clean_stale_shared_memory`: remove what a killed run left in /dev/shm and the temp dir,
  never what a live one uses.
- `make_streaming_dataset`: one `Stream` per source, one cache directory per node.

`streaming` is imported inside the functions: importing it takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from utils.errors import UserError
from utils.files import why_not_writable

TEXT_COLUMN = "text"
TOKENS_COLUMN = "tokens"
HASH_ALGO = "sha1"
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
    for source in sources:
        if source.proportion is not None and not (
            math.isfinite(source.proportion) and source.proportion > 0
        ):
            raise UserError(
                f"--data_dir {mds_root!r} gives {source.path} the proportion "
                f"{source.proportion}; a proportion must be a finite number > 0"
            )
    seen: dict[str, str] = {}
    for source in sources:
        key = source.path.rstrip("/") if source.is_remote else os.path.realpath(source.path)
        if key in seen:
            raise UserError(
                f"--data_dir {mds_root!r} names {seen[key]} twice (as {source.path}); give "
                "each dataset once, with its whole proportion"
            )
        seen[key] = source.path
    return sources


_REMAKE = "re-copy it or re-create the dataset with `python -m datas.prepare`"
INTEGER_KINDS = "iu"  # numpy dtype kinds a `tokens` column may hold


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_file_entry(entry: Any, field: str, fail: Any) -> None:
    """`raw_data` / `zip_data`: a plain file name beside index.json and its size."""
    if not isinstance(entry, dict):
        fail(field, f"must be an object with basename and bytes, not {entry!r}")
    basename = entry.get("basename")
    if not isinstance(basename, str) or basename in ("", ".", "..") or "/" in basename:
        fail(f"{field}.basename", f"must be a file name beside index.json, not {basename!r}")
    if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
        fail(f"{field}.bytes", f"must be an integer >= 0, not {entry.get('bytes')!r}")
    if not isinstance(entry.get("hashes", {}), dict):
        fail(f"{field}.hashes", f"must be an object, not {entry['hashes']!r}")


def _check_encoding(name: str, encoding: Any, field: str, fail: Any) -> None:
    from streaming.base.format.mds.encodings import is_mds_encoding

    try:
        known = isinstance(encoding, str) and is_mds_encoding(encoding)
    except (AssertionError, KeyError, ValueError, TypeError):
        known = False
    if not known:
        fail(field, f"{encoding!r} (column {name!r}) is not an MDS encoding")
    if name == TOKENS_COLUMN and encoding.startswith("ndarray:"):
        try:
            kind = np.dtype(encoding.split(":")[1]).kind
        except TypeError:
            kind = "?"
        if kind not in INTEGER_KINDS:
            fail(
                field,
                f"stores the tokens column as {encoding}, not integers; re-create it with "
                "`python -m datas.prepare --tokenizer ...` (int32 token ids)",
            )


def validate_index(index: Any, path: Path) -> None:
    """The whole structure of an MDS `index.json` (version 2, streaming's reader reads the
    rest): `version`; a non-empty `shards` list; per shard `format` "mds", `version`,
    `column_names` (unique strings) and `column_encodings` (MDS encodings, as many; a
    `tokens` ndarray of an integer dtype), `samples` (an int >= 0), `raw_data` and the optional
    `zip_data` (a plain `basename` and `bytes` >= 0) with `compression` naming the codec.
    The first problem is one UserError naming the file and the field."""
    from streaming.base.compression import is_compression

    def fail(field: str, problem: str) -> NoReturn:
        raise UserError(f"{path}: {field} {problem}; {_REMAKE}")

    if not isinstance(index, dict):
        fail("the top level", f"must be an object, not {type(index).__name__}")
    if index.get("version") != 2:
        fail("version", f"must be 2 (MDS), not {index.get('version')!r}")
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        fail("shards", f"must be a non-empty list of shard entries, not {shards!r}")
    for i, shard in enumerate(shards):
        at = f"shards[{i}]"
        if not isinstance(shard, dict):
            fail(at, f"must be an object, not {shard!r}")
        if shard.get("format") != "mds":
            fail(
                f"{at}.format",
                f"must be 'mds' (this project reads only MDS shards), not {shard.get('format')!r}",
            )
        if shard.get("version") != 2:
            fail(f"{at}.version", f"must be 2, not {shard.get('version')!r}")
        names, encodings = shard.get("column_names"), shard.get("column_encodings")
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(name, str) for name in names)
            or len(set(names)) != len(names)
        ):
            fail(f"{at}.column_names", f"must be a list of distinct column names, not {names!r}")
        if not isinstance(encodings, list) or len(encodings) != len(names):
            fail(
                f"{at}.column_encodings",
                f"must be a list of {len(names)} encodings (one per column), not {encodings!r}",
            )
        for j, (name, encoding) in enumerate(zip(names, encodings, strict=True)):
            _check_encoding(name, encoding, f"{at}.column_encodings[{j}]", fail)
        sizes = shard.get("column_sizes", [None] * len(names))
        if not isinstance(sizes, list) or len(sizes) != len(names):
            fail(f"{at}.column_sizes", f"must be a list of {len(names)} sizes, not {sizes!r}")
        if not _is_int(shard.get("samples")) or shard["samples"] < 0:
            fail(f"{at}.samples", f"must be an integer >= 0, not {shard.get('samples')!r}")
        _check_file_entry(shard.get("raw_data"), f"{at}.raw_data", fail)
        if shard.get("zip_data") is not None:
            _check_file_entry(shard["zip_data"], f"{at}.zip_data", fail)
            compression = shard.get("compression")
            if not (isinstance(compression, str) and is_compression(compression)):
                fail(f"{at}.compression", f"must name the codec of zip_data, not {compression!r}")


def read_index(directory: Path) -> dict[str, Any]:
    """`directory/index.json`, parsed and validated (`validate_index`)."""
    path = directory / "index.json"
    if not path.is_file():
        raise UserError(
            f"{directory} is not an MDS dataset: no index.json; "
            "convert it with `python -m datas.prepare --input ... --output DIR`"
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(
            f"{path} is not a readable MDS index ({type(err).__name__}: {err}); {_REMAKE}"
        ) from err
    validate_index(index, path)
    return index


def check_raw_offsets(path: Path, samples: int, size: int) -> None:
    """A raw MDS shard is a uint32 sample count, count + 1 uint32 byte offsets, the shard's
    JSON config, then the samples: the offsets must start after themselves, never decrease
    and end at the file's end. Reads only the header."""
    header = 4 * (samples + 2)
    with path.open("rb") as file:
        raw = file.read(header)
    if len(raw) < header:
        offsets = np.zeros(0, np.uint32)
    else:
        offsets = np.frombuffer(raw, np.uint32, offset=4).astype(np.int64)
    steps = np.diff(offsets)
    bad = (
        len(offsets) != samples + 1
        or offsets[0] < header
        or offsets[-1] != size
        or (steps < 0).any()
    )
    if bad:
        first = int(np.argmax(steps < 0)) if (steps < 0).any() else None
        where = f" at sample {first}" if first is not None else ""
        raise UserError(f"shard {path} has bad sample offsets{where} (it is damaged); {_REMAKE}")


def check_shard_files(directory: Path, index: dict[str, Any]) -> None:
    """Every shard the index lists is there, at the size it records (and a raw shard holds the
    samples it records, at offsets inside the file): a shard cut short or missing is named
    now, not met by a worker mid-run, where streaming fails in a background thread or waits
    for it."""
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
            if info is shard["raw_data"]:
                check_raw_offsets(path, samples, size)


def check_safe_columns(shard: dict[str, Any], where: str) -> None:
    """A `pkl` column runs code when a sample is read: such data is never read."""
    from streaming.base.format.mds.encodings import is_mds_encoding_safe

    for name, encoding in zip(shard["column_names"], shard["column_encodings"], strict=True):
        if not is_mds_encoding_safe(encoding.partition(":")[0]):
            raise UserError(
                f"{where} stores column {name!r} as {encoding}, which runs code when read; "
                "only data you trust may use it, and this project reads none: re-write it "
                "without that column"
            )


def data_column(index: dict[str, Any], where: str) -> str:
    """The column to train on: `tokens` (pre-tokenized) wins over `text`; every shard must
    hold it, with the same encoding."""
    for shard in index["shards"]:
        check_safe_columns(shard, where)
    per_shard = [
        dict(zip(shard["column_names"], shard["column_encodings"], strict=True))
        for shard in index["shards"]
    ]
    columns = {name: encoding for shard in per_shard for name, encoding in shard.items()}
    if columns.get(TOKENS_COLUMN, "").startswith("ndarray"):
        column = TOKENS_COLUMN
    elif columns.get(TEXT_COLUMN) == "str":
        column = TEXT_COLUMN
    else:
        raise UserError(
            f"{where} has no usable column: need `text` (str) or `tokens` (ndarray), found "
            f"{columns or 'none'}; re-create it with `python -m datas.prepare --text_field FIELD`"
        )
    for i, shard in enumerate(per_shard):
        if shard.get(column) != columns[column]:
            raise UserError(
                f"{where}/index.json: shards[{i}].column_encodings holds {column!r} as "
                f"{shard.get(column)!r}, other shards as {columns[column]!r}; every shard "
                f"needs the same columns: {_REMAKE}"
            )
    return column


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
    for i, (begin, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        yield decode_sample(reader, blob[begin:end], path, i)


def text_documents(directory: Path) -> Iterator[str]:
    """The documents of a local MDS directory's `text` column, in index order; texts that are
    no document (`datas.jsonl.is_document`) left out."""
    from datas.jsonl import is_document

    for shard in read_index(directory)["shards"]:
        for sample in shard_samples(directory, shard):
            if is_document(sample[TEXT_COLUMN]):
                yield sample[TEXT_COLUMN]


def decode_sample(reader: Any, data: bytes, path: Path | str, sample: int) -> dict[str, Any]:
    """One sample decoded by streaming's shard reader; bytes it cannot decode (text that is
    not UTF-8, an array cut short) are one UserError naming the shard and the sample."""
    try:
        return reader.decode_sample(data)
    except (ValueError, IndexError) as err:  # UnicodeDecodeError is a ValueError
        raise UserError(
            f"shard {path} sample {sample} cannot be decoded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): the shard is damaged; {_REMAKE}"
        ) from err


def check_sample(
    sample: dict[str, Any], vocab_size: int | None, path: Path | str, index: int
) -> None:
    """A pre-tokenized block holds integer token ids in [0, vocab_size): the model's
    embedding would fail (or, on a GPU, read out of bounds) at the first step otherwise.
    min/max of one block: cheap beside reading it."""
    tokens = sample.get(TOKENS_COLUMN)
    if tokens is None:
        return
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in INTEGER_KINDS:
        raise UserError(
            f"shard {path} sample {index}: the tokens column holds {tokens.dtype}, not integer "
            "token ids; re-create it with `python -m datas.prepare --tokenizer ...`"
        )
    if vocab_size is None or not tokens.size:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise UserError(
            f"shard {path} sample {index} holds token id {bad}, outside the tokenizer's "
            f"vocabulary [0, {vocab_size}): it was tokenized with another tokenizer; give "
            "that one as --tokenizer_dir or prepare the data again with this one"
        )


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
    first_block: tuple[Path, np.ndarray] | None = None  # where from, and the block


def _on_ec2() -> bool:
    """Whether this machine is an EC2 instance (whose role may hold credentials), from the
    DMI files the kernel exposes: no network."""
    for name in ("/sys/devices/virtual/dmi/id/sys_vendor", "/sys/hypervisor/uuid"):
        with contextlib.suppress(OSError):
            text = Path(name).read_text().strip().lower()
            if text.startswith(("amazon", "ec2")):
                return True
    return False


def aws_credentials_found() -> bool:
    """Whether boto3 would find AWS credentials, asked without network: botocore's own chain
    (environment, ~/.aws files, profile, web identity, container, process), and on an EC2
    instance its role is assumed to hold them."""
    import botocore.session

    if _on_ec2():
        return True
    resolver = botocore.session.get_session().get_component("credential_provider")
    with contextlib.suppress(ValueError):  # absent in this botocore
        resolver.remove("iam-role")
    try:
        return resolver.load_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile is "none found" here, boto3 says why
        return False


def check_remote(path: str) -> None:
    """A remote is one streaming can download from; an `s3://` one needs AWS credentials."""
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    scheme = urllib.parse.urlparse(path).scheme
    supported = sorted(name for name in DOWNLOADER_MAPPINGS if name != "dbfs-uc")
    if scheme not in DOWNLOADER_MAPPINGS:
        raise UserError(
            f"--data_dir {path}: mosaicml-streaming cannot read {scheme}:// remotes (it reads "
            f"{', '.join(f'{name}://' for name in supported)}); copy the data to a local "
            "directory or to one of those"
        )
    if scheme == "s3" and not aws_credentials_found():
        raise UserError(
            f"--data_dir {path}: no AWS credentials found (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials); set them on every node"
        )


def check_source(source: Source, cached: bool) -> SourceInfo:
    """Validate a local source. `cached`: its shards are copied to a local cache."""
    if source.is_remote:
        if not cached:
            raise UserError(
                f"--data_dir {source.path} is remote; give --local_cache_dir to copy it to"
            )
        check_remote(source.path)
        return SourceInfo(column=None, has_hashes=False)
    directory = Path(source.path)
    if not directory.is_dir():
        raise UserError(f"--data_dir {directory} does not exist")
    index = read_index(directory)
    if not any(shard["samples"] for shard in index["shards"]):
        raise UserError(f"{directory}/index.json lists no samples; {_REMAKE}")
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
    block_length = first_block = None
    if column == TOKENS_COLUMN:
        shard = next(shard for shard in index["shards"] if shard["samples"])
        path = shard_file(directory, shard)
        first = next(shard_samples(directory, shard))
        check_sample(first, None, path, 0)
        first_block = (path, np.asarray(first[TOKENS_COLUMN]))
        block_length = len(first_block[1])
    return SourceInfo(column, has_hashes, block_length, first_block)


def check_first_blocks(infos: list[SourceInfo], vocab_size: int) -> None:
    """At start-up, the first block of each local pre-tokenized source is in the tokenizer's
    vocabulary (a dataset prepared with another tokenizer fails here, not at step 1); the
    workers check every block they read (`CheckedStreamingDataset`)."""
    for info in infos:
        if info.first_block is not None:
            path, block = info.first_block
            check_sample({TOKENS_COLUMN: block}, vocab_size, path, 0)


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


def __getattr__(name: str) -> Any:
    """`CheckedStreamingDataset`, made on first use (importing streaming takes seconds) and
    then a module attribute, so that pickle finds it (DataLoader workers under spawn)."""
    if name == "CheckedStreamingDataset":
        globals()[name] = checked_dataset_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checked_dataset_class() -> type:
    """`MappedStreamingDataset` whose every sample is decoded with one-line errors and, for
    pre-tokenized blocks, checked to hold token ids in [0, vocab_size) (`check_sample`).

    With `holdout_samples` N, the last N samples of every source (in index order) are held
    out: training reads a stand-in in the place of each, a training sample of the same source,
    so every place of streaming's order still holds a sample and a run's batches stay those of
    any other world size; `read_held_out` reads them for evaluation (`train_holdout`,
    datas/eval_sets.py)."""
    if "CheckedStreamingDataset" in globals():
        return globals()["CheckedStreamingDataset"]
    from datas.mapped_dataset import MappedStreamingDataset

    class CheckedStreamingDataset(MappedStreamingDataset):
        vocab_size: int | None = None
        holdout_samples: int = 0

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            if self.holdout_samples:
                sample_id = self._stand_in(sample_id)
            return self._checked_item(sample_id, retry)

        def _checked_item(self, sample_id: int, retry: int = 7) -> Any:
            shard_id, index = self.spanner[sample_id]
            shard = self.shards[shard_id]
            path = os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)
            try:
                sample = super().get_item(sample_id, retry)
            except (ValueError, IndexError) as err:  # UnicodeDecodeError is a ValueError
                raise UserError(
                    f"shard {path} sample {index} cannot be decoded ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}): the shard is damaged; "
                    f"{_REMAKE}"
                ) from err
            check_sample(sample, self.vocab_size, path, int(index))
            return sample

        def _stand_in(self, sample_id: int) -> int:
            """`sample_id`, or for a held-out sample the training sample read in its place:
            the source's kept samples taken again from its first, in order."""
            stream = int(np.searchsorted(self.sample_offset_per_stream, sample_id, "right")) - 1
            offset = int(self.sample_offset_per_stream[stream])
            kept = int(self.samples_per_stream[stream]) - self.holdout_samples
            return offset + (sample_id - offset) % kept

        def held_out_ids(self) -> list[int]:
            """The held-out samples' global ids, source by source, in index order."""
            ids: list[int] = []
            for offset, count in zip(
                self.sample_offset_per_stream, self.samples_per_stream, strict=True
            ):
                end = int(offset + count)
                ids += range(max(int(offset), end - self.holdout_samples), end)
            return ids

        def read_held_out(self) -> Iterator[dict[str, Any]]:
            """The held-out samples themselves, downloading their shards where needed."""
            for sample_id in self.held_out_ids():
                yield self._checked_item(sample_id)

    CheckedStreamingDataset.__module__ = __name__
    CheckedStreamingDataset.__qualname__ = "CheckedStreamingDataset"
    globals()["CheckedStreamingDataset"] = CheckedStreamingDataset
    return CheckedStreamingDataset


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
    vocab_size: int | None = None,
    holdout_samples: int = 0,
) -> Any:
    """A shuffled StreamingDataset over all sources with deterministic partitioning; every
    sample a worker reads is checked (`checked_dataset_class`) against `vocab_size`; the last
    `holdout_samples` of every source are held out of training."""
    from streaming import Stream

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
    dataset = checked_dataset_class()(
        streams=streams,
        batch_size=batch_size,
        num_canonical_nodes=num_canonical_nodes,
        shuffle=True,
        shuffle_seed=shuffle_seed,
        predownload=max(8 * batch_size, MIN_READ_AHEAD) if predownload is None else predownload,
        cache_limit=cache_limit,
    )
    dataset.vocab_size = vocab_size
    dataset.holdout_samples = holdout_samples
    for source, samples in zip(sources, dataset.samples_per_stream, strict=True):
        if holdout_samples and holdout_samples >= samples:
            raise UserError(
                f"--holdout_samples {holdout_samples} would hold out all {samples} samples of "
                f"{source.path}, leaving it nothing to train on; lower --holdout_samples"
            )
    return dataset
