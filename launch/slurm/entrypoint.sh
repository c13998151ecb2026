#!/usr/bin/env bash
# One per node, started by train.sbatch's `srun --ntasks-per-node=1`: torchrun with NPROC workers
# joining a c10d rendezvous hosted on the first node of the allocation.
#   entrypoint.sh RECIPE [key=value ...]      (env: NPROC, PYTHON, MASTER_PORT to override the port)
set -euo pipefail
: "${SLURM_JOB_ID:?run me inside a SLURM job step (srun)}"
here=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
[[ -x $py ]] || py=python3

# the rendezvous host: the first node of the allocation, by its NodeAddr (MASTER_ADDR overrides)
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=${MASTER_ADDR:-$(scontrol -o show node "$head_node" 2>/dev/null |
  sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
head_addr=${head_addr:-$head_node}
# one port per job (array tasks have their own job ids), stable across requeues of the job
port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
nnodes=${SLURM_NNODES:-1}
nproc=${NPROC:-1}
# node 0 hosts the c10d store; said explicitly rather than guessed from hostnames
is_host=$([[ ${SLURM_NODEID:-0} == 0 ]] && echo 1 || echo 0)
echo "[entrypoint] $(hostname) (${SLURMD_NODENAME:-?}): node ${SLURM_NODEID:-0} of $nnodes," \
  "$nproc processes, rendezvous $head_addr:$port id $SLURM_JOB_ID"

# A signal to the job step reaches every process of it: torchrun would die of SIGUSR1 (default
# action), so it inherits "ignore"; the workers replace that with the trainer's handler, which
# checkpoints at the end of the step and exits 0, and torchrun then exits 0 too.
trap '' USR1
export PYTHONUNBUFFERED=1
# megatron's TP layers order their kernels on one CUDA queue (it warns otherwise)
if [[ -n ${SLURM_GPUS_ON_NODE:-} || -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi
exec "$py" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" \
  --rdzv_backend c10d --rdzv_endpoint "$head_addr:$port" --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_conf "is_host=$is_host" \
  -m mtp_megatron train "$@"
