"""The rows of docs/task.md's "Measured: the six fusion trainers", with each method's own counter, from a lab's
results (GRPO's rows first, to compare; the page's table itself is written by scripts/build_docs.py, without the
counter column, from results.json alone):

    python scripts/fusion_table.py [lab_results]

Levels and wrong steps are the final evaluation's (results.json, as `python lab.py` collected them); tokens are
summed over the run; wall is the trainer process's. The last column is each method's own counter, read from the
run's metrics.jsonl:
  luffy       demonstration p: mean `demo_prob` (the demonstration's mean token probability) over the first 8
              training steps -> over the last 8
  srft        the largest `entropy_rollout` of the run
  relift      `ft_steps_total` at the last step (fine-tuning steps taken)
  uft         the last step with a hint (`hint_length` > 0)
  prefix_rft  mean `gate_kept_frac` (the share of prefix tokens the entropy gate trains)
  bread       sum of `extra_tokens` (tokens sampled in branches and in the anchor search)
"""
import json
import os
import sys

ORDER = ["grpo", "luffy", "srft", "relift", "uft", "prefix_rft", "bread"]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def counter(method: str, rows: list[dict]) -> str:
    train = [r for r in rows if "loss" in r]  # training steps (evaluation-only lines have no loss)

    def series(key):
        return [r[key] for r in train if key in r]
    if method == "luffy":
        p = series("demo_prob")
        return f"demonstration p {sum(p[:8]) / len(p[:8]):.2f} -> {sum(p[-8:]) / len(p[-8:]):.2f}"
    if method == "srft":
        return f"rollout entropy peaks at {max(series('entropy_rollout')):.3f}"
    if method == "relift":
        return f"{int(series('ft_steps_total')[-1])} fine-tuning steps"
    if method == "uft":
        hinted = [r["step"] for r in train if r.get("hint_length", 0) > 0]
        return f"last hint at step {hinted[-1]}" if hinted else "no hint"
    if method == "prefix_rft":
        kept = series("gate_kept_frac")
        return f"gate keeps {100 * sum(kept) / len(kept):.0f}% of prefix tokens"
    if method == "bread":
        return f"{sum(series('extra_tokens')) / 1e3:.0f}k tokens from branches and search"
    return ""


def tokens(x: float) -> str:
    return "0" if x == 0 else f"{x / 1e3:.0f}k" if x >= 1e5 else f"{x / 1e3:.1f}k"


def rows(results_dir: str) -> list[str]:
    with open(os.path.join(results_dir, "results.json")) as f:
        res = json.load(f)
    out = []
    for m in ORDER:
        for run in res["methods"].get(m, {}).get("runs", []):
            if run.get("status") != "ok":
                out.append(f"| `{m}.py` | {run['seed']} | {run.get('status')} | | | | | | | | |")
                continue
            fin = run["final"]
            metrics = read_metrics(os.path.join(results_dir, run["dir"], "metrics.jsonl"))
            out.append(f"| `{m}.py` | {run['seed']} | {fin['1']:.3f} | {fin['2']:.3f} | {fin['3']:.3f} | {fin['4']:.3f} | "
                       f"{run['wrong_steps_final']:.3f} | {tokens(run['generated_tokens'])} | {tokens(run['demo_tokens'])} | "
                       f"{run['wall_s']:.0f} s | {counter(m, metrics)} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1] if len(sys.argv) > 1 else "lab_results")))
