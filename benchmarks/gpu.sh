#!/usr/bin/env bash
# GPU benchmark for one H200 (about 8 minutes end to end, offline): samples/s and MFU of full fine-tuning (bf16,
# 384 px; also grouped, 5 captions per image sharing one ViT pass), frozen-vision and LoRA; peak GPU memory; beam-3
# captions/s; the seed notebook's recipe for comparison.
# Random-weight full-size BLIP-base and generated tensors: nothing is downloaded.
#
#   bash benchmarks/gpu.sh                 # from the repository root; results also in $OUT/gpu_bench.json
#   PYTHON=/path/to/python bash benchmarks/gpu.sh --compile
#
# Needs a Python with CUDA torch (2.x), transformers 5.24 and peft (LoRA row; skipped when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-.}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| transformers', transformers.__version__)"
# The hard cap keeps the whole script inside its 8-minute slot even if a section stalls.
timeout 450 "$PYTHON" benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" "$@"
