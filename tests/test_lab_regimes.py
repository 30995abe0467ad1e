"""lab_regimes.py: the token shift, the probe's paths, the base's prior and the regime claims (10-13) on
hand-made numbers, every expected value worked out in a comment."""
import json
import math

import pytest

import lab
import lab_regimes


def probe(*items):
    return {"items": [{"kind": k, "group": g, "base_logp": [math.log(p) for p in ps]} for k, g, ps in items]}


def test_token_shift_counts_tokens_moved_by_more_than_the_threshold(tmp_path):
    # base p: base response (0.9, 0.5), demonstration (0.01, 0.99); final p: (0.9, 0.65) -> one of two moved (0.15 >
    # 0.1); (0.08, 0.99) -> none moved (0.07 < 0.1): base 1/2, demo 0/2, all 1/4
    pr = probe(("base", "moderate", [0.9, 0.5]), ("demo", "moderate", [0.01, 0.99]))
    lines = [{"step": 0, "logp": [[math.log(0.9), math.log(0.5)], [math.log(0.01), math.log(0.99)]]},
             {"step": 8, "logp": [[math.log(0.9), math.log(0.65)], [math.log(0.08), math.log(0.99)]]}]
    (tmp_path / "probe.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert lab_regimes.token_shift(str(tmp_path), pr) == {"base": 0.5, "demo": 0.0, "all": 0.25, "step": 8}
    assert lab_regimes.token_shift(str(tmp_path), pr, step=0)["all"] == 0.0
    assert lab_regimes.token_shift(str(tmp_path / "none"), pr) is None


def test_probe_series_and_demo_probabilities_from_metrics():
    records = [{"step": 0, "probe_kl_base": 0.0, "probe_demo_nll": 0.5, "probe_entropy": 0.2,
                "demo_min_p_builtin_stratum_needle": 1e-4, "demo_key_logp_builtin_stratum_needle": -6.0,
                "demo_min_p_builtin": 0.3, "demo_low_p_share_builtin_level1": 0.0},
               {"step": 1, "loss": 1.0}, {"step": 4, "probe_kl_base": 0.1, "probe_demo_nll": 0.3, "probe_entropy": 0.1}]
    assert lab_regimes.probe_series(records) == [[0, 0.0, 0.5, 0.2], [4, 0.1, 0.3, 0.1]]
    assert lab_regimes.demo_probs(records) == {"0": {"stratum_needle": {"min_p": 1e-4, "key_logp": -6.0},
                                                     "level1": {"low_p_share": 0.0}}}


def run(seed, final, probe_path, shift, evals, prior=None):
    return {"seed": seed, "status": "ok", "final": final, "token_shift": shift, "probe": probe_path, "evals": evals,
            "demo_probs": {"0": {f"stratum_{s}": {"min_p": p} for s, p in (prior or {}).items()}}}


def method(name, runs):
    return {"label": lab.LABELS[name], "runs": runs, "summary": lab.summarize_method(
        [dict(r, entropy_start=None, entropy_final=None, response_length_final=None, wrong_steps_final=None,
              generated_tokens=None, demo_tokens=None, wall_s=None, base=None) for r in runs])}


def test_base_prior_from_the_step_0_demonstration_probabilities():
    """The base's prior per stratum (the regime's x-axis) from the runs' step-0 demo probabilities (claims 10-13
    are tested in tests/test_lab_claims.py)."""
    prior = {"needle": 1e-4, "weak": 0.15, "moderate": 0.4}
    acc = lambda mod, ndl, allv=0.5: {"moderate": mod, "needle": ndl, "weak": 0.3, "all": allv}  # noqa: E731
    path = lambda kl, ent=(0.2, 0.2, 0.2): [[0, 0.0, 0.5, ent[0]], [40, kl / 2, 0.4, ent[1]], [44, kl, 0.3, ent[2]],  # noqa
                                            [80, kl, 0.3, ent[2]]]
    evals = lambda a40, a60: {"0": {"all": 0.2}, "40": {"all": a40}, "60": {"all": a60}}  # noqa: E731
    res = {"lab": {"budget": {"steps": 80}}, "base": {k: {"mean": v, "min": v, "max": v, "range": 0, "n": 2}
                                                      for k, v in {"moderate": 0.1, "needle": 0.0, "weak": 0.0}.items()},
           "methods": {
               "sft": method("sft", [run(s, acc(0.8, 0.6), path(0.5, (0.2, 0.21, 0.2)), {"all": 0.6, "base": 0.5,
                                                                                           "demo": 0.7},
                                         evals(0.5, 0.6), prior) for s in (0, 1)]),
               "grpo": method("grpo", [run(s, acc(0.7, 0.0), path(0.05), {"all": 0.01, "base": 0.01, "demo": 0.01},
                                           evals(0.4, 0.45), prior) for s in (0, 1)]),
               "luffy": method("luffy", [run(s, acc(0.75, 0.01), path(0.06), {"all": 0.02, "base": 0.02, "demo": 0.02},
                                             evals(0.4, 0.45)) for s in (0, 1)]),
               "bread": method("bread", [run(s, acc(0.1, 0.0), path(0.06), {"all": 0.02, "base": 0.02, "demo": 0.02},
                                             evals(0.4, 0.45)) for s in (0, 1)]),
               "sft_then_grpo": method("sft_then_grpo", [run(s, acc(0.9, 0.6, 0.7), path(0.3), None,
                                                             evals(0.5, 0.7)) for s in (0, 1)]),
               "srft": method("srft", [run(s, acc(0.8, 0.5), path(0.2), None, evals(0.5, 0.6)) for s in (0, 1)]),
               "grpo_then_sft": method("grpo_then_sft", [run(s, acc(0.8, 0.5), path(0.4, (0.2, 0.2, 0.3)), None,
                                                             evals(0.5, 0.4)) for s in (0, 1)])}}
    assert lab_regimes.base_prior(res) == pytest.approx(prior)
