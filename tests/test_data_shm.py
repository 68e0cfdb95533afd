"""Shared memory left by a killed run: streaming's helper misses it, our cleanup does not."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="Reused local directory"):
        StreamingDataset(remote=str(mds_text), local=our_dir, batch_size=4)

    loader = build_train_loader(**loader_args(mds_text, cache, tokenizer_dir))
    assert next(iter(loader))["input_ids"].shape == (4, 64)


def test_cleanup_keeps_other_jobs_and_removes_ours_and_orphans(tmp_path):
    from streaming.base.shared.prefix import _pack_locals

    shm = Path("/dev/shm")
    ours, other = str(tmp_path / "ours"), str(tmp_path / "other")
    layout = {"999001": other, "999002": ours, "999003": None}
    for prefix, local in layout.items():
        if local:
            (shm / f"{prefix}_locals").write_bytes(_pack_locals([local], int(prefix)))
        (shm / f"{prefix}_barrier").write_bytes(b"\0" * 8)
        Path(tempfile.gettempdir(), f"{prefix}_cache_filelock").touch()
    try:
        removed = clean_stale_shared_memory([ours])
        assert {"999002", "999003"} <= set(removed) and "999001" not in removed
        assert (shm / "999001_locals").exists() and (shm / "999001_barrier").exists()
        assert not (shm / "999002_barrier").exists() and not (shm / "999003_barrier").exists()
        assert not Path(tempfile.gettempdir(), "999003_cache_filelock").exists()
    finally:
        for path in [*shm.glob("99900?_*"), *Path(tempfile.gettempdir()).glob("99900?_*")]:
            path.unlink(missing_ok=True)
