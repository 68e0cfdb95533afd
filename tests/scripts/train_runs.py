"""Run train.py's recipe several times in one process group, one run after the other:

    torchrun --nproc_per_node=2 tests/scripts/train_runs.py RUNS.json

RUNS.json is a list of train.py argument lists. Each run is `train.run` on the parsed flags,
exactly as `train.py` runs it; only the process group (and the seconds a launch spends
importing torch and transformers) is shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import train
from utils.args import parse_args
from utils.distributed import init_distributed, shutdown


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    env = init_distributed()
    try:
        for argv in runs:
            train.run(parse_args(argv), env)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
