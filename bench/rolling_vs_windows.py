"""lm-eval's rolling perplexity against the project's window perplexity, on one checkpoint.

    python -m bench.rolling_vs_windows --checkpoint runs/demo/run/step_000300 \\
        --data .cache/demo/eval

Prints one JSON line with two comparisons (docs/downstream.md explains them):

- `documents`: the documents of `--data` as they are, scored by a `loglikelihood_rolling` task
  (each document alone) and by the project's windows of the run's `seq_len` across documents.
  The two protocols differ, and so do their numbers.
- `aligned`: each document cut to its first `seq_len - 2` tokens (those whose text gives the
  same tokens back), scored by the project as windows `[EOS, D, EOS]` and by lm-eval as the
  text `D<|endoftext|>`: the same forward, so the two agree to float precision.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from datas.C4.c4_eval import iter_documents, load_model_for_eval, resolve_eval_data, score_windows
from datas.eval_sets import EvalSpec, evaluate_sets, load_eval_sets
from datas.eval_tasks import evaluate_tasks
from datas.local_corpus import write_jsonl
from datas.tokenizer import load_tokenizer
from utils.checkpoint.layout import run_seq_len

ROLLING_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
"""


def rolling_token_perplexity(model, checkpoint: Path, texts: list[str], seq_len: int, work: Path):
    """lm-eval's rolling task over `texts`: (perplexity per token, bits per byte, tokens)."""
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(texts, work / f"docs_{len(texts)}.jsonl")
    name = f"rolling_{len(texts)}"
    (tasks / f"{name}.yaml").write_text(
        ROLLING_TASK.format(name=name, data=data, cache=work / "cache")
    )
    metrics = evaluate_tasks(
        model, checkpoint, [name], seq_len=seq_len, batch_size=8, include_path=str(tasks)
    )
    tokenizer = load_tokenizer(checkpoint, "--checkpoint")
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    nll = math.log(metrics[f"eval/task/{name}/byte_perplexity"]) * nbytes
    return math.exp(nll / tokens), metrics[f"eval/task/{name}/bits_per_byte"], tokens


def aligned_documents(texts: list[str], tokenizer, length: int) -> list[list[int]]:
    """Each text's first `length` tokens, where decoding and encoding them again is lossless."""
    kept = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        again = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
        if len(ids) == length and again == ids:
            kept.append(ids)
    return kept


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.rolling_vs_windows")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", required=True, help="C4-format documents (a file or directory)")
    parser.add_argument("--seq_len", type=int, help="default: the run's")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or run_seq_len(args.checkpoint)
    if seq_len is None:
        parser.error(f"--checkpoint {args.checkpoint} holds no training record: give --seq_len")
    model = load_model_for_eval(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.checkpoint, "--checkpoint")
    texts = list(iter_documents(resolve_eval_data(args.data)))
    with tempfile.TemporaryDirectory() as work:
        rolling, bits, tokens = rolling_token_perplexity(
            model, args.checkpoint, texts, seq_len, Path(work)
        )
        sets = load_eval_sets([EvalSpec("c4", args.data)], tokenizer, seq_len, None, work)
        windows = evaluate_sets(model, sets, batch_size=8, max_windows=None, seed=0)
        ids = aligned_documents(texts, tokenizer, seq_len - 2)
        eos = tokenizer.eos_token_id
        score = score_windows(model, np.array([[eos, *doc, eos] for doc in ids]), batch_size=8)
        texts_eos = [tokenizer.decode(doc) + tokenizer.eos_token for doc in ids]
        aligned, _, _ = rolling_token_perplexity(
            model, args.checkpoint, texts_eos, seq_len, Path(work)
        )
    result = {
        "documents": {
            "count": len(texts), "rolling_ppl": rolling, "rolling_bits_per_byte": bits,
            "rolling_tokens": tokens, "window_ppl": windows["eval/c4/ppl"],
            "window_tokens": windows["eval/c4/tokens"],
        },
        "aligned": {
            "count": len(ids), "tokens_each": seq_len - 2, "window_ppl": score.ppl,
            "rolling_ppl": aligned,
            "scored_tokens": score.tokens,
        },
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
