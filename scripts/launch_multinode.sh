#!/usr/bin/env bash
# Start train.py on this node of a multi-node job. Run the same command on every node with
# its own NODE_RANK (0 .. NNODES-1); MASTER_ADDR is node 0's address, reachable by all.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_multinode.sh --args_file run.yaml
#
# Extra arguments go to train.py. Re-running the same command after a failure resumes only if
# the args include --resume_dir.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NNODES:=4}" "${GPUS_PER_NODE:=8}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
: "${MASTER_PORT:=29500}" "${PYTHON:=.venv/bin/python}"

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" \
  train.py "$@"
