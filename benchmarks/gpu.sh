#!/usr/bin/env bash
# One prepared accelerator benchmark, at most 8 minutes:  bash benchmarks/gpu.sh [OUT_DIR] [gpu_bench options]
#
# Runs benchmarks/gpu_bench.py on whatever JAX sees (train-step images/s of DDPM++ 61.8M, DSM and STF at
# reference batch 4096, float32 and bfloat16; bits/dim examples/s; PC and Heun images/s; compile times; the
# peer score_sde_pytorch side by side when benchmarks/peer_score_sde.py exists, torch imports and $PEER_DIR
# points to its checkout). Every phase is time-boxed inside --budget-s; `timeout` is the hard stop. JSON
# (one file per run, rewritten after every phase, so a stopped run keeps its finished phases) and a markdown
# summary go to OUT_DIR (default benchmarks/results/gpu). PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
shift || true
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" || true
fi
# 8 minutes = 480 s: phases start only while 420 s of the budget remain; the hard stop (TIMEOUT_S, default
# 465 s) leaves 10 s spare. Later options override these (e.g. --tiny --budget-s 3600 for a CPU smoke run).
timeout --signal=INT --kill-after=5 "${TIMEOUT_S:-465}" "$PY" benchmarks/gpu_bench.py --out-dir "$OUT" \
  --budget-s 420 "$@"
