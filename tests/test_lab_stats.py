"""lab_stats: run scores, the paired two-level bootstrap against hand-computable cases and a plain variance
formula, the one-level seed bootstrap, bootstrap and TOST p-values, decide on constructed CIs, and Holm on
a worked example. numpy only; n_boot 2000 keeps the file well under a second or two."""
import numpy as np
import pytest

import lab_stats as ls

N = 2000


def test_run_score_last_three_by_step():
    # evaluations out of order; the last three by step are 40, 60, 80 (step 0 and 20 are left out)
    evals = [(80, [1.0, 0.5]), (0, [0.0, 0.0]), (40, [0.5, 0.25]), (20, [9.0, 9.0]), (60, [0.0, 0.75])]
    # problem 0: (0.5 + 0 + 1) / 3 = 0.5;  problem 1: (0.25 + 0.75 + 0.5) / 3 = 0.5
    np.testing.assert_allclose(ls.problem_scores(evals), [0.5, 0.5])
    assert ls.run_score(evals) == pytest.approx(0.5)
    # fewer evaluations than three: all of them
    assert ls.run_score([(0, [0.0, 1.0]), (10, [1.0, 1.0])]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        ls.problem_scores([(0, [0.0, 1.0]), (10, [1.0])])  # a problem missing at one step
    with pytest.raises(ValueError):
        ls.problem_scores([])


def test_identical_sides_give_zero_and_a_point_ci():
    rng = np.random.default_rng(1)
    a = rng.random((3, 50))
    for shared in (False, True):
        e = ls.paired_bootstrap(a, a.copy(), n_boot=N, shared_problems=shared)
        assert e["estimate"] == 0.0 and e["ci"] == (0.0, 0.0) and e["tost_ci"] == (0.0, 0.0) and e["se"] == 0.0
        assert ls.bootstrap_p(e["dist"]) == 1.0


def test_constant_shift_gives_the_shift_and_a_point_ci():
    rng = np.random.default_rng(2)
    b = rng.random((3, 40)) * 0.5
    a = b + 0.25  # every paired difference 0.25 (up to float rounding)
    e = ls.paired_bootstrap(a, b, n_boot=N)
    assert e["estimate"] == pytest.approx(0.25)
    assert e["ci"] == pytest.approx((0.25, 0.25)) and e["se"] == pytest.approx(0.0, abs=1e-12)
    assert ls.bootstrap_p(e["dist"]) == 1 / N  # every replicate > 0: p at its floor 1/n_boot
    # the pairing matters: unpaired, the same numbers would vary; paired, each cell's difference is 0.25
    assert ls.decide(e["ci"], e["estimate"], 0.1, e["tost_ci"]) == "above"
    ci, est, tost_ci = _flip(e)
    assert ls.decide(ci, est, 0.1, tost_ci) == "below"


def _flip(e):
    """b - a from a - b: negate the estimate and the CIs."""
    return (-e["ci"][1], -e["ci"][0]), -e["estimate"], (-e["tost_ci"][1], -e["tost_ci"][0])


def test_paired_bootstrap_matches_the_variance_formula():
    # d = seed effect + per-cell noise, many seeds and problems so the percentile CI is close to normal.
    # The nested bootstrap's variance: (var_s(m) + mean_s(w) / P) / S, m_s = row means, w_s = row variances
    # (population form, ddof 0: the bootstrap draws from the sample as it is).
    rng = np.random.default_rng(3)
    S, P = 30, 200
    b = rng.random((S, P))
    a = b + rng.normal(0.05, 0.02, size=(S, 1)) + rng.normal(0, 0.3, size=(S, P))
    d = a - b
    se = np.sqrt((d.mean(1).var() + d.var(1).mean() / P) / S)
    e = ls.paired_bootstrap(a, b, n_boot=N, seed=0)
    assert e["estimate"] == pytest.approx(d.mean())
    assert e["se"] == pytest.approx(se, rel=0.1)
    width = e["ci"][1] - e["ci"][0]
    assert width == pytest.approx(2 * 1.96 * se, rel=0.15)
    tost_width = e["tost_ci"][1] - e["tost_ci"][0]  # the 90% interval: 2 * 1.645 SE
    assert tost_width == pytest.approx(2 * 1.645 * se, rel=0.15)
    assert e["ci"][0] < e["tost_ci"][0] < e["estimate"] < e["tost_ci"][1] < e["ci"][1]


def test_shared_problems_keep_a_problem_effect_across_seeds():
    # d depends on the problem only (the same in every seed): the nested draw averages S P independent
    # problem draws, SE = sd(u) / sqrt(S P); the shared draw averages P of them, SE = sd(u) / sqrt(P).
    rng = np.random.default_rng(4)
    S, P = 4, 400
    u = rng.choice([-1.0, 1.0], size=P)
    a, b = np.tile(u, (S, 1)), np.zeros((S, P))
    nested = ls.paired_bootstrap(a, b, n_boot=N)
    shared = ls.paired_bootstrap(a, b, n_boot=N, shared_problems=True)
    assert nested["se"] == pytest.approx(u.std() / np.sqrt(S * P), rel=0.1)
    assert shared["se"] == pytest.approx(u.std() / np.sqrt(P), rel=0.1)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    a, b = rng.random((3, 30)), rng.random((3, 30))
    e1, e2 = ls.paired_bootstrap(a, b, n_boot=N, seed=7), ls.paired_bootstrap(a, b, n_boot=N, seed=7)
    np.testing.assert_array_equal(e1["dist"], e2["dist"])
    assert e1["ci"] == e2["ci"] and e1["se"] == e2["se"]
    e3 = ls.paired_bootstrap(a, b, n_boot=N, seed=8)
    assert not np.array_equal(e1["dist"], e3["dist"])
    # the chunked draw gives n_boot replicates whatever n_boot is relative to the chunk
    assert len(ls.paired_bootstrap(a, b, n_boot=ls.CHUNK + 3)["dist"]) == ls.CHUNK + 3
    s1, s2 = ls.seed_bootstrap(a[:, 0], b[:, 0], n_boot=N, seed=7), ls.seed_bootstrap(a[:, 0], b[:, 0], n_boot=N, seed=7)
    np.testing.assert_array_equal(s1["dist"], s2["dist"])


def test_paired_bootstrap_rejects_unpaired_shapes():
    with pytest.raises(ValueError):
        ls.paired_bootstrap(np.zeros((3, 10)), np.zeros((2, 10)))
    with pytest.raises(ValueError):
        ls.paired_bootstrap(np.zeros(10), np.zeros(10))


def test_seed_bootstrap_paired_and_unpaired():
    # a constant per-seed shift: paired CI is the point; unpaired, the seed-to-seed spread shows
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = x - 0.5
    p = ls.seed_bootstrap(x, y, paired=True, n_boot=N)
    assert p["estimate"] == pytest.approx(0.5) and p["ci"] == pytest.approx((0.5, 0.5))
    u = ls.seed_bootstrap(x, y, paired=False, n_boot=N)
    assert u["estimate"] == pytest.approx(0.5) and u["ci"][0] < 0 < u["ci"][1]
    # variance formulas on a large sample: paired var(d) / n, unpaired var(x) / n + var(y) / n (ddof 0)
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, 400)
    y = 0.8 * x + rng.normal(0, 0.5, 400)
    p = ls.seed_bootstrap(x, y, paired=True, n_boot=N)
    assert p["se"] == pytest.approx(np.sqrt((x - y).var() / 400), rel=0.1)
    u = ls.seed_bootstrap(x, y[:300], paired=False, n_boot=N)
    assert u["se"] == pytest.approx(np.sqrt(x.var() / 400 + y[:300].var() / 300), rel=0.1)
    with pytest.raises(ValueError):
        ls.seed_bootstrap(x, y[:300], paired=True)


def test_bootstrap_p():
    # 2 min(share <= 0, share >= 0): 3 of 10 replicates <= 0 (the 0 counts on both sides), 8 of 10 >= 0
    dist = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert ls.bootstrap_p(dist) == pytest.approx(0.6)
    assert ls.bootstrap_p(-dist) == pytest.approx(0.6)  # symmetric in the sign
    assert ls.bootstrap_p(np.arange(1.0, 11.0)) == pytest.approx(0.1)  # none <= 0: the floor 1/n
    assert ls.bootstrap_p(np.zeros(10)) == 1.0  # all 0: 2 min(1, 1) = 2, clipped to 1
    # consistent with the CI: a CI excluding 0 at alpha has p < alpha
    rng = np.random.default_rng(8)
    a = rng.random((5, 100))
    e = ls.paired_bootstrap(a + 0.03 + rng.normal(0, 0.1, (5, 100)), a, n_boot=N)
    assert e["ci"][0] > 0 and ls.bootstrap_p(e["dist"]) < 0.05


def test_tost_p():
    # min_effect 0.1: share <= -0.1 is 1/10, share >= 0.1 is 2/10 -> p = max = 0.2
    dist = np.array([-0.1, -0.05, 0.0, 0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2])
    assert ls.tost_p(dist, 0.1) == pytest.approx(0.2)
    assert ls.tost_p(np.zeros(10), 0.1) == pytest.approx(0.1)  # both shares 0: the floor 1/n


def test_decide_on_constructed_cis():
    m = 0.02
    # CI excludes 0 and the estimate clears the minimum effect
    assert ls.decide((0.03, 0.09), 0.06, m) == "above"
    assert ls.decide((-0.09, -0.03), -0.06, m) == "below"
    # CI excludes 0 but the effect is below the minimum and the CI reaches past +m: undecided
    # (statistically different but too small to count, and not shown negligible)
    assert ls.decide((0.002, 0.03), 0.015, m, (0.004, 0.027)) == "undecided"
    # the 90% CI inside (-m, m): equivalent, though the 95% CI reaches past +m (TOST uses the 90% CI)
    assert ls.decide((-0.012, 0.021), 0.004, m, (-0.009, 0.018)) == "equivalent"
    # ... but without a tost_ci the 95% CI is used for equivalence too: stricter, undecided here
    assert ls.decide((-0.012, 0.021), 0.004, m) == "undecided"
    # a real but negligible difference (CI excludes 0, 90% CI inside the bounds): equivalent
    assert ls.decide((0.002, 0.012), 0.007, m, (0.003, 0.011)) == "equivalent"
    # the bounds are strict: a 90% CI touching +m is not inside
    assert ls.decide((-0.01, 0.025), 0.005, m, (-0.005, 0.02)) == "undecided"
    # CI contains 0 and is wide: undecided
    assert ls.decide((-0.05, 0.08), 0.015, m, (-0.04, 0.07)) == "undecided"
    # estimate exactly at the minimum effect counts
    assert ls.decide((0.01, 0.03), 0.02, m) == "above"
    with pytest.raises(ValueError):
        ls.decide((0.01, 0.03), 0.02, 0.0)


def test_holm_worked_example():
    # p = [0.01, 0.04, 0.03, 0.005], m = 4, alpha = 0.05. Sorted: 0.005 (H4), 0.01 (H1), 0.03 (H3), 0.04 (H2).
    #   k=1: 0.005 <= 0.05/4 = 0.0125   reject H4
    #   k=2: 0.01  <= 0.05/3 = 0.0167   reject H1
    #   k=3: 0.03  >  0.05/2 = 0.025    stop: keep H3 and H2 (H2's 0.04 <= 0.05/1 is never reached)
    assert ls.holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    # Bonferroni (0.0125 each) would reject only H4: Holm is uniformly more powerful
    # every threshold met: all rejected; the largest at alpha itself (<=)
    assert ls.holm([0.01, 0.05, 0.02]) == [True, True, True]
    # the smallest fails alpha / m: nothing, although 0.02 <= 0.05 / 2 on its own
    assert ls.holm([0.02, 0.02, 0.04]) == [False, False, False]
    # ties pass together: thresholds 0.025 then 0.05
    assert ls.holm([0.02, 0.02]) == [True, True]
    assert ls.holm([0.3], alpha=0.5) == [True]
    assert ls.holm([]) == []
