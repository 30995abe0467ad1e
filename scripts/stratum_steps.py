"""Levels 3-4 of the lab's final models, per fact and per stratum: pass@1 as the verifier grades it, and pass@1
counting only responses whose worked steps are right (builtin_task.steps_correct).

    python scripts/stratum_steps.py lab_results                      # every finished run -> lab_results/stratum_steps.json
    python scripts/stratum_steps.py lab_results --methods grpo,sft --seeds 0

Why: a right final answer can come from a wrong line. In the lab of 2026-12-07 the RL methods' needle accuracy
(about 0.13) is the fact 5*5 answered from the line `5*4=25`: the verifier rewards it, the steps are wrong. Each
run's final checkpoint is evaluated again with `evaluate.py` (the same seeded draws as the run's own final
evaluation) and its records are read back; runs already in the output file are reused.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import builtin_task  # noqa: E402


def score(records) -> dict:
    """{fact "t*k" and stratum: {"n", "pass", "right_steps"}} over the level-3/4 samples of evaluate.py's records."""
    out = collections.defaultdict(lambda: {"n": 0, "pass": 0.0, "right_steps": 0.0})
    for r in records:
        if r["level"] < 3:
            continue
        problem = r["prompt"].split("user\n", 1)[1].split("<|im_end|>", 1)[0]
        terms = builtin_task.parse_problem(problem)
        t, k = next(x for x in terms if isinstance(x, tuple))  # the product of a level-3/4 problem
        right = r["reward"] > 0 and builtin_task.steps_correct(problem, r["response"])
        for key in (f"{t}*{k}", builtin_task.stratum(terms)):
            out[key]["n"] += 1
            out[key]["pass"] += r["reward"]
            out[key]["right_steps"] += right
    return {k: {"n": v["n"], "pass": v["pass"] / v["n"], "right_steps": v["right_steps"] / v["n"]}
            for k, v in sorted(out.items())}


def final_model(run: str) -> str | None:
    """A run's last checkpoint; a two-stage run's is its second stage's."""
    run = os.path.join(run, "stage2") if os.path.isdir(os.path.join(run, "stage2")) else run
    ckpts = sorted(d for d in os.listdir(run) if d.startswith("checkpoint-")) if os.path.isdir(run) else []
    return os.path.join(run, ckpts[-1]) if ckpts else None


def evaluate(run: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", final_model(run), "--data", "builtin",
                        "--output_dir", tmp], check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(os.path.join(tmp, "records.jsonl")) as f:
            return score(json.loads(line) for line in f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a lab's results folder (its runs/ holds <method>-s<seed>)")
    p.add_argument("--methods", default=None, help="comma-separated; default: every finished run")
    p.add_argument("--seeds", default=None, help="comma-separated; default: all")
    p.add_argument("--jobs", type=int, default=2, help="evaluations at a time, one thread each")
    args = p.parse_args()
    out_file = os.path.join(args.results, "stratum_steps.json")
    done = json.load(open(out_file)) if os.path.exists(out_file) else {}
    runs = sorted(d for d in os.listdir(os.path.join(args.results, "runs"))
                  if re.fullmatch(r"[a-z_]+-s\d+", d) and not d.startswith("base-"))
    if args.methods:
        runs = [r for r in runs if r.rsplit("-s", 1)[0] in args.methods.split(",")]
    if args.seeds:
        runs = [r for r in runs if r.rsplit("-s", 1)[1] in args.seeds.split(",")]
    runs = [r for r in runs if final_model(os.path.join(args.results, "runs", r))]
    todo = [r for r in runs if r not in done]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} reused, {len(todo)} to evaluate", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, res in zip(todo, pool.map(lambda r: evaluate(os.path.join(args.results, "runs", r)), todo)):
            done[name] = res
            json.dump(done, open(out_file, "w"), indent=1)
            print(f"  {name}: needle {res['needle']['pass']:.3f} graded, {res['needle']['right_steps']:.3f} with right "
                  f"steps", flush=True)
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
