"""scripts/gpu/check.py, the one command for a lent GPU, rehearsed without one: its plan, the flags of every
command it would run (each trainer's own parser), and step 4's code on the CPU with a tiny model, so that a typo
cannot cost a lent GPU its few minutes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_plans_every_step_and_rehearses_the_memory_check(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu", "check.py"), "--dry_run", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    first = p.stdout.splitlines()[0]
    assert first.startswith("gpu check: skipping every GPU step (--dry_run)") and "vLLM" in first
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["dry_run"] and [s["name"] for s in r["steps"]] == ["lm_head", "smoke", "trainers", "memory"]
    assert all(s["status"] == "skipped (--dry_run)" for s in r["steps"])
    assert sum(s["budget_s"] for s in r["steps"]) < 8 * 60
    assert r["flags"] == "every trainer command parses"
    m = r["memory_rehearsal"]
    assert m["rehearsal"] and len(m["wakes"]) == 3 and all(w["fits"] for w in m["wakes"]) and m["finite"]
    assert m["state_at_measure_gib"] >= 2 * m["shard_gib"]  # the AdamW moments existed when "free" was measured
