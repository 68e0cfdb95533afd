"""Pretrain a Llama-family model with FSDP2 on MosaicML MDS data.

Launched by torchrun on every node (or as plain `python train.py` for one process). The recipe
reads top to bottom; each mechanism lives in its own module under utils/ and datas/.

Units: batches count sequences; --train_steps counts optimizer steps; one optimizer step runs
global_batch / (local_batch x world_size) micro-steps of local_batch sequences on every rank.
"""

from __future__ import annotations

import secrets
import sys
import time
from argparse import Namespace
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from datas import get_loader_builder
from datas.eval_sets import EvalSet, eval_specs_from_flags, evaluate_sets, load_eval_sets
from datas.eval_tasks import check_tasks, evaluate_tasks
from datas.packing import token_count
from slt import SLTConfig, SparseTraining, load_slt_config
from slt.config import check_dense_start
from utils.args import apply_device_defaults, grad_accum_steps, parse_args
from utils.attention import (
    AttentionFlags,
    attention_context,
    attention_implementation,
    check_attention_flags,
    document_attention_kwargs,
    set_attention_kernels,
)
from utils.checkpoint import Checkpointer, own_run_dir
from utils.distributed import (
    DistEnv,
    broadcast_from_main,
    build_mesh,
    init_distributed,
    shard_ways,
    shutdown,
)
from utils.errors import UserError, exit_on_user_error
from utils.float8 import check_float8, convert_to_float8
from utils.loss import model_nll_sum, predicted_token_count, use_chunked_loss
from utils.metrics import (
    LogWindow,
    MetricsLogger,
    RunProgress,
    WandbOptions,
    describe_memory,
    memory_estimate,
    model_flops_per_token,
    peak_flops,
    peak_memory_gb,
)
from utils.model import (
    build_meta_model,
    dense_parameters,
    init_weights,
    load_model_config,
    trainable_parameters,
)
from utils.nonfinite import NonFiniteGuard
from utils.optim import LRSchedule, build_optimizer, set_lr, skip_update_if
from utils.parallelize import build_grad_scaler, compute_dtype, parallelize_model
from utils.preemption import ExitPolicy
from utils.pretrained import check_initial_weights, load_initial_weights
from utils.profiling import RunProfiler


def main(argv: list[str] | None = None) -> None:
    """Bad input, found at any point, ends the run with one line and status 2 (utils.errors)."""
    with exit_on_user_error():
        args = parse_args(argv)
        env = init_distributed()
        try:
            run(args, env)
        finally:
            shutdown()


def run(args: Namespace, env: DistEnv) -> None:
    # ---- inputs: everything a bad flag can break is checked before the model is built ----
    accum_steps = grad_accum_steps(args.global_batch, args.local_batch, env.world_size)
    apply_device_defaults(args, env.device)
    options = ModelOptions.from_flags(args, compute_dtype(args.bf16, args.fp16), args.enable_flash)
    check_hardware(options, env)
    eval_specs = eval_specs_from_flags(args)
    if args.eval_tasks:
        check_tasks(args.eval_tasks.split(","), args.eval_tasks_include)
    loader = build_loader(args, env, holdout_samples=args.holdout_samples or 0)
    # Every document tokenized now, not at the first evaluation.
    eval_sets = load_eval_sets(eval_specs, args.tokenizer_dir, args.seq_len, loader.dataset)
    model_config = load_model_config(args.config, loader.vocab_size, loader.special_token_ids)
    check_seq_len(args, model_config)
    slt_config = load_slt_config(args.slt_config) if args.enable_slt else None
    if args.init_from:
        check_initial_weights(args.init_from, model_config)
        if slt_config:
            check_dense_start(slt_config)
    run_name = broadcast_from_main(args.run_name or default_run_name(args, model_config))
    run_dir = Path(args.output_dir) / run_name
    # One run at a time writes here, only adding to it (utils/checkpoint/rundir.py).
    with own_run_dir(run_dir, env, args.resume_dir, args.train_steps) as resume_dir:
        # ---- model: built on the meta device, sharded, then each rank materializes its shards
        torch.manual_seed(args.seed)
        model, sparse = build_model(options, model_config, env, slt_config)
        if args.init_from and resume_dir is None:  # a resumed run continues its own weights
            fresh = sparse.parameters_a_dense_start_lacks() if sparse else set()
            load_initial_weights(model, args.init_from, fresh)
        flops = model_flops_per_token(model_config, args.seq_len)
        optimizer = build_optimizer(
            model,
            lr=args.lr,
            weight_decay=args.weight_decay,
            fp16=args.fp16,
            betas=(args.beta1, args.beta2),
            eps=args.eps,
            own=sparse.own_parameters() if sparse else (),
            own_lr=args.slt_lr,
            own_weight_decay=args.slt_weight_decay,
        )
        schedule = LRSchedule(
            args.lr, args.min_lr, args.warmup, args.train_steps, args.lr_schedule,
            args.decay_fraction, args.decay_type,
        )  # fmt: skip
        scaler = build_grad_scaler(args.fp16, env.device)

        # ---- run state: resume, logging ----
        progress = RunProgress()
        window = LogWindow(env.device)  # the steps since the last log line
        checkpointer = Checkpointer(
            run_dir,
            args.ckpt_type,
            env,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            loader=loader,
            model_config=model_config,
            tokenizer_dir=Path(args.tokenizer_dir),
            sharding_strategy=args.sharding_strategy,
            keep_last=args.keep_last,
            async_save=args.async_save,
            components={"progress": progress, "log_window": window}
            | ({"slt": sparse} if sparse else {}),
        )
        start_step = 0
        if resume_dir is not None:
            start_step = checkpointer.load(resume_dir, skip_optimizer=args.skip_optimizer)
            if progress.tokens_seen is None:  # a checkpoint from before it was recorded
                progress.tokens_seen = start_step * args.global_batch * args.seq_len
            if resume_dir.parent.resolve() != run_dir.resolve():  # a branch: a W&B run of its own
                progress.wandb_run_id = None
            if env.is_main:
                print(f"resumed from {resume_dir} at step {start_step}", flush=True)
        exit_policy = ExitPolicy(args.exit_interval, args.exit_duration_mins)
        tensorboard_dir = None
        if args.enable_tensorboard:
            tensorboard_dir = Path(args.tensorboard_dir or Path(args.output_dir) / "tensorboard")
            tensorboard_dir = tensorboard_dir / run_name
        wandb = None
        if args.wandb_project:
            if progress.wandb_run_id is None:  # a new run; a resumed one continues its W&B run
                progress.wandb_run_id = broadcast_from_main(secrets.token_hex(4))
            wandb = WandbOptions(
                args.wandb_project, args.wandb_entity, args.wandb_run_name or run_name,
                args.wandb_group, progress.wandb_run_id,
            )  # fmt: skip
        logger = MetricsLogger(
            run_dir, tensorboard_dir, enabled=env.is_main, start_step=start_step, wandb=wandb
        )
        parameters = {"trainable": trainable_parameters(model)}
        if sparse:  # a sparse model's trainable count says little without its dense size
            parameters["dense_model"] = dense_parameters(model_config)
        logger.write_config(vars(args) | {"run_name": run_name}, model_config, parameters)
        guard = NonFiniteGuard(
            args.nonfinite, args.max_skipped, logger.event, checkpointer.checkpoint_before
        )
        peak = None if args.float8 else peak_flops(env.device, args.peak_tflops)  # no float8 MFU
        memory = memory_estimate(
            model_config,
            parameters["trainable"],
            shard_ways=shard_ways(env, args.sharding_strategy),
            tokens=args.local_batch * args.seq_len,
            activation_checkpointing=args.activation_checkpointing,
            chunked_loss=args.chunked_loss,
            compute_bytes=options.dtype.itemsize,
        )
        if env.is_main:
            print(
                f"run {run_name}: {describe_parameters(parameters)}, world size {env.world_size}, "
                f"{accum_steps} micro-steps of {args.local_batch} x {args.seq_len} tokens per step",
                flush=True,
            )
            print(describe_memory(memory), flush=True)
            if sparse:
                print(sparse.describe(), flush=True)

        # The starting point's perplexity: a pretrained model's, or that of the step resumed
        # from, whose evaluation came after its checkpoint (and may have been cut off).
        if evaluation_due(args, start_step) and (start_step or args.init_from):
            if sparse and start_step == 0:  # as step 1 will see it: a pruned model's own masks
                sparse.before_step(1)
            evaluate(model, eval_sets, args, env, logger, progress, step=start_step)

        # ---- the loop ----
        batches = iter(loader)
        bar = tqdm(
            total=args.train_steps,
            initial=start_step,
            unit="step",
            disable=not (env.is_main and sys.stdout.isatty()),  # plain lines in SLURM logs
        )
        profiler = RunProfiler(
            args.profile_steps, args.memory_snapshot, run_dir, env.rank, env.device
        )
        with profiler, checkpointer:  # a background save is published, also if the loop fails
            for step in range(start_step + 1, args.train_steps + 1):
                profiler.step_started(step)
                wait_start = time.perf_counter()
                micro_batches = [next(batches) for _ in range(accum_steps)]
                window.data_wait += time.perf_counter() - wait_start
                lr = schedule.lr_at(step)
                set_lr(optimizer, lr)
                if sparse:
                    sparse.before_step(step)
                result = train_step(
                    model, optimizer, scaler, micro_batches, env, args.grad_clip, sparse
                )
                profiler.step_finished(step)
                guard.record(step, result.skipped, result.loss, loader.position())
                window.add(result.loss, result.grad_norm, result.skipped, result.tokens)
                progress.tokens_seen += result.tokens
                bar.update()

                if step % args.log_every == 0 or step == args.train_steps:
                    stats = window.reduce_and_reset()
                    per_gpu = stats["tokens_per_s"] / env.world_size
                    stats |= {
                        "tokens_seen": progress.tokens_seen,
                        "lr": lr,
                        "tokens_per_s_per_gpu": per_gpu,
                        "mfu": flops * per_gpu / peak if peak else None,
                        "peak_mem_gb": peak_memory_gb(env.device),
                    }
                    if sparse:
                        stats |= sparse.measure(step)
                    logger.log(step, stats)
                stopping = exit_policy.should_exit(step)
                scheduled = args.save_every and (
                    step % args.save_every == 0 or step == args.train_steps
                )
                if scheduled or stopping:
                    guard.flush()  # a step that must stop the run is never saved
                    checkpointer.save(step, vars(args))
                # After the save, so a failing evaluation never costs the step its checkpoint; not
                # when preempted, where the time left is short.
                if evaluation_due(args, step) and not exit_policy.signalled:
                    eval_start = time.perf_counter()
                    evaluate(model, eval_sets, args, env, logger, progress, step)
                    window.paused += time.perf_counter() - eval_start
                if stopping:
                    if env.is_main:
                        tqdm.write(f"stopping after step {step} ({exit_policy.reason})")
                    break
        guard.flush()
        bar.close()
        logger.close()
        if env.is_main:
            print(f"done: checkpoints and metrics in {run_dir}", flush=True)
            if tensorboard_dir is not None:
                print(f"TensorBoard: tensorboard --logdir {tensorboard_dir}", flush=True)


def evaluate(
    model: nn.Module,
    eval_sets: list[EvalSet],
    args: Namespace,
    env: DistEnv,
    logger: MetricsLogger,
    progress: RunProgress,
    step: int,
) -> None:
    """What is due at `step`: the validation sets' perplexity and bits per byte at the run's
    --seq_len (datas/eval_sets.py), the lm-eval tasks (datas/eval_tasks.py); one record."""
    metrics = {}
    if sets_due(args, step):
        metrics |= evaluate_sets(
            model, eval_sets, batch_size=args.eval_batch, max_windows=args.eval_max_windows,
            device=env.device,
        )  # fmt: skip
    if tasks_due(args, step):
        metrics |= evaluate_tasks(
            model, args.tokenizer_dir, args.eval_tasks.split(","), seq_len=args.seq_len,
            batch_size=args.eval_batch, include_path=args.eval_tasks_include,
            limit=args.eval_tasks_limit, device=env.device,
        )  # fmt: skip
    logger.log(step, metrics | {"tokens_seen": progress.tokens_seen})


def evaluation_due(args: Namespace, step: int) -> bool:
    return sets_due(args, step) or tasks_due(args, step)


def sets_due(args: Namespace, step: int) -> bool:
    return bool(args.eval_every) and (step % args.eval_every == 0 or step == args.train_steps)


def tasks_due(args: Namespace, step: int) -> bool:
    every = args.eval_tasks_every
    return bool(every) and (step % every == 0 or step == args.train_steps)


def describe_parameters(parameters: dict[str, int]) -> str:
    line = f"{parameters['trainable'] / 1e6:.2f}M trainable parameters"
    if "dense_model" in parameters:
        line += f" ({parameters['dense_model'] / 1e6:.2f}M in the dense model)"
    return line


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    micro_batches: list[dict[str, torch.Tensor]],
    env: DistEnv,
    grad_clip: float,
    sparse: SparseTraining | None = None,
) -> StepResult:
    """One optimizer step over the global batch (see StepResult for what it returns).

    Each micro-batch's summed NLL is divided by the token count of the WHOLE global batch (all
    micro-steps, all ranks, padding excluded), and multiplied by the world size because FSDP
    averages gradients over ranks: the gradient is then exactly that of the token-weighted mean
    loss, however the batch is split. Gradients are reduced only after the last micro-step;
    terms that belong to the step rather than to the data (SR-STE's decay) are added once,
    after unscaling.
    """
    # One all-reduce on the host (gloo) before the forwards: the global counts of predicted
    # tokens (the loss's denominator) and of tokens (tokens_seen).
    counts = torch.tensor(
        [
            sum(predicted_token_count(b["labels"]) for b in micro_batches),
            sum(map(token_count, micro_batches)),
        ]
    )
    dist.all_reduce(counts)
    predicted, tokens = counts.tolist()
    loss_scale = env.world_size / predicted
    loss_sum = torch.zeros((), device=env.device)
    for index, batch in enumerate(micro_batches):
        model.set_requires_gradient_sync(index == len(micro_batches) - 1)
        labels = batch["labels"].to(env.device, non_blocking=True)
        with attention_context(model):
            inputs = model_inputs(batch, env.device, model.config._attn_implementation)
            nll = model_nll_sum(model, inputs, labels)
            loss = nll * loss_scale
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += nll.detach()
    if scaler:
        scaler.unscale_(optimizer)
    if sparse:
        sparse.add_decay_gradients()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else float("inf")
    )
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
    nonfinite = ~torch.isfinite(grad_norm)
    if scaler:  # skips a non-finite step itself, and lowers its scale
        scaler.step(optimizer)
        scaler.update()
    else:
        skip_update_if(optimizer, nonfinite)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum * loss_scale / env.world_size, grad_norm, nonfinite, tokens)


class StepResult(NamedTuple):
    loss: torch.Tensor  # this rank's share of the batch's mean loss, on the device
    grad_norm: torch.Tensor  # global, before clipping, on the device
    skipped: torch.Tensor  # the update was not applied: not finite (utils.nonfinite)
    tokens: int  # the global batch's tokens, padding excluded


def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device, attn_implementation: str
) -> dict[str, torch.Tensor | int]:
    """What the model reads from a batch. With --document_masking the loader adds position_ids
    restarting at each document, from which transformers builds a block-diagonal causal mask
    for SDPA; flash-attn gets the document boundaries for its variable-length kernel."""
    names = ("input_ids", "position_ids")
    inputs = {name: batch[name].to(device, non_blocking=True) for name in names if name in batch}
    if "position_ids" in batch:
        inputs |= document_attention_kwargs(batch["position_ids"], attn_implementation, device)
    return inputs


def build_loader(args: Namespace, env: DistEnv, holdout_samples: int = 0):
    """The training loader for the data flags; `holdout_samples` per source are never read."""
    if args.document_masking and args.strategy != "pack":
        raise UserError(
            f"--document_masking needs --strategy pack (a {args.strategy} row is one document)"
        )
    builder = get_loader_builder(args.data_name)
    return builder(
        mds_root=args.data_dir,
        strategy=args.strategy,
        tokenizer_name=args.tokenizer_dir,
        seq_len=args.seq_len,
        micro_blocks=args.local_batch,
        num_workers=args.num_workers,
        local_cache=args.local_cache_dir,
        shuffle_seed=args.seed,
        pin_memory=env.device.type == "cuda",
        world_size=env.world_size,
        global_rank=env.rank,
        num_canonical_nodes=args.num_canonical_nodes,
        emit_position_ids=args.document_masking,
        holdout_samples=holdout_samples,
    )


@dataclass(frozen=True)
class ModelOptions:
    """How the model is built, laid out and computed: train.py takes them from its flags,
    the benchmarks set them themselves."""

    attention: AttentionFlags
    dtype: torch.dtype = torch.float32
    sharding_strategy: str = "full_shard"
    activation_checkpointing: str = "none"
    compile: bool = False
    chunked_loss: bool = False
    float8: bool = False
    seed: int = 42

    @classmethod
    def from_flags(
        cls, args: Namespace, dtype: torch.dtype, enable_flash: bool = False
    ) -> ModelOptions:
        """From the layout flags train.py and bench.throughput share (add_layout_flags)."""
        return cls(
            attention=AttentionFlags(enable_flash, args.attention_kernel, args.document_masking),
            dtype=dtype,
            sharding_strategy=args.sharding_strategy,
            activation_checkpointing=args.activation_checkpointing,
            compile=args.compile,
            chunked_loss=args.chunked_loss,
            float8=args.float8,
            seed=args.seed,
        )


def build_model(
    options: ModelOptions, model_config, env: DistEnv, slt_config: SLTConfig | None = None
) -> tuple[nn.Module, SparseTraining | None]:
    """Meta model (with sparse projections and the chunked-loss head if asked), laid out by
    parallelize_model, then each rank materializes and initializes its shards.
    bench.throughput and bench.slt time this same model."""
    model = build_meta_model(model_config, attention_implementation(options.attention))
    set_attention_kernels(model, options.attention)
    sparse = SparseTraining(model, slt_config, options.dtype) if slt_config else None
    if options.float8:
        convert_to_float8(model)
    if options.chunked_loss:
        use_chunked_loss(model, compile_chunks=options.compile)
    parallelize_model(
        model,
        build_mesh(env, options.sharding_strategy),
        sharding_strategy=options.sharding_strategy,
        param_dtype=options.dtype,
        activation_checkpointing=options.activation_checkpointing,
        compile=options.compile,
    )
    init_weights(model, options.seed, env.device)
    return model, sparse


def check_hardware(options: ModelOptions, env: DistEnv) -> None:
    check_attention_flags(options.attention, options.dtype, env.device)
    if options.float8:
        check_float8(env.device)
    if options.dtype == torch.bfloat16 and env.device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise UserError("--bf16 is not supported on this GPU; use --fp16")


def check_seq_len(args: Namespace, model_config) -> None:
    limit = model_config.max_position_embeddings
    if args.seq_len > limit:
        raise UserError(
            f"--seq_len {args.seq_len} exceeds the model's max_position_embeddings {limit} "
            f"({args.config}); lower --seq_len or raise it in the config"
        )


def default_run_name(args: Namespace, model_config) -> str:
    shape = f"h{model_config.hidden_size}l{model_config.num_hidden_layers}"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{shape}-{args.strategy}-gb{args.global_batch}-lr{args.lr:g}-{stamp}"


if __name__ == "__main__":
    main()
