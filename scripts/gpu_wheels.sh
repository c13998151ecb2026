#!/usr/bin/env bash
# The wheels a GPU node without network needs, beside its own PyTorch, to run the GPU check:
# what such a node lacks (docs/gpus.md: Python 3.12, CUDA PyTorch 2.11, transformers 5.17, no
# megatron-core / DeepSpeed / pydantic / datasets), at the versions this checkout is tested
# with, for Python 3.12 on manylinux x86-64. Run where the package registry is reachable:
#
#   make gpu-wheels                       # -> gpu-wheels/, copied to the node with the checkout
#   scripts/gpu_wheels.sh DIR [PYTHON]    # PYTHON: the project's venv (versions, DeepSpeed build)
set -euo pipefail
OUT=${1:-gpu-wheels}
PY=${2:-.venv/bin/python}
TARGET_PY=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=60  # what a node's checkout copy may carry beside the code

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
NEEDED=(
  megatron-core
  pydantic pydantic-core annotated-types typing-inspection typing-extensions  # DeepSpeed's config
  hjson                                                                       # DeepSpeed
  datasets dill multiprocess                                                  # data from the Hub
  transformers                                                                # 5.24: export, peers
)
specs=()
for name in "${NEEDED[@]}"; do specs+=("$name==$(version "$name")"); done

rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$OUT" \
  --python-version "$TARGET_PY" --implementation cp --abi "cp${TARGET_PY/./}" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${specs[@]}"
# DeepSpeed publishes only an sdist: a pure-Python wheel with no ops compiled (DeepSpeed builds
# an op on first use, with the node's nvcc and ninja); built against this venv's torch, which
# the wheel does not pin (--no-deps on the node keeps the node's own)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" \
  "deepspeed==$(version deepspeed)"

size_kib=$(du -sk "$OUT" | cut -f1)
echo "gpu-wheels: $(ls "$OUT" | wc -l) wheels, $((size_kib / 1024)) MiB in $OUT ($(($(date +%s) - start)) s)"
ls -1 "$OUT"
if ((size_kib > LIMIT_MIB * 1024)); then
  echo "error: $OUT holds $((size_kib / 1024)) MiB, more than the $LIMIT_MIB MiB a node's copy carries" >&2
  exit 1
fi
