"""train.py with one rank's loss made NaN at chosen optimizer steps, as a corrupt batch or a
numerical blow-up on one GPU would make it:

    torchrun --nproc_per_node=2 tests/scripts/poisoned_train.py RANK STEPS [train.py flags]

STEPS is a comma-separated list of steps of a fresh (not resumed) run. In-process tests call
`poison` themselves.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

import train


def poison(rank: int, steps: set[int]) -> None:
    """From now on, train.py's loss on `rank` is NaN at `steps` (counted from 1)."""
    train_step, model_nll_sum = train.train_step, train.model_nll_sum
    counted = {"step": 0}

    def counting_train_step(*args, **kwargs):
        counted["step"] += 1
        return train_step(*args, **kwargs)

    def poisoned_nll_sum(model, inputs, labels):
        nll = model_nll_sum(model, inputs, labels)
        return nll * float("nan") if _here(rank) and counted["step"] in steps else nll

    train.train_step, train.model_nll_sum = counting_train_step, poisoned_nll_sum


def _here(rank: int) -> bool:
    return dist.get_rank() == rank


if __name__ == "__main__":
    poison(int(sys.argv[1]), {int(step) for step in sys.argv[2].split(",")})
    train.main(sys.argv[3:])
