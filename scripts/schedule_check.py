"""Do the default runs end at their best? For each condition (a folder of runs named <method>-s<seed>, e.g. the lab's
runs at one lr schedule, or default runs on one kernel path) and each method: every seed's best and final
evaluation (eval_accuracy, all levels), and whether the run ends within its seed band of its best.

    python scripts/schedule_check.py --runs "cosine, AVX-512=lab_results/runs" \\
        --runs "cosine, AVX2=/tmp/avx2/runs" --out lab_results/schedule_check.json

The rule (docs/lab.md, "Learning rates and the schedule"; written before the runs): a run ends within its band when
its final evaluation is at least its best evaluation minus max(0.03, 2 x the standard deviation over the method's
seeds of their best evaluations) in that condition. scripts/build_docs.py renders the table from the json.
"""
import argparse
import glob
import json
import os
import re
import statistics

MIN_EFFECT = 0.03  # lab_claims.MIN_EFFECT["accuracy"]


def evaluations(run_dir: str) -> list[tuple[int, float]]:
    """(step, eval_accuracy) of every evaluation in metrics.jsonl, the last record of a step kept (a resumed run)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("eval_accuracy") is not None:
                out[r["step"]] = r["eval_accuracy"]
    return sorted(out.items())


def condition(folder: str, methods: set | None) -> dict:
    """{method: [{seed, best, best_step, final, final_step}]} of the finished runs <method>-s<seed> in folder."""
    runs = {}
    for d in sorted(glob.glob(os.path.join(folder, "*-s*"))):
        m = re.fullmatch(r"(.+)-s(\d+)", os.path.basename(d))
        if not m or not os.path.exists(os.path.join(d, "metrics.jsonl")) or (methods and m.group(1) not in methods):
            continue
        evals = evaluations(d)
        if len(evals) < 2:
            continue
        best_step, best = max(evals, key=lambda e: (e[1], -e[0]))
        runs.setdefault(m.group(1), []).append({"seed": int(m.group(2)), "best": best, "best_step": best_step,
                                                "final": evals[-1][1], "final_step": evals[-1][0]})
    for rows in runs.values():
        band = max(MIN_EFFECT, 2 * statistics.stdev([r["best"] for r in rows])) if len(rows) > 1 else MIN_EFFECT
        for r in rows:
            r["within_band"] = r["final"] >= r["best"] - band
            r["band"] = band
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", action="append", required=True, metavar="LABEL=FOLDER",
                   help="a condition: its label and the folder of its runs (<method>-s<seed>); repeat")
    p.add_argument("--methods", default="", help="comma-separated methods to keep (default: every one found)")
    p.add_argument("--out", default="lab_results/schedule_check.json")
    a = p.parse_args(argv)
    methods = set(filter(None, a.methods.split(",")))
    out = {}
    for spec in a.runs:
        label, _, folder = spec.partition("=")
        if not folder or not os.path.isdir(folder):
            p.error(f"--runs {spec!r}: expected LABEL=FOLDER with an existing folder")
        out[label] = condition(folder, methods)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    for label, runs in out.items():
        for m, rows in sorted(runs.items()):
            print(f"{label:24s} {m:20s} " + "  ".join(
                f"s{r['seed']} {r['final']:.3f}/{r['best']:.3f}{'' if r['within_band'] else ' OUT'}" for r in rows))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
