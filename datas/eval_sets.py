"""Named validation sets: `--eval_data NAME=PATH ...`, each scored under the window protocol
of datas/C4/c4_eval.py, and `NAME=train_holdout`, the last `--holdout_samples` samples of
every training source, which training never reads (datas/mds.py holds them out).

Each set logs `eval/NAME/loss`, `eval/NAME/ppl`, `eval/NAME/bits_per_byte`,
`eval/NAME/tokens` and `eval/NAME/bytes`; the set named `c4` also keeps the names runs logged
before there were several sets (`eval/c4_ppl`, `eval/c4_loss`, `eval/tokens`), so old and new
runs compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from argparse import Namespace
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datas.C4.c4_eval import (
    WindowScore,
    as_tokenizer,
    cache_file,
    check_eval_data,
    check_settings,
    cut_windows,
    load_model_for_eval,
    load_windows,
    resolve_eval_data,
    score_windows,
    token_byte_lengths,
    token_stream,
)
from datas.mds import TOKENS_COLUMN
from utils.checkpoint.layout import run_seq_len
from utils.distributed import DistEnv, broadcast_from_main, command_group, init_distributed
from utils.errors import ArgumentParser, UserError, exit_on_user_error

DEFAULT_SET = "c4"  # the name of a set given as a plain path
TRAIN_HOLDOUT = "train_holdout"
DEFAULT_HOLDOUT_SAMPLES = 1000
DEFAULT_SEQ_LEN = 2048  # a window's length for a model without a training record
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MORE_SETS = re.compile(r"\s[A-Za-z0-9][A-Za-z0-9_.-]*=")  # "a=/x b=/y" given as one value


@dataclass(frozen=True)
class EvalSpec:
    """One `--eval_data` value: a set's name and its path (or `train_holdout`)."""

    name: str
    path: str

    @property
    def is_holdout(self) -> bool:
        return self.path == TRAIN_HOLDOUT


def parse_eval_sets(values: Iterable[str], flag: str = "--eval_data") -> list[EvalSpec]:
    """The one validator of `--eval_data`'s values: `NAME=PATH` or a plain `PATH` (named
    `c4`), names plain and distinct, paths not empty. Files are checked by `check_eval_sets`."""
    specs: list[EvalSpec] = []
    for value in values:
        name, path = _name_and_path(value, flag)
        if not path.strip():
            raise UserError(f"{flag} {value!r}: the path is empty; give NAME=PATH")
        if MORE_SETS.search(path) and not os.path.exists(path):
            raise UserError(
                f"{flag} {value!r} holds several sets in one value; give each NAME=PATH as a "
                "value of its own (in an args file, a list)"
            )
        if any(spec.name == name for spec in specs):
            raise UserError(
                f"{flag}: the set name {name!r} is given twice (a plain path is named "
                f"{DEFAULT_SET!r}); name each set, e.g. {flag} c4=/data/c4 wiki=/data/wiki"
            )
        if path == TRAIN_HOLDOUT and any(spec.is_holdout for spec in specs):
            raise UserError(f"{flag}: {TRAIN_HOLDOUT} is given twice; give it once")
        specs.append(EvalSpec(name, path))
    if not specs:
        raise UserError(f"{flag} names no set; give NAME=PATH")
    return specs


def _name_and_path(value: str, flag: str) -> tuple[str, str]:
    """A `NAME=PATH` value split, or a plain path named c4. Text before '=' without a '/' is
    meant as a name (a path holding '=' has a directory in front: /data/a=b, ./a=b)."""
    name, sep, path = value.partition("=")
    if not sep or "/" in name or os.sep in name:
        return DEFAULT_SET, value
    if not SET_NAME.fullmatch(name):
        raise UserError(
            f"{flag} {value!r}: the set name {name!r} is not letters, digits, '_', '.' and '-' "
            "(starting with a letter or digit); rename it, or write a path holding '=' with its "
            "directory, e.g. ./a=b"
        )
    return name, path


def eval_specs_from_flags(args: Namespace) -> list[EvalSpec]:
    """train.py's `--eval_data` sets, checked (files too, cheaply); `--holdout_samples` goes
    with a `train_holdout` set, and defaults there to DEFAULT_HOLDOUT_SAMPLES."""
    specs = parse_eval_sets(args.eval_data) if args.eval_data else []
    holdout = any(spec.is_holdout for spec in specs)
    if args.holdout_samples is not None and not holdout:
        raise UserError(f"--holdout_samples: give a NAME={TRAIN_HOLDOUT} set in --eval_data too")
    if holdout and args.holdout_samples is None:
        args.holdout_samples = DEFAULT_HOLDOUT_SAMPLES
    check_eval_sets(specs)
    return specs


def check_eval_sets(specs: list[EvalSpec]) -> None:
    """Every file set exists, has a known format and a document (cheap: no tokenizing)."""
    for spec in specs:
        if not spec.is_holdout:
            check_eval_data(spec.path)


@dataclass
class EvalSet:
    """A validation set ready to score: its windows, tokenized once."""

    name: str
    windows: np.ndarray
    byte_lengths: np.ndarray  # each token id's UTF-8 bytes (token_byte_lengths)


def load_eval_sets(
    specs: list[EvalSpec],
    tokenizer: Any,
    seq_len: int,
    held_out: Any = None,
    cache_dir: str | Path | None = None,
) -> list[EvalSet]:
    """The windows of every set, tokenized now (file sets through the protocol's cache);
    `held_out` is the training dataset (`make_streaming_dataset` with `holdout_samples`)
    when a set is `train_holdout`."""
    tokenizer = as_tokenizer(tokenizer)
    byte_lengths = token_byte_lengths(tokenizer)
    sets = []
    for spec in specs:
        if spec.is_holdout:
            windows = holdout_windows(held_out, tokenizer, seq_len)
        else:
            windows = load_windows(spec.path, tokenizer, seq_len, cache_dir)
        sets.append(EvalSet(spec.name, windows, byte_lengths))
    return sets


def holdout_windows(dataset: Any, tokenizer: Any, seq_len: int) -> np.ndarray:
    """The held-out samples as windows: text documents through the protocol (no special
    tokens, EOS after each, one stream cut into `seq_len` windows), pre-tokenized blocks as
    they are. Rank 0 reads them; every rank gets the same array."""
    windows = None
    failure: Exception | None = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            windows = _read_holdout(dataset, tokenizer, seq_len)
        except Exception as err:  # every rank raises it: none waits for rank 0 forever
            failure = err
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        failure, windows = broadcast_from_main((failure, windows))
    if failure is not None:
        raise failure
    return windows


def _read_holdout(dataset: Any, tokenizer: Any, seq_len: int) -> np.ndarray:
    where = Path(f"{TRAIN_HOLDOUT} (the last {dataset.holdout_samples} samples of --data_dir)")
    samples = list(dataset.read_held_out())
    if samples and TOKENS_COLUMN in samples[0]:
        return np.stack([np.asarray(s[TOKENS_COLUMN], dtype=np.int32) for s in samples])
    stream = token_stream((s["text"] for s in samples), tokenizer)
    return cut_windows(stream, seq_len, where)


def evaluate_sets(
    model: nn.Module,
    sets: list[EvalSet],
    *,
    batch_size: int,
    max_windows: int | None = None,
    seed: int = 1234,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Every set scored (on every rank), as the metrics that every sink records."""
    metrics: dict[str, float] = {}
    for eval_set in sets:
        score = score_windows(
            model, eval_set.windows, batch_size=batch_size, max_windows=max_windows,
            seed=seed, device=device, byte_lengths=eval_set.byte_lengths,
        )  # fmt: skip
        metrics |= set_metrics(eval_set.name, score)
    return metrics


def set_metrics(name: str, score: WindowScore) -> dict[str, float]:
    metrics = {
        f"eval/{name}/loss": score.loss,
        f"eval/{name}/ppl": score.ppl,
        f"eval/{name}/bits_per_byte": score.bits_per_byte,
        f"eval/{name}/tokens": score.tokens,
        f"eval/{name}/bytes": score.bytes,
    }
    if name == DEFAULT_SET:  # the names of runs from before there were several sets
        metrics |= {
            "eval/c4_ppl": score.ppl,
            "eval/c4_loss": score.loss,
            "eval/tokens": score.tokens,
        }
    return metrics


def holdout_dataset(checkpoint: Path, vocab_size: int) -> Any:
    """The training data of the run `checkpoint` came from, as training read it (its
    args.json), holding out what training held out."""
    from datas.mds import check_source, make_streaming_dataset, parse_sources

    run_args = _run_args(checkpoint)
    if not run_args.get("holdout_samples"):
        raise UserError(
            f"--data {TRAIN_HOLDOUT}: the run of {checkpoint} held nothing out (its args.json "
            "has no --holdout_samples); evaluate files instead"
        )
    cached = run_args.get("local_cache_dir")
    sources = parse_sources(run_args["data_dir"])
    infos = [check_source(source, cached=cached is not None) for source in sources]
    return make_streaming_dataset(
        sources, infos, local_cache=cached, batch_size=1,
        num_canonical_nodes=run_args.get("num_canonical_nodes", 64),
        shuffle_seed=run_args.get("seed", 42), predownload=None, cache_limit=None,
        vocab_size=vocab_size, holdout_samples=run_args["holdout_samples"],
    )  # fmt: skip


def _run_args(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "args.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"--data {TRAIN_HOLDOUT} needs the run's flags in {path} ({type(err).__name__}); "
            "give a step_<N> checkpoint as training wrote it"
        ) from err
    if not isinstance(values, dict) or not isinstance(values.get("data_dir"), str):
        raise UserError(
            f"{path}: no data_dir string; give a step_<N> checkpoint as training wrote it"
        )
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m datas.eval_sets",
        description="Perplexity and bits per byte of a saved checkpoint on validation sets "
        "(protocol: docs/eval.md).",
    )
    parser.add_argument(
        "--checkpoint", help="step directory of a checkpoint; omit to only build the cache"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="NAME=PATH sets (C4-format files, Arrow or MDS dir; a plain PATH is named c4), or "
        f"NAME={TRAIN_HOLDOUT} (the samples the checkpoint's run held out)",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument(
        "--seq_len",
        type=int,
        help=f"window length (default: the run's --seq_len, else {DEFAULT_SEQ_LEN})",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward, per rank")
    parser.add_argument("--max_windows", type=int, help="score a seeded random subset")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the --max_windows subset")
    parser.add_argument("--cache_dir", help="tokenized windows cache (default: see docs/eval.md)")
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.tokenizer is None:
        parser.error("give --checkpoint to evaluate, or --tokenizer to only build the cache")
    return args


def prepare_cache(args: argparse.Namespace, specs: list[EvalSpec]) -> dict[str, Any]:
    """Tokenize into the cache ahead of training: the first evaluation of a large set
    otherwise makes every rank wait while rank 0 tokenizes."""
    if any(spec.is_holdout for spec in specs):
        raise UserError(f"--data {TRAIN_HOLDOUT} is read at evaluation, never cached; drop it")
    tokenizer = as_tokenizer(args.tokenizer)
    result: dict[str, Any] = {"seq_len": args.seq_len}
    for spec in specs:
        windows = load_windows(spec.path, tokenizer, args.seq_len, args.cache_dir)
        path = cache_file(resolve_eval_data(spec.path), tokenizer, args.seq_len, args.cache_dir)
        result[spec.name] = {"cache": str(path), "windows": len(windows)}
    return result


def evaluate_checkpoint(
    args: argparse.Namespace, specs: list[EvalSpec], env: DistEnv | None
) -> dict[str, Any]:
    model = load_model_for_eval(args.checkpoint, env)
    limit = model.config.max_position_embeddings
    if args.seq_len > limit:
        raise UserError(
            f"--seq_len {args.seq_len} exceeds the model's max_position_embeddings {limit} "
            f"({args.checkpoint}); lower --seq_len"
        )
    tokenizer = as_tokenizer(args.tokenizer or args.checkpoint)
    held_out = None
    if any(spec.is_holdout for spec in specs):
        held_out = holdout_dataset(Path(args.checkpoint), len(tokenizer))
    sets = load_eval_sets(specs, tokenizer, args.seq_len, held_out, args.cache_dir)
    metrics = evaluate_sets(
        model, sets, batch_size=args.batch_size, max_windows=args.max_windows, seed=args.seed
    )
    return {"checkpoint": str(args.checkpoint), **metrics}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (or only build the cache); print (rank 0) and return the result.
    A mistake ends it with one line and status 2."""
    with exit_on_user_error(), command_group():
        return _run(parse_args(argv))


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.seq_len is None:
        trained = run_seq_len(Path(args.checkpoint)) if args.checkpoint else None
        args.seq_len = trained or DEFAULT_SEQ_LEN
    check_settings(args.seq_len, args.batch_size, args.max_windows)
    specs = parse_eval_sets(args.data, "--data")
    check_eval_sets(specs)
    env = init_distributed() if "WORLD_SIZE" in os.environ else None
    if args.checkpoint is None:
        result = prepare_cache(args, specs)
    else:
        result = evaluate_checkpoint(args, specs, env)
    if env is None or env.is_main:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
