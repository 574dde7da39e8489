#!/usr/bin/env bash
# The benchmark suite on a lent GPU machine (CUDA 13, Python 3.12, PyTorch preinstalled, no network).
#
#   here, once:   benchmarks/gpu.sh prepare
#                 → .gpu-wheels/part-* + NAME (onnxruntime-gpu, by ../shared/tools/gpu-wheel-parts.sh)
#                   and .whl/ (faiss-cpu for Python 3.12: no FAISS GPU wheel fits CUDA 13), both git-ignored
#   there:        carry one .gpu-wheels part per call (NAME with the first, .whl with any), then
#                 benchmarks/gpu.sh run [--quick] [--out DIR] [any python -m attnrec.benchmarks.gpu flag]
#                 which reassembles and installs the wheels (once per machine), checks that onnxruntime's
#                 CUDA provider runs the models, and runs the model, retrieval and e2e stages with CUDA
#                 (e2e: attnrec serve with IO-bound CUDA sessions, --io-binding auto).
#
# `run --provider cpu` is the same path without a GPU (the tests call it so).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mode=${1:-}; shift || true

case "$mode" in
prepare)
  ../shared/tools/gpu-wheel-parts.sh
  exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file: ask git where it is
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  faiss=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("faiss-cpu"))')
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "faiss-cpu==$faiss"
  ls -la .gpu-wheels .whl
  ;;
run)
  site=$PWD/.gpu-wheels/site
  if [ -f .gpu-wheels/NAME ] && [ ! -d "$site" ]; then
    name=$(cat .gpu-wheels/NAME)
    cat .gpu-wheels/part-* > ".gpu-wheels/$name"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" ".gpu-wheels/$name"
    rm -f ".gpu-wheels/$name"
  fi
  if compgen -G ".whl/*.whl" > /dev/null && [ ! -d /tmp/attnrec-site ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/attnrec-site .whl/*.whl
  fi
  # onnxruntime-gpu's site first, so it shadows a CPU-only onnxruntime the machine may have.
  export PYTHONPATH="$site:/tmp/attnrec-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  exec "$PYTHON" -m attnrec.benchmarks.gpu "$@"
  ;;
*)
  echo "usage: $0 prepare | run [python -m attnrec.benchmarks.gpu flags]" >&2
  exit 2
  ;;
esac
