"""Command-line flags of train.py (the seed's names), an optional YAML/JSON args file, and checks
that need nothing but the flags. Checks that need the tokenizer or the model config live where
those are loaded."""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import math
import netrc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from utils.errors import ArgumentParser, UserError
from utils.files import why_not_writable
from utils.model import MAX_SEED  # streaming also refuses a negative seed
from utils.optim import DECAY_TYPES, LR_SCHEDULES, LRSchedule, decay_steps
from utils.profiling import step_range

if TYPE_CHECKING:
    import torch

SHARDING_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
CKPT_TYPES = ("shard", "full", "local")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
ATTENTION_KERNELS = ("auto", "flash", "cudnn", "efficient")  # utils/attention.py maps them
SPEED_SWITCHES = ("compile", "chunked_loss")
NONFINITE_POLICIES = ("skip", "stop")  # utils/nonfinite.py
DEFAULT_TRAIN_STEPS = 100_000
# Flags whose value is a file or directory: empty (the current directory, or nothing) is refused.
PATH_FLAGS = (
    "args_file", "data_dir", "local_cache_dir", "tokenizer_dir", "config", "init_from",
    "slt_config", "output_dir", "resume_dir", "tensorboard_dir", "eval_data",
    "eval_tasks_include",
)  # fmt: skip
# What W&B needs no login for (WANDB_MODE); its default server.
WANDB_NO_LOGIN_MODES = ("offline", "disabled", "dryrun")
WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="train.py",
        description="Pretrain a Llama with FSDP2 on MDS data. Batches count sequences; "
        "--train_steps counts optimizer steps; gradient accumulation = "
        "global_batch / (local_batch x world_size).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --train_step is a mistake, not --train_steps
    )
    p.add_argument("--args_file", help="YAML or JSON mapping of these flags (command line wins)")

    add_data_flags(p.add_argument_group("data"))

    model = p.add_argument_group("model")
    model.add_argument("--config", help="HF config.json, a directory holding one, or a shape name")
    model.add_argument(
        "--init_from",
        help="first weights: a transformers model directory or a step_<N> checkpoint (weights "
        "only; step 0, fresh optimizer); ignored when --resume_dir resumes",
    )
    model.add_argument("--enable_flash", action="store_true", help="flash attention kernels (GPU)")
    add_layout_flags(model)
    model.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master/reduce")
    model.add_argument("--fp16", action="store_true", help="fp16 compute with a grad scaler")
    model.add_argument(
        "--enable_slt", action="store_true", help="sparse projections (slt), see --slt_config"
    )
    model.add_argument("--slt_config", help="JSON file: slt method and settings (docs/sparse.md)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--global_batch", type=int, default=256, help="sequences per optimizer step")
    opt.add_argument(
        "--local_batch",
        type=int,
        default=8,
        help="sequences per rank per micro-step (8 x 2048 tokens: docs/performance.md)",
    )
    opt.add_argument(
        "--train_steps", type=int, help=f"optimizer steps (default {DEFAULT_TRAIN_STEPS:,})"
    )
    opt.add_argument(
        "--train_tokens",
        type=float,
        help="the budget in tokens instead: train_steps = ceil(tokens / (global_batch x seq_len))",
    )
    opt.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    opt.add_argument("--min_lr", type=float, default=3e-5, help="learning rate at the last step")
    opt.add_argument("--warmup", type=int, default=2000, help="linear warmup, optimizer steps")
    opt.add_argument(
        "--lr_schedule",
        default="cosine",
        choices=LR_SCHEDULES,
        help="after the warmup (docs/training.md#learning-rate-and-optimizer); wsd: "
        "warmup-stable-decay",
    )
    opt.add_argument(
        "--decay_fraction", type=float, default=0.2, help="wsd: share of the steps that decay"
    )
    opt.add_argument("--decay_type", default="linear", choices=DECAY_TYPES, help="wsd's decay")
    opt.add_argument("--weight_decay", type=float, default=0.1, help="AdamW, not on norms/biases")
    opt.add_argument("--beta1", type=float, default=0.9, help="AdamW")
    opt.add_argument("--beta2", type=float, default=0.95, help="AdamW")
    opt.add_argument("--eps", type=float, default=1e-8, help="AdamW")
    opt.add_argument(
        "--slt_lr", type=float, help="peak learning rate of the slt scores, factors and values"
    )
    opt.add_argument("--slt_weight_decay", type=float, help="weight decay of the same")
    opt.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm; 0 = off")
    opt.add_argument("--seed", type=int, default=42, help="weights, data order and dropout")
    opt.add_argument(
        "--nonfinite",
        default="skip",
        choices=NONFINITE_POLICIES,
        help="a step with NaN/inf loss or gradients is never applied; skip: go on (and stop "
        "after --max_skipped in a row), stop: stop at once; both stop without saving",
    )
    opt.add_argument(
        "--max_skipped", type=int, default=10, help="non-finite steps in a row that stop the run"
    )

    out = p.add_argument_group("checkpoints and logging")
    out.add_argument("--output_dir", default="runs", help="runs go to output_dir/run_name/")
    out.add_argument("--run_name", help="default: built from the main settings and the time")
    out.add_argument("--save_every", type=int, default=1000, help="optimizer steps; 0 = never")
    out.add_argument("--ckpt_type", default="shard", choices=CKPT_TYPES)
    out.add_argument(
        "--resume_dir",
        help="a step_<N> directory, or 'auto': the run's newest complete checkpoint, if any "
        "(needs --run_name; re-submit the same command after a preemption)",
    )
    out.add_argument("--skip_optimizer", action="store_true", help="resume weights and step only")
    out.add_argument("--keep_last", type=int, default=0, help="keep K newest checkpoints; 0 = all")
    out.add_argument("--async_save", action="store_true", help="shard: write in the background")
    out.add_argument("--exit_interval", type=int, default=0, help="save and exit every N steps")
    out.add_argument(
        "--exit_duration_mins", type=float, default=0, help="save and exit after M min"
    )
    out.add_argument("--log_every", type=int, default=10, help="optimizer steps between log lines")
    out.add_argument("--enable_tensorboard", action="store_true")
    out.add_argument("--peak_tflops", type=float, help="device bf16 peak for MFU (default: by GPU)")

    profiling = p.add_argument_group("profiling (docs/performance.md#profiling-a-run)")
    profiling.add_argument(
        "--profile_steps",
        type=_profile_steps,
        help="A:B: trace optimizer steps A to B with torch.profiler, a Chrome trace per rank in "
        "RUN_DIR/profile/",
    )
    profiling.add_argument(
        "--memory_snapshot",
        action="store_true",
        help="CUDA: record the allocator's history; dump it on out-of-memory and at the end of "
        "--profile_steps into RUN_DIR/memory_snapshot/",
    )

    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--eval_every", type=int, default=0, help="optimizer steps; 0 = never")
    evaluation.add_argument(
        "--eval_data",
        nargs="+",
        help="validation sets, NAME=PATH each (C4-format files, Arrow or MDS directory; a plain "
        "PATH is named c4), or NAME=train_holdout for samples training never reads",
    )
    evaluation.add_argument(
        "--holdout_samples",
        type=int,
        help="train_holdout: the last N samples of every training source (default 1000)",
    )
    evaluation.add_argument("--eval_max_windows", type=int, help="seeded subset of the windows")
    evaluation.add_argument(
        "--eval_batch", type=int, default=8, help="windows per forward, per rank"
    )
    evaluation.add_argument(
        "--eval_tasks",
        help="lm-eval tasks, comma-separated, e.g. hellaswag,arc_easy (pip install '.[eval]')",
    )
    evaluation.add_argument(
        "--eval_tasks_every", type=int, default=0, help="optimizer steps between task runs"
    )
    evaluation.add_argument("--eval_tasks_include", help="directory of your own task YAMLs")
    evaluation.add_argument("--eval_tasks_limit", type=int, help="at most N examples per task")
    out.add_argument("--tensorboard_dir", help="default: output_dir/tensorboard")
    out.add_argument(
        "--wandb_project",
        help="also log to this Weights & Biases project (pip install '.[wandb]'); a resumed "
        "run keeps writing to its W&B run",
    )
    out.add_argument("--wandb_entity", help="W&B team or user (default: yours)")
    out.add_argument("--wandb_run_name", help="W&B display name (default: --run_name)")
    out.add_argument("--wandb_group", help="W&B group, e.g. one sweep")
    return p


def _profile_steps(text: str) -> tuple[int, int]:
    """step_range, whose message quotes the text as is: a line break in it stays visible."""
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B (e.g. 10:12)")
    return step_range(text)


def add_data_flags(group: argparse._ActionsContainer) -> None:
    """The loader's flags, shared by train.py and bench.throughput."""
    group.add_argument("--data_dir", help="MDS dataset dir or remote; mix as 'a:0.7,b:0.3'")
    group.add_argument("--data_name", default="FineWeb-Edu", help="loader registered in datas/")
    group.add_argument("--local_cache_dir", help="per-node cache; data_dir is then read as remote")
    group.add_argument("--tokenizer_dir", help="transformers tokenizer directory")
    group.add_argument(
        "--strategy", default="pack", help="pack, overflow or trunc (docs/data.md#strategies)"
    )
    group.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    group.add_argument("--num_workers", type=int, default=2, help="loader workers per rank")
    group.add_argument(
        "--num_canonical_nodes", type=int, default=64, help="streaming's sample order"
    )
    group.add_argument(
        "--document_masking",
        action="store_true",
        help="pack: tokens attend only within their own document (positions restart there)",
    )


def add_layout_flags(group: argparse._ActionsContainer) -> None:
    """Sharding and the speed options, shared by train.py and bench.throughput. The switches
    default to None: `apply_device_defaults` turns them on for CUDA and off for CPU."""
    group.add_argument("--sharding_strategy", default="full_shard", choices=SHARDING_STRATEGIES)
    group.add_argument(
        "--activation_checkpointing",
        nargs="?",
        const="full",
        default="none",
        choices=ACTIVATION_CHECKPOINTING,
        help="recompute in backward: each whole decoder layer (full; the bare flag), or only "
        "its element-wise operations, keeping matmul and attention outputs (selective)",
    )
    group.add_argument(
        "--enable_ckpt",
        dest="activation_checkpointing",
        action="store_const",
        const="full",
        default=argparse.SUPPRESS,
        help="the same as --activation_checkpointing full",
    )
    group.add_argument(
        "--attention_kernel",
        default="auto",
        choices=ATTENTION_KERNELS,
        help="SDPA backend tried first (CUDA); auto: PyTorch's order (flash, efficient, math, "
        "cudnn)",
    )
    group.add_argument(
        "--float8",
        action="store_true",
        help="decoder-layer matmuls in float8 through torchao (H100/H200; MFU not reported)",
    )
    _add_switch(group, "compile", "torch.compile each decoder layer")
    _add_switch(group, "chunked_loss", "loss over chunks of tokens, never the batch's logits")


def _add_switch(group: argparse._ActionsContainer, name: str, help: str) -> None:
    """`--name` / `--no_name`, None when neither is given."""
    help = f"{help}; None: on with CUDA, off on CPU"
    group.add_argument(f"--{name}", action="store_true", default=None, help=help)
    group.add_argument(
        f"--no_{name}", dest=name, action="store_false", default=argparse.SUPPRESS, help="off"
    )


def apply_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """The speed switches not given on the command line: on for CUDA, off elsewhere (compiling
    costs more than it saves on CPU, and the chunked loss pays off with large batches)."""
    for switch in SPEED_SWITCHES:
        if getattr(args, switch) is None:
            setattr(args, switch, device.type == "cuda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with those of --args_file in front of the command line's (which win). A
    mistake here depends on the command line and the node's files only, so every rank of a
    node finds the same one: the UserError says so (`every_rank`, utils/errors.py)."""
    try:
        args = _parse_and_check(argv)
    except UserError as err:
        err.every_rank = True
        raise
    warning = schedule_warning(args)
    if warning and os.environ.get("RANK", "0") == "0":  # once, not once per rank
        print(warning, file=sys.stderr, flush=True)
    return args


def _parse_and_check(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args_file = parser.parse_args(argv).args_file
    if args_file is not None:
        _check_text("args_file", args_file)
        tokens = _args_file_tokens(args_file, parser)
        try:
            parser.parse_args(tokens)
        except UserError as err:
            raise UserError(f"--args_file {_shown(args_file)}: {err}") from err
        argv = tokens + argv
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def schedule_warning(args: argparse.Namespace) -> str | None:
    """One line when the learning-rate schedule cannot be what the flags ask, or None. Not an
    error: short test runs keep the default --warmup 2000 on purpose."""
    warmup, steps = args.warmup, args.train_steps
    if warmup >= steps:
        ends = LRSchedule(args.lr, args.min_lr, warmup, steps).lr_at(steps)
        decays = "" if args.lr_schedule == "constant" else " and never decays to --min_lr"
        return (
            f"warning: --warmup {warmup} >= --train_steps {steps}: the learning rate never "
            f"reaches --lr {args.lr:g} before the last step{decays} (it ends at {ends:.3g}); "
            "lower --warmup for a run this short"
        )
    if args.lr_schedule == "wsd":
        asked = decay_steps(args.decay_fraction, steps)
        if warmup > steps - asked:
            return (
                f"warning: --lr_schedule wsd: a decay of {asked} steps (--decay_fraction "
                f"{args.decay_fraction:g} of {steps}) would start inside --warmup {warmup}; "
                f"it decays over the {steps - warmup} steps after the warmup instead"
            )
    return None


def _args_file_tokens(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The file's flags as command-line tokens: its values then pass exactly the checks the
    command line's do (types, choices); an on/off flag takes true or false, nothing else."""
    values = _read_mapping(path)
    for key in values:
        if not isinstance(key, str):
            raise UserError(
                f"--args_file {_shown(path)}: key {key!r} is not a flag name (YAML reads it as "
                f"{type(key).__name__}); write the flag's name, e.g. 'lr: 0.001'"
            )
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "args_file"):
            actions.setdefault(action.dest, []).append(action)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(
            f"--args_file {_shown(path)} has unknown flags {unknown}; see train.py --help"
        )
    tokens = []
    for dest, value in values.items():
        if value is None:
            continue
        switches = [a for a in actions[dest] if isinstance(a.const, bool) and a.nargs == 0]
        if switches:
            if not isinstance(value, bool):
                raise UserError(
                    f"--args_file {_shown(path)}: {dest} must be true or false (got {value!r})"
                )
            tokens += [a.option_strings[0] for a in switches if a.const is value][:1]
        elif isinstance(value, list) and _takes_several(actions[dest]):
            _check_list_items(path, dest, value)
            tokens += [actions[dest][0].option_strings[0], *map(str, value)]
        elif isinstance(value, dict | list | bool):
            raise UserError(f"--args_file {_shown(path)}: {dest} takes one value (got {value!r})")
        else:
            option = next(a for a in actions[dest] if a.nargs != 0).option_strings[0]
            tokens.append(f"{option}={value}")
    return tokens


def _takes_several(actions: list[argparse.Action]) -> bool:
    return any(action.nargs == "+" for action in actions)


def _check_list_items(path: str, dest: str, value: list) -> None:
    """A list for a flag of several values: plain values, at least one."""
    if not value or any(isinstance(item, dict | list | bool) or item is None for item in value):
        raise UserError(
            f"--args_file {_shown(path)}: {dest} takes a list of plain values (got {value!r})"
        )


class _DuplicateKey(Exception):
    """A mapping of the args file names one key twice (YAML and JSON would keep the last)."""

    def __init__(self, key: object, where: str = "") -> None:
        super().__init__(key, where)
        self.key, self.where = key, where


class _FlagLoader(yaml.SafeLoader):
    """YAML whose plain values stay text, for the flags to convert as the command line's:
    only true/false and null are read as such (YAML 1.1 makes 10:11 the number 611, and 010
    the number 8). A key given twice is refused, not the last one kept."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag.endswith((":bool", ":null"))]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # unhashable: the base class refuses it
                continue
            if first is not None:  # also on one line: {lr: 1, lr: 2}
                where = f"both on line {line}" if first == line else f"lines {first} and {line}"
                raise _DuplicateKey(key, f" ({where})")
            lines[key] = line
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: a key given twice is refused, not the last one kept."""
    values: dict = {}
    for key, value in pairs:
        if key in values:
            raise _DuplicateKey(key)
        values[key] = value
    return values


def _read_mapping(path: str) -> dict:
    file, shown = Path(path), _shown(path)
    if not file.is_file():
        raise UserError(f"--args_file {shown} does not exist; give a YAML or JSON file of flags")
    try:
        text = file.read_text()
        if file.suffix == ".json":
            values = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            values = yaml.load(text, _FlagLoader)
    except _DuplicateKey as err:
        raise UserError(
            f"--args_file {shown}: {err.key!r} is set twice{err.where}; keep one"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"--args_file {shown} is not valid YAML or JSON ({reason})") from err
    if not isinstance(values, dict):
        raise UserError(f"--args_file {shown} must hold a mapping of flag names to values")
    return values


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> None:
    """Checks that need only the flags: run before anything is loaded."""
    for action in (parser or build_parser())._actions:
        value = getattr(args, action.dest, None)
        for text in value if isinstance(value, list) else [value]:  # nargs="+": each value
            if isinstance(text, str) and action.choices is None and action.dest != "run_name":
                _check_text(action.dest, text)  # --run_name: _check_run_name
    for flag in ("data_dir", "tokenizer_dir", "config"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required")
    _check_ranges(args)  # first: the budget divides by --global_batch x --seq_len
    _resolve_budget(args)
    if args.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise UserError(
            f"--activation_checkpointing {args.activation_checkpointing} is not one of "
            f"{', '.join(ACTIVATION_CHECKPOINTING)}"
        )
    if args.bf16 and args.fp16:
        raise UserError("--bf16 and --fp16 exclude each other; pick one")
    if args.fp16 and args.nonfinite == "stop":
        raise UserError(
            "--nonfinite stop does not go with --fp16: fp16's loss scaling skips overflowing "
            "steps by design; use --nonfinite skip (--max_skipped bounds a run of them)"
        )
    tokenizer = Path(args.tokenizer_dir)
    if not tokenizer.is_dir():
        raise UserError(
            f"--tokenizer_dir {_shown(args.tokenizer_dir)} is not a directory; give a tokenizer "
            "directory"
        )
    _check_writable_dir(Path(args.output_dir), "--output_dir")
    if args.local_cache_dir and "://" not in args.local_cache_dir:
        _check_writable_dir(Path(args.local_cache_dir), "--local_cache_dir")
    if args.tensorboard_dir is not None and not args.enable_tensorboard:
        raise UserError("--tensorboard_dir: give --enable_tensorboard too (TensorBoard is off)")
    if args.enable_tensorboard and args.tensorboard_dir:
        _check_writable_dir(Path(args.tensorboard_dir), "--tensorboard_dir")
    if args.resume_dir == "auto" and not args.run_name:
        raise UserError("--resume_dir auto needs --run_name, to know which run to continue")
    if args.run_name is not None:
        _check_run_name(args)
    if args.resume_dir not in (None, "auto"):
        if not (Path(args.resume_dir) / "trainer.pt").is_file():
            raise UserError(
                f"--resume_dir {_shown(args.resume_dir)} is not a complete checkpoint (no "
                "trainer.pt); give a step_<N> directory or 'auto'"
            )
    if args.skip_optimizer and args.resume_dir is None:
        raise UserError("--skip_optimizer: give --resume_dir too (nothing is resumed)")
    if args.eval_every and not args.eval_data:
        raise UserError("--eval_every needs --eval_data (C4 validation files; docs/eval.md)")
    if args.eval_data is not None and not args.eval_every:
        raise UserError("--eval_data: give --eval_every too (evaluation is off)")
    if args.eval_tasks is not None:
        names = [name.strip() for name in args.eval_tasks.split(",")]
        if not all(names):
            raise UserError(
                f"--eval_tasks {args.eval_tasks!r} has an empty name; give names separated by "
                "commas, e.g. hellaswag,arc_easy"
            )
        args.eval_tasks = ",".join(names)
    if bool(args.eval_tasks) != bool(args.eval_tasks_every):
        raise UserError("--eval_tasks and --eval_tasks_every go together; give both or neither")
    named = [f"--{k}" for k in ("eval_tasks_include", "eval_tasks_limit") if getattr(args, k)]
    if named and not args.eval_tasks:
        raise UserError(f"{', '.join(named)}: give --eval_tasks too (task evaluation is off)")
    if args.profile_steps is not None and args.profile_steps[1] > args.train_steps:
        first, last = args.profile_steps
        raise UserError(
            f"--profile_steps {first}:{last} ends after the last step, {args.train_steps} "
            "(--train_steps or --train_tokens): steps past it are never traced; end it there "
            "or before"
        )
    if args.enable_slt != bool(args.slt_config):
        raise UserError("--enable_slt and --slt_config go together; give both or neither")
    if (args.slt_lr is not None or args.slt_weight_decay is not None) and not args.enable_slt:
        raise UserError("--slt_lr and --slt_weight_decay need --enable_slt")
    if args.enable_slt and args.float8:
        raise UserError(
            "--float8 and --enable_slt exclude each other (sparse layers are not float8)"
        )
    if args.async_save and args.ckpt_type != "shard":
        raise UserError("--async_save works with --ckpt_type shard only")
    _check_wandb(args)


# Numbers a flag may take; the float flags must also be finite.
POSITIVE = (
    "global_batch", "local_batch", "train_steps", "train_tokens", "log_every", "max_skipped",
    "eval_batch", "num_canonical_nodes", "lr", "eval_max_windows", "peak_tflops", "eps",
    "slt_lr", "holdout_samples", "eval_tasks_limit",
)  # fmt: skip
NON_NEGATIVE = (
    "min_lr", "warmup", "weight_decay", "grad_clip", "save_every", "keep_last", "exit_interval",
    "exit_duration_mins", "eval_every", "num_workers", "slt_weight_decay", "eval_tasks_every",
)  # fmt: skip
BELOW_ONE = ("beta1", "beta2")  # and zero or more


def _check_wandb(args: argparse.Namespace) -> None:
    named = [
        f"--{k}" for k in ("wandb_entity", "wandb_run_name", "wandb_group") if getattr(args, k)
    ]
    if named and not args.wandb_project:
        raise UserError(f"{', '.join(named)}: give --wandb_project too (W&B logging is off)")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb_project needs the wandb package: pip install '.[wandb]'")
    if args.wandb_project and not wandb_can_log():
        raise UserError(
            "--wandb_project: this machine has no W&B login; run `wandb login` (or set "
            "WANDB_API_KEY), or set WANDB_MODE=offline to log locally"
        )


def wandb_can_log() -> bool:
    """Whether wandb.init would find what it needs, decided as wandb 0.2x/0.3x does without
    importing it (wandb/sdk/lib/wbauth: authenticate.py, wbnetrc.py): a mode that needs no
    login (WANDB_MODE or the settings files' `mode`), WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE, an `api_key` in the settings files, or a .netrc entry for the
    W&B host (WANDB_BASE_URL, the settings files' `base_url`, or api.wandb.ai)."""
    settings = _wandb_settings()
    mode = os.environ.get("WANDB_MODE") or settings.get("mode", "")
    if mode.strip().lower() in WANDB_NO_LOGIN_MODES:
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if settings.get("api_key"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or settings.get("base_url")
    base_url = base_url or WANDB_DEFAULT_BASE_URL
    host = urlsplit(base_url.strip().rstrip("/")).netloc
    return bool(host) and _netrc_has_password(host)


def _wandb_settings() -> dict[str, str]:
    """The [default] section of W&B's global settings file, then its workspace one's."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser()
    workspace = Path(os.environ.get("WANDB_DIR") or ".") / "wandb"
    settings: dict[str, str] = {}
    for file in (Path(config_dir) / "settings", workspace / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(file)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section("default"):
            settings.update(parser["default"])
    return settings


def _netrc_has_password(host: str) -> bool:
    """As wandb reads it: $NETRC, else ~/.netrc, else ~/_netrc; unreadable means none."""
    path = os.environ.get("NETRC")
    if path:
        file = Path(path).expanduser()
    else:
        home = Path("~").expanduser()
        file = next((f for f in (home / ".netrc", home / "_netrc") if f.exists()), home / ".netrc")
    try:
        entry = netrc.netrc(file).authenticators(host)
    except (netrc.NetrcParseError, OSError, UnicodeDecodeError):
        return False
    return bool(entry and entry[2])


def _resolve_budget(args: argparse.Namespace) -> None:
    """--train_steps, or the steps that --train_tokens takes, or the default."""
    if args.train_tokens is not None and args.train_steps is not None:
        raise UserError("--train_steps and --train_tokens both set the budget; give one")
    if args.train_tokens is not None and args.train_tokens > 0:
        tokens_per_step = args.global_batch * args.seq_len
        args.train_steps = max(math.ceil(args.train_tokens / tokens_per_step), 1)
    elif args.train_steps is None:
        args.train_steps = DEFAULT_TRAIN_STEPS


def _check_ranges(args: argparse.Namespace) -> None:
    for flag in (*POSITIVE, *NON_NEGATIVE):
        value = getattr(args, flag)
        if value is None:  # optional, not given
            continue
        bad = not math.isfinite(value) or (value <= 0 if flag in POSITIVE else value < 0)
        if bad:
            kind = "positive" if flag in POSITIVE else "zero or more"
            raise UserError(f"--{flag} must be {kind} (got {value})")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be from 0 to {MAX_SEED} (got {args.seed})")
    for flag in BELOW_ONE:
        if not 0 <= getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be in [0, 1) (got {getattr(args, flag)})")
    if not 0 < args.decay_fraction <= 1:
        raise UserError(f"--decay_fraction must be in (0, 1] (got {args.decay_fraction})")
    if args.seq_len < 2:
        raise UserError(f"--seq_len must be at least 2, a token and the next (got {args.seq_len})")
    if args.min_lr > args.lr:
        raise UserError(f"--min_lr {args.min_lr} is above --lr {args.lr}; lower it")


def _check_run_name(args: argparse.Namespace) -> None:
    """A plain name: the run lives in output_dir/run_name (what it may do there:
    utils/checkpoint/rundir.py)."""
    name = args.run_name
    if not name or name in (".", "..") or any(sep in name for sep in "/\\"):
        raise UserError(f"--run_name {name!r} must be a plain name, without / or \\")


def _check_text(dest: str, value: str) -> None:
    """A flag's text: never empty (an empty path is the current directory, or nothing), never
    a NUL (no path holds one; an args file can write it)."""
    if not value.strip():
        what = "path" if dest in PATH_FLAGS else "value"
        raise UserError(f"--{dest} is empty or blank; give a {what}, or leave the flag out")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise UserError(f"--{dest} {value!r} is not a valid file name or text") from None
    if "\0" in value:
        raise UserError(f"--{dest} {value!r} holds a NUL character; give a plain name")


def _shown(text: str) -> str:
    """A user's text in a one-line message: as is, or quoted when it holds a line break or
    another unprintable character."""
    return text if text.isprintable() else repr(text)


def _check_writable_dir(path: Path, flag: str) -> None:
    reason = why_not_writable(path)
    if reason:
        raise UserError(
            f"{flag} {_shown(str(path))} is not writable ({reason}); choose a directory you can "
            "write to"
        )


def grad_accum_steps(global_batch: int, local_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step; the three numbers must divide exactly."""
    per_micro_step = local_batch * world_size
    if global_batch % per_micro_step:
        raise UserError(
            f"--global_batch {global_batch} is not divisible by --local_batch {local_batch} x "
            f"world size {world_size} = {per_micro_step}; change one of them"
        )
    return global_batch // per_micro_step
