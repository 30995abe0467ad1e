"""lab_report.py: every seed's value in results.md, one colour and one family per method, the 95% band, and the
figures' files, on a small results dict written by hand (two seeds each of SFT, GRPO, SFT then GRPO and NSR, NSR's
second seed failed; GRPO with pass@k)."""
import itertools
import json
import math
import os

import pytest

import lab
import lab_report as rep


def acc(a):
    """One evaluation's accuracies: levels 1-2 at a, levels 3-4 at a / 2, the strata from them."""
    return {"all": 0.75 * a, "1": a, "2": a, "3": a / 2, "4": a / 2, "reachable": a, "out_of_reach": a / 2,
            "moderate": a / 2, "needle": a / 4}


def run(seed, a, entropy):
    """A finished run of 4 steps: evaluations at 0, 2, 4 ending at acc(a), training entropy `entropy` at steps 1-4."""
    return {"seed": seed, "dir": f"runs/x-s{seed}", "status": "ok", "final_step": 4, "final": acc(a), "base": acc(0.2),
            "wrong_steps_final": 0.01 * seed, "evals": {"0": acc(0.2), "2": acc((0.2 + a) / 2), "4": acc(a)},
            "entropy_start": entropy[0], "entropy_final": entropy[-1], "response_length_final": 10.0 + seed,
            "generated_tokens": 12345.0 * (seed + 1), "demo_tokens": 50.0, "demo_tokens_at": {},
            "entropy_curve": [[s + 1, e] for s, e in enumerate(entropy)], "demo_probs": {},
            "probe": [[0, 0.0, 0.5, 0.3], [4, 0.1 + seed / 100, 0.4, 0.2 - seed / 100]], "wall_s": 10.0 + seed,
            "token_shift": {"base": 0.1, "demo": 0.3, "all": 0.2 + seed / 10}}


def method(name, runs, trainers):
    return {"label": rep.LABELS[name], "trainers": trainers, "runs": runs, "summary": lab.summarize_method(runs)}


@pytest.fixture
def res():
    passk = [{g: {"1": 0.5 + s / 10, "4": 0.8} for g in ("all", "reachable", "out_of_reach")} for s in (0, 1)]
    grpo = [dict(run(s, 0.8 + s / 10, [1.0, 0.8, 0.6, 0.4]), passk=passk[s]) for s in (0, 1)]
    failed = {"seed": 1, "dir": "runs/nsr-s1", "status": "failed", "failed": ["nsr-s1"], "why": "nsr-s1: failed",
              "logs": ["failures/nsr-s1.log"]}
    methods = {"sft": method("sft", [run(s, 0.9 - s / 5, [0.5] * 4) for s in (0, 1)], ["sft"]),
               "grpo": method("grpo", grpo, ["grpo"]),
               "sft_then_grpo": method("sft_then_grpo", [run(s, 0.95, [0.5, 0.5, 0.3, 0.2]) for s in (0, 1)],
                                       ["sft", "grpo"]),
               "nsr": method("nsr", [run(0, 0.7, [1.0, 0.9, 0.9, 0.8]), failed], ["nsr"])}
    methods["grpo"]["summary"]["passk"] = lab.passk_stats(passk)
    budget = {"steps": 4, "prompts": 16, "eval_every": 2, "eval_per_level": 10, "seeds": [0, 1], "model": "builtin"}
    return {"lab": {"command": "python lab.py --test", "date": "today", "commit": "abc", "jobs": 1, "threads": 2,
                    "wall_min": 1.0, "budget": budget,
                    "machine": {"cpu": "Test CPU", "cores": 2, "load_start": "0.1", "load_end": "0.2"}},
            "methods": methods, "missing": {"dft": "not selected with --methods"},
            "base": {k: lab.stats([v, v]) for k, v in acc(0.2).items()}, "verdicts": []}


def test_every_method_has_its_own_colour_and_one_family():
    assert set(rep.COLORS) == set(rep.LABELS) == set(lab.METHODS)
    assert sorted(m for members in rep.FAMILIES.values() for m in members) == sorted(lab.METHODS)  # each once
    assert set(rep.BASELINES) <= set(rep.FAMILIES["SFT-like"] + rep.FAMILIES["RL"])
    rgb = {m: [int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for m, c in {**rep.COLORS, "base": "#000000"}.items()}
    for a, b in itertools.combinations(rgb, 2):  # no colour shared, none a near copy (trainers and forks alike)
        assert math.dist(rgb[a], rgb[b]) > 0.2, (a, b)
    assert rep.BASE_COLOR == "black" and set(rep.label_colors()) == set(rep.LABELS.values()) | {"base model"}


def test_t_interval():
    assert (rep.t975(1), rep.t975(2), rep.t975(10)) == (12.706, 4.303, 2.228)
    for df, t in ((11, 2.2010), (20, 2.0860), (30, 2.0423), (1000, 1.9623)):  # the expansion past the table
        assert rep.t975(df) == pytest.approx(t, abs=2e-4)
    assert rep.t_interval(0.5, 0.1, 4) == pytest.approx((0.5 - 3.182 * 0.05, 0.5 + 3.182 * 0.05))
    assert rep.t_interval(0.5, None, 1) == (0.5, 0.5)


def rows_of(md, label):
    """The cells of results.md's per-seed rows of `label`, by seed, first table only."""
    part = md[md.index("## Every seed"):]
    head, lines = None, {}
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| method | seed"):
            if head:
                break
            head = cells
        elif line.startswith(f"| {label} |"):
            lines[cells[1]] = dict(zip(head, cells))
    return lines


def test_every_seed_is_listed_behind_each_mean(res):
    md = rep.results_markdown(res, ["a rule"])
    for name, m in res["methods"].items():
        rows = rows_of(md, m["label"])
        assert sorted(rows) == [str(r["seed"]) for r in m["runs"]], name
        for r in m["runs"]:
            row = rows[str(r["seed"])]
            if r["status"] != "ok":
                assert row["all levels"] == "failed: nsr-s1: failed"
                continue
            assert row["all levels"] == f"{r['final']['all']:.3f}" and row["level 3"] == f"{r['final']['3']:.3f}"
            assert row["out of reach (3-4)"] == f"{r['final']['out_of_reach']:.3f}"
            assert row["entropy"] == f"{r['entropy_final']:.3f}" and row["wall time (s)"] == f"{r['wall_s']:.0f}"
            assert row["generated tokens"] == f"{r['generated_tokens']:.0f}"  # every digit: the mean rounds them
    sft = rows_of(md, "SFT")
    assert [sft[s]["all levels"] for s in ("0", "1")] == ["0.675", "0.525"]  # 0.75 x 0.9 and 0.75 x 0.7
    assert "| SFT | 2/2 | 0.600 (0.525-0.675) |" in md  # the main table's mean of those two
    assert [sft[s]["generated tokens"] for s in ("0", "1")] == ["12345", "24690"]  # the main table: 19k (12k-25k)
    base = rows_of(md, "base model (step 0)")
    assert sorted(base) == ["0", "1"] and base["0"]["all levels"] == "0.150"
    # the stratum table's seeds: the probe's last KL and the token shift of each run; the base's KL 0
    strata = md[md.index("Levels 3-4 by stratum and the probe:"):]
    assert "| GRPO | 1 | 0.225 | 0.450 | 0.300 | 0.110 | 0.400 |" in strata
    assert "| base model (step 0) | 0 | 0.050 | 0.100 | 0.000 | 0.000 | 0.500 |" in strata
    assert "| GRPO | 1 | 0.600 / 0.600 | 0.800 / 0.800 |" in md  # pass@1, pass@4 per seed


def test_series_keep_rollout_entropy_apart_from_sft_steps(res):
    rollout = rep.series(res, "rollout_entropy")
    assert "SFT" not in rollout and rollout["GRPO"]["steps"] == [1, 2, 3, 4]
    assert rollout["SFT then GRPO"]["steps"] == [3, 4]  # the GRPO stage only
    assert rollout["NSR (fork)"]["lo"] == rollout["NSR (fork)"]["mean"]  # one finished seed: no band
    # a run whose records name their trainer (the done-right baseline switches where its validation loss is lowest,
    # not at half the steps): its SFT steps stay out whatever the step
    late = dict(res["methods"]["sft_then_grpo"]["runs"][0])
    late["entropy_curve"] = [[1, 0.5, "sft"], [2, 0.5, "sft"], [3, 0.5, "sft"], [4, 0.3, "grpo"]]
    one = {"lab": res["lab"], "methods": {"x": dict(res["methods"]["sft_then_grpo"], runs=[late])}}
    assert rep.series(one, "rollout_entropy")["SFT then GRPO"]["steps"] == [4]
    probe = rep.series(res, "probe_entropy")
    assert probe["SFT"]["steps"] == [0, 4] and probe["SFT"]["mean"] == pytest.approx([0.3, 0.195])
    # 0.2 and 0.19: mean 0.195, std 0.00707, t(1) = 12.706: half-width 12.706 x 0.00707 / sqrt(2) = 0.0635
    assert probe["SFT"]["hi"][1] == pytest.approx(0.195 + 0.0635, abs=1e-4)


def test_figures_write_the_expected_files(res, tmp_path):
    pytest.importorskip("matplotlib")
    paths = rep.figures(res, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["accuracy.png", "accuracy_strata.png", "entropy.png", "passk.png",
                                                    "dynamics.png"]  # no prior measured: no regimes.png
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_results_without_matplotlib(res, tmp_path, monkeypatch):
    def no_matplotlib(*_):
        raise ImportError("matplotlib")

    monkeypatch.setattr(rep, "figures", no_matplotlib)
    said = []
    rep.write_results(res, str(tmp_path), ["a rule"], say=said.append)
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]
    assert "matplotlib is not installed" in said[0] and "- a rule" in (tmp_path / "results.md").read_text()


def test_lr_table_names_the_best_rate_on_the_validation_split():
    def method(key, val, held):
        return {"label": rep.LABELS[key], "runs": [], "summary": {"val_score": {"mean": val, "min": val, "max": val},
                                                                 "final": {"all": {"mean": held, "min": held,
                                                                                   "max": held}}}}
    res = {"methods": {"sft": method("sft", 0.60, 0.9), "sft_lr1e-3": method("sft_lr1e-3", 0.70, 0.5),
                       "grpo": method("grpo", 0.5, 0.5)}}
    lines = rep.lr_table(res)
    assert "| SFT (default) | 0.600 | 0.900 |  |" in lines and "| SFT lr 1e-3 | 0.700 | 0.500 | **best** |" in lines
    assert not any("GRPO" in x for x in lines)  # one rate of GRPO: nothing to choose between


def test_results_json_is_compact_and_the_same_data(tmp_path):
    """Lists of numbers go on one line; a string that looks like a list (a verdict's interval) stays as it is."""
    res = {"lab": {}, "methods": {}, "verdicts": [{"measured": "difference -14,136 [-16,937, -12,677]"}],
           "problems": [[1, 2, 3], [0.5, -1e-05]], "empty": []}
    text = rep.compact_json(res)
    assert json.loads(text) == res and "[1, 2, 3]" in text and "[-16,937, -12,677]" in text
