"""One command for a lent GPU without vLLM: what can run there, most important first, in under 8 minutes, into
one results file (docs/gpu.md, "The lent-GPU check").

    python scripts/gpu/check.py [--out runs/gpu_check] [--budget 450] [--cache_dir DIR]
    python scripts/gpu/check.py --dry_run      # no GPU: the plan, every command's flags parsed, step 4 rehearsed
                                               # on the CPU with a tiny model (CI runs this)

Steps, each with its share of the budget (what a step leaves unused goes to the next; a step that no longer fits
is skipped, and says so):
  1. lm_head   the fused LM head (lm_head.py, never run on a GPU) against float64, eager and compiled, float32
               and bfloat16, and its time and memory against the naive form (scripts/gpu/logprob_check.py)
  2. smoke     grpo.py on the torch sampler: FSDP2 on a one-rank NCCL group, bf16 compute, torch.compile, KL
               to a reference model, gradient checkpointing, checkpoints at steps 2 and 4, then the run cut after
               its step-2 checkpoint and resumed (checks: scripts/gpu/smoke.py)
  3. trainers  one step of every trainer, all at once, each writing a checkpoint
  4. memory    issue 34's item 1: the policy and its AdamW state on the GPU, then a stand-in of the vLLM engine
               (cuMemAlloc through libcuda, outside torch's allocator, as vLLM's cuMemCreate is) of the size the
               trainer's arithmetic gives it, asleep while training steps and woken before each: does the KV
               cache's wake-up fit, and what slack does it leave (the arithmetic keeps 3 GiB)? Once with the
               state created up front (common.init_adam_state, what the trainers do) and once created at the
               first step with the old estimate (what they did)
The first line printed says what is skipped and why. OUT/results.json: the machine and, per step, its status (ok,
failed, timed out, skipped), seconds, numbers and the tail of its output; each step's log beside it.
"""
import argparse
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)
GiB = 2 ** 30
TRAINERS = ["sft", "grpo", "luffy", "srft", "relift", "uft", "bread", "prefix_rft"]
BUDGETS = {"lm_head": 80, "smoke": 180, "trainers": 130, "memory": 60}  # seconds, in this order
SMOKE_ARGS = ["--model", "builtin", "--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "4",
              "--micro_batch_size", "4", "--eval_samples", "2", "--eval_every", "2", "--lr", "1e-3",
              "--entropy_coef", "0.01", "--verifier_workers", "1", "--rollout_debug", "--system_prompt", "",
              "--max_prompt_len", "64", "--max_response_len", "48", "--sampler", "torch", "--max_steps", "4",
              "--save_every", "2", "--kl_coef", "0.01", "--gradient_checkpointing"]
TRAINER_ARGS = ["--sampler", "torch", "--max_steps", "1", "--save_every", "1", "--eval_data", "none", "--overwrite"]


# ---------------------------------------------------------------------------------------------
# running commands within a deadline
# ---------------------------------------------------------------------------------------------

def sh(cmd: list[str], log: str, deadline: float, env: dict | None = None) -> tuple[int | None, float]:
    """Run cmd (output appended to log) until it ends or the deadline passes: (exit code or None, seconds)."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        return wait(p, deadline), time.time() - t0


def wait(p: subprocess.Popen, deadline: float) -> int | None:
    try:
        return p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the process group: torch.compile's workers too
        p.wait()
        return None


def tail(log: str, chars: int = 2000) -> str:
    with open(log, errors="replace") as f:
        return f.read()[-chars:]


# ---------------------------------------------------------------------------------------------
# the steps: each returns (status, numbers) and writes its output to out/<name>.log
# ---------------------------------------------------------------------------------------------

def step_lm_head(a, out, deadline):
    path = os.path.join(out, "lm_head.json")
    rc, _ = sh([sys.executable, "scripts/gpu/logprob_check.py", "--json", path], os.path.join(out, "lm_head.log"),
               deadline)
    numbers = json.load(open(path)) if rc == 0 and os.path.exists(path) else {}
    return status(rc, rc == 0 and bool(numbers.get("speed"))), numbers


def step_smoke(a, out, deadline):
    d, log = os.path.join(out, "smoke"), os.path.join(out, "smoke.log")
    full, cut = os.path.join(d, "full"), os.path.join(d, "resumed")
    smoke = [sys.executable, "scripts/gpu/smoke.py"]
    data = ["--data", os.path.join(d, "train.jsonl"), "--eval_data", os.path.join(d, "eval.jsonl")]
    numbers = {}
    for name, cmd in (("data", smoke + ["data", d]),
                      ("run", [sys.executable, "grpo.py", *SMOKE_ARGS, *data, *cache(a), "--output_dir", full,
                               "--overwrite"]),
                      ("check", smoke + ["check", full, "--world", "1"]),
                      ("cut", smoke + ["cut", full, cut]),
                      ("resumed run", [sys.executable, "grpo.py", *SMOKE_ARGS, *data, *cache(a), "--output_dir", cut,
                                       "--resume"]),
                      ("resume check", smoke + ["resume", full, cut])):
        rc, seconds = sh(cmd, log, deadline)
        numbers[name] = {"rc": rc, "seconds": round(seconds, 1)}
        if rc != 0:
            return status(rc, False) + f" at '{name}'", numbers
    numbers["metrics"] = last_metrics(full)
    return "ok", numbers


def step_trainers(a, out, deadline):
    rc, _ = sh([sys.executable, "-c", f"import builtin_task, os; builtin_task.build_base_model(os.path.expanduser("
                f"{a.cache_dir!r}))"], os.path.join(out, "trainers.log"), deadline)  # once, not 8 times at once
    if rc != 0:
        return status(rc, False) + " building the builtin base", {}
    runs, t0 = {}, time.time()
    for t in TRAINERS:
        with open(os.path.join(out, f"trainer_{t}.log"), "w") as log:
            runs[t] = subprocess.Popen([sys.executable, f"{t}.py", *TRAINER_ARGS, *cache(a), "--output_dir",
                                        os.path.join(out, f"t_{t}")], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                       start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    numbers = {}
    for t, p in runs.items():
        rc = wait(p, deadline)
        ckpt = os.path.join(out, f"t_{t}", "checkpoint-000001")
        numbers[t] = {"rc": rc, "seconds": round(time.time() - t0, 1), "checkpoint": os.path.isdir(ckpt),
                      **last_metrics(os.path.join(out, f"t_{t}"))}
    ok = all(n["rc"] == 0 and n["checkpoint"] for n in numbers.values())
    bad = [t for t, n in numbers.items() if not (n["rc"] == 0 and n["checkpoint"])]
    return "ok" if ok else f"failed: {', '.join(bad)} (logs: trainer_<name>.log)", numbers


def step_memory(a, out, deadline):
    numbers, log = {}, os.path.join(out, "memory.log")
    for i, variant in enumerate(("up_front", "first_step")):
        path = os.path.join(out, f"memory_{variant}.json")
        share = time.time() + (deadline - time.time()) / (2 - i)
        rc, _ = sh([sys.executable, HERE, "_memory", "--variant", variant, "--json", path], log, share)
        numbers[variant] = json.load(open(path)) if rc == 0 and os.path.exists(path) else {"rc": rc}
    ok = all("wakes" in n for n in numbers.values())
    fits = ok and all(w["fits"] for w in numbers["up_front"]["wakes"])
    return "ok" if fits else ("failed: a wake-up did not fit" if ok else "failed"), numbers


STEPS = [("lm_head", step_lm_head, "the fused LM head against float64, and its time and memory (logprob_check.py)"),
         ("smoke", step_smoke, "grpo.py: FSDP2 bf16, compile, KL, gradient checkpointing, checkpoints, resume"),
         ("trainers", step_trainers, "one step of every trainer, with a checkpoint"),
         ("memory", step_memory, "AdamW state before a stand-in engine of the arithmetic's size, woken each step")]


def status(rc, ok) -> str:
    return "timed out" if rc is None else "ok" if ok else f"failed (exit {rc})"


def cache(a) -> list[str]:
    return ["--cache_dir", a.cache_dir]


def last_metrics(run: str) -> dict:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    lines = [json.loads(line) for line in open(path) if line.strip()]
    keep = ("step", "loss", "grad_norm", "reward", "time_train")
    return {"last": {k: lines[-1][k] for k in keep if k in lines[-1]}} if lines else {}


# ---------------------------------------------------------------------------------------------
# step 4's body, in a process of its own per variant (and rehearsed on the CPU by --dry_run)
# ---------------------------------------------------------------------------------------------

class EngineMemory:
    """Stand-in for the vLLM engine's sleep-mode memory: blocks from the CUDA driver (cuMemAlloc_v2), outside
    torch's caching allocator as vLLM's cuMemCreate pool is; on the CPU rehearsal, counted bytes of a pretend
    GPU of `total` bytes."""

    def __init__(self, cuda: bool, total: int = 0):
        self.cuda, self.total, self.held = cuda, total, {}
        if cuda:  # the driver API, in the primary context torch's runtime uses
            import torch
            self.lib, ctx, dev = ctypes.CDLL("libcuda.so.1"), ctypes.c_void_p(), ctypes.c_int()
            for rc in (self.lib.cuInit(0), self.lib.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device()),
                       self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), self.lib.cuCtxSetCurrent(ctx)):
                if rc != 0:
                    raise RuntimeError(f"the CUDA driver API returned error {rc}")

    def alloc(self, nbytes: int) -> int | None:
        """A block of nbytes, or None if the device has no room (CUDA_ERROR_OUT_OF_MEMORY)."""
        if not self.cuda:
            if self.used() + nbytes > self.total:
                return None
            self.held[len(self.held) + 1] = nbytes
            return len(self.held)
        ptr = ctypes.c_uint64()
        rc = self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes))
        if rc == 2:
            return None
        if rc != 0:
            raise RuntimeError(f"cuMemAlloc_v2 returned CUDA error {rc}")
        self.held[ptr.value] = nbytes
        return ptr.value

    def free(self, handle):
        if handle is None:
            return
        nbytes = self.held.pop(handle)
        if self.cuda:
            self.lib.cuMemFree_v2(ctypes.c_uint64(handle))
        del nbytes

    def used(self) -> int:
        return sum(self.held.values())


def memory(variant: str, path: str, rehearsal: bool):
    """Build a Qwen2.5-0.5B-sized policy (FSDP2, bf16 compute, gradient checkpointing) and its AdamW, measure free
    memory as make_sampler does, start and put to sleep an engine of that size, then for 3 steps: wake (weights,
    the push's bf16 gathers, KV cache), sleep, train one step. Records whether each wake-up fit and its slack."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import common

    d = common.Dist() if rehearsal else common.init_distributed(one_rank_group=True)
    cuda = d.device.type == "cuda"
    shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2) if not rehearsal else \
        dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
    cfg = Qwen2Config(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(d.device):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = common.wrap_policy(lm, d, compile=False)
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "up_front":
        opt = common.adamw(model, 1e-5, 0.0)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
    shard = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in params)
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    engine = EngineMemory(cuda, total=0 if cuda else 64 * shard)

    def mem_info():
        if cuda:
            return torch.cuda.mem_get_info(d.device)
        held = engine.used() + shard + sum(t.nbytes for s in opt.state.values() for t in s.values()
                                           if torch.is_tensor(t))
        return engine.total - held, engine.total

    def empty_cache():
        if cuda:
            torch.cuda.empty_cache()

    empty_cache()
    free, total = mem_info()
    # the arithmetic of make_sampler: measured with the state (now), or estimated before it (before issue 34)
    estimate = 0 if variant == "up_front" else 2 * shard
    fraction = common.vllm_memory_fraction(free - estimate, total, shard, sleep=True,
                                           headroom=common.VLLM_HEADROOM if cuda else 0)
    weights = 2 * sum(p.numel() for p in params)
    kv = int(fraction * total) - weights
    result = {"variant": variant, "rehearsal": rehearsal, "device": str(d.device), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(d.device) if cuda else "cpu", "shard_gib": shard / GiB,
              "state_at_measure_gib": state / GiB, "free_at_measure_gib": free / GiB, "total_gib": total / GiB,
              "fraction": fraction, "engine_gib": fraction * total / GiB, "kv_gib": kv / GiB, "wakes": []}
    if kv <= 0:
        raise SystemExit(f"no room for a KV cache: fraction {fraction}")
    blocks = [engine.alloc(weights), engine.alloc(kv)]  # the engine starts (profiles, maps its KV cache) ...
    if None in blocks:
        raise SystemExit("the stand-in engine did not fit at start")
    for b in blocks:  # ... and sleeps (level 2) until the first push
        engine.free(b)
    g = torch.Generator().manual_seed(1)
    rows, prompt, response = (2, 8, 16) if rehearsal else (8, 256, 768)
    batch = common.make_batch(torch.randint(3, cfg.vocab_size, (rows, prompt), generator=g).tolist(),
                              torch.randint(3, cfg.vocab_size, (rows, response), generator=g).tolist(), 0, d.device)
    for step in (1, 2, 3):
        empty_cache()  # sync_weights
        w = engine.alloc(weights)
        for _ in common.full_state_dict(model, dtype=torch.bfloat16):  # the push: one gathered tensor at a time
            pass
        empty_cache()  # CuMemAllocator.wake_up empties torch's cache before mapping the KV cache
        k = engine.alloc(kv)
        after = mem_info()[0]
        reserved = torch.cuda.memory_reserved(d.device) if cuda else 0
        allocated = torch.cuda.memory_allocated(d.device) if cuda else 0
        result["wakes"].append({"step": step, "fits": w is not None and k is not None, "slack_gib": after / GiB,
                                "torch_reserved_gib": reserved / GiB, "torch_unused_reserved_gib":
                                (reserved - allocated) / GiB})
        engine.free(w), engine.free(k)  # release(): sleep level 2
        logp, ent = model(**common.model_inputs(batch), with_entropy=True)
        loss = -(logp.sum() + 0.01 * ent.sum()) / batch["response_mask"].sum()
        loss.backward()
        result["wakes"][-1]["loss"] = float(loss)
        common.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            result["wakes"][-1]["train_peak_gib"] = torch.cuda.max_memory_allocated(d.device) / GiB
            torch.cuda.reset_peak_memory_stats(d.device)
    result["finite"] = all(math.isfinite(w["loss"]) for w in result["wakes"])
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    common.shutdown()


# ---------------------------------------------------------------------------------------------
# the plan, the dry run, the machine
# ---------------------------------------------------------------------------------------------

def check_flags() -> list[str]:
    """Every trainer command of steps 2 and 3 parsed by its trainer's own Config: a flag typo fails here, on
    the CPU, not on a lent GPU."""
    import importlib

    import common
    problems = []
    for t, argv in [("grpo", SMOKE_ARGS)] + [(t, TRAINER_ARGS) for t in TRAINERS]:
        module = importlib.import_module(t)
        try:
            common.parse_config(module.Config, argv + ["--cache_dir", "x", "--output_dir", "x"])
        except SystemExit as e:
            problems.append(f"{t}.py: {e}")
    return problems


def machine() -> dict:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError as e:
        info["transformers"] = f"missing: {e}"
    if torch.cuda.is_available():
        info.update(gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(0),
                    gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / GiB)
    return info


def skips(info: dict, dry: bool, why_dry: str) -> list[str]:
    out = ["vLLM (it cannot be installed on the lent machines; scripts/gpu/smoke.sh runs it where it can)",
           "more than one GPU (NCCL between ranks, multi-node): " + ("one GPU here" if info.get("gpus") == 1 else
                                                                    "not in this script's 8 minutes")]
    if not info["torch"].startswith("2.13"):
        out.append(f"nothing for torch {info['torch']} rather than the pinned 2.13, but a step that needs an API "
                   "it lacks fails alone, its log naming the API")
    if dry:
        out.insert(0, f"every GPU step ({why_dry}): the plan and its flags are checked, step 4 rehearsed on the CPU")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--budget", type=float, default=sum(BUDGETS.values()), help="seconds for all steps")
    p.add_argument("--cache_dir", default="~/.cache/sft_rl_fusion", help="where the builtin base is (or is built)")
    p.add_argument("--dry_run", action="store_true")
    if len(sys.argv) > 1 and sys.argv[1] == "_memory":  # step 4's body in its own process
        q = argparse.ArgumentParser()
        q.add_argument("_memory")
        q.add_argument("--variant", choices=("up_front", "first_step"), required=True)
        q.add_argument("--json", required=True)
        q.add_argument("--rehearsal", action="store_true")
        b = q.parse_args()
        return memory(b.variant, b.json, b.rehearsal)
    a = p.parse_args()
    t_start = time.time()
    import torch
    info = machine()
    dry = a.dry_run or not torch.cuda.is_available()
    why_dry = "--dry_run" if a.dry_run else "no GPU visible to torch"
    skipped = skips(info, dry, why_dry)
    print("gpu check: skipping " + "; ".join(skipped), flush=True)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info, "dry_run": dry, "skipped": skipped,
               "budget_s": a.budget, "steps": []}
    deadline = t_start + a.budget
    names = [name for name, _, _ in STEPS]
    scale = a.budget / sum(BUDGETS.values())
    for i, (name, fn, what) in enumerate(STEPS):
        reserved = scale * sum(BUDGETS[n] for n in names[i + 1:])  # kept for the steps after this one
        step = {"name": name, "what": what, "budget_s": round(scale * BUDGETS[name])}
        t0 = time.time()
        if dry:
            step["status"] = f"skipped ({why_dry})"
        elif deadline - reserved - t0 < 0.5 * scale * BUDGETS[name]:
            step["status"] = "skipped (the earlier steps used its time)"
        else:
            print(f"== {i + 1}/{len(STEPS)} {name}: {what}", flush=True)
            try:
                step["status"], step["numbers"] = fn(a, out, deadline - reserved)
            except Exception as e:  # one step's failure must not cost the later steps their turn
                step["status"], step["numbers"] = f"failed: {type(e).__name__}: {e}", {}
            log = os.path.join(out, f"{name}.log")
            step["tail"] = tail(log) if os.path.exists(log) else ""
        step["seconds"] = round(time.time() - t0, 1)
        print(f"   {name}: {step['status']} ({step['seconds']} s)", flush=True)
        results["steps"].append(step)
        write(out, results)
    if dry:
        problems = check_flags()
        results["flags"] = problems or "every trainer command parses"
        path, t0 = os.path.join(out, "memory_rehearsal.json"), time.time()
        memory("up_front", path, rehearsal=True)  # on the CPU, a tiny model: its code, not its numbers
        results["memory_rehearsal"] = json.load(open(path))
        print(f"   flags: {results['flags']}; step 4 rehearsed on the CPU ({time.time() - t0:.1f} s)", flush=True)
        if problems:
            write(out, results)
            raise SystemExit(1)
    results["seconds"] = round(time.time() - t_start, 1)
    write(out, results)
    print(f"gpu check: {results['seconds']} s; results in {os.path.join(out, 'results.json')}")
    if not dry and any(not s["status"].startswith(("ok", "skipped")) for s in results["steps"]):
        raise SystemExit(1)


def write(out: str, results: dict):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
