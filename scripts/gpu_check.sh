#!/usr/bin/env bash
# The GPU checks of issues #6, #7 and #18 on a one-GPU machine (see docs/gpu_check.md), by stage:
#   1. tinyllama-1.1b, seq 2048, micro-batch 8: the default path against the baseline, profiled;
#   2. llama-130m, seq 256, micro-batch 128, the real loader on pre-tokenized blocks, against
#      the baseline, profiled;
#   3. tinyllama-1.1b variants, project only: cuDNN attention, micro-batch 16, ZeRO-2, float8
#      (the cuDNN runs are profiled: their top kernels show whether cuDNN ran, as SDPA falls
#      back to its next backend for a call cuDNN cannot take);
#   4. llama-130m variants, project only: cuDNN attention, no_shard, micro-batch 256;
#   5. bench.slt, llama-130m, seq 256, micro-batch 64, every method against dense;
#   6. a short slt training run (bf16, compile, chunked loss, full checkpoint) and its resume;
#   7. the recipe: train.py with its defaults and --bf16, text packed on the fly, C4 eval, a
#      shard checkpoint, and the same run resumed from it by --resume_dir auto; the first run
#      also profiles steps 10-11 and dumps the CUDA allocator's history.
# Wheels in .whl/ (git-ignored, made here by scripts/gpu_wheels.sh: mosaicml-streaming and what
# it needs, torchao) are installed when the image lacks streaming; carry the folder. STAGES="1 2"
# picks stages: a device call lasts at most 10 minutes, and stages 1-2 and 3-4 each take about
# five (compiling dominates).
# Each benchmark's JSON line goes to $OUT/<name>.json (the device tool brings back 8 files at
# most: logs stay in /tmp/gpu_logs); a table of them all comes last.
# EXTRA is appended to every benchmark's flags and TRAIN_EXTRA to the train.py runs' of stages
# 6 and 7, and the last wins: that is how the script is rehearsed on a CPU (the command is in
# docs/gpu_check.md). Stages run in the order
# STAGES names them. PY names the interpreter (default python3, the GPU image's). Each run is
# stopped after LIMIT seconds (default 300), so that a hang costs one check, not the call.
set -uo pipefail
STAGES=${STAGES:-1 2}
PY=${PY:-python3}
LIMIT=${LIMIT:-300}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a TRAIN_EXTRA <<< "${TRAIN_EXTRA:-}"
want() { [[ " $STAGES " == *" $1 "* ]]; }
for stage in $STAGES; do
  [[ $stage =~ ^[1-7]$ ]] || { echo "error: STAGES: no stage '$stage' (they are 1 to 7)"; exit 2; }
done
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}
A=/tmp/gpu_assets
LOGS=/tmp/gpu_logs
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
mkdir -p "$OUT" "$A" "$LOGS"
if ! "$PY" -c "import streaming" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/: run scripts/gpu_wheels.sh \
where PyPI is reachable, and carry .whl"; exit 2; }
  "$PY" -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

limited() {  # limited CMD...: CMD, stopped after $LIMIT seconds, so that a hang costs one check
  timeout --kill-after=20 "$LIMIT" "$@"
  local status=$?
  [[ $status = 124 || $status = 137 ]] && echo "error: stopped after $LIMIT s: $*"
  return "$status"
}
bench() {  # bench NAME FLAGS...: one bench.throughput run, its JSON line kept as NAME.json
  local name=$1
  shift
  echo "== $name: $*"
  limited "$PY" -m bench.throughput --json "$@" "${EXTRA[@]}" 2>&1 |
    grep -v "is an Enum subclass" | tee "$LOGS/$name.log"
  tail -n 1 "$LOGS/$name.log" | grep '^{' > "$OUT/$name.json" || rm -f "$OUT/$name.json"
}
B1=(--config tinyllama-1.1b --seq_len 2048)
B130=(--config llama-130m --seq_len 256 --data_dir "$A/blocks256" --tokenizer_dir "$A/tok"
      --num_workers 4 --num_canonical_nodes 1)

if { want 2 || want 4 || want 6 || want 7; } && [ ! -e "$A/ready" ]; then  # once per machine
"$PY" - <<'PY'
import shutil
from pathlib import Path

from datas.local_corpus import stdlib_docstrings, train_byte_bpe, write_c4_validation, write_jsonl
from datas.prepare import prepare_mds

assets = Path("/tmp/gpu_assets")
for stale in ("blocks256", "text"):  # left by an attempt that stopped half-way
    shutil.rmtree(assets / stale, ignore_errors=True)
docs = list(stdlib_docstrings())
held_out, train_docs = docs[-300:], docs[:-300]
# 12 copies: 17,676 blocks of 256 tokens, so the timed steps of stage 2 never cross an epoch
# boundary (one copy is 1,473 blocks, 11 steps of 128).
write_jsonl(train_docs * 12, assets / "corpus" / "docs.jsonl")
train_byte_bpe(train_docs, assets / "tok", vocab_size=2048)
prepare_mds([assets / "corpus"], assets / "blocks256", tokenizer=str(assets / "tok"),
            seq_len=256, progress=False)
prepare_mds([assets / "corpus"], assets / "text", progress=False)
write_c4_validation(held_out, assets / "eval")
(assets / "ready").touch()
print("assets ready")
PY
fi

stage1() { bench 1b_default "${B1[@]}" --local_batch 8 --baseline --profile 2; }
stage2() { bench 130m_default "${B130[@]}" --local_batch 128 --baseline --profile 3; }
stage3() {
  bench 1b_cudnn "${B1[@]}" --local_batch 8 --attention_kernel cudnn --profile 1
  bench 1b_mb16 "${B1[@]}" --local_batch 16
  bench 1b_zero2 "${B1[@]}" --local_batch 8 --sharding_strategy shard_grad_op
  bench 1b_float8 "${B1[@]}" --local_batch 8 --float8
}
stage4() {
  bench 130m_cudnn "${B130[@]}" --local_batch 128 --attention_kernel cudnn --profile 1
  bench 130m_noshard "${B130[@]}" --local_batch 128 --sharding_strategy no_shard
  bench 130m_mb256 "${B130[@]}" --local_batch 256
}
stage5() {
  echo "== 5: slt methods, llama-130m"
  limited "$PY" -m bench.slt --config llama-130m --seq_len 256 --local_batch 64 --steps 10 \
    --device cuda --json | tee "$LOGS/slt.log"
}
stage6() {
  echo "== 6: slt training, bf16 + compile + chunked loss, full checkpoint, resume"
  echo '{"method": "magnitude", "final_sparsity": 0.5, "end_step": 20, "update_every": 5}' \
    > "$A/slt.json"
  rm -rf /tmp/gpu_runs/slt /tmp/gpu_runs/slt_resumed
  slt_run slt || return
  slt_run slt_resumed --resume_dir /tmp/gpu_runs/slt/step_000020
}
slt_run() {  # slt_run NAME FLAGS...: one stage-6 run; fails when train.py does
  limited "${TORCHRUN[@]}" train.py --data_dir "$A/blocks256" \
    --tokenizer_dir "$A/tok" --config llama-60m --seq_len 256 --global_batch 64 \
    --local_batch 64 --train_steps 40 --warmup 5 --lr 3e-3 --bf16 --enable_slt \
    --slt_config "$A/slt.json" --ckpt_type full --save_every 20 --log_every 10 \
    --num_canonical_nodes 1 --output_dir /tmp/gpu_runs --run_name "$1" "${@:2}" \
    "${TRAIN_EXTRA[@]}" > "$LOGS/$1.log" 2>&1
  report_run "$1" $?
}
report_run() {  # report_run NAME STATUS: the end of a train.py log; fails when STATUS does
  echo "$1: exit $2"
  grep -E "error|Error|resumed|^step|eval|slt " "$LOGS/$1.log" | tail -12
  return "$2"
}
stage7() {
  echo "== 7: the recipe: defaults + --bf16, eval, shard checkpoints; resumed from step 30 by auto"
  recipe=(--data_dir "$A/text" --tokenizer_dir "$A/tok" --config llama-60m --seq_len 512 --bf16
          --global_batch 64 --local_batch 32 --train_steps 60 --warmup 10 --lr 3e-3 --log_every 5
          --save_every 30 --eval_every 30 --eval_data "$A/eval" --num_workers 4
          --num_canonical_nodes 1 --output_dir /tmp/gpu_runs --resume_dir auto)
  rm -rf /tmp/gpu_runs/recipe /tmp/gpu_runs/recipe_resumed
  limited "${TORCHRUN[@]}" train.py "${recipe[@]}" --run_name recipe \
    --profile_steps 10:11 --memory_snapshot "${TRAIN_EXTRA[@]}" > "$LOGS/recipe.log" 2>&1
  report_run recipe $? || return
  mkdir -p /tmp/gpu_runs/recipe_resumed  # holding only the first run's step-30 checkpoint
  cp -r /tmp/gpu_runs/recipe/step_000030 /tmp/gpu_runs/recipe_resumed/
  limited "${TORCHRUN[@]}" train.py "${recipe[@]}" --run_name recipe_resumed "${TRAIN_EXTRA[@]}" \
    > "$LOGS/recipe_resumed.log" 2>&1
  report_run recipe_resumed $? || return
  "$PY" - <<'PY' | tee "$OUT/recipe.txt"
import json

def records(run):
    with open(f"/tmp/gpu_runs/{run}/metrics.jsonl") as f:
        return {(r["step"], key): value for r in map(json.loads, f)
                for key, value in r.items() if key in ("loss", "eval/c4_ppl")}

first, resumed = records("recipe"), records("recipe_resumed")
shared = sorted(k for k in resumed if k in first)
print("step | metric | uninterrupted | resumed from step 30 | difference")
for key in shared:
    print(f"{key[0]} | {key[1]} | {first[key]:.6f} | {resumed[key]:.6f} | {resumed[key] - first[key]:+.2e}")
print("max |difference|:", max((abs(resumed[k] - first[k]) for k in shared), default="no steps"))
PY
  "$PY" -m utils.compare /tmp/gpu_runs/recipe /tmp/gpu_runs/recipe_resumed | tee -a "$OUT/recipe.txt"
  "$PY" - <<'PY' | tee -a "$OUT/recipe.txt"
import collections
import json
from pathlib import Path

run = Path("/tmp/gpu_runs/recipe")
for trace in sorted(run.glob("profile/*/rank_*.json")):
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = collections.Counter()
    for event in events:
        if event.get("cat") == "kernel":
            kernels[event["name"][:70]] += event.get("dur", 0)
    steps = sum(1 for e in events if e.get("name", "").startswith("Optimizer.step"))
    print(f"{trace.relative_to(run)}: {trace.stat().st_size / 1e6:.1f} MB, {steps} Optimizer.step "
          f"events, {len(kernels)} CUDA kernels; the most time:")
    for name, micros in kernels.most_common(6):
        print(f"  {micros / 1e3:8.2f} ms  {name}")
snapshots = sorted(run.glob("memory_snapshot/*"))
print("memory snapshots:", ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in snapshots) or "none")
PY
}

for stage in $STAGES; do
  "stage$stage"
done

echo "== summary (tokens/s per GPU; MFU of 989 TFLOP/s; float8 has none)"
"$PY" - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

def cell(value, form):
    return "-" if value is None else format(value, form)

print("| run | tokens/s | MFU | peak GB | data wait | baseline tokens/s | baseline MFU | baseline GB | speedup |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    print(f"| {path.stem} | {cell(r['tokens_per_s'], ',.0f')} | {cell(r['mfu'], '.1%')} | "
          f"{cell(r['peak_mem_gb'], '.1f')} | {cell(r['data_wait_fraction'], '.2%')} | "
          f"{cell(r.get('baseline_tokens_per_s'), ',.0f')} | {cell(r.get('baseline_mfu'), '.1%')} | "
          f"{cell(r.get('baseline_peak_mem_gb'), '.1f')} | {cell(r.get('speedup'), '.3f')} |")
    for prefix in ("", "baseline_"):
        profile = r.get(f"{prefix}profile")
        if profile:
            kinds = ", ".join(f"{k} {v / profile['step_ms']:.0%}" for k, v in profile["kinds_ms"].items())
            print(f"|   {prefix or 'project '}profile | {profile['step_ms']:.0f} ms/step: {kinds}, "
                  f"uncovered {profile['uncovered_fraction']:.0%}, "
                  f"{profile['host_reads_per_step']:g} device-to-host copies | | | | | | | |")
PY
