"""Run under torchrun by tests/test_eval_tasks.py: lm-eval tasks on a tiny Llama sharded with
FSDP2 over the ranks.

Writes (rank 0) a JSON file with: the CLI's metrics on the model directory; the answers to
every request of the tasks (loglikelihood, loglikelihood_rolling, generate_until) from the
sharded model, with the forwards each rank ran; and whether `evaluate_tasks` gave the model
back in training mode with the random generators as they were.

Usage: eval_tasks_dist.py MODEL_DIR TASK_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from datas import eval_tasks
from datas.C4.c4_eval import load_model_for_eval
from datas.tokenizer import load_tokenizer
from utils.distributed import gather_from_every_rank, init_distributed, shutdown

TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]
SEQ_LEN = 64
NUM_FEWSHOT = 1
BATCH_SIZE = 2  # not the single-rank tests' 3: neither the split nor the batch may matter


def cli_args(model_dir: str, task_dir: str, batch_size: int) -> list[str]:
    """`python -m datas.eval_tasks` flags of the tests' runs, on every task."""
    return [
        "--checkpoint", model_dir, "--tasks", ",".join(TASKS), "--include_path", task_dir,
        "--max_length", str(SEQ_LEN), "--batch_size", str(batch_size),
        "--num_fewshot", str(NUM_FEWSHOT),
    ]  # fmt: skip


def task_requests(task_dir: str) -> dict[str, list[Any]]:
    """Every request lm-eval builds for the tasks (as it does when evaluating), by kind."""
    manager = eval_tasks._task_manager_for(TASKS, task_dir)
    loaded = eval_tasks._load_tasks(manager, TASKS, NUM_FEWSHOT)
    requests: dict[str, list[Any]] = {}
    for task in loaded["tasks"].values():
        task.build_all_requests(rank=0, world_size=1)
        for instance in task.instances:
            requests.setdefault(instance.request_type, []).append(instance)
    return requests


def answer_all(lm: Any, requests: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Each kind of request answered by `lm` (a model in eval mode, under no_grad)."""
    return {
        "loglikelihood": [list(a) for a in lm.loglikelihood(requests["loglikelihood"])],
        "loglikelihood_rolling": lm.loglikelihood_rolling(requests["loglikelihood_rolling"]),
        "generate_until": lm.generate_until(requests["generate_until"]),
    }


def main() -> None:
    env = init_distributed()
    try:
        run(env, *sys.argv[1:4])
    finally:
        shutdown()


def run(env, model_dir: str, task_dir: str, out_path: str) -> None:
    """Returns before the process group goes: the sharded model must be freed first, or its
    groups' gloo threads outlive it and abort the interpreter at exit."""
    cli = eval_tasks.main(cli_args(model_dir, task_dir, BATCH_SIZE))
    model = load_model_for_eval(model_dir, env)
    tokenizer = load_tokenizer(model_dir, "MODEL_DIR")
    forwards = [0]
    model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    lm = eval_tasks.project_lm(
        model, tokenizer, max_length=SEQ_LEN, batch_size=BATCH_SIZE, device=env.device
    )
    requests = task_requests(task_dir)
    model.eval()
    with torch.no_grad():
        answers = answer_all(lm, requests)

    model.train()
    rng_before = torch.get_rng_state()
    eval_tasks.evaluate_tasks(
        model, model_dir, ["tiny_mc"], seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
        include_path=task_dir, limit=3, device=env.device,
    )  # fmt: skip
    restored = model.training and torch.equal(rng_before, torch.get_rng_state())

    forwards_per_rank = gather_from_every_rank(forwards[0])
    if env.is_main:
        result = {
            "world_size": dist.get_world_size(),
            "cli": cli,
            "answers": answers,
            "forwards_per_rank": forwards_per_rank,
            "restored": restored,
        }
        Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
