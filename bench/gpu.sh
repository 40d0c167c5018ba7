#!/usr/bin/env bash
# The bench suite on one CUDA device: the ~0.5B-parameter "medium" model built offline from its config, bf16, one
# Loom worker on the GPU (FlashAttention-2 where installed, else sdpa; Liger kernels for the fast recipe where
# installed) against the plain Trainer and LLaMA-Factory on the same device. One short command, from the repo root:
#   bash bench/gpu.sh                 # about 10 minutes on one H100; extra arguments go to bench/suite.py
# LLaMA-Factory is skipped (with the reason in the table) when its venv cannot be created, e.g. offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')"
exec "$python" bench/suite.py --device cuda --models medium --cases sft_lora,sft_full,pt_packing \
    --steps 30 --repeats 2 --cutoff-len 1024 "$@"
