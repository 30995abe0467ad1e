"""The trainers end to end through their command line: smoke runs, checkpoints, resume, bad input."""
import json
import os
import shutil
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_KEYS = {"step", "loss", "reward", "accuracy", "entropy", "response_length", "grad_norm", "lr",
             "time_rollout", "time_train", "tokens_per_second", "demo_tokens"}
TIMING = {"time_rollout", "time_train", "tokens_per_second"}


def run(script, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)
    if check and p.returncode:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def small(model, eval_file, out, *extra):
    return ["--model", model, "--eval_data", eval_file, "--output_dir", str(out), "--no-compile",
            "--eval_samples", "1", "--max_response_len", "24", "--verifier_workers", "1", "--system_prompt", "",
            *extra]


GRPO = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4"]


def test_grpo_smoke_and_checkpoint(tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / "grpo"
    run("grpo.py", *small(tiny_model_dir, small_eval_file, out, "--max_steps", "2", *GRPO))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert set(lines[0]) >= {"eval_accuracy", "eval_accuracy_1", "eval_accuracy_4"}
    for m in lines[1:]:
        assert CORE_KEYS | {"pg_loss", "clip_frac"} <= set(m), set(m)
        assert m["lr"] > 0 and 0 <= m["accuracy"] <= 1 and m["response_length"] > 0
        assert m["demo_tokens"] == 0 and m["generated_tokens"] > 0
    assert "eval_accuracy" in lines[2]
    ckpt = out / "checkpoint-000002"
    assert sorted(os.listdir(ckpt)) == ["model", "optim", "rng-rank0.pt", "trainer_state.pt"]
    lm = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [k for k, v in lm.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert changed, "two GRPO steps changed no weight"


def test_sft_smoke(tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / "sft"
    run("sft.py", *small(tiny_model_dir, small_eval_file, out, "--max_steps", "3", "--batch_size", "4",
                         "--micro_batch_size", "3", "--lr", "1e-3", "--eval_every", "0",
                         "--gradient_checkpointing"))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    for m in lines[1:]:
        assert CORE_KEYS | {"sft_loss"} <= set(m) and m["reward"] is None and m["time_rollout"] == 0
        assert abs(m["demo_tokens"] - 4 * m["response_length"]) < 1e-6  # 4 demonstrations, all their tokens
    assert lines[3]["loss"] < lines[1]["loss"]  # three steps at lr 1e-3 fit the demonstrations better
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-000003" / "model")


def test_killed_run_resumes_to_identical_metrics(tiny_model_dir, small_eval_file, tmp_path):
    """An uninterrupted 4-step run vs. the same run cut off after its step-2 checkpoint (with a
    half-written step-4 checkpoint left behind) and resumed: identical metrics, step for step."""
    args = [*GRPO, "--max_steps", "4", "--save_every", "2", "--eval_every", "2", "--kl_coef", "0.05",
            "--entropy_coef", "0.01", "--loss_agg", "constant", "--lr_schedule", "cosine",
            "--warmup_steps", "2", "--lr", "1e-3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run("grpo.py", *small(tiny_model_dir, small_eval_file, full, *args))
    shutil.copytree(full, cut)  # the cut run wrote exactly what the full run wrote until its crash...
    shutil.rmtree(cut / "checkpoint-000004")
    os.makedirs(cut / "checkpoint-000004.tmp" / "model")  # ...died while writing the step-4 checkpoint
    with open(cut / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")  # and logged past its checkpoint
    p = run("grpo.py", *small(tiny_model_dir, small_eval_file, cut, *args, "--resume"))
    assert "resumed from" in p.stdout + p.stderr
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert a[-1]["loss"] != a[-2]["loss"]  # the steps are not trivially equal to each other
    assert "kl" in a[-1] and "entropy_bonus" in a[-1]
    assert not os.path.exists(cut / "checkpoint-000004.tmp")


def test_existing_run_is_not_overwritten(tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / "x"
    os.makedirs(out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    p = run("grpo.py", *small(tiny_model_dir, small_eval_file, out, "--max_steps", "1"), check=False)
    assert p.returncode != 0 and "--resume" in p.stderr and "--overwrite" in p.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_bad_data_row_stops_with_a_fix(tiny_model_dir, small_eval_file, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1=?", "answer": "2"}\n{"problem": "2+2=?", "solution": "4"}\n')
    p = run("grpo.py", *small(tiny_model_dir, small_eval_file, tmp_path / "y", "--data", str(data)), check=False)
    assert p.returncode != 0
    assert "row 2 of train.jsonl has no field 'answer'; use --answer_key" in p.stderr
    assert "Traceback" not in p.stderr
