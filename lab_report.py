"""The lab's report: results.md and the figures, from the dict lab.collect builds (what results.json holds).
lab.py calls write_results at the end of a lab; this module imports no lab (lab imports it: no loop), only
lab_regimes, whose figures (regimes.png, dynamics.png, token_shift.png) it draws beside its own.

results.md: the budget, the main table (accuracy per level and group, entropy, tokens, wall time: mean (min-max)
over seeds), levels 3-4 by stratum beside the probe, the final pass@k, every seed's own value behind each of those
means (so that a reader can recompute any mean), and the claims with their decision rules.

The figures are small multiples: one column of panels per family of methods (FAMILIES), the baselines SFT and
GRPO drawn thin in every column, one colour per method in every figure (COLORS), a line for the mean over seeds
and a band for its 95% t-interval (`t_interval`; with three seeds a bootstrap over seeds has ten distinct
resamples and understates the spread). accuracy.png has a row per level group, accuracy_strata.png a row per
stratum of levels 3-4 (task version 4), entropy.png the rollout entropy of the RL trainers and stages in one row
and the probe's entropy of every method in another (an SFT step's logged entropy is teacher-forced on a
demonstration: another population), passk.png the final pass@k against k. matplotlib is needed for the figures
only: `figures` raises ImportError without it, and write_results then says so and writes the rest.
"""
import json
import math
import os
import re
import textwrap

import lab_regimes

# Every method of lab.py (its TRAINERS, VARIANTS with SWEEPS and LR_GRID, TWO_STAGE, FORKS) as tables and figures name it
LABELS = {"sft": "SFT", "dft": "DFT (sft.py)", "grpo": "GRPO", "luffy": "LUFFY", "srft": "SRFT", "relift": "ReLIFT",
          "uft": "UFT", "prefix_rft": "Prefix-RFT", "bread": "BREAD", "sft_then_grpo": "SFT then GRPO",
          "grpo_then_sft": "GRPO then SFT", "sft_then_grpo_vmin": "SFT then GRPO (val. min)", "nsr": "NSR (fork)",
          "psr": "PSR (fork)", "w_reinforce": "W-REINFORCE (fork)", "forking_tokens": "Forking tokens (fork)",
          "chord": "CHORD (fork)", "hpt": "HPT (fork)", "luffy_gamma0.01": "LUFFY gamma 0.01",
          "luffy_gamma0.001": "LUFFY gamma 0.001", "uft_hint0.1": "UFT hint weight 0.1", "uft_hint1": "UFT hint weight 1",
          "prefix_rft_topk0.5": "Prefix-RFT top-k 0.5", "prefix_rft_topk1": "Prefix-RFT top-k 1",
          "sft_lr2.5e-4": "SFT lr 2.5e-4", "sft_lr1e-3": "SFT lr 1e-3", "grpo_lr1e-4": "GRPO lr 1e-4",
          "grpo_lr4e-4": "GRPO lr 4e-4", "sft_constant": "SFT constant lr", "grpo_constant": "GRPO constant lr"}
GROUPS = {"reachable": ("1", "2"), "out_of_reach": ("3", "4")}  # built-in task: levels 3-4 need a times-table fact
GROUP_TEXT = {"reachable": "reachable (levels 1-2)", "out_of_reach": "out of reach (levels 3-4)", "all": "all levels"}
STRATA = lab_regimes.STRATA
# A column of panels per family; the baselines are drawn in every column, as a member in their own
FAMILIES = {"SFT-like": ("sft", "dft"), "RL": ("grpo",),
            "fusion": ("luffy", "srft", "relift", "uft", "prefix_rft", "bread"),
            "two-stage": ("sft_then_grpo", "grpo_then_sft", "sft_then_grpo_vmin"),
            "forks": ("nsr", "psr", "w_reinforce", "forking_tokens", "chord", "hpt"),
            "knobs": ("luffy_gamma0.01", "luffy_gamma0.001", "uft_hint0.1", "uft_hint1", "prefix_rft_topk0.5",
                      "prefix_rft_topk1"),
            "learning rates": ("sft_lr2.5e-4", "sft_lr1e-3", "sft_constant", "grpo_lr1e-4", "grpo_lr4e-4",
                               "grpo_constant")}
BASELINES = ("sft", "grpo")
# One colour per method in every figure, none shared (the base model: black); a family's members differ in hue
COLORS = {"sft": "#1f77b4", "dft": "#17becf", "grpo": "#d62728", "luffy": "#2ca02c", "srft": "#9467bd",
          "relift": "#8c564b", "uft": "#e377c2", "prefix_rft": "#bcbd22", "bread": "#ff7f0e",
          "sft_then_grpo": "#393b79", "grpo_then_sft": "#7f7f7f", "nsr": "#00a087", "psr": "#f0027f",
          "w_reinforce": "#b8860b", "forking_tokens": "#6a3d9a", "chord": "#7fc97f", "hpt": "#543005",
          "sft_then_grpo_vmin": "#0000ff", "luffy_gamma0.01": "#cc00ff", "luffy_gamma0.001": "#66ff00",
          "uft_hint0.1": "#00ff33", "uft_hint1": "#6600ff", "prefix_rft_topk0.5": "#66ffcc", "prefix_rft_topk1": "#6699ff",
          "sft_lr2.5e-4": "#ff9966", "sft_lr1e-3": "#990066", "grpo_lr1e-4": "#000099", "grpo_lr4e-4": "#00ff99",
          "sft_constant": "#3355ff", "grpo_constant": "#990000"}
BASE_COLOR = "black"

BUDGET_TEXT = (
    "Budget matching: every method starts from the same built-in base and sees the same {prompts_total} "
    "training prompts ({steps} steps x {prompts} prompts, the same seeded order); sft.py runs "
    "`--batch_size {prompts} --max_steps {steps}`, a two-stage baseline {half} + {rest} steps of {prompts} (its "
    "second stage restarts the seeded order, so it sees the first stage's prompts again: fewer distinct ones); "
    "SFT then GRPO (val. min) switches at the evaluation step where SFT's loss on the validation split is "
    "lowest and gives GRPO the rest of the {steps} steps. Every run holds out the same training problems as its "
    "validation split (`--val_rows`). Each family uses its trainer's default lr (RL 2e-4, SFT 5e-4) and every "
    "other default. Not matched, "
    "and therefore reported: generated tokens (sum over steps of `generated_tokens`, the sampling cost; "
    "sft.py samples nothing while training: 0) and demonstration tokens (sum of `demo_tokens`: the "
    "demonstration tokens a step put before the model as training target or as context, once per prompt).")
BAND_TEXT = ("line: mean over seeds {seeds}; band: 95% t-interval of that mean (mean +- t(0.975, n-1) x std / "
             "sqrt(n), n the seeds that finished; none with one seed)")
BASELINE_TEXT = "thin dashed: the baselines SFT and GRPO (their own band in their own column)"

# ======================================================================================
# Numbers as text
# ======================================================================================


def fmt(s: dict | None, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    """stats -> "mean (min-max)"; one seed or no spread: "mean"; none: "n/a"."""
    if s is None:
        return "n/a"
    f = (lambda v: f"{v / scale:.{digits}f}{unit}")
    return f(s["mean"]) if s["min"] == s["max"] else f"{f(s['mean'])} ({f(s['min'])}-{f(s['max'])})"


def fmt_tokens(s: dict | None) -> str:
    """Token counts in one unit per cell, chosen by the largest seed: 950, 9.5k, 95k, 9.50M."""
    if s is None:
        return "n/a"
    top = s["max"]
    if top >= 1e6:
        return fmt(s, 2, 1e6, "M")
    return fmt(s, 0, 1e3, "k") if top >= 1e4 else fmt(s, 1, 1e3, "k") if top >= 1e3 else fmt(s, 0)


def one(v: float | None) -> dict | None:
    """A single run's value as stats of one seed, so that fmt and fmt_tokens print it as they print a mean."""
    return None if v is None else {"mean": v, "min": v, "max": v}


def t975(df: int) -> float:
    """Student's t two-sided 95% quantile with df degrees of freedom: a table to 10, beyond it the Cornish-Fisher
    expansion around the normal's 1.96 to the third order (off by about 1e-4 at 11, less beyond)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    if df <= len(table):
        return table[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def t_interval(mean: float, std: float | None, n: int) -> tuple[float, float]:
    """The 95% t-interval of a mean over n seeds with sample std `std`; (mean, mean) with one seed."""
    if n < 2 or std is None:
        return mean, mean
    half = t975(n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def moments(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample std (None with one value), n)."""
    n, mean = len(values), sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None, n


def curve(xs: list, at: list[tuple]) -> dict:
    """{steps: xs, mean, lo, hi} from the moments at each x; lo / hi: the mean's 95% t-interval."""
    ci = [t_interval(*m) for m in at]
    return {"steps": xs, "mean": [m[0] for m in at], "lo": [c[0] for c in ci], "hi": [c[1] for c in ci]}


# ======================================================================================
# results.md
# ======================================================================================


def get(d: dict | None, path: tuple) -> float | dict | None:
    """d[path[0]][path[1]]...; None where a key (or a whole part) is absent."""
    for key in path:
        d = (d or {}).get(key)
    return d


def main_columns(res: dict) -> list[tuple]:
    """(header, path, format) of the main table's columns after the method: a path reads a method's summary
    (stats over seeds) and a run (its own value) alike."""
    levels = sorted({k for m in res["methods"].values() for k in m["summary"]["final"]
                     if k not in ("all", *GROUPS, *STRATA)}) or ["1", "2", "3", "4"]
    return [("all levels", ("final", "all"), fmt), *[(f"level {lv}", ("final", lv), fmt) for lv in levels],
            ("reachable (1-2)", ("final", "reachable"), fmt), ("out of reach (3-4)", ("final", "out_of_reach"), fmt),
            ("wrong steps", ("wrong_steps_final",), fmt), ("entropy", ("entropy_final",), fmt),
            ("response length", ("response_length_final",), lambda s: fmt(s, 1)),
            ("generated tokens", ("generated_tokens",), fmt_tokens), ("demo tokens", ("demo_tokens",), fmt_tokens),
            ("wall time (s)", ("wall_s",), lambda s: fmt(s, 0))]


def strata_of(res: dict) -> list[str]:
    return [s for s in STRATA if any(s in m["summary"]["final"] for m in res["methods"].values())]


def regime_columns(res: dict) -> list[tuple]:
    """(header, path, format) of the stratum table's columns: levels 3-4 per stratum, then the probe."""
    prior = lab_regimes.base_prior(res)
    return [(f"{s} (prior {prior[s]:.2g})" if s in prior else s, ("final", s), fmt) for s in strata_of(res)] + [
        ("probe tokens moved", ("token_shift", "all"), fmt), ("KL from base", ("probe_final", "kl_base"), fmt),
        ("demo NLL", ("probe_final", "demo_nll"), fmt)]


def header(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def table(res: dict) -> list[str]:
    """The Markdown table: one row per method (and the base), accuracy at the final step."""
    cols = main_columns(res)
    lines = header(["method", "seeds ok", *(h for h, _, _ in cols)])
    base = res.get("base") or {}
    if base:
        lines.append("| base model (step 0) | " + str((base.get("all") or {}).get("n", 0)) + " | " +
                     " | ".join(fmt(base.get(p[1])) if p[0] == "final" else "-" for _, p, _ in cols) + " |")
    for m in res["methods"].values():
        runs = m["runs"]
        ok = sum(r["status"] == "ok" for r in runs)
        failed = [f"seed {r['seed']} FAILED: " + (", ".join(r["logs"]) or r["why"])
                  for r in runs if r["status"] != "ok"]
        label = m["label"] + (f" **({'; '.join(failed)})**" if failed else "")
        cells = [f(get(m["summary"], p)) for _, p, f in cols] if ok else ["failed"] * len(cols)
        lines.append(f"| {label} | {ok}/{len(runs)} | " + " | ".join(cells) + " |")
    for name, why in res.get("missing", {}).items():
        lines.append(f"| {LABELS.get(name, name)} | not run: {why} |" + " |" * len(cols))
    return lines


def problem_score(run: dict, members: list[int], key: str) -> float | None:
    """A run's share of right samples (key "correct": graded right; "right": graded right with right worked steps)
    over the problems `members`, averaged over its last three evaluations (lab_claims' score); None without counts."""
    p = run.get("problems")
    if not p or not p.get(key) or not members:
        return None
    last = p[key][-3:]
    return sum(sum(e[i] for i in members) for e in last) / (len(last) * len(members) * p["k"])


SCORE_PARTS = {"all levels": None, "levels 1-2": {"level1", "level2"}, "moderate fact": {"stratum_moderate"},
               "weak fact": {"stratum_weak"}, "needle fact": {"stratum_needle"},
               "unseen fact": {"stratum_generalisation"}}


def score_table(res: dict, methods: list[str] | None = None) -> list[str]:
    """The claims' score per group of problems (right samples with right worked steps, the mean of the last three
    evaluations; the base: step 0), mean (min-max) over seeds, for `methods` (default: all) and the base."""
    groups = res.get("problem_groups") or []
    members = {name: [i for i, g in enumerate(groups) if want is None or want & set(g)]
               for name, want in SCORE_PARTS.items()}
    members = {name: idx for name, idx in members.items() if idx}
    base = {}  # per seed, the step-0 evaluation of a single-stage run (the same model and draws for all of them)
    for m in res["methods"].values():
        for r in m["runs"]:
            p = r.get("problems")
            if r["status"] == "ok" and p and p.get("right") and p["steps"][0] == 0 and len(m["trainers"]) == 1:
                base.setdefault(r["seed"], {"status": "ok", "problems": dict(p, right=p["right"][:1])})

    def row(label, runs):
        return f"| {label} | {len(runs)} | " + " | ".join(
            fmt(stats_of([problem_score(r, idx, "right") for r in runs])) for idx in members.values()) + " |"

    rows = [row("base model (step 0)", list(base.values()))] if base else []
    for key, m in res["methods"].items():
        ok = [r for r in m["runs"] if r["status"] == "ok" and (r.get("problems") or {}).get("right")]
        if ok and (methods is None or key in methods):
            rows.append(row(m["label"], ok))
    return header(["method", "seeds", *members]) + rows if rows else []


def stats_of(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else None


def right_steps_table(res: dict) -> list[str]:
    """Levels 1-2 and each stratum of levels 3-4, graded and with right worked steps, from every run's own
    per-problem counts (the score of the claims: the mean of the last three evaluations), mean over seeds."""
    groups = res.get("problem_groups") or []
    parts = {"levels 1-2": {"level1", "level2"}, **{s: {f"stratum_{s}"} for s in STRATA}}
    members = {name: [i for i, g in enumerate(groups) if want & set(g)] for name, want in parts.items()}
    members = {name: idx for name, idx in members.items() if idx}
    rows = []
    for m in res["methods"].values():
        ok = [r for r in m["runs"] if r["status"] == "ok" and r.get("problems")]
        if not ok:
            continue
        cells = []
        for idx in members.values():
            graded = [problem_score(r, idx, "correct") for r in ok]
            right = [problem_score(r, idx, "right") for r in ok]
            cells.append(f"{sum(graded) / len(ok):.3f} / {sum(right) / len(ok):.3f}" if None not in graded + right
                         else "n/a")
        rows.append(f"| {m['label']} | {len(ok)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return header(["method", "seeds", *(f"{name}: graded / right steps" for name in members)]) + rows


def regime_table(res: dict, figures: bool = True) -> list[str]:
    """Levels 3-4 per stratum (the base's prior on the fact) at the final step, beside what each method did to
    the probe: the share of its tokens moved by more than lab_regimes.SHIFT, and the final KL from the base and
    NLL of the held-out demonstrations."""
    if not strata_of(res):
        return []
    cols = regime_columns(res)
    lines = ["Levels 3-4 by stratum (the base's prior on the fact: the median least-likely demonstration token "
             "probability at step 0), final held-out pass@1; the probe (docs/lab.md): the share of its tokens whose "
             f"probability moved by more than {lab_regimes.SHIFT} from the base's, the per-token KL(base || model) on "
             "the base's own responses and the per-token NLL of the held-out demonstrations, at the end:", "",
             *header(["method", *(h for h, _, _ in cols)])]
    base = res.get("base") or {}
    if base:
        at0 = lab_regimes.base_probe(res)
        lines.append("| base model (step 0) | " + " | ".join(fmt(base.get(s)) for s in strata_of(res)) +
                     " | 0 | 0 | " + (f"{at0[2]:.3f}" if at0 else "n/a") + " |")
    for m in res["methods"].values():
        if any(r["status"] == "ok" for r in m["runs"]):
            lines.append(f"| {m['label']} | " + " | ".join(f(get(m["summary"], p)) for _, p, f in cols) + " |")
    return lines + (["", "![accuracy per stratum against the base's prior](regimes.png)", "",
                     "![learning dynamics and probe entropy](dynamics.png)", "",
                     "![token shift of one demonstration](token_shift.png)", ""] if figures else [])


def convergence_table(res: dict) -> list[str]:
    """Has each method stopped moving (lab_claims.convergence)? Its all-level score at its last evaluation minus at
    the third-last, with the 95% interval over seeds and problems, and the reading."""
    rows = [f"| {c['label']} | {c['from']} -> {c['to']} | {c['estimate']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] "
            f"| {c['reading']} |" for c in res.get("convergence") or [] if c.get("estimate") is not None]
    if not rows:
        return []
    return ["Convergence: the all-level score (right steps) at the last evaluation minus at the third-last, paired "
            "over seeds and problems; \"flat\" is shown equivalent to 0 within 0.03, \"rising\" / \"falling\" "
            "differs by at least that:", "", *header(["method", "steps", "change [95% CI]", "reading"]), *rows, ""]


LR_FAMILIES = {"SFT": ("sft", "sft_lr2.5e-4", "sft_lr1e-3", "sft_constant"),
               "GRPO": ("grpo", "grpo_lr1e-4", "grpo_lr4e-4", "grpo_constant")}


def lr_table(res: dict) -> list[str]:
    """--methods lr: each family's learning rates by their score on the validation split (held-out training
    problems, never the held-out set: the mean of the last three evaluations), and which won."""
    lines = []
    for family, members in LR_FAMILIES.items():
        have = [m for m in members if m in res["methods"] and res["methods"][m]["summary"].get("val_score")]
        if len(have) < 2:
            continue
        score = {m: res["methods"][m]["summary"]["val_score"] for m in have}
        best = max(have, key=lambda m: score[m]["mean"])
        lines += [f"| {LABELS[m]}{' (default)' if m == members[0] else ''} | {fmt(score[m])} | "
                  f"{fmt(res['methods'][m]['summary']['final'].get('all'))} | {'**best**' if m == best else ''} |"
                  for m in have]
    if not lines:
        return []
    return ["Learning rates (`--methods lr`), chosen on the validation split: the score is the mean of the last "
            "three evaluations on the 200 training problems every run holds out (`--val_rows`); the held-out "
            "column is shown, never used to choose:", "", *header(["run", "validation score", "held-out, all levels",
                                                                     "best"]), *lines, ""]


def forks_counter(res: dict) -> str:
    """One line: how many fork runs finished, apart from the trainers' count (the forks are not reference trainers)."""
    forks = [m for m in FAMILIES["forks"] if m in res["methods"]]
    runs = [r for m in forks for r in res["methods"][m]["runs"]]
    if not forks:
        return "Forks (forks/): none in this lab."
    others = [r for m, x in res["methods"].items() if m not in forks for r in x["runs"]]
    return (f"Forks (forks/, rows marked \"(fork)\"): {sum(r['status'] == 'ok' for r in runs)} of {len(runs)} runs "
            f"finished ({', '.join(LABELS[m] for m in forks)}); the trainers and baselines: "
            f"{sum(r['status'] == 'ok' for r in others)} of {len(others)}.")


def passk_table(res: dict) -> list[str]:
    """The final pass@k of the base and the methods evaluated for it, reachable / out-of-reach levels (mean over
    seeds)."""
    curves = passk_series(res)
    if not curves:
        return []
    ks = sorted({k for c in curves.values() for g in c.values() for k in g["steps"]})
    groups = [g for g in GROUPS if any(g in c for c in curves.values())]  # the lab evaluates the reachable ones
    lines = ["Final pass@k (unbiased, METHODS.md Eq. 58; mean over seeds), " + " / ".join(GROUP_TEXT[g] for g in groups)
             + ":", "", *header(["method", *(f"pass@{k}" for k in ks)])]
    for label, c in curves.items():
        cell = {g: dict(zip(c[g]["steps"], c[g]["mean"])) for g in c}
        lines.append(f"| {label} | " + " | ".join(" / ".join(f"{cell[g][k]:.3f}" if k in cell.get(g, {}) else "n/a"
                                                             for g in groups) for k in ks) + " |")
    return lines + ["", "![pass@k against k](passk.png)", ""]


def base_runs(res: dict) -> list[dict]:
    """Each seed's base as a run: its step-0 evaluation (the same model and draws in every run of the seed: the
    first finished run that has one) and its probe at step 0 (KL 0, no token moved)."""
    out = {}
    for m in res["methods"].values():
        for r in m["runs"]:
            if r["status"] == "ok" and r.get("base") and r["seed"] not in out:
                at0 = next((p for p in r.get("probe") or [] if p[0] == 0), None)
                out[r["seed"]] = {"seed": r["seed"], "status": "ok", "final": r["base"], "token_shift": {"all": 0.0},
                                  "probe": at0 and [[0, 0.0, at0[2], at0[3]]]}
    return [out[s] for s in sorted(out)]


def run_view(r: dict) -> dict:
    """A run with its last probe measurement as probe_final, the summary's name for it (so one path reads both)."""
    last = (r.get("probe") or [None])[-1]
    return dict(r, probe_final=last and {"kl_base": last[1], "demo_nll": last[2], "entropy": last[3]})


def seed_table(res: dict, cols: list[tuple]) -> list[str]:
    """One row per run (the base's first, one per seed) with the columns `cols`: the values the means are of."""
    lines = header(["method", "seed", *(h for h, _, _ in cols)])
    rows = [("base model (step 0)", r) for r in base_runs(res)]
    rows += [(m["label"], r) for m in res["methods"].values() for r in m["runs"]]
    exact = [(h, p, (lambda s: fmt(s, 0)) if f is fmt_tokens else f) for h, p, f in cols]  # tokens: every digit
    for label, r in rows:
        if r["status"] != "ok":
            lines.append(f"| {label} | {r['seed']} | failed: {r['why']} |" + " |" * (len(cols) - 1))
            continue
        lines.append(f"| {label} | {r['seed']} | " + " | ".join(f(one(get(run_view(r), p))) for _, p, f in exact)
                     + " |")
    return lines


def passk_seed_table(res: dict) -> list[str]:
    """Each run's final pass@k, reachable / out-of-reach levels (the base's per seed is not in results.json)."""
    rows = [(m["label"], r) for m in res["methods"].values() for r in m["runs"] if r.get("passk")]
    if not rows:
        return []
    ks = sorted({k for _, r in rows for g in GROUPS for k in r["passk"].get(g, {})}, key=int)
    lines = ["Final pass@k, reachable / out-of-reach levels (the base's is kept as mean and spread only):", "",
             *header(["method", "seed", *(f"pass@{k}" for k in ks)])]
    for label, r in rows:
        cells = [" / ".join(fmt(one(get(r["passk"], (g, k)))) for g in GROUPS) for k in ks]
        lines.append(f"| {label} | {r['seed']} | " + " | ".join(cells) + " |")
    return lines + [""]


def seed_section(res: dict) -> list[str]:
    """Every seed's value behind the means of the tables above, in the same columns."""
    lines = ["## Every seed", "",
             "The value of each run behind each mean (min-max) above, in the same columns: the mean of a method's "
             "rows is its cell there (a failed run counts in none). The base's rows are each seed's step-0 "
             "evaluation.", "", *seed_table(res, main_columns(res)), ""]
    if strata_of(res):
        lines += ["Levels 3-4 by stratum and the probe:", "", *seed_table(res, regime_columns(res)), ""]
    return lines + passk_seed_table(res)


def results_markdown(res: dict, rules: list[str]) -> str:
    """results.md: the lab's command, machine and budget, the tables, the figures, every seed, the claims
    (res["verdicts"]) and the decision rules they were computed by."""
    lab, b = res["lab"], res["lab"]["budget"]
    steps, w = b["steps"], max(1, b["steps"] // 10)  # lab.window: the entropy's last 10% of steps
    seeds = ", ".join(map(str, b["seeds"]))
    missing = ", ".join(f"{LABELS.get(k, k)} ({v})" for k, v in res.get("missing", {}).items()) or "none"
    text = [
        "# Laptop lab results", "",
        f"Command: `{lab['command']}`  ",
        f"Machine: {lab['machine']['cpu']}, {lab['machine']['cores']} cores, load average "
        f"{lab['machine']['load_start']} at the start and {lab['machine']['load_end']} at the end; "
        f"{lab['jobs']} run(s) at a time with OMP_NUM_THREADS={lab['threads']}  ",
        f"Date: {lab['date']} (this invocation {lab['wall_min']:.1f} min, {lab.get('reused', 0)} of "
        f"{lab.get('runs', '?')} runs reused from earlier ones; the trainer processes ran "
        f"{lab.get('runs_wall_min', 0):.1f} min in all, started between {lab.get('first_started')} and "
        f"{lab.get('last_started')})  ",
        f"Git commit: {lab['commit']}  ",
        f"Seeds: {seeds}; methods missing: {missing}", "",
        BUDGET_TEXT.format(prompts_total=steps * b["prompts"], steps=steps, prompts=b["prompts"], half=steps // 2,
                           rest=steps - steps // 2), "",
        *table(res), "",
        *regime_table(res),
        forks_counter(res), "",
        f"Accuracy: held-out pass@1 at step {steps} (mean over the samples of each problem at the evaluation "
        f"temperature), {b['eval_per_level']} problems per level; \"all levels\" pools every problem, a group "
        "is the mean of its levels. Each cell: mean over seeds, (min-max) over seeds (no range: all seeds "
        "equal); every seed's value is in [Every seed](#every-seed). The base row is the step-0 evaluation (one "
        "per seed: the seeds differ only in the evaluation's sampling, so its spread is the evaluation noise). "
        "Wrong steps: at the final evaluation, "
        "the share of rewarded samples whose worked steps differ from the task's (`eval_wrong_steps_builtin`): "
        "right answers for wrong reasons, which the answer-only verifier rewards. Entropy and response length: mean "
        f"of the core keys `entropy` and `response_length` over the last {w} training steps; for SFT (and a "
        "run ending with an SFT stage) "
        "they are measured on the demonstrations it trains on, not on its own samples. Generated and "
        "demonstration tokens: sums over all training steps (BREAD's demo tokens count the anchors of the "
        "groups it trained on, not the longer anchors its search tried). Wall time: the trainer processes "
        "(two stages summed), start-up and evaluation included, with the other runs of the lab beside them "
        "when it ran more than one at a time.", "",
        "Figures: a column per family (" + "; ".join(f"{f}: {', '.join(LABELS[m] for m in ms)}"
                                                     for f, ms in FAMILIES.items()) +
        "), each method in its own colour in every figure; " + BAND_TEXT.format(seeds=seeds) + "; " +
        BASELINE_TEXT + ".", "",
        "![held-out accuracy against step, per level group and family](accuracy.png)", "",
        *(["![held-out accuracy against step, per stratum of levels 3-4 and family](accuracy_strata.png)", ""]
          if strata_of(res) else []),
        "Entropy: the top row is the mean token entropy of the training batch's own rollouts, drawn only for the "
        "RL trainers and the RL stage of a two-stage run (an SFT step's entropy is teacher-forced on a "
        "demonstration, not comparable); the bottom row is the entropy on the fixed probe (the same prompts for "
        "every method, T = 1), for every method.", "",
        "![rollout entropy and probe entropy against step](entropy.png)", "",
        "Compute: held-out pass@1 on all levels against the generated + trained tokens (sampled tokens, and the "
        "real tokens of the training micro-batches) and the training seconds (rollouts and updates; evaluation "
        "apart) each method had spent by each evaluation, means over seeds.", "",
        "![accuracy against tokens and seconds spent](compute.png)", "",
        *passk_table(res),
        *convergence_table(res),
        *lr_table(res),
        *seed_section(res),
        "## Claims (computed by `python lab.py --verdicts <results>/results.json`)", ""]
    for v in res.get("verdicts", []):
        text += [f"{v['claim']}. **{v['text']}** Verdict: **{v['verdict']}**. {v['measured']}", ""]
    text += ["Decision rules:", "", *[f"- {r}" for r in rules], ""]
    return "\n".join(text)


# ======================================================================================
# Figures
# ======================================================================================


def logged_by(m: dict, step: int, half: int) -> str:
    """The trainer that logged training step `step` of method m: a two-stage run's first stage logs 1..half."""
    trainers = m["trainers"]
    return trainers[0] if len(trainers) == 1 or step <= half else trainers[1]


def per_seed(m: dict, metric: str, half: int) -> list[dict]:
    """{step: value} of each finished run of method m. metric "rollout_entropy": the training batch's entropy at
    the steps an RL trainer logged (not sft.py's: teacher-forced on demonstrations); "probe_entropy": the probe's,
    every probe_every steps; else an accuracy key ("all", a level, a group, a stratum) at the evaluation steps."""
    ok = [r for r in m["runs"] if r["status"] == "ok"]
    if metric == "rollout_entropy":
        return [{p[0]: p[1] for p in r["entropy_curve"] if p[1] is not None and  # the trainer each step's record
                 (p[2] if len(p) > 2 else logged_by(m, p[0], half)) != "sft"} for r in ok]  # names (older: by half)
    if metric == "probe_entropy":
        return [{p[0]: p[3] for p in r.get("probe") or []} for r in ok]
    return [{int(s): a[metric] for s, a in r["evals"].items() if metric in a} for r in ok]


def series(res: dict, metric: str) -> dict:
    """{method label: {steps, mean, lo, hi}} of one metric (per_seed) against the step, over the seeds that
    finished, at the steps every one of them has; lo / hi: the mean's 95% t-interval."""
    half, out = (res.get("lab") or {}).get("budget", {}).get("steps", 0) // 2, {}
    for m in res["methods"].values():
        runs = per_seed(m, metric, half)
        steps = sorted(set.intersection(*(set(p) for p in runs))) if runs else []
        if steps:
            out[m["label"]] = curve(steps, [moments([p[s] for p in runs]) for s in steps])
    return out


def passk_series(res: dict) -> dict:
    """{label: {group: {steps (= the k), mean, lo, hi}}} of the final pass@k curves of the base and the methods
    evaluated for it; lo / hi: the mean's 95% t-interval."""
    sources = {"base model": res.get("base_passk")}
    sources.update({m["label"]: m["summary"].get("passk") for m in res["methods"].values()})
    out = {}
    for label, groups in sources.items():
        for group, by_k in (groups or {}).items():
            ks = [k for k, s in by_k.items() if s]
            if group in GROUPS and ks:
                out.setdefault(label, {})[group] = curve([int(k) for k in ks], [
                    (by_k[k]["mean"], by_k[k].get("std"), by_k[k]["n"]) for k in ks])
    return out


def label_colors() -> dict:
    """COLORS by label (lab_regimes' figures draw by label), the base model's too."""
    return {**{LABELS[m]: c for m, c in COLORS.items()}, "base model": BASE_COLOR}


def small_multiples(plt, rows: list[tuple], unit: str, half: int, title: str, ylim=None):
    """A figure of len(rows) x len(FAMILIES) panels. rows: (name, {label: series}, note); panel (i, j) draws row
    i's curves of family j's members with their bands and of the other baselines thin and dashed, or the note
    when no member has a curve. Column j's legend sits under its bottom panel."""
    families = {f: ms for f, ms in FAMILIES.items()  # the families this lab ran: a column each
                if any(LABELS[m] in curves for _, curves, _ in rows for m in ms if m not in BASELINES or f in
                       ("SFT-like", "RL"))}
    fig, axes = plt.subplots(len(rows), len(families), figsize=(3.1 * len(families), 2.4 * len(rows) + 0.6),
                             sharex=True, sharey="row", squeeze=False)
    for i, (name, curves, note) in enumerate(rows):
        for j, (family, members) in enumerate(families.items()):
            ax = axes[i][j]
            for m in (b for b in BASELINES if b not in members and LABELS[b] in curves):
                c = curves[LABELS[m]]
                ax.plot(c["steps"], c["mean"], "--", color=COLORS[m], lw=0.9, label=f"{LABELS[m]} (baseline)")
            drawn = [m for m in members if LABELS[m] in curves]
            for m in drawn:
                c = curves[LABELS[m]]
                ax.plot(c["steps"], c["mean"], "-", color=COLORS[m], lw=1.6, label=LABELS[m])
                ax.fill_between(c["steps"], c["lo"], c["hi"], color=COLORS[m], alpha=0.13, lw=0)
            if not drawn and note:
                ax.text(0.5, 0.95, textwrap.fill(note, 36), transform=ax.transAxes, ha="center", va="top", fontsize=7)
            if family == "two-stage" and half:
                ax.axvline(half, color="grey", lw=0.6, ls=":")  # the switch
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(family, fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{name}\n{unit}", fontsize=8)
    for ax in axes.flat if ylim else ():  # once every curve is drawn: a limit set earlier freezes the other end
        ax.set_ylim(*ylim)
    for j, ax in enumerate(axes[-1]):
        ax.set_xlabel("training step", fontsize=8)
        legend = {}
        for row in axes:
            for h, label in zip(*row[j].get_legend_handles_labels()):
                legend.setdefault(label, h)
        order = sorted(legend, key=lambda label: not label.endswith("(baseline)"))  # the baselines first
        ax.legend([legend[k] for k in order], order, loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=7,
                  frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def passk_figure(plt, curves: dict, title: str):
    """pass@k against k, one curve per method, a panel per level group evaluated (the lab's: reachable only)."""
    colors = label_colors()
    groups = [g for g in GROUPS if any(g in c for c in curves.values())]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups) + 1, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, group in zip(axes, groups):
        for label, c in ((label, c[group]) for label, c in curves.items() if group in c):
            ax.plot(c["steps"], c["mean"], "o-", ms=3, color=colors.get(label), label=label, lw=1.5)
            ax.fill_between(c["steps"], c["lo"], c["hi"], color=colors.get(label), alpha=0.18, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_title(f"final pass@k, {GROUP_TEXT[group]}", fontsize=10)
        ax.set_xlabel("k (samples per problem)")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("pass@k (unbiased, Eq. 58)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def compute_figure(plt, res: dict, title: str):
    """Held-out pass@1 (all levels) against what a method spent to get there: generated + trained tokens, and
    training seconds (rollouts and updates, evaluation apart), both summed up to each evaluation; one line per
    method, the means over its seeds of both coordinates."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for key, m in res["methods"].items():
        ok = [r for r in m["runs"] if r["status"] == "ok" and r.get("compute_at")]
        steps = sorted(set.intersection(*(set(r["compute_at"]) for r in ok)), key=int) if ok else []
        points = [(s, [r["compute_at"][s] for r in ok], [r["evals"][s]["all"] for r in ok]) for s in steps
                  if all(r["compute_at"][s] and r["compute_at"][s][0] is not None and s in r["evals"] for r in ok)]
        for i, ax in enumerate(axes):
            xs = [sum(c[i] for c in cs) / len(cs) for _, cs, _ in points]
            ax.plot(xs, [sum(a) / len(a) for _, _, a in points], "-o", ms=2.5, lw=1.3, color=COLORS.get(key),
                    label=m["label"])
    for ax, name in zip(axes, ("generated + trained tokens", "training seconds (evaluation apart)")):
        ax.set_xscale("symlog", linthresh=1e3 if "tokens" in name else 1.0)
        ax.set_xlabel(name, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("held-out pass@1, all levels", fontsize=8)
    axes[1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def figures(res: dict, results: str, probe: dict | None = None) -> list[str]:
    """accuracy.png, accuracy_strata.png (results with strata), entropy.png, passk.png (with pass@k evaluations),
    compute.png (accuracy against tokens and seconds) and lab_regimes' figures (token_shift.png needs the base's probe); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = res["lab"]["budget"]
    band = BAND_TEXT.format(seeds=", ".join(map(str, budget["seeds"])))
    no_rollouts = "SFT and DFT sample nothing while training: no rollout entropy (their probe entropy is below)"
    grids = {
        "accuracy.png": ([(GROUP_TEXT[g], series(res, g), "") for g in ("reachable", "out_of_reach", "all")],
                         "held-out pass@1", (-0.02, 1.02)),
        "accuracy_strata.png": ([(f"{s} stratum (levels 3-4)", series(res, s), "") for s in strata_of(res)],
                                "held-out pass@1", (-0.02, 1.02)),
        "entropy.png": ([("rollouts (RL only)", series(res, "rollout_entropy"), no_rollouts),
                         ("fixed probe (T = 1)", series(res, "probe_entropy"), "")], "entropy (nats)", (0, None))}
    paths = []

    def save(name, fig):
        paths.append(os.path.join(results, name))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")  # the legends under the panels included
        plt.close(fig)

    for name, (rows, unit, ylim) in grids.items():
        if rows:
            save(name, small_multiples(plt, rows, unit, budget["steps"] // 2, band + "; " + BASELINE_TEXT, ylim))
    curves = passk_series(res)
    if curves:
        save("passk.png", passk_figure(plt, curves, band))
    if any(r.get("compute_at") for m in res["methods"].values() for r in m["runs"]):
        save("compute.png", compute_figure(plt, res, "means over seeds " + ", ".join(map(str, budget["seeds"]))))
    return paths + lab_regimes.figures(res, results, LABELS, probe, label_colors())


def compact_json(res: dict) -> str:
    """JSON with indent 1, lists of numbers (every problem's counts) on one line each: under half the size."""
    text = json.dumps(res, indent=1)
    return re.sub(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]",  # real newlines: never in a string
                  lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)


def write_results(res: dict, results: str, rules: list[str], probe: dict | None = None, say=print) -> None:
    """results.json, results.md and the figures (the figures only where matplotlib is installed). res holds its
    verdicts already; rules are the decision rules they were decided by; probe: the base's (token_shift.png)."""
    os.makedirs(results, exist_ok=True)
    text = compact_json(res)
    with open(os.path.join(results, "results.json"), "w") as f:
        f.write(text)
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(results_markdown(res, rules))
    try:
        figures(res, results, probe)
    except ImportError:
        say("lab: matplotlib is not installed, so no figures (pip install matplotlib; training never needs it). "
            "Then `python lab.py` again redraws them from the finished runs in seconds.")
