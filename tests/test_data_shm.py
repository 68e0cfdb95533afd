"""Shared memory left by a killed run: streaming's helper misses it, our cleanup does not."""

from __future__ import annotations

import gc
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from datas.mds import clean_stale_shared_memory, stale_prefixes
from datas.SmolLM.load_data import build_train_loader
from tests.conftest import DATA_CANONICAL_NODES
from tests.helpers import REPO, child_env

KILLED_RUN = """
import os, signal, sys, tempfile
from pathlib import Path
import datas.SmolLM.load_data as load_data

# As if another run had finished between our cleanup and our start: it leaves a filelock at
# prefix 0, so this run registers behind it, where streaming's helper stops looking.
clean = load_data.clean_stale_shared_memory
def clean_then_finished_run(dirs):
    clean(dirs)
    Path(tempfile.gettempdir(), "000000_cache_filelock").touch()
load_data.clean_stale_shared_memory = clean_then_finished_run

loader = load_data.build_train_loader(mds_root=sys.argv[1], local_cache=sys.argv[2], tokenizer_name=sys.argv[3],
    seq_len=64, micro_blocks=4, num_workers=0, num_canonical_nodes=2, pack_batch_texts=16)
# Killed before the first batch (as when another rank crashes at start-up): no filelocks
# yet, so a new run cannot tell the prefix is taken. Kill the whole process group: the
# resource tracker would unlink the memory.
os.killpg(os.getpid(), signal.SIGKILL)
"""


def loader_args(mds_text: Path, cache: Path, tokenizer_dir: Path) -> dict:
    return dict(
        mds_root=str(mds_text),
        local_cache=str(cache),
        tokenizer_name=str(tokenizer_dir),
        seq_len=64,
        micro_blocks=4,
        num_workers=0,
        num_canonical_nodes=DATA_CANONICAL_NODES,
        pack_batch_texts=16,
    )


def test_killed_run_leaves_shared_memory_that_we_clean(mds_text, tokenizer_dir, tmp_path):
    from streaming import StreamingDataset

    cache = tmp_path / "cache"
    args = [str(mds_text), str(cache), str(tokenizer_dir)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *args], cwd=REPO, env=child_env(), start_new_session=True
    )
    assert killed.returncode == -9
    our_dir = str(cache / "0")
    assert stale_prefixes([our_dir]), "the killed run left no shared memory"

    # Without cleanup a new run on the same directories fails. (streaming's helper would not
    # help when the leak sits behind a clean prefix, as here, unless it also unlinked a live
    # job's memory at a lower prefix.)
    with pytest.raises(ValueError, match="Reused local directory") as refused:
        StreamingDataset(remote=str(mds_text), local=our_dir, batch_size=4)
    # The error's traceback holds the memory streaming attached to while checking: let it go,
    # or this process itself would count as a live user of the leak.
    del refused
    gc.collect()

    loader = build_train_loader(**loader_args(mds_text, cache, tokenizer_dir))
    assert next(iter(loader))["input_ids"].shape == (4, 64)


def test_cleanup_keeps_other_jobs_and_removes_ours_and_orphans(tmp_path):
    from streaming.base.shared.prefix import _pack_locals

    shm = Path("/dev/shm")
    ours, other = str(tmp_path / "ours"), str(tmp_path / "other")
    layout = {"999001": other, "999002": ours, "999003": None, "999004": other}
    for prefix, local in layout.items():
        if local:
            (shm / f"{prefix}_locals").write_bytes(_pack_locals([local], int(prefix)))
        (shm / f"{prefix}_barrier").write_bytes(b"\0" * 8)
        Path(tempfile.gettempdir(), f"{prefix}_cache_filelock").touch()
    # 999004: a registry a finished dataset emptied, as streaming does it (a size of zero)
    emptied = shm / "999004_locals"
    emptied.write_bytes(bytes(4) + emptied.read_bytes()[4:])
    try:
        removed = clean_stale_shared_memory([ours])
        assert {"999002", "999003", "999004"} <= set(removed) and "999001" not in removed
        assert (shm / "999001_locals").exists() and (shm / "999001_barrier").exists()
        assert not (shm / "999002_barrier").exists() and not (shm / "999003_barrier").exists()
        assert not Path(tempfile.gettempdir(), "999003_cache_filelock").exists()
    finally:
        for path in [*shm.glob("99900?_*"), *Path(tempfile.gettempdir()).glob("99900?_*")]:
            path.unlink(missing_ok=True)


def test_two_runs_on_one_node_reading_the_same_data_do_not_disturb_each_other(
    mds_text, tokenizer_dir, tmp_path
):
    """A sweep: run B starts on the MDS directory that run A, live, reads with a DataLoader
    worker (A is paused meanwhile, so B's whole life falls inside A's). B's start-up cleanup
    used to remove A's shared memory and locks, and B took over their names. It must leave
    every file A uses in place, and both runs log the loss curve each gets alone (the same, as
    their settings are; the in-process run has other threads, hence `approx`)."""
    import os
    import re
    import signal
    import time

    from tests.helpers import logged_losses, tiny_run_flags, train_in_process

    def run_flags(name: str) -> list[str]:
        flags = tiny_run_flags(mds_text, tokenizer_dir, tmp_path, steps=8, num_workers=1)
        return [*flags, "--local_batch=4", f"--run_name={name}"]

    first = subprocess.Popen(
        [sys.executable, "train.py", *run_flags("a")], cwd=REPO, env=child_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    metrics = tmp_path / "a" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, "run A ended first"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        mapped = set(re.findall(r"/dev/shm/\d{6}_\w+", Path(f"/proc/{first.pid}/maps").read_text()))
        assert mapped, "run A maps no shared memory: nothing is tested"
        inodes = {path: os.stat(path).st_ino for path in mapped}
        train_in_process(*run_flags("b"))
        assert {path: os.stat(path).st_ino for path in mapped} == inodes
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, errors = first.communicate(timeout=120)
    assert first.returncode == 0, errors[-3000:]
    a, b = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    assert a == pytest.approx(b, rel=1e-5) and len(a) == 8
