"""Crash safety, the reduced count CI runs (the full sweep over all eight trainers is
`python tests/kill_sweep.py`, docs/runs.md, "Faults"): the two trainers with the most state beyond the
optimizer, killed at chosen kinds of moments and resumed, end bit for bit where an uninterrupted run ends."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kill_sweep.py lives beside the tests
import kill_sweep  # noqa: E402


@pytest.mark.parametrize("trainer, modes", [
    ("relift", ["step", "checkpoint"]),  # its buffer and second optimizer; a kill mid-checkpoint-write
    # its hint schedule; SIGTERM to every process of the run (as Slurm sends it), a kill between a logged
    # step and its checkpoint
    ("uft", ["sigterm-group", "logged"]),
])
def test_killed_and_resumed_equals_uninterrupted(trainer, modes, tiny_model_dir, tmp_path):
    r = kill_sweep.sweep(trainer, str(tmp_path), kills=len(modes), max_steps=3, seed=0, model=tiny_model_dir,
                         modes=modes)
    assert r["kills"] == len(modes), r["events"]  # every interruption landed while the run was alive
    assert r["tracebacks"] == 0, "\n\n".join(r["traceback_text"])  # the whole text: pytest shortens a dict
    assert r["differences"] == [], r
    if "sigterm-group" in modes:  # SIGTERM to trainer and grading workers: saved and exited 143
        assert [e["code"] for e in r["events"] if e["mode"] == "sigterm-group"] == [143]
