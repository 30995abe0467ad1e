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


def test_demo_probabilities_against_a_plain_forward(tiny_model_dir):
    """common.demo_probabilities: per group and overall, the mean log-prob of the key tokens (the fact digits),
    the median over demonstrations of their least likely token's probability and the share of tokens below
    0.01, against a float64 log-softmax of the plain HF forward, one demonstration at a time."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    raw = [r for r in builtin_task.make_task(2, seed=4)]  # 2 per level: levels 1-2 without, 3-4 with a fact line
    rows = [{"prompt_ids": tok(common.format_prompt(tok, r["problem"], None), add_special_tokens=False)["input_ids"],
             "demo_ids": tok(r["demo"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
             "problem": r["problem"], "level": r["level"], "stratum": r["stratum"]} for r in raw]  # as encode_rows
    demo_set = common.EvalSet("builtin", "builtin", 1, rows)
    got = common.demo_probabilities(common.PolicyModel(lm, compile=False), demo_set, tok, common.Dist())
    plain = []
    for r in rows:
        with torch.no_grad():
            logits = lm(torch.tensor([r["prompt_ids"] + r["demo_ids"]])).logits[0].double()
        lp = torch.log_softmax(logits[len(r["prompt_ids"]) - 1:-1], -1).gather(-1, torch.tensor(r["demo_ids"])[:, None])
        key = builtin_task.key_tokens([tok.decode([t]) for t in r["demo_ids"]])
        plain.append((r, lp[:, 0].tolist(), key))
    for group in ["level1", "level3", *sorted({f"stratum_{r['stratum']}" for r in rows if r["stratum"]}), None]:
        part = [(lp, key) for r, lp, key in plain if group is None or group in (f"level{r['level']}",
                                                                                f"stratum_{r['stratum']}")]
        suffix = "builtin" + (f"_{group}" if group else "")
        keys = [x for lp, key in part for x, k in zip(lp, key) if k]
        mins = sorted(min(lp) for lp, _ in part)
        want_key = sum(keys) / len(keys) if keys else None
        assert (got[f"demo_key_logp_{suffix}"] is None) == (want_key is None), suffix
        if want_key is not None:
            assert got[f"demo_key_logp_{suffix}"] == pytest.approx(want_key, rel=1e-5), suffix
        assert got[f"demo_min_p_{suffix}"] == pytest.approx(math.exp(mins[len(mins) // 2]), rel=1e-4), suffix
        low = sum(x < math.log(0.01) for lp, _ in part for x in lp) / sum(len(lp) for lp, _ in part)
        assert got[f"demo_low_p_share_{suffix}"] == pytest.approx(low), suffix
        nll = -sum(x for lp, _ in part for x in lp) / sum(len(lp) for lp, _ in part)  # per token: SFT's loss
        assert got[f"demo_nll_{suffix}"] == pytest.approx(nll, rel=1e-5), suffix


def test_demo_probabilities_from_the_command_line(tiny_model_dir, tmp_path):
    """evaluate.py --demo_probs --no-sample: which regime a model is in, for a data file with demonstrations,
    without generating anything."""
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"question": r["problem"], "target": r["demo"]}) + "\n"
                            for r in builtin_task.make_task(2, seed=4)))
    out = tmp_path / "out"
    p = run("evaluate.py", "--model", tiny_model_dir, "--data", str(data), "--prompt_key", "question",
            "--demo_key", "target", "--demo_probs", "--no-sample", "--output_dir", str(out), *COMMON)
    assert "demos demonstrations: median least-likely token p = " in p.stdout
    got = json.load(open(out / "metrics.json"))["metrics"]
    assert set(got) == {"demo_key_logp_demos", "demo_min_p_demos", "demo_low_p_share_demos",
                        "demo_nll_demos"}  # no answers graded
    assert 0 < got["demo_min_p_demos"] < 1 and got["demo_key_logp_demos"] < 0  # file data: every token is key
    assert not (out / "records.jsonl").exists() or records(str(out)) == []
    bad = run("evaluate.py", "--model", tiny_model_dir, "--data", str(data), "--no-sample", check=False)
    assert bad.returncode and "--no-sample leaves nothing to measure" in bad.stderr
