"""Downstream tasks through lm-eval on the project's own model, plain or sharded with FSDP2, in
training or on a checkpoint, with no export step (docs/downstream.md).

lm-eval builds each task's requests; `ProjectLM`, an lm-eval `TemplateLM`, answers them with
the model:

- Every rank builds the same requests: lm-eval sees a world of one on each rank. The LM splits
  them itself: requests sorted by length (longest first), rank r takes sorted positions
  r, r + W, ..., in batches of `batch_size`. Every rank runs the same number of forwards, as
  FSDP2's all-gathers need: a rank out of requests runs a one-token dummy forward whose output
  is dropped. The answers are gathered, so every rank returns all of them in request order and
  computes the same metrics.
- loglikelihood: the log-probability of the continuation's tokens after the context
  (log-softmax in fp32, summed in float64) and whether each of them is the argmax. The input
  keeps the last `max_length` tokens (the run's --seq_len), cut from the left as lm-eval's `hf`
  model cuts it.
- loglikelihood_rolling: lm-eval's own rolling windows of `max_length` tokens, EOS as the
  prefix token, each token predicted once: perplexity tasks give the `hf` model's numbers.
- generate_until: greedy, until a stop string, EOS or the task's max_gen_toks (see
  `_generate_batch` for how the rows of a batch advance).

Texts are tokenized as training tokenizes a document: without special tokens (no BOS, which
training never puts before a document). lm-eval is imported only when a task runs or is
checked: it is an optional dependency (`pip install '.[eval]'`) and slow to import.

CLI: `python -m datas.eval_tasks --checkpoint DIR --tasks hellaswag,arc_easy`, plain or under
torchrun; prints one JSON line of metrics keyed `eval/task/<task>/<metric>`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from datas.C4.c4_eval import check_checkpoint_dir, check_settings, load_model_for_eval
from datas.tokenizer import load_tokenizer
from utils.checkpoint.layout import run_seq_len
from utils.distributed import (
    broadcast_from_main,
    command_group,
    gather_from_every_rank,
    init_distributed,
)
from utils.errors import ArgumentParser, UserError, exit_on_user_error

METRIC_PREFIX = "eval/task"
INSTALL_HINT = "pip install '.[eval]'"
# lm-eval's own defaults (its CLI's), fixed here so a score never depends on earlier draws.
RANDOM_SEED = 0
NUMPY_SEED = 1234
TORCH_SEED = 1234
FEWSHOT_SEED = 1234
DEFAULT_MAX_GEN_TOKS = 256  # what lm-eval's hf model generates when a task sets no limit


# ---------------------------------------------------------------- tasks: names and loading
def _require_lm_eval(flag: str) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise UserError(f"{flag}: lm-eval is not installed; {INSTALL_HINT}") from err


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """lm-eval's index of task YAMLs. Indexing its 14k built-in tasks takes seconds: built once
    per process and setting."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _task_manager_for(tasks: Sequence[str], include_path: str | None) -> Any:
    """The index that knows `tasks`: the local YAMLs alone when they hold every one as a plain
    task (no need to index the built-in ones), else the built-in tasks and the local ones."""
    if include_path is not None:
        local = _task_manager(str(include_path), False)
        if all(name in local.all_subtasks for name in tasks):
            return local
    return _task_manager(None if include_path is None else str(include_path), True)


def check_tasks(
    tasks: list[str],
    include_path: str | None,
    *,
    flag: str = "--eval_tasks",
    include_flag: str = "--eval_tasks_include",
) -> None:
    """Start-up check: lm-eval is installed and knows every name in `tasks` (a task, group or
    tag, or a task YAML file), with the YAMLs under `include_path` added. Otherwise a one-line
    UserError naming `flag` (or `include_flag`), the unknown names and close matches. Loads no
    dataset."""
    _require_lm_eval(flag)
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(
            f"{include_flag} {include_path} is not a directory; give the directory that holds "
            "your task YAMLs"
        )
    known = set(_task_manager_for(tasks, include_path).all_tasks)
    unknown = [name for name in tasks if name not in known and not Path(name).is_file()]
    if unknown:
        raise UserError(
            f"{flag}: lm-eval knows no task {_with_close_matches(unknown, known)}; list the "
            f"known ones with `lm-eval ls tasks`, or add your own YAMLs with {include_flag} DIR"
        )


def _with_close_matches(unknown: list[str], known: set[str]) -> str:
    shown = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
        shown.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ", ".join(shown)


def _load_tasks(manager: Any, tasks: list[str], num_fewshot: int | None) -> Any:
    """The tasks, with their shot count and a fixed few-shot seed. `num_fewshot` replaces a
    task's own count unless the task fixes it at 0 (lm-eval's rule); a task without one is
    zero-shot."""
    loaded = manager.load(tasks)
    for task in loaded["tasks"].values():
        configured = task.get_config("num_fewshot")
        if num_fewshot is not None and configured != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def _load_tasks_rank0_first(manager: Any, tasks: list[str], num_fewshot: int | None) -> Any:
    """Rank 0 loads first (it may download the datasets) while the others wait, then they load
    from the datasets cache instead of all downloading at once. A failure on rank 0 is raised
    on every rank, so none waits forever."""
    rank, world = _rank_and_world()
    if world == 1:
        return _load_tasks(manager, tasks, num_fewshot)
    loaded, failure = None, None
    if rank == 0:
        try:
            loaded = _load_tasks(manager, tasks, num_fewshot)
        except Exception as err:  # every rank raises it
            failure = err
    failure = broadcast_from_main(failure)  # doubles as the barrier
    if failure is not None:
        raise failure
    return loaded if rank == 0 else _load_tasks(manager, tasks, num_fewshot)


# ---------------------------------------------------------------- ranks
def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _my_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """This rank's batches of request indices: requests sorted longest first (so a batch holds
    similar lengths), rank r taking sorted positions r, r + W, ... Every rank gets the same
    number of batches; a rank with fewer requests gets empty ones (its dummy forwards)."""
    rank, world = _rank_and_world()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    mine = order[rank::world]
    n_batches = math.ceil(math.ceil(len(lengths) / world) / batch_size)
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(n_batches)]


def _gather_in_order(answers: dict[int, Any], n_requests: int) -> list[Any]:
    """Every rank's answers, merged, in request order, on every rank."""
    merged: dict[int, Any] = {}
    if _rank_and_world()[1] > 1:
        for part in gather_from_every_rank(answers):
            merged.update(part)
    else:
        merged = answers
    return [merged[i] for i in range(n_requests)]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank (a collective every rank reaches)."""
    if _rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _dummy_forward(model: nn.Module, device: torch.device, token: int) -> None:
    """A forward whose output is dropped: FSDP2 needs every rank in each all-gather."""
    model(input_ids=torch.tensor([[token]], device=device), use_cache=False)


# ---------------------------------------------------------------- scoring continuations
def _scored_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """What the model reads to score `continuation`: both joined without the last token (no
    prediction is read past it), the last `max_length` tokens."""
    return (context + continuation)[-(max_length + 1) :][:-1]


def _score_batch(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    max_length: int,
    device: torch.device,
    pad: int,
) -> list[tuple[float, bool]]:
    """(log-probability, is greedy) of each (context, continuation) pair, in one forward.
    Rows are padded on the right: causal attention keeps padding out of every scored position,
    so no attention mask is needed (the project's causal SDPA takes none)."""
    if not pairs:
        _dummy_forward(model, device, pad)
        return []
    rows = [_scored_input(context, continuation, max_length) for context, continuation in pairs]
    width = max(map(len, rows))
    batch = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    logits = model(input_ids=batch, use_cache=False).logits
    answers = []
    for row_logits, row, (_, continuation) in zip(logits, rows, pairs, strict=True):
        start = len(row) - len(continuation)
        logprobs = F.log_softmax(row_logits[start : len(row)].float(), dim=-1)
        target = torch.tensor(continuation, device=device)
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        answers.append((picked.double().sum().item(), greedy))
    return answers


def score_continuations(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
    pad: int,
) -> list[tuple[float, bool]]:
    """(log-probability, is greedy) of every (context tokens, continuation tokens) pair, in
    order, on every rank of an initialized process group (or none)."""
    for _, continuation in pairs:
        if len(continuation) > max_length:
            raise UserError(
                f"a continuation of {len(continuation)} tokens does not fit in max_length="
                f"{max_length}; raise --max_length (in training: --seq_len)"
            )
    answers: dict[int, tuple[float, bool]] = {}
    lengths = [len(context) + len(continuation) for context, continuation in pairs]
    for batch in _my_batches(lengths, batch_size):
        scored = _score_batch(model, [pairs[i] for i in batch], max_length, device, pad)
        answers.update(zip(batch, scored, strict=True))
    return _gather_in_order(answers, len(pairs))


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list, list]]:
    """lm-eval's rolling windows of one document, as (context, continuation) pairs: the first
    window predicts its tokens from `prefix`, each later one predicts up to `max_length` new
    tokens from the tokens before them; every token is predicted once."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix, max_seq_len=max_length, context_len=1
    )
    return [make_disjoint_window(window) for window in windows]


# ---------------------------------------------------------------- greedy generation
@dataclass
class Generation:
    """One generate_until request on its way: its context tokens, stop strings, token budget,
    and what it generated so far."""

    context: list[int]
    until: list[str]
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def _next_input(row: Generation, fed: int, predicted: int, tokenizer: Any, eos: int) -> int:
    """The token `row` feeds next, having fed `fed`: its own context while it lasts (the
    prediction is not used), then the greedy token `predicted`, which is kept; a row that is
    done feeds EOS, which nothing reads."""
    if row.done:
        return eos
    if fed < len(row.context):
        return row.context[fed]
    row.tokens.append(predicted)
    row.done = _finished(row, tokenizer, eos)
    return predicted


def _finished(row: Generation, tokenizer: Any, eos: int) -> bool:
    if row.tokens[-1] == eos or len(row.tokens) >= row.max_new_tokens:
        return True
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    return any(stop and stop in text for stop in row.until)


def _generate_batch(
    model: nn.Module, rows: list[Generation], tokenizer: Any, device: torch.device, eos: int
) -> None:
    """Greedy continuations of `rows`, written into them.

    The rows advance in lockstep with a KV cache: a first forward reads the shortest context's
    length of every row, then each forward feeds one token per row; a row with a longer
    context is fed its own remaining tokens while shorter ones already generate. The cache
    thus never holds padding and no attention mask is needed, so every attention kernel the
    project trains with runs it. Every rank keeps stepping (with dummy forwards once its own
    rows are done) until the rows of every rank are done."""
    cache = None
    fed = min((len(row.context) for row in rows), default=0)
    step_input = [row.context[:fed] for row in rows]
    while _any_rank(not all(row.done for row in rows), device):
        if all(row.done for row in rows):
            _dummy_forward(model, device, eos)
            continue
        inputs = torch.tensor(step_input, device=device)
        # logits_to_keep=1: only the last position's logits are read
        output = model(input_ids=inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = output.past_key_values
        predicted = output.logits[:, -1].float().argmax(dim=-1).tolist()
        step_input = [
            [_next_input(row, fed, token, tokenizer, eos)]
            for row, token in zip(rows, predicted, strict=True)
        ]
        fed += 1


def generate_greedy(
    model: nn.Module,
    rows: list[Generation],
    *,
    batch_size: int,
    tokenizer: Any,
    device: torch.device,
) -> list[list[int]]:
    """The greedy tokens of every row, in order, on every rank."""
    eos = tokenizer.eos_token_id
    answers: dict[int, list[int]] = {}
    for batch in _my_batches([len(row.context) for row in rows], batch_size):
        mine = [rows[i] for i in batch]
        for row in mine:
            row.done = row.max_new_tokens < 1
        _generate_batch(model, mine, tokenizer, device, eos)
        answers.update((i, row.tokens) for i, row in zip(batch, mine, strict=True))
    return _gather_in_order(answers, len(rows))


# ---------------------------------------------------------------- the lm-eval model
def project_lm(
    model: nn.Module, tokenizer: Any, *, max_length: int, batch_size: int, device: torch.device
) -> Any:
    """An lm-eval LM that answers with `model` (plain or FSDP2-sharded); every rank of an
    initialized process group must make the same calls. `model` must be in eval mode, under
    torch.no_grad()."""
    return _project_lm_class()(model, tokenizer, max_length, batch_size, device)


@functools.cache
def _project_lm_class() -> type:
    """The LM class, defined on first use: its base class comes from lm-eval."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )

    class ProjectLM(TemplateLM):
        """lm-eval's view of the project's model; see the module's docstring."""

        def __init__(self, model, tokenizer, max_length, batch_size, device) -> None:
            super().__init__()
            self.model = model
            self.tokenizer = tokenizer
            self.max_length = max_length
            self.batch_size = batch_size
            self._device = device

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
            # verbose=False: a long document is expected, not a truncation mistake
            encoded = self.tokenizer(
                string, add_special_tokens=bool(add_special_tokens), verbose=False
            )
            return encoded["input_ids"]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, **kwargs):
            pairs = [(context, continuation) for _, context, continuation in requests]
            answers = score_continuations(
                self.model, pairs, max_length=self.max_length, batch_size=self.batch_size,
                device=self.device, pad=self.eot_token_id,
            )  # fmt: skip
            for (strings, _, _), answer in zip(requests, answers, strict=True):
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
            return answers

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            owners, pairs = [], []
            for index, request in enumerate(requests):
                (text,) = request.args
                windows = rolling_windows(self.tok_encode(text), self.eot_token_id, self.max_length)
                owners += [index] * len(windows)
                pairs += windows
            scores = self._loglikelihood_tokens([(None, *pair) for pair in pairs])
            totals = [0.0] * len(requests)
            for owner, (logprob, _) in zip(owners, scores, strict=True):
                totals[owner] += logprob
            for request, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            rows = [self._generation(request) for request in requests]
            generated = generate_greedy(
                self.model, rows, batch_size=self.batch_size, tokenizer=self.tokenizer,
                device=self.device,
            )  # fmt: skip
            texts = []
            for request, row, tokens in zip(requests, rows, generated, strict=True):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                texts.append(postprocess_generated_text(text, row.until, think_end_token=None))
                self.cache_hook.add_partial("generate_until", request.args, texts[-1])
            return texts

        def _generation(self, request) -> Generation:
            context, gen_kwargs = request.args
            settings = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
            if settings.get("do_sample"):
                raise UserError(
                    f"task {request.task_name} samples its generations (do_sample or a "
                    "temperature > 0); only greedy decoding is supported: set do_sample: false"
                )
            eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
            until = handle_stop_sequences(settings.get("until"), eos=eos_text)
            budget = settings["max_gen_toks"]
            room = self.max_length - budget
            if room < 1:
                raise UserError(
                    f"task {request.task_name} generates up to {budget} tokens, which leaves no "
                    f"room for its prompt in max_length={self.max_length}; raise --max_length"
                )
            tokens = self.tok_encode(context)[-room:] or [self.eot_token_id]
            return Generation(tokens, until, budget)

    return ProjectLM


# ---------------------------------------------------------------- evaluation
@contextmanager
def _preserved_rng() -> Iterator[None]:
    """Evaluation seeds Python's, NumPy's and torch's generators; training's draws resume
    afterwards as if it had not run."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _seed_everything() -> None:
    random.seed(RANDOM_SEED)
    np.random.seed(NUMPY_SEED)
    torch.manual_seed(TORCH_SEED)


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's per-task results as `eval/task/<task>/<metric>`: `acc,none` is `acc`, a filter
    other than `none` is appended (`exact_match_strict-match`); standard errors, aliases and
    other non-numbers are left out."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            metrics[f"{METRIC_PREFIX}/{task}/{name}"] = float(value)
    return metrics


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    seq_len: int,
    batch_size: int,
    include_path: str | None = None,
    limit: int | None = None,
    device: torch.device | str | None = None,
    num_fewshot: int | None = None,
) -> dict[str, float]:
    """Run lm-eval `tasks` on `model` (plain or FSDP2-wrapped; every rank of an initialized
    process group must call this) and return their metrics keyed `eval/task/<task>/<metric>`,
    the same on every rank.

    `tokenizer` is a transformers tokenizer or its directory; `seq_len` is the longest input
    (the run's --seq_len); `batch_size` counts requests per forward, per rank; `limit` caps the
    examples per task. The model runs in eval mode under no_grad, and its training mode and the
    global random generators are restored afterwards."""
    _require_lm_eval("--eval_tasks")
    check_settings(seq_len, batch_size, limit, "limit")
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer, "--tokenizer_dir")
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token; lm-eval's rolling windows "
            "start from one: use a tokenizer that defines eos_token"
        )
    from lm_eval.evaluator import evaluate

    manager = _task_manager_for(tasks, include_path)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lm = project_lm(model, tokenizer, max_length=seq_len, batch_size=batch_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _preserved_rng():
            _seed_everything()
            loaded = _load_tasks_rank0_first(manager, tasks, num_fewshot)
            results = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0,
                               log_samples=False)  # fmt: skip
    finally:
        model.train(was_training)
    return task_metrics(results["results"])


# ---------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m datas.eval_tasks",
        description="lm-eval tasks on a saved checkpoint (docs/downstream.md).",
    )
    parser.add_argument("--checkpoint", required=True, help="step_<N> directory or a model dir")
    parser.add_argument("--tasks", required=True, help="comma-separated, e.g. hellaswag,arc_easy")
    parser.add_argument("--include_path", help="directory of your own task YAMLs")
    parser.add_argument("--limit", type=int, help="at most N examples per task")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per forward, per rank")
    parser.add_argument(
        "--max_length", type=int, help="longest input in tokens (default: the run's --seq_len)"
    )
    parser.add_argument("--num_fewshot", type=int, help="shots per example (default: the task's)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    return parser.parse_args(argv)


def task_names(spec: str, flag: str) -> list[str]:
    """The names in a comma-separated `spec`; an empty one is a UserError naming `flag`."""
    names = [name.strip() for name in spec.split(",")]
    if not all(names):
        raise UserError(
            f"{flag} {spec!r} has an empty name; give names separated by commas, e.g. "
            "hellaswag,arc_easy"
        )
    return names


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric flags, before anything is loaded."""
    least = {"--batch_size": 1, "--limit": 1, "--max_length": 2, "--num_fewshot": 0}
    for flag, minimum in least.items():
        value = getattr(args, flag[2:])
        if value is not None and value < minimum:
            raise UserError(f"{flag} {value}: give at least {minimum}")


def _max_length(args: argparse.Namespace, seq_len: int | None, config: Any, main: bool) -> int:
    if args.max_length is not None:
        limit = config.max_position_embeddings
        if args.max_length > limit:
            raise UserError(
                f"--max_length {args.max_length} exceeds the model's max_position_embeddings "
                f"{limit} ({args.checkpoint}); lower --max_length"
            )
        return args.max_length
    if seq_len is not None:
        return seq_len
    fallback = config.max_position_embeddings
    if main:
        print(
            f"note: {args.checkpoint} holds no training record (args.json or training.json); "
            f"max_length is the config's max_position_embeddings, {fallback}; pass "
            "--max_length to choose",
            flush=True,
        )
    return fallback


def _check_checkpoint_exists(checkpoint: Path) -> None:
    if not checkpoint.exists():
        raise UserError(
            f"--checkpoint {checkpoint} does not exist; give a step_<N> checkpoint directory or "
            "a model directory written by save_pretrained"
        )


def _run(args: argparse.Namespace) -> dict[str, Any]:
    tasks = task_names(args.tasks, "--tasks")
    _check_numbers(args)
    checkpoint = Path(args.checkpoint)
    _check_checkpoint_exists(checkpoint)
    check_checkpoint_dir(checkpoint)  # not a run directory
    seq_len = run_seq_len(checkpoint)  # before the model: a damaged record is one line
    check_tasks(tasks, args.include_path, flag="--tasks", include_flag="--include_path")
    env = init_distributed() if "WORLD_SIZE" in os.environ else None
    main_rank = env is None or env.is_main
    model = load_model_for_eval(checkpoint, env)
    max_length = _max_length(args, seq_len, model.config, main_rank)
    tokenizer_flag = "--tokenizer" if args.tokenizer else "--checkpoint"
    tokenizer = load_tokenizer(args.tokenizer or checkpoint, tokenizer_flag)
    metrics = evaluate_tasks(
        model, tokenizer, tasks, seq_len=max_length, batch_size=args.batch_size,
        include_path=args.include_path, limit=args.limit, device=env.device if env else None,
        num_fewshot=args.num_fewshot,
    )  # fmt: skip
    result = {"checkpoint": str(checkpoint), "max_length": max_length, **metrics}
    if main_rank:
        print(json.dumps(result), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run tasks on a checkpoint; print (rank 0) and return the metrics. A mistake ends it with
    one line and status 2."""
    with exit_on_user_error(), command_group():
        return _run(parse_args(argv))


if __name__ == "__main__":
    main()
