"""One LUFFY-sized step on 8 GPUs, on paper: generation, training FLOPs, weight sync (docs/gpu.md).

    python bench/gpu_paper.py [--gpus 8] [--mfu 0.4] [--response_mean 3000] [--micro_batching tokens] [--json FILE]

Nothing here is measured: every figure is arithmetic on the inputs printed first (model shape from its
config.json, the GPU's datasheet, the batch of LUFFY's 8-GPU command, stated mean lengths), so a reader can
check each line and change any input. The 7B memory per GPU is in docs/gpu.md's GPU memory table (from the
same arithmetic common.py's vLLM memory check does).
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (the trainers' micro-batch grouping, common.token_groups)

# Qwen2.5-Math-7B's config.json (the LUFFY and ReLIFT 16k-think variants differ only in RoPE theta and positions)
QWEN25_MATH_7B = dict(vocab=152064, hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128,
                      tied=False)
# NVIDIA's datasheets (SXM, 80 GB): dense bf16 tensor-core rate, HBM bandwidth, NVLink per direction. decode: a
# third-party vLLM output rate for a 7-8B bf16 model on one such GPU at high concurrency (H100: Llama 3.1 8B,
# ~12,500 tok/s; A100: DeepSeek-R1-Distill-Qwen-7B, ~3,363 tok/s), measured on short requests: optimistic for
# 8k-token reasoning traces, whose KV-cache reads grow with length.
GPUS = {"h100": dict(name="H100 SXM 80 GB", bf16_flops=989e12, hbm_bytes_s=3.35e12, nvlink_bytes_s=450e9,
                     decode_tokens_s=12_500),
        "a100": dict(name="A100 SXM 80 GB", bf16_flops=312e12, hbm_bytes_s=2.039e12, nvlink_bytes_s=300e9,
                     decode_tokens_s=3_363)}


def param_count(m: dict) -> dict:
    """Parameters of a Qwen2 decoder: q/k/v with biases, o without, SwiGLU MLP, two RMSNorms a layer."""
    h, kv = m["hidden"], m["kv_heads"] * m["head_dim"]
    attn = h * h + h + 2 * (h * kv + kv) + h * h
    layer = attn + 3 * h * m["intermediate"] + 2 * h
    embed = m["vocab"] * h
    head = 0 if m["tied"] else embed
    total = m["layers"] * layer + embed + head + h  # + the final norm
    return {"total": total, "matmul": m["layers"] * layer + m["vocab"] * h}  # the embedding lookup is no matmul


def kv_bytes_per_token(m: dict, bytes_per=2) -> int:
    return 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * bytes_per  # K and V, every layer, bf16


def train_flops_per_token(m: dict, context: float, passes: float) -> float:
    """Matmul FLOPs of one token through `passes` forward-equivalents (forward 1, backward 2), attention
    included: 2 x matmul params, plus QK^T and AV over `context` earlier tokens (2 x 2 x heads x head_dim)."""
    return passes * (2 * param_count(m)["matmul"] + 4 * m["layers"] * m["heads"] * m["head_dim"] * context)


def padding_factor(lengths: list[int], micro_batch: int, prompt: int = 0, seed=0) -> float:
    """Token positions a micro-batch computes over the tokens it holds (`prompt` + response each), for micro-batches
    of `micro_batch` drawn at random from `lengths`, each padded to its longest (--micro_batching sequences)."""
    rng = random.Random(seed)
    xs = lengths[:]
    rng.shuffle(xs)
    batches = [xs[i:i + micro_batch] for i in range(0, len(xs) - micro_batch + 1, micro_batch)]
    return sum(len(b) * (prompt + max(b)) for b in batches) / sum(prompt * len(b) + sum(b) for b in batches)


def budget_padding_factor(lengths: list[int], per_step: int, budget: int, prompt: int = 0, seed=0) -> float:
    """The same for --micro_batching tokens: each rank's optimizer step (`per_step` samples drawn at random from
    `lengths`) grouped under `budget` tokens by common.token_groups, as common.minibatches does. The ranks'
    agreement on a count only halves micro-batches, which never adds padding: this is the most it can be."""
    rng = random.Random(seed)
    xs = lengths[:]
    rng.shuffle(xs)
    positions = tokens = 0
    for i in range(0, len(xs) - per_step + 1, per_step):
        step = [(prompt, r) for r in xs[i:i + per_step]]
        positions += sum(common.batch_tokens([step[j] for j in g]) for g in common.token_groups(step, budget))
        tokens += sum(p + r for p, r in step)
    return positions / tokens


def draw_lengths(n: int, mean: float, cap: int, seed: int) -> list[int]:
    """Response lengths: exponential with the given mean, cut at the budget (a long tail, as reasoning has)."""
    rng = random.Random(seed)
    return [min(cap, max(1, round(rng.expovariate(1 / mean)))) for _ in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--prompts", type=int, default=128)  # LUFFY: 128 prompts a step
    p.add_argument("--group", type=int, default=8)  # 8 a prompt: 7 rollouts + 1 demonstration
    p.add_argument("--prompt_mean", type=float, default=200)  # tokens, OpenR1 problem + template (assumed)
    p.add_argument("--response_mean", type=float, default=3000)  # rollouts' mean length (assumed; it grows in training)
    p.add_argument("--demo_mean", type=float, default=5000)  # R1 demonstrations kept under 8k (assumed)
    p.add_argument("--max_response", type=int, default=8192)
    p.add_argument("--micro_batch", type=int, default=4)  # the 8-GPU command of docs/gpu.md
    p.add_argument("--prompts_per_minibatch", type=int, default=64)  # LUFFY: 64 prompts an optimizer step
    p.add_argument("--max_prompt", type=int, default=1024)
    p.add_argument("--micro_batching", choices=["tokens", "sequences"], default="tokens")  # the GPU default: tokens
    p.add_argument("--mfu", type=float, default=0.4)  # training model-FLOPs utilisation (assumed)
    p.add_argument("--hbm_efficiency", type=float, default=0.7)  # achieved / peak bandwidth in decode (assumed)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--json", default="")
    a = p.parse_args()
    m, g = QWEN25_MATH_7B, GPUS[a.gpu]
    n = param_count(m)
    rows = []

    def row(what, value, how):
        rows.append({"what": what, "value": value, "how": how})

    # --- generation: each GPU runs its own engine over its share of the rollouts ---------------------
    rollouts = a.prompts * (a.group - 1)
    per_gpu = rollouts / a.gpus
    responses = draw_lengths(rollouts, a.response_mean, a.max_response, 0)  # [rollouts] tokens
    demos = draw_lengths(a.prompts, a.demo_mean, a.max_response, 1)  # [prompts] tokens
    weight_bytes = 2 * n["total"]  # bf16 engine weights
    kv = kv_bytes_per_token(m)
    steps = max(responses)  # the engine decodes until its longest response ends: weights read every step
    # every decode step of a response reads the KV cache of its context (prompt + tokens so far)
    kv_reads = sum(a.prompt_mean * x + x * x / 2 for x in responses) / a.gpus * kv
    t_bw = (steps * weight_bytes + kv_reads) / (g["hbm_bytes_s"] * a.hbm_efficiency)
    t_pub = sum(responses) / a.gpus / g["decode_tokens_s"]
    t_gen = max(t_bw, t_pub)
    row("rollouts generated a step", f"{rollouts} ({per_gpu:.0f} a GPU)", f"{a.prompts} prompts x {a.group - 1}")
    row("decode, bandwidth bound", f"{t_bw:.0f} s", f"({steps} steps x {weight_bytes / 1e9:.1f} GB weights + "
        f"{kv_reads / 1e12:.1f} TB KV reads) / ({g['hbm_bytes_s'] / 1e12:.2f} TB/s x {a.hbm_efficiency})")
    row("decode, published rate", f"{t_pub:.0f} s", f"{sum(responses) / a.gpus / 1e6:.2f}M tokens a GPU / "
        f"{g['decode_tokens_s']:,} tok/s")
    row("generation time", f"{t_gen:.0f} s", "the larger of the two (a long response sets the floor)")

    # --- training: old log-probs (1 forward) + update (forward, recompute, backward = 4) --------------
    lengths = responses + demos
    tokens = sum(lengths) + (rollouts + a.prompts) * a.prompt_mean
    prompt = round(a.prompt_mean)
    pad_fixed = padding_factor(lengths, a.micro_batch, prompt)
    budget = a.micro_batch * (a.max_prompt + a.max_response)  # --micro_batch_tokens 0: the fixed size's most
    per_step = a.prompts_per_minibatch * a.group // a.gpus  # one rank's samples in one optimizer step
    pad_tokens = budget_padding_factor(lengths, per_step, budget, prompt)
    pad = pad_tokens if a.micro_batching == "tokens" else pad_fixed
    ctx = a.prompt_mean + sum(x * x / 2 for x in lengths) / sum(lengths)  # mean context a token attends to
    flops = tokens * train_flops_per_token(m, ctx, passes=1 + 4)
    t_train, t_fixed = (flops * f / (a.gpus * g["bf16_flops"] * a.mfu) for f in (pad, pad_fixed))
    row("tokens trained a step", f"{tokens / 1e6:.2f}M", f"{rollouts + a.prompts} sequences, prompts included")
    row("training FLOPs", f"{flops:.2e}", f"5 forward-equivalents x (2 x {n['matmul'] / 1e9:.2f}B + attention over "
        f"~{ctx:.0f} tokens) a token")
    row("padding factor, fixed-size micro-batches", f"{pad_fixed:.2f}x", f"`--micro_batching sequences`: "
        f"{a.micro_batch} sequences in rollout order, each padded to its longest")
    row("padding factor, micro-batches by tokens", f"{pad_tokens:.2f}x", f"`--micro_batching tokens`: a rank's "
        f"{per_step} samples an optimizer step sorted by length, at most {budget:,} tokens a micro-batch")
    row("training time", f"{t_train:.0f} s", f"FLOPs x padding ({a.micro_batching}) / ({a.gpus} x "
        f"{g['bf16_flops'] / 1e12:.0f} TFLOP/s x MFU {a.mfu}); fixed-size micro-batches: {t_fixed:.0f} s")

    # --- weight sync: every rank gathers each fp32 parameter (all-gather), casts, reloads its engine ----
    gathered = 4 * n["total"] * (a.gpus - 1) / a.gpus  # bytes each rank receives
    t_sync = gathered / g["nvlink_bytes_s"] + 2 * weight_bytes / g["hbm_bytes_s"]
    row("weight sync", f"{t_sync:.2f} s", f"{gathered / 1e9:.1f} GB all-gathered a rank over NVLink + "
        f"{weight_bytes / 1e9:.1f} GB written into the engine")

    step = t_gen + t_train + t_sync
    row("one step", f"{step:.0f} s", "generation + training + sync (grading on the CPU overlaps nothing here)")
    hours = {k: (t_gen + t + t_sync) * a.steps / 3600 for k, t in (("now", t_train), ("fixed", t_fixed))}
    row(f"{a.steps} steps", f"{hours['now']:.1f} h on {a.gpus} GPUs", f"{hours['now'] * a.gpus:.0f} GPU-hours; with "
        f"fixed-size micro-batches {hours['fixed']:.1f} h")
    print(f"{g['name']} x {a.gpus}, Qwen2.5-Math-7B ({n['total'] / 1e9:.2f}B parameters), "
          f"{a.prompts} prompts x {a.group}, responses mean {a.response_mean:.0f} / max {a.max_response}")
    print("| quantity | value | how |\n|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['value']} | {r['how']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"inputs": vars(a), "model": m, "gpu": g, "rows": rows,
                       "padding": {"sequences": pad_fixed, "tokens": pad_tokens, "budget": budget,
                                   "per_step": per_step},
                       "seconds": {"generation": t_gen, "training": t_train, "training_fixed": t_fixed, "sync": t_sync,
                                   "step": step}}, f, indent=1)


if __name__ == "__main__":
    main()
