"""train.py runs with a fault injected, one after the other in one process group:

    torchrun --nproc_per_node=2 tests/scripts/fault_runs.py PLAN.json RESULT.json

PLAN.json lists [argv, point, ranks]: `train.run` on the flags, with the fault `point` of
tests/test_faults.py (POINTS or AGREED) injected on the listed ranks (no point: a plain run).
A faulted run must fail, with the fault itself or, for a fault the ranks agree on, with the
UserError every rank raises; rank 0 records in RESULT.json the name of its run directory's
newest complete checkpoint right after, and that error's text. Any other fault on some ranks
only leaves the others unable to go on: it ends the launch, so a plan puts it last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import train
from tests.test_faults import AGREED, POINTS, Injected
from utils.args import parse_args
from utils.checkpoint import complete_checkpoints
from utils.distributed import init_distributed, shutdown
from utils.errors import UserError


def main() -> None:
    plan, result = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    env = init_distributed()
    newest: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    try:
        for argv, point, ranks in plan:
            args = parse_args(argv)
            if point is None:
                train.run(args, env)
                continue
            with pytest.MonkeyPatch.context() as patched:
                if env.rank in ranks:
                    (POINTS | AGREED)[point][0]().install(patched)
                try:
                    train.run(args, env)
                except Injected:
                    pass
                except UserError as err:
                    if point not in AGREED:
                        raise
                    errors[args.run_name] = str(err)
                else:
                    raise AssertionError(f"{point}: the fault was never reached")
            found = complete_checkpoints(Path(args.output_dir) / args.run_name)
            newest[args.run_name] = found[-1].name if found else None
            if env.is_main:
                result.write_text(json.dumps({"newest": newest, "errors": errors}))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
