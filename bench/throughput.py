"""Training throughput of this project's step, and of plain transformers + FSDP2, in one run.

    python -m bench.throughput --config tinyllama-1.1b --seq_len 2048 --local_batch 8 --baseline
    python -m bench.throughput --config llama-130m --seq_len 256 --local_batch 128 --baseline \\
        --data_dir /data/mds_tok256 --tokenizer_dir /data/tokenizer --num_workers 4
    torchrun --nproc_per_node=8 -m bench.throughput --config ... (numbers are per GPU)

The project's side is train.py's own code: `build_model` (chunked-loss head, activation
checkpointing, per-layer compile, FSDP2, initialization), its optimizer and schedule, and
`train_step` with `--accum_steps` micro-steps. Batches are random tokens (pinned, prepared
beforehand) or, with `--data_dir`, the real loader, so the time spent waiting for data counts.
After `--warmup_steps` untimed steps (compilation happens there), `--steps` optimizer steps are
timed, with CUDA events on GPU. `--baseline` then times, in the same process and on the same
batches, a transformers LlamaForCausalLM under FSDP2 with each layer compiled (on CUDA), SDPA,
bf16 parameters, fp32 gradient reduction, fused AdamW and the model's own loss.

`--json` makes the last line one JSON object: tokens_per_s (per GPU), tflops (per GPU), mfu,
peak_mem_gb, data_wait_fraction, step_time_s and, with --baseline, baseline_tokens_per_s,
baseline_mfu, baseline_peak_mem_gb and speedup. `--profile N` then runs N more steps of each
setup under torch.profiler and reports where their time goes (bench/profile.py), under
`profile` and `baseline_profile`.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, PretrainedConfig

import train
from bench.profile import print_profile, profile_steps
from datas.packing import token_count
from slt import SLTConfig, SparseTraining
from utils.args import add_data_flags, add_layout_flags, apply_device_defaults
from utils.distributed import DistEnv, build_mesh, init_distributed, shutdown
from utils.errors import UserError, exit_on_user_error
from utils.metrics import model_flops_per_token, peak_flops, peak_memory_gb
from utils.model import decoder_layers, load_model_config
from utils.optim import build_optimizer, set_lr

SYNTHETIC_BATCHES = 4  # distinct random micro-batches, cycled


@dataclass
class Timing:
    tokens_per_s: float  # per rank
    step_time_s: float
    data_wait_fraction: float
    peak_mem_gb: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser("python -m bench.throughput", __doc__).parse_args(argv)
    check_args(args)
    return args


def build_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The benchmark's flags; bench.slt adds its own to the same parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", required=True, help="shape name or HF config.json (or its dir)")
    p.add_argument("--local_batch", type=int, default=8, help="sequences per micro-step")
    p.add_argument("--accum_steps", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup_steps", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--fp32", action="store_true", help="fp32 compute (default: bf16 on CUDA)")
    p.add_argument("--baseline", action="store_true", help="also time plain transformers")
    p.add_argument("--json", action="store_true", help="last line: the results as JSON")
    p.add_argument(
        "--profile", type=int, default=0, help="then profile N steps: time by kernel kind"
    )
    p.add_argument("--peak_tflops", type=float, help="peak for MFU (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0, help="weights, tokens and data order")
    add_layout_flags(p.add_argument_group("training (as train.py)"))
    add_data_flags(p.add_argument_group("data (default: random tokens)"))
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag in ("local_batch", "accum_steps", "steps", "seq_len"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be positive (got {getattr(args, flag)})")
    for flag in ("warmup_steps", "profile"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must not be negative (got {getattr(args, flag)})")
    if args.document_masking and not args.data_dir:
        raise UserError("--document_masking needs --data_dir (random tokens have no documents)")
    if args.data_dir and not args.tokenizer_dir:
        raise UserError("--data_dir needs --tokenizer_dir (the loader tokenizes or checks EOS)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        args = parse_args(argv)
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything touches CUDA
        env = init_distributed()
        try:
            run(args, env)
        finally:
            shutdown()


def run(args: argparse.Namespace, env: DistEnv) -> None:
    options, model_config, loader, batches = prepare_inputs(args, env)
    results = {
        "device": device_name(env.device),
        "world_size": env.world_size,
        "config": args.config,
        "seq_len": args.seq_len,
        "local_batch": args.local_batch,
        "accum_steps": args.accum_steps,
        "precision": "bf16" if options.dtype == torch.bfloat16 else "fp32",
        "compile": args.compile,
        "chunked_loss": args.chunked_loss,
        "activation_checkpointing": args.activation_checkpointing,
        "attention_kernel": args.attention_kernel,
        "float8": args.float8,
        "sharding_strategy": args.sharding_strategy,
        "data": "mds" if loader else "random",
    }

    setup = project_step(options, model_config, env)
    flops = model_flops_per_token(model_config, args.seq_len)
    peak = peak_flops(env.device, args.peak_tflops)
    project_peak = None if args.float8 else peak  # MFU is defined for bf16 matmuls only
    results |= rates("", time_steps(setup.step, batches, args, env), flops, project_peak)
    results |= profile_if_asked("", setup.step, batches, args, env)
    del setup
    release_memory(env.device)
    if args.baseline:
        step = baseline_step(options, model_config, env)
        results |= rates("baseline_", time_steps(step, batches, args, env), flops, peak)
        results |= profile_if_asked("baseline_", step, batches, args, env)
        results["speedup"] = results["tokens_per_s"] / results["baseline_tokens_per_s"]
        del step
        release_memory(env.device)
    if env.is_main:
        print_report(results)
        for label, prefix in (("project", ""), ("baseline", "baseline_")):
            if f"{prefix}profile" in results:
                print_profile(label, results[f"{prefix}profile"])
        if args.json:
            print(json.dumps(results), flush=True)


@dataclass
class ProjectSetup:
    step: Callable[[list[dict]], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparse: SparseTraining | None


def prepare_inputs(
    args: argparse.Namespace, env: DistEnv
) -> tuple[train.ModelOptions, PretrainedConfig, Any, Iterator[dict]]:
    """train.py's model options for these flags, the model config, the loader (None for random
    tokens) and the batches to time."""
    apply_device_defaults(args, env.device)
    options = model_options(args, env)
    train.check_hardware(options, env)
    loader = train.build_loader(args, env) if args.data_dir else None
    model_config = load_model_config(args.config, loader.vocab_size if loader else 0)
    train.check_seq_len(args, model_config)
    batches = iter(loader) if loader else synthetic_batches(args, model_config, env)
    return options, model_config, loader, batches


def model_options(args: argparse.Namespace, env: DistEnv) -> train.ModelOptions:
    """train.py's, from the same layout flags: bf16 on CUDA unless --fp32, fp32 on CPU."""
    bf16 = env.device.type == "cuda" and not args.fp32
    return train.ModelOptions.from_flags(args, torch.bfloat16 if bf16 else torch.float32)


def project_step(
    options: train.ModelOptions,
    model_config: PretrainedConfig,
    env: DistEnv,
    slt_config: SLTConfig | None = None,
) -> ProjectSetup:
    """train.py's model (sparse with `slt_config`), optimizer and step function."""
    torch.manual_seed(options.seed)
    model, sparse = train.build_model(options, model_config, env, slt_config)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    set_lr(optimizer, 1e-4)
    step_numbers = itertools.count(1)

    def step(micro_batches: list[dict]) -> None:
        if sparse:
            sparse.before_step(next(step_numbers))
        train.train_step(model, optimizer, None, micro_batches, env, 1.0, sparse)

    return ProjectSetup(step, model, optimizer, sparse)


def baseline_step(
    options: train.ModelOptions, model_config: PretrainedConfig, env: DistEnv
) -> Callable[[list[dict]], None]:
    """The reference: transformers' model and loss, FSDP2 per layer and root, each layer
    compiled on CUDA (compiling costs minutes on CPU), fused AdamW, gradient clipping."""
    torch.manual_seed(options.seed)
    with torch.device(env.device):
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")
    on_cuda = env.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=options.dtype, reduce_dtype=torch.float32)
    mesh = build_mesh(env, "full_shard")
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = torch.compile(layer) if on_cuda else layer
        fully_shard(layers[index], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=on_cuda)

    def step(micro_batches: list[dict]) -> None:
        for index, batch in enumerate(micro_batches):
            model.set_requires_gradient_sync(index == len(micro_batches) - 1)
            input_ids = batch["input_ids"].to(env.device, non_blocking=True)
            labels = batch["labels"].to(env.device, non_blocking=True)
            loss = model(input_ids=input_ids, labels=labels).loss / len(micro_batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synthetic_batches(
    args: argparse.Namespace, model_config: PretrainedConfig, env: DistEnv
) -> Iterator[dict]:
    """Random tokens, in pinned memory on CUDA as the loader delivers them."""
    generator = torch.Generator().manual_seed(args.seed + env.rank)
    shape = (args.local_batch, args.seq_len)
    pool = []
    for _ in range(SYNTHETIC_BATCHES):
        tokens = torch.randint(0, model_config.vocab_size, shape, generator=generator)
        tokens = tokens.pin_memory() if env.device.type == "cuda" else tokens
        pool.append({"input_ids": tokens, "labels": tokens})
    return itertools.cycle(pool)


def time_steps(
    step: Callable[[list[dict]], None],
    batches: Iterator[dict],
    args: argparse.Namespace,
    env: DistEnv,
) -> Timing:
    """Warm up, then time `args.steps` optimizer steps; the slowest rank's time counts."""
    for _ in range(args.warmup_steps):
        step([next(batches) for _ in range(args.accum_steps)])
    on_cuda = env.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        start_event, end_event = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start_event.record()
    start, data_wait, tokens = time.perf_counter(), 0.0, 0
    for _ in range(args.steps):
        wait_start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(args.accum_steps)]
        data_wait += time.perf_counter() - wait_start
        step(micro_batches)
        tokens += sum(map(token_count, micro_batches))
    if on_cuda:
        end_event.record()
        end_event.synchronize()
        elapsed = start_event.elapsed_time(end_event) / 1e3
    else:
        elapsed = time.perf_counter() - start
    slowest = torch.tensor([elapsed, data_wait / elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    elapsed, wait_fraction = slowest.tolist()
    return Timing(tokens / elapsed, elapsed / args.steps, wait_fraction, peak_memory_gb(env.device))


def profile_if_asked(
    prefix: str,
    step: Callable[[list[dict]], None],
    batches: Iterator[dict],
    args: argparse.Namespace,
    env: DistEnv,
) -> dict[str, dict]:
    """After the timed steps, so the profiler's overhead never reaches the timing."""
    if not args.profile:
        return {}
    summary = profile_steps(step, batches, args.profile, args.accum_steps, env.device)
    return {f"{prefix}profile": summary}


def rates(prefix: str, timing: Timing, flops: float, peak: float | None) -> dict[str, float | None]:
    return {
        f"{prefix}tokens_per_s": timing.tokens_per_s,
        f"{prefix}tflops": flops * timing.tokens_per_s / 1e12,
        f"{prefix}mfu": flops * timing.tokens_per_s / peak if peak else None,
        f"{prefix}peak_mem_gb": timing.peak_mem_gb,
        f"{prefix}data_wait_fraction": timing.data_wait_fraction,
        f"{prefix}step_time_s": timing.step_time_s,
    }


def release_memory(device: torch.device) -> None:
    """Free one setup's model, optimizer and compiled graphs before the next is built."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_report(results: dict) -> None:
    print(
        f"{results['config']} on {results['world_size']} x {results['device']}, seq "
        f"{results['seq_len']}, micro-batch {results['local_batch']} x {results['accum_steps']}, "
        f"{results['precision']}, compile {results['compile']}, chunked loss "
        f"{results['chunked_loss']}, checkpointing {results['activation_checkpointing']}, "
        f"attention {results['attention_kernel']}, {results['sharding_strategy']}, "
        f"{'float8 matmuls, ' if results['float8'] else ''}{results['data']} data"
    )
    print(f"| {'setup':<8} | {'tokens/s/GPU':>12} | {'TFLOP/s':>8} | {'MFU':>6} | "
          f"{'peak GB':>7} | {'data wait':>9} |")  # fmt: skip
    for label, prefix in (("project", ""), ("baseline", "baseline_")):
        if f"{prefix}tokens_per_s" not in results:
            continue
        mfu = results[f"{prefix}mfu"]
        print(
            f"| {label:<8} | {results[f'{prefix}tokens_per_s']:>12,.0f} | "
            f"{results[f'{prefix}tflops']:>8.2f} | "
            f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6} | "
            f"{results[f'{prefix}peak_mem_gb']:>7.2f} | "
            f"{100 * results[f'{prefix}data_wait_fraction']:>8.2f}% |"
        )
    if "speedup" in results:
        print(f"speedup over the baseline: {results['speedup']:.3f}x")


if __name__ == "__main__":
    main()
