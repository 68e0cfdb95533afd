"""C4 validation perplexity, identical for any number of ranks and any batch size.

Protocol (version 3):

1. Documents are read in order: files in sorted name order (an MDS directory in the order
   of its index.json), each file's documents in file order. Inputs: the allenai/c4
   validation files as distributed (`c4-validation.*-of-*.json.gz`, one JSON object with a
   `text` field per line) or any `.jsonl`/`.json`/`.jsonl.gz`/`.json.gz` file of that shape,
   a datasets `save_to_disk` directory (`*.arrow` IPC streams with a `text` column), or an
   MDS directory with a `text` column. Which files and texts are documents is
   `datas.jsonl`'s rule, shared with `datas.prepare`: a null, empty or whitespace-only text
   is no document (version 2; version 1 scored such texts' EOS).
2. Each document is tokenized without special tokens and followed by the EOS token; all
   documents are concatenated into one stream. A special token's text inside a document is
   tokenized as text (version 3; version 2 read it as the token).
3. The stream is cut into non-overlapping windows of `seq_len` tokens; the final partial
   window is dropped.
4. With `max_windows`, the windows kept are the first `max_windows` of
   `torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))`; otherwise all.
5. Each window predicts its `seq_len - 1` next tokens from the tokens before them in the
   window. The NLL of every window is summed in fp32 (logits cast to fp32), windows are
   summed in float64 in window order, and `ppl = exp(total NLL / total predicted tokens)`;
   `ntokens` is the number of predicted tokens, `n_kept_windows * (seq_len - 1)`.

Windows are split across ranks (rank r scores kept windows r, r + W, ...); each window's
NLL lands in its own slot of a vector that is summed across ranks, so neither the world
size nor the batch size changes which windows count or the order in which they add up.

The tokenized windows are cached as a .npy of int32 `[n_windows, seq_len]` under
`$LLM_PLAYGROUND_CACHE/c4_eval` (default `~/.cache/llm-playground/c4_eval`), keyed by the
data files (path, size, mtime), the tokenizer's content and `seq_len`; a cached file that is
cut short or damaged is built again.

The command, `python -m datas.eval_sets` (also run as `python -m datas.C4.c4_eval`), scores
several named sets; datas/eval_sets.py also adds `train_holdout` and bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from datas.jsonl import JSON_LINES_SUFFIXES, document_files, is_document, json_lines_texts
from datas.mds import check_safe_columns, read_index, shard_file, text_documents
from datas.tokenizer import batched, encode_documents, load_tokenizer
from utils.checkpoint.layout import STEP_DIR, step_number
from utils.distributed import DistEnv, broadcast_from_main, build_mesh
from utils.errors import UserError
from utils.parallelize import parallelize_model

PROTOCOL_VERSION = 3
TEXT_FIELD = "text"
TOKENIZE_BATCH = 1024
GET_DATA_HINT = "get the C4 validation files as described in docs/eval.md"


@dataclass(frozen=True)
class EvalData:
    """A validated input: its format ("json", "arrow" or "mds") and files in reading order
    (for MDS, index.json and the shard files: everything the cache key must cover)."""

    kind: str
    root: Path
    files: tuple[Path, ...]


def _file_kind(path: Path) -> str | None:
    if path.name.endswith(JSON_LINES_SUFFIXES):
        return "json"
    if path.suffix == ".arrow":
        return "arrow"
    return None


def resolve_eval_data(data_path: str | Path) -> EvalData:
    """The format and files of `data_path`, or a one-line error naming the path and the fix."""
    root = Path(data_path).expanduser()
    if not root.exists():
        raise UserError(f"eval data {root} does not exist; {GET_DATA_HINT}")
    if root.is_file():
        kind = _file_kind(root)
        if kind is None:
            raise UserError(
                f"eval data {root} is neither a .json.gz/.jsonl/.json file nor an .arrow file; "
                "give C4 validation files, a datasets save_to_disk directory or an MDS directory"
            )
        return EvalData(kind, root, (root,))
    if (root / "index.json").is_file():
        return _resolve_mds(root)
    if (root / "dataset_dict.json").is_file():
        raise UserError(
            f"eval data {root} is a DatasetDict; give one split's directory, e.g. {root}/validation"
        )
    # An Arrow directory also holds dataset_info.json and state.json: Arrow files win.
    for kind, suffixes in (("arrow", (".arrow",)), ("json", JSON_LINES_SUFFIXES)):
        matching = tuple(document_files(root, suffixes))
        if matching:
            return EvalData(kind, root, matching)
    raise UserError(
        f"eval data {root} holds no .json.gz/.jsonl/.json, .arrow or MDS index.json files; "
        f"{GET_DATA_HINT}"
    )


def _resolve_mds(root: Path) -> EvalData:
    shards = read_index(root)["shards"]
    files = [root / "index.json"]
    for shard in shards:
        if shard.get("format", "mds") != "mds":
            raise UserError(f"eval data {root} has {shard.get('format')!r} shards; need MDS")
        check_safe_columns(shard, f"eval data {root}")
        columns = dict(zip(shard["column_names"], shard["column_encodings"], strict=True))
        if columns.get(TEXT_FIELD) != "str":
            raise UserError(
                f"eval data {root} has no `{TEXT_FIELD}` str column (found {columns}); "
                "write it with MDSWriter(columns={'text': 'str'})"
            )
        files.append(shard_file(root, shard))
    if not sum(shard["samples"] for shard in shards):
        raise UserError(f"eval data {root} holds no documents; {GET_DATA_HINT}")
    return EvalData("mds", root, tuple(files))


def check_eval_data(data_path: str | Path) -> None:
    """Validate `data_path` without tokenizing: it exists, has a known format, a `text`
    field and at least one document. Cheap enough for start-up (reads up to the first one)."""
    data = resolve_eval_data(data_path)
    # json and arrow: read up to the first document (mds: counted from the index already)
    if data.kind != "mds" and next(iter_documents(data), None) is None:
        raise UserError(f"eval data {data.root} holds no documents; {GET_DATA_HINT}")


def _json_documents(path: Path) -> Iterator[str]:
    texts = json_lines_texts(path, TEXT_FIELD, 'give records like the C4 files: {"text": ...}')
    return filter(is_document, texts)


def _arrow_table(path: Path) -> Any:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowException) as err:
        raise UserError(
            f"eval data {path} is not an Arrow IPC stream as datasets' save_to_disk writes ({err})"
        ) from err
    field = table.schema.field(TEXT_FIELD) if TEXT_FIELD in table.schema.names else None
    if field is None or not (
        pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
    ):
        raise UserError(
            f"eval data {path} has no `{TEXT_FIELD}` string column (columns: "
            f"{table.schema.names}); save the dataset with its text in `{TEXT_FIELD}`"
        )
    return table


def iter_documents(data: EvalData) -> Iterator[str]:
    """Every document of `data`, in the protocol's order."""
    if data.kind == "mds":
        yield from text_documents(data.root)
        return
    for path in data.files:
        if data.kind == "json":
            yield from _json_documents(path)
        else:
            for chunk in _arrow_table(path).column(TEXT_FIELD).chunks:
                yield from filter(is_document, chunk.to_pylist())


def as_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object, or one loaded from a tokenizer directory."""
    if not isinstance(tokenizer, str | Path):
        return tokenizer
    return load_tokenizer(tokenizer, "--tokenizer")


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token; the protocol ends every "
            "document with one: use a tokenizer that defines eos_token"
        )
    return tokenizer.eos_token_id


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the tokenizer's full definition and its EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    text = f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{definition}"
    return hashlib.sha256(text.encode()).hexdigest()


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """Each token id's length in UTF-8 bytes, for bits per byte: a byte-level BPE token's
    characters stand for one byte each; a SentencePiece token counts its text (a `▁` is a
    space) or, written `<0xNN>`, one byte. Special tokens (EOS) count none: they are not text."""
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    for token, token_id in vocab.items():
        if token_id in special:
            continue
        if byte_level:
            lengths[token_id] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[token_id] = 1
        else:
            lengths[token_id] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer of the GPT-2 family maps bytes to characters
        return hasattr(tokenizer, "byte_decoder")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def token_stream(documents: Iterator[str], tokenizer: Any) -> np.ndarray:
    """All documents tokenized without special tokens, each followed by EOS, concatenated."""
    eos = _eos_id(tokenizer)
    pieces = [np.zeros(0, dtype=np.int32)]
    for batch in batched(documents, TOKENIZE_BATCH):
        pieces.append(encode_documents(tokenizer, batch, eos)[0])
    return np.concatenate(pieces)


def cut_windows(stream: np.ndarray, seq_len: int, where: Path) -> np.ndarray:
    n_windows = len(stream) // seq_len
    if n_windows == 0:
        raise UserError(
            f"eval data {where} has {len(stream)} tokens, fewer than one window of "
            f"seq_len={seq_len}; lower --seq_len or give more documents"
        )
    return stream[: n_windows * seq_len].reshape(n_windows, seq_len)


def default_cache_dir() -> Path:
    root = os.environ.get("LLM_PLAYGROUND_CACHE", "~/.cache/llm-playground")
    return Path(root).expanduser() / "c4_eval"


def cache_file(
    data: EvalData, tokenizer: Any, seq_len: int, cache_dir: str | Path | None = None
) -> Path:
    """Where the windows of (data files, tokenizer, seq_len) are cached."""
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in data.files]
    key = json.dumps(
        {
            "protocol": PROTOCOL_VERSION,
            "files": files,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "seq_len": seq_len,
        }
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return directory / f"{data.root.name}-seq{seq_len}-{digest}.npy"


def read_cached_windows(path: Path, seq_len: int) -> np.ndarray | None:
    """The windows cached in `path`, or None when there are none to trust: no file, or one
    cut short or damaged (another shape or type, a garbled header, fewer bytes than it says).
    The file is mapped, not read."""
    try:
        windows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if windows.dtype != np.int32 or windows.ndim != 2 or windows.shape[1] != seq_len:
        return None
    if not len(windows):
        return None
    return windows


def _ensure_cached(data: EvalData, tokenizer: Any, seq_len: int, path: Path) -> None:
    if read_cached_windows(path, seq_len) is not None:
        return
    stream = token_stream(iter_documents(data), tokenizer)
    if not len(stream):  # every document adds at least its EOS
        raise UserError(f"eval data {data.root} holds no documents; {GET_DATA_HINT}")
    windows = cut_windows(stream, seq_len, data.root)
    # Write beside, then rename: readers on other ranks never see a partial file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            np.save(f, windows)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(
            f"the C4 eval cache {path.parent} cannot be written ({err.strerror}); pass "
            "--cache_dir or set LLM_PLAYGROUND_CACHE to a writable directory"
        ) from err


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_windows(
    data_path: str | Path, tokenizer: Any, seq_len: int, cache_dir: str | Path | None = None
) -> np.ndarray:
    """The `[n_windows, seq_len]` int32 windows of `data_path`, tokenized once and cached.

    In a distributed run rank 0 tokenizes and writes while the others wait; a rank that
    still does not see the file (a node-local cache directory) tokenizes for itself.
    """
    tokenizer = as_tokenizer(tokenizer)
    data = resolve_eval_data(data_path)
    path = cache_file(data, tokenizer, seq_len, cache_dir)
    rank, world = _rank_and_world()
    failure: Exception | None = None
    if rank == 0:
        try:
            _ensure_cached(data, tokenizer, seq_len, path)
        except Exception as err:  # every rank raises it: none waits for rank 0 forever
            failure = err
    if world > 1:
        # Doubles as the barrier: the other ranks wait here until rank 0 has written.
        failure = broadcast_from_main(failure)
    if failure is not None:
        raise failure
    _ensure_cached(data, tokenizer, seq_len, path)
    windows = read_cached_windows(path, seq_len)
    if windows is None:  # damaged again since: another process writing the same cache badly
        raise UserError(
            f"the C4 eval cache {path} is damaged right after it was written; delete it, or "
            "pass --cache_dir or set LLM_PLAYGROUND_CACHE to another directory"
        )
    return windows


def select_windows(n_windows: int, max_windows: int | None, seed: int) -> np.ndarray:
    """Indices of the windows to score (step 4 of the protocol)."""
    if max_windows is None or max_windows >= n_windows:
        return np.arange(n_windows)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_windows, generator=generator)[:max_windows].numpy()


def check_settings(
    seq_len: int, batch_size: int, limit: int | None, limit_name: str = "max_windows"
) -> None:
    """The settings every evaluation takes (windows here, lm-eval's tasks in datas.eval_tasks):
    `limit`, called `limit_name`, caps what is scored."""
    if seq_len < 2:
        raise UserError(
            f"seq_len={seq_len}: give at least 2 (a token to predict and one before it)"
        )
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: give at least 1")
    if limit is not None and limit < 1:
        raise UserError(f"{limit_name}={limit}: give at least 1, or None for all")


def _score_windows(
    model: nn.Module,
    windows: np.ndarray,
    selected: np.ndarray,
    nll: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> None:
    """Fill nll[i] with the summed NLL of window selected[i], for this rank's share of i."""
    rank, world = _rank_and_world()
    positions = range(rank, len(selected), world)
    steps = math.ceil(math.ceil(len(selected) / world) / batch_size)
    for step in range(steps):
        batch_positions = positions[step * batch_size : (step + 1) * batch_size]
        # A rank out of windows still runs a forward: FSDP2 needs every rank in each
        # all-gather. Its dummy window's loss is dropped.
        rows = [selected[p] for p in batch_positions] or [selected[0]]
        inputs = torch.from_numpy(np.asarray(windows[rows], dtype=np.int64)).to(device)
        logits = model(input_ids=inputs).logits
        # Not strict: with no positions, the dummy window's logits pair with nothing.
        for position, row_logits, row_inputs in zip(batch_positions, logits, inputs, strict=False):
            nll[position] = F.cross_entropy(
                row_logits[:-1].float(), row_inputs[1:], reduction="sum"
            ).double()


@dataclass(frozen=True)
class WindowScore:
    """What scoring windows gives: the summed NLL (nats) of the predicted tokens, their count,
    and their UTF-8 bytes (`token_byte_lengths`; the EOS after each document has none)."""

    nll: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else None


def score_windows(
    model: nn.Module,
    windows: np.ndarray,
    *,
    batch_size: int = 8,
    max_windows: int | None = None,
    seed: int = 1234,
    device: torch.device | str | None = None,
    byte_lengths: np.ndarray | None = None,
) -> WindowScore:
    """Score `windows` (`[n, seq_len]` token ids) under the protocol's steps 4-5, on every rank
    of an initialized process group (or none). `byte_lengths[id]` is token id's UTF-8 length;
    without it the bytes are 0. The model's training mode is restored afterwards."""
    seq_len = windows.shape[1]
    check_settings(seq_len, batch_size, max_windows)
    selected = select_windows(len(windows), max_windows, seed)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll = torch.zeros(len(selected), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _score_windows(model, windows, selected, nll, batch_size, device)
    finally:
        model.train(was_training)
    if _rank_and_world()[1] > 1:
        dist.all_reduce(nll)
    scored_bytes = 0 if byte_lengths is None else predicted_bytes(windows, selected, byte_lengths)
    return WindowScore(nll.sum().item(), len(selected) * (seq_len - 1), scored_bytes)


def predicted_bytes(windows: np.ndarray, selected: np.ndarray, byte_lengths: np.ndarray) -> int:
    """UTF-8 bytes of the tokens the selected windows predict (all but each first token).
    Every rank holds all windows, so no collective is needed; read in slices to bound memory."""
    total = 0
    for start in range(0, len(selected), TOKENIZE_BATCH):
        rows = np.sort(selected[start : start + TOKENIZE_BATCH])
        total += int(byte_lengths[np.asarray(windows[rows])[:, 1:]].sum())
    return total


def evaluate_c4_ppl(
    model: nn.Module,
    tokenizer: Any,
    data_path: str | Path,
    *,
    seq_len: int = 2048,
    batch_size: int = 8,
    max_windows: int | None = None,
    seed: int = 1234,
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[float, int]:
    """(perplexity, predicted tokens) of `model` on `data_path` under the module's protocol.

    `model` (plain or FSDP2-wrapped) returns outputs with `.logits`; every rank of an
    initialized process group must call this. `tokenizer` is a transformers tokenizer or its
    directory. The model's training mode is restored afterwards.
    """
    check_settings(seq_len, batch_size, max_windows)
    tokenizer = as_tokenizer(tokenizer)
    windows = load_windows(data_path, tokenizer, seq_len, cache_dir)
    score = score_windows(
        model, windows, batch_size=batch_size, max_windows=max_windows, seed=seed, device=device
    )
    return score.ppl, score.tokens


def load_model_for_eval(step_dir: str | Path, env: DistEnv | None = None) -> nn.Module:
    """The model saved in `step_dir`, ready to evaluate: on `env.device` and, with several
    ranks, sharded with FSDP2; without `env` (plain python), on the first GPU or the CPU.

    Reads a training checkpoint of any `--ckpt_type` (consolidated in memory) or a
    transformers model directory (`save_pretrained`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from slt.export import dense_weights

    step_dir = Path(step_dir)
    check_checkpoint_dir(step_dir)
    if not (step_dir / "config.json").is_file():
        raise UserError(
            f"--checkpoint {step_dir} has no config.json; give a step_<N> checkpoint or a "
            "model directory written by save_pretrained"
        )
    if (step_dir / "trainer.pt").is_file():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(step_dir)))
        result = model.load_state_dict(dense_weights(step_dir), strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise UserError(f"--checkpoint {step_dir} does not match its config.json: {result}")
        model.tie_weights()
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(step_dir))
        except (OSError, ValueError, KeyError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"--checkpoint {step_dir} is not a loadable model directory ({reason}); give "
                "a step_<N> checkpoint or a model directory written by save_pretrained"
            ) from err
    if env is None:
        return model.to("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(env.device)
    if env.world_size == 1:
        return model
    return parallelize_model(
        model,
        build_mesh(env, "full_shard"),
        sharding_strategy="full_shard",
        param_dtype=torch.float32,
    )


def check_checkpoint_dir(step_dir: Path) -> None:
    """`--checkpoint` is a directory, and not a run directory (whose config.json holds the run's
    flags, not a model): that one is refused naming the step directories it holds."""
    if step_dir.exists() and not step_dir.is_dir():
        raise UserError(
            f"--checkpoint {step_dir} is a file; give a step_<N> checkpoint directory or a "
            "model directory written by save_pretrained"
        )
    if not step_dir.is_dir() or (step_dir / "trainer.pt").is_file():
        return
    steps = sorted(
        (step_number(p), p.name)
        for p in step_dir.iterdir()
        if STEP_DIR.match(p.name) and p.is_dir()
    )
    if steps:
        names = ", ".join(name for _, name in steps)
        raise UserError(
            f"--checkpoint {step_dir} is a run directory holding {names}; give one of them, "
            f"e.g. --checkpoint {step_dir / steps[-1][1]}"
        )


if __name__ == "__main__":  # the command of every validation set: datas/eval_sets.py
    from datas.eval_sets import main

    main()
