#!/usr/bin/env bash
# GPU benchmarks for one H200, offline: random-weight full-size models and generated images, nothing downloaded.
#   1. BLIP-base in depth (gpu_bench.py): samples/s, MFU and peak GPU memory of full fine-tuning (bf16, 384 px; also
#      grouped, 5 captions per image sharing one ViT pass), frozen-vision and LoRA; beam-3 captions/s; the seed
#      notebook's recipe for comparison.
#   2. Every model family's training step against the plain transformers (+ peft) loop measured in the same run
#      (train_step.py --model ...; bf16 autocast, batch 8, images decoded in the loop): BLIP-base, BLIP-2 OPT-2.7B
#      (frozen-lm, the paper's mode, and LoRA), BLIP-2 Flan-T5-XL (frozen-lm), GIT-base, Florence-2-base, PaliGemma 3B
#      at 224 px (full).
#   3. SCST against cross-entropy samples/s at equal batch, BLIP-base (train_step.py --objective scst).
# Not yet run on a GPU (none was lent to this project so far): its Python commands run in the test suite with --smoke
# on a CPU, the script is checked with `bash -n`. Each section has a hard time cap (42 minutes together at most; the
# expected total is far less but unmeasured); one that fails or runs out of time is reported, the next one still
# runs, and the script then exits 1.
#
#   bash benchmarks/gpu.sh                           # everything, from the repository root; JSON in $OUT
#   bash benchmarks/gpu.sh --model florence2 --model git   # only those families' section-2 rows
#   bash benchmarks/gpu.sh --smoke                   # tiny presets on any device, seconds (the test suite runs it)
#   PYTHON=/path/to/python bash benchmarks/gpu.sh --compile   # other flags go to gpu_bench.py
#
# The same Python commands on a CPU (no GPU needed): add --smoke for seconds, or see benchmarks/RESULTS.md for the
# full-size CPU runs that fit (BLIP-base, GIT-base, SCST); BLIP-2 and PaliGemma (2.9-3.9 B parameters) are GPU-only.
# Needs a Python with CUDA torch (2.x), transformers 5.24 and peft (LoRA rows).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-.}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

MODELS=()
SMOKE=()
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model)
      case "${2:-}" in
        blip|blip2|blip2-t5|git|florence2|paligemma|smolvlm) MODELS+=("$2"); shift 2 ;;
        *) echo "gpu.sh: --model ${2:-(missing)} is not a family; use blip, blip2, blip2-t5, git, florence2, paligemma or" \
             "smolvlm" >&2
           exit 2 ;;
      esac ;;
    --smoke) SMOKE=(--smoke); BENCH_ARGS+=(--smoke); shift ;;
    *) BENCH_ARGS+=("$1"); shift ;;
  esac
done
ALL_FAMILIES=(${MODELS[@]+"${MODELS[@]}"})
[ ${#ALL_FAMILIES[@]} -gt 0 ] || ALL_FAMILIES=(blip blip2 blip2-t5 git florence2 paligemma smolvlm)
FAILED=()

# section NAME SECONDS COMMAND...: run COMMAND under a hard cap; a failure or a timeout is reported, not fatal.
section() {
  local name=$1 limit=$2 rc=0
  shift 2
  echo
  echo "## $name"
  timeout "$limit" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "## $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", time cap ${limit} s"))"
    FAILED+=("$name")
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| transformers', transformers.__version__)" \
  || echo "$PYTHON cannot import torch and transformers"

STEP=(--batch-sizes 8 --warmup 2 --steps 5)
if [ ${#SMOKE[@]} -gt 0 ]; then
  STEP=(--batch-sizes 2)
fi

if [ ${#MODELS[@]} -eq 0 ]; then
  section "1. BLIP-base in depth (gpu_bench.py)" 450 \
    "$PYTHON" benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
fi

if [ ${#SMOKE[@]} -gt 0 ]; then
  # Tiny presets: one process for every family (the variants run in-process with --smoke).
  section "2. training step vs plain transformers: ${ALL_FAMILIES[*]}" 240 \
    "$PYTHON" benchmarks/train_step.py --smoke "${STEP[@]}" --model "${ALL_FAMILIES[@]}" \
    --json "$OUT/train_step_families.json"
else
  for family in "${ALL_FAMILIES[@]}"; do
    # Each variant builds its model in a fresh process on the GPU (BLIP-2: 3.7-3.9 B parameters in fp32 + bf16
    # autocast; frozen-lm trains the 1.1 B ViT + Q-Former, ~35 GiB with AdamW state; PaliGemma 2.9 B trains in
    # full, ~47 GiB of fp32 weights, gradients and AdamW state).
    section "2. training step vs plain transformers: $family" 300 \
      "$PYTHON" benchmarks/train_step.py --model "$family" "${STEP[@]}" --json "$OUT/train_step_$family.json"
    if [ "$family" = blip2 ]; then
      section "2. training step vs plain transformers + peft: blip2 --mode lora" 300 \
        "$PYTHON" benchmarks/train_step.py --model blip2 --mode lora "${STEP[@]}" --json "$OUT/train_step_blip2_lora.json"
    fi
  done
fi

if [ ${#MODELS[@]} -eq 0 ]; then
  section "3. SCST vs cross-entropy, BLIP-base" 300 \
    "$PYTHON" benchmarks/train_step.py --objective scst ${SMOKE[@]+"${SMOKE[@]}"} "${STEP[@]}" \
    --json "$OUT/train_step_scst.json"
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  echo
  printf 'gpu.sh: failed sections:\n'; printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
