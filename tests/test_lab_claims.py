"""lab_claims.py: the claims' statistics on results built by hand, where the right verdict is known: a clear
difference, an exact tie (equivalent), right answers for wrong reasons (the right-steps score), the k where two
pass@k curves cross, BREAD's tokens to a target, and a lab without per-problem counts."""
import numpy as np
import pytest

import lab_claims

GROUPS = [["level1"]] * 10 + [["level2"]] * 10 + [["level3", "stratum_moderate"]] * 5 + \
    [["level3", "stratum_needle"]] * 5 + [["level4", "stratum_needle"]] * 5 + [["level4", "stratum_weak"]] * 5
K, STEPS = 4, [0, 10, 20, 30]


def shares(reach, moderate, needle, weak, rng, noise=0.0):
    """Per problem (in GROUPS' order) a share of right samples, rounded to the K samples, with seeded noise."""
    by = {"level1": reach, "level2": reach, "stratum_moderate": moderate, "stratum_needle": needle,
          "stratum_weak": weak}
    x = np.array([by[g[-1]] for g in GROUPS]) + noise * rng.standard_normal(len(GROUPS))
    return np.clip(np.round(x * K), 0, K).astype(int).tolist()


def run(seed, final, base=(0.5, 0.1, 0.0, 0.0), noise=0.0, right=None, **extra):
    """A finished run: evaluations at STEPS, the base's at step 0, `final` (reach, moderate, needle, weak) after;
    `right`: the right-steps shares where they differ from the right answers'."""
    rng = np.random.default_rng(seed)
    correct = [shares(*base, rng)] + [shares(*final, rng, noise) for _ in STEPS[1:]]
    rights = correct if right is None else [shares(*base, rng)] + [shares(*right, rng, noise) for _ in STEPS[1:]]
    return {"seed": seed, "status": "ok", "problems": {"k": K, "steps": STEPS, "correct": correct, "right": rights},
            **extra}


def results(methods, seeds=range(5), **more):
    return {"problem_groups": GROUPS, "lab": {"budget": {"steps": 30, "eval_every": 10}},
            "methods": {m: {"label": m.upper(), "runs": [f(s) for s in seeds]} for m, f in methods.items()}, **more}


def test_a_clear_difference_is_above_and_an_exact_tie_is_equivalent():
    e = lab_claims.Evidence(results({"a": lambda s: run(s, (0.9, 0.5, 0.0, 0.3), noise=0.1),
                                     "b": lambda s: run(s, (0.5, 0.5, 0.0, 0.3), noise=0.1)}))
    c = lab_claims.paired(e.scores("a", "reachable"), e.scores("b", "reachable"), 0.03)
    assert c["n"] == 5 and c["estimate"] == pytest.approx(0.4, abs=0.05) and c["ci"][0] > 0.3
    same = lab_claims.paired(e.scores("a", "needle"), e.scores("b", "needle"), 0.03)  # both 0 everywhere
    assert same["estimate"] == 0 and same["ci"] == (0.0, 0.0)
    assert lab_claims.sides({"x": c, "y": same}) == {"x": "above", "y": "equivalent"}
    few = lab_claims.paired({0: np.ones(3)}, {0: np.zeros(3)}, 0.03)
    assert lab_claims.sides({"z": few}) == {"z": "too few seeds"}
    verdict, text = lab_claims.judge({"x": c, "y": same}, {"x": "above", "y": "not above"})
    assert verdict == "agrees" and "x: 0.9" in text and "(above;" in text
    verdict, _ = lab_claims.judge({"x": c, "y": same}, {"x": "below", "y": "not below"})
    assert verdict == "mixed: agrees for y; disagrees for x"


def test_claim_1_scores_right_steps_not_right_answers():
    """GRPO answers the needle right half the time through a wrong line (5*5 read off 5*4=25): right answers 0.5,
    right steps 0; the base 0. By right steps GRPO does not move the needle: claim 1 agrees."""
    res = results({"grpo": lambda s: run(s, (1.0, 0.5, 0.5, 0.3), right=(1.0, 0.5, 0.0, 0.3), noise=0.05)})
    v = {x["claim"]: x for x in lab_claims.verdicts(res)}
    assert v[1]["verdict"] == "agrees" and "needle, GRPO vs base: 0.00" in v[1]["measured"]
    assert "(equivalent;" in v[1]["measured"].split("needle")[1]
    e = lab_claims.Evidence(res)
    by_answer = lab_claims.paired(e.scores("grpo", "needle", right=False), e.base("needle", right=False), 0.03)
    assert lab_claims.sides({"x": by_answer}) == {"x": "above"}  # what the answer-only score would have said


def test_claim_14_the_done_right_baseline_against_every_single_stage_method():
    good = (0.95, 0.9, 0.9, 0.9)
    res = results({"sft_then_grpo_vmin": lambda s: run(s, good, noise=0.05),
                   "sft": lambda s: run(s, good, noise=0.05),  # the same scores (other noise): equivalent
                   "grpo": lambda s: run(s, (0.95, 0.5, 0.0, 0.9), noise=0.05),  # below it: it beats GRPO
                   "srft": lambda s: run(s, (1.0, 1.0, 1.0, 1.0))})  # above it: SRFT beats the baseline
    verdict, text = lab_claims.claim_14(lab_claims.Evidence(res))
    assert verdict == "mixed: agrees for SFT then GRPO (val. min) vs GRPO; agrees for SFT then GRPO (val. min) vs " \
                      "SFT; disagrees for SFT then GRPO (val. min) vs SRFT"
    assert "(equivalent;" in text and "(below;" in text


def passk_counts(c):
    return {"n": 8, "correct": c}


def test_claim_7_pass_at_k_and_where_the_curves_cross():
    """The base solves every problem once in 8 samples: pass@k = k / 8. GRPO solves half the problems always and
    the other half never: pass@k = 1/2 at every k. The curves cross where k / 8 = 1/2: k = 4; GRPO's pass@8 (0.5)
    is below the base's (1.0): no higher, claim 7 agrees."""
    n = len(GROUPS)
    res = results({"grpo": lambda s: dict(run(s, (1, 1, 0, 0)), passk_counts=passk_counts([8, 0] * (n // 2)))},
                  base_passk_counts={str(s): passk_counts([1] * n) for s in range(5)})
    e = lab_claims.Evidence(res)
    assert lab_claims.passk_scores(e, "base", 4)[0] == pytest.approx(np.full(n, 0.5))
    assert lab_claims.crossing(e, "grpo", "base", [1, 2, 4, 8]).startswith("curves cross at k = 4.0 [")
    verdict, text = lab_claims.claim_7(e)
    assert verdict == "agrees" and "pass@8, GRPO vs base: 0.500 vs 1.000" in text and "(below;" in text


def test_claim_6_tokens_to_a_target_grpo_does_not_reach():
    """GRPO scores 0.5 on all levels by right steps in four seeds and 1.0 in the fifth: its mean is 0.6, the target
    0.63 (a best-seed target, 1.03, could be reached by nobody, and would grow with the seeds). SFT reaches it at
    step 10 with 1000 demo tokens; BREAD at step 20 with 300; LUFFY never: BREAD agrees against both."""
    at = {"0": 0, "10": 1000, "20": 2000, "30": 3000}
    res = results({"grpo": lambda s: run(s, (1, 1, 1, 1) if s == 4 else (0.5, 0.5, 0.5, 0.5)),
                   "sft": lambda s: run(s, (1, 1, 1, 1), demo_tokens_at=at),
                   "bread": lambda s: run(s, (1, 1, 1, 1), demo_tokens_at={"0": 0, "10": 300, "20": 300, "30": 500}),
                   "luffy": lambda s: run(s, (0.4, 0.4, 0.4, 0.4), demo_tokens_at=at)})
    assert lab_claims.tokens_to(res["methods"]["sft"]["runs"][0], 0.63) == 1000
    assert lab_claims.tokens_to(res["methods"]["luffy"]["runs"][0], 0.63) == float("inf")
    verdict, text = lab_claims.claim_6(lab_claims.Evidence(res))
    assert verdict == "agrees" and "target 0.630 (GRPO's mean score" in text and "LUFFY reaches it in 0 of 5" in text


def test_claim_15_the_prior_decides_which_sft_loss_wins():
    """SFT (NLL) learns the needle (0.5), DFT leaves it at 0; on the moderate stratum both reach 0.9: NLL above
    on the needle and DFT equivalent on the moderate agree; DFT ahead on the needle disagrees there."""
    res = results({"sft": lambda s: run(s, (1, 0.9, 0.5, 0.5)), "dft": lambda s: run(s, (1, 0.9, 0.0, 0.5))})
    verdict, text = lab_claims.claim_15(lab_claims.Evidence(res))
    assert verdict == "agrees" and "needle, SFT vs DFT: 0.500 vs 0.000" in text and "(equivalent;" in text
    res = results({"sft": lambda s: run(s, (1, 0.9, 0.0, 0.5)), "dft": lambda s: run(s, (1, 0.9, 0.5, 0.5))})
    verdict, _ = lab_claims.claim_15(lab_claims.Evidence(res))
    assert verdict == "mixed: agrees for moderate, DFT vs SFT; disagrees for needle, SFT vs DFT"


def test_a_lab_without_per_problem_counts_cannot_tell():
    v = lab_claims.verdicts({"methods": {}})
    assert len(v) == len(lab_claims.CLAIMS) and {x["verdict"] for x in v} == {"cannot tell"}
    assert "rerun" in v[0]["measured"]


def test_a_run_without_right_steps_counts_is_left_out_not_scored_by_its_answers():
    res = results({"grpo": lambda s: run(s, (1, 1, 1, 1))})
    for r in res["methods"]["grpo"]["runs"][:2]:
        r["problems"]["right"] = None  # e.g. a set of another task's problems: no worked steps to check
    e = lab_claims.Evidence(res)
    assert sorted(e.scores("grpo")) == [2, 3, 4] and sorted(e.scores("grpo", right=False)) == [0, 1, 2, 3, 4]
    assert sorted(e.base()) == [2, 3, 4]


def test_convergence_reads_flat_and_rising():
    """A run equal at its last three evaluations is flat; one whose shares go from 2 to 3 of 4 samples (0.5 to 0.8,
    rounded to the 4 samples) from step 10 to step 30 is rising by 0.25."""
    def rising(s):
        r = run(s, (0.5, 0.5, 0.5, 0.5))
        r["problems"]["right"][3] = shares(0.8, 0.8, 0.8, 0.8, np.random.default_rng(s))
        return r
    res = results({"flat": lambda s: run(s, (0.9, 0.5, 0.0, 0.3)), "up": rising})
    got = {c["method"]: c for c in lab_claims.convergence(res)}
    assert got["flat"]["reading"] == "flat" and got["flat"]["estimate"] == 0 and (got["flat"]["from"],
                                                                                  got["flat"]["to"]) == (10, 30)
    assert got["up"]["reading"] == "rising" and got["up"]["estimate"] == pytest.approx(0.25)


def test_curves_that_never_cross_say_so_with_a_finite_interval():
    """GRPO solves every problem, the base one sample in 8: at k = 1, 2, 4 GRPO is above (1 against k / 8), so the
    crossing (k = 8, where both reach 1) lies beyond the largest k measured, and so does its interval."""
    n = len(GROUPS)
    res = results({"grpo": lambda s: dict(run(s, (1, 1, 0, 0)), passk_counts=passk_counts([8] * n))},
                  base_passk_counts={str(s): passk_counts([1] * n) for s in range(5)})
    assert lab_claims.crossing(lab_claims.Evidence(res), "grpo", "base", [1, 2, 4]) == \
        "curves cross at k = beyond 4 [beyond 4, beyond 4]"
    both = lab_claims.crossing(lab_claims.Evidence(res), "grpo", "base", [1, 2, 4, 8])
    assert both.startswith("curves cross at k = 8.0")  # both reach 1 at k = 8
    c = lab_claims.paired({0: 500.0, 1: 600.0}, {0: 15000.0, 1: 14000.0}, 0.2, relative=True)
    assert lab_claims.describe(c, "below").startswith("550 vs 14,500, difference -13,950 [")
