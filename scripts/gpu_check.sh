#!/usr/bin/env bash
# The CUDA path on a GPU machine without vLLM, in one call (how it ran on a lent H200: README, "What has
# run on a GPU"). With vLLM installed, run scripts/gpu_smoke.sh instead: it is the same smoke test on the
# vLLM sampler.
#
#   bash scripts/gpu_check.sh [--out DIR] [--cache_dir DIR]
#
# 1. the log-prob / entropy kernel on the GPU against float64, and its time and memory against the naive
#    form (scripts/gpu_logprob_check.py);
# 2. scripts/gpu_smoke.sh --sampler torch --model builtin: GRPO with FSDP2 (bf16 compute, fp32 master
#    weights), torch.compile, KL to a reference model, gradient checkpointing, checkpoints, a resume;
# 3. every trainer for 4 steps (checkpoints at 2 and 4, evaluations at 0, 2, 4), and ReLIFT (a buffer and a
#    second optimizer in its checkpoint) cut after step 2 and resumed;
# 4. beside them, the default laptop runs of grpo.py and sft.py (seed 0) on the GPU, to hold against the
#    README's CPU rows.
# Logs under OUT (default runs/gpu_check); a summary table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check CACHE=~/.cache/sft_rl_fusion
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --cache_dir) CACHE=$2; shift 2 ;;
        *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # up to 10 processes share the CPU cores
rm -rf "$OUT" && mkdir -p "$OUT"
nvidia-smi -L
python -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
T0=$SECONDS
COMMON=(--sampler torch --cache_dir "$CACHE")

# 4. (started first: the longest) the default laptop runs
python grpo.py "${COMMON[@]}" --output_dir "$OUT/grpo_default" > "$OUT/grpo_default.log" 2>&1 &
python sft.py "${COMMON[@]}" --output_dir "$OUT/sft_default" > "$OUT/sft_default.log" 2>&1 &

echo "== 1/3 log-prob kernel against float64"
python scripts/gpu_logprob_check.py 2>&1 | tee "$OUT/logprob.log" | grep -v Warning

echo "== 2/3 gpu_smoke.sh on the torch sampler"
bash scripts/gpu_smoke.sh --sampler torch --model builtin --cache_dir "$CACHE" --out "$OUT/smoke" \
    > "$OUT/smoke.log" 2>&1
echo "gpu_smoke.sh exit $?"; grep -E "\[(ok|FAIL)\]|passed|error" "$OUT/smoke.log"

echo "== 3/3 every trainer, 4 steps"
QUICK=(--max_steps 4 --save_every 2 --eval_every 2 --eval_data builtin:1)
PIDS=()
for t in sft grpo luffy srft relift uft bread prefix_rft; do
    python $t.py "${COMMON[@]}" "${QUICK[@]}" --output_dir "$OUT/t_$t" > "$OUT/t_$t.log" 2>&1 &
    PIDS+=($!)
done
wait "${PIDS[@]}"
python scripts/gpu_smoke.py cut "$OUT/t_relift" "$OUT/t_relift_resumed"
python relift.py "${COMMON[@]}" "${QUICK[@]}" --output_dir "$OUT/t_relift_resumed" --resume \
    > "$OUT/t_relift_resumed.log" 2>&1
python scripts/gpu_smoke.py resume "$OUT/t_relift" "$OUT/t_relift_resumed"
wait
for f in "$OUT"/*.log; do grep -qE "Traceback|^error" "$f" && { echo "--- $f"; tail -n 15 "$f"; }; done
echo "== summary ($((SECONDS - T0)) s)"
python scripts/gpu_smoke.py summary "$OUT"/t_* "$OUT/grpo_default" "$OUT/sft_default"
grep -hE "eval before|eval after|the run is in" "$OUT/grpo_default.log" "$OUT/sft_default.log" | tail -n 12
