#!/usr/bin/env bash
# Train a recipe on one node (or, with NNODES/NODE_RANK/MASTER_ADDR set, one node of several).
#   launch/train.sh RECIPE [key=value ...]
#   NPROC=4 launch/train.sh recipes/demo.yaml parallel.tensor_parallel_size=2 train.zero_stage=2
# The recipe is validated for the whole world before any process starts.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 RECIPE [key=value ...]   (env: NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)" >&2
  exit 2
fi
recipe=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
[[ -x $py ]] || py=python3
nproc=${NPROC:-2}
nnodes=${NNODES:-1}

"$py" -m mtp_megatron check "$recipe" "$@" --nproc "$nproc" --nnodes "$nnodes"

if [[ $nnodes -gt 1 ]]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the first node address}"
  rdzv=(--nnodes "$nnodes" --node_rank "${NODE_RANK:?set NODE_RANK}"
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
        --rdzv_id "${RDZV_ID:-mtp-$(basename "$recipe" .yaml)}")
else
  rdzv=(--standalone)
fi
exec "$py" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$nproc" \
  -m mtp_megatron train "$recipe" "$@"
