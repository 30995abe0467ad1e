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
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_task  # noqa: E402
from common import BaseConfig  # noqa: E402

TOP = 0.2  # prefix_rft.py --entropy_top_k: the share of a unit's prefix tokens whose loss is kept (Eq. 46)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an HF model directory; default: the cached built-in base")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or builtin_task.build_base_model(os.path.expanduser(BaseConfig.cache_dir))
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    seen = collections.defaultdict(list)
    for row in builtin_task.rows("eval"):
        if row["stratum"] is None:
            continue
        prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        d_ids = tok(row["demo"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([p_ids + d_ids])).logits[0, len(p_ids) - 1:-1].float().log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)  # [demo tokens]
        probs = logp.gather(1, torch.tensor(d_ids)[:, None])[:, 0].exp()
        i = int(probs.argmin())
        seen[row["stratum"]].append((tok.convert_ids_to_tokens(d_ids[i]), probs[i].item(), entropy[i].item(),
                                     (entropy > entropy[i]).float().mean().item() < TOP, entropy.mean().item()))
    print(f"{'stratum':15} {'n':>4}  least likely token  {'p (median)':>10}  {'H there':>7}  {'mean H':>6}  "
          f"in the top {TOP:.0%} by entropy")
    for stratum, v in sorted(seen.items()):
        tokens = ", ".join(f"{t!r} x{n}" for t, n in collections.Counter(x[0] for x in v).most_common(2))
        print(f"{stratum:15} {len(v):4}  {tokens:18}  {statistics.median(x[1] for x in v):10.2g}  "
              f"{statistics.median(x[2] for x in v):7.3f}  {statistics.median(x[4] for x in v):6.3f}  "
              f"{sum(x[3] for x in v) / len(v):.2f}")


if __name__ == "__main__":
    main()
