"""scripts/schedule_check.py: best and final evaluations of runs <method>-s<seed>, and the band rule."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import schedule_check  # noqa: E402


def write_run(folder, name, accuracies):
    os.makedirs(folder / name)
    with open(folder / name / "metrics.jsonl", "w") as f:
        for step, acc in enumerate(accuracies):
            f.write(json.dumps({"step": step * 10, "eval_accuracy": acc}) + "\n")
            f.write(json.dumps({"step": step * 10 + 1, "loss": 0.1}) + "\n")  # a training record: no evaluation


def test_a_run_that_falls_from_its_best_is_out_of_its_band(tmp_path):
    """Best evaluations 0.80, 0.82, 0.84 (sd 0.02): band max(0.03, 0.04) = 0.04. Seed 2 falls 0.84 -> 0.70: out;
    seed 1 falls 0.82 -> 0.79 (0.03 < 0.04): within; a resumed run's repeated step keeps its last record."""
    write_run(tmp_path, "grpo-s0", [0.3, 0.8, 0.8])
    write_run(tmp_path, "grpo-s1", [0.3, 0.82, 0.79])
    write_run(tmp_path, "grpo-s2", [0.3, 0.84, 0.70])
    write_run(tmp_path, "sft-s0", [0.3, 0.5])
    with open(tmp_path / "sft-s0" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "eval_accuracy": 0.6}) + "\n")
    runs = schedule_check.condition(str(tmp_path), None)
    grpo = {r["seed"]: r for r in runs["grpo"]}
    assert grpo[0]["band"] == pytest.approx(0.04)
    assert [grpo[s]["within_band"] for s in range(3)] == [True, True, False]
    assert (grpo[2]["best"], grpo[2]["best_step"], grpo[2]["final"]) == (0.84, 10, 0.70)
    assert runs["sft"][0]["final"] == 0.6 and runs["sft"][0]["band"] == 0.03  # one seed: the minimum effect
    assert set(schedule_check.condition(str(tmp_path), {"sft"})) == {"sft"}
