"""Run by tests/test_data_distributed.py under `torchrun --nproc_per_node=2` (gloo).

Each rank writes OUT/rank{r}.json with what the test asserts on, and rank 0 also saves its
pack state for the elastic-resume test. Usage: data_dist.py OUT MDS_TEXT MDS_TOKENS TOKENIZER
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from datas.SmolLM.load_data import build_train_loader

EPOCH_BATCHES = 32  # 256 documents / 2 ranks / 4 rows


def loader(mds: str, tokenizer: str, **kwargs):
    options = dict(seq_len=64, micro_blocks=4, num_workers=0)
    options |= dict(num_canonical_nodes=2, pack_batch_texts=16) | kwargs
    return build_train_loader(mds_root=mds, tokenizer_name=tokenizer, **options)


def rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's real tokens."""
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def epochs_of_whole_documents(mds: str, tokenizer: str) -> list[list[list[int]]]:
    """trunc with a seq_len above any document: each row is a whole document. Two and a
    half epochs, so that both ranks roll over twice."""
    iterator = iter(loader(mds, tokenizer, strategy="trunc", seq_len=1 << 16))
    batches = [rows(next(iterator)) for _ in range(EPOCH_BATCHES * 5 // 2)]
    return [sum(batches[i : i + EPOCH_BATCHES], []) for i in (0, EPOCH_BATCHES)]


def pack_resume(mds: str, tokenizer: str, out: Path, rank: int) -> dict:
    """Resume on 2 ranks with 2 workers: the next batches equal the uninterrupted ones."""
    first = loader(mds, tokenizer, strategy="pack", num_workers=2)
    iterator = iter(first)
    for _ in range(7):
        next(iterator)
    state = first.state_dict()
    if rank == 0:
        torch.save(state, out / "pack_state_rank0.pt")
    expected = [next(iterator)["input_ids"] for _ in range(4)]
    del iterator, first
    gc.collect()
    resumed = loader(mds, tokenizer, strategy="pack", num_workers=2)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    got = [next(iterator)["input_ids"] for _ in range(4)]
    equal = all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    return {
        "resume_equal": equal,
        "skip": state["skip"],
        "leftover": len(state["buffer"]["tokens"]),
    }


def pack_rollover(mds: str, tokenizer: str) -> dict:
    """Packing takes documents at a different rate on each rank, so the ranks reach the end of
    an epoch at different batches; streaming starts an epoch with a node-wide barrier, which
    must not deadlock with the ranks' other collectives. Runs into the second epoch."""
    pack = loader(mds, tokenizer, strategy="pack", num_workers=1)
    iterator = iter(pack)
    epoch_at_batch = []
    for _ in range(EPOCH_BATCHES * 4):
        next(iterator)
        epoch_at_batch.append(pack.feed.epoch)
    return {"rollover_epochs": epoch_at_batch}


def token_blocks(mds: str, tokenizer: str) -> list[list[list[int]]]:
    """Pre-tokenized blocks, 2 rows per rank and step (the test compares with 4 rows on 1)."""
    iterator = iter(loader(mds, tokenizer, strategy="pack", micro_blocks=2))
    return [next(iterator)["input_ids"].tolist() for _ in range(5)]


def main() -> None:
    out, mds_text, mds_tokens, tokenizer = sys.argv[1:5]
    out = Path(out)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "epochs": epochs_of_whole_documents(mds_text, tokenizer),
        "token_blocks": token_blocks(mds_tokens, tokenizer),
        **pack_rollover(mds_text, tokenizer),
        **pack_resume(mds_text, tokenizer, out, rank),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
