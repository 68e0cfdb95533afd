"""Run under torchrun by tests/test_c4_eval.py: C4 perplexity of an FSDP2-wrapped tiny Llama.

Writes (rank 0) a JSON file with: the full evaluation, a `max_windows` evaluation with the
windows every rank fed the model, how often each rank tokenized into a fresh cache, and the
CLI's result on a saved model directory.

Usage: c4_eval_dist.py TOKENIZER_DIR DATA_DIR CACHE_DIR MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from datas import eval_sets
from datas.C4 import c4_eval
from utils.distributed import build_mesh, init_distributed, shutdown
from utils.model import build_meta_model, init_weights, load_model_config
from utils.parallelize import parallelize_model

SEQ_LEN = 64
MAX_WINDOWS = 5
SEED = 7
MODEL_SEED = 0


def sharded_tiny_llama(env, vocab: int) -> torch.nn.Module:
    model = build_meta_model(load_model_config("tiny", vocab), "sdpa")
    mesh = build_mesh(env, "full_shard")
    model = parallelize_model(
        model,
        mesh,
        sharding_strategy="full_shard",
        param_dtype=torch.float32,
    )
    init_weights(model, MODEL_SEED, env.device)
    return model


def count_tokenizations() -> list[int]:
    """Make c4_eval count its tokenizations on this rank."""
    calls = [0]
    original = c4_eval.token_stream

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    c4_eval.token_stream = counting
    return calls


def record_inputs(
    model: torch.nn.Module,
) -> tuple[list[list[int]], torch.utils.hooks.RemovableHandle]:
    fed: list[list[int]] = []

    def hook(module, args, kwargs):
        fed.extend(kwargs["input_ids"].tolist())

    return fed, model.register_forward_pre_hook(hook, with_kwargs=True)


def main() -> None:
    env = init_distributed()
    try:
        run(env, *sys.argv[1:6])
    finally:
        shutdown()


def run(env, tokenizer_dir: str, data_dir: str, cache_dir: str, model_dir: str, out_path: str):
    """Returns before the process group goes: the sharded models must be freed first, or their
    groups' gloo threads outlive it and abort the interpreter at exit."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = sharded_tiny_llama(env, len(tokenizer))
    tokenizations = count_tokenizations()

    full_ppl, full_tokens = c4_eval.evaluate_c4_ppl(
        model, tokenizer, data_dir, seq_len=SEQ_LEN, batch_size=4, cache_dir=cache_dir
    )
    fed, handle = record_inputs(model)
    # batch_size=2 over 5 windows: rank 1 runs a dummy forward in its second step.
    subset_ppl, subset_tokens = c4_eval.evaluate_c4_ppl(
        model,
        tokenizer_dir,
        data_dir,
        seq_len=SEQ_LEN,
        batch_size=2,
        max_windows=MAX_WINDOWS,
        seed=SEED,
        cache_dir=cache_dir,
    )
    handle.remove()
    cli = eval_sets.main(
        ["--checkpoint", model_dir, "--data", data_dir, "--seq_len", str(SEQ_LEN),
         "--batch_size", "3", "--cache_dir", cache_dir]
    )  # fmt: skip

    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, {"fed": fed, "tokenizations": tokenizations[0]})
    if env.is_main:
        result = {
            "world_size": env.world_size,
            "full": [full_ppl, full_tokens],
            "subset": [subset_ppl, subset_tokens],
            "fed_per_rank": [g["fed"] for g in gathered],
            "tokenizations_per_rank": [g["tokenizations"] for g in gathered],
            "cli": cli,
        }
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
