"""The lab's claims and the rules that decide them (docs/lab.md): one small function per claim, each turning
results.json into a verdict by paired statistics (lab_stats.py) against a minimum effect written here before any
run. `python lab.py --verdicts lab_results/results.json` prints them.

The unit of evidence is a problem under a seed. A run's score on a problem is its share of right samples
averaged over the run's last three evaluations (lab_stats.problem_scores; the base: its step-0 evaluation);
"right" is right-steps accuracy on the built-in task: the answer graded right AND the worked steps exactly the
task's (eval_problems.jsonl's right_steps), so that a right answer reached through a wrong line (5*5 read off a
learnt "5*4=25") is not a learnt fact. Two methods are compared on the same seeds and problems (the same
evaluation draws): a two-level paired bootstrap (seeds, then problems, the problem draw shared by the seeds) of
the mean difference. A number with one value per run (an entropy fall, a KL) is compared by a paired bootstrap
over seeds. Within one claim the comparisons' p-values are Holm-corrected (difference and equivalence tests
separately), then each comparison is read by RULES.
"""
import math

import numpy as np

import lab_stats

ALPHA = 0.05  # family-wise error rate of one claim (Holm)
N_BOOT = 4000  # bootstrap replicates per comparison
MIN_EFFECT = {"accuracy": 0.03, "relative": 0.20, "share": 0.05}  # written before the runs; see RULES
REACHABLE, OUT_OF_REACH = {"level1", "level2"}, {"level3", "level4"}
FUSION = ["luffy", "srft", "relift", "uft", "prefix_rft", "bread"]
SINGLE_STAGE = ["sft", "dft", "grpo", *FUSION]

RULES = [
    "Scores: a run's score on a problem is its share of right samples (answer right and worked steps right) "
    "averaged over its last three evaluations; the base's is its step-0 evaluation. A comparison of two methods "
    "(or a method and the base) is the mean over seeds and problems of the paired difference, with a 95% interval "
    "from a two-level bootstrap (seeds, then problems; 4000 replicates). A per-run number (entropy fall, KL, "
    "token share, demonstration tokens) is compared by a paired bootstrap over seeds.",
    "Minimum effects, fixed before the runs: 0.03 accuracy; 20% of the second method's value for entropy falls "
    "and rises, KL and token counts; 0.05 for a share of tokens.",
    "Reading one comparison: \"above\" (\"below\") when its difference test rejects 0 after Holm's correction "
    "within the claim and the estimate is at least the minimum effect in that direction; \"equivalent\" when the "
    "equivalence test (TOST, two one-sided bootstrap tests at 5% against the minimum effect) rejects after Holm's "
    "correction; \"undecided\" otherwise; fewer than 2 seeds on both sides: \"too few seeds\".",
    "Verdicts: a claim that X is larger agrees when above, disagrees when below or equivalent; \"matches or beats\" "
    "agrees when above or equivalent and disagrees when below; \"no higher\" agrees when below or equivalent and "
    "disagrees when above; undecided or too few seeds: cannot tell. A claim over several comparisons agrees when "
    "every one agrees, disagrees when every one disagrees, and is mixed otherwise (each listed).",
]

CLAIMS = {
    1: "GRPO from a weak base improves the levels it can sometimes solve (levels 1-2) and not the facts it never "
       "saw (the needle stratum).",
    2: "SFT on demonstrations moves the out-of-reach levels, the needle stratum included.",
    3: "Single-stage fusion (LUFFY, SRFT, ReLIFT, UFT, Prefix-RFT, BREAD) matches or beats SFT, GRPO and SFT then "
       "GRPO.",
    4: "GRPO then SFT ends worse than SFT then GRPO (SRFT's Table 4 on the order of the stages).",
    5: "GRPO's entropy falls faster than SRFT's and LUFFY's.",
    6: "BREAD reaches an accuracy GRPO does not reach with fewer demonstration tokens than the methods that always "
       "use the whole demonstration (SFT, LUFFY, SRFT).",
    7: "RL raises pass@1 but not pass@k at large k: on the reachable held-out problems GRPO's pass@32 is no higher "
       "than the base's (the k where the two curves cross is reported with its interval).",
    8: "NSR keeps pass@k: its pass@32 on the reachable problems matches or beats GRPO's.",
    9: "PSR's entropy falls fastest (faster than GRPO's, NSR's and W-REINFORCE's).",
    10: "Where the base gives the demonstration's fact some probability (the moderate stratum), the methods that "
        "weigh it by that probability or keep it out of the loss (LUFFY, UFT, BREAD, Prefix-RFT) move it above the "
        "base; where it gives it none (the needle), they do no better than GRPO.",
    11: "SFT changes the probability of many more response tokens than RL does (SRFT, arXiv 2506.19767: over 50% "
        "against under 2%).",
    12: "SFT moves farther from the base than GRPO; SFT then GRPO ends closer to the base than SFT alone while "
        "scoring higher; SRFT stays closer to the base than SFT.",
    13: "Switching from GRPO to SFT raises the entropy sharply and drops accuracy at the switch; SFT from the base "
        "raises it less.",
    14: "SFT then GRPO done right (switch at SFT's validation-loss minimum, arXiv 2512.11470) matches or beats every "
        "single-stage method (arXiv 2604.23747).",
    15: "The base's prior decides which SFT loss wins (arXiv 2510.00526): NLL (SFT) beats the probability-weighted "
        "loss (DFT) on the facts the base gives no probability (the needle stratum), and DFT matches or beats NLL "
        "on the facts it gives some (the moderate stratum).",
}


# --------------------------------------------------------------------------------------------------------------
# Reading results.json: per-problem scores and per-run numbers, keyed by seed
# --------------------------------------------------------------------------------------------------------------


class Evidence:
    """results.json seen as arrays: scores(method, group) -> {seed: [problems]}, per_run(method, fn) -> {seed: x}."""

    def __init__(self, res: dict):
        self.res, self.methods = res, res["methods"]
        self.groups = [set(g) for g in res.get("problem_groups") or []]  # per problem: level<L>, stratum_<S>

    def runs(self, method: str) -> list[dict]:
        return [r for r in (self.methods.get(method) or {}).get("runs", []) if r["status"] == "ok"]

    def members(self, group: str) -> np.ndarray:
        """The problems of a group: all, reachable, out_of_reach, a level (level3) or a stratum (needle)."""
        want = {"all": None, "reachable": REACHABLE, "out_of_reach": OUT_OF_REACH}.get(
            group, {group, f"stratum_{group}"})
        return np.array([i for i, g in enumerate(self.groups) if want is None or g & want], dtype=int)

    @staticmethod
    def _shares(p: dict, i: int, right: bool) -> np.ndarray | None:
        """Evaluation i's per-problem shares; right-steps ones where asked (None: the run has no such counts)."""
        counts = p.get("right") if right else p["correct"]
        return None if counts is None else np.asarray(counts[i], dtype=float) / p["k"]

    def scores(self, method: str, group: str = "all", right: bool = True) -> dict:
        idx = self.members(group)
        out = {}
        for r in self.runs(method):
            p = r.get("problems")
            if p and len(idx) and (not right or p.get("right")):  # a run without right-steps counts: left out
                evals = [(s, self._shares(p, i, right)) for i, s in enumerate(p["steps"])]
                out[r["seed"]] = lab_stats.problem_scores(evals)[idx]
        return out

    def at_step(self, method: str, step: int, group: str = "all", right: bool = True) -> dict:
        """Per seed, the problems' shares at one evaluation step (None where a run lacks it)."""
        idx, out = self.members(group), {}
        for r in self.runs(method):
            p = r.get("problems")
            if p and step in p["steps"] and (not right or p.get("right")):
                out[r["seed"]] = self._shares(p, p["steps"].index(step), right)[idx]
        return out

    def base(self, group: str = "all", right: bool = True) -> dict:
        """The step-0 evaluation of each seed (the same base model and draws for every single-stage method)."""
        out = {}
        for m in SINGLE_STAGE:
            for seed, x in self.at_step(m, 0, group, right).items():
                out.setdefault(seed, x)
        return out

    def per_run(self, method: str, fn) -> dict:
        out = {}
        for r in self.runs(method):
            v = fn(r)
            if v is not None and math.isfinite(v):
                out[r["seed"]] = float(v)
        return out

    def has(self, method: str) -> bool:
        return bool(self.runs(method))


def paired(a: dict, b: dict, min_effect: float, relative: bool = False) -> dict:
    """Compare a and b ({seed: problems array} or {seed: number}) on their common seeds. relative: min_effect is
    a share of b's mean magnitude. Returns the estimate, 95% CI, p-values of the difference and equivalence
    tests, the minimum effect used and the seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return {"n": len(seeds), "estimate": None}
    x, y = np.array([a[s] for s in seeds], dtype=float), np.array([b[s] for s in seeds], dtype=float)
    if relative:
        min_effect = max(min_effect * abs(float(y.mean())), 1e-12)
    if x.ndim == 2:
        est = lab_stats.paired_bootstrap(x, y, n_boot=N_BOOT, shared_problems=True)
    else:
        est = lab_stats.seed_bootstrap(x, y, paired=True, n_boot=N_BOOT)
    return {"n": len(seeds), "estimate": est["estimate"], "ci": est["ci"], "p": lab_stats.bootstrap_p(est["dist"]),
            "p_tost": lab_stats.tost_p(est["dist"], min_effect), "min_effect": min_effect,
            "a": float(x.mean()), "b": float(y.mean())}


def sides(comps: dict) -> dict:
    """{name: comparison} -> {name: above | below | equivalent | undecided | too few seeds}, Holm within the dict."""
    valid = [n for n, c in comps.items() if c["estimate"] is not None]
    differ = dict(zip(valid, lab_stats.holm([comps[n]["p"] for n in valid], ALPHA))) if valid else {}
    same = dict(zip(valid, lab_stats.holm([comps[n]["p_tost"] for n in valid], ALPHA))) if valid else {}
    out = {}
    for n, c in comps.items():
        if c["estimate"] is None:
            out[n] = "too few seeds"
        elif differ[n] and c["estimate"] >= c["min_effect"]:
            out[n] = "above"
        elif differ[n] and c["estimate"] <= -c["min_effect"]:
            out[n] = "below"
        else:
            out[n] = "equivalent" if same[n] else "undecided"
    return out


VERDICT = {"above": {"above": "agrees", "below": "disagrees", "equivalent": "disagrees"},
           "below": {"below": "agrees", "above": "disagrees", "equivalent": "disagrees"},
           "not below": {"above": "agrees", "equivalent": "agrees", "below": "disagrees"},
           "not above": {"below": "agrees", "equivalent": "agrees", "above": "disagrees"}}


def combine(parts: dict) -> str:
    """{comparison: verdict} -> one verdict: all alike, or mixed (each listed)."""
    kinds = set(parts.values())
    if not parts:
        return "cannot tell"
    return kinds.pop() if len(kinds) == 1 else \
        "mixed: " + "; ".join(f"{v} for {n}" for n, v in sorted(parts.items(), key=lambda x: (x[1], x[0])))


def judge(comps: dict, wants: dict, parts: dict | None = None) -> tuple[str, str]:
    """Comparisons and what the claim wants of each (and verdicts reached otherwise, `parts`) -> (verdict, text)."""
    side = sides(comps)
    parts = {**(parts or {}), **{n: VERDICT[wants[n]].get(side[n], "cannot tell") for n in comps}}
    return combine(parts), "; ".join(f"{n}: {describe(comps[n], side[n])}" for n in comps)


def describe(c: dict, side: str) -> str:
    if c["estimate"] is None:
        return f"too few seeds ({c['n']})"
    lo, hi = c["ci"]
    big = max(abs(c["a"]), abs(c["b"])) >= 100  # token counts: whole numbers

    def f(x, sign=""):
        return f"{x:{sign},.0f}" if big else f"{x:{sign}.3f}"
    return (f"{f(c['a'])} vs {f(c['b'])}, difference {f(c['estimate'], '+')} [{f(lo, '+')}, {f(hi, '+')}] ({side}; "
            f"min. effect {c['min_effect']:.3g}, {c['n']} seeds)")


def label(res: dict, m: str) -> str:
    return (res["methods"].get(m) or {}).get("label", m)


# --------------------------------------------------------------------------------------------------------------
# The claims: one function each -> (verdict, measured)
# --------------------------------------------------------------------------------------------------------------

ACC = MIN_EFFECT["accuracy"]


def claim_1(e: Evidence):
    comps = {"levels 1-2, GRPO vs base": paired(e.scores("grpo", "reachable"), e.base("reachable"), ACC),
             "needle, GRPO vs base": paired(e.scores("grpo", "needle"), e.base("needle"), ACC)}
    return judge(comps, dict(zip(comps, ["above", "not above"])))


def claim_2(e: Evidence):
    comps = {"levels 3-4, SFT vs base": paired(e.scores("sft", "out_of_reach"), e.base("out_of_reach"), ACC),
             "needle, SFT vs base": paired(e.scores("sft", "needle"), e.base("needle"), ACC)}
    return judge(comps, dict.fromkeys(comps, "above"))


def claim_3(e: Evidence):
    comps = {f"{label(e.res, f)} vs {label(e.res, c)}": paired(e.scores(f), e.scores(c), ACC)
             for f in FUSION if e.has(f) for c in ("sft", "grpo", "sft_then_grpo")}
    return judge(comps, dict.fromkeys(comps, "not below"))


def claim_4(e: Evidence):
    comps = {"GRPO then SFT vs SFT then GRPO": paired(e.scores("grpo_then_sft"), e.scores("sft_then_grpo"), ACC)}
    return judge(comps, dict.fromkeys(comps, "below"))


def entropy_fall(r: dict):
    start, final = r.get("entropy_start"), r.get("entropy_final")
    return None if start is None or final is None else start - final


def claim_5(e: Evidence):
    grpo = e.per_run("grpo", entropy_fall)
    comps = {f"entropy fall, GRPO vs {label(e.res, m)}": paired(grpo, e.per_run(m, entropy_fall),
                                                               MIN_EFFECT["relative"], relative=True)
             for m in ("luffy", "srft")}
    return judge(comps, dict.fromkeys(comps, "above"))


def tokens_to(run: dict, target: float):
    """Demonstration tokens a run used until its first evaluation whose all-level right-steps accuracy reaches
    `target` (inf: never)."""
    p = run.get("problems")
    if not p or not p.get("right"):
        return None
    for step, right in zip(p["steps"], p["right"]):
        if np.mean(right) / p["k"] >= target:
            return (run.get("demo_tokens_at") or {}).get(str(step))
    return math.inf


def claim_6(e: Evidence):
    """The target: GRPO's all-level score, the mean over its seeds, plus the minimum effect: an accuracy GRPO does
    not reach without demonstrations (a mean, so that the target does not grow with the number of seeds as a best
    seed does); per seed the demonstration tokens spent until an evaluation reaches it."""
    grpo = e.scores("grpo")
    if len(grpo) < 2:
        return "cannot tell", "GRPO: too few seeds for the target"
    target = float(np.mean([x.mean() for x in grpo.values()])) + ACC
    reach = {m: e.per_run(m, lambda r: tokens_to(r, target)) for m in ("bread", "sft", "luffy", "srft")}  # finite
    notes = [f"target {target:.3f} (GRPO's mean score + {ACC})"] + [
        f"{label(e.res, m)} reaches it in {len(reach[m])} of {len(e.runs(m))} runs" for m in reach]
    if len(reach["bread"]) * 2 <= len(e.runs("bread")):  # BREAD does not reach it in most seeds: not its accuracy
        return ("disagrees" if e.runs("bread") else "cannot tell"), "; ".join(notes) + "."
    comps, parts = {}, {}
    for m in ("sft", "luffy", "srft"):
        if len(reach[m]) * 2 <= len(e.runs(m)):  # BREAD reaches what the whole demonstration mostly does not
            parts[f"{label(e.res, m)} (does not reach it)"] = "agrees"
        else:
            comps[f"demo tokens to target, BREAD vs {label(e.res, m)}"] = paired(reach["bread"], reach[m],
                                                                                 MIN_EFFECT["relative"], relative=True)
    verdict, text = judge(comps, dict.fromkeys(comps, "below"), parts)
    return verdict, "; ".join(notes + ([text] if text else [])) + "."


PASSK_KS = (1, 2, 4, 8, 16, 32)  # the k claims 7 and 8 read, each where the evaluation drew at least k samples


def passk_evaluations(e: Evidence, method: str) -> list[tuple[int, dict]]:
    """(seed, {n, correct}) of each pass@k evaluation of the method's final models, or of the base ("base")."""
    if method == "base":
        return [(int(s), c) for s, c in (e.res.get("base_passk_counts") or {}).items() if c]
    return [(r["seed"], r["passk_counts"]) for r in e.runs(method) if r.get("passk_counts")]


def passk_ks(e: Evidence, method: str) -> list[int]:
    """The k of PASSK_KS that some pass@k evaluation of the method measured."""
    return [k for k in PASSK_KS if any(k <= c["n"] for _, c in passk_evaluations(e, method))]


def passk_scores(e: Evidence, method: str, k: int) -> dict:
    """Per seed, each problem's unbiased pass@k (Eq. 58) of the final model's pass@k evaluation."""
    from eval_sets import pass_at_k  # the one implementation of Eq. (58)

    return {seed: np.array([pass_at_k(c["n"], x, k) for x in c["correct"]])
            for seed, c in passk_evaluations(e, method) if k <= c["n"]}


def crossing(e: Evidence, a: str, b: str, ks: list[int]) -> str:
    """The k (log-interpolated between measured ks) where a's pass@k curve falls to b's, with a 95% bootstrap
    interval (seeds and problems drawn once for every k); "beyond k" where it never does."""
    curves = [(passk_scores(e, a, k), passk_scores(e, b, k)) for k in ks]
    seeds = sorted(set.intersection(*(set(x) & set(y) for x, y in curves)))
    if len(seeds) < 2:
        return "crossing: too few seeds"
    d = np.stack([np.stack([x[s] - y[s] for s in seeds]) for x, y in curves])  # [k, seeds, problems]
    rng = np.random.default_rng(0)
    s_idx, p_idx = rng.integers(0, d.shape[1], (N_BOOT, d.shape[1])), rng.integers(0, d.shape[2], (N_BOOT, d.shape[2]))
    boot = np.stack([d[j][s_idx[:, :, None], p_idx[:, None, :]].mean(axis=(1, 2)) for j in range(len(ks))])

    def cross(curve):
        for j in range(1, len(ks)):
            if curve[j] <= 0 < curve[j - 1]:
                t = curve[j - 1] / (curve[j - 1] - curve[j])
                return 2 ** (math.log2(ks[j - 1]) + t * (math.log2(ks[j]) - math.log2(ks[j - 1])))
        return ks[0] if curve[0] <= 0 else math.inf

    point, draws = cross(d.mean(axis=(1, 2))), np.array([cross(boot[:, i]) for i in range(N_BOOT)])
    lo, hi = np.quantile(np.minimum(draws, 2.0 * ks[-1]), [0.025, 0.975])  # "never crosses" ranks above every k
    show = (lambda v: f"beyond {ks[-1]}" if v > ks[-1] else f"{v:.1f}")
    return f"curves cross at k = {show(point)} [{show(lo)}, {show(hi)}]"


def claim_7(e: Evidence):
    ks = passk_ks(e, "grpo")
    if not ks:
        return "cannot tell", "no pass@k evaluation."
    k = ks[-1]
    comps = {f"pass@{k}, GRPO vs base": paired(passk_scores(e, "grpo", k), passk_scores(e, "base", k), ACC)}
    verdict, text = judge(comps, dict.fromkeys(comps, "not above"))
    return verdict, f"{text}; pass@1: {describe_k(e, 'grpo', 'base', 1)}; {crossing(e, 'grpo', 'base', ks)}."


def describe_k(e: Evidence, a: str, b: str, k: int) -> str:
    c = paired(passk_scores(e, a, k), passk_scores(e, b, k), ACC)
    return describe(c, sides({"x": c})["x"])


def claim_8(e: Evidence):
    ks = passk_ks(e, "nsr")
    if not ks:
        return "cannot tell", "no pass@k evaluation of NSR."
    k = ks[-1]
    comps = {f"pass@{k}, NSR vs GRPO": paired(passk_scores(e, "nsr", k), passk_scores(e, "grpo", k), ACC)}
    return judge(comps, dict.fromkeys(comps, "not below"))


def claim_9(e: Evidence):
    psr = e.per_run("psr", entropy_fall)
    comps = {f"entropy fall, PSR vs {label(e.res, m)}": paired(psr, e.per_run(m, entropy_fall),
                                                              MIN_EFFECT["relative"], relative=True)
             for m in ("grpo", "nsr", "w_reinforce")}
    return judge(comps, dict.fromkeys(comps, "above"))


def claim_10(e: Evidence):
    comps, wants = {}, {}
    for m in ("luffy", "uft", "bread", "prefix_rft"):
        if e.has(m):
            comps[f"moderate, {label(e.res, m)} vs base"] = paired(e.scores(m, "moderate"), e.base("moderate"), ACC)
            comps[f"needle, {label(e.res, m)} vs GRPO"] = paired(e.scores(m, "needle"), e.scores("grpo", "needle"), ACC)
            wants[f"moderate, {label(e.res, m)} vs base"], wants[f"needle, {label(e.res, m)} vs GRPO"] = \
                "above", "not above"
    return judge(comps, wants)


def claim_11(e: Evidence):
    shift = (lambda r: (r.get("token_shift") or {}).get("all"))
    comps = {"tokens moved, SFT vs GRPO": paired(e.per_run("sft", shift), e.per_run("grpo", shift),
                                                 MIN_EFFECT["share"])}
    return judge(comps, dict.fromkeys(comps, "above"))


def claim_12(e: Evidence):
    kl = (lambda r: r["probe"][-1][1] if r.get("probe") else None)
    rel = MIN_EFFECT["relative"]
    comps = {"KL, SFT vs GRPO": paired(e.per_run("sft", kl), e.per_run("grpo", kl), rel, relative=True),
             "KL, SFT then GRPO vs SFT": paired(e.per_run("sft_then_grpo", kl), e.per_run("sft", kl), rel, True),
             "all levels, SFT then GRPO vs SFT": paired(e.scores("sft_then_grpo"), e.scores("sft"), ACC),
             "KL, SRFT vs SFT": paired(e.per_run("srft", kl), e.per_run("sft", kl), rel, relative=True)}
    return judge(comps, dict(zip(comps, ["above", "below", "above", "below"])))


def probe_rise(run: dict, at: int):
    """The probe entropy at the first measurement after step `at` minus the one at `at`."""
    points = {p[0]: p[3] for p in run.get("probe") or []}
    after = min((s for s in points if s > at), default=None)
    return points[after] - points[at] if after is not None and at in points else None


def claim_13(e: Evidence):
    half = e.res.get("lab", {}).get("budget", {}).get("steps", 0) // 2  # the naive two-stage switch
    rise = e.per_run("grpo_then_sft", lambda r: probe_rise(r, half))
    after = {s: x for s, x in e.at_step("grpo_then_sft", half + e.res["lab"]["budget"].get("eval_every", 10)).items()}
    before = e.at_step("grpo_then_sft", half)
    comps = {"probe entropy rise at the switch, GRPO then SFT vs SFT at its start":
             paired(rise, e.per_run("sft", lambda r: probe_rise(r, 0)), MIN_EFFECT["relative"], relative=True),
             "all levels, before vs after the switch": paired(before, after, ACC)}
    return judge(comps, dict.fromkeys(comps, "above"))


def claim_14(e: Evidence):
    right = e.scores("sft_then_grpo_vmin")
    comps = {f"SFT then GRPO (val. min) vs {label(e.res, m)}": paired(right, e.scores(m), ACC)
             for m in SINGLE_STAGE if e.has(m)}
    return judge(comps, dict.fromkeys(comps, "not below"))


def claim_15(e: Evidence):
    comps = {"needle, SFT vs DFT": paired(e.scores("sft", "needle"), e.scores("dft", "needle"), ACC),
             "moderate, DFT vs SFT": paired(e.scores("dft", "moderate"), e.scores("sft", "moderate"), ACC)}
    return judge(comps, dict(zip(comps, ["above", "not below"])))


def convergence(res: dict) -> list[dict]:
    """Has each method stopped moving? Per method, the all-level score (right steps) at its last evaluation minus
    at the third-last (the span the claims' score averages), paired over seeds and problems: "flat" when shown
    equivalent to 0 within the accuracy's minimum effect, "rising" / "falling" when above / below, else
    "undecided"; no Holm (one question per method, not a family)."""
    e, out = Evidence(res), []
    for key, m in res["methods"].items():
        problems = [r["problems"] for r in e.runs(key) if r.get("problems")]
        steps = sorted(set.intersection(*(set(p["steps"]) for p in problems))) if problems else []
        if len(steps) < 3:
            continue
        c = paired(e.at_step(key, steps[-1]), e.at_step(key, steps[-3]), ACC)
        side = sides({"x": c})["x"]
        out.append({"method": key, "label": m.get("label", key), "from": steps[-3], "to": steps[-1], **c,
                    "reading": {"above": "rising", "below": "falling", "equivalent": "flat"}.get(side, side)})
    return out


CLAIM_FUNCTIONS = {n: globals()[f"claim_{n}"] for n in CLAIMS}


def verdicts(res: dict) -> list[dict]:
    """One {claim, text, verdict, measured} per claim."""
    e = Evidence(res)
    if not e.groups:
        return [{"claim": n, "text": t, "verdict": "cannot tell",
                 "measured": "no per-problem counts in these results (a lab before eval_problems.jsonl): rerun"}
                for n, t in CLAIMS.items()]
    out = []
    for n, text in CLAIMS.items():
        verdict, measured = CLAIM_FUNCTIONS[n](e)
        out.append({"claim": n, "text": text, "verdict": verdict, "measured": measured})
    return out


def print_verdicts(claims: list[dict]) -> None:
    for v in claims:
        print(f"{v['claim']}. {v['text']}\n   measured: {v['measured']}\n   verdict:  {v['verdict']}\n")
    print("Decision rules:\n" + "\n".join(f"  - {r}" for r in RULES))
