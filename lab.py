"""The laptop lab: every trainer on the built-in task with one budget, five seeds each, and the papers'
claims put to the test. One command, one results folder:

    python lab.py                     # trainers and forks into lab_results/ (2 idle cores: see docs/lab.md)
    python lab.py --methods trainers  # one group: trainers, forks, sweeps (each method's own knob), lr (lr grid)
    python lab.py --jobs 4            # 4 trainers at a time, each with OMP_NUM_THREADS = cores / 4
    python lab.py --quick             # smoke run into lab_results_quick/: 1 seed, 4 steps, 10 problems per level
    python lab.py --verdicts lab_results/results.json    # the claim-by-claim verdicts of a finished lab

What runs. Every trainer of TRAINERS whose file exists next to this one (one that does not, e.g. srft.py
on a branch without it, is listed as missing in the results), with seeds 0-4, plus DFT (a switch of sft.py),
the two-stage baselines SFT then GRPO and GRPO then SFT (switch at half the steps: the naive split) and SFT then
GRPO done right (the switch at SFT's validation-loss minimum, arXiv 2512.11470: its first stage runs the whole
budget keeping a checkpoint at every evaluation, its second starts from the lowest validation loss's and runs
the rest), plus the forks of FORKS (forks/, with the RL budget), and after each run of PASSK (and once per seed
for the base) a pass@k evaluation of its final model on the reachable problems (evaluate.py --pass_k, METHODS.md
Eq. 58). The groups `sweeps` and `lr` (3 seeds) run each method's own knob and each family's learning rates;
they are not part of the default lab. Each run is a subprocess of the trainer's own command line,
`python <trainer>.py --seed S --output_dir <results>/runs/<method>-s<S> ...`, its console in lab.log there.

Budget matching (lab_report.BUDGET_TEXT, also written into results.md):
  - the same base (the built-in one) and the same prompts: 80 steps x 16 prompts = 1280, drawn in the same
    seeded order from the same 800 training problems (every run holds out the same 200 as its validation split,
    --val_rows); sft.py with --batch_size 16 --max_steps 80; a two-stage baseline 40 + 40 steps of 16 (the second
    stage restarts the seeded order: it sees the first stage's prompts again, since no trainer flag starts the
    stream later; the same seed keeps the evaluation's draws those of the others);
  - the same lr per family: the trainers' defaults (RL 2e-4, SFT 5e-4; `--methods lr` tests the grid around
    them on the validation split), and every other default too;
  - what cannot be matched is reported: generated tokens (sum over steps of the core key generated_tokens,
    the sampling cost), demonstration tokens (sum of demo_tokens: the demonstration tokens a step put before the
    model as training target or as context, once per prompt, all ranks), and compute.png's tokens and seconds.

Evaluation. Every 10 steps on the first 100 held-out problems of each level, 4 samples each; every problem's
counts go to the run's eval_problems.jsonl, so the claims pair methods problem by problem (lab_claims.py).

Reruns. A run is finished when its metrics.jsonl reaches its last step and its final checkpoint exists;
a rerun of the lab reuses it if its command is unchanged (lab_job.json holds the command). An unfinished
run with the same command is resumed (--resume: from its newest checkpoint, or from scratch if it has
none); a run whose command changed is deleted and started afresh, and so is the second stage of a
two-stage baseline whose first stage ran again. A failed run stays in the table as failed, with the tail
of its log in <results>/failures/. Seeds added later (--seeds 0,1,2,3,4 after 0,1,2) reuse the runs there.

Verdicts: lab_claims.py turns results.json into one verdict per claim, each claim a small function, by paired
statistics and minimum effects fixed in advance (lab_claims.RULES); nothing is hand-written.

Report: lab_report.py writes results.json, results.md (with every seed's value behind each mean) and the
figures. matplotlib is needed for the figures only (optional: without it the lab says so and writes
everything else); the trainers never import it.
"""
import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import lab_regimes
from lab_claims import RULES, convergence, print_verdicts, verdicts
from lab_jobs import Job, attempts, failure_log, now, read_metrics, run_jobs, val_min_step
from lab_stats import LAST
from lab_report import GROUPS, LABELS, write_results

ROOT = os.path.dirname(os.path.abspath(__file__))

# ======================================================================================
# What runs: methods, budget, jobs
# ======================================================================================

TRAINERS = ["sft", "grpo", "luffy", "srft", "relift", "uft", "prefix_rft", "bread"]  # table order
FUSION = ["luffy", "srft", "relift", "uft", "prefix_rft", "bread"]  # single-stage fusion (claim 3)
TWO_STAGE = {"sft_then_grpo": ("sft", "grpo"), "grpo_then_sft": ("grpo", "sft"),
             "sft_then_grpo_vmin": ("sft", "grpo")}
# Switching at the first stage's validation-loss minimum (arXiv 2512.11470; claim 14), not at half the steps
AT_VAL_MIN = {"sft_then_grpo_vmin"}
# The forks of forks/ (docs/forks.md): script and the flags that pick the idea; nsr.py runs three objectives
FORKS = {"nsr": ("forks/nsr.py", ("--objective", "nsr")), "psr": ("forks/nsr.py", ("--objective", "psr")),
         "w_reinforce": ("forks/nsr.py", ("--objective", "w_reinforce")),
         "forking_tokens": ("forks/forking_tokens.py", ()), "chord": ("forks/chord.py", ()),
         "hpt": ("forks/hpt.py", ())}
# A trainer's switch that is a method of its own: script and flags (DFT, docs/lab.md "Regimes"; METHODS.md 14)
VARIANTS = {"dft": ("sft.py", ("--token_loss", "dft"))}
# Each method's own knob (--methods sweeps, 3 seeds): is its result here the regime or its tuning? The defaults
# (LUFFY gamma 0.1, UFT's hint weight tied to beta = 0.001, Prefix-RFT top-k share 0.2) are the methods' own runs.
SWEEPS = {"luffy_gamma0.01": ("luffy.py", ("--shaping_gamma", "0.01")),
          "luffy_gamma0.001": ("luffy.py", ("--shaping_gamma", "0.001")),
          "uft_hint0.1": ("uft.py", ("--hint_coef", "0.1")), "uft_hint1": ("uft.py", ("--hint_coef", "1")),
          "prefix_rft_topk0.5": ("prefix_rft.py", ("--entropy_top_k", "0.5")),
          "prefix_rft_topk1": ("prefix_rft.py", ("--entropy_top_k", "1"))}
# The learning-rate grid of each family around its default, and the default lr at a constant schedule (--methods
# lr), judged on the validation split
LR_GRID = {"sft_lr2.5e-4": ("sft.py", ("--lr", "2.5e-4")), "sft_lr1e-3": ("sft.py", ("--lr", "1e-3")),
           "sft_constant": ("sft.py", ("--lr_schedule", "constant")),
           "grpo_lr1e-4": ("grpo.py", ("--lr", "1e-4")), "grpo_lr4e-4": ("grpo.py", ("--lr", "4e-4")),
           "grpo_constant": ("grpo.py", ("--lr_schedule", "constant"))}
VARIANTS.update(SWEEPS)
VARIANTS.update(LR_GRID)
METHODS = TRAINERS + list(VARIANTS) + list(TWO_STAGE) + list(FORKS)
GROUPS_OF_METHODS = {"trainers": TRAINERS + ["dft"] + list(TWO_STAGE), "forks": ["grpo", *FORKS],
                     "sweeps": ["luffy", "uft", "prefix_rft", *SWEEPS], "lr": ["sft", "grpo", *LR_GRID]}
DEFAULT_GROUPS = ("trainers", "forks")  # --methods all
PASSK = ["grpo", "nsr", "psr", "w_reinforce"]  # final models evaluated for pass@k, with the base (claims 7-9)
STRATA = lab_regimes.STRATA  # levels 3-4 by the base's prior on the fact (builtin_task.STRATA, GENERALISATION_FACTS)


@dataclass
class Budget:
    steps: int = 80  # training steps of every method (a two-stage baseline: steps // 2 + the rest)
    prompts: int = 16  # prompts per step (RL: --prompts_per_step, mini-batches of half; SFT: --batch_size)
    eval_every: int = 10  # held-out evaluation every N steps (and at 0 and at the end); a run's score: the last 3
    eval_per_level: int = 100  # held-out problems per level (the first of each level; 200 = the whole set)
    val_rows: int = 200  # training problems held out by every run (--val_rows): SFT's switch step, lr choice
    seeds: tuple = (0, 1, 2, 3, 4)
    model: str = "builtin"  # the base of every method (tests pass a tiny random model)
    trainer_flags: tuple = ()  # extra flags of common.BaseConfig, given to every trainer
    probe_every: int = 4  # the probe (docs/lab.md) every N steps besides the evaluations: entropy after a switch
    passk_samples: int = 32  # samples per problem of the final pass@k evaluation (PASSK and the base); 0 = none
    passk_per_level: int = 100  # reachable held-out problems per level in it (levels 1-2, the first of each)


def available_methods(root: str = ROOT) -> tuple[list[str], dict[str, str]]:
    """(methods whose trainers exist, {missing method: why})."""
    have = [m for m in TRAINERS if os.path.exists(os.path.join(root, f"{m}.py"))]
    missing = {m: f"{m}.py is not in this checkout" for m in TRAINERS if m not in have}
    for name, stages in TWO_STAGE.items():
        if all(s in have for s in stages):
            have.append(name)
        else:
            missing[name] = "needs " + " and ".join(f"{s}.py" for s in stages)
    for m, (script, _) in {**VARIANTS, **FORKS}.items():
        if os.path.exists(os.path.join(root, script)):
            have.append(m)
        else:
            missing[m] = f"{script} is not in this checkout"
    return have, missing


def trainer_args(trainer: str, budget: Budget, seed: int, steps: int, out: str, model: str, eval_file: str | None):
    """The flags of one trainer run under the lab's budget (trainer defaults for everything else)."""
    args = ["--seed", str(seed), "--output_dir", out, "--max_steps", str(steps), "--eval_every", str(budget.eval_every),
            "--save_every", str(max(1, steps // 2)), "--keep_checkpoints", "1",
            "--probe_every", str(budget.probe_every)]
    args += ["--val_rows", str(budget.val_rows)] if budget.val_rows else []
    if trainer == "sft":
        args += ["--batch_size", str(budget.prompts)]
    else:
        args += ["--prompts_per_step", str(budget.prompts), "--prompts_per_minibatch", str(budget.prompts // 2)]
    if model != "builtin":
        args += ["--model", model]
    if eval_file:  # a file of built-in held-out rows: no system prompt, as for the built-in data
        args += ["--eval_data", eval_file, "--system_prompt", ""]
    return args + list(budget.trainer_flags)


def passk_job(name: str, model: str, out: str, seed: int, budget: Budget, passk_file: str, after: str | None) -> Job:
    """evaluate.py --pass_k on the first passk_per_level held-out problems of levels 1-2, passk_samples each."""
    import builtin_task  # the built-in budgets (torch and transformers: only when pass@k is planned)

    return Job(name, "evaluate.py", ["--model", model, "--data", f"{passk_file}:{budget.passk_samples}",
                                     "--output_dir", out, "--seed", str(seed), "--max_prompt_len",
                                     str(builtin_task.SETTINGS["max_prompt_len"]), "--max_response_len",
                                     str(builtin_task.SETTINGS["max_response_len"]), "--pass_k"], out, 0, after=after)


def plan(budget: Budget, methods: list[str], results: str, eval_file: str | None = None,
         passk_file: str | None = None) -> list[Job]:
    """Every run of the lab, seed by seed (so a lab cut short has whole seeds), second stages last; with
    passk_file, a pass@k evaluation of the base and of each PASSK method's final model after its run."""
    jobs = []
    for seed in budget.seeds:
        if passk_file and any(m in PASSK for m in methods):
            out = os.path.join(results, "runs", f"base-s{seed}", "passk")
            jobs.append(passk_job(f"base-s{seed}/passk", budget.model, out, seed, budget, passk_file, None))
        for m in methods:
            out = os.path.join(results, "runs", f"{m}-s{seed}")
            if m in TRAINERS or m in FORKS or m in VARIANTS:
                script, extra = {**VARIANTS, **FORKS}.get(m, (f"{m}.py", ()))
                kind = m if m in TRAINERS else os.path.basename(script)[:-3]  # sft.py's flags for DFT
                args = trainer_args(kind, budget, seed, budget.steps, out, budget.model, eval_file) + list(extra)
                jobs.append(Job(f"{m}-s{seed}", script, args,
                                out, budget.steps))
                if passk_file and m in PASSK:
                    final = os.path.join(out, f"checkpoint-{budget.steps:06d}")
                    jobs.append(passk_job(f"{m}-s{seed}/passk", final, os.path.join(out, "passk"), seed, budget,
                                          passk_file, after=f"{m}-s{seed}"))
                continue
            (first, second), half = TWO_STAGE[m], budget.steps // 2
            s1, s2 = os.path.join(out, "stage1"), os.path.join(out, "stage2")
            if m in AT_VAL_MIN:  # the first stage runs the whole budget and keeps a checkpoint at every evaluation
                args = trainer_args(first, budget, seed, budget.steps, s1, budget.model, eval_file)
                args[args.index("--save_every") + 1], args[args.index("--keep_checkpoints") + 1] = \
                    str(budget.eval_every), "0"
                jobs.append(Job(f"{m}-s{seed}/stage1", f"{first}.py", args, s1, budget.steps))
            else:
                jobs.append(Job(f"{m}-s{seed}/stage1", f"{first}.py",
                                trainer_args(first, budget, seed, half, s1, budget.model, eval_file), s1, half))
            start = os.path.join(s1, f"checkpoint-{half:06d}", "model")  # at_val_min: resolve() sets it
            jobs.append(Job(f"{m}-s{seed}/stage2", f"{second}.py",
                            trainer_args(second, budget, seed, budget.steps - half, s2, start, eval_file), s2,
                            budget.steps - half, after=f"{m}-s{seed}/stage1", at_val_min=m in AT_VAL_MIN))
    return jobs


def heldout_file(results: str, per_level: int, levels: tuple = (1, 2, 3, 4)) -> str | None:
    """A .jsonl of the first `per_level` built-in held-out problems of each of `levels` (None: all of them, the
    built-in set itself)."""
    import builtin_task  # torch and transformers: only when a subset is asked for

    if per_level >= builtin_task.HELDOUT_PER_LEVEL and levels == (1, 2, 3, 4):
        return None
    which = "" if levels == (1, 2, 3, 4) else "-levels-" + "".join(map(str, levels))
    path = os.path.join(results, f"heldout-{per_level}-per-level{which}.jsonl")
    os.makedirs(results, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in builtin_task.make_task(per_level, seed=builtin_task.EVAL_SEED,
                                                                         levels=levels))
    return path


# ======================================================================================
# Collecting: metrics.jsonl -> per-run numbers -> per-method mean and spread over seeds
# ======================================================================================


def stitch(stages: list[list[dict]]) -> list[dict]:
    """The records of consecutive stages as one run: a later stage's steps are shifted by the steps
    before it, and its step-0 evaluation (the previous stage's final model, already logged) is dropped."""
    out, offset = [], 0
    for i, records in enumerate(stages):
        out += [dict(r, step=r["step"] + offset) for r in records if not (i and r["step"] == 0)]
        offset += max((r["step"] for r in records), default=0)
    return out


LEVEL_KEY = re.compile(r"eval_accuracy_(?!val_).+_level(\w+)")  # eval_accuracy_<set>_level<L>, not --val_rows
STRATUM_KEY = re.compile(r"eval_accuracy_(?!val_).+_stratum_(\w+)")  # eval_accuracy_<set>_stratum_<S>


def eval_levels(records: list[dict]) -> list[str]:
    return sorted({m.group(1) for r in records for k in r if (m := LEVEL_KEY.fullmatch(k))})


def accuracies(record: dict, levels: list[str]) -> dict:
    """One evaluation record -> {all, each level, reachable, out_of_reach, each stratum} (a group: mean of its
    levels; a stratum: its problems of levels 3-4)."""
    by_level = {m.group(1): v for k, v in record.items() if (m := LEVEL_KEY.fullmatch(k))}
    acc = {"all": record["eval_accuracy"], **{lv: by_level[lv] for lv in levels},
           **{m.group(1): v for k, v in record.items() if (m := STRATUM_KEY.fullmatch(k))}}
    for group, members in GROUPS.items():
        if all(lv in acc for lv in members):
            acc[group] = sum(acc[lv] for lv in members) / len(members)
    return acc


def window(steps: int) -> int:
    """Training steps averaged for the start and final entropy and response length: the first / last 10%."""
    return max(1, steps // 10)


def summarize_run(records: list[dict], wall_s: float | None) -> dict:
    """The numbers of one (possibly stitched) run; each record carries the `trainer` that logged it.
    A key some step lacks gives None (n/a), except generated_tokens of sft.py, which samples nothing
    while training and does not log it: 0."""
    levels = eval_levels(records)
    evals = {r["step"]: accuracies(r, levels) for r in records if "eval_accuracy" in r}
    train = [r for r in records if r["step"] > 0 and "loss" in r]
    w, last = window(len(train)), max(evals)

    def value(r, key):
        return 0.0 if key == "generated_tokens" and r["trainer"] == "sft" and key not in r else r.get(key)

    def total(key):
        values = [value(r, key) for r in train]
        return None if None in values else sum(values)

    def mean(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    cumulative, running = {0: 0.0}, 0.0  # demonstration tokens used up to each evaluation step
    compute, spent = {0: [0.0, 0.0]}, [0.0, 0.0]  # generated + trained tokens, training seconds, up to each step
    for r in train:
        running = None if running is None or r.get("demo_tokens") is None else running + r["demo_tokens"]
        cumulative[r["step"]] = running
        seconds = (r.get("time_rollout") or 0.0) + (r.get("time_train") or 0.0)  # the step's, evaluation apart
        rate, generated = r.get("tokens_per_second"), value(r, "generated_tokens")  # trained: rate x seconds
        tokens = None if rate is None or generated is None or spent[0] is None else generated + rate * seconds
        spent = [None if tokens is None else spent[0] + tokens, spent[1] + seconds]
        compute[r["step"]] = list(spent)
    wrong = [v for k, v in next(r for r in records if r["step"] == last and "eval_accuracy" in r).items()
             if k.startswith("eval_wrong_steps_")]  # builtin sets only: right answers, wrong worked steps
    return {
        "final_step": last, "final": evals[last], "base": evals.get(0),
        "wrong_steps_final": sum(wrong) / len(wrong) if wrong else None,
        "evals": {str(s): a for s, a in sorted(evals.items())},
        "entropy_start": mean(train[:w], "entropy"), "entropy_final": mean(train[-w:], "entropy"),
        "response_length_final": mean(train[-w:], "response_length"),
        "generated_tokens": total("generated_tokens"), "demo_tokens": total("demo_tokens"),
        "demo_tokens_at": {str(s): cumulative.get(s) for s in sorted(evals)},
        "compute_at": {str(s): compute.get(s) for s in sorted(evals)},  # [tokens, seconds] (compute.png)
        "val_score": last_three([r["eval_accuracy_val"] for r in records if r.get("eval_accuracy_val") is not None]),
        "entropy_curve": [[r["step"], r.get("entropy"), r["trainer"]] for r in train],  # SFT's: on demonstrations
        "demo_probs": lab_regimes.demo_probs(records), "probe": lab_regimes.probe_series(records),
        "wall_s": wall_s,
    }


def problem_arrays(records: list[dict]) -> dict | None:
    """eval_problems.jsonl's records (stitched) -> {k, problems, steps, correct, right} of the held-out set (the
    one set that is not --val_rows' "val"): per evaluation step, every problem's right samples (right: answer and
    worked steps right, built-in task only). None for a run without per-problem counts."""
    sets = sorted({k for r in records for k in r if k not in ("step", "val")})
    if len(sets) != 1:
        return None
    main = [(r["step"], r[sets[0]]) for r in records if sets[0] in r]
    return {"k": main[0][1]["k"], "problems": main[0][1]["problems"], "steps": [s for s, _ in main],
            "correct": [x["correct"] for _, x in main], "right": [x["right_steps"] for _, x in main]
            if all(x["right_steps"] is not None for _, x in main) else None}


def last_three(values: list) -> float | None:
    """The mean of a run's last evaluations (lab_stats.LAST, the claims' span): its score on the validation split."""
    return sum(values[-LAST:]) / len(values[-LAST:]) if values else None


def stats(values: list) -> dict | None:
    """Mean and spread over seeds: min, max, range and the sample std (None with one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": m, "min": min(values), "max": max(values), "range": max(values) - min(values), "std": std,
            "n": len(values)}


SUMMARY_KEYS = ["val_score", "entropy_start", "entropy_final", "response_length_final", "wrong_steps_final",
                "generated_tokens", "demo_tokens", "wall_s"]


def summarize_method(runs: list[dict]) -> dict:
    """Per-method stats over the runs that finished; accuracy keys as final.<key>, base.<key>."""
    ok = [r for r in runs if r["status"] == "ok"]
    out = {k: stats([r.get(k) for r in ok]) for k in SUMMARY_KEYS}
    out["entropy_fall"] = stats([r["entropy_start"] - r["entropy_final"] for r in ok
                                 if r["entropy_start"] is not None and r["entropy_final"] is not None])
    for part in ("final", "base"):
        keys = sorted({k for r in ok if r[part] for k in r[part]})
        out[part] = {k: stats([r[part].get(k) for r in ok if r[part]]) for k in keys}
    out["token_shift"] = {k: stats([(r.get("token_shift") or {}).get(k) for r in ok]) for k in ("base", "demo", "all")}
    out["probe_final"] = {k: stats([r["probe"][-1][i] if r.get("probe") else None for r in ok])
                          for i, k in ((1, "kl_base"), (2, "demo_nll"), (3, "entropy"))}
    return out


PASSK_KEY = re.compile(r"eval_pass@(\d+)_.+_level(\w+)")  # eval_pass@<k>_<set>_level<L> (evaluate.py --pass_k)
PASSK_STRATUM = re.compile(r"eval_pass@(\d+)_.+_stratum_(\w+)")


def read_passk(out: str) -> dict | None:
    """A pass@k evaluation's metrics.json -> {"all" | "reachable" | "out_of_reach": {k: pass@k}}; a group is the
    mean of its levels, "all" the mean of every level (equal problems per level)."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)["metrics"]
    by_k, out = {}, {}
    for key, v in metrics.items():
        if m := PASSK_KEY.fullmatch(key):
            by_k.setdefault(m.group(1), {})[m.group(2)] = v
        elif m := PASSK_STRATUM.fullmatch(key):
            out.setdefault(m.group(2), {})[m.group(1)] = v
    for k, levels in by_k.items():
        out.setdefault("all", {})[k] = sum(levels.values()) / len(levels)
        for group, members in GROUPS.items():
            if all(lv in levels for lv in members):
                out.setdefault(group, {})[k] = sum(levels[lv] for lv in members) / len(members)
    return out


def passk_stats(values: list) -> dict:
    """Per group and k, stats over the seeds' read_passk results (None: not measured)."""
    values = [v for v in values if v]
    return {g: {k: stats([v[g].get(k) for v in values if g in v])
                for k in sorted({k for v in values for k in v.get(g, {})}, key=int)} for g in ("all", *GROUPS, *STRATA)}


def builtin_probe(budget: Budget) -> dict | None:
    """The probe of the built-in base (builtin_task.probe), or None when the lab runs from another model."""
    if budget.model != "builtin":
        return None
    import builtin_task  # torch and transformers: only when the lab's base is the built-in one

    return builtin_task.probe(os.path.expanduser("~/.cache/sft_rl_fusion"))


def collect(jobs: list[Job], status: dict, methods: list[str], missing: dict, budget: Budget, results: str) -> dict:
    """Everything results.md, the figures and the verdicts need, as one JSON-able dict."""
    by_name = {j.name: j for j in jobs}
    out = {"methods": {}, "missing": missing}
    probe = builtin_probe(budget)
    for m in methods:
        stages = ["stage1", "stage2"] if m in TWO_STAGE else [None]
        trainers = list(TWO_STAGE.get(m, ("sft",) if m in VARIANTS else (m,)))
        runs = []
        for seed in budget.seeds:
            names = [f"{m}-s{seed}" + (f"/{s}" if s else "") for s in stages]
            states = [status.get(n, "not run") for n in names]
            run = {"seed": seed, "dir": os.path.relpath(os.path.join(results, "runs", f"{m}-s{seed}"), results)}
            if all(s in ("done", "reused") for s in states):
                walls = [sum(a["wall_s"] or 0 for a in attempts(by_name[n]))
                         for n in names]
                upto = [val_min_step(by_name[names[0]].out) if m in AT_VAL_MIN else None, None]  # stage 1's switch
                records = stitch([[dict(r, trainer=t) for r in read_metrics(by_name[n].out)
                                   if c is None or r["step"] <= c] for t, n, c in zip(trainers, names, upto)])
                problems = stitch([[r for r in read_metrics(by_name[n].out, "eval_problems.jsonl")
                                    if c is None or r["step"] <= c] for n, c in zip(names, upto)])
                run.update(status="ok", **summarize_run(records, sum(walls)), problems=problem_arrays(problems))
                if m in AT_VAL_MIN:
                    run["switch_step"] = upto[0]
                run["token_shift"] = lab_regimes.token_shift(by_name[names[-1]].out, probe)
            else:
                bad = [n for n, s in zip(names, states) if s not in ("done", "reused")]
                run.update(status="failed", failed=bad, why=", ".join(f"{n}: {status.get(n, 'not run')}" for n in bad),
                           logs=[os.path.relpath(failure_log(results, n), results) for n in bad
                                 if status.get(n) == "failed"])
            passk = f"{m}-s{seed}/passk"
            if run["status"] == "ok" and status.get(passk) in ("done", "reused"):
                run["passk"] = read_passk(by_name[passk].out)
                run["passk_counts"] = read_passk_counts(by_name[passk].out)
            runs.append(run)
        out["methods"][m] = {"label": LABELS[m], "trainers": trainers, "runs": runs, "summary": summarize_method(runs)}
        if any(r.get("passk") for r in runs):
            out["methods"][m]["summary"]["passk"] = passk_stats([r.get("passk") for r in runs])
    # The base: the step-0 evaluations of the single-stage runs of one seed are the same model and draws
    base_runs = [r for m in methods if m in TRAINERS for r in out["methods"][m]["runs"] if r["status"] == "ok"]
    seen, per_seed = set(), []
    for r in base_runs:
        if r["seed"] not in seen and r["base"]:
            seen.add(r["seed"])
            per_seed.append(r["base"])
    out["base"] = {k: stats([b.get(k) for b in per_seed]) for k in sorted({k for b in per_seed for k in b})}
    base_passk = [read_passk(by_name[n].out) for n in (f"base-s{seed}/passk" for seed in budget.seeds)
                  if status.get(n) in ("done", "reused")]
    if base_passk:
        out["base_passk"] = passk_stats(base_passk)
    out["base_passk_counts"] = {seed: c for seed in budget.seeds if status.get(f"base-s{seed}/passk") in
                                ("done", "reused") and (c := read_passk_counts(by_name[f"base-s{seed}/passk"].out))}
    out["problem_groups"], digest = heldout_groups(budget.eval_per_level)
    for r in (r for x in out["methods"].values() for r in x["runs"] if r.get("problems")):
        if r["problems"]["problems"] != digest:  # another held-out set: its counts pair with nothing here
            print(f"lab: {r['dir']}: its evaluation's problems are not the lab's held-out set; left out of the claims")
            r["problems"] = None
    return out


def heldout_groups(per_level: int) -> tuple[list[list[str]], str]:
    """The groups (level<L>, stratum_<S>) of each held-out problem the runs evaluate, in their order, and the
    digest of that order (eval_sets.problems_digest, which every run's eval_problems.jsonl carries)."""
    import builtin_task  # torch: only when results are collected
    import eval_sets

    rows = builtin_task.make_task(per_level, seed=builtin_task.EVAL_SEED)
    return [eval_sets.groups_of(r) for r in rows], eval_sets.problems_digest(rows)


def read_passk_counts(out: str) -> dict | None:
    """A pass@k evaluation's per-problem counts (evaluate.py's metrics.json): {n samples, correct per problem}."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        per_problem = json.load(f).get("per_problem") or {}
    if len(per_problem) != 1:
        return None
    (counts,) = per_problem.values()
    return {"n": counts["k"], "correct": counts["correct"]}


# ======================================================================================
# Main
# ======================================================================================


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown (no git)"


def run_times(jobs: list[Job]) -> dict:
    """The trainer processes' wall time summed over every attempt of every run, and when the first and the
    last attempt started: what the lab cost, also when this invocation reused runs from an earlier one."""
    every = [a for j in jobs for a in attempts(j)]
    started = sorted(a["started"] for a in every if a.get("started"))
    return {"runs_wall_min": sum(a.get("wall_s") or 0 for a in every) / 60,
            "first_started": started[0] if started else None, "last_started": started[-1] if started else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default lab_results/, with --quick lab_results_quick/)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 steps, eval every 2, 10 problems per "
                   "level x 2 samples")
    p.add_argument("--jobs", type=int, default=0, help="trainers run at a time, each with OMP_NUM_THREADS = cores / N "
                   "(default: one per core, at most 4; the small trainers here use a second thread poorly)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each trainer (default cores / jobs; 1 on "
                   "a machine busy with other work, where spinning OpenMP threads slow everything down)")
    p.add_argument("--methods", default="all", help="comma-separated subset of " + ", ".join(METHODS) + ", or a "
                   "group: trainers (the eight, DFT and the two-stage baselines), forks (GRPO and the forks), sweeps "
                   "(LUFFY's gamma, UFT's hint weight, Prefix-RFT's top-k share), lr (each family's lr grid); all = "
                   "trainers and forks")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0-4; sweeps and lr 0-2; --quick 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default 80; --quick 4)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (even)")
    p.add_argument("--eval_every", type=int, default=None, help="evaluation interval (default 10; --quick 2)")
    p.add_argument("--eval_per_level", type=int, default=None, help="held-out problems per level (default 100; "
                   "--quick 10)")
    p.add_argument("--val_rows", type=int, default=None, help="training problems every run holds out as its "
                   "validation split (default 200; --quick 20; 0 = none)")
    p.add_argument("--model", default="builtin", help="base model of every method (default: the built-in one)")
    p.add_argument("--trainer_flags", default="", help="extra common flags for every trainer, e.g. "
                   "\"--eval_samples 8\" (--quick adds --eval_samples 2)")
    p.add_argument("--passk_samples", type=int, default=None, help="samples per problem of the final pass@k "
                   "evaluation of the base, GRPO, NSR, PSR and W-REINFORCE (default 32; --quick 4; 0 = none)")
    p.add_argument("--passk_per_level", type=int, default=None, help="reachable held-out problems per level (1-2) "
                   "in it (default 100; --quick 2)")
    p.add_argument("--verdicts", metavar="RESULTS_JSON", help="print the claim-by-claim verdicts of results.json, "
                   "run nothing")
    a = p.parse_args(argv)
    if a.prompts < 2 or a.prompts % 2:
        p.error("--prompts must be even (RL trainers take mini-batches of half a step's prompts)")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.verdicts:
        with open(a.verdicts) as f:
            print_verdicts(verdicts(json.load(f)))
        return
    q = a.quick
    few = a.methods in ("sweeps", "lr")  # a knob's sweep: 3 seeds unless told otherwise
    seeds = tuple(int(s) for s in (a.seeds or ("0" if q else "0,1,2" if few else "0,1,2,3,4")).split(","))
    steps = a.steps or (4 if q else 80)
    budget = Budget(steps=steps, prompts=a.prompts, eval_every=a.eval_every or (2 if q else 10),
                    eval_per_level=a.eval_per_level or (10 if q else 100), seeds=seeds, model=a.model,
                    val_rows=20 if q and a.val_rows is None else 200 if a.val_rows is None else a.val_rows,
                    trainer_flags=tuple((["--eval_samples", "2"] if q else []) + shlex.split(a.trainer_flags)),
                    passk_samples=(4 if q else 32) if a.passk_samples is None else a.passk_samples,
                    passk_per_level=a.passk_per_level or (2 if q else 100))
    if budget.steps < 2:
        sys.exit("--steps must be at least 2 (a two-stage baseline needs a step per stage)")
    results = os.path.abspath(a.out or ("lab_results_quick" if q else "lab_results"))
    have, missing = available_methods()
    wanted = [m for x in (DEFAULT_GROUPS if a.methods == "all" else a.methods.split(","))
              for m in GROUPS_OF_METHODS.get(x.strip(), [x.strip()])]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        sys.exit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in wanted and m in have]
    missing = {m: why for m, why in missing.items() if m in wanted}
    missing.update({m: "not selected with --methods" for g in DEFAULT_GROUPS for m in GROUPS_OF_METHODS[g]
                    if m not in wanted})  # the sweeps and grids are groups of their own, not missing from a lab
    if any(m in AT_VAL_MIN for m in methods) and not budget.val_rows:
        sys.exit("--val_rows 0: SFT then GRPO (val. min) switches on the validation loss; hold out rows or drop it")
    n_jobs = a.jobs if a.jobs > 0 else min(4, os.cpu_count() or 1)
    threads = a.threads or max(1, (os.cpu_count() or 1) // n_jobs)
    info = {"command": "python lab.py " + shlex.join(sys.argv[1:] if argv is None else argv), "date": now(),
            "commit": git_commit(), "machine": machine(), "jobs": n_jobs, "threads": threads,
            "budget": asdict(budget)}
    eval_file = heldout_file(results, budget.eval_per_level)
    passk_file = heldout_file(results, budget.passk_per_level, (1, 2)) if budget.passk_samples else None
    jobs = plan(budget, methods, results, eval_file, passk_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_jobs stops its trainers
    t0 = time.time()
    status = run_jobs(jobs, results, n_jobs, threads)
    info.update(wall_min=(time.time() - t0) / 60, reused=sum(s == "reused" for s in status.values()),
                runs=len(jobs), **run_times(jobs))
    info["machine"]["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res = {"lab": info, **collect(jobs, status, methods, missing, budget, results)}
    res["verdicts"], res["convergence"] = verdicts(res), convergence(res)
    write_results(res, results, RULES, builtin_probe(budget))
    print(f"lab: {results}/results.md ({info['wall_min']:.1f} min)\n")
    print_verdicts(res["verdicts"])
    failed = sorted(n for n, s in status.items() if s in ("failed", "blocked"))
    if failed:
        print(f"\nlab: {len(failed)} run(s) failed or blocked: {', '.join(failed)} (see {results}/failures/)")
        sys.exit(1)


if __name__ == "__main__":
    main()
