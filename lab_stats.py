"""Paired statistics for the lab's verdicts: bootstrap confidence intervals, p-values, Holm's correction
and a decision rule with a minimum effect. Plain numpy; nothing here knows about trainers or results.json.

Why. The lab's old rule calls a difference real when the two means differ by more than the larger seed
range; a range can only grow as seeds are added, so that rule gets stricter with more data. Here the
uncertainty of a difference is a bootstrap over seeds and problems, whose interval narrows as seeds and
problems are added, and a claim must also clear a minimum effect to count.

Shapes. A method's per-problem successes over seeds: an array [seeds, problems] of success fractions in
[0, 1] (a problem's share of correct samples, averaged over the last evaluations: `run_score`). Two methods
are paired when row i of both is seed i and column j of both is problem j.

    est = paired_bootstrap(a, b)                         # a, b: [seeds, problems]
    decide(est["ci"], est["estimate"], 0.02, est["tost_ci"])   # above | below | equivalent | undecided
    holm([bootstrap_p(e["dist"]) for e in ests])         # which of several claims survive
"""
import numpy as np

LAST = 3  # evaluations averaged for a run's score
CHUNK = 500  # bootstrap replicates drawn at a time (bounds the index arrays' memory)


def problem_scores(evals: list[tuple[int, np.ndarray]], last: int = LAST) -> np.ndarray:
    """evals: one (step, successes) per evaluation of a run, successes an array [problems] of per-problem
    success fractions, the same problems in the same order at every step. Returns each problem's mean
    success over the `last` evaluations with the highest steps (all of them when the run has fewer):
    s_j = mean_{t in last} successes_t[j]. Averaging evaluations damps the step-to-step noise of one
    evaluation; the last ones are the trained model."""
    if not evals:
        raise ValueError("no evaluations")
    tail = sorted(evals, key=lambda e: e[0])[-last:]
    rows = [np.asarray(s, dtype=float) for _, s in tail]
    if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
        raise ValueError(f"every evaluation needs the same 1-D problems array, got {[r.shape for r in rows]}")
    return np.mean(rows, axis=0)


def run_score(evals: list[tuple[int, np.ndarray]], last: int = LAST) -> float:
    """The score of one run: the mean of its last `last` evaluations' accuracies (accuracy = mean over
    problems), which equals the mean over problems of `problem_scores` since every evaluation has the
    same problems."""
    return float(problem_scores(evals, last).mean())


def percentile_ci(dist: np.ndarray, level: float) -> tuple[float, float]:
    """Equal-tailed percentile interval of a bootstrap distribution: its (1-level)/2 and (1+level)/2
    quantiles (numpy's default linear interpolation)."""
    lo, hi = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(estimate: float, dist: np.ndarray, alpha: float) -> dict:
    """Point estimate + bootstrap distribution -> {estimate, ci, tost_ci, se, alpha, dist}:
    ci = the (1 - alpha) percentile interval (the two-sided test of difference != 0 at alpha),
    tost_ci = the (1 - 2 alpha) interval (two one-sided tests at alpha each: the equivalence test),
    se = the sample std of the bootstrap distribution (ddof=1). dist is an ndarray (not JSON)."""
    return {"estimate": float(estimate), "ci": percentile_ci(dist, 1 - alpha),
            "tost_ci": percentile_ci(dist, 1 - 2 * alpha), "se": float(dist.std(ddof=1)), "alpha": alpha,
            "dist": dist}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0, alpha: float = 0.05,
                     shared_problems: bool = False) -> dict:
    """Two-level paired bootstrap of D = mean(a) - mean(b), a and b arrays [seeds, problems] paired cell by
    cell. With d = a - b (the pairing: one difference per seed and problem), each replicate draws S seeds
    with replacement, then for each drawn seed P problems with replacement, and takes the mean of d over
    the S x P drawn cells: D* = 1/(S P) sum_i sum_j d[s*_i, p*_ij]. Both sides use the same seed and problem
    draws because the draws index d. Its variance is about (var_s(m) + mean_s(w) / P) / S, with m_s the
    seed means of d and w_s their within-seed variances (population form): seed noise plus problem noise.

    shared_problems=True draws one problem set per replicate for all its seeds (p*_ij = p*_j), the
    crossed design: the lab's seeds all see the same problems, so a problem's effect on d recurs in every
    seed, and the nested default (problems drawn afresh per seed) divides that variance by S P instead of
    P: narrower intervals. Shared is the honest choice for a claim about other problems of the same
    kind; nested is the two-level design as specified (and matches when d has no per-problem effect).

    Returns `summarize`: the estimate, the (1 - alpha) and (1 - 2 alpha) percentile CIs, the bootstrap SE
    and the distribution. Deterministic given seed (numpy default_rng)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be paired [seeds, problems] arrays, got {a.shape} and {b.shape}")
    d = a - b
    S, P = d.shape
    rng = np.random.default_rng(seed)
    dist = np.empty(n_boot)
    for start in range(0, n_boot, CHUNK):
        n = min(CHUNK, n_boot - start)
        s_idx = rng.integers(0, S, size=(n, S))
        p_idx = rng.integers(0, P, size=(n, 1 if shared_problems else S, P))
        dist[start:start + n] = d[s_idx[:, :, None], p_idx].mean(axis=(1, 2))
    return summarize(d.mean(), dist, alpha)


def seed_bootstrap(x: np.ndarray, y: np.ndarray, paired: bool = True, n_boot: int = 10000, seed: int = 0,
                   alpha: float = 0.05) -> dict:
    """One-level bootstrap of D = mean(x) - mean(y) for one scalar per seed (e.g. each run's entropy fall).
    paired=True: x[i] and y[i] share seed i; draw seeds with replacement and average d = x - y over them
    (variance about var(d) / n). paired=False: draw x's and y's seeds independently (variance about
    var(x) / n_x + var(y) / n_y), for two groups with no common seeds. Returns `summarize`."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    rng = np.random.default_rng(seed)
    if paired:
        if x.shape != y.shape:
            raise ValueError(f"paired needs one x and one y per seed, got {x.shape} and {y.shape}")
        d = x - y
        dist = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
        return summarize(d.mean(), dist, alpha)
    dist = (x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
            - y[rng.integers(0, len(y), size=(n_boot, len(y)))].mean(axis=1))
    return summarize(x.mean() - y.mean(), dist, alpha)


def bootstrap_p(dist: np.ndarray) -> float:
    """Two-sided bootstrap p-value for D != 0: p = 2 min(share(D* <= 0), share(D* >= 0)), clipped to
    [1/n_boot, 1]. It is the smallest alpha whose equal-tailed percentile CI just reaches 0, so p < alpha
    matches "the (1 - alpha) CI excludes 0" (up to quantile interpolation). 1/n_boot is the resolution:
    a p at the floor means "at most that", never 0."""
    dist = np.asarray(dist, dtype=float)
    p = 2 * min(np.mean(dist <= 0), np.mean(dist >= 0))
    return float(np.clip(p, 1 / len(dist), 1.0))


def tost_p(dist: np.ndarray, min_effect: float) -> float:
    """p-value of the equivalence test |D| < min_effect (TOST) from a bootstrap distribution: the larger
    of the one-sided p-values share(D* <= -min_effect) and share(D* >= +min_effect), clipped to
    [1/n_boot, 1]. p < alpha matches "the (1 - 2 alpha) CI lies inside (-min_effect, +min_effect)"."""
    dist = np.asarray(dist, dtype=float)
    p = max(np.mean(dist <= -min_effect), np.mean(dist >= min_effect))
    return float(np.clip(p, 1 / len(dist), 1.0))


def decide(ci: tuple[float, float], estimate: float, min_effect: float,
           tost_ci: tuple[float, float] | None = None) -> str:
    """One comparison's verdict from its CIs (`summarize`'s ci at 1 - alpha and tost_ci at 1 - 2 alpha):
      above       ci excludes 0 (lo > 0) and estimate >= +min_effect: a real difference large enough to count;
      below       ci excludes 0 (hi < 0) and estimate <= -min_effect;
      equivalent  tost_ci lies strictly inside (-min_effect, +min_effect): both one-sided tests
                  D <= -min_effect and D >= +min_effect rejected at alpha (TOST; at alpha = 0.05 the 90% CI).
                  This holds also when ci excludes 0: a real but negligible difference is equivalent;
      undecided   everything else, including ci excluding 0 with |estimate| < min_effect while tost_ci
                  reaches past a bound: statistically different but too small to count, and not shown
                  negligible either; and ci containing 0 while too wide to show equivalence.
    tost_ci=None uses ci for the equivalence test too: TOST at alpha / 2, stricter (never wrongly
    equivalent). min_effect > 0 is in the units of the estimate (accuracy: 0.02 = 2 points)."""
    if min_effect <= 0:
        raise ValueError("min_effect must be > 0: with no margin nothing can be shown equivalent")
    lo, hi = ci
    if lo > 0 and estimate >= min_effect:
        return "above"
    if hi < 0 and estimate <= -min_effect:
        return "below"
    elo, ehi = tost_ci if tost_ci is not None else ci
    if -min_effect < elo and ehi < min_effect:
        return "equivalent"
    return "undecided"


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni step-down at family-wise error rate alpha: sort the m p-values ascending,
    p_(1) <= ... <= p_(m); reject H_(k) while p_(k) <= alpha / (m - k + 1), stop at the first that fails
    (it and every larger one are kept). Returns rejected or not for each hypothesis, in input order.
    The thresholds grow with k, so equal p-values are all rejected or all kept, whatever their order."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    rejected = [False] * m
    for k, i in enumerate(np.argsort(p, kind="stable")):
        if p[i] > alpha / (m - k):
            break
        rejected[int(i)] = True
    return rejected
