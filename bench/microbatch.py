"""Micro-batches by tokens: the padding a training step computes and throws away, and the training phase's time,
for fixed-size micro-batches against token-budget ones and packed rows, on CPU (docs/performance.md).

    python bench/microbatch.py [--samples 64] [--scale 32] [--repeats 5] [--json bench/microbatch.json]

One optimizer step of one rank of LUFFY's 8-GPU run (64 prompts x 8 samples / 8 ranks = 64 samples, prompts up to
1,024 and responses up to 8,192 tokens), every length divided by --scale so that a CPU runs it in seconds:
  lengths   responses log-normal with median 2,900 tokens and sigma 0.6, cut at 8,192 (about 4% reach it); prompts
            uniform in 100-400 tokens. The shape is our assumption for R1-style traces on OpenR1-Math (a body of a
            few thousand tokens, a tail that runs to the budget), not a fit to the data set. The padding share
            depends on the lengths only relative to each other and to the budget, so the scaled draw keeps it
            (both are printed); attention's share of the time does shrink with the scale.
  model     a float32 Qwen2 from a config (hidden 512, 6 layers, bench/mfu.py's): its matmuls dominate the step.
  sides     fixed: `--micro_batching sequences --micro_batch_size 4`, in rollout order, padded (common.minibatches);
            tokens: `--micro_batching tokens`, the budget 4 x (1,024 + 8,192) / scale (common.token_groups);
            packed: the same budget of real tokens a row, the sequences side by side (position_ids restarting, no
            2-D mask: transformers' sdpa path then builds a block-diagonal [T, T] mask; CPU has no
            variable-length attention kernel, and FlexAttention has no backward on CPU).
  phase     what grpo.py times as training for one optimizer step, less the optimizer: the old log-probs (a
            no-grad forward with entropies per micro-batch) and a forward + backward of a token-mean loss per
            micro-batch. The sides alternate in every repeat (the order rotating), the first pass warms up;
            medians (min-max). The gradients of the three sides are compared (they must agree to rounding).
"""
import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

MICRO_BATCH, MAX_PROMPT, MAX_RESPONSE = 4, 1024, 8192  # LUFFY's 8-GPU command (docs/gpu.md)
MEDIAN, SIGMA, PROMPT_RANGE = 2900, 0.6, (100, 400)  # the assumed lengths, in tokens at full scale


def draw(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) lengths at full scale, in rollout order."""
    rng = random.Random(seed)
    return [(rng.randint(*PROMPT_RANGE), min(MAX_RESPONSE, max(1, round(rng.lognormvariate(math.log(MEDIAN), SIGMA)))))
            for _ in range(n)]


def groups(lengths: list[tuple[int, int]], side: str, budget: int) -> list[list[int]]:
    if side == "fixed":
        return [list(range(s, min(s + MICRO_BATCH, len(lengths)))) for s in range(0, len(lengths), MICRO_BATCH)]
    return common.token_groups(lengths, budget, packed=side == "packed")


def padding(lengths, cut, packed=False) -> dict:
    """Token positions computed, tokens held, and the share of positions that are padding."""
    positions = sum(common.batch_tokens([lengths[i] for i in g], packed) for g in cut)
    tokens = sum(p + r for p, r in lengths)
    return {"positions": positions, "tokens": tokens, "padding_share": 1 - tokens / positions,
            "micro_batches": len(cut)}


def build(hidden: int, layers: int, vocab: int = 512, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=4 * (MAX_PROMPT + MAX_RESPONSE), tie_word_embeddings=False)
    return common.PolicyModel(Qwen2ForCausalLM(cfg).float(), compile=False).train()


def batches(seqs, cut, packed):
    """The micro-batches of one side: make_batch of each group, its advantages beside it."""
    out = []
    for g in cut:
        mb = common.make_batch([seqs[i][0] for i in g], [seqs[i][1] for i in g], 0, "cpu", packed=packed)
        mb["advantages"] = torch.tensor([seqs[i][2] for i in g])
        out.append(mb)
    return out


def training_phase(model, micro) -> tuple[float, torch.Tensor]:
    """Seconds for old log-probs + forward/backward of every micro-batch, and the gradient it left."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for mb in micro:
            model(**common.model_inputs(mb), with_entropy=True)
    norm = common.step_normaliser([mb["response_mask"] for mb in micro], "token-mean")
    for mb in micro:
        logp, _ = model(**common.model_inputs(mb))
        common.aggregate(-logp * mb["advantages"][:, None], mb["response_mask"], "token-mean", norm).backward()
    seconds = time.perf_counter() - t0
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return seconds, grad


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="samples in the optimizer step (one rank's)")
    p.add_argument("--scale", type=int, default=32, help="every length is divided by this")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--sides", default="fixed,tokens,packed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    sides = a.sides.split(",")
    full = draw(a.samples)
    lengths = [(max(1, round(q / a.scale)), max(1, round(r / a.scale))) for q, r in full]
    full_budget = MICRO_BATCH * (MAX_PROMPT + MAX_RESPONSE)  # --micro_batch_tokens 0 for LUFFY's command
    budget = full_budget // a.scale
    cuts = {s: groups(lengths, s, budget) for s in sides}
    model = build(a.hidden, a.layers)
    vocab = model.lm.config.vocab_size
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(3, vocab, (q,), generator=g).tolist(), torch.randint(3, vocab, (r,), generator=g).tolist(),
             float(torch.randn(1, generator=g))) for q, r in lengths]
    micro = {s: batches(seqs, cuts[s], s == "packed") for s in sides}
    load_before = os.getloadavg()
    seconds, grads = {s: [] for s in sides}, {}
    for r in range(a.repeats + 1):
        for s in sides[r % len(sides):] + sides[:r % len(sides)]:  # interleaved, the order rotating
            t, grads[s] = training_phase(model, micro[s])
            if r:  # the first pass warms up
                seconds[s].append(t)
    ref = grads[sides[0]]
    res = {"info": {"command": "python bench/microbatch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor(),
                    "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "load_average": {"before": load_before[0], "after": os.getloadavg()[0]}},
           "inputs": {"samples": a.samples, "scale": a.scale, "micro_batch_size": MICRO_BATCH, "budget": budget,
                      "full_budget": full_budget, "response_median": MEDIAN, "response_sigma": SIGMA,
                      "response_cap": MAX_RESPONSE, "prompt_range": PROMPT_RANGE,
                      "capped_share": sum(r == MAX_RESPONSE for _, r in full) / len(full),
                      "response_mean": statistics.mean(r for _, r in full)},
           "model": {"hidden": a.hidden, "layers": a.layers, "vocab": vocab,
                     "params": sum(x.numel() for x in model.parameters())},
           "sides": {}}
    for s in sides:
        res["sides"][s] = {**padding(lengths, cuts[s], s == "packed"),
                           "full_scale": padding(full, groups(full, s, full_budget), s == "packed"),
                           "seconds": spread(seconds[s]),
                           "time_ratio_to_fixed": spread([t / f for t, f in zip(seconds[s], seconds["fixed"])])
                           if "fixed" in seconds else None,
                           "grad_rel_diff": float((grads[s] - ref).abs().max() / ref.abs().max())}
    print(f"{res['info']['command']}\n{res['info']['date']}, {res['info']['cores']} cores, {res['info']['threads']} "
          f"threads, load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; {a.samples} samples, lengths / {a.scale} "
          f"(budget {budget} tokens); Qwen2 {res['model']['params'] / 1e6:.1f}M float32; median (min-max) of "
          f"{a.repeats}")
    print("| side | micro-batches | padding share (full scale) | training phase s | time / fixed | grad rel diff |")
    print("|---|---|---|---|---|---|")
    for s, v in res["sides"].items():
        ratio = v["time_ratio_to_fixed"]
        print(f"| {s} | {v['micro_batches']} | {v['padding_share']:.3f} ({v['full_scale']['padding_share']:.3f}) | "
              f"{v['seconds']['median']:.2f} ({v['seconds']['min']:.2f}-{v['seconds']['max']:.2f}) | "
              f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | {v['grad_rel_diff']:.1e} |"
              if ratio else f"| {s} | ... |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
