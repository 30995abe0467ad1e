"""Measure a model on the built-in task's held-out problems, level by level: what the yardstick needs.

    python scripts/yardstick.py                       # the built-in base (built and cached on first use)
    python scripts/yardstick.py --model runs/grpo/checkpoint-000080/model

For each level it prints
    pass@1        accuracy averaged over k samples per problem at the evaluation temperature (0.6), for
                  several evaluation seeds: the trainers' held-out metric, and its spread over seeds
    sd            the sampling standard deviation of that pass@1, sqrt(sum_i p_i (1 - p_i) / k) / n, with
                  each problem's p_i estimated from all the draws of all seeds
    pass@8        share of problems with at least one right answer in 8 samples at temperature 1.0, the
                  rollout temperature: how often GRPO sees any reward on the level
    wrong_steps   share of rewarded samples whose worked steps are wrong (builtin_task.steps_correct): right
                  answers for wrong reasons, which the answer-only verifier cannot see
    right = steps + k + other
                  pass@1 split by how the rewarded samples were worked: every step right; right but for
                  the multiplier copied wrong on the product's line (`7*3` written `7*4=21`); other
                  wrong steps (usually a guess); as shares of all samples, mean over the seeds
and the same for each stratum of levels 3-4 (builtin_task.STRATA: the base's prior on the fact), with
    pass@64       share of problems with a right answer among 64 samples at T = 0.6 (--k_large; levels 3-4)
    min p, key    the held-out demonstrations teacher-forced at T = 1 (common.demo_probabilities): the median
                  least-likely token probability and the mean log-prob of the fact's digits
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_task  # noqa: E402
import common  # noqa: E402


def draw(sampler, prompts, k, temperature, seed):
    groups = sampler.generate(prompts, n=k, temperature=temperature, top_p=1.0,
                              max_tokens=builtin_task.SETTINGS["max_response_len"], seed=seed)
    return [[s.text for s in g] for g in groups]


def only_multiplier_wrong(problem: str, response: str) -> bool:
    """Whether the worked steps are right once the product's line gets the problem's multiplier back."""
    product = re.search(r"(\d)\*(\d)", problem)
    if product is None:
        return False
    fixed = re.sub(r"^\s*(\d)\*\d=", lambda m: f"{m.group(1)}*{product.group(2)}=", response, count=1)
    return fixed != response and builtin_task.steps_correct(problem, fixed)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="builtin", help="HF model directory; builtin = the cached base")
    p.add_argument("--problems", type=int, default=builtin_task.HELDOUT_PER_LEVEL, help="held-out problems per level")
    p.add_argument("--k", type=int, default=4, help="samples per problem for pass@1")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds for pass@1")
    p.add_argument("--k_large", type=int, default=64, help="samples per level-3/4 problem for pass@k_large (0: none)")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    p.add_argument("--time_build", action="store_true", help="first build the base afresh in a temporary cache "
                   "and time it (the same weights as the cached one, if this machine built that one)")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    build = {}
    if args.time_build:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            fresh = builtin_task.build_base_model(tmp)
            build["build_s"] = time.time() - t0
            cached = builtin_task.build_base_model(os.path.expanduser(common.BaseConfig.cache_dir))
            a, b = (AutoModelForCausalLM.from_pretrained(x).state_dict() for x in (fresh, cached))
            build["same_weights_as_cached"] = all(torch.equal(a[k], b[k]) for k in a)
        print(f"built the base in {build['build_s']:.0f} s with {torch.get_num_threads()} threads; the same weights as "
              f"the cached one: {build['same_weights_as_cached']}")
    path = builtin_task.build_base_model(os.path.expanduser(common.BaseConfig.cache_dir)) if args.model == "builtin" \
        else args.model
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    sampler = common.TorchSampler(tok, lm)
    rows = builtin_task.make_task(args.problems, builtin_task.EVAL_SEED)
    prompts = [tok(common.format_prompt(tok, r["problem"], None), add_special_tokens=False)["input_ids"] for r in rows]
    verifier = common.Verifier(num_workers=2)
    golds = [r["answer"] for r in rows]

    def grade(texts):  # [n][k] texts -> [n][k] (reward, steps right, only the multiplier wrong)
        flat = verifier([t for g in texts for t in g], [a for a, g in zip(golds, texts) for _ in g])
        k = len(texts[0])
        return [[(flat[i * k + j], builtin_task.steps_correct(r["problem"], texts[i][j]),
                  only_multiplier_wrong(r["problem"], texts[i][j])) for j in range(k)] for i, r in enumerate(rows)]

    t0 = time.time()
    runs = [grade(draw(sampler, prompts, args.k, 0.6, 10_000 + s)) for s in range(args.seeds)]
    at8 = grade(draw(sampler, prompts, 8, 1.0, 20_000))
    hard = [i for i, r in enumerate(rows) if r["stratum"]]
    large = {}
    if args.k_large:  # pass@k_large on levels 3-4 only: the others are near 1 long before
        texts = draw(sampler, [prompts[i] for i in hard], args.k_large, 0.6, 30_000)
        flat = verifier([t for g in texts for t in g], [golds[i] for i, g in zip(hard, texts) for _ in g])
        large = {i: any(flat[n * args.k_large:(n + 1) * args.k_large]) for n, i in enumerate(hard)}
    encoded = [{"prompt_ids": p, "demo_ids": tok(r["demo"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                "level": r["level"], "stratum": r["stratum"]} for p, r in zip(prompts, rows)]
    demo = common.demo_probabilities(common.PolicyModel(lm, compile=False), common.EvalSet("builtin", "builtin", 1,
                                                                                           encoded), tok, common.Dist())
    seconds = time.time() - t0
    import datetime, platform  # noqa: E401
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    out = {"model": path, "problems_per_level": args.problems, "k": args.k, "seeds": args.seeds,
           "k_large": args.k_large, "sampling_s": seconds, "cpu": cpu, "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
           "task_version": builtin_task.TASK_VERSION, **build}
    print(f"{path}: {args.problems} held-out problems per level, pass@1 over k={args.k} samples at T=0.6 "
          f"({args.seeds} seeds), pass@8 at T=1.0; {seconds:.0f} s of sampling")
    print(f"{'group':>14} {'pass@1 per seed':>24} {'sd':>6} {'pass@8':>7} {'pass@' + str(args.k_large):>8} "
          f"{'min p':>8} {'key':>7} {'wrong_steps':>17} {'right = steps + k + other':>27}")
    groups = [(f"level{lv}", [i for i, r in enumerate(rows) if r["level"] == lv])
              for lv in sorted({r["level"] for r in rows})]
    groups += [(f"stratum_{s}", [i for i, r in enumerate(rows) if r["stratum"] == s])
               for s in sorted({r["stratum"] for r in rows if r["stratum"]})]
    for level, idx in groups:
        per_seed = [sum(sum(x for x, _, _ in run[i]) / args.k for i in idx) / len(idx) for run in runs]
        p_i = [sum(x for run in runs for x, _, _ in run[i]) / (args.k * args.seeds) for i in idx]
        sd = math.sqrt(sum(p * (1 - p) for p in p_i) / args.k) / len(idx)
        pass8 = sum(any(x for x, _, _ in at8[i]) for i in idx) / len(idx)
        rewarded = [(ok, k_only) for run in runs for i in idx for x, ok, k_only in run[i] if x == 1]
        wrong = sum(not ok for ok, _ in rewarded)
        samples = len(idx) * args.k * args.seeds
        split = [sum(ok for ok, _ in rewarded) / samples, sum(k_only for _, k_only in rewarded) / samples]
        split.append(len(rewarded) / samples - sum(split))
        big = sum(large[i] for i in idx) / len(idx) if large and all(i in large for i in idx) else None
        min_p, key = demo.get(f"demo_min_p_builtin_{level}"), demo.get(f"demo_key_logp_builtin_{level}")
        seeds = " ".join(f"{a:.3f}" for a in per_seed)
        print(f"{level.removeprefix('stratum_'):>14} {seeds:>24} {sd:6.3f} {pass8:7.3f} "
              f"{'' if big is None else f'{big:.3f}':>8} {min_p:8.2g} {'' if key is None else f'{key:.3f}':>7} "
              f"{wrong:>5}/{len(rewarded):<5} {wrong / max(len(rewarded), 1):5.3f} "
              f"{len(rewarded) / samples:6.3f} = {' + '.join(f'{v:.3f}' for v in split)}")
        out[level] = {"pass@1": per_seed, "sd": sd, "pass@8": pass8, f"pass@{args.k_large}": big, "min_p": min_p,
                      "key_logp": key, "wrong_steps": wrong,
                                 "rewarded": len(rewarded), "right_steps": split[0], "multiplier_only": split[1],
                                 "other_wrong": split[2]}
    verifier.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
