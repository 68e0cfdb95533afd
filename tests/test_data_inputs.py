"""The validators of the data inputs (datas/mds.py, datas/tokenizer.py), in-process, on cases
generated from the conftest fixtures: every bad input is one UserError line naming the file
and the field. (The CLI-level cases, such as a missing index or a short shard, are in
tests/test_bad_input.py.)"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datas.mds import (
    Source,
    check_remote,
    check_sample,
    check_shard_files,
    check_source,
    parse_sources,
    read_index,
    shard_samples,
    validate_index,
)
from datas.packing import unwrap_worker_error
from datas.tokenizer import load_tokenizer
from tests.test_data_loader import make_loader
from utils.errors import UserError

FAST = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
VOCAB = 1024  # conftest's tokenizer


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------ index.json: the structure
@pytest.fixture(scope="module")
def text_index(mds_text: Path) -> dict:
    return json.loads((mds_text / "index.json").read_text())


# Each field and values of the wrong type or out of range (none of them valid there).
NOT_INT = ["7", 1.5, None, [], {}, True]
NOT_NAME = [None, 3, "", ".", "..", "a/b", "../x", ["x"]]
FIELDS = {
    ("version",): [1, 3, "2", None, 2.5],
    ("shards",): ["shards", [], {}, None, 3],
    ("shards", 0, "format"): ["json", "xsv", None, 1, "MDS"],
    ("shards", 0, "version"): [1, "2", None],
    ("shards", 0, "column_names"): [None, "text", [], [1], ["text", "text"]],
    ("shards", 0, "column_encodings"): [None, "str", [], ["nonsense"], [3], ["str", "str"]],
    ("shards", 0, "column_sizes"): ["x", 3, [None, None]],
    ("shards", 0, "samples"): [*NOT_INT, -1, "117"],
    ("shards", 0, "raw_data"): [None, "shard.00000.mds", 3, []],
    ("shards", 0, "raw_data", "basename"): NOT_NAME,
    ("shards", 0, "raw_data", "bytes"): [*NOT_INT, -5],
    ("shards", 0, "raw_data", "hashes"): ["sha1", 3, []],
    ("shards", 0, "zip_data"): ["x.zstd", 3, []],
    ("shards", 0, "zip_data", "basename"): NOT_NAME,
    ("shards", 0, "zip_data", "bytes"): [*NOT_INT, -1],
    ("shards", 0, "compression"): [None, "zip9", 3],
}
DELETABLE = [key for key in FIELDS if key[-1] not in ("column_sizes", "hashes", "zip_data")]
DELETED = object()


def field_name(key: tuple) -> str:
    """("shards", 0, "raw_data", "bytes") -> "shards[0].raw_data.bytes"."""
    name = key[0]
    for part in key[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


def set_field(index: dict, key: tuple, value: object) -> dict:
    index = copy.deepcopy(index)
    holder = index
    for part in key[:-1]:
        holder = holder[part]
    if value is DELETED:
        del holder[key[-1]]
    else:
        holder[key[-1]] = value
    return index


def damaged_indexes() -> st.SearchStrategy:
    wrong = st.sampled_from([(key, value) for key, values in FIELDS.items() for value in values])
    deleted = st.sampled_from([(key, DELETED) for key in DELETABLE])
    return st.one_of(wrong, deleted)


@FAST
@given(case=damaged_indexes(), shard=st.integers(0, 2))
def test_every_damaged_index_field_is_one_line_naming_file_and_field(text_index, case, shard):
    key, value = case
    key = tuple(shard if part == 0 else part for part in key)
    damaged = set_field(text_index, key, value)
    path = Path("/data/set/index.json")
    with pytest.raises(UserError) as err:
        validate_index(damaged, path)
    message = one_line(err)
    assert message.startswith(f"{path}: "), message
    parent = field_name(key[:-1]) if key[-1] in ("basename", "bytes", "hashes") else None
    # A missing or wrong object is named by its own field or, for its members, its parent's.
    assert field_name(key) in message or (parent and parent in message), message


def test_the_fixture_indexes_are_valid(text_index, mds_tokens):
    validate_index(text_index, Path("index.json"))
    validate_index(read_index(mds_tokens), mds_tokens / "index.json")


@FAST
@given(top=st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers())))
def test_an_index_that_is_not_an_object(top):
    with pytest.raises(UserError, match="the top level must be an object"):
        validate_index(top, Path("index.json"))


INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
OTHER_DTYPES = ["float16", "float32", "float64", "bool"]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES + OTHER_DTYPES)
@pytest.mark.parametrize("shape", ["", ":64"])
def test_a_tokens_column_must_be_integers(text_index, dtype, shape):
    index = copy.deepcopy(text_index)
    index["shards"][1]["column_names"] = ["tokens"]
    index["shards"][1]["column_encodings"] = [f"ndarray:{dtype}{shape}"]
    if dtype in INTEGER_DTYPES:
        validate_index(index, Path("index.json"))
        return
    with pytest.raises(UserError) as err:
        validate_index(index, Path("index.json"))
    message = one_line(err)
    # bool is no dtype streaming's ndarray encoding knows; the others are not integers.
    assert "shards[1].column_encodings[0] " in message
    assert ("stores the tokens column as" in message) == (dtype != "bool"), message


def test_float_tokens_written_by_streaming_are_refused_at_start(tmp_path, tokenizer_dir):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "f"), columns={"tokens": "ndarray:float32"}) as writer:
        writer.write({"tokens": np.arange(64, dtype=np.float32)})
    with pytest.raises(UserError) as err:
        make_loader(tmp_path / "f", tokenizer_dir)
    assert "index.json: shards[0].column_encodings[0] stores the tokens column as" in one_line(err)


def test_float_tokens_of_a_dynamic_dtype_are_refused_at_start(tmp_path, tokenizer_dir):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "f"), columns={"tokens": "ndarray"}) as writer:
        writer.write({"tokens": np.arange(64, dtype=np.float32)})
    with pytest.raises(UserError) as err:
        make_loader(tmp_path / "f", tokenizer_dir)
    assert "sample 0: the tokens column holds float32, not integer" in one_line(err)


def test_shards_with_different_columns(tmp_path, mds_text):
    data = shutil.copytree(mds_text, tmp_path / "d")
    index = json.loads((data / "index.json").read_text())
    index["shards"][2]["column_names"] = ["body"]
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as err:
        check_source(Source(str(data)), cached=False)
    assert "index.json: shards[2].column_encodings holds 'text' as None" in one_line(err)


# ------------------------------------------------------------------ raw shards: bytes on disk
@pytest.fixture(scope="module")
def raw_text(mds_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mds_text with uncompressed shards only (read in place, without hashes checked)."""
    from streaming.base.compression import decompress

    data = shutil.copytree(mds_text, tmp_path_factory.mktemp("raw") / "mds")
    index = json.loads((data / "index.json").read_text())
    for shard in index["shards"]:
        zipped = data / shard["zip_data"]["basename"]
        raw = data / shard["raw_data"]["basename"]
        if not raw.exists():
            raw.write_bytes(decompress(shard["compression"], zipped.read_bytes()))
        zipped.unlink()
        shard["zip_data"] = shard["compression"] = None
    (data / "index.json").write_text(json.dumps(index))
    return data


def read_everything(data: Path) -> None:
    """What the start-up check and then a reader do with a local dataset."""
    check_source(Source(str(data)), cached=False)
    index = read_index(data)
    for shard in index["shards"]:
        path = data / shard["raw_data"]["basename"]
        for i, sample in enumerate(shard_samples(data, shard)):
            check_sample(sample, VOCAB, path, i)


@settings(max_examples=150, deadline=None)
@given(
    shard=st.integers(0, 2),
    where=st.floats(0, 1, exclude_max=True),
    header=st.booleans(),
    value=st.binary(min_size=1, max_size=4),
)
def test_corrupt_raw_shard_bytes_are_a_user_error_or_harmless(
    raw_text, shard, where, header, value
):
    """Bytes overwritten anywhere (in the header of offsets, or in the samples): the start-up
    check or the read names the shard, or what is read is still well-formed."""
    with tempfile.TemporaryDirectory() as tmp:
        data = shutil.copytree(raw_text, Path(tmp) / "mds")
        path = data / f"shard.{shard:05d}.mds"
        blob = bytearray(path.read_bytes())
        samples = int.from_bytes(blob[:4], "little")
        span = 4 * (samples + 2) if header else len(blob)
        at = min(int(where * span), len(blob) - len(value))
        blob[at : at + len(value)] = value
        path.write_bytes(bytes(blob))
        try:
            read_everything(data)
        except UserError as err:
            message = str(err)
            assert "\n" not in message and str(path) in message, message


@settings(max_examples=60, deadline=None)
@given(shard=st.integers(0, 2), keep=st.floats(0, 1, exclude_max=True))
def test_truncated_raw_shards_are_named(raw_text, shard, keep):
    with tempfile.TemporaryDirectory() as tmp:
        data = shutil.copytree(raw_text, Path(tmp) / "mds")
        path = data / f"shard.{shard:05d}.mds"
        blob = path.read_bytes()
        path.write_bytes(blob[: int(keep * len(blob))])
        with pytest.raises(UserError) as err:
            check_source(Source(str(data)), cached=False)
        assert str(path) in one_line(err)


@settings(max_examples=100, deadline=None)
@given(sample=st.integers(0, 115), offset=st.integers(0, 200_000))
def test_bad_offsets_are_named_at_start(raw_text, sample, offset):
    with tempfile.TemporaryDirectory() as tmp:
        data = shutil.copytree(raw_text, Path(tmp) / "mds")
        path = data / "shard.00000.mds"
        blob = bytearray(path.read_bytes())
        offsets = np.frombuffer(blob, np.uint32, count=118, offset=4).astype(np.int64)
        changed = offsets.copy()
        changed[sample] = offset
        valid = changed[0] >= 4 * 119 and changed[-1] == len(blob) and (np.diff(changed) >= 0).all()
        blob[4 + 4 * sample : 8 + 4 * sample] = offset.to_bytes(4, "little")
        path.write_bytes(bytes(blob))
        if valid:
            return
        with pytest.raises(UserError) as err:
            check_shard_files(data, read_index(data))
        assert f"shard {path} has bad sample offsets" in one_line(err)


def bad_utf8_copy(raw_text: Path, root: Path) -> tuple[Path, Path, int]:
    """A copy whose shard 0 holds a sample of invalid UTF-8 (its first byte 0xFF)."""
    data = shutil.copytree(raw_text, root / "mds")
    path = data / "shard.00000.mds"
    blob = bytearray(path.read_bytes())
    offsets = np.frombuffer(blob, np.uint32, count=118, offset=4)
    sample = 5
    blob[offsets[sample] + 4] = 0xFF  # past the sample's uint32 size of its text
    path.write_bytes(bytes(blob))
    return data, path, sample


def test_bad_utf8_is_named_by_a_reader(raw_text, tmp_path):
    data, path, sample = bad_utf8_copy(raw_text, tmp_path)
    with pytest.raises(UserError) as err:
        read_everything(data)
    assert f"shard {path} sample {sample} cannot be decoded (UnicodeDecodeError" in one_line(err)


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_utf8_met_by_the_loader_is_one_line(raw_text, tmp_path, tokenizer_dir, workers):
    """In training the shard is read by a worker: its error reaches the main process as the
    one line, not inside the worker's traceback."""
    data, path, sample = bad_utf8_copy(raw_text, tmp_path)
    loader = make_loader(data, tokenizer_dir, num_workers=workers, micro_blocks=64)
    with pytest.raises(UserError) as err:
        for _ in zip(range(100), loader, strict=False):
            pass
    assert f"shard {path} sample {sample} cannot be decoded" in one_line(err)


# ------------------------------------------------------------------ token ids
@FAST
@given(
    tokens=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=64),
    dtype=st.sampled_from(["int32", "int64"]),
)
def test_token_ids_outside_the_vocabulary_are_named(tokens, dtype):
    block = np.array(tokens, dtype=dtype)
    bad = block.min() < 0 or block.max() >= VOCAB
    if not bad:
        check_sample({"tokens": block}, VOCAB, "s.mds", 7)
        return
    with pytest.raises(UserError) as err:
        check_sample({"tokens": block}, VOCAB, "s.mds", 7)
    assert "shard s.mds sample 7 holds token id" in one_line(err)


def tokens_copy(mds_tokens: Path, root: Path, sample: int, value: int) -> tuple[Path, Path]:
    """mds_tokens, uncompressed, with one token of `sample` in shard 0 set to `value`."""
    from streaming.base.compression import decompress

    data = shutil.copytree(mds_tokens, root / "mds")
    index = json.loads((data / "index.json").read_text())
    for shard in index["shards"]:
        raw = data / shard["raw_data"]["basename"]
        if not raw.exists():
            raw.write_bytes(decompress("zstd", (data / shard["zip_data"]["basename"]).read_bytes()))
        (data / shard["zip_data"]["basename"]).unlink()
        shard["zip_data"] = shard["compression"] = None
    (data / "index.json").write_text(json.dumps(index))
    path = data / index["shards"][0]["raw_data"]["basename"]
    blob = bytearray(path.read_bytes())
    count = int.from_bytes(blob[:4], "little")
    end = int(np.frombuffer(blob, np.uint32, count=count + 1, offset=4)[sample + 1])
    at = end - 4 * 62  # token 2 of 64 int32 tokens, which end the sample
    blob[at : at + 4] = int(value).to_bytes(4, "little", signed=True)
    path.write_bytes(bytes(blob))
    return data, path


@pytest.mark.parametrize("value", [-1, VOCAB, 2**31 - 1])
def test_first_block_out_of_vocabulary_fails_at_start(mds_tokens, tokenizer_dir, tmp_path, value):
    data, path = tokens_copy(mds_tokens, tmp_path, 0, value)
    with pytest.raises(UserError) as err:
        make_loader(data, tokenizer_dir)
    assert f"shard {path} sample 0 holds token id {value}, outside" in one_line(err)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_later_block_out_of_vocabulary_fails_when_read(
    mds_tokens, tokenizer_dir, tmp_path, workers
):
    data, path = tokens_copy(mds_tokens, tmp_path, 3, VOCAB + 5)
    loader = make_loader(data, tokenizer_dir, num_workers=workers)
    with pytest.raises(UserError) as err:
        for _ in zip(range(200), loader, strict=False):
            pass
    assert f"shard {path} sample 3 holds token id {VOCAB + 5}, outside" in one_line(err)


# ------------------------------------------------------------------ worker errors
def one_line_text(text: str) -> bool:
    return len(text.splitlines()) == 1


@FAST
@given(
    message=st.text(min_size=1).filter(lambda text: text.strip() == text and one_line_text(text))
)
def test_a_worker_user_error_comes_back_as_its_line(message):
    from torch._utils import ExceptionWrapper

    try:
        raise UserError(message)
    except UserError:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(UserError) as err:
        wrapper.reraise()
    assert str(unwrap_worker_error(err.value)) == message


# ------------------------------------------------------------------ mixes
weights = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, -1.0])
)


@FAST
@given(proportions=st.lists(weights, min_size=1, max_size=4))
def test_mix_weights_must_be_finite_and_positive(proportions):
    spec = ",".join(f"/d/set{i}:{p!r}" for i, p in enumerate(proportions))
    bad = [p for p in proportions if not (math.isfinite(p) and p > 0)]
    if not bad:
        assert [s.proportion for s in parse_sources(spec)] == proportions
        return
    with pytest.raises(UserError) as err:
        parse_sources(spec)
    message = one_line(err)
    assert "a proportion must be a finite number > 0" in message and "--data_dir" in message


@pytest.mark.parametrize(
    "spec",
    [
        "/d/a:0.5,/d/a:0.5",
        "/d/a:0.5,/d/a/:0.5",
        "/d/a:0.5,/d/./a:0.5",
        "/d/a:0.3,/d/b:0.3,/d/b/../a:0.4",
        "s3://b/x:0.5,s3://b/x/:0.5",
        "/d/a,/d/a",
    ],
)
def test_a_source_given_twice_is_refused(spec):
    with pytest.raises(UserError) as err:
        parse_sources(spec)
    assert "twice" in one_line(err)


# ------------------------------------------------------------------ remotes
@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    import datas.mds

    for name in list(__import__("os").environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setattr(datas.mds, "_on_ec2", lambda: False)


@pytest.mark.parametrize("remote", ["https://host/data", "http://h/d", "ftp://h/d", "file:///d"])
def test_a_remote_streaming_cannot_read(remote, no_aws):
    with pytest.raises(UserError) as err:
        check_source(Source(remote), cached=True)
    assert f"--data_dir {remote}: mosaicml-streaming cannot read" in one_line(err)


def test_s3_without_credentials(no_aws):
    with pytest.raises(UserError) as err:
        check_source(Source("s3://bucket/data"), cached=True)
    assert "--data_dir s3://bucket/data: no AWS credentials found" in one_line(err)


def test_s3_with_credentials_in_the_environment(no_aws, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    check_remote("s3://bucket/data")
    assert check_source(Source("s3://bucket/data"), cached=True).column is None


# ------------------------------------------------------------------ tokenizer directories
def garbage_json(directory: Path, name: str, text: bytes) -> None:
    (directory / name).write_bytes(text)


TOKENIZER_CASES = {
    # name: (file, content, expected words)
    "tokenizer.json with a non-string key": (
        "tokenizer.json",
        b'{1: "a"}',
        "tokenizer.json is not valid JSON",
    ),
    "tokenizer.json binary": ("tokenizer.json", b"\x89PNG\r\n\x1a\n\0\0", "is not valid JSON"),
    "tokenizer.json a list": ("tokenizer.json", b"[1, 2]", "is a JSON list, not a JSON object"),
    "tokenizer.json empty": ("tokenizer.json", b"", "tokenizer.json is empty"),
    "tokenizer.json of another structure": (
        "tokenizer.json",
        b'{"model": 5}',
        "holds no loadable tokenizer",
    ),
    "tokenizer_config.json empty": ("tokenizer_config.json", b"", "tokenizer_config.json is empty"),
    "tokenizer_config.json cut short": (
        "tokenizer_config.json",
        b'{"eos_token": "<',
        "tokenizer_config.json is not valid JSON",
    ),
    "special_tokens_map.json a string": (
        "special_tokens_map.json",
        b'"eos"',
        "special_tokens_map.json is a JSON str",
    ),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=list(TOKENIZER_CASES))
def test_a_damaged_tokenizer_directory_is_one_line(case, tokenizer_dir, tmp_path):
    name, content, expected = TOKENIZER_CASES[case]
    directory = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    garbage_json(directory, name, content)
    with pytest.raises(UserError) as err:
        load_tokenizer(directory, "--tokenizer_dir")
    message = one_line(err)
    assert message.startswith(f"--tokenizer_dir {directory}") and expected in message, message


def test_a_tokenizer_directory_that_does_not_exist(tmp_path):
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path / "gone", "--tokenizer")
    assert (
        one_line(err)
        == f"--tokenizer {tmp_path / 'gone'} does not exist; give a tokenizer directory"
    )
