"""The lab's job runner: how lab.py launches each run as a subprocess, records it and decides what to reuse.

Each Job (a trainer's command line, or an evaluate.py --pass_k evaluation) runs as `python <script> <args>` in
its own process group, n_jobs at a time, its console in lab.log in its output directory; its lab_job.json holds
its command (the results folder written as <results>) and every attempt (started, command, wall_s, returncode).
On a rerun of the lab a finished run with the same command and the same settings is reused (the trainer's Config
with every default filled in: a default changed in the trainer reruns its runs; a change to the code that is not
a setting does not: give such a lab a fresh --out), a run whose command or settings changed (or a second stage
whose first stage ran again) is deleted and started afresh, and an unfinished one, killed or failed, resumes
with the trainer's --resume (an evaluation simply runs again). A failed run's log tail goes to <results>/failures/.
"""
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from cli import parse_config  # the trainers' own flags -> Config (settings)

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Job:
    name: str  # "grpo-s0", "sft_then_grpo-s0/stage2"
    script: str  # "grpo.py", "forks/nsr.py", or "evaluate.py" for a pass@k evaluation
    args: list  # the trainer's flags, --output_dir included
    out: str  # its output directory
    last_step: int
    after: str | None = None  # the job that must finish first (a second stage's first stage)
    at_val_min: bool = False  # a second stage that starts at its first stage's validation-loss minimum (resolve)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_metrics(out: str, name: str = "metrics.jsonl") -> list[dict]:
    """A run's metrics.jsonl (or eval_problems.jsonl) as records; [] where the file does not exist."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def val_min_step(first_out: str) -> int | None:
    """The first stage's switch step (arXiv 2512.11470): its evaluation step with the lowest validation loss
    (demo_nll_val, the NLL of the held-out training demonstrations), the earliest of equal ones, step 0 excluded
    (the base); None before the first stage has finished."""
    losses = {r["step"]: r["demo_nll_val"] for r in read_metrics(first_out) if r.get("demo_nll_val") is not None}
    losses.pop(0, None)
    return min(losses, key=lambda s: (losses[s], s)) if losses else None


def resolve(job: Job, first: Job) -> None:
    """A second stage at its first stage's validation-loss minimum: start from that checkpoint and run the rest of
    the budget, which the first stage ran whole (0 steps when the loss fell to the end: the first stage alone)."""
    switch = val_min_step(first.out)
    if switch is None:
        sys.exit(f"lab: {job.name}: {first.out} logged no validation loss (demo_nll_val): it needs --val_rows")
    job.last_step = first.last_step - switch
    job.args[job.args.index("--max_steps") + 1] = str(job.last_step)
    job.args[job.args.index("--save_every") + 1] = str(max(1, job.last_step // 2))
    model = os.path.join(first.out, f"checkpoint-{switch:06d}", "model")
    if "--model" in job.args:
        job.args[job.args.index("--model") + 1] = model
    else:
        job.args += ["--model", model]


def signature(job: Job, results: str) -> list[str]:
    """The job's command with the results folder written as <results> (a moved folder is still reused)."""
    return [job.script] + [a.replace(os.path.abspath(results), "<results>") for a in job.args]


_MODULES = {}  # script -> its Config and OFFICIAL variant, read once per lab (None: a script without a Config)


def config_class(path: str):
    """(Config, OFFICIAL) of a trainer script, its module imported once; None for a script without a Config class
    (a stand-in in the tests), which is never imported: its top level might run."""
    if path not in _MODULES:
        with open(path, encoding="utf-8") as f:
            _MODULES[path] = None
            if "class Config" in f.read():
                spec = importlib.util.spec_from_file_location(f"_lab_{len(_MODULES)}", path)
                module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # inspect reads its source
                spec.loader.exec_module(module)  # the trainer's module: its main() runs only as a script
                if dataclasses.is_dataclass(getattr(module, "Config", None)):
                    _MODULES[path] = module.Config, getattr(module, "OFFICIAL", None) or {}
    return _MODULES[path]


def settings(job: Job, results: str) -> dict | None:
    """The run's settings: the script's Config parsed from the job's flags, every default filled in (before what a
    trainer resolves at run time, "auto" budgets and the like), the results folder as <results>. None for a script
    without a Config (a stand-in in the tests)."""
    found = config_class(os.path.join(ROOT, job.script))
    if found is None:
        return None
    cfg = parse_config(found[0], list(job.args), variants={"official": found[1]})
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True).replace(os.path.abspath(results), "<results>")
    return json.loads(text)


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
    """The recorded command and settings are the lab's now and, for a second stage, the first stage (`first`) is
    still the run it started from. A run recorded before settings were kept is compared by its command."""
    return (state is not None and state["signature"] == signature(job, results)
            and ("settings" not in state or state["settings"] == settings(job, results))
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
        state = {"signature": signature(job, results), "settings": settings(job, results), "after": origin(first),
                 "attempts": []}
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
        if j.at_val_min and complete(first):
            resolve(j, first)
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
                    if j.at_val_min:
                        resolve(j, order[j.after])
                        if j.last_step == 0:  # the validation loss fell to the end: no second stage
                            status[j.name] = "done"
                            say(f"  none   {j.name}: {j.after} switches at its last step")
                            continue
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
