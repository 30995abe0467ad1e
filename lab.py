"""The laptop lab: every trainer on the built-in task with one budget, three seeds each, and the papers'
claims put to the test. One command, one results folder:

    python lab.py                     # the full lab into lab_results/ (2 idle cores: see docs/lab.md)
    python lab.py --jobs 4            # 4 trainers at a time, each with OMP_NUM_THREADS = cores / 4
    python lab.py --quick             # smoke run into lab_results_quick/: 1 seed, 4 steps, 10 problems per level
    python lab.py --verdicts lab_results/results.json    # the claim-by-claim verdicts of a finished lab

What runs. Every trainer of TRAINERS whose file exists next to this one (one that does not, e.g. srft.py
on a branch without it, is listed as missing in the results), with seeds 0, 1, 2, plus the two-stage
baselines SFT then GRPO and GRPO then SFT, whose second stage starts from the first stage's final
checkpoint, plus the forks of FORKS (forks/, with the RL budget), and after each run of PASSK (and once
per seed for the base) a pass@k evaluation of its final model (evaluate.py --pass_k, METHODS.md Eq. 58).
`--methods trainers` or `--methods forks` runs one group alone. Each run is a subprocess of the trainer's
own command line, `python <trainer>.py --seed S --output_dir <results>/runs/<method>-s<S> ...`, its console
in lab.log there.

Budget matching (lab_report.BUDGET_TEXT, also written into results.md):
  - the same base (the built-in one) and the same prompts: 80 steps x 16 prompts = 1280, drawn in the same
    seeded order; sft.py with --batch_size 16 --max_steps 80; a two-stage baseline 40 + 40 steps of 16
    (the second stage restarts the seeded order: it sees the first stage's 640 prompts again, since no
    trainer flag starts the stream later; the same seed keeps the evaluation's draws those of the others);
  - the same lr per family: the trainers' defaults (RL 2e-4, SFT 5e-4), and every other default too;
  - what cannot be matched is reported: generated tokens (sum over steps of the core key generated_tokens,
    the sampling cost) and demonstration tokens (sum of demo_tokens: the demonstration tokens a step put
    before the model as training target or as context, once per prompt, all ranks).

Reruns. A run is finished when its metrics.jsonl reaches its last step and its final checkpoint exists;
a rerun of the lab reuses it if its command is unchanged (lab_job.json holds the command). An unfinished
run with the same command is resumed (--resume: from its newest checkpoint, or from scratch if it has
none); a run whose command changed is deleted and started afresh, and so is the second stage of a
two-stage baseline whose first stage ran again. A failed run stays in the table as failed, with the tail
of its log in <results>/failures/.

Verdicts: `verdicts()` turns results.json into one verdict per claim with the decision rules
written in its docstring (and in RULES); nothing is hand-written.

Report: lab_report.py writes results.json, results.md (with every seed's value behind each mean) and the
figures. matplotlib is needed for the figures only (optional: without it the lab says so and writes
everything else); the trainers never import it.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import lab_regimes
from lab_report import GROUPS, LABELS, fmt, fmt_tokens, series, write_results

ROOT = os.path.dirname(os.path.abspath(__file__))

# ======================================================================================
# What runs: methods, budget, jobs
# ======================================================================================

TRAINERS = ["sft", "grpo", "luffy", "srft", "relift", "uft", "prefix_rft", "bread"]  # table order
FUSION = ["luffy", "srft", "relift", "uft", "prefix_rft", "bread"]  # single-stage fusion (claim 3)
TWO_STAGE = {"sft_then_grpo": ("sft", "grpo"), "grpo_then_sft": ("grpo", "sft")}
# The forks of forks/ (docs/forks.md): script and the flags that pick the idea; nsr.py runs three objectives
FORKS = {"nsr": ("forks/nsr.py", ("--objective", "nsr")), "psr": ("forks/nsr.py", ("--objective", "psr")),
         "w_reinforce": ("forks/nsr.py", ("--objective", "w_reinforce")),
         "forking_tokens": ("forks/forking_tokens.py", ()), "chord": ("forks/chord.py", ()),
         "hpt": ("forks/hpt.py", ())}
# A trainer's switch that is a method of its own: script and flags (DFT, docs/lab.md "Regimes"; METHODS.md 14)
VARIANTS = {"dft": ("sft.py", ("--token_loss", "dft"))}
METHODS = TRAINERS + list(VARIANTS) + list(TWO_STAGE) + list(FORKS)
GROUPS_OF_METHODS = {"trainers": TRAINERS + list(VARIANTS) + list(TWO_STAGE), "forks": ["grpo", *FORKS]}  # a group
PASSK = ["grpo", "nsr", "psr", "w_reinforce"]  # final models evaluated for pass@k, with the base (claims 7-9)
STRATA = lab_regimes.STRATA  # levels 3-4 by the base's prior on the fact (builtin_task.STRATA, GENERALISATION_FACTS)


@dataclass
class Budget:
    steps: int = 80  # training steps of every method (a two-stage baseline: steps // 2 + the rest)
    prompts: int = 16  # prompts per step (RL: --prompts_per_step, mini-batches of half; SFT: --batch_size)
    eval_every: int = 20  # held-out evaluation every N steps (and at 0 and at the end)
    eval_per_level: int = 200  # held-out problems per level; 200 = the whole built-in held-out set
    seeds: tuple = (0, 1, 2)
    model: str = "builtin"  # the base of every method (tests pass a tiny random model)
    trainer_flags: tuple = ()  # extra flags of common.BaseConfig, given to every trainer
    probe_every: int = 4  # the probe (docs/lab.md) every N steps besides the evaluations: entropy after a switch
    passk_samples: int = 64  # samples per problem of the final pass@k evaluation (PASSK and the base); 0 = none
    passk_per_level: int = 10  # held-out problems per level in it (the first of each level)


@dataclass
class Job:
    name: str  # "grpo-s0", "sft_then_grpo-s0/stage2"
    script: str  # "grpo.py", "forks/nsr.py", or "evaluate.py" for a pass@k evaluation
    args: list  # the trainer's flags, --output_dir included
    out: str  # its output directory
    last_step: int
    after: str | None = None  # the job that must finish first (a second stage's first stage)


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
    """evaluate.py --pass_k on the first passk_per_level held-out problems of each level, passk_samples each."""
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
            start = os.path.join(s1, f"checkpoint-{half:06d}", "model")
            jobs.append(Job(f"{m}-s{seed}/stage1", f"{first}.py",
                            trainer_args(first, budget, seed, half, s1, budget.model, eval_file), s1, half))
            jobs.append(Job(f"{m}-s{seed}/stage2", f"{second}.py",
                            trainer_args(second, budget, seed, budget.steps - half, s2, start, eval_file), s2,
                            budget.steps - half, after=f"{m}-s{seed}/stage1"))
    return jobs


def heldout_file(results: str, per_level: int) -> str | None:
    """A .jsonl of the first `per_level` built-in held-out problems of each level (None: use all 200)."""
    import builtin_task  # torch and transformers: only when a subset is asked for

    if per_level >= builtin_task.HELDOUT_PER_LEVEL:
        return None
    path = os.path.join(results, f"heldout-{per_level}-per-level.jsonl")
    os.makedirs(results, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in builtin_task.make_task(per_level, seed=builtin_task.EVAL_SEED))
    return path


# ======================================================================================
# Running: reuse, resume, parallel jobs, failures
# ======================================================================================


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def signature(job: Job, results: str) -> list[str]:
    """The job's command with the results folder written as <results> (a moved folder is still reused)."""
    return [job.script] + [a.replace(os.path.abspath(results), "<results>") for a in job.args]


def job_state(job: Job) -> dict | None:
    path = os.path.join(job.out, "lab_job.json")
    return json.load(open(path)) if os.path.exists(path) else None


def origin(job: Job | None) -> str | None:
    """When this run was started from scratch (its first attempt): identifies a first stage's run, so that
    a second stage is only ever reused or resumed on top of the first stage it started from."""
    state = job_state(job) if job else None
    return state["attempts"][0]["started"] if state and state["attempts"] else None


def attempts(job: Job) -> list[dict]:
    """The job's recorded attempts (started, command, wall_s, returncode), oldest first; [] if never run."""
    return (job_state(job) or {}).get("attempts", [])


def same_run(job: Job, state: dict | None, results: str, first: Job | None) -> bool:
    """The recorded command is the lab's and, for a second stage, the first stage (`first`) is still the
    run it started from."""
    return (state is not None and state["signature"] == signature(job, results)
            and (first is None or state.get("after") == origin(first)))


def complete(job: Job) -> bool:
    """metrics.jsonl reaches the last step and the final checkpoint exists (an evaluation: metrics.json exists)."""
    if job.script == "evaluate.py":
        return os.path.exists(os.path.join(job.out, "metrics.json"))
    return (any(r["step"] == job.last_step for r in read_metrics(job.out))
            and os.path.isdir(os.path.join(job.out, f"checkpoint-{job.last_step:06d}")))


def finished(job: Job, results: str, first: Job | None = None) -> bool:
    """A run to reuse: the same run (same_run), complete."""
    return same_run(job, job_state(job), results, first) and complete(job)


def start(job: Job, results: str, threads: int, fresh: bool, first: Job | None = None) -> subprocess.Popen:
    """Launch one trainer. fresh (or another command, or another first stage under a second stage):
    delete what the directory holds and start from scratch; else --resume (newest checkpoint, if any)."""
    state = job_state(job)
    if fresh or not same_run(job, state, results, first):
        shutil.rmtree(job.out, ignore_errors=True)
        state = {"signature": signature(job, results), "after": origin(first), "attempts": []}
    os.makedirs(job.out, exist_ok=True)
    resume = state["attempts"] and job.script != "evaluate.py"  # an evaluation simply runs again
    cmd = [sys.executable, os.path.join(ROOT, job.script), *job.args] + (["--resume"] if resume else [])
    state["attempts"].append({"started": now(), "command": shlex.join(cmd), "wall_s": None, "returncode": None})
    with open(os.path.join(job.out, "lab_job.json"), "w") as f:
        json.dump(state, f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               TQDM_MININTERVAL="5")  # progress bars every 5 s in the log, not on every step
    with open(os.path.join(job.out, "lab.log"), "a") as log:  # the child keeps its own handle
        log.write(f"\n==== {now()}  {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(job: Job, results: str, wall: float, returncode: int) -> str:
    """Record the attempt; on failure copy the log's tail to <results>/failures/<job>.log."""
    state = job_state(job)
    state["attempts"][-1].update(wall_s=round(wall, 1), returncode=returncode)
    with open(os.path.join(job.out, "lab_job.json"), "w") as f:
        json.dump(state, f, indent=1)
    if returncode == 0 and complete(job):  # start() wrote this run's signature
        return "done"
    with open(os.path.join(job.out, "lab.log"), errors="replace") as f:
        tail = f.readlines()[-80:]
    path = failure_log(results, job.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{job.name}: exit code {returncode} after {wall:.0f} s; full log {job.out}/lab.log\n\n")
        f.writelines(tail)
    return "failed"


def failure_log(results: str, name: str) -> str:
    return os.path.join(results, "failures", name.replace("/", "-") + ".log")


def run_jobs(jobs: list[Job], results: str, n_jobs: int, threads: int, say=print) -> dict[str, str]:
    """Run what is not finished, n_jobs at a time; returns {job name: reused | done | failed | blocked}."""
    status, order = {}, {j.name: j for j in jobs}
    for j in jobs:
        first = order.get(j.after)
        if finished(j, results, first) and (first is None or status.get(j.after) == "reused"):
            status[j.name] = "reused"
    todo = [j for j in jobs if j.name not in status]
    n_todo = len(todo)
    say(f"lab: {len(jobs)} runs, {len(jobs) - n_todo} reused, {n_todo} to run, {n_jobs} at a time "
        f"with OMP_NUM_THREADS={threads}")
    running, t_lab = {}, time.time()
    try:
        while todo or running:
            for j in list(todo):
                if len(running) >= n_jobs:
                    break
                if j.after and status.get(j.after) in ("failed", "blocked"):
                    status[j.name] = "blocked"
                    todo.remove(j)
                elif j.after is None or status.get(j.after) in ("done", "reused"):
                    todo.remove(j)  # a second stage after a first stage that ran now starts afresh
                    running[j.name] = (start(j, results, threads, fresh=status.get(j.after) == "done",
                                             first=order.get(j.after)), time.time())
                    say(f"  start  {j.name}")
            time.sleep(0.5)
            for name, (p, t0) in list(running.items()):
                if p.poll() is None:
                    continue
                del running[name]
                status[name] = finish(order[name], results, time.time() - t0, p.returncode)
                done = sum(s != "reused" for s in status.values())
                say(f"  {status[name]:6s} {name} in {time.time() - t0:.0f} s ({done}/{n_todo} runs, "
                    f"{(time.time() - t_lab) / 60:.1f} min)" +
                    (f": see {failure_log(results, name)}" if status[name] == "failed" else ""))
    except BaseException:  # Ctrl-C, SIGTERM (main), a closed pipe: stop the trainers this lab started, each
        for p, _ in running.values():  # with its own process group (its verifier workers too)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        raise
    return status


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


LEVEL_KEY = re.compile(r"eval_accuracy_.+_level(\w+)")  # eval_accuracy_<set>_level<L> (one evaluation set)
STRATUM_KEY = re.compile(r"eval_accuracy_.+_stratum_(\w+)")  # eval_accuracy_<set>_stratum_<S>


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
    for r in train:
        running = None if running is None or r.get("demo_tokens") is None else running + r["demo_tokens"]
        cumulative[r["step"]] = running
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
        "entropy_curve": [[r["step"], r.get("entropy")] for r in train],
        "demo_probs": lab_regimes.demo_probs(records), "probe": lab_regimes.probe_series(records),
        "wall_s": wall_s,
    }


def stats(values: list) -> dict | None:
    """Mean and spread over seeds: min, max, range and the sample std (None with one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": m, "min": min(values), "max": max(values), "range": max(values) - min(values), "std": std,
            "n": len(values)}


SUMMARY_KEYS = ["entropy_start", "entropy_final", "response_length_final", "wrong_steps_final", "generated_tokens",
                "demo_tokens", "wall_s"]


def summarize_method(runs: list[dict]) -> dict:
    """Per-method stats over the runs that finished; accuracy keys as final.<key>, base.<key>."""
    ok = [r for r in runs if r["status"] == "ok"]
    out = {k: stats([r[k] for r in ok]) for k in SUMMARY_KEYS}
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
                records = stitch([[dict(r, trainer=t) for r in read_metrics(by_name[n].out)]
                                  for t, n in zip(trainers, names)])
                run.update(status="ok", **summarize_run(records, sum(walls)))
                run["token_shift"] = lab_regimes.token_shift(by_name[names[-1]].out, probe)
            else:
                bad = [n for n, s in zip(names, states) if s not in ("done", "reused")]
                run.update(status="failed", failed=bad, why=", ".join(f"{n}: {status.get(n, 'not run')}" for n in bad),
                           logs=[os.path.relpath(failure_log(results, n), results) for n in bad
                                 if status.get(n) == "failed"])
            passk = f"{m}-s{seed}/passk"
            if run["status"] == "ok" and status.get(passk) in ("done", "reused"):
                run["passk"] = read_passk(by_name[passk].out)
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
    return out


# ======================================================================================
# Verdicts: the claims (CLAIMS, docs/lab.md), decided by explicit rules from results.json
# ======================================================================================

FLOOR = {"accuracy": 0.02, "entropy": 0.01, "tokens": 0.0, "share": 0.02, "kl": 0.01}
RULES = [
    "Comparing a number X of two methods (or a method and the base): d = mean over seeds of X for the first "
    "minus the second; margin = the larger of the two seed ranges (max - min), and at least a floor: 0.02 for "
    "accuracy (about the evaluation's sampling noise on 800 samples per level), 0.01 nats for entropy, 0 for "
    "token counts. \"above\" if d > margin, \"below\" if d < -margin, else \"within\".",
    "A claim that X is larger (or smaller): agrees if X is above (below); disagrees if it is on the other "
    "side; within the margin it disagrees when both seed ranges are under the floor (the lab resolves a "
    "difference of the floor and saw none) and cannot tell otherwise. Fewer than 2 finished seeds on either "
    "side: cannot tell.",
    "\"Matches or beats\" (claim 3): agrees unless below. A claim over several methods agrees when every "
    "comparison agrees, disagrees when every one disagrees, and is mixed otherwise (each listed); missing "
    "or failed methods are named and left out.",
    "Claim 1: GRPO's final accuracy against the base (step 0) on the reachable levels (must be above) and the "
    "out-of-reach levels (must not be above). Claim 2: SFT's out-of-reach accuracy against the base. Claims "
    "3-4: accuracy on all levels at the final step. Claim 5: entropy fall = mean entropy of the first 10% "
    "of training steps minus that of the last 10%, GRPO's against LUFFY's and SRFT's. Claim 6: for each "
    "method that always uses the whole demonstration (SFT, LUFFY, SRFT), the first evaluation step at which "
    "its seed-mean accuracy on all levels reaches BREAD's final one, and the demonstration tokens it used "
    "until then; BREAD's total must be fewer. If it never reaches BREAD's accuracy, BREAD agrees when its "
    "total is below that method's whole-run total, and it cannot tell otherwise.",
    "Claims 7-9 (the forks; pass@k from the final models' pass@k evaluation, Eq. 58, largest k measured): claim 7 "
    "agrees unless GRPO's pass@k on the reachable levels is above the base's (\"no higher\"); claim 8 agrees unless "
    "NSR's pass@k on all levels is below GRPO's (\"at least\"); claim 9: PSR's entropy fall (as in claim 5) must be "
    "above GRPO's, NSR's and W-REINFORCE's, each comparison by rule 2, combined by rule 3.",
    "Claims 10-13 (task version 4's strata and the probe, docs/lab.md): claim 10, per method (LUFFY, UFT, BREAD, "
    "Prefix-RFT), agrees when its final accuracy on the moderate stratum is above the base's and on the needle "
    "stratum not above GRPO's (rule 1), combined by rule 3; claim 11, the share of probe tokens whose probability "
    "moved by more than 0.1 from the base's, SFT's above GRPO's (floor 0.02); claim 12, the final per-token KL(base "
    "|| model) on the base's own probe responses (floor 0.01): SFT's above GRPO's, SFT then GRPO's below SFT's with "
    "its all-level accuracy above SFT's, SRFT's below SFT's, combined by rule 3; claim 13, GRPO then SFT's probe "
    "entropy rise from its switch to the next probe measurement above SFT's from step 0 to its first, and its "
    "all-level accuracy lower at the first evaluation after the switch than at the switch (floors 0.01 nats, 0.02).",
]
CLAIMS = {
    1: "GRPO from a weak base improves the levels it can sometimes solve, not the facts it never saw (the needle "
       "stratum).",
    2: "SFT on demonstrations moves the out-of-reach levels, the needle stratum included.",
    3: "Single-stage fusion (LUFFY, SRFT, ReLIFT, UFT, Prefix-RFT, BREAD) matches or beats both, and SFT then GRPO.",
    4: "GRPO then SFT ends worse than SFT then GRPO (SRFT's Table 4 on the order of the stages).",
    5: "GRPO's entropy falls faster than SRFT's and LUFFY's.",
    6: "BREAD reaches its accuracy with fewer demonstration tokens than the methods that always use the whole "
       "demonstration.",
    7: "RL raises pass@1 but not pass@k at large k: GRPO's pass@64 on the reachable levels is no higher than the "
       "base's.",
    8: "NSR keeps pass@k: NSR's pass@k at large k is at least GRPO's.",
    9: "PSR's entropy falls fastest (faster than GRPO's, NSR's and W-REINFORCE's).",
    10: "Where the base gives the demonstration's fact some probability, the methods that weigh it by that "
        "probability or keep it out of the loss (LUFFY, UFT, BREAD, Prefix-RFT) move levels 3-4; where it gives "
        "it none (the needle), they do not move them beyond GRPO.",
    11: "SFT changes the probability of many more response tokens than RL does (SRFT, arXiv 2506.19767: over 50% "
        "against under 2%).",
    12: "SFT moves farther from the base than GRPO; SFT then GRPO ends closer to the base than SFT alone while "
        "scoring higher; SRFT stays closer to the base than SFT.",
    13: "Switching from GRPO to SFT raises the entropy sharply and drops accuracy at the switch; SFT from the base "
        "raises it less.",
}


def compare(a: dict | None, b: dict | None, floor: float) -> dict:
    """a, b: stats over seeds -> {side: above | below | within | too few seeds, d, margin, resolved}."""
    if not a or not b or a["n"] < 2 or b["n"] < 2:
        return {"side": "too few seeds", "d": None, "margin": None, "resolved": False}
    d, margin = a["mean"] - b["mean"], max(a["range"], b["range"], floor)
    side = "above" if d > margin else "below" if d < -margin else "within"
    return {"side": side, "d": d, "margin": margin, "resolved": max(a["range"], b["range"]) < floor}


def directional(c: dict, want: str) -> str:
    """The verdict on a claim that the first number is `want` (above / below) the second (RULES 2)."""
    if c["side"] == "too few seeds":
        return "cannot tell"
    if c["side"] == want:
        return "agrees"
    if c["side"] != "within":
        return "disagrees"
    return "disagrees" if c["resolved"] else "cannot tell"


def combine(parts: dict[str, str]) -> str:
    """Verdicts of several comparisons -> one (RULES 3)."""
    if not parts:
        return "cannot tell"
    kinds = set(parts.values())
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed: " + "; ".join(f"{v} for {k}" for v, k in sorted((v, k) for k, v in parts.items()))


def verdicts(res: dict) -> list[dict]:
    """One {claim, text, measured, verdict} per claim, by the rules in RULES."""
    methods, base = res["methods"], res.get("base") or {}

    def summ(m):
        x = methods.get(m)
        return x["summary"] if x and any(r["status"] == "ok" for r in x["runs"]) else None

    def acc(m, key="all"):
        s = summ(m)
        return s["final"].get(key) if s else None

    def absent(names):
        gone = [LABELS[n] for n in names if summ(n) is None]
        return f" Not measured (missing or failed): {', '.join(gone)}." if gone else ""

    out = []

    # 1. GRPO: reachable above the base, the needle stratum not above it (out of reach for task versions without strata)
    never = "needle" if base.get("needle") else "out_of_reach"
    r = compare(acc("grpo", "reachable"), base.get("reachable"), FLOOR["accuracy"])
    o = compare(acc("grpo", never), base.get(never), FLOOR["accuracy"])
    if "too few seeds" in (r["side"], o["side"]):
        v1 = "cannot tell"
    elif o["side"] == "above" or r["side"] == "below":
        v1 = "disagrees"
    elif r["side"] == "above":
        v1 = "agrees"
    else:
        v1 = "disagrees" if r["resolved"] else "cannot tell"
    out.append((1, v1, f"GRPO, reachable levels: base {fmt(base.get('reachable'))} -> {fmt(acc('grpo', 'reachable'))}"
                       f" ({r['side']}); {never.replace('_', ' ')}: base {fmt(base.get(never))} -> "
                       f"{fmt(acc('grpo', never))} ({o['side']})." + absent(["grpo"])))

    # 2. SFT: out of reach above the base, and the needle stratum
    parts = {}
    for key in ["out_of_reach"] + (["needle"] if base.get("needle") else []):
        c = compare(acc("sft", key), base.get(key), FLOOR["accuracy"])
        name = key.replace("_", " ")
        parts[name] = (directional(c, "above"), f"{name}: base {fmt(base.get(key))} -> {fmt(acc('sft', key))} ({c['side']})")
    out.append((2, combine({k: v for k, (v, _) in parts.items()}), "SFT, " + "; ".join(t for _, t in parts.values()) +
                "." + absent(["sft"])))

    # 3. each fusion method: not below SFT, GRPO, SFT then GRPO (all levels)
    comparators = ["sft", "grpo", "sft_then_grpo"]
    parts, notes = {}, []
    for f in [f for f in FUSION if summ(f)]:
        sides = {c: compare(acc(f), acc(c), FLOOR["accuracy"]) for c in comparators if summ(c)}
        if not sides or any(s["side"] == "too few seeds" for s in sides.values()):
            parts[LABELS[f]] = "cannot tell"
        else:
            parts[LABELS[f]] = "disagrees" if any(s["side"] == "below" for s in sides.values()) else "agrees"
        few = any(s["side"] == "too few seeds" for s in sides.values())
        notes.append(f"{LABELS[f]} {fmt(acc(f))} (" + ("too few seeds" if few else ", ".join(
            f"{s['side']} {LABELS[c]}" for c, s in sides.items())) + ")")
    ref = ", ".join(f"{LABELS[c]} {fmt(acc(c))}" for c in comparators)
    out.append((3, combine(parts), f"All levels, final: {ref}" + "".join("; " + n for n in notes) + "." +
                absent(FUSION + comparators)))

    # 4. GRPO then SFT below SFT then GRPO
    c = compare(acc("grpo_then_sft"), acc("sft_then_grpo"), FLOOR["accuracy"])
    out.append((4, directional(c, "below"), f"All levels, final: GRPO then SFT {fmt(acc('grpo_then_sft'))}, SFT then "
                                            f"GRPO {fmt(acc('sft_then_grpo'))} ({c['side']})." +
                absent(["grpo_then_sft", "sft_then_grpo"])))

    # 5. GRPO's entropy fall above LUFFY's and SRFT's
    fall = {m: summ(m)["entropy_fall"] if summ(m) else None for m in ("grpo", "luffy", "srft")}
    parts = {LABELS[m]: directional(compare(fall["grpo"], fall[m], FLOOR["entropy"]), "above")
             for m in ("luffy", "srft") if fall[m] and fall["grpo"]}
    out.append((5, combine(parts), "Entropy fall (first minus last 10% of steps, nats): " +
                ", ".join(f"{LABELS[m]} {fmt(fall[m], 3)}" for m in fall) + "." + absent(["grpo", "luffy", "srft"])))

    # 6. BREAD's demonstration tokens against what whole-demonstration methods used to reach its accuracy
    parts, notes = {}, []
    bread, target = summ("bread"), acc("bread")
    for m in [m for m in ("sft", "luffy", "srft") if summ(m)]:
        if not bread or not target or not bread["demo_tokens"] or not summ(m)["demo_tokens"]:
            parts[LABELS[m]] = "cannot tell"
            notes.append(f"{LABELS[m]}: no demo_tokens logged")
            continue
        ok = [r for r in methods[m]["runs"] if r["status"] == "ok"]
        curve = series({"methods": {m: methods[m]}}, "all").get(LABELS[m], {"steps": [], "mean": []})
        reach = next((s for s, a in zip(curve["steps"], curve["mean"]) if a >= target["mean"]), None)
        if reach is None:
            used = summ(m)["demo_tokens"]
            c = compare(bread["demo_tokens"], used, FLOOR["tokens"])
            parts[LABELS[m]] = "agrees" if c["side"] == "below" else "cannot tell"
            notes.append(f"{LABELS[m]} never reaches it ({fmt_tokens(used)} demo tokens in all)")
        else:
            used = stats([r["demo_tokens_at"].get(str(reach)) for r in ok])
            c = compare(bread["demo_tokens"], used, FLOOR["tokens"])
            parts[LABELS[m]] = directional(c, "below")
            notes.append(f"{LABELS[m]} reaches it at step {reach} with {fmt_tokens(used)} demo tokens")
    tokens = fmt_tokens(bread and bread["demo_tokens"])
    out.append((6, combine(parts), f"BREAD: all levels {fmt(target)} with {tokens} demo tokens (anchors of its "
                                   "trained groups)" + "".join("; " + n for n in notes) + "." +
                absent(["bread", "sft", "luffy", "srft"])))
    # 7-9: the forks' claims on pass@k and entropy
    def at_k(stats_by_group, group):
        by_k = (stats_by_group or {}).get(group) or {}
        k = max((int(k) for k, s in by_k.items() if s), default=None)
        return (k, by_k[str(k)]) if k else (None, None)

    base_pk = res.get("base_passk")
    grpo_pk = summ("grpo").get("passk") if summ("grpo") else None
    k_g, g_reach = at_k(grpo_pk, "reachable")
    k_b, b_reach = at_k(base_pk, "reachable")
    c = compare(g_reach, b_reach, FLOOR["accuracy"]) if k_g and k_g == k_b else compare(None, None, 0)
    v7 = "cannot tell" if c["side"] == "too few seeds" else "disagrees" if c["side"] == "above" else "agrees"
    out.append((7, v7, f"Reachable levels, pass@{k_g or '?'}: base {fmt(b_reach)}, GRPO {fmt(g_reach)} ({c['side']})."
                + ("" if base_pk else " No pass@k evaluation of the base.") + absent(["grpo"])))
    nsr_pk = summ("nsr").get("passk") if summ("nsr") else None
    k_n, n_all = at_k(nsr_pk, "all")
    k_g, g_all = at_k(grpo_pk, "all")
    c = compare(n_all, g_all, FLOOR["accuracy"]) if k_n and k_n == k_g else compare(None, None, 0)
    v8 = "cannot tell" if c["side"] == "too few seeds" else "disagrees" if c["side"] == "below" else "agrees"
    out.append((8, v8, f"All levels, pass@{k_n or '?'}: GRPO {fmt(g_all)}, NSR {fmt(n_all)} ({c['side']})." +
                absent(["grpo", "nsr"])))
    fall = {m: summ(m)["entropy_fall"] if summ(m) else None for m in ("psr", "grpo", "nsr", "w_reinforce")}
    parts = {LABELS[m]: directional(compare(fall["psr"], fall[m], FLOOR["entropy"]), "above")
             for m in ("grpo", "nsr", "w_reinforce") if fall[m] and fall["psr"]}
    out.append((9, combine(parts), "Entropy fall (first minus last 10% of steps, nats): " +
                ", ".join(f"{LABELS[m]} {fmt(fall[m], 3)}" for m in fall) + "." +
                absent(["psr", "grpo", "nsr", "w_reinforce"])))
    out += regime_verdicts(res, summ, acc, absent)
    return [{"claim": n, "text": CLAIMS[n], "verdict": v, "measured": text} for n, v, text in out]


def regime_verdicts(res: dict, summ, acc, absent) -> list[tuple]:
    """Claims 10-13 (the regimes and the SRFT paper's analyses), by RULES 1-3 on the strata and the probe."""
    base, out = res.get("base") or {}, []
    # 10. per method: moderate above the base; needle not above GRPO's
    parts, notes = {}, []
    for m in [m for m in ("luffy", "uft", "bread", "prefix_rft") if summ(m)]:
        mod = compare(acc(m, "moderate"), base.get("moderate"), FLOOR["accuracy"])
        ndl = compare(acc(m, "needle"), acc("grpo", "needle"), FLOOR["accuracy"])
        if "too few seeds" in (mod["side"], ndl["side"]):
            parts[LABELS[m]] = "cannot tell"
        elif mod["side"] == "below" or ndl["side"] == "above":
            parts[LABELS[m]] = "disagrees"
        else:
            parts[LABELS[m]] = "agrees" if mod["side"] == "above" else "disagrees" if mod["resolved"] else "cannot tell"
        notes.append(f"{LABELS[m]}: moderate {fmt(acc(m, 'moderate'))} ({mod['side']} the base), weak "
                     f"{fmt(acc(m, 'weak'))}, needle {fmt(acc(m, 'needle'))} ({ndl['side']} GRPO)")
    out.append((10, combine(parts), f"Base: moderate {fmt(base.get('moderate'))}, weak {fmt(base.get('weak'))}, needle "
                                    f"{fmt(base.get('needle'))}; GRPO: moderate {fmt(acc('grpo', 'moderate'))}, needle "
                                    f"{fmt(acc('grpo', 'needle'))}; " + "; ".join(notes) + "." +
                absent(["grpo", "luffy", "uft", "bread", "prefix_rft"])))

    # 11. token shift: SFT's moved share of the probe's tokens above GRPO's
    shift = {m: summ(m)["token_shift"]["all"] if summ(m) else None for m in ("sft", "grpo")}
    c = compare(shift["sft"], shift["grpo"], FLOOR["share"])
    by_kind = {m: ", ".join(f"{k} {fmt(summ(m)['token_shift'][k])}" for k in ("base", "demo")) if summ(m) else "n/a"
               for m in ("sft", "grpo")}
    out.append((11, directional(c, "above"), f"Share of probe tokens moved by more than {lab_regimes.SHIFT}: SFT "
                                            f"{fmt(shift['sft'])} ({by_kind['sft']}), GRPO {fmt(shift['grpo'])} "
                                            f"({by_kind['grpo']}) ({c['side']})." + absent(["sft", "grpo"])))

    # 12. learning dynamics on the probe: KL from the base at the end
    kl = {m: summ(m)["probe_final"]["kl_base"] if summ(m) else None for m in ("sft", "grpo", "sft_then_grpo", "srft")}
    parts = {"SFT farther than GRPO": directional(compare(kl["sft"], kl["grpo"], FLOOR["kl"]), "above"),
             "SFT then GRPO closer than SFT": directional(compare(kl["sft_then_grpo"], kl["sft"], FLOOR["kl"]),
                                                          "below"),
             "SFT then GRPO higher than SFT": directional(compare(acc("sft_then_grpo"), acc("sft"), FLOOR["accuracy"]),
                                                          "above"),
             "SRFT closer than SFT": directional(compare(kl["srft"], kl["sft"], FLOOR["kl"]), "below")}
    out.append((12, combine(parts), "Final KL(base || model) per token on the probe: " +
                ", ".join(f"{LABELS[m]} {fmt(kl[m])}" for m in kl) + f"; all levels: SFT {fmt(acc('sft'))}, SFT then "
                f"GRPO {fmt(acc('sft_then_grpo'))}." + absent(list(kl))))

    # 13. the probe's entropy at a switch: GRPO then SFT's rise at its SFT stage against SFT's rise at its start
    half = res.get("lab", {}).get("budget", {}).get("steps", 0) // 2  # the two-stage baselines' switch
    rise = {"grpo_then_sft": stats(_rises(res, "grpo_then_sft", half)), "sft": stats(_rises(res, "sft", 0))}
    drop = stats(_drops(res, "grpo_then_sft", half))
    parts = {"entropy rise above SFT's": directional(compare(rise["grpo_then_sft"], rise["sft"], FLOOR["entropy"]),
                                                     "above"),
             "accuracy drop at the switch": directional(compare(drop, {"mean": 0, "min": 0, "max": 0, "range": 0,
                                                                       "n": 2}, FLOOR["accuracy"]), "above")}
    out.append((13, combine(parts), f"Probe entropy from the last measurement before the switch (step {half}) to "
                                    f"the first after: GRPO then SFT {fmt(rise['grpo_then_sft'], 4)}; SFT from step 0 "
                                    f"to its first: {fmt(rise['sft'], 4)} nats; all-level accuracy from step {half} to "
                                    f"the next evaluation falls by {fmt(drop)}." + absent(["grpo_then_sft", "sft"])))
    return out


def _rises(res: dict, method: str, at: int) -> list:
    """Per seed: the probe entropy at the first measurement after step `at` minus the one at `at`."""
    out = []
    for r in (res["methods"].get(method) or {}).get("runs", []):
        points = {p[0]: p[3] for p in r.get("probe") or []}
        after = min((s for s in points if s > at), default=None)
        out.append(points[after] - points[at] if after is not None and at in points else None)
    return out


def _drops(res: dict, method: str, at: int) -> list:
    """Per seed: all-level accuracy at step `at` minus at the next evaluation (a drop is positive)."""
    out = []
    for r in (res["methods"].get(method) or {}).get("runs", []):
        evals = {int(s): a["all"] for s, a in (r.get("evals") or {}).items()}
        after = min((s for s in evals if s > at), default=None)
        out.append(evals[at] - evals[after] if after is not None and at in evals else None)
    return out


def print_verdicts(claims: list[dict]) -> None:
    for v in claims:
        print(f"{v['claim']}. {v['text']}\n   measured: {v['measured']}\n   verdict:  {v['verdict']}\n")
    print("Decision rules:\n" + "\n".join(f"  - {r}" for r in RULES))


# ======================================================================================
# Main
# ======================================================================================


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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
                   "(default: one per core, at most 4: on 2 cores the full lab took 53.5 min so, against an estimated 70 "
                   "one at a time with 2 threads)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each trainer (default cores / jobs; 1 on "
                   "a machine busy with other work, where spinning OpenMP threads slow everything down)")
    p.add_argument("--methods", default="all", help="comma-separated subset of " + ", ".join(METHODS) + ", or a "
                   "group: trainers (the eight and the two-stage baselines), forks (GRPO and the forks)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default 80; --quick 4)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (even)")
    p.add_argument("--eval_every", type=int, default=None, help="evaluation interval (default 20; --quick 2)")
    p.add_argument("--eval_per_level", type=int, default=None, help="held-out problems per level (default 200; "
                   "--quick 10)")
    p.add_argument("--model", default="builtin", help="base model of every method (default: the built-in one)")
    p.add_argument("--trainer_flags", default="", help="extra common flags for every trainer, e.g. "
                   "\"--eval_samples 8\" (--quick adds --eval_samples 2)")
    p.add_argument("--passk_samples", type=int, default=None, help="samples per problem of the final pass@k "
                   "evaluation of the base, GRPO, NSR, PSR and W-REINFORCE (default 64; --quick 4; 0 = none)")
    p.add_argument("--passk_per_level", type=int, default=None, help="held-out problems per level in it "
                   "(default 10; --quick 2)")
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
    seeds = tuple(int(s) for s in (a.seeds or ("0" if q else "0,1,2")).split(","))
    steps = a.steps or (4 if q else 80)
    budget = Budget(steps=steps, prompts=a.prompts, eval_every=a.eval_every or (2 if q else 20),
                    eval_per_level=a.eval_per_level or (10 if q else 200), seeds=seeds, model=a.model,
                    trainer_flags=tuple((["--eval_samples", "2"] if q else []) + shlex.split(a.trainer_flags)),
                    passk_samples=(4 if q else 64) if a.passk_samples is None else a.passk_samples,
                    passk_per_level=a.passk_per_level or (2 if q else 10))
    if budget.steps < 2:
        sys.exit("--steps must be at least 2 (a two-stage baseline needs a step per stage)")
    results = os.path.abspath(a.out or ("lab_results_quick" if q else "lab_results"))
    have, missing = available_methods()
    wanted = METHODS if a.methods == "all" else \
        [m for x in a.methods.split(",") for m in GROUPS_OF_METHODS.get(x.strip(), [x.strip()])]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        sys.exit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in wanted and m in have]
    missing = {m: why for m, why in missing.items() if m in wanted}
    missing.update({m: "not selected with --methods" for m in METHODS if m not in wanted})
    n_jobs = a.jobs if a.jobs > 0 else min(4, os.cpu_count() or 1)
    threads = a.threads or max(1, (os.cpu_count() or 1) // n_jobs)
    info = {"command": "python lab.py " + shlex.join(sys.argv[1:] if argv is None else argv), "date": now(),
            "commit": git_commit(), "machine": machine(), "jobs": n_jobs, "threads": threads,
            "budget": asdict(budget)}
    eval_file = heldout_file(results, budget.eval_per_level)
    passk_file = (heldout_file(results, budget.passk_per_level) or "builtin") if budget.passk_samples else None
    jobs = plan(budget, methods, results, eval_file, passk_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_jobs stops its trainers
    t0 = time.time()
    status = run_jobs(jobs, results, n_jobs, threads)
    info.update(wall_min=(time.time() - t0) / 60, reused=sum(s == "reused" for s in status.values()),
                runs=len(jobs), **run_times(jobs))
    info["machine"]["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res = {"lab": info, **collect(jobs, status, methods, missing, budget, results)}
    res["verdicts"] = verdicts(res)
    write_results(res, results, RULES, builtin_probe(budget))
    print(f"lab: {results}/results.md ({info['wall_min']:.1f} min)\n")
    print_verdicts(res["verdicts"])
    failed = sorted(n for n, s in status.items() if s in ("failed", "blocked"))
    if failed:
        print(f"\nlab: {len(failed)} run(s) failed or blocked: {', '.join(failed)} (see {results}/failures/)")
        sys.exit(1)


if __name__ == "__main__":
    main()
