"""How a grpo.py step's cost grows with response length, group size and model size, torch sampler and vLLM's CPU
build side by side (docs/performance.md):

    python bench/scaling.py [--samplers torch,vllm] [--axes length,group,model] [--lengths 64,256,1024,2048]
                            [--groups 2,8,32] [--models S,M,L] [--json bench/scaling.json] [--figure bench/scaling.png]
    python bench/scaling.py --replot bench/scaling.json --figure bench/scaling.png   # redraw the figure only

Each point is one `python grpo.py` process (3 steps of 4 prompts, one optimizer step each, the built-in prompts)
on a randomly initialised Qwen2 built from a config with the built-in tokenizer (nothing downloaded); its
LM-head rows of the stop tokens are zero and the others scaled so that a stop token is drawn with probability
about 1e-4 a token: responses run to the budget, so the length axis is the length (the measured mean is
reported). Step time is the median over steps 2-3 of `time_rollout + time_train` (step 1 compiles); peak
memory is the largest resident set of the process or of any process it waited for (its grading workers, vLLM's
engine), from wait4. The axes vary one quantity around the centre point (length 256, group 8, model M):

  length  max_response_len 64, 256, 1024, 2048
  group   group_size 2, 8, 32
  model   S (hidden 128, 2 layers, 0.6M), M (hidden 256, 4 layers, 4.3M), L (hidden 512, 6 layers, 25.5M parameters)

Per axis and sampler the table gives step time and peak memory, and the exponent b of step time ~ x^b fitted by
least squares on log-log axes (x: the length, the group size, or the parameter count); `scaling.png` (with
matplotlib) draws them.
"""
import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"S": (128, 2), "M": (256, 4), "L": (512, 6)}
CENTRE = {"length": 256, "group": 8, "model": "M"}
AXES = {"length": [64, 256, 1024, 2048], "group": [2, 8, 32], "model": ["S", "M", "L"]}


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """b of y = a x^b by least squares on (log x, log y)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def build_model(size: str, out: str, seed: int = 0) -> int:
    """A random Qwen2 of `size` with the built-in tokenizer, stop tokens all but never drawn; its parameter count."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    import builtin_task
    import common

    base = builtin_task.build_base_model(os.path.expanduser("~/.cache/sft_rl_fusion"))
    tok = AutoTokenizer.from_pretrained(base)
    hidden, layers = MODELS[size]
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    lm = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # logits of std ~3.5: a zero logit (the stop tokens) is drawn ~1e-4 of the time
        lm.lm_head.weight.normal_(0.0, 3.5 / hidden ** 0.5)
        for i in common.stop_token_ids(tok, lm.generation_config) + [tok.pad_token_id]:
            lm.lm_head.weight[i] = 0.0
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in lm.parameters())


def run_point(model_dir: str, length: int, group: int, sampler: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", model_dir, "--max_steps", "3",
               "--eval_data", "none", "--save_every", "0", "--output_dir", os.path.join(tmp, "run"),
               "--prompts_per_step", "4", "--prompts_per_minibatch", "4", "--group_size", str(group),
               "--max_response_len", str(length), "--sampler", sampler]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        with open(os.path.join(tmp, "log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            with open(os.path.join(tmp, "log")) as f:
                raise SystemExit(f"failed: {' '.join(cmd)}\n{f.read()[-3000:]}")
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f if '"loss"' in line]
    later = sorted(s["time_rollout"] + s["time_train"] for s in steps[1:])
    return {"step_s": later[len(later) // 2] if len(later) % 2 else sum(later) / 2,
            "rollout_s": sorted(s["time_rollout"] for s in steps[1:])[0], "response_length":
            sum(s["response_length"] for s in steps) / len(steps), "peak_gib": usage.ru_maxrss / 2 ** 20}


def figure(results: dict, path: str):
    """Step time against each measured axis on log-log axes, one panel per axis, one line per sampler."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes_names = list(dict.fromkeys(key.split("/")[0] for key in results))
    fig, axs = plt.subplots(1, len(axes_names), figsize=(4 * len(axes_names), 3.4), squeeze=False)
    for ax, axis in zip(axs[0], axes_names):
        for key, r in results.items():
            if key.split("/")[0] != axis:
                continue
            xs = [pt["params"] if axis == "model" else pt[axis] for pt in r["points"]]
            ax.loglog(xs, [pt["step_s"] for pt in r["points"]], "o-", label=f"{key.split('/')[1]} (b = {r['exponent']:.2f})")
        if axis != "model":  # the measured values as plain ticks
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel({"length": "max response tokens", "group": "group size", "model": "parameters"}[axis])
        ax.set_ylabel("seconds per step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", default="torch,vllm")
    p.add_argument("--axes", default="length,group,model")
    p.add_argument("--lengths", default=",".join(map(str, AXES["length"])), help="max_response_len values of the length axis")
    p.add_argument("--groups", default=",".join(map(str, AXES["group"])), help="group sizes of the group axis")
    p.add_argument("--models", default=",".join(AXES["model"]), help="model sizes of the model axis (S, M, L)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None, help="write the log-log figure here (needs matplotlib)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw --figure from a run's JSON")
    a = p.parse_args(argv)
    if a.replot:
        with open(a.replot) as f:
            return figure(json.load(f)["results"], a.figure)
    info = {"command": "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor(),
            "cores": os.cpu_count(), "threads": a.threads, "load_start": os.getloadavg()}
    print(f"{info['command']}\n{info['date']}, {info['cores']} cores, OMP_NUM_THREADS={a.threads}")
    values = {"length": [int(x) for x in a.lengths.split(",")], "group": [int(x) for x in a.groups.split(",")],
              "model": a.models.split(",")}
    work = tempfile.mkdtemp()
    params, results = {}, {}
    try:
        for axis in a.axes.split(","):
            for sampler in a.samplers.split(","):
                points = []
                for value in values[axis]:
                    point = {**CENTRE, axis: value}
                    model_dir = os.path.join(work, point["model"])
                    if point["model"] not in params:
                        params[point["model"]] = build_model(point["model"], model_dir)
                    r = run_point(model_dir, point["length"], point["group"], sampler, a.threads)
                    r.update(point, params=params[point["model"]])
                    points.append(r)
                    print(f"  {axis:6s} {sampler:5s} {str(value):>5s}: {r['step_s']:7.2f} s/step, peak "
                          f"{r['peak_gib']:.2f} GiB, mean response {r['response_length']:.0f} tokens", flush=True)
                xs = [pt["params"] if axis == "model" else pt[axis] for pt in points]
                results[f"{axis}/{sampler}"] = {"points": points,
                                                "exponent": fit_exponent(xs, [pt["step_s"] for pt in points])}
                print(f"  {axis} / {sampler}: step time ~ x^{results[f'{axis}/{sampler}']['exponent']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_end"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "params": params, "results": results}, f, indent=1)
    if a.figure:
        figure(results, a.figure)
    return results


if __name__ == "__main__":
    main()
