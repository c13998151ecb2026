#!/usr/bin/env bash
# Validate one recipe for the whole world, then submit it with train.sbatch.
#   launch/slurm/submit.sh [--nodes M] [--nproc N] [--dry-run] RECIPE [key=value ...] [-- sbatch opts]
#   launch/slurm/submit.sh --nodes 4 --nproc 8 recipes/demo.yaml -- --gpus-per-node=8 --time=12:00:00
# The run directory is pinned (train.run_dir, default runs/<recipe name>) so a requeued job resumes
# from its checkpoints. Log: runs/slurm/<job name>-<job id>.out.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[[ -x $py ]] || py=python3

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "$1"; }
nodes=1 nproc=${NPROC:-} dry_run=0 args=() sbatch_opts=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) nodes=${2:?}; shift 2 ;;
    --nproc) nproc=${2:?}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; sbatch_opts=("$@"); break ;;
    -*) echo "error: unknown option $1 (sbatch options go after --)" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# processes per node: --nproc, else $NPROC, else the GPUs requested per node, else 1
source "$repo/launch/slurm/common.sh"
nproc=${nproc:-$(gpus_per_node "${sbatch_opts[@]}")}
nproc=${nproc:-1}
[[ ${#args[@]} -gt 0 ]] || usage 2
recipe=$(realpath "${args[0]}" 2>/dev/null || echo "${args[0]}")
overrides=("${args[@]:1}")

resolved=$("$py" -m mtp_megatron sweep job "$recipe" "${overrides[@]}" --nproc "$nproc" \
  --nnodes "$nodes") || exit 2
IFS=$'\t' read -r run_dir _ <<<"$resolved"
name=$(basename "$run_dir")
# pinned as an absolute path (replacing a relative one): the requeued job finds its checkpoints
kept=()
for o in "${overrides[@]}"; do [[ $o == train.run_dir=* ]] || kept+=("$o"); done
overrides=("${kept[@]}" "train.run_dir=$run_dir")
cmd=(sbatch --parsable --job-name="mtp-$name" --nodes="$nodes" --output="$PWD/runs/slurm/%x-%j.out"
     --export="ALL,MTP_REPO=$repo,NPROC=$nproc" "${sbatch_opts[@]}"
     "$repo/launch/slurm/train.sbatch" "$recipe" "${overrides[@]}")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
mkdir -p runs/slurm
job=$("${cmd[@]}")
echo "submitted job $job: $run_dir (log: runs/slurm/mtp-$name-$job.out)"
