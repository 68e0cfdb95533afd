"""C4 perplexity evaluation: the protocol computed independently, on every input format,
on 1 and 2 ranks, for any batch size; the cache; and the errors for bad inputs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from datas import eval_sets
from datas.C4 import c4_eval
from datas.C4.c4_eval import check_eval_data, evaluate_c4_ppl
from tests.helpers import REPO, torchrun
from utils.errors import UserError
from utils.model import build_meta_model, init_weights, load_model_config

SEQ_LEN = 64
N_DOCUMENTS = 40
MAX_WINDOWS = 5
SUBSET_SEED = 7
MODEL_SEED = 0
REL = 1e-5


def halves(texts: list[str]) -> list[list[str]]:
    middle = len(texts) // 2
    return [texts[:middle], texts[middle:]]


def write_c4_json_gz(texts: list[str], directory: Path) -> Path:
    """Files named and laid out like allenai/c4's `en/c4-validation.*-of-*.json.gz`."""
    directory.mkdir(parents=True, exist_ok=True)
    parts = halves(texts)
    for index, part in enumerate(parts):
        name = f"c4-validation.{index:05d}-of-{len(parts):05d}.json.gz"
        with gzip.open(directory / name, "wt", encoding="utf-8") as f:
            for text in part:
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25", "url": "u"}) + "\n")
    return directory


def write_arrow_dataset(texts: list[str], directory: Path, column: str = "text") -> Path:
    """The layout of datasets' save_to_disk: Arrow IPC streams plus its two JSON files."""
    directory.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(column, pa.string())])
    parts = halves(texts)
    names = [f"data-{i:05d}-of-{len(parts):05d}.arrow" for i in range(len(parts))]
    for name, part in zip(names, parts, strict=True):
        with pa.OSFile(str(directory / name), "wb") as sink:
            with pa.ipc.new_stream(sink, schema) as writer:
                # Several record batches per file, as datasets writes them.
                writer.write_table(pa.table({column: part}, schema=schema), max_chunksize=17)
    features = {column: {"dtype": "string", "_type": "Value"}}
    (directory / "dataset_info.json").write_text(json.dumps({"features": features}))
    state = {"_data_files": [{"filename": n} for n in names], "_split": "validation"}
    (directory / "state.json").write_text(json.dumps(state))
    return directory


def write_mds(texts: list[str], directory: Path, column: str = "text") -> Path:
    """Compressed MDS in several shards, with an extra column to skip."""
    from streaming import MDSWriter

    columns = {column: "str", "url": "str"}
    with MDSWriter(out=str(directory), columns=columns, compression="zstd", size_limit=10_000) as w:
        for index, text in enumerate(texts):
            w.write({column: text, "url": f"doc{index}"})
    return directory


@pytest.fixture(scope="module")
def documents(docstrings: list[str]) -> list[str]:
    return docstrings[:N_DOCUMENTS]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def model(tokenizer) -> torch.nn.Module:
    model = build_meta_model(load_model_config("tiny", len(tokenizer)), "sdpa")
    init_weights(model, MODEL_SEED, torch.device("cpu"))
    return model


@pytest.fixture(scope="module")
def reference_windows(documents: list[str], tokenizer) -> torch.Tensor:
    """The protocol's windows, built document by document without c4_eval."""
    ids: list[int] = []
    for text in documents:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_windows = len(ids) // SEQ_LEN
    return torch.tensor(ids[: n_windows * SEQ_LEN]).view(n_windows, SEQ_LEN)


def reference_ppl(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """The protocol computed directly: one window at a time, summed in float64."""
    total = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
    ntokens = len(windows) * (SEQ_LEN - 1)
    return math.exp(total / ntokens), ntokens


@pytest.fixture(scope="module")
def expected_full(model, reference_windows) -> tuple[float, int]:
    return reference_ppl(model, reference_windows)


def subset_indices(n_windows: int) -> torch.Tensor:
    """The documented max_windows rule, written out independently."""
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n_windows, generator=generator)[:MAX_WINDOWS]


@pytest.fixture(scope="module")
def data_dirs(documents: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("c4_data")
    return {
        "json.gz": write_c4_json_gz(documents, root / "c4"),
        "arrow": write_arrow_dataset(documents, root / "arrow"),
        "mds": write_mds(documents, root / "mds"),
    }


@pytest.mark.parametrize("fmt", ["json.gz", "arrow", "mds"])
def test_matches_direct_computation(fmt, data_dirs, model, tokenizer, expected_full, tmp_path):
    check_eval_data(data_dirs[fmt])
    model.train()
    ppl, ntokens = evaluate_c4_ppl(
        model, tokenizer, data_dirs[fmt], seq_len=SEQ_LEN, batch_size=3, cache_dir=tmp_path
    )
    assert model.training, "the model's training mode must be restored"
    assert ntokens == expected_full[1]
    assert ppl == pytest.approx(expected_full[0], rel=REL)
    # A random-init model over a 1024-token vocabulary: near-uniform, far from degenerate.
    assert 500 < ppl < 2000


def test_mds_fixture_is_compressed_and_sharded(data_dirs):
    assert len(list(data_dirs["mds"].glob("*.mds.zstd"))) > 1
    assert not list(data_dirs["mds"].glob("*.mds"))


def test_batch_size_one_equals_three_and_eval_mode_is_kept(
    data_dirs, model, tokenizer_dir, expected_full, tmp_path
):
    model.eval()
    results = [
        evaluate_c4_ppl(
            model, tokenizer_dir, data_dirs["json.gz"], seq_len=SEQ_LEN, batch_size=b,
            cache_dir=tmp_path,
        )
        for b in (1, 3)
    ]  # fmt: skip
    assert not model.training
    assert results[0][1] == results[1][1] == expected_full[1]
    assert results[0][0] == pytest.approx(results[1][0], rel=REL)


def test_max_windows_picks_the_seeded_subset(
    data_dirs, model, tokenizer, reference_windows, tmp_path
):
    fed: list[list[int]] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.extend(kwargs["input_ids"].tolist()), with_kwargs=True
    )
    try:
        ppl, ntokens = evaluate_c4_ppl(
            model, tokenizer, data_dirs["json.gz"], seq_len=SEQ_LEN, batch_size=3,
            max_windows=MAX_WINDOWS, seed=SUBSET_SEED, cache_dir=tmp_path,
        )  # fmt: skip
    finally:
        handle.remove()
    chosen = reference_windows[subset_indices(len(reference_windows))]
    assert sorted(fed) == sorted(chosen.tolist())
    expected = reference_ppl(model, chosen)
    assert ntokens == expected[1] == MAX_WINDOWS * (SEQ_LEN - 1)
    assert ppl == pytest.approx(expected[0], rel=REL)


def test_second_call_reads_the_cache(data_dirs, model, tokenizer, monkeypatch, tmp_path):
    first = evaluate_c4_ppl(
        model, tokenizer, data_dirs["arrow"], seq_len=SEQ_LEN, max_windows=3, cache_dir=tmp_path
    )
    (cached,) = tmp_path.glob("*.npy")
    written = cached.stat().st_mtime_ns

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("re-tokenized although the windows are cached")

    monkeypatch.setattr(c4_eval, "token_stream", must_not_tokenize)
    second = evaluate_c4_ppl(
        model, tokenizer, data_dirs["arrow"], seq_len=SEQ_LEN, max_windows=3, cache_dir=tmp_path
    )
    assert second == first
    assert cached.stat().st_mtime_ns == written
    # Another seq_len is another key: it must tokenize.
    with pytest.raises(AssertionError, match="re-tokenized"):
        evaluate_c4_ppl(model, tokenizer, data_dirs["arrow"], seq_len=32, cache_dir=tmp_path)


def test_cli_builds_the_cache_without_a_model(
    data_dirs, model, tokenizer, tokenizer_dir, reference_windows, monkeypatch, tmp_path
):
    args = ["--data", str(data_dirs["mds"]), "--tokenizer", str(tokenizer_dir)]
    prepared = eval_sets.main([*args, "--seq_len", str(SEQ_LEN), "--cache_dir", str(tmp_path)])
    assert prepared["c4"]["windows"] == len(reference_windows)
    cache = Path(prepared["c4"]["cache"])
    assert cache.parent == tmp_path and cache.is_file()
    monkeypatch.setattr(c4_eval, "token_stream", None)  # any tokenization would fail
    _, ntokens = evaluate_c4_ppl(
        model, tokenizer, data_dirs["mds"], seq_len=SEQ_LEN, max_windows=2, cache_dir=tmp_path
    )
    assert ntokens == 2 * (SEQ_LEN - 1)


def test_one_and_two_ranks_agree(
    data_dirs, model, tokenizer, tokenizer_dir, reference_windows, expected_full, tmp_path
):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "result.json"
    data = data_dirs["json.gz"]
    torchrun(
        REPO / "tests/scripts/c4_eval_dist.py",
        str(tokenizer_dir), str(data), str(tmp_path / "dist_cache"), str(model_dir), str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["world_size"] == 2

    assert result["full"][1] == expected_full[1]
    assert result["full"][0] == pytest.approx(expected_full[0], rel=REL)

    single = evaluate_c4_ppl(
        model, tokenizer, data, seq_len=SEQ_LEN, batch_size=3, max_windows=MAX_WINDOWS,
        seed=SUBSET_SEED, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert result["subset"][1] == single[1]
    assert result["subset"][0] == pytest.approx(single[0], rel=REL)
    fed_by_ranks = [window for rank in result["fed_per_rank"] for window in rank]
    chosen = reference_windows[subset_indices(len(reference_windows))].tolist()
    # Both ranks score the chosen windows between them (rank 1 adds one dummy forward of
    # window 0 of the subset, whose loss is dropped).
    assert sorted(fed_by_ranks) == sorted(chosen + [chosen[0]])
    assert not set(map(tuple, result["fed_per_rank"][0])) & set(
        map(tuple, result["fed_per_rank"][1][:-1])
    )

    assert result["tokenizations_per_rank"] == [1, 0]

    cli_single = eval_sets.main(
        ["--checkpoint", str(model_dir), "--data", str(data), "--seq_len", str(SEQ_LEN),
         "--cache_dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert cli_single["eval/tokens"] == result["cli"]["eval/tokens"] == expected_full[1]
    assert cli_single["eval/c4_ppl"] == pytest.approx(expected_full[0], rel=REL)
    assert result["cli"]["eval/c4_ppl"] == pytest.approx(expected_full[0], rel=REL)


def write_jsonl_gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def dataset_dict(root: Path) -> Path:
    (root / "dataset_dict.json").write_text('{"splits": ["validation"]}')
    return root


BAD_INPUTS = {
    "missing": (lambda root: root / "nowhere", UserError, "does not exist"),
    "empty directory": (lambda root: root, ValueError, "holds no .json.gz"),
    "unknown file": (lambda root: write_bytes(root / "notes.txt", b"hi"), ValueError, "neither"),
    "no text field": (
        lambda root: write_jsonl_gz(root / "a.json.gz", ['{"body": "x"}']),
        ValueError,
        "no string field 'text'",
    ),
    "not JSON": (
        lambda root: write_jsonl_gz(root / "a.jsonl.gz", ["{oops"]),
        ValueError,
        "not JSON lines",
    ),
    "corrupt gzip": (
        lambda root: write_bytes(root / "a.json.gz", b"not gzip"),
        ValueError,
        "not readable",
    ),
    "no documents": (
        lambda root: write_jsonl_gz(root / "a.json.gz", ["", "  "]),
        ValueError,
        "no documents",
    ),
    "arrow without text": (
        lambda root: write_arrow_dataset(["x"], root / "arrow", column="body"),
        ValueError,
        "no `text`",
    ),
    "dataset dict": (dataset_dict, ValueError, "DatasetDict"),
    "mds without text": (
        lambda root: write_mds(["x", "y"], root / "mds", column="body"),
        ValueError,
        "no `text`",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_with_a_clear_error(case, model, tokenizer, tmp_path):
    make, error, message = BAD_INPUTS[case]
    root = tmp_path / "data"
    root.mkdir()
    path = make(root)
    with pytest.raises(error, match=message) as checked:
        check_eval_data(path)
    assert str(path) in str(checked.value)
    assert "\n" not in str(checked.value)
    with pytest.raises(error, match=message):
        evaluate_c4_ppl(model, tokenizer, path, seq_len=SEQ_LEN, cache_dir=tmp_path / "cache")


def test_too_few_tokens_for_one_window(data_dirs, model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="fewer than one window of seq_len=1000000"):
        evaluate_c4_ppl(model, tokenizer, data_dirs["arrow"], seq_len=1_000_000, cache_dir=tmp_path)
