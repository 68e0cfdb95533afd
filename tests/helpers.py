"""Launch real multi-process runs for tests: `torchrun` on the gloo backend, localhost."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GLOO_CONNECT_FLAKE = "Gloo connectFullMesh failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: the checkout importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


def torchrun(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    extra_torchrun: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node=nproc script args...` from the repo root."""
    cmd = torchrun_command(script, *args, nproc=nproc, launcher=extra_torchrun or ("--standalone",))
    for _attempt in range(2):
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env or child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        # On a loaded 2-core box gloo sometimes fails to connect two fresh processes before
        # the run even starts; that says nothing about the code under test, so launch again.
        if GLOO_CONNECT_FLAKE not in proc.stderr:
            break
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun_command(
    script: str | Path, *args: str, nproc: int = 2, launcher: tuple[str, ...] = ("--standalone",)
) -> list[str]:
    """The command line of every torchrun launch in the tests: `launcher` holds torchrun's own
    flags (its rendezvous, --max-restarts, log redirection)."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launcher,
        str(script), *args,
    ]  # fmt: skip


def torchrun_background(
    script: str | Path, *args: str, launcher: tuple[str, ...] = ("--standalone",)
) -> subprocess.Popen:
    """A 2-process torchrun launch left running (to be signalled); its output in one pipe."""
    return subprocess.Popen(
        torchrun_command(script, *args, launcher=launcher),
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def torchrun_runs(runs: list[list[str]], work_dir: Path, nproc: int = 2) -> None:
    """Several train.py runs (lists of flags) in one `torchrun` launch, one after the other
    (tests/scripts/train_runs.py): the launch's start-up is paid once."""
    plan = work_dir / f"runs_{len(list(work_dir.glob('runs_*.json')))}.json"
    plan.write_text(json.dumps(runs))
    torchrun(REPO / "tests/scripts/train_runs.py", str(plan), nproc=nproc)


def on_own_node(cmd: list[str]) -> list[str]:
    """Run `cmd` with a private /dev/shm, as on a separate machine (streaming keeps its
    per-node state there, so two "nodes" sharing one would collide). Needs root."""
    script = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
    return ["unshare", "--mount", "--", "sh", "-c", script, "_", *cmd]


def torchrun_two_nodes(flags: list[str], work_dir: Path) -> list[str]:
    """`train.py flags` as two "nodes" of one process each on localhost: `torchrun --nnodes=2`
    with a c10d rendezvous, each node with its own /dev/shm, temp dir and local cache, as real
    nodes have. Returns each node's output; both must succeed."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        node_tmp = work_dir / f"node{rank}"
        node_tmp.mkdir()
        rendezvous = (
            "--nnodes=2", f"--node_rank={rank}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={work_dir.name}",
        )  # fmt: skip
        cache = f"--local_cache_dir={node_tmp / 'cache'}"
        cmd = torchrun_command("train.py", *flags, cache, nproc=1, launcher=rendezvous)
        nodes.append(
            subprocess.Popen(
                on_own_node(cmd),
                cwd=REPO,
                env=child_env(TMPDIR=str(node_tmp)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


def tiny_run_flags(
    data: Path, tokenizer: Path, out: Path, *, steps: int, num_workers: int
) -> list[str]:
    """train.py flags of a small, fast fp32 run on the suite's data: the tiny shape, 64-token
    sequences, a global batch of 8, a loss logged every step, no checkpoints."""
    from tests.conftest import DATA_CANONICAL_NODES, DATA_SEQ_LEN

    return [
        f"--data_dir={data}",
        f"--tokenizer_dir={tokenizer}",
        "--config=tiny",
        f"--seq_len={DATA_SEQ_LEN}",
        "--global_batch=8",
        f"--train_steps={steps}",
        "--log_every=1",
        "--warmup=2",
        "--lr=1e-2",
        "--min_lr=1e-3",
        "--save_every=0",
        f"--num_workers={num_workers}",
        f"--num_canonical_nodes={DATA_CANONICAL_NODES}",
        f"--output_dir={out}",
    ]


def python_train(*args: str, status: int = 0) -> subprocess.CompletedProcess:
    """`python train.py args...` in one process (no torchrun), expected to exit with `status`."""
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=child_env(), capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == status, proc.stderr[-4000:]
    return proc


def train_in_process(*args: str) -> str:
    """train.py's main in this process, a world of one as `python train.py args...` runs it,
    without the 7 s a fresh interpreter spends importing torch and transformers and shutting
    down; returns what it printed. The environment variables it sets for that world are taken
    back afterwards, so the processes that later tests launch do not inherit them."""
    import train

    saved = dict(os.environ)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            train.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return printed.getvalue()


def metrics_records(run_dir: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from a run's metrics.jsonl; a resumed run appends, so the last one wins."""
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


def losses_by_step_safe(run_dir: Path) -> dict[int, float]:
    try:
        return logged_losses(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.1):
    """Poll `condition` until it holds; fail with the output if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"run ended first:\n{proc.stdout.read()[-3000:]}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError("timed out")


def staging_of_a_gone_process(final: Path, kind: str = "partial") -> Path:
    """What a command killed mid-write leaves beside `final`: a staging directory
    (utils.files.new_staging) whose process is gone."""
    code = "import sys; from utils.files import new_staging; print(new_staging(sys.argv[1], sys.argv[2]))"
    made = subprocess.run([sys.executable, "-c", code, str(final), kind], cwd=REPO, env=child_env(),
                          check=True, capture_output=True, text=True)  # fmt: skip
    return Path(made.stdout.strip())
