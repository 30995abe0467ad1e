"""The lab's regime analyses (docs/lab.md, "Regimes"): where each method works along the base's prior on the
demonstration, and the SRFT paper's three analyses (arXiv 2506.19767: token shift, learning dynamics,
entropy after a stage switch) on the built-in task's probe. lab.py calls these on its collected results;
everything here reads numbers the trainers logged (metrics.jsonl, probe.jsonl) and the probe the base was
built with (builtin_task.probe), and trains nothing.

The predictions (PREDICTED) are written down before the lab runs: the weight each method's loss puts on a
demonstration token of probability p, relative to the negative log-likelihood's (METHODS.md), so that
regimes.png tests the reading of the equations against what the methods then did.
"""
import json
import math
import os
import re

STRATA = ["needle", "weak", "moderate", "generalisation"]  # builtin_task.STRATA's names, and the held-out facts
SHIFT = 0.1  # a probe token "moved" when its probability changed by more than this (absolute, at T = 1)

# d(loss)/d(log p) on one demonstration token of probability p, per unit of NLL's weight, for a demonstration
# that is right while the group's rollouts are wrong (A_demo = 7 / sqrt(8) = 2.47 with G = 8, Eq. 16 / 25).
# Each: (the formula as text, the function). Methods not listed put no loss on demonstration tokens (GRPO).
A_DEMO = 7 / math.sqrt(8)
PREDICTED = {
    "sft": ("1 (Eq. 13)", lambda p: 1.0),
    "luffy": ("A gamma p / (p + gamma)^2, gamma 0.1 (Eq. 17-18)", lambda p: A_DEMO * 0.1 * p / (p + 0.1) ** 2),
    "srft": ("0.5 exp(-H) + A p (Eq. 26-28; H ~ 0.3 taken)", lambda p: 0.5 * math.exp(-0.3) + A_DEMO * p),
    "relift": ("1 on questions whose rollouts all failed (Eq. 24)", lambda p: 1.0),
    "uft": ("beta = 0.001 on hint tokens (Eq. 36-38)", lambda p: 0.001),
    "prefix_rft": ("A if the token's entropy is in the prefix's top 20%, else 0 (Eq. 46-47)", None),
    "bread": ("0: anchors are context, never trained (Eq. 41)", lambda p: 0.0),
    "chord": ("mu p (1 - p), mu <= 0.1 (Eq. 55)", lambda p: 0.1 * p * (1 - p)),
    "hpt": ("1 when the group's rollouts are all wrong (Eq. 56)", lambda p: 1.0),
    "dft": ("p (DFT, arXiv 2508.05629)", lambda p: p),
}


DEMO_KEY = re.compile(r"demo_(min_p|key_logp|low_p_share)_.+?_((?:stratum_|level)\w+)")  # common.demo_probabilities


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def token_shift(run_dir: str, probe: dict, step: int | None = None) -> dict | None:
    """Share of the probe's tokens whose probability moved by more than SHIFT between the base and the run's
    probe measurement at `step` (default: its last), over the base's own responses, the demonstrations, and
    all; with the per-item probabilities for the figure. None when the run wrote no probe.jsonl."""
    lines = read_jsonl(os.path.join(run_dir, "probe.jsonl"))
    if not lines or not probe:
        return None
    line = lines[-1] if step is None else next((x for x in lines if x["step"] == step), None)
    if line is None:
        return None
    moved, total = {"base": 0, "demo": 0}, {"base": 0, "demo": 0}
    for item, logp in zip(probe["items"], line["logp"]):
        for b, a in zip(item["base_logp"], logp):
            moved[item["kind"]] += abs(math.exp(a) - math.exp(b)) > SHIFT
            total[item["kind"]] += 1
    out = {k: moved[k] / max(total[k], 1) for k in moved}
    out["all"] = sum(moved.values()) / max(sum(total.values()), 1)
    out["step"] = line["step"]
    return out


def probe_series(records: list[dict]) -> list[list]:
    """[[step, probe_kl_base, probe_demo_nll, probe_entropy], ...] from a run's metrics.jsonl records."""
    return [[r["step"], r["probe_kl_base"], r["probe_demo_nll"], r["probe_entropy"]]
            for r in records if r.get("probe_kl_base") is not None]


def demo_probs(records: list[dict]) -> dict:
    """{step: {group: {min_p, key_logp, low_p_share}}} from the demo_* metrics of the evaluations."""
    out = {}
    for r in records:
        for key, value in r.items():
            if (m := DEMO_KEY.fullmatch(key)) and value is not None:
                out.setdefault(str(r["step"]), {}).setdefault(m.group(2), {})[m.group(1)] = value
    return out


def base_prior(res: dict) -> dict:
    """{stratum: the base's median least-likely demonstration token probability on it}: the step-0 demo_min_p of
    the runs (every run starts from the base: a two-stage run's step 0 is its first stage's), mean over runs."""
    values = {}
    for m in res["methods"].values():
        for r in m["runs"]:
            step0 = (r.get("demo_probs") or {}).get("0", {}) if r["status"] == "ok" else {}
            for s in STRATA:
                if (step0.get(f"stratum_{s}") or {}).get("min_p") is not None:
                    values.setdefault(s, []).append(step0[f"stratum_{s}"]["min_p"])
    return {s: sum(v) / len(v) for s, v in values.items()}


def base_probe(res: dict) -> list | None:
    """The base's probe measurement (step 0: KL 0, the demonstrations' NLL, entropy) from any finished run."""
    return next((r["probe"][0] for m in res["methods"].values() for r in m["runs"]
                 if r["status"] == "ok" and r.get("probe") and r["probe"][0][0] == 0), None)


def regime_points(res: dict, labels: dict) -> dict:
    """{label: {stratum: (x, mean, lo, hi)}}: x = base_prior, y = final accuracy on the stratum over seeds."""
    x = base_prior(res)
    out = {}
    for name, m in res["methods"].items():
        final = m["summary"]["final"]
        pts = {s: (x[s], final[s]["mean"], final[s]["min"], final[s]["max"]) for s in STRATA
               if s in x and final.get(s)}
        if pts:
            out[labels.get(name, name)] = pts
    return out


def figures(res: dict, results: str, labels: dict, probe: dict | None, colors) -> list[str]:
    """regimes.png, dynamics.png and token_shift.png; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    points = regime_points(res, labels)
    if points:  # regimes.png: accuracy against the prior, and the predicted weight against p
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
        for label, pts in points.items():  # the trained facts as a line along the prior; the unseen fact apart
            xs, ms, lo, hi = zip(*sorted(v for s, v in pts.items() if s != "generalisation"))
            ax.plot(xs, ms, "o-", color=colors.get(label), label=label, lw=1.4, ms=3)
            ax.fill_between(xs, lo, hi, color=colors.get(label), alpha=0.12, lw=0)
            if "generalisation" in pts:
                x, m, lo, hi = pts["generalisation"]
                ax.plot([x], [m], "x", color=colors.get(label), ms=6)  # its seed range: the table's
        for s in STRATA:
            xs = [p[s][0] for p in points.values() if s in p]
            if xs:
                if s == "generalisation":
                    ax.annotate("x: the unseen fact", (xs[0] * 1.15, 0.3), fontsize=7, rotation=90, va="bottom")
                else:
                    ax.annotate(s, (xs[0], 1.0), fontsize=7, ha="center", va="bottom", rotation=30)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.08)
        ax.set_xlabel("the base's prior on the demonstration (median least-likely token probability, step 0)")
        ax.set_ylabel("held-out pass@1 on the stratum, final (x: the unseen fact)")
        ax.set_title("where each method works", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        ps = [10 ** (e / 20) for e in range(-100, 1)]
        for name, (text, f) in PREDICTED.items():
            if f is not None:
                bx.plot(ps, [f(p) for p in ps], label=f"{labels.get(name, name)}: {text}", lw=1.2,
                        color=colors.get(labels.get(name, name)))
        for s in STRATA:
            xs = [p[s][0] for p in points.values() if s in p]
            if xs:
                bx.axvline(xs[0], color="grey", lw=0.6, ls=":")
        bx.set_xscale("log")
        bx.set_yscale("log")
        bx.set_ylim(1e-6, 5)
        bx.set_xlabel("probability p of a demonstration token")
        bx.set_ylabel("predicted weight on the token, relative to NLL")
        bx.set_title("predicted before the run (docs/lab.md)", fontsize=10)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        paths.append(os.path.join(results, "regimes.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    paths += _dynamics(res, results, labels, colors, plt)
    if probe:
        paths += _token_shift_figure(res, results, labels, probe, plt)
    return paths


def _mean_path(runs: list[dict]) -> tuple[list, list, list, list]:
    """The seed-mean (step, kl, nll, entropy) over the steps every finished seed measured."""
    series = [{p[0]: p[1:] for p in r["probe"]} for r in runs if r["status"] == "ok" and r.get("probe")]
    if not series:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    mean = [[sum(s[t][i] for s in series) / len(series) for t in steps] for i in range(3)]
    return steps, *mean


def _dynamics(res, results, labels, colors, plt) -> list[str]:
    """dynamics.png: each method's path in (KL from the base, NLL of the demonstrations), and the probe's
    entropy against the step (a stage switch shows there)."""
    paths = {labels.get(n, n): _mean_path(m["runs"]) for n, m in res["methods"].items()}
    paths = {k: v for k, v in paths.items() if v[0]}
    if not paths:
        return []
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, (steps, kl, nll, ent) in paths.items():
        ax.plot(kl, nll, "-", color=colors.get(label), label=label, lw=1.3)
        ax.plot(kl[-1:], nll[-1:], "o", color=colors.get(label), ms=4)
        bx.plot(steps, ent, "-", color=colors.get(label), label=label, lw=1.2)
    ax.set_xlabel("KL(base || model) per token on the base's own responses (probe)")
    ax.set_ylabel("NLL per token of the held-out demonstrations (probe)")
    ax.set_title("learning dynamics: start at the base, dot at the end", fontsize=10)
    ax.grid(alpha=0.3)
    bx.set_xlabel("training step (two-stage runs: both stages)")
    bx.set_ylabel("mean token entropy on the probe (nats, T = 1)")
    bx.set_title("entropy on one fixed probe for every method", fontsize=10)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path = os.path.join(results, "dynamics.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _token_shift_figure(res, results, labels, probe, plt) -> list[str]:
    """token_shift.png: one probe demonstration of the moderate stratum, each token coloured by how far SFT's
    and GRPO's final models (first seed) moved its probability from the base's."""
    item_index = next((i for i, it in enumerate(probe["items"]) if it["kind"] == "demo" and it["group"] == "moderate"),
                      None)
    rows = []
    for name in ("sft", "grpo"):
        m = res["methods"].get(name)
        run = next((r for r in (m or {}).get("runs", []) if r["status"] == "ok"), None)
        if run is None or item_index is None:
            continue
        lines = read_jsonl(os.path.join(results, run["dir"], "probe.jsonl"))
        if lines:
            rows.append((labels.get(name, name), lines[-1]["logp"][item_index]))
    if not rows:
        return []
    item = probe["items"][item_index]
    tokens = [t for t in item.get("tokens") or [str(i) for i in item["response_ids"]]]
    fig, axes = plt.subplots(len(rows), 1, figsize=(13, 1.3 * len(rows) + 0.6))
    axes = axes if len(rows) > 1 else [axes]
    cmap = plt.get_cmap("coolwarm")
    for ax, (label, logp) in zip(axes, rows):
        for j, (tok, b, a) in enumerate(zip(tokens, item["base_logp"], logp)):
            d = math.exp(a) - math.exp(b)
            ax.text(j, 0, tok.replace("\n", "\\n"), ha="center", va="center", fontsize=8,
                    bbox=dict(boxstyle="square,pad=0.25", fc=cmap(0.5 + d / 2), ec="none"))
        ax.set_xlim(-1, len(tokens))
        ax.set_ylim(-1, 1)
        ax.axis("off")
        ax.set_title(f"{label}: p(final) - p(base) per token (blue: down, red: up, |change| > {SHIFT} counts as moved)",
                     fontsize=9, loc="left")
    fig.tight_layout()
    path = os.path.join(results, "token_shift.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
