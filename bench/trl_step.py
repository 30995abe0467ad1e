"""grpo.py against TRL's GRPOTrainer on CPU, step for step (docs/performance.md):

    python -m venv .venv-trl                                       # TRL is a benchmark-only dependency:
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-trl/lib/python3.11/site-packages/project.pth
    .venv-trl/bin/pip install trl==1.16.0                          # it reuses this project's torch and transformers
    python bench/trl_step.py --trl_python .venv-trl/bin/python [--repeats 5] [--steps 6] [--json bench/trl_step.json]

One "step" is what a grpo.py step is: a rollout of 16 prompts x 8 responses from the built-in base model (at most
48 new tokens, temperature 1, top_p 1), the built-in verifier's rewards, group-normalised advantages (Eq. 9), old
log-probs, and two AdamW steps of 8 prompts each (lr 2e-4, betas (0.9, 0.999), weight decay 0.01, clip-norm 1,
constant schedule), token-mean clipped loss with epsilon 0.2 and no KL term. TRL is set to the same: GRPOConfig
num_generations 8, steps_per_generation 2 (a generation batch of 128) (so TRL computes old log-probs too),
per_device_train_batch_size 64, loss_type "dapo" (token mean over the optimizer step), scale_rewards "group", beta 0,
HF generate (no vLLM), float32, and the same reward function (common.Verifier, 2 grading processes). Each side runs
in its own process with the same prompts' distribution (the built-in training rows, each side's seeded order).

Each repeat starts one process per side, the sides alternating; inside a process the first step (compilation,
first generate) is dropped and the median of the rest is its step time. The table gives each side's median
(min-max) over repeats of seconds per step, steps/s, generated tokens/s, and seconds per phase: rollout
(generation), reward, old log-probs, update (the rest of the step: training forward, backward, optimizer);
then the ratio of steps/s from the two medians, and within each repeat (TRL's step time over ours: the two
processes ran back to back, so slow drifts of the machine cancel). It ends with grpo.py's update in FLOP/s
(bench/mfu.py's count on the padded batches it trains on) against the float32 matmul rate of bench/mfu.py's
[4096, H] x [H, 4H] product, measured in the same process: how far the update is from its floor.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS, G, MINIBATCHES, MAX_NEW, LR = 16, 8, 2, 48, 2e-4


class PhaseClock:
    """Seconds spent in wrapped callables, per phase, between two `lap()` calls (one training step)."""

    def __init__(self):
        self.current, self.laps, self.t_last = {}, [], None

    def wrap(self, owner, name, phase, when=None):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            if when is not None and not when():
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - t0
        setattr(owner, name, timed)

    def lap(self, **extra):
        now = time.perf_counter()
        if self.t_last is not None:
            self.laps.append({"step_s": now - self.t_last, **self.current, **extra})
        self.current, self.t_last = {}, now


def step_summary(laps: list[dict]) -> dict:
    """Median over a process's steps (the first one dropped) of step time, phases and generated tokens."""
    laps = laps[1:]
    keys = ["step_s", "rollout", "reward", "old_logprobs", "generated_tokens", "update_flops"]
    out = {k: statistics.median([lap.get(k, 0.0) for lap in laps]) for k in keys}
    out["update"] = statistics.median([lap["step_s"] - lap.get("rollout", 0) - lap.get("reward", 0)
                                       - lap.get("old_logprobs", 0) for lap in laps])
    out["steps"] = len(laps)
    return out


def count_update_flops(policy_class, clock: PhaseClock):
    """Add each training forward's FLOPs (bench/mfu.py's count: 3 forward-equivalents of 2 x matmul parameters a
    token plus attention over half the sequence, on the padded [B, T] batch) to the step's "update_flops"."""
    import mfu  # bench/, this script's directory
    import torch

    forward = policy_class.forward

    def counted(self, input_ids, *args, **kwargs):
        if torch.is_grad_enabled():
            B, T = input_ids.shape
            flops = B * T * mfu.gpu_paper.train_flops_per_token(mfu.shape(self.lm), context=T / 2, passes=3)
            clock.current["update_flops"] = clock.current.get("update_flops", 0.0) + flops
        return forward(self, input_ids, *args, **kwargs)
    policy_class.forward = counted


def worker_ours(steps: int, out_dir: str) -> list[dict]:
    sys.path.insert(0, ROOT)
    import common
    import grpo

    clock = PhaseClock()
    count_update_flops(common.PolicyModel, clock)
    clock.wrap(common.TorchSampler, "generate", "rollout")
    clock.wrap(common.Verifier, "__call__", "reward")
    clock.wrap(common, "old_logprobs", "old_logprobs")
    end_step = common.Run.end_step

    def lap_then_end(self, step, metrics):
        clock.lap(generated_tokens=metrics.get("generated_tokens", 0.0))
        return end_step(self, step, metrics)
    common.Run.end_step = lap_then_end
    sys.argv = ["grpo.py", "--max_steps", str(steps), "--eval_data", "none", "--save_every", "0", "--output_dir",
                out_dir, "--prompts_per_step", str(PROMPTS), "--prompts_per_minibatch", str(PROMPTS // MINIBATCHES),
                "--group_size", str(G), "--lr", str(LR), "--sampler", "torch"]
    run_setup = common.setup

    def setup_then_start_clock(*a, **k):
        run = run_setup(*a, **k)
        clock.t_last = time.perf_counter()
        return run
    common.setup = setup_then_start_clock
    grpo.main()
    return clock.laps


def worker_trl(steps: int, out_dir: str) -> list[dict]:
    sys.path.insert(0, ROOT)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import builtin_task
    import common

    path = builtin_task.build_base_model(os.path.expanduser("~/.cache/sft_rl_fusion"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [{"prompt": common.format_prompt(tokenizer, r["prompt"], None), "answer": r["answer"]}
            for r in builtin_task.rows("train")]  # grpo.py's built-in prompts: chat template, no system prompt
    verifier = common.Verifier(num_workers=2, timeout_s=2.0, require_think=True)
    verifier.start()

    def reward(prompts, completions, answer, **_):
        return verifier(completions, answer)

    args = GRPOConfig(output_dir=out_dir, max_steps=MINIBATCHES * steps, per_device_train_batch_size=PROMPTS // MINIBATCHES * G,
                      gradient_accumulation_steps=1, num_generations=G,
                      steps_per_generation=MINIBATCHES, max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0,
                      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
                      adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, beta=0.0, epsilon=0.2,
                      loss_type="dapo", scale_rewards="group", num_iterations=1, use_vllm=False, use_cpu=True,
                      bf16=False, fp16=False, seed=0, logging_steps=1, save_strategy="no", report_to="none",
                      disable_tqdm=True, log_completions=False, mask_truncated_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    clock = PhaseClock()
    clock.wrap(trainer, "_generate", "rollout")
    clock.wrap(trainer, "_calculate_rewards", "reward")
    clock.wrap(trainer, "_get_per_token_logps_and_entropies", "old_logprobs", when=lambda: not torch.is_grad_enabled())
    generated = {"tokens": 0}
    generate = trainer._generate

    def count_tokens(prompts):
        out = generate(prompts)
        generated["tokens"] += sum(len(c) for c in out[1])  # (prompt_ids, completion_ids, ...)
        return out
    trainer._generate = count_tokens

    class Lap(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.t_last = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            if state.global_step % MINIBATCHES == 0:  # a rollout and its two optimizer steps: one grpo.py step
                clock.lap(generated_tokens=generated["tokens"])
                generated["tokens"] = 0
    trainer.add_callback(Lap())
    trainer.train()
    verifier.close()
    return clock.laps


def run_side(side: str, python: str, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "laps.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        proc = subprocess.run([python, os.path.abspath(__file__), "--worker", side, "--steps", str(steps),
                               "--result", result, "--out_dir", os.path.join(tmp, "run")], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(result) as f:
            return step_summary(json.load(f))


def paired_ratios(runs: dict) -> list[float]:
    """TRL's step time over ours within each repeat: the two processes of a repeat ran back to back, so slow
    drifts of the machine cancel in their ratio (the medians of each side do not pair them)."""
    return [trl["step_s"] / ours["step_s"] for ours, trl in zip(runs["ours"], runs["trl"])]


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl_python", default=sys.executable, help="the Python of an environment with trl installed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="steps per process (the first is dropped)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of each side")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--out_dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        laps = (worker_ours if a.worker == "ours" else worker_trl)(a.steps, a.out_dir)
        with open(a.result, "w") as f:
            json.dump(laps, f)
        return
    version = subprocess.run([a.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if version.returncode != 0:
        raise SystemExit(f"no trl in {a.trl_python}: see this file's docstring for the benchmark-only install")
    info = {"command": "python bench/trl_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor(),
            "cores": os.cpu_count(), "threads": a.threads, "trl": version.stdout.strip(), "load_start": os.getloadavg()}
    runs = {"ours": [], "trl": []}
    for r in range(a.repeats):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            res = run_side(side, sys.executable if side == "ours" else a.trl_python, a.steps, a.threads)
            runs[side].append(res)
            print(f"repeat {r + 1}/{a.repeats} {side:4s}: {res['step_s']:.2f} s/step, "
                  f"{res['generated_tokens'] / res['step_s']:.0f} generated tokens/s", flush=True)
    table = {}
    for side, rs in runs.items():
        table[side] = {k: spread([x[k] for x in rs]) for k in ("step_s", "rollout", "reward", "old_logprobs", "update")}
        table[side]["steps_per_s"] = spread([1 / x["step_s"] for x in rs])
        table[side]["generated_tokens_per_s"] = spread([x["generated_tokens"] / x["step_s"] for x in rs])
    ratio = table["ours"]["steps_per_s"]["median"] / table["trl"]["steps_per_s"]["median"]
    sys.path.insert(0, ROOT)
    import builtin_task
    import mfu
    from transformers import AutoConfig

    base = builtin_task.build_base_model(os.path.expanduser("~/.cache/sft_rl_fusion"))
    hidden = AutoConfig.from_pretrained(base).hidden_size
    rate = statistics.median(mfu.matmul_flops(hidden) for _ in range(3))  # [4096, H] x [H, 4H]
    update = {"flops": statistics.median(x["update_flops"] for x in runs["ours"]), "matmul_flops": rate,
              "flops_per_s": statistics.median(x["update_flops"] / x["update"] for x in runs["ours"])}
    update["at_matmul_rate_s"] = update["flops"] / rate
    info["load_end"] = os.getloadavg()
    print(f"\n{info['command']}\n{info['date']}, {info['cores']} cores, OMP_NUM_THREADS={a.threads}, trl {info['trl']}; "
          f"median (min-max) over {a.repeats} processes per side of each process's median step")
    print(f"{'':6s} {'s/step':>18s} {'steps/s':>18s} {'gen tok/s':>18s} {'rollout s':>10s} {'reward s':>9s} "
          f"{'old logp s':>10s} {'update s':>9s}")
    for side, t in table.items():
        s, sp, tk = t["step_s"], t["steps_per_s"], t["generated_tokens_per_s"]
        print(f"{side:6s} {s['median']:6.2f} ({s['min']:.2f}-{s['max']:.2f}) {sp['median']:6.3f} ({sp['min']:.3f}-"
              f"{sp['max']:.3f}) {tk['median']:7.0f} ({tk['min']:.0f}-{tk['max']:.0f}) {t['rollout']['median']:10.2f} "
              f"{t['reward']['median']:9.2f} {t['old_logprobs']['median']:10.2f} {t['update']['median']:9.2f}")
    paired = spread(paired_ratios(runs))
    print(f"grpo.py / TRL steps per second: {ratio:.2f}x; within a repeat {paired['median']:.2f}x "
          f"({paired['min']:.2f}-{paired['max']:.2f})")
    print(f"grpo.py's update: {update['flops'] / 1e9:.1f} GFLOP at {update['flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"{update['flops_per_s'] / rate:.2f} of the float32 matmul rate measured here for a [4096, {hidden}] x "
          f"[{hidden}, {4 * hidden}] product ({rate / 1e9:.0f} GFLOP/s), at which it would take "
          f"{update['at_matmul_rate_s']:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "table": table, "ratio_steps_per_s": ratio, "paired_ratio": paired,
                       "update_ours": update, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
