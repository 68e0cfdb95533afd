"""What a run reports: console lines, metrics.jsonl, config.json, TensorBoard, Weights &
Biases, and MFU."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import PretrainedConfig

from utils.model import dense_parameters

METRICS_FILE = "metrics.jsonl"  # the run directory's records and arguments
CONFIG_FILE = "config.json"

# Dense bf16 peak FLOP/s by GPU name (never the 2:4-sparse datasheet figure).
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def flops_per_token(config: PretrainedConfig, non_embedding_params: int, seq_len: int) -> float:
    """6N for the matmuls (forward + backward) plus 12*L*H*Q*T for attention scores."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * non_embedding_params + attention


def model_flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """flops_per_token of the dense model of `config`, whose N is every weight a token is
    multiplied by: the parameters but the input embedding (a lookup), the output head
    included even when it is the embedding's own tensor (tied). Sparse (slt) runs count the
    same: their layers multiply by a full-size effective weight."""
    matmul_parameters = dense_parameters(config, exclude_embedding=True)
    if getattr(config, "tie_word_embeddings", False):
        matmul_parameters += config.vocab_size * config.hidden_size
    return flops_per_token(config, matmul_parameters, seq_len)


# Bytes a token keeps per decoder layer for backward, in hidden sizes, at 2-byte compute
# (Korthikanti et al. 2022, "Reducing activation recomputation", without the attention scores,
# which the flash and memory-efficient kernels never store). Selective checkpointing keeps the
# matmul and attention outputs (counted from the shapes below) instead.
ACTIVATION_BYTES_PER_HIDDEN = 34


def memory_estimate(
    config: PretrainedConfig,
    trainable: int,
    *,
    shard_ways: int,
    tokens: int,
    activation_checkpointing: str,
    chunked_loss: bool,
    compute_bytes: int,
) -> dict[str, float]:
    """A first estimate of what each GPU holds, in GB: fp32 master weights, gradients and
    AdamW's two moments of `trainable` parameters, sharded `shard_ways` ways (FSDP2 keeps them
    so); and the activations backward keeps of one micro-batch of `tokens` tokens per rank:
    every layer's (input only with full checkpointing, plus the layer being recomputed), and
    the output logits in fp32 with their gradient unless the loss is chunked. Buffers, the
    gathered layers and the allocator's slack come on top."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (
        getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    )
    whole_layer = ACTIVATION_BYTES_PER_HIDDEN * hidden * compute_bytes / 2
    per_layer = {
        "none": whole_layer,
        "full": hidden * compute_bytes,
        # q, attention, o and down outputs (4 hidden), k and v, gate and up; plus the input
        "selective": (5 * hidden + 2 * kv + 2 * config.intermediate_size) * compute_bytes,
    }[activation_checkpointing]
    recomputed = whole_layer if activation_checkpointing == "full" else 0
    logits = 0 if chunked_loss else 2 * 4 * config.vocab_size
    sharded = trainable * 4 / shard_ways
    gb = 1e9
    return {
        "parameters": sharded / gb,
        "gradients": sharded / gb,
        "optimizer": 2 * sharded / gb,
        "activations": tokens * (layers * per_layer + recomputed + logits) / gb,
    }


def describe_memory(estimate: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {size:.2f} GB" for name, size in estimate.items())
    return f"memory per GPU, estimated: {parts}; {sum(estimate.values()):.2f} GB in all"


# metrics.jsonl key -> TensorBoard and W&B name, where they differ; others: _tag.
TENSORBOARD_TAGS = {
    "tokens_per_s": "train/tokens_per_second",
    "tokens_per_s_per_gpu": "train/tokens_per_second_per_gpu",
}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak, or None where MFU is not defined (CPU, unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory on GPU; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes * 1024 / 1e9 if sys.platform != "darwin" else kilobytes / 1e9


@dataclass
class RunProgress:
    """What a run has done beyond its step count, saved in every checkpoint (the "progress"
    component): the tokens it trained on, global and padding excluded (None when resumed from
    a checkpoint older than this record), and its Weights & Biases run id, so that a resumed
    run continues both."""

    tokens_seen: int | None = 0
    wandb_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any] | None, source: str) -> None:
        state = state or {"tokens_seen": None, "wandb_run_id": None}
        self.tokens_seen, self.wandb_run_id = state["tokens_seen"], state["wandb_run_id"]


class LogWindow:
    """The steps between two log lines, kept on the device (no host sync per step): each
    step's loss (this rank's share until `settle` sums it over ranks), gradient norm and
    skipped flag. Skipped steps (not finite) are counted, and left out of the loss and norm.

    Saved in every checkpoint (the "log_window" component): a run stopped between two log
    lines and resumed logs the records an uninterrupted run logs, since both reduce the same
    per-step values in the same order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.settled = torch.zeros((3, 0), device=self.device)  # loss, grad norm, skipped
        self.pending: list[torch.Tensor] = []
        self.tokens = 0
        self.data_wait = 0.0
        self.paused = 0.0  # evaluation time, not training time
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor, tokens: int):
        self.pending.append(torch.stack([loss.float(), grad_norm.float(), skipped.float()]))
        self.tokens += tokens

    def settle(self) -> None:
        """A collective: the pending steps' losses summed over ranks (one all-reduce)."""
        if not self.pending:
            return
        steps = torch.stack(self.pending, dim=1)
        dist.all_reduce(steps[0])
        self.settled = torch.cat([self.settled, steps], dim=1)
        self.pending = []

    def reduce_and_reset(self) -> dict[str, float | None]:
        """A collective; one read of the device."""
        self.settle()
        loss, grad_norm, skipped = self.settled
        applied_mask = skipped == 0
        sums = torch.stack(
            [loss[applied_mask].sum(), (grad_norm[applied_mask] ** 2).sum(), skipped.sum()]
        )
        loss_sum, grad_norm_sq, skipped_count = sums.tolist()
        steps = self.settled.shape[1]
        applied = steps - int(skipped_count)
        elapsed = time.perf_counter() - self.start - self.paused
        stats = {
            "loss": loss_sum / applied if applied else None,
            "grad_norm": math.sqrt(grad_norm_sq / applied) if applied else None,
            "skipped_steps": int(skipped_count),
            "tokens_per_s": self.tokens / elapsed,
            "step_time": elapsed / steps,
            "data_wait_fraction": self.data_wait / elapsed,
        }
        self._reset()
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Taken on every rank (a collective) before a save."""
        self.settle()
        return {
            "steps": self.settled.cpu(),
            "tokens": self.tokens,
            "data_wait": self.data_wait,
            "elapsed": time.perf_counter() - self.start - self.paused,
        }

    def load_state_dict(self, state: dict[str, Any] | None, source: str) -> None:
        """A checkpoint from before the window was saved resumes with an empty window."""
        self._reset()
        if state is None:
            return
        self.settled = state["steps"].to(self.device)
        self.tokens = state["tokens"]
        self.data_wait = state["data_wait"]
        self.start -= state["elapsed"]


@dataclass
class WandbOptions:
    """Where a run logs in Weights & Biases (--wandb_*); `run_id` comes from the checkpoint
    when the run resumes (RunProgress), so the W&B run continues too."""

    project: str
    entity: str | None
    name: str
    group: str | None
    run_id: str


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so callers need no `if`.
    A run that resumes at `start_step` continues its records: those of later steps (written
    after that checkpoint by the run that went on, or by an earlier branch) move from
    metrics.jsonl to metrics.dropped.jsonl, and TensorBoard hides its events of those steps
    (`purge_step`), so no step is logged twice. W&B cannot take a step back: it keeps the
    first values of those steps (the same values, when the run resumed exactly) and ignores
    the repeated ones."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard_dir: Path | None,
        enabled: bool,
        start_step: int = 0,
        wandb: WandbOptions | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A run that starts again at step 0 keeps no record (its step-0 evaluation comes again).
        _drop_records_after(run_dir / METRICS_FILE, start_step if start_step else -1)
        self.jsonl = (run_dir / METRICS_FILE).open("a", buffering=1)
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1)
        if wandb is not None:
            import wandb as wandb_sdk

            self.wandb = wandb_sdk.init(
                project=wandb.project, entity=wandb.entity, name=wandb.name, group=wandb.group,
                id=wandb.run_id, resume="allow", dir=str(run_dir),
            )  # fmt: skip

    def write_config(
        self, args: dict[str, Any], model_config: PretrainedConfig, parameters: dict[str, int]
    ) -> None:
        if not self.enabled:
            return
        record = {"args": args, "model": model_config.to_dict(), "parameters": parameters}
        record["earlier_args"] = _earlier_args(self.run_dir / CONFIG_FILE)
        text = json.dumps(record, indent=2, default=str)
        partial = self.run_dir / ".config.json.tmp"  # a kill mid-write keeps the old record
        partial.write_text(text)
        partial.replace(self.run_dir / CONFIG_FILE)
        if self.writer is not None:
            self.writer.add_text("args", "\n".join(f"    {k}: {v}" for k, v in args.items()))
        if self.wandb is not None:
            plain = json.loads(json.dumps(record, default=str))  # paths and dtypes as text
            self.wandb.config.update(plain, allow_val_change=True)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """Keys without a slash are training metrics (`train/<key>` in TensorBoard and W&B);
        others, such as `eval/c4_ppl`, keep their name everywhere."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        tqdm.write(format_line(record))
        tagged = {_tag(key): value for key, value in metrics.items() if value is not None}
        if self.writer is not None:
            for tag, value in tagged.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(tagged, step=step)

    def event(self, step: int, details: dict[str, Any]) -> None:
        """Something that happened at a step (not a metric): a metrics.jsonl record and a line."""
        if not self.enabled:
            return
        record = {"step": step, **details}
        self.jsonl.write(json.dumps(record) + "\n")
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in details.items()))
        if self.wandb is not None:
            self.wandb.log({"event": json.dumps(details)}, step=step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()


def last_logged_step(run_dir: Path) -> int | None:
    """The highest step the run's metrics.jsonl records (lines a kill cut short pass over)."""
    steps = []
    with contextlib.suppress(OSError):
        for line in (run_dir / METRICS_FILE).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                steps.append(int(json.loads(line)["step"]))
    return max(steps, default=None)


def recorded_train_steps(run_dir: Path) -> int | None:
    """--train_steps of the run that wrote the run's config.json (write_config)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        steps = json.loads((run_dir / CONFIG_FILE).read_text())["args"]["train_steps"]
        if isinstance(steps, int) and not isinstance(steps, bool):
            return steps
    return None


def _earlier_args(config: Path) -> list[dict[str, Any]]:
    """The arguments of the run's earlier segments (before each resume), oldest first, from
    the config.json this run is about to replace; none for a new run or an unreadable file."""
    try:
        earlier = json.loads(config.read_text())
        return [*earlier.get("earlier_args", []), earlier["args"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


def _tag(key: str) -> str:
    """A metrics.jsonl key's name in TensorBoard and W&B."""
    return key if "/" in key else TENSORBOARD_TAGS.get(key, f"train/{key}")


def _drop_records_after(jsonl: Path, step: int) -> None:
    """Move the records of steps after `step`, the evaluation of `step` itself (a resumed run
    evaluates it again: it came after the checkpoint) and any line a kill cut short to the
    side file `<name>.dropped.jsonl`, appended to, never deleted."""
    if not jsonl.is_file():
        return
    kept, dropped = [], []
    for line in jsonl.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
            later = record["step"] > step or (record["step"] == step and _is_eval(record))
        except (ValueError, KeyError, TypeError):
            later = True
        (dropped if later else kept).append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return
    with jsonl.with_name(f"{jsonl.stem}.dropped.jsonl").open("a") as side:
        side.writelines(dropped)
    partial = jsonl.with_name(f".{jsonl.name}.tmp")
    partial.write_text("".join(kept))
    partial.replace(jsonl)


def _is_eval(record: dict[str, Any]) -> bool:
    return any(key.startswith("eval/") for key in record)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def format_line(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif key == "lr":
            parts.append(f"lr {value:.2e}")
        elif key == "tokens_per_s":
            parts.append(f"tok/s {value:,.0f}")
        else:
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)
