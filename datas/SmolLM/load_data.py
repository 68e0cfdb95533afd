"""Training batches from MDS datasets: a DataLoader over a StreamingDataset, packing in
the main process, exact resume.

Workers read and tokenize whole DataLoader batches of documents; the main process packs
them. streaming hands each worker whole batches in turn and the DataLoader takes them from
the workers in the same turn, so the main process sees this rank's documents in the same
order whatever `num_workers` is. A resume position is therefore just "documents consumed",
and the leftover tokens of the packer.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from datas.mds import (
    TOKENS_COLUMN,
    check_block_length,
    check_first_blocks,
    check_source,
    clean_stale_shared_memory,
    local_dirs,
    make_streaming_dataset,
    parse_sources,
    training_column,
)
from datas.packing import STRATEGIES, DocChunk, DocumentFeed, Packer, make_packer
from datas.tokenizer import encode_documents, load_tokenizer
from utils.distributed import DistEnv, environment_world, gather_from_every_rank
from utils.errors import UserError


def resolve_world(world_size: int | None, global_rank: int | None) -> DistEnv:
    """Rank and world size from the arguments, else from torchrun's environment. streaming
    reads the environment itself, so arguments that disagree with it are an error."""
    world = environment_world()
    size = world.world_size if world_size is None else world_size
    rank = world.rank if global_rank is None else global_rank
    if (size, rank) != (world.world_size, world.rank):
        raise UserError(
            f"world_size={size}, global_rank={rank} disagree with WORLD_SIZE={world.world_size}, "
            f"RANK={world.rank}; launch with torchrun or leave them unset"
        )
    if world.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise UserError(
            f"WORLD_SIZE={world.world_size}: initialize torch.distributed before build_train_loader"
        )
    return world


class TokenizeCollate:
    """Runs in the DataLoader workers: one batch of samples -> one `DocChunk`.

    Text is tokenized in one batched call without special tokens, each document followed by
    EOS; a `tokens` column is used as it is, and its blocks must be `seq_len` long (checked at
    start for local datasets, here for remote ones). The tokenizer loads lazily in each
    process.
    """

    def __init__(self, tokenizer_name: str, eos_id: int | None, seq_len: int) -> None:
        self.tokenizer_name = tokenizer_name
        self.eos_id = eos_id
        self.seq_len = seq_len
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, samples: list[dict[str, Any]]) -> DocChunk:
        if TOKENS_COLUMN in samples[0]:
            arrays = [np.asarray(sample[TOKENS_COLUMN]) for sample in samples]
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            if (lengths != self.seq_len).any():
                raise UserError(
                    f"the data holds pre-tokenized blocks of "
                    f"{lengths[lengths != self.seq_len][0]} tokens, not "
                    f"--seq_len {self.seq_len}; train with that --seq_len or prepare it again"
                )
            return DocChunk(np.concatenate(arrays).astype(np.int32, copy=False), lengths)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, "--tokenizer_dir")
        texts = [sample["text"] for sample in samples]
        return DocChunk(*encode_documents(self._tokenizer, texts, self.eos_id))


class TrainLoader:
    """Endless iterator of batches for this rank, with a collective `state_dict`."""

    def __init__(
        self,
        *,
        dataset: Any,
        dataloader: torch.utils.data.DataLoader,
        strategy: str,
        seq_len: int,
        rows: int,
        world: DistEnv,
        num_canonical_nodes: int,
        shuffle_seed: int,
        special_token_ids: dict[str, int | None],
        pad_token_id: int,
        vocab_size: int,
        overflow_stride: int,
        emit_position_ids: bool,
        pin_memory: bool,
    ) -> None:
        self.dataset = dataset
        self.dataloader = dataloader
        self.strategy = strategy
        self.seq_len = seq_len
        self.world = world
        self.num_canonical_nodes = num_canonical_nodes
        self.shuffle_seed = shuffle_seed
        self.special_token_ids = special_token_ids  # bos, eos and pad of the tokenizer
        eos_token_id = special_token_ids["eos_token_id"]
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        # A bound method of the DataLoader, not a closure over self: a reference cycle through
        # the loader would leave its worker iterator to the garbage collector, which may finalize
        # the index queues first; the workers then never get the stop signal and each is killed
        # only after DataLoader's 5 s join timeout.
        self.feed = DocumentFeed(
            dataloader.__iter__, self._any_rank if world.world_size > 1 else None
        )
        self.packer: Packer = make_packer(
            strategy,
            self.feed,
            rows=rows,
            seq_len=seq_len,
            eos_id=eos_token_id,
            pad_id=pad_token_id,
            overflow_stride=overflow_stride,
            emit_position_ids=emit_position_ids,
        )
        self._skip = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.feed.prepare(self._skip, 0)
        self.feed.discard(self._skip)
        self._skip = 0
        while True:
            self.feed.prepare(*self.packer.needs())
            batch = self.packer.next_batch()
            if self.pin_memory:
                batch = {key: value.pin_memory() for key, value in batch.items()}
            yield batch

    def position(self) -> dict[str, int]:
        """Where this rank's reading stands: documents (samples) handed out since the start of
        training, and the epoch they came from."""
        return {"documents": self.feed.position, "epoch": self.feed.epoch}

    @staticmethod
    def _any_rank(flag: bool) -> bool:
        """True on every rank when `flag` holds on any (a CPU all-reduce: no device sync)."""
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _gather(self, value: Any) -> list[Any]:
        return [value] if self.world.world_size == 1 else gather_from_every_rank(value)

    def state_dict(self) -> dict[str, Any]:
        """This rank's resume state. Collective: every rank must call it at the same step.

        The dataset is checkpointed at the rank that consumed the fewest documents; every
        rank saves how many documents it is ahead of that (`skip`) and its leftover tokens.
        """
        feed = self.feed
        mine = {
            "position": feed.position,
            "epoch": feed.epoch,
            "sample_in_epoch": feed.epoch_offset + feed.in_epoch * self.world.world_size,
        }
        behind = min(self._gather(mine), key=lambda state: state["position"])
        skip = feed.position - behind["position"]
        totals = np.sum(
            self._gather([self.packer.leftover_tokens(), skip, feed.tokens_in_last(skip)]), 0
        )
        initial_nodes = getattr(self.dataset, "initial_physical_nodes", None)
        return {
            "dataset": {
                "epoch": behind["epoch"],
                "sample_in_epoch": behind["sample_in_epoch"],
                "num_canonical_nodes": self.num_canonical_nodes,
                "shuffle_seed": self.shuffle_seed,
                "initial_physical_nodes": initial_nodes or self.world.num_nodes,
            },
            "position": behind["position"],
            "skip": skip,
            "buffer": self.packer.buffer_state(),
            "strategy": self.strategy,
            "seq_len": self.seq_len,
            "holdout_samples": self.dataset.holdout_samples,
            "world_size": self.world.world_size,
            "layout": self.world.layout,
            "rank": self.world.rank,
            "total_leftover_tokens": int(totals[0]),
            "total_ahead_documents": int(totals[1]),
            "total_ahead_tokens": int(totals[2]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped; call before iterating. Same world size and node
        layout: exactly. Otherwise (pass rank 0's state): from the global position, with a
        warning. (States written before the layout was saved count as the same layout.)"""
        self._check_compatible(state)
        dataset_state = dict(state["dataset"])
        saved_layout = state.get("layout", self.world.layout)
        if state["world_size"] == self.world.world_size and saved_layout == self.world.layout:
            self._skip = state["skip"]
            self.packer.load_buffer_state(state["buffer"])
        else:
            dataset_state["sample_in_epoch"] = self._elastic_position(state)
        self.dataset.load_state_dict(dataset_state)
        self.feed.position = state["position"]
        self.feed.epoch = dataset_state["epoch"]
        self.feed.epoch_offset = dataset_state["sample_in_epoch"]
        self.feed.in_epoch = 0

    def _check_compatible(self, state: dict[str, Any]) -> None:
        saved_nodes = state["dataset"]["num_canonical_nodes"]
        if saved_nodes != self.num_canonical_nodes:
            raise UserError(
                f"the checkpoint was written with num_canonical_nodes={saved_nodes}, this "
                f"loader has {self.num_canonical_nodes}; resume with the same value"
            )
        if (state["strategy"], state["seq_len"]) != (self.strategy, self.seq_len):
            raise UserError(
                f"the checkpoint was written with strategy={state['strategy']}, "
                f"seq_len={state['seq_len']}; resume with the same values"
            )
        # Another held-out slice would train on samples the run has evaluated on (or skip
        # some it has trained on), silently.
        saved_holdout = state.get("holdout_samples", 0)
        if saved_holdout != self.dataset.holdout_samples:
            held = (
                f"held out {saved_holdout} samples per source" if saved_holdout else "held out none"
            )
            raise UserError(
                f"the checkpoint's run {held} (--holdout_samples with a train_holdout set in "
                f"--eval_data), this one holds out {self.dataset.holdout_samples}; resume with "
                "the same"
            )

    def _elastic_position(self, state: dict[str, Any]) -> int:
        """Global sample to restart from on a new world size, rounded down to a multiple of
        it so every rank starts at the same per-rank offset; warns what that costs."""
        sample = state["dataset"]["sample_in_epoch"]
        start = sample - sample % self.world.world_size
        saved = _describe_layout(*state.get("layout", [1, state["world_size"]]))
        warnings.warn(
            f"resuming on {_describe_layout(*self.world.layout)} from a checkpoint of {saved}: "
            f"{state['total_leftover_tokens']} tokens left in the saved buffers are skipped; "
            f"{state['total_ahead_documents'] + sample - start} documents "
            f"(about {state['total_ahead_tokens']} tokens and more) are read again",
            stacklevel=2,
        )
        return start


def _leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """SIGTERM sent to a whole process group (SLURM's srun, many schedulers) reaches the
    DataLoader workers too; dead first, they would take the main process down before it can
    finish its step and save. The main process stops them itself when it is done."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def _stop_workers_at_exit() -> None:
    """At interpreter exit multiprocessing stops its daemon children with SIGTERM, which the
    workers ignore, and then waits for them: a main process ending on an error would wait
    forever. Registered after multiprocessing's own exit hook, this runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def _describe_layout(nodes: int, ranks_per_node: int) -> str:
    return f"{nodes} node{'s' * (nodes != 1)} x {ranks_per_node} rank{'s' * (ranks_per_node != 1)}"


def _special_ids(tokenizer: Any, strategy: str, tokenizer_name: str) -> tuple[int | None, int]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None and strategy == "pack":
        raise UserError(
            f"tokenizer {tokenizer_name} has no EOS token, which pack needs to separate "
            "documents; set eos_token in its tokenizer_config.json"
        )
    pad = eos if pad is None else pad
    if pad is None:
        raise UserError(
            f"tokenizer {tokenizer_name} has neither a pad nor an EOS token, which {strategy} "
            "needs for padding; set pad_token in its tokenizer_config.json"
        )
    return eos, pad


def _clean_shared_memory(world: DistEnv, our_locals: list[str]) -> None:
    if world.local_rank == 0:
        clean_stale_shared_memory(our_locals)
    if world.world_size > 1:
        dist.barrier()


def build_train_loader(
    *,
    mds_root: str,
    strategy: str = "pack",
    tokenizer_name: str,
    seq_len: int = 2048,
    micro_blocks: int = 64,
    num_workers: int = 8,
    persistent_workers: bool = True,
    local_cache: str | None = None,
    cache_limit: int | str | None = None,
    shuffle_seed: int = 42,
    predownload: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    pack_batch_texts: int = 512,
    world_size: int | None = None,
    global_rank: int | None = None,
    num_canonical_nodes: int = 64,
    emit_position_ids: bool = False,
    overflow_stride: int = 0,
    holdout_samples: int = 0,
) -> TrainLoader:
    """Build this rank's endless batch iterator over MDS data (docs/data.md)."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy} is unknown; choose one of: {', '.join(STRATEGIES)}")
    world = resolve_world(world_size, global_rank)
    sources = parse_sources(mds_root)
    infos = [check_source(source, cached=local_cache is not None) for source in sources]
    column = training_column(infos, sources)
    check_block_length(infos, sources, seq_len)
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer_dir")
    eos, pad = _special_ids(tokenizer, strategy, tokenizer_name)
    check_first_blocks(infos, len(tokenizer))
    rows = micro_blocks
    if column == TOKENS_COLUMN:
        read_batch = rows
    else:
        read_batch = pack_batch_texts if strategy == "pack" else rows

    _clean_shared_memory(world, local_dirs(sources, local_cache))
    dataset = make_streaming_dataset(
        sources,
        infos,
        local_cache=local_cache,
        batch_size=read_batch,
        num_canonical_nodes=num_canonical_nodes,
        shuffle_seed=shuffle_seed,
        predownload=predownload,
        cache_limit=cache_limit,
        vocab_size=len(tokenizer),
        holdout_samples=holdout_samples,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=read_batch,
        collate_fn=TokenizeCollate(tokenizer_name, eos, seq_len),
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=_leave_sigterm_to_the_main_process,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return TrainLoader(
        dataset=dataset,
        dataloader=dataloader,
        strategy=strategy,
        seq_len=seq_len,
        rows=rows,
        world=world,
        num_canonical_nodes=num_canonical_nodes,
        shuffle_seed=shuffle_seed,
        special_token_ids={
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id,
        },
        pad_token_id=pad,
        vocab_size=len(tokenizer),
        overflow_stride=overflow_stride,
        emit_position_ids=emit_position_ids,
        pin_memory=pin_memory,
    )
