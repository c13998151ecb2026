#!/usr/bin/env bash
# Submit a set of ablation runs as ONE SLURM job array: one array task per run, each in its own
# run directory RUNS/NAME/<run name>. Every run is validated before anything is submitted.
#
#   launch/slurm/sweep.sh [options] RECIPE|FOLDER ... [key=value ...] [-- sbatch options]
#
#   launch/slurm/sweep.sh recipes/ablations/ train.steps=2000 -- --time=08:00:00 --gpus-per-node=8
#   launch/slurm/sweep.sh recipes/ablations/ntp.yaml recipes/ablations/mtp_k2.yaml --name k
#   launch/slurm/sweep.sh recipes/demo.yaml --grid model.mtp.mtp_head_type=mlp,transformer
#   launch/slurm/sweep.sh recipes/demo.yaml --zip model.mtp.num_predict_tokens=1,2,4 \
#                                           --zip model.mtp.speculation_lookahead=1,2,3
# Options:
#   --name NAME        sweep name (default: the folder's name, or the recipe's for one recipe)
#   --runs DIR         parent of the sweep folder (default: runs)
#   --grid KEY=V1,V2   an axis of the override grid; several --grid: their product
#   --zip KEY=V1,V2    axes that advance together (same length); times the --grid product
#   --nodes M          nodes per run (default 1)
#   --nproc N          processes per node (default: $NPROC, else --gpus-per-node, else 1)
#   --max-parallel P   run at most P array tasks at once
#   --dry-run          validate and print the sbatch command; submit nothing
# key=value words apply to every run. Everything after `--` goes to sbatch (--time, --partition,
# --gpus-per-node, --cpus-per-task, --account, ...). Logs: RUNS/NAME/_slurm/logs/%x-%A_%a.out.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[[ -x $py ]] || py=python3

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
name='' runs=runs nodes=1 nproc=${NPROC:-} max_parallel='' dry_run=0
items=() axes=() sbatch_opts=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --runs) runs=${2:?--runs needs a value}; shift 2 ;;
    --grid | --zip) axes+=("$1" "${2:?$1 needs KEY=V1,V2}"); shift 2 ;;
    --nodes) nodes=${2:?}; shift 2 ;;
    --nproc) nproc=${2:?}; shift 2 ;;
    --max-parallel) max_parallel=${2:?}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; sbatch_opts=("$@"); break ;;
    -*) echo "error: unknown option $1 (options go before --; sbatch options after it)" >&2; exit 2 ;;
    *) items+=("$1"); shift ;;
  esac
done
# processes per node: --nproc, else $NPROC, else the GPUs requested per node, else 1
source "$repo/launch/slurm/common.sh"
nproc=${nproc:-$(gpus_per_node "${sbatch_opts[@]}")}
nproc=${nproc:-1}
[[ ${#items[@]} -gt 0 ]] || { echo "error: no recipes given" >&2; usage; }
# instant checks of the paths (the planner repeats them, then validates every run's recipe)
errors=()
for item in "${items[@]}"; do
  if [[ -d $item ]]; then
    compgen -G "${item%/}/*.yaml" >/dev/null || compgen -G "${item%/}/*.yml" >/dev/null ||
      errors+=("folder '$item' holds no recipes (*.yaml)")
  elif [[ ! -e $item && $item != *=* ]]; then
    errors+=("recipe '$item' does not exist")
  fi
done
if [[ ${#errors[@]} -gt 0 ]]; then
  printf 'error: %s\n' "${errors[@]}" >&2
  exit 2
fi
if [[ -z $name ]]; then
  first=${items[0]%/}
  if [[ -d $first ]]; then name=$(basename "$first")
  elif [[ ${#items[@]} -eq 1 || ${items[1]} == *=* ]]; then name=$(basename "$first" .yaml)
  else name=$(basename "$(dirname "$first")"); fi
fi
mkdir -p "$runs"
sweep_dir=$(cd "$runs" && pwd)/$name

plan=("$py" -m mtp_megatron sweep plan --sweep-dir "$sweep_dir" --nproc "$nproc"
      --nnodes "$nodes" "${axes[@]}" "${items[@]}")
((dry_run)) && plan+=(--dry-run)
n=$("${plan[@]}") || exit $?   # every run validated; errors listed, nothing submitted

array=0-$((n - 1))${max_parallel:+%$max_parallel}
cmd=(sbatch --parsable --array="$array" --job-name="mtp-$name" --nodes="$nodes"
     --output="$sweep_dir/_slurm/logs/%x-%A_%a.out"
     --export="ALL,MTP_REPO=$repo,MTP_TASKS_DIR=$sweep_dir/_slurm/tasks,NPROC=$nproc"
     "${sbatch_opts[@]}" "$repo/launch/slurm/train.sbatch")
if ((dry_run)); then
  echo "dry run: $n runs valid; would submit:"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
job=$("${cmd[@]}")
echo "submitted job array $job: $n runs -> $sweep_dir (tasks: $sweep_dir/_slurm/tasks.tsv)"
echo "logs:   $sweep_dir/_slurm/logs/"
echo "report: python -m mtp_megatron report $sweep_dir"
