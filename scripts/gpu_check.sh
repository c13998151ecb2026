#!/usr/bin/env bash
# The GPU check on a node without network, on the node's own PyTorch, in one command:
#
#   scripts/gpu_check.sh WHEELS OUT [gpu-check options]     # e.g. gpu-wheels/ $OUT
#
# WHEELS: the folder `make gpu-wheels` wrote (where the registry is reachable); OUT: the summary
# and figures (at most 8 files). The wheels go into a folder of their own with
# `pip install --no-index --no-deps --target`: nothing is fetched and the node's torch stays.
# The whole command keeps to GPU_CHECK_BUDGET_S (540 s: a 10-minute allocation with room to
# spare); the check gets what the install leaves, shared out with a deadline per stage.
# `--device cpu --quick` (passed on) runs it on a CPU: how docs/gpus.md proves this path.
set -euo pipefail
if (($# < 2)); then
  echo "usage: $0 WHEELS OUT [gpu-check options, e.g. --device cpu --quick]" >&2
  exit 2
fi
WHEELS=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
start=$(date +%s)

DEVICE=cuda
for arg in "$@"; do [[ $arg == cpu ]] && DEVICE=cpu; done
SITE=$(mktemp -d "${TMPDIR:-/tmp}/mtp_gpu_site.XXXXXX")
"$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
  --target "$SITE" "$WHEELS"/*.whl
installed=$(($(date +%s) - start))
echo "[gpu_check.sh] $(ls "$WHEELS"/*.whl | wc -l) wheels installed into $SITE in ${installed} s"

# the wheels shadow the node's copies (transformers 5.24 over 5.17); everything else is the node's
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MTP_DEVICE=$DEVICE PYTHONNOUSERSITE=1
"$PY" - <<'PY'
import importlib.metadata as m
import torch
names = ("megatron-core", "deepspeed", "transformers", "datasets", "pydantic")
print("[gpu_check.sh] python", __import__("sys").version.split()[0], "| torch", torch.__version__,
      "| CUDA", torch.cuda.is_available(), "|", ", ".join(f"{n} {m.version(n)}" for n in names))
import deepspeed, megatron.core, mtp_megatron.train.trainer  # noqa: E401,F401  (fail here, early)
PY
left=$((BUDGET_S - ($(date +%s) - start)))
cd "$REPO"
exec "$PY" -m mtp_megatron gpu-check --device "$DEVICE" --out "$OUT" --budget-s "$left" "$@"
