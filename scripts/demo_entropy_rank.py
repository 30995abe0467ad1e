"""Where the built-in base puts entropy on the held-out demonstrations of levels 3-4, by stratum: each
demonstration's least likely token (teacher-forced at T = 1), its probability, the entropy of the base's
distribution there, and whether that entropy is in the top 20% of the demonstration's tokens. Prefix-RFT's gate
(Eq. 46-47, arXiv 2507.01679) keeps the top 20% by entropy of a unit's prefix tokens; almost every other token
of these demonstrations has entropy near 0, so the top of one demonstration is the top of a unit too.

    python scripts/demo_entropy_rank.py            # the cached base (built on first use)
    python scripts/demo_entropy_rank.py --model runs/sft/checkpoint-000080/model

Why: docs/lab.md predicted that Prefix-RFT's gate drops the needle fact because the base writes its habit there
with confidence; the lab found Prefix-RFT learning the needle. This prints what the gate sees.
"""
import argparse
import collections
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_task  # noqa: E402
import common  # noqa: E402

TOP = 0.2  # prefix_rft.py --entropy_top_k: the share of a unit's prefix tokens whose loss is kept (Eq. 46)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an HF model directory; default: the cached built-in base")
    args = p.parse_args()
    from transformers import AutoTokenizer

    path = args.model or builtin_task.build_base_model(os.path.expanduser(common.BaseConfig.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = builtin_task.SETTINGS
    rows, _ = common.encode_rows([r for r in builtin_task.rows("eval") if r["stratum"]], tokenizer, None,
                                 settings["max_prompt_len"], settings["max_response_len"], "builtin")
    policy = common.load_policy(path, common.Dist(), compile=False, train=False)
    with torch.no_grad():  # as the trainers measure the demonstrations (common.demo_probabilities)
        forced = common.teacher_forced(policy, [r["prompt_ids"] for r in rows], [r["demo_ids"] for r in rows],
                                       tokenizer.pad_token_id, "cpu", with_entropy=True)
    seen = collections.defaultdict(list)
    for r, (logp, entropy) in zip(rows, forced):
        i = min(range(len(logp)), key=logp.__getitem__)  # the least likely demonstration token
        higher = sum(h > entropy[i] for h in entropy) / len(entropy)
        seen[r["stratum"]].append((tokenizer.convert_ids_to_tokens(r["demo_ids"][i]), math.exp(logp[i]),
                                   entropy[i], higher < TOP, statistics.mean(entropy)))
    print(f"{'stratum':15} {'n':>4}  least likely token  {'p (median)':>10}  {'H there':>7}  {'mean H':>6}  "
          f"in the top {TOP:.0%} by entropy")
    for stratum, v in sorted(seen.items()):
        tokens = ", ".join(f"{t!r} x{n}" for t, n in collections.Counter(x[0] for x in v).most_common(2))
        print(f"{stratum:15} {len(v):4}  {tokens:18}  {statistics.median(x[1] for x in v):10.2g}  "
              f"{statistics.median(x[2] for x in v):7.3f}  {statistics.median(x[4] for x in v):6.3f}  "
              f"{sum(x[3] for x in v) / len(v):.2f}")


if __name__ == "__main__":
    main()
