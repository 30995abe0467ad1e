"""lab.py: the scheduler (reuse, resume, failures) with a stand-in trainer, the collector, table, figure
series and verdicts on a fabricated set of runs with hand-computed numbers, and one small end-to-end run
through the real trainers. The full `python lab.py --quick` (about 5 minutes on 2 cores) runs only with
LAB_E2E=1: `LAB_E2E=1 python -m pytest -q tests/test_lab.py -k quick`."""
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

import lab
import lab_claims
import lab_jobs
import lab_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# =============================================================================================
# The scheduler, with a stand-in trainer (no torch: milliseconds)
# =============================================================================================

FAKE = r'''
import json, os, sys
a = sys.argv[1:]
out, steps, seed = a[a.index("--output_dir") + 1], int(a[a.index("--max_steps") + 1]), a[a.index("--seed") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "calls.txt"), "a") as f:
    f.write(json.dumps({"resume": "--resume" in a, "omp": os.environ["OMP_NUM_THREADS"]}) + "\n")
if seed == "13":
    print("step 1 ... RuntimeError: something broke")
    sys.exit(3)
with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    for s in range(steps + 1):
        f.write(json.dumps({"step": s, "loss": 0.0}) + "\n")
os.makedirs(os.path.join(out, f"checkpoint-{steps:06d}"), exist_ok=True)
'''


def calls(job):
    with open(os.path.join(job.out, "calls.txt")) as f:
        return [json.loads(line) for line in f]


def test_run_jobs_reuses_resumes_and_reports_failures(tmp_path, monkeypatch):
    (tmp_path / "fake.py").write_text(FAKE)
    monkeypatch.setattr(lab_jobs, "ROOT", str(tmp_path))
    res = str(tmp_path / "res")

    def job(name, seed, after=None, steps=2):
        out = os.path.join(res, "runs", name)
        return lab_jobs.Job(name, "fake.py", ["--seed", str(seed), "--output_dir", out, "--max_steps", str(steps)],
                            out, steps, after)

    jobs = [job("a", 0), job("a2", 0, after="a"), job("b", 13), job("b2", 0, after="b")]
    said = []
    status = lab_jobs.run_jobs(jobs, res, n_jobs=2, threads=3, say=said.append)
    assert status == {"a": "done", "a2": "done", "b": "failed", "b2": "blocked"}
    assert calls(jobs[0]) == [{"resume": False, "omp": "3"}]
    failure = (tmp_path / "res" / "failures" / "b.log").read_text()
    assert "exit code 3" in failure and "something broke" in failure  # the tail of the trainer's log
    assert not os.path.exists(jobs[3].out)  # a blocked second stage never started
    assert any("failed b" in s and "failures/b.log" in s for s in said)

    # A rerun reuses the finished runs and resumes the failed one (same command: --resume)
    status = lab_jobs.run_jobs(jobs, res, n_jobs=1, threads=2, say=said.append)
    assert status == {"a": "reused", "a2": "reused", "b": "failed", "b2": "blocked"}
    assert len(calls(jobs[0])) == 1 and calls(jobs[2])[-1] == {"resume": True, "omp": "2"}
    state = lab_jobs.job_state(jobs[2])
    assert [x["returncode"] for x in state["attempts"]] == [3, 3] and "--resume" in state["attempts"][1]["command"]

    # An unfinished run with the same command is resumed; a changed command starts afresh, and the
    # second stage of a first stage that ran again starts afresh too
    os.rmdir(os.path.join(jobs[1].out, "checkpoint-000002"))
    jobs[0] = job("a", 0, steps=3)
    status = lab_jobs.run_jobs(jobs[:2], res, n_jobs=1, threads=1, say=said.append)
    assert status == {"a": "done", "a2": "done"}
    assert calls(jobs[0]) == [{"resume": False, "omp": "1"}]  # the old directory was deleted
    assert calls(jobs[1]) == [{"resume": False, "omp": "1"}]  # fresh, not --resume, after its first stage re-ran
    # ... also when the lab stopped between the stages: a finished second stage of an older first stage
    jobs[0] = job("a", 0, steps=4)
    assert lab_jobs.run_jobs(jobs[:1], res, n_jobs=1, threads=1, say=said.append) == {"a": "done"}
    assert lab_jobs.run_jobs(jobs[:2], res, n_jobs=1, threads=1, say=said.append) == {"a": "reused", "a2": "done"}
    assert calls(jobs[1]) == [{"resume": False, "omp": "1"}]
    os.rmdir(os.path.join(jobs[1].out, "checkpoint-000002"))
    lab_jobs.run_jobs(jobs[:2], res, n_jobs=1, threads=1, say=said.append)
    assert calls(jobs[1])[-1] == {"resume": True, "omp": "1"}  # first stage reused: the second resumes


def test_a_default_changed_in_the_trainer_reruns_its_runs(tmp_path, monkeypatch):
    """The same command under a trainer whose default changed (here its lr) is another run: the lab records each
    run's settings (the trainer's Config with every default filled in) and reruns it afresh."""
    monkeypatch.setattr(lab_jobs, "ROOT", str(tmp_path))
    monkeypatch.setattr(lab_jobs, "_MODULES", {})
    res = str(tmp_path / "res")

    def trainer(lr):
        (tmp_path / "cfg.py").write_text(
            "from dataclasses import dataclass\n\n\n@dataclass\nclass Config:\n    seed: int = 0  # seed\n"
            "    output_dir: str = ''  # where\n    max_steps: int = 2  # steps\n"
            f"    lr: float = {lr}  # the default that changes\n\n\nif __name__ == '__main__':"
            + FAKE.replace("\n", "\n    ") + "\n")
        lab_jobs._MODULES.clear()  # a new lab process imports the trainer afresh

    out = os.path.join(res, "runs", "a")
    job = lab_jobs.Job("a", "cfg.py", ["--seed", "0", "--output_dir", out, "--max_steps", "2"], out, 2)
    trainer(0.1)
    assert lab_jobs.run_jobs([job], res, n_jobs=1, threads=1, say=lambda s: None) == {"a": "done"}
    assert lab_jobs.job_state(job)["settings"] == {"seed": 0, "output_dir": "<results>/runs/a", "max_steps": 2,
                                                   "lr": 0.1}
    trainer(0.1)
    assert lab_jobs.run_jobs([job], res, n_jobs=1, threads=1, say=lambda s: None) == {"a": "reused"}
    trainer(0.2)
    assert lab_jobs.run_jobs([job], res, n_jobs=1, threads=1, say=lambda s: None) == {"a": "done"}
    assert calls(job) == [{"resume": False, "omp": "1"}]  # the old run was deleted, not resumed
    assert lab_jobs.job_state(job)["settings"]["lr"] == 0.2


def test_plan_matches_the_budget(tmp_path):
    res = str(tmp_path)
    jobs = lab.plan(lab.Budget(), ["sft", "grpo", "sft_then_grpo"], res)
    assert [j.name for j in jobs[:4]] == ["sft-s0", "grpo-s0", "sft_then_grpo-s0/stage1", "sft_then_grpo-s0/stage2"]
    assert len(jobs) == 20 and {j.name.split("-s")[1][0] for j in jobs} == {"0", "1", "2", "3", "4"}
    flags = {j.name: dict(zip(j.args[::2], j.args[1::2])) for j in jobs}
    assert flags["sft-s1"]["--batch_size"] == "16" and flags["sft-s1"]["--max_steps"] == "80"
    g = flags["grpo-s2"]
    assert (g["--prompts_per_step"], g["--prompts_per_minibatch"], g["--max_steps"], g["--seed"]) == ("16", "8", "80", "2")
    assert g["--eval_every"] == "10" and "--lr" not in g and "--model" not in g  # trainer defaults, built-in base
    assert g["--val_rows"] == "200"  # every run holds out the same validation split
    s1, s2 = flags["sft_then_grpo-s0/stage1"], flags["sft_then_grpo-s0/stage2"]
    assert s1["--max_steps"] == s2["--max_steps"] == "40" and s1["--batch_size"] == "16"
    assert s2["--model"] == os.path.join(res, "runs", "sft_then_grpo-s0", "stage1", "checkpoint-000040", "model")
    assert jobs[3].after == "sft_then_grpo-s0/stage1" and jobs[3].script == "grpo.py"


def test_switch_at_the_validation_loss_minimum(tmp_path):
    """SFT then GRPO (val. min): the first stage runs the whole budget with a checkpoint at every evaluation; the
    second starts from the checkpoint of the lowest demo_nll_val (step 0 excluded; the earliest of equal ones)
    and runs the rest; when the loss falls to the end there is no second stage."""
    jobs = lab.plan(lab.Budget(seeds=(0,)), ["sft_then_grpo_vmin"], str(tmp_path))
    first, second = jobs
    f = dict(zip(first.args[::2], first.args[1::2]))
    assert (f["--max_steps"], f["--save_every"], f["--keep_checkpoints"]) == ("80", "10", "0") and second.at_val_min
    os.makedirs(first.out)
    losses = {0: 2.0, 10: 1.0, 20: 0.7, 30: 0.5, 40: 0.6, 50: 0.5, 60: 0.9, 70: 1.0, 80: 1.1}
    with open(os.path.join(first.out, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"step": s, "loss": 0.0, **({"demo_nll_val": v} if s in losses else {})}) + "\n"
                      for s, v in ((s, losses.get(s)) for s in range(81)))
    assert lab_jobs.val_min_step(first.out) == 30
    lab_jobs.resolve(second, first)
    g = dict(zip(second.args[::2], second.args[1::2]))
    assert second.last_step == 50 and g["--max_steps"] == "50" and g["--save_every"] == "25"
    assert g["--model"] == os.path.join(first.out, "checkpoint-000030", "model")
    losses[80] = 0.1
    with open(os.path.join(first.out, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"step": s, "demo_nll_val": v}) + "\n" for s, v in losses.items())
    lab_jobs.resolve(second, first)
    assert second.last_step == 0  # the validation loss fell to the end: the first stage alone


def test_missing_trainers_are_named(tmp_path):
    for m in ("sft", "grpo", "luffy"):
        (tmp_path / f"{m}.py").write_text("")
    have, missing = lab.available_methods(str(tmp_path))
    assert have[:6] == ["sft", "grpo", "luffy", "sft_then_grpo", "grpo_then_sft", "sft_then_grpo_vmin"]
    assert "dft" in have and "luffy_gamma0.01" in have and "uft_hint1" not in have  # switches of present trainers
    assert missing["srft"] == "srft.py is not in this checkout" and set(missing) == {
        "srft", "relift", "uft", "prefix_rft", "bread", *lab.FORKS, "uft_hint0.1", "uft_hint1", "prefix_rft_topk0.5",
        "prefix_rft_topk1"}
    assert missing["psr"] == "forks/nsr.py is not in this checkout"
    os.makedirs(tmp_path / "forks")
    (tmp_path / "forks" / "nsr.py").write_text("")
    have, missing = lab.available_methods(str(tmp_path))
    assert have[-3:] == ["nsr", "psr", "w_reinforce"] and "chord" in missing and "nsr" not in missing


def test_plan_runs_forks_and_passk_evaluations(tmp_path):
    res = str(tmp_path)
    jobs = lab.plan(lab.Budget(seeds=(0,)), ["grpo", "psr", "chord"], res, passk_file="held.jsonl")
    assert [j.name for j in jobs] == ["base-s0/passk", "grpo-s0", "grpo-s0/passk", "psr-s0", "psr-s0/passk", "chord-s0"]
    psr = jobs[3]
    assert psr.script == "forks/nsr.py" and psr.args[-2:] == ["--objective", "psr"]
    assert dict(zip(psr.args[::2], psr.args[1::2]))["--prompts_per_step"] == "16"  # the RL budget, as GRPO's
    ev = jobs[4]
    assert ev.script == "evaluate.py" and ev.after == "psr-s0" and ev.out == os.path.join(res, "runs", "psr-s0", "passk")
    flags = dict(zip(ev.args[::2], ev.args[1::2]))
    assert flags["--model"] == os.path.join(res, "runs", "psr-s0", "checkpoint-000080")
    assert flags["--data"] == "held.jsonl:32" and "--pass_k" in ev.args and flags["--max_response_len"] == "48"
    assert dict(zip(jobs[0].args[::2], jobs[0].args[1::2]))["--model"] == "builtin" and jobs[0].after is None
    assert [j.name for j in lab.plan(lab.Budget(seeds=(0,)), ["chord"], res, passk_file="h")] == ["chord-s0"]
    assert not lab_jobs.complete(ev)
    os.makedirs(ev.out)
    (tmp_path / "runs" / "psr-s0" / "passk" / "metrics.json").write_text("{}")
    assert lab_jobs.complete(ev)  # an evaluation is complete when its metrics.json exists


# =============================================================================================
# Collector, table, series, verdicts on fabricated runs (steps 0-4, evaluations at 0, 2, 4)
# =============================================================================================

BASE = [0.60, 0.40, 0.0, 0.0]


def evaluation(levels):
    return {"eval_accuracy": sum(levels) / 4, "eval_accuracy_builtin": sum(levels) / 4,
            **{f"eval_accuracy_builtin_level{i + 1}": v for i, v in enumerate(levels)}}


def fake_metrics(final, entropy, demo, generated, steps=(1, 2, 3, 4), base=BASE, mid=None, wrong=None):
    """Records of one stage: evaluation at its first step 0, at step 2 (mid, default halfway) and 4;
    `wrong`: eval_wrong_steps_builtin of the last evaluation."""
    mid = mid or [(a + b) / 2 for a, b in zip(base, final)]
    out = [{"step": 0, **evaluation(base)}]
    for i, s in enumerate(steps):
        r = {"step": s, "loss": 0.1, "entropy": entropy[i], "response_length": 10.0 + s, "demo_tokens": demo}
        if generated is not None:
            r["generated_tokens"] = generated
        if s == 2:
            r.update(evaluation(mid))
        if s == steps[-1]:
            r.update(evaluation(final), **({} if wrong is None else {"eval_wrong_steps_builtin": wrong}))
        out.append(r)
    return out


def write(out, records, wall):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(out, "lab_job.json"), "w") as f:
        json.dump({"signature": [], "attempts": [{"wall_s": wall}]}, f)


@pytest.fixture
def fabricated(tmp_path):
    return fabricate(tmp_path)


def fabricate(tmp_path):
    """3 seeds of SFT, GRPO, LUFFY, BREAD, SFT then GRPO, GRPO then SFT (its seed 2 failed); SRFT missing."""
    res = str(tmp_path / "res")
    budget = lab.Budget(steps=4, eval_every=2, seeds=(0, 1, 2))
    methods = ["sft", "grpo", "luffy", "bread", "sft_then_grpo", "grpo_then_sft"]
    jobs = lab.plan(budget, methods, res)
    status = {j.name: "done" for j in jobs}
    status["grpo_then_sft-s2/stage2"] = "failed"
    os.makedirs(os.path.join(res, "failures"))
    for s in range(3):
        base = [0.60 + 0.02 * s, 0.40, 0.0, 0.0]  # eval noise of the base: L1 0.60, 0.62, 0.64
        e = 0.01 * s
        write(f"{res}/runs/grpo-s{s}", fake_metrics([0.95 + e, 0.90 + e, 0, 0], [1.0, 0.8, 0.6, 0.4], 0, 100,
                                                    base=base, wrong=0.01 * s), 10 * (s + 1))
        write(f"{res}/runs/sft-s{s}", fake_metrics([0.9, 0.8, 0.9 + 2 * e, 0.5 + 10 * e], [0.5] * 4, 50, None,
                                                   base=base), 5)
        write(f"{res}/runs/luffy-s{s}", fake_metrics([0.5, 0.4, 0.1, 0.0], [1.0, 1.0, 0.9, 0.9], 60, 70, base=base), 7)
        write(f"{res}/runs/bread-s{s}", fake_metrics([0.95, 0.95, 0.95, 0.8 + e], [1.0] * 4, 5 + s, 150, base=base,
                                                     mid=[0.6, 0.5, 0.2, 0.1]), 9)
        write(f"{res}/runs/sft_then_grpo-s{s}/stage1", fake_metrics([0.9, 0.8, 0.8, 0.5], [0.5, 0.5], 50, None,
                                                                    steps=(1, 2), base=base, mid=[0.9, 0.8, 0.8, 0.5]), 3)
        write(f"{res}/runs/sft_then_grpo-s{s}/stage2", fake_metrics([0.99, 0.98, 0.9, 0.6], [0.3, 0.2], 0, 80,
                                                                    steps=(1, 2), base=[0.9, 0.8, 0.8, 0.5]), 4)
        write(f"{res}/runs/grpo_then_sft-s{s}/stage1", fake_metrics([0.9, 0.8, 0, 0], [0.9, 0.8], 0, 90, steps=(1, 2),
                                                                    base=base, mid=[0.9, 0.8, 0, 0]), 4)
        if s < 2:
            write(f"{res}/runs/grpo_then_sft-s{s}/stage2", fake_metrics([0.9, 0.8, 0.6, 0.3], [0.5, 0.5], 50, None,
                                                                        steps=(1, 2), base=[0.9, 0.8, 0, 0]), 6)
    missing = {"srft": "srft.py is not in this checkout"}
    data = lab.collect(jobs, status, methods, missing, budget, res)
    data["lab"] = {"command": "python lab.py --test", "date": "today", "commit": "abc123", "jobs": 1, "threads": 2,
                   "wall_min": 1.0, "budget": lab.asdict(budget),
                   "machine": {"cpu": "Test CPU", "cores": 2, "load_start": "0.1", "load_end": "0.2"}}
    return data, res


def approx_stats(s, mean, lo, hi, n=3):
    assert (s["mean"], s["min"], s["max"], s["n"]) == (pytest.approx(mean), pytest.approx(lo), pytest.approx(hi), n)


def test_collect_means_spreads_tokens_and_failures(fabricated):
    data, _ = fabricated
    g = data["methods"]["grpo"]["summary"]
    approx_stats(g["final"]["1"], 0.96, 0.95, 0.97)
    approx_stats(g["final"]["reachable"], (0.96 + 0.91) / 2, 0.925, 0.945)
    approx_stats(g["final"]["all"], (0.96 + 0.91) / 4, 0.4625, 0.4725)
    assert g["final"]["all"]["std"] == pytest.approx(0.005)  # sample std of 0.4625, 0.4675, 0.4725
    approx_stats(g["generated_tokens"], 400, 400, 400)  # 100 per step x 4
    approx_stats(g["demo_tokens"], 0, 0, 0)
    approx_stats(g["wall_s"], 20, 10, 30)
    approx_stats(g["entropy_start"], 1.0, 1.0, 1.0)  # window: the first / last max(1, 4 // 10) = 1 step
    approx_stats(g["entropy_final"], 0.4, 0.4, 0.4)
    approx_stats(g["entropy_fall"], 0.6, 0.6, 0.6)
    approx_stats(g["response_length_final"], 14.0, 14.0, 14.0)
    approx_stats(g["wrong_steps_final"], 0.01, 0.0, 0.02)  # the last evaluation's eval_wrong_steps_builtin
    approx_stats(data["base"]["1"], 0.62, 0.60, 0.64)
    approx_stats(data["base"]["reachable"], 0.51, 0.50, 0.52)
    s = data["methods"]["sft"]["summary"]
    approx_stats(s["generated_tokens"], 0, 0, 0)  # sft.py logs no generated_tokens: it samples nothing
    approx_stats(s["final"]["out_of_reach"], (0.92 + 0.6) / 2, (0.9 + 0.5) / 2, (0.94 + 0.7) / 2)
    two = data["methods"]["sft_then_grpo"]
    approx_stats(two["summary"]["generated_tokens"], 160, 160, 160)  # SFT stage 0 + GRPO stage 2 x 80
    approx_stats(two["summary"]["demo_tokens"], 100, 100, 100)  # SFT stage 2 x 50
    approx_stats(two["summary"]["wall_s"], 7, 7, 7)  # both stages
    assert [(s, t) for s, _, t in two["runs"][0]["entropy_curve"]] == [(1, "sft"), (2, "sft"), (3, "grpo"),
                                                                       (4, "grpo")]  # stitched: stage 2 is 3-4
    assert two["runs"][0]["demo_tokens_at"] == {"0": 0.0, "2": 100.0, "4": 100.0}
    bad = data["methods"]["grpo_then_sft"]
    assert [r["status"] for r in bad["runs"]] == ["ok", "ok", "failed"]
    assert bad["runs"][2]["logs"] == ["failures/grpo_then_sft-s2-stage2.log"]
    assert bad["summary"]["final"]["all"]["n"] == 2


def test_table_lists_every_method_with_numbers(fabricated):
    data, _ = fabricated
    data["verdicts"] = lab_claims.verdicts(data)
    md = lab_report.results_markdown(data, lab_claims.RULES)
    lines = md[:md.index("## Every seed")].splitlines()  # the main table, not the seeds' rows
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    for label in ("SFT", "GRPO", "LUFFY", "BREAD", "SFT then GRPO", "SRFT", "base model (step 0)"):
        assert label in rows, label
    cells = [c.strip() for c in rows["GRPO"].strip("|").split("|")]
    assert cells[:4] == ["GRPO", "3/3", "0.468 (0.463-0.473)", "0.960 (0.950-0.970)"]
    # wrong steps, entropy, length, generated tokens, demo tokens, wall
    assert cells[-6:] == ["0.010 (0.000-0.020)", "0.400", "14.0", "400", "0", "20 (10-30)"]
    assert rows["SFT"].split(" | ")[-6] == "n/a"  # logged no eval_wrong_steps_builtin
    assert "0.620 (0.600-0.640)" in rows["base model (step 0)"]
    assert "not run: srft.py is not in this checkout" in rows["SRFT"]
    failed = next(line for line in md.splitlines() if line.startswith("| GRPO then SFT"))
    assert "2/3" in failed and "seed 2 FAILED: failures/grpo_then_sft-s2-stage2.log" in failed
    assert "Command: `python lab.py --test`" in md and "Test CPU, 2 cores" in md and "abc123" in md
    assert "same 64 training prompts (4 steps x 16 prompts" in md  # the budget statement
    assert md.count("Verdict: **") == len(lab_claims.CLAIMS) == 15


def test_series_for_the_figures(fabricated):
    data, _ = fabricated
    reach = lab_report.series(data, "reachable")
    assert set(reach) == {"SFT", "GRPO", "LUFFY", "BREAD", "SFT then GRPO", "GRPO then SFT"}
    g = reach["GRPO"]
    assert g["steps"] == [0, 2, 4]
    assert g["mean"] == pytest.approx([0.51, (0.51 + 0.935) / 2, 0.935])
    # 95% t-interval of 0.925, 0.935, 0.945: 0.935 +- 4.303 x 0.01 / sqrt(3) = 0.935 +- 0.024843
    assert (g["lo"][2], g["hi"][2]) == (pytest.approx(0.910157, abs=1e-6), pytest.approx(0.959843, abs=1e-6))
    assert reach["SFT then GRPO"]["steps"] == [0, 2, 4]  # stage 2's own step 0 dropped, its step 2 is step 4
    assert reach["SFT then GRPO"]["mean"][2] == pytest.approx(0.985)
    assert reach["GRPO then SFT"]["mean"][2] == pytest.approx(0.85)  # seeds 0 and 1 only
    ent = lab_report.series(data, "rollout_entropy")
    assert ent["GRPO"]["steps"] == [1, 2, 3, 4] and ent["GRPO"]["mean"] == pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert "SFT" not in ent and ent["SFT then GRPO"]["steps"] == [3, 4]  # sft.py's steps: teacher-forced, left out
    assert ent["GRPO then SFT"]["steps"] == [1, 2]


def test_figures_are_pngs(fabricated):
    pytest.importorskip("matplotlib")
    data, res = fabricated
    paths = lab_report.figures(data, res)
    assert [os.path.basename(p) for p in paths[:2]] == ["accuracy.png", "entropy.png"]  # no strata, no pass@k
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(24)
        width, height = struct.unpack(">II", head[16:24])
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and width > height > 300


def test_verdicts_cli_reads_results_json(fabricated, tmp_path, capsys):
    data, _ = fabricated
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    lab.main(["--verdicts", str(path)])
    out = capsys.readouterr().out
    assert out.count("verdict:") == len(lab_claims.CLAIMS) and "Decision rules" in out


def passk_metrics(out, reach, oor):
    """evaluate.py --pass_k's metrics.json: pass@1, @2, @4 of levels 1-2 (`reach`) and 3-4 (`oor`), per k."""
    m = {f"eval_pass@{k}_held_level{lv}": v[j] for j, k in enumerate((1, 2, 4)) for lv, v in
         ((1, reach), (2, reach), (3, oor), (4, oor))}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"metrics": m}, f)


def test_forks_and_passk_are_collected(tmp_path):
    """The forks' runs and their pass@k evaluations (pass@1, @2, @4 per level) collected and tabled."""
    res = str(tmp_path / "res")
    budget = lab.Budget(steps=4, eval_every=2, seeds=(0, 1, 2), passk_samples=4)
    methods = ["grpo", "nsr", "psr", "w_reinforce"]
    jobs = lab.plan(budget, methods, res, passk_file="held.jsonl")
    status = {j.name: "done" for j in jobs}
    for s in range(3):
        e = 0.01 * s
        for m, ent in (("grpo", [1.0, 0.8, 0.6, 0.4]), ("nsr", [1.0, 1.0, 0.95, 0.9]), ("psr", [1.0, 0.6, 0.3, 0.1]),
                       ("w_reinforce", [1.0, 0.9, 0.8, 0.7])):
            write(f"{res}/runs/{m}-s{s}", fake_metrics([0.9, 0.8, 0, 0], ent, 0, 100), 10)
        passk_metrics(f"{res}/runs/base-s{s}/passk", [0.5 + e, 0.7 + e, 0.9 + e], [0, 0.05, 0.1])
        passk_metrics(f"{res}/runs/grpo-s{s}/passk", [0.85 + e, 0.88 + e, 0.89 + e], [0, 0, 0])
        passk_metrics(f"{res}/runs/nsr-s{s}/passk", [0.8, 0.9, 0.97], [0, 0.05, 0.1])
        passk_metrics(f"{res}/runs/psr-s{s}/passk", [0.9, 0.9, 0.9], [0, 0, 0])
        passk_metrics(f"{res}/runs/w_reinforce-s{s}/passk", [0.85, 0.9, 0.95], [0, 0, 0.05])
    data = lab.collect(jobs, status, methods, {}, budget, res)
    approx_stats(data["base_passk"]["reachable"]["4"], 0.91, 0.90, 0.92)
    approx_stats(data["methods"]["nsr"]["summary"]["passk"]["all"]["4"], 0.535, 0.535, 0.535)
    curves = lab_report.passk_series(data)
    assert set(curves) == {"base model", "GRPO", "NSR (fork)", "PSR (fork)", "W-REINFORCE (fork)"}
    assert curves["GRPO"]["reachable"]["steps"] == [1, 2, 4]
    assert curves["GRPO"]["reachable"]["mean"] == pytest.approx([0.86, 0.89, 0.90])
    data["lab"] = {"command": "python lab.py --test", "date": "today", "commit": "abc", "jobs": 1, "threads": 2,
                   "wall_min": 1.0, "budget": lab.asdict(budget),
                   "machine": {"cpu": "Test CPU", "cores": 2, "load_start": "0.1", "load_end": "0.2"}}
    md = lab_report.results_markdown(data, lab.RULES)
    assert "Forks (forks/, rows marked \"(fork)\"): 9 of 9 runs finished" in md and "trainers and baselines: 3 of 3" in md
    assert "| NSR (fork) | 0.800 / 0.000 | 0.900 / 0.050 | 0.970 / 0.100 |" in md and "passk.png" in md
    if importlib.util.find_spec("matplotlib"):
        assert os.path.join(res, "passk.png") in lab_report.figures(data, res)


# =============================================================================================
# End to end through the real trainers
# =============================================================================================


def test_two_stage_end_to_end(tiny_model_dir, tmp_path):
    """GRPO then SFT, one step each, through lab.py's command line; then a rerun reuses both stages."""
    out = tmp_path / "lab"
    cmd = [sys.executable, os.path.join(ROOT, "lab.py"), "--out", str(out), "--methods", "grpo_then_sft",
           "--steps", "2", "--seeds", "0", "--prompts", "2", "--eval_every", "1", "--eval_per_level", "1",
           "--model", tiny_model_dir, "--threads", "1", "--trainer_flags", "--no-compile --eval_samples 1 --verifier_workers 1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    run = data["methods"]["grpo_then_sft"]["runs"][0]
    assert run["status"] == "ok" and sorted(run["evals"]) == ["0", "1", "2"]
    assert [s for s, *_ in run["entropy_curve"]] == [1, 2]
    assert data["missing"]["grpo"] == "not selected with --methods"
    stage2 = json.loads((out / "runs" / "grpo_then_sft-s0" / "stage2" / "config.json").read_text())
    assert stage2["model"].endswith(os.path.join("stage1", "checkpoint-000001", "model")) and stage2["batch_size"] == 2
    md = (out / "results.md").read_text()
    assert "| GRPO then SFT | 1/1 |" in md
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0 and "2 reused, 0 to run" in p.stdout


def test_fork_and_passk_end_to_end(tiny_model_dir, tmp_path):
    """PSR (forks/nsr.py --objective psr), 2 steps, and the pass@k evaluations of its final model and of the base
    (evaluate.py --pass_k, 2 samples of 1 problem per level) through lab.py's command line; a rerun reuses all."""
    out = tmp_path / "lab"
    cmd = [sys.executable, os.path.join(ROOT, "lab.py"), "--out", str(out), "--methods", "psr", "--steps", "2",
           "--seeds", "0", "--prompts", "2", "--eval_every", "2", "--eval_per_level", "1", "--model", tiny_model_dir,
           "--threads", "1", "--passk_samples", "2", "--passk_per_level", "1",
           "--trainer_flags", "--no-compile --eval_samples 1 --verifier_workers 1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    run = data["methods"]["psr"]["runs"][0]
    assert run["status"] == "ok" and set(run["passk"]) == {"all", "reachable"}  # levels 1-2 only
    assert run["passk_counts"] == {"n": 2, "correct": run["passk_counts"]["correct"]} and \
        len(run["passk_counts"]["correct"]) == 2  # one problem per level, 2 samples each
    assert sorted(run["passk"]["all"], key=int) == ["1", "2"] and set(data["base_passk"]["all"]) == {"1", "2"}
    config = json.loads((out / "runs" / "psr-s0" / "config.json").read_text())
    assert config["objective"] == "psr"
    md = (out / "results.md").read_text()
    assert "| PSR (fork) | 1/1 |" in md and "Forks (forks/, rows marked" in md and "| PSR (fork) | " in md
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0 and "3 reused, 0 to run" in p.stdout


@pytest.mark.skipif(os.environ.get("LAB_E2E") != "1", reason="about 5 minutes on 2 cores: LAB_E2E=1 to run")
def test_quick_lab_end_to_end(tmp_path):
    out = tmp_path / "quick"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "lab.py"), "--quick", "--out", str(out), "--jobs", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    have, _ = lab.available_methods()
    assert set(data["methods"]) == set(have)
    assert all(r["status"] == "ok" for m in data["methods"].values() for r in m["runs"])
    assert (out / "results.md").exists() and len(data["verdicts"]) == 6


def test_run_times_sum_every_attempt(fabricated):
    """What the lab cost, also when results.md is rewritten by an invocation that reused every run."""
    _, res = fabricated
    methods = ["sft", "grpo", "luffy", "bread", "sft_then_grpo", "grpo_then_sft"]
    jobs = lab.plan(lab.Budget(steps=4, eval_every=2, seeds=(0, 1, 2)), methods, res)
    # walls written by fabricate(): GRPO 10+20+30, SFT 3x5, LUFFY 3x7, BREAD 3x9, SFT then GRPO 3x(3+4),
    # GRPO then SFT 3x4 + 2x6 (its seed 2 second stage failed before it wrote anything)
    t = lab.run_times(jobs)
    assert t["runs_wall_min"] == pytest.approx((60 + 15 + 21 + 27 + 21 + 12 + 12) / 60)
    assert t["first_started"] is None  # the fabricated attempts carry no start time


def test_compute_spent_up_to_each_evaluation():
    """compute_at (compute.png): generated tokens plus the trained tokens (the logged rate x the step's rollout and
    training seconds), and those seconds, summed up to each evaluation; sft.py generates nothing."""
    records = [{"step": 0, "trainer": "grpo", **evaluation(BASE)}] + [
        {"step": s, "trainer": "grpo", "loss": 0.1, "generated_tokens": 100, "time_rollout": 1.0, "time_train": 3.0,
         "tokens_per_second": 50.0, **(evaluation(BASE) if s == 2 else {})} for s in (1, 2)]
    assert lab.summarize_run(records, None)["compute_at"] == {"0": [0.0, 0.0], "2": [2 * (100 + 50 * 4), 8.0]}
    sft = [dict(r, trainer="sft", time_rollout=0.0) for r in records]
    for r in sft[1:]:
        del r["generated_tokens"]
    assert lab.summarize_run(sft, None)["compute_at"]["2"] == [2 * 50 * 3, 6.0]


def test_run_jobs_starts_a_second_stage_at_the_validation_minimum(tmp_path, monkeypatch):
    """A stand-in first stage whose validation loss is lowest at step 2 of 4: the second stage runs 2 steps from
    checkpoint-000002; a rerun reuses both."""
    (tmp_path / "fake.py").write_text(FAKE.replace('{"step": s, "loss": 0.0}', '{"step": s, "loss": 0.0, '
                                                   '"demo_nll_val": (s - 2) ** 2 + 1}'))
    monkeypatch.setattr(lab_jobs, "ROOT", str(tmp_path))
    res = str(tmp_path / "res")
    jobs = lab.plan(lab.Budget(steps=4, eval_every=2, seeds=(0,)), ["sft_then_grpo_vmin"], res)
    for j in jobs:
        j.script = "fake.py"
    assert lab_jobs.run_jobs(jobs, res, n_jobs=1, threads=1, say=print) == {"sft_then_grpo_vmin-s0/stage1": "done",
                                                                              "sft_then_grpo_vmin-s0/stage2": "done"}
    second = dict(zip(jobs[1].args[::2], jobs[1].args[1::2]))
    assert second["--max_steps"] == "2" and second["--model"].endswith(os.path.join("stage1", "checkpoint-000002",
                                                                                     "model"))
    jobs = lab.plan(lab.Budget(steps=4, eval_every=2, seeds=(0,)), ["sft_then_grpo_vmin"], res)
    for j in jobs:
        j.script = "fake.py"
    assert set(lab_jobs.run_jobs(jobs, res, n_jobs=1, threads=1, say=print).values()) == {"reused"}
