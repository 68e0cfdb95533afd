"""Loader throughput against the raw batched tokenizer, on the same documents, in one run.

    python -m bench.loader [--docs N] [--seq_len 512] [--repeats 3]

Everything runs in one process (num_workers=0), so the numbers are per DataLoader worker;
the tokenizer's own thread pool is off (TOKENIZERS_PARALLELISM=false) for the same reason.
Documents: standard-library docstrings; tokenizer: a byte-level BPE trained on them.
Every path is measured `--repeats` times, the paths taking turns, and its best rate is kept:
on a shared machine a single pass compares whatever else happened to run at the time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

from datas.local_corpus import stdlib_docstrings, train_byte_bpe, write_jsonl  # noqa: E402
from datas.packing import token_count  # noqa: E402
from datas.prepare import prepare_mds  # noqa: E402
from datas.SmolLM.load_data import build_train_loader  # noqa: E402

BATCH_TEXTS = 512


def raw_tokenizer_rate(docs: list[str], tokenizer_dir: Path) -> tuple[float, float]:
    """Tokens/s of `tokenizer(batch)` and of the backend's encode_batch_fast."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    backend = tokenizer.backend_tokenizer
    batches = [docs[i : i + BATCH_TEXTS] for i in range(0, len(docs), BATCH_TEXTS)]
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        tokens += sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
    hf_rate = tokens / (time.perf_counter() - start)
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        tokens += sum(
            len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False)
        )
    return hf_rate, tokens / (time.perf_counter() - start)


def loader_rate(
    mds: Path, tokenizer_dir: Path, strategy: str, seq_len: int, tokens: int
) -> tuple[float, float]:
    """(tokens/s after the first batch, seconds from build to first batch) for ~`tokens`."""
    start = time.perf_counter()
    loader = build_train_loader(
        mds_root=str(mds),
        tokenizer_name=str(tokenizer_dir),
        strategy=strategy,
        seq_len=seq_len,
        micro_blocks=16,
        num_workers=0,
        num_canonical_nodes=1,
        pack_batch_texts=BATCH_TEXTS,
    )
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start, delivered = time.perf_counter(), 0
    while delivered < tokens:
        delivered += token_count(next(iterator))
    return delivered / (time.perf_counter() - start), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=2000, help="number of documents")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="passes over every path")
    args = parser.parse_args()
    docs = list(stdlib_docstrings())[: args.docs]
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    tokenizer_dir = train_byte_bpe(docs, work / "tokenizer", vocab_size=1024)
    write_jsonl(docs, work / "in" / "docs.jsonl")
    prepare_mds([work / "in"], work / "text", progress=False)
    stats = prepare_mds(
        [work / "in"],
        work / "tokens",
        tokenizer=str(tokenizer_dir),
        seq_len=args.seq_len,
        progress=False,
    )
    # About one epoch of the text, so that every measured batch is tokenized on the fly.
    epoch_tokens = int(stats.tokens * 0.9)
    best: dict[str, tuple[float, float | None]] = {}

    def keep(name: str, rate: float, first: float | None) -> None:
        if name not in best or rate > best[name][0]:
            best[name] = (rate, first)

    for _ in range(args.repeats):
        hf_rate, fast_rate = raw_tokenizer_rate(docs, tokenizer_dir)
        keep("raw tokenizer(batch)", hf_rate, None)
        keep("raw encode_batch_fast", fast_rate, None)
        for strategy in ("pack", "overflow", "trunc"):
            keep(
                f"loader {strategy}",
                *loader_rate(work / "text", tokenizer_dir, strategy, args.seq_len, epoch_tokens),
            )
        keep(
            "loader pre-tokenized",
            *loader_rate(work / "tokens", tokenizer_dir, "pack", args.seq_len, 20 * epoch_tokens),
        )

    raw = max(best["raw tokenizer(batch)"][0], best["raw encode_batch_fast"][0])
    print(
        f"\n{len(docs)} documents, {stats.tokens} tokens, seq_len {args.seq_len}, one process, "
        f"best of {args.repeats}"
    )
    print(f"| {'path':<22} | {'tokens/s':>10} | {'vs raw':>7} | {'first batch':>11} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 9}|{'-' * 13}|")
    for name, (rate, first) in best.items():
        first_text = "" if first is None else f"{first:.2f} s"
        print(f"| {name:<22} | {rate:>10,.0f} | {rate / raw:>6.0%} | {first_text:>11} |")


if __name__ == "__main__":
    main()
