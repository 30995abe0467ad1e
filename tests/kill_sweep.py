"""Kill sweep: kill a trainer at random moments, resume it each time, and check that it ends
bit for bit where an uninterrupted run with the same seed ends.

    OMP_NUM_THREADS=1 python tests/kill_sweep.py                       # all eight trainers, 5 kills each
    OMP_NUM_THREADS=1 python tests/kill_sweep.py --trainers relift uft --kills 2 --max_steps 4

For each trainer: one uninterrupted run, then the same run (same seed, flags and --output_dir layout)
killed --kills times and resumed with --resume after each kill, then left to finish. The kills cycle
through four moments, each drawn at random: `step` (SIGKILL to the whole process group at a random
point within a step's rollout-and-training time after a metrics line; on an evaluation step it can
land in the evaluation), `logged` (SIGKILL right after a metrics line is written,
before that step's checkpoint), `checkpoint` (SIGKILL while a checkpoint-N.tmp is being written) and
`sigterm` (SIGTERM to the trainer at a random point of a step, as torchrun or Kubernetes send it: it
must save and exit 143 with no traceback). `--modes sigterm-group` sends that SIGTERM to every process
of the run instead (grading workers included), as Slurm's scancel does. `--sampler vllm` runs the trainers
on vLLM's engine (its CPU build). Then the final checkpoints are compared: the weights (model.safetensors),
the optimizer state (every DCP entry), the trainer state (step, data position, schedulers, method state),
the RNG states and metrics.jsonl (timing keys aside), all with exact equality. Prints one line per
trainer and exits 1 when anything differs. Runs go under --work.
"""
import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # builtin_task, common
TRAINERS = ["sft", "grpo", "luffy", "srft", "relift", "uft", "bread", "prefix_rft"]
MODES = ["step", "logged", "checkpoint", "sigterm"]  # the default cycle; also "sigterm-group" (see above)
TIMING = {"time_rollout", "time_train", "tokens_per_second"}


def eval_file(work: str) -> str:
    """16 held-out problems of the built-in task (the whole held-out set takes longer than the steps)."""
    import builtin_task
    path = os.path.join(work, "eval.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in builtin_task.make_task(4, seed=builtin_task.EVAL_SEED))
    return path


def trainer_args(trainer: str, out: str, max_steps: int, seed: int, model: str,
                 sampler: str = "torch") -> list[str]:
    """Tiny settings of the built-in task: about a second a step on one CPU core (vLLM: plus the engine's start)."""
    args = ["--model", model, "--sampler", sampler, "--output_dir", out, "--max_steps", str(max_steps),
            "--seed", str(seed),
            "--save_every", "1", "--keep_checkpoints", "1", "--eval_every", "2", "--eval_samples", "2",
            "--eval_data", eval_file(os.path.dirname(os.path.dirname(out))), "--no-compile",
            "--verifier_workers", "1"]
    if trainer == "sft":
        return args + ["--batch_size", "8", "--micro_batch_size", "8"]
    args += ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "4",
             "--micro_batch_size", "8"]
    return args + (["--ft_threshold", "2"] if trainer == "relift" else [])


def start(trainer: str, args: list[str], log: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, f"{trainer}.py"), *args], stdout=f,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)


def logged_steps(out: str) -> int:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def wait_for(proc, condition, timeout=900.0) -> bool:
    """Poll every 2 ms until condition() holds (True) or the process has ended (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError("the trainer made no progress")


def kill_once(trainer, args, out, log, mode, rng, step_s, max_steps) -> dict:
    """Start (or resume) the run and interrupt it at a moment of kind `mode`; what happened. An
    interruption that came after the final checkpoint was written does not count (`killed` False)."""
    started, lines = time.time(), logged_steps(out)
    proc = start(trainer, args, log)

    def writing_checkpoint():  # a checkpoint-N.tmp made by this process (not one a kill left behind)
        with contextlib.suppress(OSError):
            return any(n.endswith(".tmp") and os.stat(os.path.join(out, n)).st_mtime >= started
                       for n in os.listdir(out))
        return False

    hit = wait_for(proc, writing_checkpoint if mode == "checkpoint" else lambda: logged_steps(out) > max(lines, 1))
    if hit and mode in ("step", "sigterm", "sigterm-group"):
        time.sleep(rng.uniform(0, step_s))
    alive = proc.poll() is None
    if alive and mode == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif alive and mode == "sigterm-group":
        os.killpg(proc.pid, signal.SIGTERM)
    elif alive:
        os.killpg(proc.pid, signal.SIGKILL)  # the node is gone: the trainer and its grading workers
    try:
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:  # a run that hangs after an interruption is the failure we look for
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"{trainer}: still running 10 minutes after the {mode} interruption; see {log}")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group a SIGTERM exit left behind
    import common
    final = common.latest_checkpoint(out)
    finished = final is not None and int(final.rsplit("-", 1)[1]) >= max_steps
    return {"mode": mode, "killed": alive and not finished, "code": code, "at_step": logged_steps(out) - 1}


def flat(x, prefix="") -> dict:
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in flat(v, f"{prefix}.{k}").items()}
    if isinstance(x, (list, tuple)):
        return {k2: v2 for i, v in enumerate(x) for k2, v2 in flat(v, f"{prefix}.{i}").items()}
    return {prefix: x}


def differences(a: dict, b: dict, what: str) -> list[str]:
    if a.keys() != b.keys():
        return [f"{what}: keys differ ({sorted(set(a) ^ set(b))[:5]})"]
    bad = [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
    return [f"{what}: {len(bad)} entries differ, e.g. {bad[:3]}"] if bad else []


def optimizer_state(ckpt: str) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(os.path.join(ckpt, "optim"), os.path.join(tmp, "optim.pt"))
        return flat(torch.load(os.path.join(tmp, "optim.pt"), weights_only=True))


def compare(ref: str, cut: str) -> list[str]:
    """Everything the two finished runs left, compared exactly; [] when equal."""
    from safetensors.torch import load_file

    import common
    a, b = common.latest_checkpoint(ref), common.latest_checkpoint(cut)
    if a is None or b is None or os.path.basename(a) != os.path.basename(b):
        return [f"final checkpoints differ: {a} vs {b}"]
    out = differences(load_file(os.path.join(a, "model", "model.safetensors")),
                      load_file(os.path.join(b, "model", "model.safetensors")), "weights")
    out += differences(optimizer_state(a), optimizer_state(b), "optimizer state")
    out += differences(flat(torch.load(os.path.join(a, "trainer_state.pt"), weights_only=True)),
                       flat(torch.load(os.path.join(b, "trainer_state.pt"), weights_only=True)), "trainer state")
    for rng in sorted(glob.glob(os.path.join(a, "rng-rank*.pt"))):
        out += differences(flat(torch.load(rng, weights_only=True)),
                           flat(torch.load(os.path.join(b, os.path.basename(rng)), weights_only=True)), "RNG state")
    ma, mb = ([{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in open(os.path.join(d, "metrics.jsonl"))] for d in (ref, cut))
    if ma != mb:
        first = next((i for i, (x, y) in enumerate(zip(ma, mb)) if x != y), min(len(ma), len(mb)))
        out.append(f"metrics.jsonl differs from line {first + 1} ({len(ma)} vs {len(mb)} lines)")
    return out


def sweep(trainer: str, work: str, kills: int, max_steps: int, seed: int, model: str = "builtin",
          modes: list[str] | None = None, sampler: str = "torch") -> dict:
    """One trainer: the uninterrupted run, the killed-and-resumed one, the comparison."""
    rng = random.Random(f"{trainer}-{seed}")
    ref, cut = os.path.join(work, trainer, "uninterrupted"), os.path.join(work, trainer, "killed")
    for d in (ref, cut):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    t0 = time.time()
    proc = start(trainer, trainer_args(trainer, ref, max_steps, seed, model, sampler), ref + ".log")
    first = wait_for(proc, lambda: logged_steps(ref) > 1)  # step 1 logged: training has started
    t1 = time.time()
    if proc.wait() != 0 or not first:
        raise SystemExit(f"{trainer}: the uninterrupted run failed; see {ref}.log")
    with open(os.path.join(ref, "metrics.jsonl")) as f:  # a step's rollout and training, in seconds
        times = [m["time_rollout"] + m["time_train"] for m in map(json.loads, f) if "time_train" in m]
    step_s = sum(times) / len(times)
    events, resumes = [], 0
    modes = modes or [MODES[i % len(MODES)] for i in range(kills)]
    args = trainer_args(trainer, cut, max_steps, seed, model, sampler)
    for mode in modes:
        e = kill_once(trainer, args + (["--resume"] if resumes else []), cut, cut + ".log", mode, rng, step_s,
                      max_steps)
        resumes += 1
        events.append(e)
        if mode.startswith("sigterm") and e["killed"] and e["code"] != 128 + signal.SIGTERM:
            raise SystemExit(f"{trainer}: SIGTERM exited with {e['code']}, not 143; see {cut}.log")
        if not e["killed"]:  # the run had finished: no more kills possible
            break
    proc = start(trainer, args + ["--resume"], cut + ".log")
    if proc.wait() != 0:
        raise SystemExit(f"{trainer}: the last resume failed; see {cut}.log")
    with open(cut + ".log") as f:
        found = tracebacks(f.read())
    return {"trainer": trainer, "kills": sum(e["killed"] for e in events), "events": events,
            "tracebacks": len(found), "traceback_text": found,
            "differences": compare(ref, cut), "seconds": time.time() - t0, "step_s": step_s, "start_s": t1 - t0}


def tracebacks(log: str, after: int = 30) -> list[str]:
    """Each traceback in the log with the lines around it, so that a failure says what failed."""
    lines = log.splitlines()
    return ["\n".join(lines[max(0, i - 3):i + after]) for i, line in enumerate(lines) if "Traceback" in line]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trainers", nargs="+", default=TRAINERS, choices=TRAINERS)
    p.add_argument("--kills", type=int, default=5, help="interruptions per trainer (cycling through the moments)")
    p.add_argument("--modes", nargs="+", choices=MODES + ["sigterm-group"],
                   help="the kinds of interruption, in order (default: --kills of the cycle " + " ".join(MODES) + ")")
    p.add_argument("--max_steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="builtin")
    p.add_argument("--sampler", choices=["torch", "vllm"], default="torch", help="vllm: vLLM's engine (its CPU build)")
    p.add_argument("--work", default=os.path.join("runs", "kill_sweep"))
    a = p.parse_args()
    failed = False
    for trainer in a.trainers:
        r = sweep(trainer, os.path.abspath(a.work), a.kills, a.max_steps, a.seed, a.model, a.modes, a.sampler)
        moments = ", ".join(f"{e['mode']}@{e['at_step']}" + ("" if e["killed"] else " (missed)") for e in r["events"])
        ok = not r["differences"] and not r["tracebacks"]
        failed |= not ok
        print(f"{trainer}: {r['kills']} interruptions survived ({moments}); "
              + ("final weights, optimizer, trainer state, RNG and metrics.jsonl bit-equal to the uninterrupted run"
                 if ok else f"DIFFERS: {'; '.join(r['differences'])}; tracebacks in the log: {r['tracebacks']}")
              + f" [{r['seconds']:.0f} s]", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
