#!/usr/bin/env bash
# GPU check (not run by CI): profile, score and shorten a generated ~8B-shaped model on the GPU, streamed and
# resident, and check the GPU memory is returned. Needs CUDA, torch, transformers, accelerate and safetensors; no
# vLLM and no network. About a minute on one H200 (benchmarks/results/gpu_check.md).
#   bash scripts/gpu_check.sh [--layers 40] [--hidden 4096] [--dir /tmp/shortgpt-gpu-check]   (GPU_CHECK_TIMEOUT=480 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@"
