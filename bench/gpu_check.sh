#!/usr/bin/env bash
# Every stage on the real-size Llama-3.2-1B stand-in in bf16 on one GPU, bounded to finish
# within 8 minutes: prints peak GPU memory per process and stage, tokens/s and serving
# p50 (bench/llama_scale.py --gpu). For when a GPU is lent; no test depends on it.
#
#   bash bench/gpu_check.sh [--size tiny] [extra llama_scale.py arguments]
#
# PYTHON picks the interpreter (default: python on PATH). Without a usable CUDA device it
# stops at once with one line and exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no GPU (nvidia-smi missing or finds no device); nothing was run" >&2
  exit 1
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: torch.cuda is unavailable in $PYTHON (a CPU-only torch?); nothing was run" >&2
  exit 1
fi

# Bounded for one GPU: 8 SFT/reward steps of 8 pages, 4 PPO steps, 32 eval users, 200 requests.
# The outer timeout keeps the 8-minute promise even if a stage hangs.
exec timeout 470 "$PYTHON" bench/llama_scale.py --size 1b --gpu --out runs/gpu_check \
  --users 64 --batch-size 8 --ppo-steps 4 --eval-users 32 --requests 200 "$@"
