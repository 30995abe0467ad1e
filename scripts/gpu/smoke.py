"""Helpers of scripts/gpu/smoke.sh: make its data, check a run's rollout_debug.jsonl, compare a resumed run.

    python scripts/gpu/smoke.py data OUT_DIR               tiny train / eval files (builtin arithmetic)
    python scripts/gpu/smoke.py check RUN_DIR --world N    log-prob gap, stale weights, rank seeds, memory
    python scripts/gpu/smoke.py cut FULL_DIR CUT_DIR       a copy of a run cut after its step-2 checkpoint
    python scripts/gpu/smoke.py resume FULL_DIR CUT_DIR    the resumed run against the uninterrupted one
    python scripts/gpu/smoke.py summary RUN_DIR ...        a line per run: steps, losses, checkpoints, accuracy
Each check prints what it saw and exits non-zero on a failure.
"""
import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
import builtin_task  # noqa: E402

TIMING = {"time_rollout", "time_train", "tokens_per_second"}
failures = []


def check(ok: bool, what: str):
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def make_data(out: str):
    os.makedirs(out, exist_ok=True)
    for name, rows in (("train", builtin_task.make_task(4, seed=7, levels=(1, 2))),
                       ("eval", builtin_task.make_task(2, seed=builtin_task.EVAL_SEED, levels=(1, 2)))):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows)


def check_run(run: str, world: int, max_gap: float):
    print(f"checking {run}")
    metrics = lines(os.path.join(run, "metrics.jsonl"))
    steps = [m["step"] for m in metrics]
    check(steps == list(range(steps[-1] + 1)) and steps[-1] >= 1, f"metrics for steps {steps}")
    check(all(math.isfinite(m["loss"]) for m in metrics if m.get("loss") is not None), "finite losses")
    calls = lines(os.path.join(run, "rollout_debug.jsonl"))
    check(all(len(c["ranks"]) == world for c in calls), f"{len(calls)} sampler calls, each from {world} rank(s)")

    # 1. The sampler's log-probs of its own samples against the trainer's recomputed ones.
    gaps = [[r["logprob_gap"] for r in c["ranks"] if r.get("logprob_gap")] for c in calls]
    if any(gaps):
        print("  log-prob gap |sampler - trainer| per call (mean over tokens, worst rank; max):")
        for c, g in zip(calls, gaps):
            print(f"    call {c['call']}: mean {max(x['mean'] for x in g):.4f}  max {max(x['max'] for x in g):.4f}"
                  f"  ({sum(x['tokens'] for x in g)} tokens)")
        worst = max(x["mean"] for g in gaps for x in g)
        check(worst <= max_gap, f"mean log-prob gap {worst:.4f} <= {max_gap} at every call")
    else:
        print("  log-prob gap: not available (the torch sampler returns no log-probs)")

    # 2. Stale weights: the seeded probe must change whenever the trainer's weights changed.
    changed = same = 0
    for prev, cur in zip(calls, calls[1:]):
        for r, (a, b) in enumerate(zip(prev["ranks"], cur["ranks"])):
            if not math.isclose(a["weights"], b["weights"], rel_tol=1e-12, abs_tol=0.0):
                changed += 1
                check(a["probe"] != b["probe"],
                      f"call {cur['call']} rank {r}: the weights changed, and so did the probe draw")
            else:
                same += a["probe"] == b["probe"]
    check(changed > 0, f"the weights changed between {changed} pairs of calls (needs an update with a large lr)")
    print(f"  note: with unchanged weights the seeded probe repeated {same} time(s) (repeatability, informational)")

    # 3. Seeds: the first unseeded draw of the same prompt differs across ranks, and the same generator state
    # draws it again (on GPUs vLLM's V2 runner seeds each request from numpy's generator, on CPU its V1 runner
    # draws from torch's: both are the trainer's, seeded per rank and checkpointed)
    first = [r["first"] for r in calls[0]["ranks"]]
    if world > 1:
        check(all(first[i] != first[j] for i in range(world) for j in range(i + 1, world)),
              "ranks drew different samples from the same prompt (different sampling seeds)")
    else:
        print("  ranks: one rank, nothing to compare")
    if all("again" in r for r in calls[0]["ranks"]):
        check(all(r["again"] == r["first"] for r in calls[0]["ranks"]),
              "the same generator state drew the same unseeded samples again, on every rank")

    # 4. GPU memory after each phase.
    mems = [c["ranks"][0]["memory"] for c in calls if c["ranks"][0].get("memory")]
    if mems:
        print("  GPU memory of rank 0, GiB (train peak = max allocated since the previous call):")
        print("    call  train_peak  before_push(used)  engine_awake(used)  after_generate(used)")
        for c, m in zip(calls, mems):
            print(f"    {c['call']:4d}  {m['train_peak']:10.2f}  {m['before_push']['used']:17.2f}  "
                  f"{m['engine_awake']['used']:18.2f}  {m['after_generate']['used']:20.2f}")
    else:
        print("  GPU memory: no GPU")


def cut(full: str, out: str):
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(full, out)
    last = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    shutil.rmtree(os.path.join(out, last[-1]))  # dies before its last checkpoint was complete
    os.makedirs(os.path.join(out, last[-1] + ".tmp", "model"))


def compare_resume(full: str, resumed: str, exact: bool):
    print(f"checking {resumed} against {full}")
    a, b = lines(os.path.join(full, "metrics.jsonl")), lines(os.path.join(resumed, "metrics.jsonl"))
    check([m["step"] for m in a] == [m["step"] for m in b], f"the resumed run logged steps {[m['step'] for m in b]}")
    check(not any(n.endswith(".tmp") for n in os.listdir(resumed)), "the half-written checkpoint was cleared")
    if exact:
        same = all({k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
                   for x, y in zip(a, b))
        check(same, "identical metrics, step for step")
    else:  # GPU kernels (attention, all-reduces) are not bitwise deterministic: the same run, other rounding
        check(all(math.isfinite(m["loss"]) for m in b if m.get("loss") is not None), "finite losses after resuming")
        print("  note: on a GPU, metrics after the resume point may differ from the uninterrupted run in their last "
              "digits and then in their draws (nondeterministic kernels); on CPU they are equal (--exact)")


def summary(runs: list[str]):
    """One line per run (scripts/gpu/smoke.sh): steps logged, finite losses, checkpoints, held-out accuracy
    by level before -> after (the builtin set), generated tokens per second of training wall time."""
    for run in runs:
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.exists(path):
            check(False, f"{run}: no metrics.jsonl")
            continue
        m = lines(path)
        evals = [x for x in m if any(k.startswith("eval_accuracy_") for k in x)]
        levels = sorted(k for k in evals[0] if "_level" in k) if evals else []
        acc = " ".join(f"L{k[-1]} {evals[0][k]:.3f}->{evals[-1][k]:.3f}" for k in levels)
        ckpts = sorted(n for n in os.listdir(run) if n.startswith("checkpoint-") and not n.endswith(".tmp"))
        finite = all(math.isfinite(x["loss"]) for x in m if x.get("loss") is not None)
        check(finite and m[-1]["step"] >= 1, f"{os.path.basename(run)}: steps 0-{m[-1]['step']}, finite losses "
              f"{finite}, checkpoints {[c.split('-')[1] for c in ckpts]}; {acc}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("data").add_argument("out")
    c = sub.add_parser("check")
    c.add_argument("run")
    c.add_argument("--world", type=int, required=True)
    c.add_argument("--max_gap", type=float, default=0.1)
    k = sub.add_parser("cut")
    k.add_argument("full")
    k.add_argument("out")
    r = sub.add_parser("resume")
    r.add_argument("full")
    r.add_argument("resumed")
    r.add_argument("--exact", action="store_true")
    sub.add_parser("summary").add_argument("runs", nargs="+")
    args = p.parse_args()
    if args.cmd == "data":
        make_data(args.out)
    elif args.cmd == "check":
        check_run(args.run, args.world, args.max_gap)
    elif args.cmd == "cut":
        cut(args.full, args.out)
    elif args.cmd == "resume":
        compare_resume(args.full, args.resumed, args.exact)
    else:
        summary(args.runs)
    if failures:
        sys.exit(f"{len(failures)} check(s) failed: {failures}")


if __name__ == "__main__":
    main()
