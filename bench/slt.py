"""Step time, peak memory, parameters and optimizer state of each slt method against dense.

    python -m bench.slt --config llama-60m --seq_len 256 --local_batch 8 --steps 5
    python -m bench.slt --config llama-130m --seq_len 256 --local_batch 64   # on a GPU

Each method runs with its default settings (docs/sparse.md; magnitude at its final sparsity from
the start, `--sltrain_r` to override SLTrain's rank) in its own child process, one after
the other, so each peak memory is its own (on CPU: the process's peak resident memory). The
timing is bench.throughput's: train.py's model, optimizer and step on random tokens, after
warm-up steps; masks are refreshed at each method's own interval (magnitude every 100 steps,
supermask every step). `--json` makes the last line a JSON list, one object per method.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from bench import throughput
from slt import METHOD_DEFAULTS, SLTConfig
from utils.distributed import DistEnv, init_distributed, shutdown
from utils.errors import UserError, exit_on_user_error
from utils.model import count_parameters, trainable_parameters

METHODS = ("dense", *METHOD_DEFAULTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = throughput.build_parser("python -m bench.slt", __doc__)
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS)
    )
    p.add_argument(
        "--sltrain_r", type=int, help="SLTrain rank (default: the paper's for the shape)"
    )
    p.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)  # one child's method
    args = p.parse_args(argv)
    throughput.check_args(args)
    if args.float8:
        raise UserError(
            "--float8: bench.slt compares bf16 sparse layers; time float8 with bench.throughput"
        )
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error():
        args = parse_args(argv)
        if args.only:
            env = init_distributed()
            try:
                print(json.dumps(measure(args, env)), flush=True)
            finally:
                shutdown()
            return
    results = [run_child(argv, method) for method in args.methods.split(",")]
    print_table(results)
    if args.json:
        print(json.dumps(results), flush=True)


def run_child(argv: list[str], method: str) -> dict:
    cmd = [sys.executable, "-m", "bench.slt", *argv, "--only", method]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slt_config(args: argparse.Namespace) -> SLTConfig | None:
    if args.only == "dense":
        return None
    values = {"method": args.only}
    if args.only == "magnitude":
        values["schedule"] = "constant"  # at its final sparsity from the first step
    if args.only == "sltrain" and args.sltrain_r:
        values["r"] = args.sltrain_r
    return SLTConfig.from_dict(values)


def measure(args: argparse.Namespace, env: DistEnv) -> dict:
    options, model_config, _, batches = throughput.prepare_inputs(args, env)
    setup = throughput.project_step(options, model_config, env, slt_config(args))
    timing = throughput.time_steps(setup.step, batches, args, env)
    sparsity = 0.0
    if setup.sparse:
        sparsity = setup.sparse.measure(args.steps)["sparsity"]
    return {
        "method": args.only,
        "step_time_s": timing.step_time_s,
        "tokens_per_s": timing.tokens_per_s,
        "peak_mem_gb": timing.peak_mem_gb,
        "parameters": count_parameters(setup.model),
        "trainable_parameters": trainable_parameters(setup.model),
        "optimizer_state": optimizer_state_size(setup.optimizer),
        "sparsity": sparsity,
    }


def optimizer_state_size(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the optimizer's per-parameter state (AdamW: two moments), unsharded."""
    return sum(
        value.numel()
        for state in optimizer.state.values()
        for value in state.values()
        if value.ndim
    )


def print_table(results: list[dict]) -> None:
    dense = next((r for r in results if r["method"] == "dense"), None)
    print(f"| {'method':<9} | {'step s':>7} | {'vs dense':>8} | {'tokens/s':>9} | {'peak GB':>7} | "
          f"{'params M':>8} | {'trainable M':>11} | {'optim state M':>13} | {'zeros':>6} |")  # fmt: skip
    print("|" + "|".join("-" * (w + 2) for w in (9, 7, 8, 9, 7, 8, 11, 13, 6)) + "|")
    for r in results:
        ratio = f"{r['step_time_s'] / dense['step_time_s']:.2f}x" if dense else "n/a"
        print(
            f"| {r['method']:<9} | {r['step_time_s']:>7.3f} | {ratio:>8} | "
            f"{r['tokens_per_s']:>9,.0f} | {r['peak_mem_gb']:>7.2f} | {r['parameters'] / 1e6:>8.2f} | "
            f"{r['trainable_parameters'] / 1e6:>11.2f} | {r['optimizer_state'] / 1e6:>13.2f} | "
            f"{r['sparsity']:>6.2f} |"
        )


if __name__ == "__main__":
    main()
