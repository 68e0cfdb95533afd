#!/usr/bin/env bash
# The GPU checks of issues #6 and #7 in one call on a one-GPU machine (see README, GPU check):
#   1. bench.throughput, TinyLlama-1.1B shape, seq 2048, micro-batch 8, against the baseline;
#   2. bench.throughput, llama-130m, seq 256, micro-batch 128, real loader on pre-tokenized
#      blocks, against the baseline;
#   3. bench.slt, llama-130m, seq 256, micro-batch 64, every method against dense;
#   4. a short slt training run (bf16, compile, chunked loss, full checkpoint) and its resume.
# mosaicml-streaming is installed from wheels in .whl/ (git-ignored) when the image lacks it (download
# them beforehand as DESIGN.md says, and carry the folder). Prints the JSON lines last.
# STAGES="1 2" runs only those stages (all four may not fit in one 10-minute device call).
set -uo pipefail
STAGES=${STAGES:-1 2 3 4}
want() { [[ " $STAGES " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}
A=/tmp/gpu_assets
mkdir -p "$OUT" "$A"
if ! python -c "import streaming" 2>/dev/null; then
  pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
fi
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"

python - <<'PY'
from pathlib import Path

from datas.local_corpus import stdlib_docstrings, train_byte_bpe, write_jsonl
from datas.prepare import prepare_mds

assets = Path("/tmp/gpu_assets")
docs = list(stdlib_docstrings())
write_jsonl(docs, assets / "corpus" / "docs.jsonl")
train_byte_bpe(docs, assets / "tok", vocab_size=2048)
prepare_mds([assets / "corpus"], assets / "blocks256", tokenizer=str(assets / "tok"),
            seq_len=256, progress=False)
print("assets ready")
PY

if want 1; then
echo "== 1: tinyllama-1.1b, seq 2048"
python -m bench.throughput --config tinyllama-1.1b --seq_len 2048 --local_batch 8 --baseline \
  --json | tee "$OUT/throughput_1b.txt"
fi
if want 2; then
echo "== 2: llama-130m, seq 256, real loader"
python -m bench.throughput --config llama-130m --seq_len 256 --local_batch 128 --baseline \
  --json --data_dir "$A/blocks256" --tokenizer_dir "$A/tok" --num_workers 4 \
  --num_canonical_nodes 1 | tee "$OUT/throughput_130m.txt"
fi
if want 3; then
echo "== 3: slt methods, llama-130m"
python -m bench.slt --config llama-130m --seq_len 256 --local_batch 64 --steps 10 \
  --device cuda --json | tee "$OUT/slt.txt"
fi
if want 4; then
echo "== 4: slt training, bf16 + compile + chunked loss, full checkpoint, resume"
echo '{"method": "magnitude", "final_sparsity": 0.5, "end_step": 20, "update_every": 5}' \
  > "$A/slt.json"
for run in first resumed; do
  resume=()
  [ "$run" = resumed ] && resume=(--resume_dir /tmp/gpu_runs/slt/step_000020)
  torchrun --standalone --nproc_per_node=1 train.py --data_dir "$A/blocks256" \
    --tokenizer_dir "$A/tok" --config llama-60m --seq_len 256 --global_batch 64 \
    --local_batch 64 --train_steps 40 --warmup 5 --lr 3e-3 --bf16 --enable_slt \
    --slt_config "$A/slt.json" --ckpt_type full --save_every 20 --log_every 10 \
    --num_canonical_nodes 1 --output_dir /tmp/gpu_runs --run_name "slt_$run" \
    "${resume[@]}" 2>&1 | grep -E "error|Error|^step|resumed|slt " | tail -8
  [ "$run" = first ] && mv /tmp/gpu_runs/slt_first /tmp/gpu_runs/slt
done
fi
echo "== JSON"
for f in "$OUT"/*.txt; do tail -n 1 "$f"; done
