"""Rewrite the generated blocks of README.md and docs/*.md from the files that hold their numbers.

    python scripts/build_docs.py           # rewrite every block in place
    python scripts/build_docs.py --check   # change nothing; exit 1 naming each block that differs

A block is the text between `<!-- generated: NAME -->` and `<!-- end generated -->`; BLOCKS[NAME] writes it,
from `wc -l` and `diff grpo.py <file>` of the trainers and forks, lab_results/results.json or a bench/*.json.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lab_report  # noqa: E402 (imports only the standard library and lab_regimes at its top)
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
TRAINERS = [  # file, method (with its METHODS.md equations), paper
    ("sft.py", "supervised fine-tuning on demonstrations, Eq. (13); DFT with `--token_loss dft`, Eq. (59)",
     "the baseline of every paper; DFT arXiv 2508.05629"),
    ("grpo.py", "GRPO / Dr.GRPO, Eq. (4), (9)-(12), (15): the template of the others", "arXiv 2402.03300, 2503.20783"),
    ("luffy.py", "LUFFY: the demonstration joins the group, shaped off-policy term, Eq. (16)-(20)", "arXiv 2504.14945"),
    ("relift.py", "ReLIFT: fine-tuning steps on the hardest questions between RL steps, Eq. (21)-(24)",
     "arXiv 2506.07527"),
    ("srft.py", "SRFT: entropy-weighted SFT + off- and on-policy RL in one loss, Eq. (25)-(31)", "arXiv 2506.19767"),
    ("uft.py", "UFT: annealed hints with a log-likelihood term, Eq. (32)-(38)", "arXiv 2505.16984"),
    ("bread.py", "BREAD: branched rollouts from expert anchors found by binary search, Eq. (39)-(41)",
     "arXiv 2506.17211"),
    ("prefix_rft.py", "Prefix-RFT: one hybrid rollout per group, entropy-gated prefix, Eq. (42)-(48)",
     "arXiv 2507.01679")]
FORKS = [  # file, idea, the flags that set it, paper
    ("forks/nsr.py", "NSR / PSR / W-REINFORCE: the reward's sign as the advantage, one half kept or down-weighted, "
     "Eq. (49)-(50)", "`--objective nsr \\| psr \\| w_reinforce`, `--positive_weight 0.1`", "arXiv 2506.01347"),
    ("forks/forking_tokens.py", "policy gradient on each step's 20% highest-entropy response tokens only, "
     "Eq. (51)-(52)", "`--top_entropy_frac 0.2`; `--variant official`: `--gate_norm selected --unit microbatch "
     "--dual_clip 10`", "arXiv 2506.01939"),
    ("forks/chord.py", "GRPO + an SFT term on the demonstrations, (1 - mu) / mu with mu decaying, token weight "
     "p(1-p), Eq. (53)-(55)", "`--mu_peak --mu_valley --mu_warmup_steps --mu_decay_steps --phi`; "
     "`--variant official`: `--dual_clip 3`", "arXiv 2508.11408"),
    ("forks/hpt.py", "per question: SFT on the demonstration when the rollouts' accuracy is <= gamma, GRPO "
     "otherwise, Eq. (56)-(57)", "`--sft_gate 0 --sft_coef 1`", "arXiv 2509.04419")]
HEADLINE = ["sft", "dft", "grpo", "luffy", "srft", "relift", "uft", "prefix_rft", "bread", "sft_then_grpo", "grpo_then_sft",
            "sft_then_grpo_vmin"]
GROUPS = {"all": "all levels", "reachable": "reachable (levels 1-2)", "out_of_reach": "levels 3-4"}
# levels 3-4 by the base's prior on their fact (docs/task.md)
STRATA = {"moderate": "moderate fact", "weak": "weak fact", "needle": "needle fact", "generalisation": "unseen fact"}


def load(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return json.load(f)


def wc(path):
    """`wc -l`: the file's newlines."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read().count("\n")


def diff_lines(path):
    """`diff grpo.py <path> | grep -c '^[<>]'`: the lines a reader of the diff reads."""
    out = subprocess.run(["diff", "grpo.py", path], cwd=ROOT, capture_output=True, text=True).stdout
    return sum(line.startswith(("<", ">")) for line in out.splitlines())


def table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows]


def fmt(s, digits=3):
    """Stats over seeds -> "mean (min-max)", or the mean alone when every seed agrees at these digits."""
    lo, mean, hi = (f"{s[k]:.{digits}f}" for k in ("min", "mean", "max"))
    return mean if lo == hi else f"{mean} ({lo}-{hi})"


def tokens(x):
    return "0" if x == 0 else f"{x / 1e3:.0f}k" if x >= 1e5 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def spread(s, digits=2, unit=""):
    """A bench cell: median (min-max)."""
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def source(info):
    """Where a bench JSON's numbers come from."""
    threads = f"{info['threads']} thread{'s' * (info['threads'] != 1)}"
    return f"`{info['command']}` ({info['date'][:10]}, {info['cores']} cores, {threads})"


def spent(lab):
    """What the lab's runs cost: the invocation's wall time, or, when it reused runs of earlier invocations, the
    trainer processes' own time summed over all runs."""
    if not lab.get("reused"):
        return f"{lab['runs']} jobs in {lab['wall_min']:.0f} min"
    return (f"{lab['runs']} jobs, {lab['reused']} of them finished by an earlier invocation: the runs took "
            f"{lab['runs_wall_min']:.0f} min of trainer processes, {lab['jobs']} at a time")


def lab(res, heads, cells, groups=GROUPS):
    """The lab's table: the base, then each method in `res` (cells(method) -> its cells after the accuracies)."""
    lab = res["lab"]
    cell = lambda acc, g: fmt(acc[g]) if g in acc else "-"  # noqa: E731 (a lab before task version 4: no strata)
    rows = [("base model (step 0)", *(cell(res["base"], g) for g in groups), *["-"] * len(heads))]
    rows += [(m["label"], *(cell(m["summary"]["final"], g) for g in groups), *cells(m)) for m in res["methods"].values()]
    return [f"From `lab_results/results.json`: `{lab['command']}` on {lab['date'][:10]}, {lab['machine']['cpu']} with "
            f"{lab['machine']['cores']} cores, {spent(lab)}. Held-out pass@1 at "
            f"step {lab['budget']['steps']}, mean (min-max) over seeds {', '.join(map(str, lab['budget']['seeds']))}.",
            ""] + table(["method", *groups.values(), *heads], rows)


# ---- the blocks -------------------------------------------------------------------------------------------------

def methods():
    """README: every trainer and fork, its length and its distance from grpo.py."""
    special = {"sft.py": "", "grpo.py": "(the template)"}  # sft.py's diff from grpo.py measures nothing
    rows = [(f"`{f}`", m, p, wc(f), special[f] if f in special else diff_lines(f)) for f, m, p in TRAINERS]
    rows += [(f"`{f}`", m, p, wc(f), diff_lines(f)) for f, m, _, p in FORKS]
    return table(["file", "method", "paper", "lines", "`diff grpo.py` lines"], rows)


def forks():
    """docs/forks.md: each fork, the flags of its idea, its length and its diff from grpo.py."""
    return table(["file", "idea", "flags", "paper", "lines", "`diff grpo.py` lines"],
                 [(f"`{f}`", idea, flags, p, wc(f), diff_lines(f)) for f, idea, flags, p in FORKS])


def lab_headline():
    """README: the claims' score (right answers with right worked steps, the last three evaluations) by group of
    problems, the trainers and the two-stage baselines, and the regime figure."""
    res = load("lab_results/results.json")
    lab = res["lab"]
    return [f"From `lab_results/results.json`: `{lab['command']}` on {lab['date'][:10]}, {lab['machine']['cpu']} with "
            f"{lab['machine']['cores']} cores, {spent(lab)}. The share of samples right with right worked steps, "
            f"averaged over the evaluations at steps {', '.join(lab_steps(res))}, mean (min-max) over seeds "
            f"{', '.join(map(str, lab['budget']['seeds']))}.", ""] + lab_report.score_table(res, HEADLINE) + [
        "", "![final accuracy per stratum against the base's probability of its demonstrations, one line per method]"
            "(lab_results/regimes.png)"]


def group_source(path):
    lab = load(path)["lab"]
    return (f"From `{path}`: `{lab['command']}` on {lab['date'][:10]}, {lab['machine']['cpu']} with "
            f"{lab['machine']['cores']} cores, seeds {', '.join(map(str, lab['budget']['seeds']))}.")


def lab_lr():
    """docs/lab.md: the lr group's table (each family's grid by its validation-split score)."""
    return [group_source("lab_results/lr/results.json"), ""] + lab_report.lr_table(load("lab_results/lr/results.json"))


def lab_sweeps():
    """docs/lab.md: the sweeps group's score table (each method's own knob), by stratum."""
    res = load("lab_results/sweeps/results.json")
    knobs = lab_report.FAMILIES["knobs"]  # each method beside its own knob's settings
    order = [m for base in ("luffy", "uft", "prefix_rft") for m in (base, *(k for k in knobs if k.startswith(base)))]
    return [group_source("lab_results/sweeps/results.json") + " The claims' score (right answers with right worked "
            "steps, the last three evaluations), mean (min-max) over seeds:", ""] + lab_report.score_table(res, order)


def schedule_check():
    """docs/lab.md: per method and condition, how many runs end within their seed band of their best evaluation,
    and how far below their best they end (scripts/schedule_check.py; every seed's values in its json)."""
    data = load("lab_results/schedule_check.json")
    methods = [m for m in HEADLINE + list(lab_report.FAMILIES["forks"])
               if any(m in runs for runs in data.values())]
    rows = []
    for m in methods:
        cells = []
        for runs in data.values():
            got = runs.get(m)
            drops = [r["best"] - r["final"] for r in got or []]
            cells.append("-" if not got else f"{sum(r['within_band'] for r in got)} of {len(got)}; "
                         f"{sum(drops) / len(drops):.3f} ({max(drops):.3f})")
        rows.append((lab_report.LABELS.get(m, m), *cells))
    return table(["method", *data], rows)


def lab_steps(res):
    """The evaluation steps a run's score averages: the last three of the budget's schedule."""
    b = res["lab"]["budget"]
    return [str(s) for s in range(0, b["steps"] + 1, b["eval_every"])][-3:]


def lab_verdict_changes():
    """docs/lab.md: each claim's verdict under the old rules (seed ranges, the lab of 3 seeds), under paired
    statistics at the constant lr (the lab of 5 seeds before the schedule changed) and in this lab."""
    def short(verdict):  # a mixed verdict as its counts (the full list is in the claims table)
        if not verdict.startswith("mixed: "):
            return verdict
        kinds = [part.split(" for ")[0] for part in verdict.removeprefix("mixed: ").split("; ")]
        return "mixed: " + ", ".join(f"{kinds.count(k)} {k}" for k in ("agrees", "cannot tell", "disagrees")
                                     if k in kinds)

    old = {v["claim"]: v["verdict"] for v in load("lab_results/verdicts_old_rules.json")["verdicts"]}
    constant = {v["claim"]: v["verdict"] for v in load("lab_results/verdicts_constant_lr.json")["verdicts"]}
    new = load("lab_results/results.json")["verdicts"]
    return table(["#", "old rules (3 seeds, seed ranges, constant lr)", "paired statistics, constant lr",
                  "paired statistics, cosine lr (this lab)"],
                 [(v["claim"], short(old.get(v["claim"], "(new claim)")), short(constant.get(v["claim"], "(new claim)")),
                   short(v["verdict"])) for v in new])


def lab_table():
    """docs/lab.md: every method of the lab, with what it spent."""
    res = load("lab_results/results.json")
    window = max(1, res["lab"]["budget"]["steps"] // 10)
    def cells(m):
        s = {k: v["mean"] for k, v in m["summary"].items() if isinstance(v, dict) and "mean" in v}
        on_demos = " (on demos)" if m["trainers"][-1] == "sft" else ""  # SFT's entropy is on what it trains on
        return (f"{s['wrong_steps_final']:.3f}", f"{s['entropy_final']:.3f}{on_demos}", tokens(s["generated_tokens"]),
                tokens(s["demo_tokens"]))
    return lab(res, ["wrong steps", f"entropy (last {window} steps)", "generated tokens", "demo tokens"],
               cells)


def lab_passk():
    """docs/lab.md: the final pass@k on the reachable problems of the base and of the methods evaluated for it."""
    res = load("lab_results/results.json")
    rows = [("base model", res["base_passk"])] + [
        (m["label"], m["summary"]["passk"]) for m in res["methods"].values() if "passk" in m["summary"]]
    ks = [k for k in res["base_passk"]["reachable"] if k in ("1", "2", "4", "8", "16", "32", "64")]
    return table(["method", *(f"pass@{k}" for k in ks)], [
        (label, *(fmt(p["reachable"][k]) for k in ks)) for label, p in rows])


def lab_claims():
    """docs/lab.md: the papers' claims with the verdicts lab.py computed."""
    return table(["#", "claim", "verdict", "measured"], [
        (v["claim"], v["text"], v["verdict"], v["measured"]) for v in load("lab_results/results.json")["verdicts"]])


def base():
    """docs/task.md: the base by level and by stratum of levels 3-4 (`scripts/yardstick.py --json docs/base.json`)."""
    b = load("docs/base.json")
    k = b["k_large"]
    rows = [(g.removeprefix("stratum_"), " / ".join(f"{x:.3f}" for x in v["pass@1"]), f"{v['sd']:.3f}",
             f"{v['pass@8']:.3f}", "-" if v.get(f"pass@{k}") is None else f"{v[f'pass@{k}']:.3f}", f"{v['min_p']:.2g}",
             "-" if v["key_logp"] is None else f"{v['key_logp']:.2f}", f"{v['wrong_steps']} of {v['rewarded']}")
            for g, v in b.items() if g.startswith(("level", "stratum_"))]
    built = (f"; built in {b['build_s']:.0f} s with {b['threads']} threads (the same weights as the cached base: "
             f"{'yes' if b['same_weights_as_cached'] else 'no'})") if "build_s" in b else ""
    return [f"Task version {b['task_version']}, {b['date']}, {b['cpu']} with {b['cores']} cores{built}:", ""] + table(
        ["level / stratum", "pass@1 (3 seeds)", "sd", "pass@8, T = 1", f"pass@{k}, T = 0.6", "least-likely token p",
         "key-token log-prob", "wrong steps"], rows)


def lab_strata():
    """docs/lab.md: levels 3-4 by stratum for every method, beside its token shift and probe distances."""
    return lab_report.regime_table(load("lab_results/results.json"), figures=False)  # the page places the figures


def stratum_steps():
    """docs/lab.md: levels 1-2 and each stratum, graded and with right worked steps, from the runs' own counts."""
    return lab_report.right_steps_table(load("lab_results/results.json"))


def fusion_runs():
    """docs/task.md: every seed of the eight trainers on the lab's budget (scripts/check_readme_rows.py reruns them)."""
    res = load("lab_results/results.json")
    strata = ("needle", "weak", "moderate", "generalisation")
    rows = [(f"`{m}.py`", r["seed"], *(f"{r['final'][k]:.3f}" for k in "1234"),
             *(f"{r['final'][k]:.3f}" if k in r["final"] else "-" for k in strata), f"{r['wrong_steps_final']:.3f}",
             tokens(r["generated_tokens"] or 0), tokens(r["demo_tokens"]), f"{r['wall_s']:.0f} s")
            for m in ("sft", "grpo", "luffy", "srft", "relift", "uft", "prefix_rft", "bread")
            for r in res["methods"][m]["runs"]]
    return table(["trainer", "seed", "level 1", "level 2", "level 3", "level 4", *strata, "wrong steps",
                  "generated tokens", "demo tokens", "wall"], rows)


def bench_logprob():
    """docs/performance.md: the LM head's forward + backward, naive against checkpointed against fused."""
    rows, infos = [], []
    for d in (load("bench/logprob_1k.json"), load("bench/logprob_2k.json")):
        infos.append(source(d["info"]))
        for c in d["cases"]:
            naive, r = c["sides"]["naive"], c["ratio_to_naive"]
            rows.append((c["tokens"], c["dtype"], "on" if c["entropy"] else "off",
                         f"{spread(naive['seconds'], 2, ' s')}, {naive['peak_gib']['median']:.2f} GiB",
                         *(f"{r[k]['time']:.2f}x, {r[k]['memory']:.2f}x" for k in ("checkpointed", "fused")),
                         f"{c['time_floor_4_of_3_matmuls']:.2f}x, {c['memory_floor_grad_w']:.2f}x",
                         f"{c['grad_rel_err_vs_naive']['fused']:.1e}"))
    return [" and ".join(infos) + ":", ""] + table(
        ["N", "dtype", "entropy", "naive: time, extra peak", "checkpointed: time, memory", "fused: time, memory",
         "floors: 4 matmuls, d/dW", "fused's largest relative difference from naive's gradients"], rows)


def bench_trl():
    """docs/performance.md: one grpo.py step against one step of TRL's GRPOTrainer."""
    d = load("bench/trl_step.json")
    rows = [(name, spread(t["step_s"]), spread(t["steps_per_s"]), f"{t['generated_tokens_per_s']['median']:,.0f}",
             *(f"{t[k]['median']:.{3 if k == 'reward' else 2}f}" for k in ("rollout", "reward", "old_logprobs",
                                                                            "update")))
            for name, t in (("`grpo.py`", d["table"]["ours"]), (f"TRL {d['info']['trl']}", d["table"]["trl"]))]
    u, p, ours = d["update_ours"], d["paired_ratio"], d["table"]["ours"]
    floor = ours["rollout"]["median"] + ours["old_logprobs"]["median"] + u["at_matmul_rate_s"]
    return [source(d["info"]) + ":", ""] + table(
        ["", "s/step", "steps/s", "generated tokens/s", "rollout s", "reward s", "old log-probs s", "update s"],
        rows) + [
        "", f"grpo.py runs **{d['ratio_steps_per_s']:.2f}x** TRL's steps per second by the medians, {p['median']:.2f}x "
            f"({p['min']:.2f}-{p['max']:.2f}) within a repeat. Its update computes {u['flops'] / 1e9:.1f} GFLOP at "
            f"{u['flops_per_s'] / 1e9:.0f} GFLOP/s, {u['flops_per_s'] / u['matmul_flops']:.2f} of the float32 matmul "
            f"rate of the same run ({u['matmul_flops'] / 1e9:.0f} GFLOP/s); at that rate it would take "
            f"{u['at_matmul_rate_s']:.2f} s, so a step (rollout + old log-probs + update) takes at least "
            f"{floor:.2f} s: "
            f"at most {d['table']['trl']['step_s']['median'] / floor:.2f}x TRL's steps per second."]


def bench_sampler():
    """docs/performance.md: the torch sampler's rollout drawn five ways."""
    d = load("bench/sampler.json")
    names = {"generate": "`generate` (what `common.TorchSampler` runs)", "generate, 1 thread": "`generate`, 1 thread",
             "static cache": "`generate`, `cache_implementation=\"static\"`",
             "hand loop": "the decode loop written out",
             "hand loop, compiled": f"the same under `torch.compile(dynamic=True)` ({d['compile_s']:.1f} s to compile, "
                                    "not counted)"}
    return [source(d["info"]) + ":", ""] + table(["", "s (min-max)", "time / `generate`", "same tokens"], [
        (names[k], f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})", f"{v['ratio_to_generate']:.2f}x",
         "yes" if v["same_draws_as_generate"] else "**no**") for k, v in d["table"].items()]) + [
        "", f"The decode's matmuls at the float32 matmul rate of the same run would take {d['matmul_floor_s']:.3f} s; "
            f"`generate` takes {d['table']['generate']['median'] / d['matmul_floor_s']:.1f}x that, and the written-out "
            f"loop saves {1 - d['table']['hand loop']['ratio_to_generate']:.0%} of it."]


def bench_mfu():
    """docs/performance.md: the training step and the sampler against the machine's limits."""
    d = load("bench/mfu.json")
    t, s, m = d["train"], d["sample"], d["model"]
    return [f"{source(d['info'])}: a {m['params'] / 1e6:.1f}M-parameter Qwen2 (hidden {m['hidden']}, {m['layers']} "
            f"layers), {d['batch']} sequences of {d['seq']} tokens, {d['new_tokens']} new tokens when sampling:", ""
            ] + table(["", "measured", "the machine's limit, same run", "fraction of the limit"], [
                ("training: forward + backward of `common.PolicyModel`",
                 f"{spread(t['seconds'], 2, ' s')}, {t['achieved_flops']['median'] / 1e9:.1f} GFLOP/s",
                 f"{t['matmul_flops']['median'] / 1e9:.1f} GFLOP/s (float32 matmul)", f"MFU {spread(t['mfu'])}"),
                ("sampling: `common.TorchSampler`", f"{s['tokens_per_s']['median']:,.0f} tokens/s",
                 f"{s['bound_tokens_per_s']['median']:,.0f} tokens/s (memory bandwidth "
                 f"{s['bandwidth_bytes_s']['median'] / 1e9:.1f} GB/s)", spread(s["fraction_of_bound"]))])


def bench_scaling():
    """docs/performance.md: a grpo.py step's cost against response length, group size and model size."""
    d = load("bench/scaling.json")
    res, rows, axes = d["results"], [], {"length": "max response tokens", "group": "group size", "model": "parameters"}
    for axis, name in axes.items():
        for i, (pt, pv) in enumerate(zip(res[f"{axis}/torch"]["points"], res[f"{axis}/vllm"]["points"])):
            value = f"{pt['model']}, {pt['params'] / 1e6:.1f}M" if axis == "model" else f"{pt[axis]:,}"
            rows.append(("" if i else name, value, *(f"{p['step_s']:.2f} ({p['rollout_s']:.2f}) | {p['peak_gib']:.2f}"
                                                     for p in (pt, pv))))
    fits = [(name, *(f"{res[f'{a}/{s}']['exponent']:.2f}" for a in axes))
            for s, name in (("torch", "torch sampler"), ("vllm", "vLLM, CPU build"))]

    def at(sampler, axis, value):  # step seconds at the point of one axis whose varied quantity is `value`
        return next(p["step_s"] for p in res[f"{axis}/{sampler}"]["points"] if p[axis] == value)
    centre = {s: sorted([at(s, "length", 256), at(s, "group", 8), at(s, "model", "M")]) for s in ("torch", "vllm")}
    ratio = {n: at("vllm", "length", n) / at("torch", "length", n) for n in (1024, 2048)}
    return [source(d["info"]) + ":", ""] + table(
        ["axis", "value", "torch: s/step (rollout s)", "torch: peak GiB", "vLLM (CPU build): s/step (rollout s)",
         "vLLM: peak GiB"], rows) + [
        "", "Fitted exponents b of step time ~ x^b (least squares on log-log axes; `bench/scaling.png`):", ""] + table(
        ["", "response length", "group size", "parameters"], fits) + [
        "", f"The centre point (256 tokens, G = 8, model M) is in every axis: {centre['torch'][0]:.2f}-"
            f"{centre['torch'][-1]:.2f} s with torch, {centre['vllm'][0]:.2f}-{centre['vllm'][-1]:.2f} s with vLLM, so "
            f"read differences under about 10% as noise. A vLLM step takes {ratio[1024]:.2f}x the torch sampler's "
            f"time at 1,024 tokens and {ratio[2048]:.2f}x at 2,048."]


def bench_microbatch():
    """docs/performance.md: fixed-size against token-budget micro-batches against packed rows, one training step."""
    d = load("bench/microbatch.json")
    i, m, load_avg = d["inputs"], d["model"], d["info"]["load_average"]
    names = {"fixed": f"fixed: `--micro_batching sequences --micro_batch_size {i['micro_batch_size']}`",
             "tokens": f"by tokens: `--micro_batching tokens` ({i['budget']:,}-token budget)",
             "packed": "packed rows, the same budget (sdpa, block-diagonal mask)"}
    rows = [(names[k], v["micro_batches"], f"{v['padding_share']:.1%} ({v['full_scale']['padding_share']:.1%})",
             spread(v["seconds"], 2, " s"), spread(v["time_ratio_to_fixed"], 2, "x"), f"{v['grad_rel_diff']:.0e}")
            for k, v in d["sides"].items()]
    t, f, pk = d["sides"]["tokens"], d["sides"]["fixed"], d["sides"]["packed"]
    return [f"{source(d['info'])}, load average {load_avg['before']:.2f} before and {load_avg['after']:.2f} after: "
            f"{i['samples']} samples, lengths / {i['scale']}; a {m['params'] / 1e6:.1f}M-parameter Qwen2 (hidden "
            f"{m['hidden']}, {m['layers']} layers), float32:", ""] + table(
        ["micro-batches", "count", "padding share (at full scale)", "training phase", "time / fixed (same repeat)",
         "gradient's largest difference from fixed (relative)"], rows) + [
        "", f"By tokens the step computes {t['positions'] / f['positions']:.2f}x the token positions of fixed-size "
            f"micro-batches and takes {t['time_ratio_to_fixed']['median']:.2f}x their time; packed rows compute no "
            f"padding and take {pk['time_ratio_to_fixed']['median']:.2f}x. Responses: median {i['response_median']:,} "
            f"tokens, sigma {i['response_sigma']}, cut at {i['response_cap']:,} ({i['capped_share']:.0%} of the draw "
            f"reach it; mean {i['response_mean']:,.0f}); prompts {i['prompt_range'][0]}-{i['prompt_range'][1]} tokens."]


def gpu_paper():
    """docs/gpu.md: one LUFFY step on 8 GPUs, worked out on paper by bench/gpu_paper.py."""
    h, a = load("bench/gpu_paper_h100.json"), load("bench/gpu_paper_a100.json")
    return [f"`python bench/gpu_paper.py --json {h['inputs']['json']}` and `python bench/gpu_paper.py --gpu a100 "
            f"--json {a['inputs']['json']}`:", ""] + table(
        ["quantity", f"8 x {h['gpu']['name']}", f"8 x {a['gpu']['name']}", "how (first column)"],
        [(rh["what"], rh["value"], ra["value"], rh["how"]) for rh, ra in zip(h["rows"], a["rows"])])


BLOCKS = {"methods": methods, "forks": forks, "lab-headline": lab_headline, "lab-table": lab_table,
          "lab-passk": lab_passk, "lab-claims": lab_claims, "fusion-runs": fusion_runs, "base": base,
          "lab-strata": lab_strata, "stratum-steps": stratum_steps, "lab-verdict-changes": lab_verdict_changes,
          "lab-lr": lab_lr, "lab-sweeps": lab_sweeps, "schedule-check": schedule_check,
          "bench-logprob": bench_logprob, "bench-trl": bench_trl, "bench-sampler": bench_sampler, "bench-mfu": bench_mfu,
          "bench-scaling": bench_scaling, "bench-microbatch": bench_microbatch, "gpu-paper": gpu_paper}


def build(text, path):
    """`text` with every generated block rewritten, and the names of the blocks that changed."""
    stale = []

    def block(m):
        if m.group(2) not in BLOCKS:
            sys.exit(f"{path}: unknown generated block '{m.group(2)}' (known: {', '.join(BLOCKS)})")
        new = "\n".join(BLOCKS[m.group(2)]()) + "\n"
        stale.extend([m.group(2)] * (new != m.group(3)))
        return m.group(1) + new + m.group(4)
    return BLOCK.sub(block, text), stale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is stale")
    a = p.parse_args(argv)
    stale_somewhere = False
    for path in ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            new, stale = build(f.read(), path)
        if stale and a.check:
            print(f"{path}: stale generated blocks: {', '.join(stale)} (python scripts/build_docs.py rewrites them)")
            stale_somewhere = True
        elif stale:
            with open(os.path.join(ROOT, path), "w", encoding="utf-8") as f:
                f.write(new)
            print(f"{path}: rewrote {', '.join(stale)}")
    sys.exit(1 if stale_somewhere else 0)


if __name__ == "__main__":
    main()
