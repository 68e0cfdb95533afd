"""One validator per kind of input, called in-process over generated cases: the eval data
(`datas.C4.c4_eval.check_eval_data`, `load_windows` and its cache, `--checkpoint`), the
preparation's inputs and output (`datas.prepare.check_prepare_args`, `read_documents`), and
convert.py's output and step directory. Every bad case is one UserError line naming the file."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convert
from datas import prepare
from datas.C4 import c4_eval
from datas.jsonl import document_files, is_document
from utils.errors import UserError

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TEXTS = [f"document number {i} says something about item {i * 7}." for i in range(30)]


def one_line_naming(err: pytest.ExceptionInfo, *names: object) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def gz_lines(texts: list[str]) -> bytes:
    return gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())


# ---------------------------------------------------------------- eval data: damaged files
GOOD_GZ = gz_lines(TEXTS)


@FAST
@given(cut=st.integers(1, len(GOOD_GZ) - 1), flip=st.integers(0, len(GOOD_GZ) - 1))
def test_a_cut_or_damaged_gzip_is_one_line(tmp_path_factory, cut, flip):
    """Cut at any length, or one byte changed anywhere: a UserError naming the file, from the
    cheap check or from reading every document (zlib.error was a traceback)."""
    root = tmp_path_factory.mktemp("gz")
    for name, data in (("cut.json.gz", GOOD_GZ[:cut]), ("flip.json.gz", _flipped(GOOD_GZ, flip))):
        path = root / name
        path.write_bytes(data)
        try:
            c4_eval.check_eval_data(path)
            documents = list(c4_eval.iter_documents(c4_eval.resolve_eval_data(path)))
        except UserError as err:
            assert "\n" not in str(err) and str(path) in str(err)
        else:  # a change the gzip checks cannot see (its header's timestamp, say)
            assert all(isinstance(text, str) for text in documents)


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@FAST
@given(record=JSON_VALUES, wrapped=st.booleans(), garbage=st.binary(min_size=1, max_size=40))
def test_wrong_json_types_and_garbage_bytes_are_one_line(
    tmp_path_factory, record, wrapped, garbage
):
    root = tmp_path_factory.mktemp("types")
    line = {"text": record} if wrapped else record
    typed = root / "typed.jsonl"
    typed.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(line) + "\n")
    raw = root / "raw.jsonl"
    raw.write_bytes(b'{"text": "fine"}\n' + garbage + b"\n")
    for path in (typed, raw):
        try:
            texts = list(c4_eval.iter_documents(c4_eval.resolve_eval_data(path)))
        except UserError as err:
            assert "\n" not in str(err) and str(path) in str(err)
        else:
            assert texts[0] == "fine" and all(isinstance(t, str) and is_document(t) for t in texts)


def test_a_directory_in_place_of_a_file_is_no_document(tmp_path):
    (tmp_path / "a.json.gz").mkdir()  # a directory named like a data file: not one
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    assert c4_eval.resolve_eval_data(tmp_path).files == (tmp_path / "b.jsonl",)
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(UserError) as err:
        c4_eval.check_eval_data(tmp_path)
    one_line_naming(err, tmp_path)


# ---------------------------------------------------------------- the documents rule
@settings(max_examples=25, deadline=None)
@given(names=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=8, unique=True),
       seed=st.integers(0, 1000), hidden=st.booleans())  # fmt: skip
def test_document_files_are_sorted_whatever_the_listing_order(
    tmp_path_factory, names, seed, hidden
):
    """Created in any order, listed by the file system in any order (shuffled here): the same
    sorted list, in prepare and in the eval; `.json` counts in both; hidden files never."""
    root = tmp_path_factory.mktemp("order")
    order = list(names)
    random.Random(seed).shuffle(order)
    suffixes = [".jsonl", ".json", ".json.gz", ".jsonl.gz"]
    for i, name in enumerate(order):
        path = root / f"{name}{suffixes[i % 4]}"
        path.write_bytes(gz_lines([name]) if path.name.endswith(".gz") else b'{"text": "t"}\n')
    if hidden:
        (root / ".hidden.jsonl").write_text('{"text": "h"}\n')
    expected = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    real_iterdir = Path.iterdir

    def shuffled(self):
        entries = list(real_iterdir(self))
        random.Random(seed + 1).shuffle(entries)
        return iter(entries)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "iterdir", shuffled)
        assert document_files(root) == expected
        assert list(c4_eval.resolve_eval_data(root).files) == expected
    assert prepare.find_files([root]) == expected


def test_json_files_count_in_prepare_as_in_the_eval(tmp_path):
    """Prepare skipped `.json` files the eval reads: both read them now."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json").write_text('{"text": "one"}\n{"text": "two"}\n')
    stats = prepare.prepare_mds([tmp_path / "in"], tmp_path / "mds", progress=False)
    assert (stats.files, stats.documents) == (1, 2)
    assert len(list(c4_eval.iter_documents(c4_eval.resolve_eval_data(tmp_path / "in")))) == 2


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(alphabet=" \t\n\u3000\u00a0ab", max_size=4), max_size=8))
def test_whitespace_only_texts_are_no_documents_in_either(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("blank")
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kept = [t for t in texts if t.strip()]
    assert list(c4_eval.iter_documents(c4_eval.resolve_eval_data(path))) == kept
    assert [t for t in prepare.read_documents(path, "text") if is_document(t)] == kept


# ---------------------------------------------------------------- the eval cache
class FakeTokenizer:
    """Enough of a tokenizer for the cache: one id per character, EOS 0."""

    eos_token_id = 0
    name_or_path = "fake"

    def __init__(self, shift: int = 1) -> None:
        self.shift = shift

    def get_vocab(self) -> dict[str, int]:
        return {chr(c): c + self.shift for c in range(32, 127)}

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) + self.shift for c in t] for t in texts]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE (the session's takes seconds to train)."""
    from datas.local_corpus import train_byte_bpe

    return train_byte_bpe(TEXTS * 3, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "c4.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def test_a_cut_or_damaged_cache_is_built_again(eval_file, tmp_path):
    """Cut at every length, or garbled: rebuilt, the same windows (np.load was a traceback)."""
    cache = tmp_path / "cache"
    good = np.array(c4_eval.load_windows(eval_file, FakeTokenizer(), 16, cache))
    (path,) = cache.glob("*.npy")
    data = path.read_bytes()
    cuts = sorted({*range(0, 200), *range(200, len(data), 97)})
    damaged = [data[:n] for n in cuts] + [b"\x93NUMPY garbage" + data[14:], data + b"x"]
    damaged.append(_npy(np.zeros((3, 8), np.int32)))  # another seq_len's shape
    damaged.append(_npy(np.zeros((3, 16), np.float32)))
    for content in damaged:
        path.write_bytes(content)
        assert np.array_equal(c4_eval.load_windows(eval_file, FakeTokenizer(), 16, cache), good)
    assert len(damaged) > 200


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_another_tokenizer_never_reads_the_cache(eval_file, tmp_path, tokenizer_dir):
    """The key covers the tokenizer's definition: a shifted vocabulary, another EOS, another
    fast tokenizer's normalizer each get their own file."""
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    data = c4_eval.resolve_eval_data(eval_file)
    base = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lower = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    from tokenizers import normalizers

    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    other_eos = FakeTokenizer()
    other_eos.eos_token_id = 1
    tokenizers = [FakeTokenizer(1), FakeTokenizer(2), other_eos, base, lower]
    files = {c4_eval.cache_file(data, t, 16, cache) for t in tokenizers}
    assert len(files) == len(tokenizers)
    windows = [np.array(c4_eval.load_windows(eval_file, t, 16, cache)) for t in tokenizers[:2]]
    assert not np.array_equal(windows[0], windows[1])


# ---------------------------------------------------------------- --checkpoint
def test_a_run_directory_as_checkpoint_names_its_steps(tmp_path):
    run = tmp_path / "run"
    for step in ("step_000004", "step_000002", "step_000010"):
        (run / step).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"args": {"global_batch": 8}}))
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(UserError) as err:
        c4_eval.load_model_for_eval(run)
    message = one_line_naming(err, run, "step_000002, step_000004, step_000010")
    assert f"--checkpoint {run / 'step_000010'}" in message
    with pytest.raises(UserError) as err:  # a config.json that is no model config, no steps
        c4_eval.load_model_for_eval(run / "step_000002")
    (run / "step_000002" / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        c4_eval.load_model_for_eval(run / "step_000002")
    one_line_naming(err, run / "step_000002")


# ---------------------------------------------------------------- datas.prepare's inputs
def test_a_parquet_text_column_of_ints_is_one_line(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(UserError) as err:
        list(prepare.read_documents(path, "text"))
    one_line_naming(err, path, "'text'", "int64")


@FAST
@given(compression=st.text(max_size=8))
def test_compression_is_known_or_refused(compression):
    from streaming.base.compression import is_compression

    if compression == "none" or is_compression(compression):
        assert prepare.check_compression(compression) in (None, compression)
    else:
        with pytest.raises(UserError) as err:
            prepare.check_compression(compression)
        one_line_naming(err, "--compression", "zstd")


@FAST
@given(
    size=st.one_of(
        st.text(max_size=8),
        st.integers(-10, 1 << 30),
        st.sampled_from(["64mb", "1kb", "2 GB", "lots", "12xb", ""]),
    )
)
def test_size_limit_is_a_size_or_refused(size):
    try:
        got = prepare.check_size_limit(size)
    except UserError as err:
        assert "\n" not in str(err) and "--size_limit" in str(err)
    else:
        assert isinstance(got, int) and got >= 1024
    assert prepare.check_size_limit("64mb") == 1 << 26


def test_an_empty_input_directory_is_named(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(UserError) as err:
        prepare.check_prepare_args([tmp_path / "empty"], tmp_path / "out")
    one_line_naming(err, tmp_path / "empty", "no documents found")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under a file", "under /proc", "a file", "holds files"])
def test_prepare_output_is_refused_before_anything_is_written(tmp_path, where):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    output = {
        "under a file": tmp_path / "a.jsonl" / "deeper" / "out",
        "under /proc": Path("/proc/llm-playground-test/out"),
        "a file": tmp_path / "a.jsonl",
        "holds files": tmp_path / "full",
    }[where]
    with pytest.raises(UserError) as err:
        prepare.check_prepare_args([tmp_path / "a.jsonl"], output)
    one_line_naming(err, "--output", output)
    with pytest.raises(SystemExit) as stop:
        prepare.main(["--input", str(tmp_path / "a.jsonl"), "--output", str(output)])
    assert stop.value.code == 2


def test_prepare_cli_refuses_a_bad_compression_or_size_in_one_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    for flags in (["--compression", "lzma"], ["--size_limit", "big"]):
        with pytest.raises(SystemExit) as stop:
            prepare.main(
                ["--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "o"), *flags]
            )
        assert stop.value.code == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {flags[0]}")
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


# ---------------------------------------------------------------- convert.py
@pytest.fixture
def full_step(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A `full` checkpoint as checkpoint_problem reads it, of a 1-layer Llama."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    step = tmp_path / "run" / "step_000002"
    step.mkdir(parents=True)
    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    config.save_pretrained(step)
    torch.save(
        {"step": 2, "world_size": 1, "ckpt_type": "full", "scaler": None}, step / "trainer.pt"
    )
    torch.save({}, step / "rank_00000.pt")
    torch.save({}, step / "optimizer.pt")
    save_file({"model.norm.weight": torch.ones(16)}, str(step / "model.safetensors"))
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, step / file.name)
    return step


@pytest.mark.parametrize(
    "case", ["out under a file", "out under /proc", "no config.json", "garbage config",
             "garbage tokenizer", "no tokenizer"],
)  # fmt: skip
def test_convert_refuses_in_one_line(full_step, tmp_path, case):
    out = tmp_path / "export"
    if case == "out under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "export"
    elif case == "out under /proc":
        out = Path("/proc/llm-playground-test/export")
    elif case == "no config.json":
        (full_step / "config.json").unlink()
    elif case == "garbage config":
        (full_step / "config.json").write_bytes(b"\x00\xffnot json")
    elif case == "garbage tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (full_step / name).write_bytes(bytes(range(256)))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (full_step / name).unlink(missing_ok=True)
    with pytest.raises(UserError) as err:
        convert.convert(full_step, out)
    one_line_naming(err, out if case.startswith("out") else full_step)
    assert not out.exists()
