#!/usr/bin/env bash
# Train a recipe on one node (or, with NNODES/NODE_RANK/MASTER_ADDR set, one node of several).
#   launch/train.sh RECIPE [key=value ...]
#   NPROC=4 launch/train.sh recipes/demo.yaml parallel.tensor_parallel_size=2 train.zero_stage=2
# NPROC defaults to the node's GPUs (2 without one); MTP_DEVICE=cpu trains on the CPU anyway. Where
# nvidia-smi lists GPUs, MTP_DEVICE=cuda is exported: a torch that cannot use them is refused
# before any process starts (instead of N gloo processes training on the CPU).
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
# one process per GPU of this node by default (2 on a CPU machine or with MTP_DEVICE=cpu)
gpus=0
if [[ ${MTP_DEVICE:-} != cpu ]] && command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if ((gpus > 0)); then default_nproc=$gpus; else default_nproc=2; fi
nproc=${NPROC:-$default_nproc}
if ((gpus > 0)); then
  export MTP_DEVICE=${MTP_DEVICE:-cuda}
  # megatron's TP layers order their kernels on one CUDA queue (it warns otherwise)
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi
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
# A stop request (SIGTERM from a scheduler or `kill`, SIGUSR1 from SLURM preemption) is passed
# to the workers as SIGUSR1: they checkpoint at the end of the step and exit 0, so this script
# exits 0. torchrun itself must not see SIGTERM (it would kill the workers and exit 1): it runs
# in its own session, and ignores USR1 (inherited "ignore"; the workers replace it with the
# trainer's handler). The request is repeated every 10 s in case it reached a worker before its
# handler was installed.
stop=0
forward() {
  stop=1
  echo "[train.sh] stop requested: the workers checkpoint after their current step" >&2
  pkill -USR1 -P "$pid" 2>/dev/null || true
}
trap '' USR1
setsid "$py" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$nproc" \
  -m mtp_megatron train "$recipe" "$@" &
pid=$!
trap forward TERM USR1
trap 'kill -INT -- "-$pid" 2>/dev/null || true' INT
while :; do
  rc=0
  wait "$pid" || rc=$?
  kill -0 "$pid" 2>/dev/null || break
  if ((stop)); then  # woken by a signal; repeat it until the workers have stopped
    sleep 10 &
    wait $! || true
    if kill -0 "$pid" 2>/dev/null; then pkill -USR1 -P "$pid" 2>/dev/null || true; fi
  fi
done
exit "$rc"
