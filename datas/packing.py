"""Turn a stream of tokenized documents into training batches: pack, overflow or trunc.

Everything here runs in the main process on numpy arrays, so it sees the documents in the
same order whatever the number of DataLoader workers: that is what makes resume exact.
A `DocumentFeed` hands out whole documents and counts them; a packer turns them into rows
and keeps the tokens it could not place yet in a leftover buffer that is saved with the
loader state.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from utils.errors import UserError
from utils.loss import IGNORE_INDEX

STRATEGIES = ("pack", "overflow", "trunc")
PAD_MULTIPLE = 8
# The last line of a worker's traceback as torch's ExceptionWrapper re-raises it.
_WORKER_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?UserError: (.+)$")


def unwrap_worker_error(err: UserError) -> UserError:
    """A UserError raised in a DataLoader worker, as its one line. torch re-raises a worker's
    exception with its type but with "Caught UserError in DataLoader worker process N.
    Original Traceback ..." and the whole traceback as the message; the original line is the
    traceback's last."""
    text = str(err)
    lines = text.rstrip().splitlines()
    if not (text.startswith("Caught ") and len(lines) > 1):
        return err
    match = _WORKER_ERROR_LINE.match(lines[-1])
    if match is None:
        return err
    plain = UserError(match.group(1))
    plain.every_rank = err.every_rank
    return plain


@dataclass
class DocChunk:
    """Documents tokenized together: one flat int32 array and each document's length."""

    tokens: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        self.ends = np.cumsum(self.lengths)
        self.starts = self.ends - self.lengths


class DocumentFeed:
    """Hands out documents in stream order and counts them (the resume position).

    `next_chunks` returns an iterator over the chunks of one epoch; when it is exhausted the
    feed starts the next epoch, so it never runs out.

    Across ranks, starting an epoch is a collective in streaming (a barrier of every worker
    on the node), but packing consumes documents at different rates per rank, so ranks reach
    the end of an epoch at different batches. With `any_rank` (a MAX all-reduce of a flag),
    `prepare` is called before each batch on every rank: a rank whose epoch is used up and
    whose buffered documents might not fill the batch raises the flag, and then every rank
    reads the rest of its epoch into memory and starts the next one at the same moment.
    """

    def __init__(
        self,
        next_chunks: Callable[[], Iterator[DocChunk]],
        any_rank: Callable[[bool], bool] | None = None,
    ) -> None:
        self._next_chunks = next_chunks
        self._any_rank = any_rank
        self._source: Iterator[DocChunk] | None = None
        self._source_epoch = 0
        self._source_done = False
        self._source_yielded = 0
        self._empty_epochs = 0
        self._queue: deque[tuple[int, DocChunk]] = deque()
        self._chunk: DocChunk | None = None
        self._cursor = 0
        self.position = 0  # documents handed out since the start of training
        self.epoch = 0
        self.epoch_offset = 0  # global samples of this epoch skipped by a resume
        self.in_epoch = 0  # documents handed out in this epoch, in this run
        self.recent_lengths: list[np.ndarray] = []  # for the elastic-resume warning

    # ---- the source: one streaming epoch at a time, read ahead into a queue
    def _open_source(self) -> None:
        if self._source is None:
            self._source, self._source_epoch = self._next_chunks(), self.epoch

    def _pull(self) -> bool:
        """Queue the next chunk of the current epoch; False once the epoch is used up."""
        self._open_source()
        try:
            chunk = None if self._source_done else next(self._source, None)
        except UserError as err:  # bad data met by a worker: its one line, not its traceback
            unwrapped = unwrap_worker_error(err)
            if unwrapped is err:
                raise
            raise unwrapped from None
        if chunk is None:
            self._source_done = True
            return False
        self._queue.append((self._source_epoch, chunk))
        self._source_yielded += 1
        return True

    def _start_next_epoch(self) -> None:
        while self._pull():  # what is left of this epoch stays queued, in order
            pass
        # An epoch can be empty when resuming exactly at its end; two in a row means the
        # dataset itself is empty and waiting would never end.
        self._empty_epochs = 0 if self._source_yielded else self._empty_epochs + 1
        if self._empty_epochs > 1:
            raise RuntimeError("the dataset yielded no documents for a whole epoch")
        self._source = self._next_chunks()
        self._source_epoch += 1
        self._source_done = False
        self._source_yielded = 0

    def _buffered(self) -> tuple[int, int]:
        """Documents and tokens handed out by nothing yet, in memory."""
        docs = tokens = 0
        if self._chunk is not None:
            docs = len(self._chunk.lengths) - self._cursor
            tokens = int(self._chunk.lengths[self._cursor :].sum())
        for _, chunk in self._queue:
            docs += len(chunk.lengths)
            tokens += len(chunk.tokens)
        return docs, tokens

    def prepare(self, docs: int, tokens: int) -> None:
        """Make sure `docs` documents and `tokens` tokens are at hand. Collective when the
        feed has `any_rank`: every rank calls it before every batch, and so every rank opens
        the first epoch here at the same moment, needed or not."""
        self._open_source()
        while True:
            have_docs, have_tokens = self._buffered()
            while (have_docs < docs or have_tokens < tokens) and self._pull():
                have_docs, have_tokens = self._buffered()
            short = have_docs < docs or have_tokens < tokens
            if not (self._any_rank(short) if self._any_rank else short):
                return
            self._start_next_epoch()

    # ---- handing out documents
    def _refill(self) -> DocChunk:
        while self._chunk is None or self._cursor >= len(self._chunk.lengths):
            if self._queue:
                epoch, self._chunk = self._queue.popleft()
                self._cursor = 0
                if epoch != self.epoch:
                    self.epoch, self.epoch_offset, self.in_epoch = epoch, 0, 0
            elif not self._pull():
                if self._any_rank is not None:
                    raise RuntimeError("internal: an epoch ended outside DocumentFeed.prepare")
                self._start_next_epoch()
        return self._chunk

    def _advance(self, count: int) -> None:
        lengths = self._chunk.lengths[self._cursor : self._cursor + count]
        self.recent_lengths.append(lengths)
        del self.recent_lengths[:-64]
        self._cursor += count
        self.position += count
        self.in_epoch += count

    def take_tokens(self, needed: int) -> tuple[list[np.ndarray], int]:
        """Whole documents, in order, until they hold at least `needed` tokens.

        Returns contiguous slices (several documents each) and their total token count.
        """
        pieces, total = [], 0
        while total < needed:
            chunk = self._refill()
            ends = chunk.ends[self._cursor :] - chunk.starts[self._cursor]
            count = min(int(np.searchsorted(ends, needed - total)) + 1, len(ends))
            start = chunk.starts[self._cursor]
            stop = chunk.ends[self._cursor + count - 1]
            pieces.append(chunk.tokens[start:stop])
            total += int(stop - start)
            self._advance(count)
        return pieces, total

    def take_documents(self, count: int) -> list[np.ndarray]:
        """The next `count` documents, one array each."""
        docs: list[np.ndarray] = []
        while len(docs) < count:
            chunk = self._refill()
            n = min(count - len(docs), len(chunk.lengths) - self._cursor)
            for i in range(self._cursor, self._cursor + n):
                docs.append(chunk.tokens[chunk.starts[i] : chunk.ends[i]])
            self._advance(n)
        return docs

    def discard(self, count: int) -> None:
        """Skip `count` documents (resume: documents this rank had already consumed)."""
        while count > 0:
            chunk = self._refill()
            n = min(count, len(chunk.lengths) - self._cursor)
            self._advance(n)
            count -= n

    def tokens_in_last(self, count: int) -> int:
        """Tokens in the last `count` documents handed out (as far as the history reaches)."""
        total, remaining = 0, count
        for lengths in reversed(self.recent_lengths):
            if remaining <= 0:
                break
            total += int(lengths[-remaining:].sum())
            remaining -= len(lengths)
        return total


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a batch that are not padding: what tokens/s and tokens_seen count, in
    training and in the benchmarks alike."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _doc_position_ids(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Positions restarting at 0 at each row start and after each EOS (document start)."""
    rows, width = input_ids.shape
    index = np.broadcast_to(np.arange(width), (rows, width))
    starts = np.zeros((rows, width), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return index - last_start


class Packer:
    """Interface of the three strategies: `next_batch`, and a leftover buffer to save."""

    def __init__(self, feed: DocumentFeed, rows: int, seq_len: int, emit_position_ids: bool):
        self.feed = feed
        self.rows = rows
        self.seq_len = seq_len
        self.emit_position_ids = emit_position_ids

    def next_batch(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def needs(self) -> tuple[int, int]:
        """(documents, tokens) that are always enough for the next batch."""
        raise NotImplementedError

    def buffer_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_buffer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the buffer saved by `buffer_state` (nothing to do without a buffer)."""

    def leftover_tokens(self) -> int:
        return 0


class BlockPacker(Packer):
    """Documents (each ending in EOS) concatenated and cut into [rows, seq_len] blocks. Every
    token is real, so a batch carries no attention mask."""

    def __init__(
        self, feed: DocumentFeed, rows: int, seq_len: int, emit_position_ids: bool, *, eos_id: int
    ):
        super().__init__(feed, rows, seq_len, emit_position_ids)
        self.eos_id = eos_id
        self.buffer = np.zeros(0, dtype=np.int32)

    def needs(self) -> tuple[int, int]:
        return 0, self.rows * self.seq_len - len(self.buffer)

    def next_batch(self) -> dict[str, torch.Tensor]:
        needed = self.rows * self.seq_len
        pieces, _ = self.feed.take_tokens(needed - len(self.buffer))
        flat = np.concatenate([self.buffer, *pieces])
        self.buffer = flat[needed:].copy()
        input_ids = flat[:needed].reshape(self.rows, self.seq_len).astype(np.int64)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(input_ids.copy()),
        }
        if self.emit_position_ids:
            batch["position_ids"] = torch.from_numpy(_doc_position_ids(input_ids, self.eos_id))
        return batch

    def buffer_state(self) -> dict[str, torch.Tensor]:
        return {"tokens": torch.from_numpy(self.buffer.copy())}

    def load_buffer_state(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer = state["tokens"].numpy().astype(np.int32)

    def leftover_tokens(self) -> int:
        return len(self.buffer)


class PaddedRowsPacker(Packer):
    """Rows of one document each, right-padded to a multiple of 8 and masked."""

    def __init__(
        self, feed: DocumentFeed, rows: int, seq_len: int, emit_position_ids: bool, *, pad_id: int
    ):
        super().__init__(feed, rows, seq_len, emit_position_ids)
        self.pad_id = pad_id

    def _next_rows(self) -> tuple[list[np.ndarray], np.ndarray]:
        """`rows` token arrays and, per row, how many leading tokens carry no loss."""
        raise NotImplementedError

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows, no_loss = self._next_rows()
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        width = min(
            _round_up(int(lengths.max()), PAD_MULTIPLE), _round_up(self.seq_len, PAD_MULTIPLE)
        )
        columns = np.arange(width)
        real = columns < lengths[:, None]
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        input_ids[real] = np.concatenate(rows)
        labels = np.where(real & (columns >= no_loss[:, None]), input_ids, IGNORE_INDEX)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
        }
        if self.emit_position_ids:
            batch["position_ids"] = torch.from_numpy(
                np.broadcast_to(columns, input_ids.shape).copy()
            )
        return batch


class TruncPacker(PaddedRowsPacker):
    """One row per document, cut at seq_len."""

    def needs(self) -> tuple[int, int]:
        return self.rows, 0

    def _next_rows(self) -> tuple[list[np.ndarray], np.ndarray]:
        docs = self.feed.take_documents(self.rows)
        return [doc[: self.seq_len] for doc in docs], np.zeros(len(docs), dtype=np.int64)


class OverflowPacker(PaddedRowsPacker):
    """Each document split into seq_len windows; consecutive windows overlap by `stride`
    tokens, which carry no loss in the later window so no token is trained twice."""

    def __init__(
        self,
        feed: DocumentFeed,
        rows: int,
        seq_len: int,
        emit_position_ids: bool,
        *,
        pad_id: int,
        stride: int,
    ):
        super().__init__(feed, rows, seq_len, emit_position_ids, pad_id=pad_id)
        if not 0 <= stride < seq_len:
            raise ValueError(f"overflow_stride={stride} must be in [0, seq_len={seq_len})")
        self.stride = stride
        self.pending: list[np.ndarray] = []
        self.pending_no_loss: list[int] = []

    def _windows(self, doc: np.ndarray) -> None:
        step = self.seq_len - self.stride
        starts = range(0, max(len(doc) - self.stride, 1), step)
        for start in starts:
            self.pending.append(doc[start : start + self.seq_len])
            self.pending_no_loss.append(self.stride if start else 0)

    def needs(self) -> tuple[int, int]:
        return max(self.rows - len(self.pending), 0), 0  # every document makes a window

    def _next_rows(self) -> tuple[list[np.ndarray], np.ndarray]:
        while len(self.pending) < self.rows:
            for doc in self.feed.take_documents(1):
                self._windows(doc)
        rows, self.pending = self.pending[: self.rows], self.pending[self.rows :]
        no_loss = np.array(self.pending_no_loss[: self.rows], dtype=np.int64)
        del self.pending_no_loss[: self.rows]
        return rows, no_loss

    def buffer_state(self) -> dict[str, torch.Tensor]:
        lengths = [len(row) for row in self.pending]
        tokens = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        return {
            "tokens": torch.from_numpy(tokens.astype(np.int32)),
            "lengths": torch.tensor(lengths, dtype=torch.long),
            "no_loss": torch.tensor(self.pending_no_loss, dtype=torch.long),
        }

    def load_buffer_state(self, state: dict[str, torch.Tensor]) -> None:
        tokens = state["tokens"].numpy().astype(np.int32)
        ends = np.cumsum(state["lengths"].numpy())
        self.pending = np.split(tokens, ends[:-1]) if len(ends) else []
        self.pending_no_loss = state["no_loss"].tolist()

    def leftover_tokens(self) -> int:
        return sum(
            len(row) - skip for row, skip in zip(self.pending, self.pending_no_loss, strict=True)
        )


def make_packer(
    strategy: str,
    feed: DocumentFeed,
    *,
    rows: int,
    seq_len: int,
    eos_id: int,
    pad_id: int,
    overflow_stride: int,
    emit_position_ids: bool,
) -> Packer:
    if strategy == "pack":
        return BlockPacker(feed, rows, seq_len, emit_position_ids, eos_id=eos_id)
    if strategy == "trunc":
        return TruncPacker(feed, rows, seq_len, emit_position_ids, pad_id=pad_id)
    if strategy == "overflow":
        return OverflowPacker(
            feed, rows, seq_len, emit_position_ids, pad_id=pad_id, stride=overflow_stride
        )
    raise ValueError(f"--strategy {strategy} is unknown; choose one of: {', '.join(STRATEGIES)}")
