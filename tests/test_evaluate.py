"""evaluate.py on a tiny model: records, k per file, levels, checkpoint and run directories, and the
same numbers as a trainer's --eval_data (one evaluation function, same seeds, prompts and verifier)."""
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import builtin_task

import common
from test_cli import metrics, run

COMMON = ["--max_prompt_len", "64", "--max_response_len", "24", "--seed", "3", "--verifier_workers", "1"]


@pytest.fixture(scope="module")
def answers_seven(tiny_model_dir, tmp_path_factory):
    """The tiny model taught, in a few seconds, to answer every problem with "</think>\\n\\boxed{7}":
    with golds 7 and 8 its accuracy is about one half, so evaluations compare non-trivial numbers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    target = tok("</think>\n\\boxed{7}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    problems = [r["problem"] for r in builtin_task.make_task(20, seed=9)]
    for step in range(60):
        prompts = [tok(common.format_prompt(tok, p, None), add_special_tokens=False)["input_ids"]
                   for p in problems[step % 10 * 8:step % 10 * 8 + 8]]
        batch = common.make_batch(prompts, [target] * len(prompts), tok.pad_token_id, "cpu")
        logp, _ = common.PolicyModel(lm, compile=False)(**batch)
        loss = -(logp * batch["response_mask"]).sum() / batch["response_mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    path = tmp_path_factory.mktemp("answers_seven")
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def records(out):
    with open(os.path.join(out, "records.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_evaluate_matches_the_trainers_evaluation(answers_seven, tmp_path):
    problems = builtin_task.make_task(4, seed=5, levels=(1, 2))  # 8 problems: gold 7 for levels 1, 8 for level 2
    sets = tmp_path / "sets.jsonl"
    sets.write_text("".join(json.dumps({**r, "answer": "7" if r["level"] == 1 else "8"}) + "\n" for r in problems))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "1+2+4=?"}],
                                          "reward_model": {"ground_truth": "7"}}]), other)
    (tmp_path / "other.jsonl").write_text(json.dumps({"problem": "1+2+4=?", "answer": "7"}) + "\n")

    p = run("evaluate.py", "--model", answers_seven, "--data", f"{sets}:3", "--output_dir", str(tmp_path / "e1"),
            *COMMON)
    assert "evaluating sets (8 problems x 3 samples) with at most 24 response tokens" in p.stdout
    recs = records(tmp_path / "e1")
    assert len(recs) == 8 * 3
    assert set(recs[0]) == {"set", "index", "prompt", "gold", "level", "sample", "response", "answer", "reward",
                            "finished"}
    assert [(r["index"], r["sample"]) for r in recs] == [(i, j) for i in range(8) for j in range(3)]
    assert recs[0]["prompt"].startswith("<|im_start|>user\n")  # METHODS 9: no system message at evaluation
    for r in recs:  # each record holds what the verifier graded and its verdict
        assert r["reward"] == float(r["answer"] == r["gold"]), r
    result = json.load(open(tmp_path / "e1" / "metrics.json"))["metrics"]
    level1 = sum(r["reward"] for r in recs if r["level"] == 1) / 12
    assert result["eval_accuracy_sets_level1"] == pytest.approx(level1) and level1 > 0.5
    assert result["eval_accuracy_sets_level2"] < 0.5
    assert result["eval_accuracy_sets"] == pytest.approx(sum(r["reward"] for r in recs) / 24)

    # several files, k per file, a run directory (its newest checkpoint: the same weights), the same draws
    ckpt = tmp_path / "run" / "checkpoint-000003"
    shutil.copytree(answers_seven, ckpt / "model")
    p = run("evaluate.py", "--model", str(tmp_path / "run"), "--data", f"{sets}:3", "--data", str(other),
            "--prompt_key", "prompt", "--answer_key", "reward_model.ground_truth",
            "--output_dir", str(tmp_path / "e2"), *COMMON, check=False)
    # one --prompt_key / --answer_key for all files: sets.jsonl has other fields, so this stops early
    assert p.returncode != 0 and "sets.jsonl: no row has the field 'prompt' (--prompt_key)" in p.stderr
    p = run("evaluate.py", "--model", str(tmp_path / "run"), "--data", f"{sets}:3", str(tmp_path / "other.jsonl"),
            "--output_dir", str(tmp_path / "e2"), *COMMON)
    assert f"evaluating its newest checkpoint, {ckpt}" in p.stdout
    assert "evaluating sets (8 problems x 3 samples), other (1 problems x 1 samples)" in p.stdout
    again = records(tmp_path / "e2")
    assert [r["response"] for r in again if r["set"] == "sets"] == [r["response"] for r in recs]
    both = json.load(open(tmp_path / "e2" / "metrics.json"))["metrics"]
    assert both["eval_accuracy_sets"] == result["eval_accuracy_sets"]
    assert both["eval_accuracy"] == (both["eval_accuracy_sets"] + both["eval_accuracy_other"]) / 2

    # the trainer's evaluation before training: the same numbers
    out = tmp_path / "grpo"
    run("grpo.py", "--model", answers_seven, "--data", str(sets), "--eval_data", f"{sets}:3", "--max_steps", "0",
        "--no-compile", "--output_dir", str(out), *COMMON, "--max_prompt_len", "256")  # training prompts: + system
    step0 = metrics(out)[0]
    assert {k: v for k, v in step0.items() if k.startswith("eval_")} == result


def test_evaluate_refuses_bad_input_before_loading(tmp_path):
    p = run("evaluate.py", "--model", str(tmp_path / "missing"), check=False)
    assert p.returncode != 0 and "evaluate.py --model DIR --data FILE[:k]" in p.stderr
    bad = tmp_path / "aime.jsonl"
    bad.write_text(json.dumps({"problem": "x", "answer": ""}) + "\n")
    p = run("evaluate.py", "--model", str(tmp_path / "missing"), "--data", f"{bad}:32", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "aime.jsonl: 1 of 1 rows are bad" in p.stderr and "row 1: 'answer' is empty" in p.stderr
