# Sourced by submit.sh and sweep.sh.
# gpus_per_node SBATCH_OPTION...: the N of --gpus-per-node=N (or "--gpus-per-node N",
# "--gpus-per-node=type:N"), empty when not requested.
gpus_per_node() {
  local want=0 opt
  for opt in "$@"; do
    if ((want)); then echo "${opt##*:}"; return; fi
    case $opt in
      --gpus-per-node=*) opt=${opt#*=}; echo "${opt##*:}"; return ;;
      --gpus-per-node) want=1 ;;
    esac
  done
}
