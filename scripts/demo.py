"""The demo: a real, small, offline training run, end to end, on two CPU processes.

1. corpus: the docstrings of Python's standard library (real English, on every machine); the
   last EVAL_DOCS are held out as a validation set in C4's file format;
2. data: written to MDS with the project's preparation tool (`python -m datas.prepare`);
3. tokenizer: a byte-level BPE trained on the training part with `tokenizers`, by the
   project's command (`python -m datas.tokenizer`);
4. model: a tiny Llama config.json;
5. `torchrun --nproc_per_node=2 train.py ...` on CPU (gloo), evaluating perplexity and bits
   per byte every 100 steps on two sets: the held-out documents (`val`) and the last 200 MDS
   samples, which training never reads (`heldout`, `train_holdout`);
6. `python -m utils.compare` on the run: its table, and its loss and perplexity plot.

Steps 1-4 are cached under .cache/demo/; the run and the plot go to runs/demo/: the first
demo is runs/demo/run/ with runs/demo/run.png, a rerun keeps it and writes run-2/ and
run-2.png, then run-3, and so on (nothing a demo wrote is deleted).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datas.local_corpus import (  # noqa: E402
    stdlib_docstrings,
    write_c4_validation,
    write_jsonl,
)
from datas.tokenizer import train_tokenizer  # noqa: E402
from utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402

CACHE = REPO / ".cache" / "demo"
OUTPUT = REPO / "runs" / "demo"
EVAL_DOCS = 300

MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

TRAIN_FLAGS = [
    "--data_name=FineWeb-Edu",
    "--strategy=pack",
    "--seq_len=128",
    "--global_batch=16",
    "--local_batch=4",
    "--train_steps=300",
    "--lr=3e-3",
    "--min_lr=3e-4",
    "--warmup=30",
    "--log_every=25",
    "--save_every=150",
    "--num_workers=1",
    "--enable_tensorboard",
    "--eval_every=100",
    "--eval_max_windows=256",
    "--holdout_samples=200",
]


def build_assets() -> dict[str, Path]:
    """Corpus, held-out set, MDS data, tokenizer and config, each made once."""
    corpus = CACHE / "corpus.jsonl"
    held_out = CACHE / "eval"
    tokenizer = CACHE / "tokenizer"
    mds = CACHE / "mds"
    config = CACHE / "model" / "config.json"
    if not corpus.exists():  # written after the held-out set: a corpus implies the split
        texts = list(stdlib_docstrings())
        print(f"corpus: {len(texts)} standard-library docstrings, the last {EVAL_DOCS} held "
              f"out -> {corpus}, {held_out}", flush=True)  # fmt: skip
        write_c4_validation(texts[-EVAL_DOCS:], held_out)
        write_jsonl(texts[:-EVAL_DOCS], corpus)
        for stale in (tokenizer, mds):  # made from a corpus that held the validation set
            shutil.rmtree(stale, ignore_errors=True)
    if not (tokenizer / "tokenizer.json").exists():
        print(f"tokenizer: byte-level BPE, vocab 2048 -> {tokenizer}", flush=True)
        # What `python -m datas.tokenizer --input CORPUS --vocab_size 2048 --out TOKENIZER`
        # does; overwrite: the cache is the demo's own, and an older demo may have left it.
        train_tokenizer([corpus], tokenizer, MODEL["vocab_size"], overwrite=True)
    if not (mds / "index.json").exists():
        print(f"data: MDS (zstd) -> {mds}", flush=True)
        run([sys.executable, "-m", "datas.prepare", "--input", str(corpus), "--output", str(mds)])
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(MODEL, indent=2))
    return {"data": mds, "tokenizer": tokenizer, "config": config, "eval": held_out}


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, cwd=REPO, check=True)


def new_run_name() -> str:
    """`run` for the first demo, then `run-2`, `run-3`...: the first name whose run directory
    and plot are both free, so a rerun never overwrites an earlier demo."""
    name, n = "run", 1
    while (OUTPUT / name).exists() or (OUTPUT / f"{name}.png").exists():
        n += 1
        name = f"run-{n}"
    return name


def train(assets: dict[str, Path], run_name: str) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "train.py",
        f"--data_dir={assets['data']}",
        f"--tokenizer_dir={assets['tokenizer']}",
        f"--config={assets['config']}",
        f"--output_dir={OUTPUT}",
        f"--tensorboard_dir={OUTPUT / 'tensorboard'}",
        "--eval_data", f"val={assets['eval']}", "heldout=train_holdout",
        f"--run_name={run_name}",
        *TRAIN_FLAGS,
    ]  # fmt: skip
    print("train:", " ".join(cmd), flush=True)
    run(cmd)


def summarize(run_name: str) -> None:
    run_dir = OUTPUT / run_name
    print("\n== demo finished ==", flush=True)
    run([sys.executable, "-m", "utils.compare", str(run_dir), f"--plot={OUTPUT / run_name}.png"])
    checkpoints = sorted(p.name for p in run_dir.glob("step_*"))
    print(f"checkpoints: {run_dir} ({', '.join(checkpoints)})")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}")
    print(f"tensorboard: tensorboard --logdir {OUTPUT / 'tensorboard'}")


def build_parser() -> ArgumentParser:
    return ArgumentParser(
        prog="scripts/demo.py",
        description="A real, small, offline training run on two CPU processes (torchrun, "
        "gloo): builds a corpus, MDS data, a tokenizer and a tiny Llama config once under "
        ".cache/demo/, trains 300 steps, and plots loss and C4 perplexity. Each demo is a "
        "new run in runs/demo/ (run, run-2, run-3, ...); earlier ones are kept. Takes no "
        "options.",
    )


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        build_parser().parse_args(argv)
    run_name = new_run_name()
    train(build_assets(), run_name)
    summarize(run_name)


if __name__ == "__main__":
    main()
