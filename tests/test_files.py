"""Outputs written beside a user's files (utils/files.py): a command stages its output in a
hidden sibling the system names, publishes it by renaming, and never touches a sibling of the
user's, whatever its name; the commands that write so (datas.tokenizer, datas.prepare,
utils.compare's plot; convert.py in tests/test_sparse_behaviour.py) are run for real."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.files import hidden_sibling, remove_leftover_siblings, replace_dir, staging_dir

# What a user may keep beside an output called `out`: names like the command's own.
USER_SIBLINGS = st.one_of(
    st.sampled_from([".out.partial", ".out.old", ".out.tmp", ".out.partial-", ".out.old-1234567",
                     ".out.partial-ABCDEFGH", ".out.old-abcdefghi", ".out.partial-abcdefgh.bak"]),
    st.from_regex(r"\.out\.(partial|old)-[A-Za-z0-9_.-]{0,12}", fullmatch=True),
).filter(lambda name: not _looks_system_named(name))  # fmt: skip


def _looks_system_named(name: str) -> bool:
    for prefix in (".out.partial-", ".out.old-"):
        rest = name.removeprefix(prefix)
        if (
            rest != name
            and len(rest) == 8
            and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in rest)
        ):
            return True
    return False


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory)."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def place_user_sibling(root: Path, name: str, as_dir: bool) -> None:
    path = root / name
    if as_dir:
        path.mkdir()
        (path / "mine.txt").write_text("mine")
    else:
        path.write_text("mine")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(USER_SIBLINGS, min_size=1, max_size=3, unique=True), as_dir=st.booleans(),
       replacing=st.booleans())  # fmt: skip
def test_staging_and_replacing_touch_no_sibling_of_the_users(
    tmp_path_factory, names, as_dir, replacing
):
    root = tmp_path_factory.mktemp("beside")
    for name in names:
        place_user_sibling(root, name, as_dir)
    final = root / "out"
    if replacing:
        final.mkdir()
        (final / "old.txt").write_text("old output")
    users = {k: v for k, v in snapshot(root).items() if not k.startswith("out")}
    with staging_dir(final) as staging:
        (staging / "new.txt").write_text("new output")
    replace_dir(staging, final)
    assert snapshot(root) == {**users, "out": None, "out/new.txt": b"new output"}


def test_a_killed_runs_leftovers_go_and_a_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    for kind in ("partial", "old"):
        leftover = hidden_sibling(final, kind)
        (leftover / "half.bin").write_bytes(b"\0" * 10)
    with pytest.raises(RuntimeError), staging_dir(final) as staging:
        (staging / "half.bin").write_bytes(b"\0")
        raise RuntimeError("the write failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.old-{leftover.name[-8:]}"]
    with staging_dir(final) as staging:
        (staging / "whole.txt").write_text("x")
    replace_dir(staging, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_published_output_has_the_mode_a_new_one_gets(tmp_path):
    """tempfile makes its directories private (0700): a dataset or tokenizer on a shared
    disk would be unreadable to the rest of the group."""
    mask = os.umask(0o027)
    try:
        with staging_dir(tmp_path / "out") as staging:
            (staging / "a").write_text("x")
        replace_dir(staging, tmp_path / "out")
        plot = hidden_sibling(tmp_path / "plot.png", "partial", directory=False)
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE(plot.stat().st_mode) == 0o640


def test_the_file_kind_keeps_the_suffix_and_its_leftovers_go(tmp_path):
    partial = hidden_sibling(tmp_path / "plot.png", "partial", directory=False)
    assert partial.suffix == ".png" and partial.name.startswith(".plot.png.partial-")
    (tmp_path / ".plot.png.partial").write_text("mine")
    remove_leftover_siblings(tmp_path / "plot.png", "partial", suffix=".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".plot.png.partial"]


# ---------------------------------------------------------------- the commands
COMMAND_SIBLINGS = [".NAME.partial", ".NAME.old", ".NAME.tmp"]


def with_user_siblings(final: Path) -> dict[str, bytes | None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    for number, pattern in enumerate(COMMAND_SIBLINGS):
        place_user_sibling(final.parent, pattern.replace("NAME", final.name), number % 2 == 1)
    return {k: v for k, v in snapshot(final.parent).items() if not k.startswith(final.name)}


def others(final: Path) -> dict[str, bytes | None]:
    return {k: v for k, v in snapshot(final.parent).items() if not k.startswith(final.name)}


def test_the_tokenizer_command_keeps_the_users_siblings(data_docs, tmp_path):
    from datas.local_corpus import write_jsonl
    from datas.tokenizer import main

    corpus = write_jsonl(data_docs, tmp_path / "in" / "docs.jsonl")
    out = tmp_path / "work" / "tok"
    before = with_user_siblings(out)
    main(["--input", str(corpus), "--vocab_size", "300", "--out", str(out)])
    main(["--input", str(corpus), "--vocab_size", "310", "--out", str(out), "--overwrite"])
    assert others(out) == before


def test_the_prepare_command_keeps_the_users_siblings(data_docs, tmp_path):
    from datas.local_corpus import write_jsonl
    from datas.prepare import prepare_mds

    corpus = write_jsonl(data_docs, tmp_path / "in" / "docs.jsonl")
    out = tmp_path / "work" / "mds"
    before = with_user_siblings(out)
    prepare_mds([corpus], out, progress=False)
    assert others(out) == before and (out / "index.json").is_file()


def test_the_compare_plot_keeps_the_users_siblings(tmp_path):
    pytest.importorskip("matplotlib")
    from tests.test_compare import make_run, train_record
    from utils import compare

    run = make_run(tmp_path, "r", [train_record(s, 7.0 - s) for s in (1, 2)], {})
    plot = tmp_path / "plots" / "c.png"
    before = with_user_siblings(plot)
    compare.main([str(run), f"--plot={plot}"])
    assert others(plot) == before and plot.stat().st_size > 0


@pytest.mark.parametrize("case", ["out is a link", "a file is a link", "out is ."])
def test_tokenizer_overwrite_of_links_and_dot(data_docs, tmp_path, capsys, monkeypatch, case):
    """A link is refused (replacing it would replace the link, or the file it points to);
    `--out .` names the directory itself."""
    from datas.local_corpus import write_jsonl
    from datas.tokenizer import main

    corpus = write_jsonl(data_docs, tmp_path / "in" / "docs.jsonl")
    real = tmp_path / "tok"
    main(["--input", str(corpus), "--vocab_size", "300", "--out", str(real)])
    capsys.readouterr()
    out = real
    if case == "out is a link":
        out = tmp_path / "link"
        out.symlink_to(real)
    elif case == "a file is a link":
        keep = tmp_path / "precious.json"
        keep.write_text("{}")
        (real / "special_tokens_map.json").unlink()
        (real / "special_tokens_map.json").symlink_to(keep)
    else:
        monkeypatch.chdir(real)
        out = Path(".")
    before = snapshot(tmp_path)
    argv = ["--input", str(corpus), "--vocab_size", "310", "--out", str(out), "--overwrite"]
    if case == "out is .":
        main(argv)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "tok"]
        return
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "symbolic link" in err or "holds special_tokens_map.json besides" in err
    assert snapshot(tmp_path) == before
