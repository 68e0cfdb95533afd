"""`python -m datas.tokenizer`: a byte-level BPE trained on a text or MDS corpus, saved where
train.py's --tokenizer_dir, the loader, the export and `AutoTokenizer` read it; bad flags
are one line each, refused before anything is written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from datas.local_corpus import write_jsonl
from datas.tokenizer import (
    EOS_TOKEN,
    MAX_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    TRAINED_TOKENIZER_FILES,
    check_tokenizer_dir,
    load_tokenizer,
    main,
)
from tests.helpers import REPO, child_env

VOCAB = 512  # reached by the 256 documents of `data_docs` with pairs seen twice or more
KINDS = ("jsonl", "txt", "mds")


def train(*argv: str | Path) -> None:
    main([str(arg) for arg in argv])


def refused(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """The one error line of a run that must fail."""
    with pytest.raises(SystemExit) as stop:
        train(*argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def corpus(data_docs: list[str], mds_text: Path, tmp_path_factory) -> dict[str, Path]:
    """The same 256 documents as JSON lines, as .txt files (one document each) and as the
    suite's MDS `text` dataset."""
    root = tmp_path_factory.mktemp("tokenizer_corpus")
    txt = root / "txt"
    txt.mkdir()
    for number, text in enumerate(data_docs):  # zero-padded: sorted path order is this order
        (txt / f"{number:04d}.txt").write_text(text, encoding="utf-8")
    return {"jsonl": write_jsonl(data_docs, root / "docs.jsonl"), "txt": txt, "mds": mds_text}


@pytest.fixture(scope="module")
def trained(corpus: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """A tokenizer directory trained by the command on each kind of input."""
    root = tmp_path_factory.mktemp("trained")
    for kind in KINDS:
        train("--input", corpus[kind], "--vocab_size", VOCAB, "--out", root / kind)
    return {kind: root / kind for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_each_input_kind_gives_a_tokenizer_the_project_loads(trained, kind: str) -> None:
    directory = trained[kind]
    assert check_tokenizer_dir(directory, "--tokenizer_dir") == directory
    tokenizer = load_tokenizer(directory, "--tokenizer_dir")
    assert len(AutoTokenizer.from_pretrained(str(directory))) == len(tokenizer) == VOCAB
    assert (tokenizer.eos_token, tokenizer.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    # What a Llama takes, so that an export's generate(**tokenizer(text)) works.
    assert sorted(tokenizer("some text")) == ["attention_mask", "input_ids"]


def test_the_same_corpus_gives_the_same_tokenizer_from_any_input_and_every_time(
    trained, corpus: dict[str, Path], tmp_path: Path
) -> None:
    train("--input", corpus["jsonl"], "--vocab_size", VOCAB, "--out", tmp_path / "again")
    again = (tmp_path / "again" / "tokenizer.json").read_bytes()
    assert all((trained[kind] / "tokenizer.json").read_bytes() == again for kind in KINDS)


@pytest.fixture(scope="module")
def tokenizer(trained):
    return AutoTokenizer.from_pretrained(str(trained["jsonl"]))


# Any text, runs of the spaces and punctuation a decoder's clean-up would touch ("a ." ->
# "a."), and the special tokens written out.
TEXTS = st.lists(
    st.one_of(st.text(), st.text(" .,;:!?'-na\n\t"), st.sampled_from([EOS_TOKEN, PAD_TOKEN]))
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS)
@example(text="It 's here , isn 't it ? Yes .")
def test_decoding_the_encoding_gives_back_any_text(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_it_trains_a_model_and_the_export_generates(trained, mds_text: Path, tmp_path) -> None:
    """As train.py builds the loader and the model from --tokenizer_dir, and as convert.py
    writes an export (tests/test_tokenizer_kinds.py covers every kind of special tokens)."""
    import torch

    from datas.SmolLM.load_data import build_train_loader
    from utils.attention import AttentionFlags, attention_implementation
    from utils.checkpoint import save_transformers_weights, write_model_files
    from utils.model import build_meta_model, init_weights, load_model_config

    loader = build_train_loader(
        mds_root=str(mds_text), tokenizer_name=str(trained["mds"]), seq_len=64, micro_blocks=2,
        num_workers=0, num_canonical_nodes=2, world_size=1, global_rank=0,
    )  # fmt: skip
    batch = next(iter(loader))
    assert 0 <= batch["input_ids"].min() and batch["input_ids"].max() < VOCAB == loader.vocab_size
    config = load_model_config("tiny", loader.vocab_size, loader.special_token_ids)
    model = build_meta_model(config, attention_implementation(AttentionFlags()))
    init_weights(model, seed=0, device=torch.device("cpu"))
    save_transformers_weights(config, model.state_dict(), tmp_path / "export")
    write_model_files(config, tmp_path / "export", load_tokenizer(trained["mds"], "checkpoint"))

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    generated = exported.generate(**inputs, max_new_tokens=3)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def jsonl_of(*texts: str) -> Callable[[Path], Path]:
    return lambda tmp: write_jsonl(list(texts), tmp / "in.jsonl")


def a_file(name: str, content: str = "x") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_text(content)
        return tmp / name

    return make


def a_dir_of(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / "dir").mkdir()
        (tmp / "dir" / name).write_text("not a document file")
        return tmp / "dir"

    return make


GOOD = jsonl_of("one document", "and another")
V = "--vocab_size=300"
# id: (--input maker, flags, what the one line says); {IN} stands for the input
BAD_FLAGS = {
    "vocab too small": (GOOD, ["--vocab_size=257"], f"--vocab_size 257 is out of range; give {MIN_VOCAB_SIZE}"),
    "vocab too large": (GOOD, [f"--vocab_size={MAX_VOCAB_SIZE + 1}"], "is out of range"),
    "vocab not a number": (GOOD, ["--vocab_size=32k"], "argument --vocab_size: invalid int value"),
    "no vocab": (GOOD, [], "the following arguments are required: --vocab_size"),
    "min_frequency 0": (GOOD, [V, "--min_frequency=0"], "--min_frequency 0 must be at least 1"),
    "input missing": (lambda tmp: tmp / "nowhere.jsonl", [V], "nowhere.jsonl does not exist"),
    "input of another type": (a_file("data.csv"), [V], "data.csv: unsupported file type"),
    "dir without documents": (a_dir_of("notes.md"), [V], "dir: no documents found (no .jsonl"),
    "only empty documents": (jsonl_of("", "  \n\t"), [V], "no documents found (only empty"),
    "not JSON lines": (a_file("bad.jsonl", "{not json\n"), [V], "bad.jsonl:1 is not JSON lines"),
    "damaged after a document": (a_file("cut.jsonl", '{"text": "a document"}\n{"te'), [V], "cut.jsonl:2 is not JSON lines"),
    "no text field": (a_file("f.jsonl", '{"body": "x"}\n'), [V], "no string field 'text' (fields: body)"),
    "out is the input": (GOOD, [V, "--out={IN}", "--overwrite"], "is, contains or lies inside the input"),
    "out around the input": (GOOD, [V, "--out={IN}/..", "--overwrite"], "is, contains or lies inside the input"),
}  # fmt: skip


@pytest.mark.parametrize("make, flags, says", BAD_FLAGS.values(), ids=BAD_FLAGS)
def test_a_bad_flag_is_one_line_and_writes_nothing(make, flags, says, tmp_path, capsys) -> None:
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in")
    flags = [flag.replace("{IN}", str(source)) for flag in flags]
    out = [] if any(flag.startswith("--out") for flag in flags) else ["--out", tmp_path / "out"]
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    assert says in refused(capsys, "--input", source, *flags, *out)
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before


def test_a_pre_tokenized_mds_is_refused(mds_tokens: Path, tmp_path, capsys) -> None:
    err = refused(capsys, "--input", mds_tokens, "--vocab_size=300", "--out", tmp_path / "tok")
    assert f"--input {mds_tokens} is pre-tokenized MDS" in err
    assert not (tmp_path / "tok").exists()


def test_an_existing_out_is_kept_unless_overwrite_and_only_a_tokenizer_is_replaced(
    corpus: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "tok"
    flags = ["--input", corpus["jsonl"], "--out", out]
    train(*flags, "--vocab_size=300")
    saved = {path.name: path.read_bytes() for path in out.iterdir()}

    assert "already holds files; choose a new directory, or pass --overwrite" in refused(
        capsys, *flags, "--vocab_size=400"
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == saved

    train(*flags, "--vocab_size=400", "--overwrite")
    assert len(AutoTokenizer.from_pretrained(str(out))) == 400
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tok"]  # no staging left

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    err = refused(capsys, "--input", corpus["jsonl"], "--out", notes, "--vocab_size=300",
                  "--overwrite")  # fmt: skip
    assert "holds todo.txt besides a tokenizer this command trained; --overwrite replaces" in err
    assert [path.name for path in notes.iterdir()] == ["todo.txt"]

    # A user's vocab.json and merges.txt are a tokenizer's files, but not this command's.
    (notes / "todo.txt").unlink()
    (notes / "vocab.json").write_text("{}")
    (notes / "merges.txt").write_text("#version: 0.2")
    err = refused(capsys, "--input", corpus["jsonl"], "--out", notes, "--vocab_size=300",
                  "--overwrite")  # fmt: skip
    assert "holds merges.txt besides a tokenizer this command trained" in err
    assert sorted(path.name for path in notes.iterdir()) == ["merges.txt", "vocab.json"]


# What a user keeps next to a tokenizer: an export, a checkpoint step, notes, a sub-directory
# named like a tokenizer file.
FOREIGN_ENTRY = st.one_of(
    st.sampled_from(["config.json", "model.safetensors", "trainer.pt", "training.json",
                     "step_000100", "README.md", "merges.txt.bak"]),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True).filter(
        lambda name: name not in TRAINED_TOKENIZER_FILES
    ),
)  # fmt: skip


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=FOREIGN_ENTRY, as_dir=st.booleans())
def test_overwrite_refuses_a_tokenizer_dir_that_holds_anything_else(
    tokenizer_dir: Path, corpus, tmp_path_factory, capsys, name: str, as_dir: bool
) -> None:
    """--overwrite replaces the whole directory: a tokenizer saved inside an export or next to
    a checkpoint must not take the model (or anything else) with it."""
    out = tmp_path_factory.mktemp("keep") / "tok"
    shutil.copytree(tokenizer_dir, out)
    entry = out / name
    entry.mkdir() if as_dir else entry.write_text("mine")
    before = sorted(path.name for path in out.iterdir())
    err = refused(capsys, "--input", corpus["jsonl"], "--out", out,
                  "--vocab_size=300", "--overwrite")  # fmt: skip
    assert f"holds {name} besides a tokenizer this command trained" in err
    assert sorted(path.name for path in out.iterdir()) == before
    assert entry.exists()


def test_a_small_corpus_says_it_gave_fewer_tokens(tmp_path: Path, capsys) -> None:
    source = write_jsonl(["a tiny corpus"], tmp_path / "tiny.jsonl")
    train("--input", source, "--vocab_size=1000", "--out", tmp_path / "tok")
    said = capsys.readouterr().out
    assert said.startswith(f"byte-level BPE of {MIN_VOCAB_SIZE} tokens from 1 document,")
    assert ", not the 1000 asked for: the corpus holds no more pairs seen 2 times" in said
    assert len(load_tokenizer(tmp_path / "tok", "--tokenizer_dir")) == MIN_VOCAB_SIZE


def test_the_module_runs_from_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "datas.tokenizer", "--input", str(tmp_path / "none"),
         "--vocab_size=300", "--out", str(tmp_path / "tok")],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == f"error: --input {tmp_path / 'none'} does not exist\n"
