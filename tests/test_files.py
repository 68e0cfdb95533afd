"""Outputs written beside a user's files (utils/files.py): a command stages its output in a
hidden sibling the system names, publishes it by renaming, and never touches a sibling of the
user's, whatever its name; the commands that write so (datas.tokenizer, datas.prepare,
utils.compare's plot; convert.py in tests/test_sparse_behaviour.py) are run for real."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import staging_of_a_gone_process
from utils import files
from utils.errors import UserError
from utils.files import Replaceable, check_output_dir, publish_dir, staging_dir

# What a user may keep beside an output called `out`: names like the command's own, those
# tempfile could have picked among them.
USER_SIBLINGS = st.one_of(
    st.sampled_from([".out.partial", ".out.old", ".out.tmp", ".out.partial-", ".out.deleting",
                     ".out.partial-original", ".out.old-20240101", ".out.partial-backup_1",
                     ".out.deleting-abcdefgh", ".out.partial-ABCDEFGH.bak"]),
    st.from_regex(r"\.out\.(partial|old|deleting)-[A-Za-z0-9_.-]{0,12}", fullmatch=True),
)  # fmt: skip

# A replaced output here: a directory of `.txt` files holding `old.txt`.
TEXT_OUTPUT = Replaceable("--out", "a text output", lambda name: name.endswith(".txt"), "old.txt")


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under `root` with its bytes (None for a directory, "fifo" for a FIFO)."""
    return {
        str(path.relative_to(root)): None
        if path.is_dir()
        else "fifo"
        if path.is_fifo()
        else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def place_user_sibling(root: Path, name: str, as_dir: bool) -> None:
    path = root / name
    if as_dir:
        path.mkdir()
        (path / "mine.txt").write_text("mine")
        (path / files.OWNER_FILE).write_text("my own notes on who wrote this")
    else:
        path.write_text("mine")


def old_output(final: Path) -> None:
    final.mkdir()
    (final / "old.txt").write_text("old output")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
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
        old_output(final)
    users = {k: v for k, v in snapshot(root).items() if not k.startswith("out")}
    checked = check_output_dir(final, "--out", "", TEXT_OUTPUT) if replacing else None
    with staging_dir(final) as staging:
        (staging / "new.txt").write_text("new output")
        publish_dir(staging, final, checked)
    assert snapshot(root) == {**users, "out": None, "out/new.txt": b"new output"}


def test_only_a_gone_processs_staging_is_removed_as_a_leftover(tmp_path, monkeypatch):
    """A killed run's staging goes; one another command is still writing (here: this process),
    or one made on another machine of a shared disk, stays; a failed write leaves nothing."""
    final = tmp_path / "out"
    killed = staging_of_a_gone_process(final)
    live = files.new_staging(final)
    elsewhere = files.new_staging(final)
    owner = elsewhere.parent / files.OWNER_FILE
    owner.write_text(owner.read_text().replace(socket.gethostname(), "another-host"))
    with pytest.raises(RuntimeError), staging_dir(final) as staging:
        (staging / "half.bin").write_bytes(b"\0")
        raise RuntimeError("the write failed")
    assert not killed.parent.exists() and not staging.parent.exists()
    assert live.is_dir() and elsewhere.is_dir()


def _pid_as_text(owner: dict) -> dict:
    return owner | {"pid": str(owner["pid"])}


OWNER_CHANGES = {
    "pid as text": _pid_as_text,
    "pid as a float": lambda owner: owner | {"pid": float(owner["pid"])},
    "start as a number": lambda owner: owner | {"started": 12345},
    "another pid namespace": lambda owner: owner | {"pid_namespace": 1},
    "another writer": lambda owner: owner | {"writer": "someone"},
    "no start": lambda owner: {k: v for k, v in owner.items() if k != "started"},
}


@pytest.mark.parametrize(
    "case", ["as left", *OWNER_CHANGES, "a fifo", "a link", "a huge file", "a copy of it"]
)
def test_a_leftover_goes_only_when_its_owner_file_says_whose_it_is_and_that_one_is_gone(
    tmp_path, case
):
    final = tmp_path / "out"
    leftover = staging_of_a_gone_process(final).parent
    owner_file = leftover / files.OWNER_FILE
    owner = json.loads(owner_file.read_text())
    if case in OWNER_CHANGES:
        owner_file.write_text(json.dumps(OWNER_CHANGES[case](owner)))
    elif case == "a fifo":
        owner_file.unlink()
        os.mkfifo(owner_file)  # reading it would wait for a writer forever
    elif case == "a link":
        (tmp_path / "owner.json").write_text(owner_file.read_text())
        owner_file.unlink()
        owner_file.symlink_to(tmp_path / "owner.json")
    elif case == "a huge file":
        owner_file.write_text(json.dumps(owner | {"notes": "x" * 10_000}))
    elif case == "a copy of it":
        leftover = leftover.rename(leftover.with_name(leftover.name + ".bak"))
    files.remove_dead_stagings(tmp_path, ".out.partial-*")
    assert leftover.exists() == (case != "as left")


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
@pytest.mark.parametrize(
    "meanwhile",
    ["nothing", "a user's file", "no old.txt", "an edited old.txt", "a new dir", "a new output",
     "a link to it", "gone"],
)  # fmt: skip
def test_what_appears_in_the_output_while_the_command_runs_is_never_replaced(
    tmp_path, monkeypatch, swap, meanwhile
):
    """The checks run before the work; the output goes in only if the directory is still what
    they allowed when the new one replaces it: otherwise one line, and nothing changes."""
    if swap == "two renames":

        def unsupported(*paths):
            raise OSError(errno.EINVAL, "not supported here")

        monkeypatch.setattr(files, "_exchange", unsupported)
    final = tmp_path / "out"
    replacing = not meanwhile.startswith("a new")
    if replacing:
        old_output(final)
    checked = check_output_dir(final, "--out", "", TEXT_OUTPUT) if replacing else None
    with staging_dir(final) as staging:
        (staging / "new.txt").write_text("new output")
        if meanwhile in ("a user's file", "a new dir"):
            final.mkdir(exist_ok=True)
            (final / "notes.md").write_text("mine")
        elif meanwhile == "a new output":
            old_output(final)  # the kind --overwrite replaces, but not the one checked
        elif meanwhile == "no old.txt":
            (final / "old.txt").rename(final / "other.txt")
        elif meanwhile == "an edited old.txt":
            (final / "old.txt").write_text("edited by hand")
        elif meanwhile == "a link to it":
            final.rename(tmp_path / "moved")
            final.symlink_to(tmp_path / "moved")
        elif meanwhile == "gone":
            shutil.rmtree(final)
        before = snapshot(tmp_path)
        try:
            publish_dir(staging, final, checked)
        except UserError as err:
            assert meanwhile != "nothing" and "changed while this command ran" in str(err)
            assert snapshot(tmp_path) == before
            return
    assert meanwhile == "nothing"
    assert snapshot(tmp_path) == {"out": None, "out/new.txt": b"new output"}


def test_an_interrupted_two_rename_replacement_puts_the_old_output_back(tmp_path, monkeypatch):
    """Where directories cannot be swapped in one step, a Ctrl-C between the renames leaves
    the old output in place."""
    monkeypatch.setattr(files, "_exchange", lambda *paths: (_ for _ in ()).throw(
        OSError(errno.ENOSYS, "no renameat2")))  # fmt: skip
    final = tmp_path / "out"
    old_output(final)
    checked = check_output_dir(final, "--out", "", TEXT_OUTPUT)
    real_rename = Path.rename

    def interrupted(self, target):
        if self.name == files.OUTPUT:
            raise KeyboardInterrupt
        return real_rename(self, target)

    with pytest.raises(KeyboardInterrupt), staging_dir(final) as staging:
        (staging / "new.txt").write_text("new output")
        monkeypatch.setattr(Path, "rename", interrupted)
        publish_dir(staging, final, checked)
    monkeypatch.undo()
    assert snapshot(tmp_path) == {"out": None, "out/old.txt": b"old output"}


def test_a_swap_interrupted_before_its_check_puts_the_old_output_back(tmp_path, monkeypatch):
    final = tmp_path / "out"
    old_output(final)
    checked = check_output_dir(final, "--out", "", TEXT_OUTPUT)

    def interrupted(directory):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), staging_dir(final) as staging:
        (staging / "new.txt").write_text("new output")
        monkeypatch.setattr(files, "_state_or_none", interrupted)
        publish_dir(staging, final, checked)
    assert snapshot(tmp_path) == {"out": None, "out/old.txt": b"old output"}


def test_a_published_output_keeps_the_setgid_bit_of_a_shared_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    with staging_dir(shared / "out") as staging:
        publish_dir(staging, shared / "out")
    assert (shared / "out").stat().st_mode & stat.S_ISGID


def test_a_published_output_has_the_modes_new_ones_get(tmp_path):
    """tempfile makes its directories private (0700), safetensors its files (0600): a dataset,
    export or checkpoint on a shared disk would be unreadable to the rest of the group."""
    mask = os.umask(0o027)
    try:
        with staging_dir(tmp_path / "out") as staging:
            (staging / "a").write_text("x")
            (staging / "private").write_text("as safetensors writes its files")
            (staging / "private").chmod(0o600)
            publish_dir(staging, tmp_path / "out")
    finally:
        os.umask(mask)
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "out", *(tmp_path / "out").iterdir()]
    }
    assert modes == {"out": 0o750, "a": 0o640, "private": 0o640}


@pytest.mark.parametrize(
    "case",
    ["a link to an empty dir", "a dangling link", "a long name", "a name past the limit",
     "not UTF-8"],
)  # fmt: skip
def test_outputs_that_could_not_be_published_are_refused_first(tmp_path, case):
    out = tmp_path / "out"
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    expected = {"a long name": "too long to stage", "a name past the limit": "too long to stage",
                "not UTF-8": "not valid UTF-8"}  # fmt: skip
    if case == "a long name":
        out = tmp_path / ("n" * (limit - 10))
    elif case == "a name past the limit":
        out = tmp_path / "deeper" / ("n" * (limit + 1))
    elif case == "not UTF-8":
        out = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff"))
    else:
        target = tmp_path / "target"
        if case == "a link to an empty dir":
            target.mkdir()
        out.symlink_to(target)
    with pytest.raises(UserError) as err:
        check_output_dir(out, "--out", "choose a new directory")
    assert expected.get(case, "symbolic link") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["out"], [], ["out", "target"]), case


# ---------------------------------------------------------------- the commands
COMMAND_SIBLINGS = [".NAME.partial", ".NAME.old", ".NAME.tmp", ".NAME.partial-original",
                    ".NAME.old-20240101", ".NAME.partial-backup_1"]  # fmt: skip


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


def test_prepare_writes_into_the_current_directory_and_refuses_a_link(
    data_docs, tmp_path, monkeypatch
):
    from datas.local_corpus import write_jsonl
    from datas.prepare import prepare_mds

    corpus = write_jsonl(data_docs, tmp_path / "in" / "docs.jsonl")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    prepare_mds([corpus], ".", progress=False)
    assert (tmp_path / "here" / "index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "in"]
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="--output .*link is a symbolic link"):
        prepare_mds([corpus], tmp_path / "link", progress=False)


@pytest.mark.parametrize(
    "existing", ["none", "an earlier plot", "notes", "a link", "a fifo", "appears"]
)
def test_the_plot_replaces_only_an_earlier_plot(tmp_path, existing, monkeypatch):
    pytest.importorskip("matplotlib")
    from tests.test_compare import make_run, train_record
    from utils import compare

    run = make_run(tmp_path, "r", [train_record(s, 7.0 - s) for s in (1, 2)], {})
    plot = tmp_path / "c.png"
    if existing == "an earlier plot":
        compare.main([str(run), f"--plot={plot}"])
    elif existing == "notes":
        plot.write_text("my notes")
    elif existing == "a link":
        (tmp_path / "elsewhere.png").write_text("a file of mine")
        plot.symlink_to(tmp_path / "elsewhere.png")
    elif existing == "a fifo":
        os.mkfifo(plot)  # opening it to look inside would wait for a writer forever
    elif existing == "appears":
        real_draw = compare.draw_figure

        def draw_while_a_file_appears(series):
            plot.write_text("written meanwhile")
            return real_draw(series)

        monkeypatch.setattr(compare, "draw_figure", draw_while_a_file_appears)
    before = snapshot(tmp_path)
    if existing in ("none", "an earlier plot"):
        mask = os.umask(0o027)
        try:
            compare.main([str(run), f"--plot={plot}"])
        finally:
            os.umask(mask)
        assert plot.read_bytes().startswith(b"\x89PNG") and not plot.is_symlink()
        if existing == "none":
            assert stat.S_IMODE(plot.stat().st_mode) == 0o640  # the umask's, not private
    else:
        with pytest.raises(SystemExit):
            compare.main([str(run), f"--plot={plot}"])
        if existing != "appears":
            assert snapshot(tmp_path) == before
        assert plot.is_symlink() or plot.is_fifo() or not plot.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
