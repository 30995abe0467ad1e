"""The trainers end to end through their command line: smoke runs, checkpoints, resume, bad input."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_KEYS = {"step", "loss", "reward", "accuracy", "entropy", "response_length", "truncated_frac", "grad_norm",
             "lr", "time_rollout", "time_train", "tokens_per_second", "demo_tokens", "verifier_timeout_share",
             "skipped_updates", "padding_frac"}
TIMING = {"time_rollout", "time_train", "tokens_per_second"}


def run(script, *args, check=True, nproc=1):
    """The script as a user runs it: plain python, or torchrun with `nproc` ranks (a thread each)."""
    env = dict(os.environ, OMP_NUM_THREADS="2" if nproc == 1 else "1", PYTHONUNBUFFERED="1")
    with socket.socket() as s:  # a free port for torchrun's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    p = subprocess.run([*launcher, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       env=env, timeout=900, cwd=ROOT)
    if check and p.returncode:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def small(model, eval_file, out, *extra):
    return ["--model", model, *(["--eval_data", eval_file] if eval_file else []), "--output_dir", str(out),
            "--no-compile", "--eval_samples", "1", "--max_prompt_len", "64", "--max_response_len", "24",
            "--verifier_workers", "1",
            "--system_prompt", "", *extra]


GRPO = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4"]


def test_grpo_smoke_and_checkpoint(tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / "grpo"
    hard = tmp_path / "hard.jsonl"  # a second evaluation set, without levels
    hard.write_text("".join(json.dumps({"problem": "9+9+9=?", "answer": "27"}) + "\n" for _ in range(3)))
    p = run("grpo.py", *small(tiny_model_dir, None, out, "--max_steps", "2", *GRPO, "--eval_every", "1",
                              "--eval_data", f"{small_eval_file}:2", str(hard)))
    assert "evaluation: eval (8 problems x 2 samples), hard (3 problems x 1 samples)" in p.stdout
    assert "eval at step 1: eval " in p.stdout and "eval after training:  eval " in p.stdout  # on the console
    assert f"the run is in {out}: metrics.jsonl, config.json, checkpoint-000002/" in p.stdout  # the last line
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert lines[1]["lr"] > lines[2]["lr"] == 0  # the cosine schedule, logged after its update: 0 after the last step
    assert lines[0]["train_rows"] > 0 and lines[0]["train_prompts_dropped"] == 0
    assert set(lines[0]) >= {"eval_accuracy", "eval_accuracy_eval", "eval_accuracy_eval_level1",
                             "eval_accuracy_eval_level4", "eval_accuracy_hard"}
    assert not any(k.startswith("eval_accuracy_hard_") for k in lines[0])
    assert lines[0]["eval_accuracy"] == (lines[0]["eval_accuracy_eval"] + lines[0]["eval_accuracy_hard"]) / 2
    for m in lines[1:]:
        assert CORE_KEYS | {"pg_loss", "clip_frac"} <= set(m), set(m)
        assert 0 <= m["accuracy"] <= 1 and m["response_length"] > 0
        # a random model rarely stops: its rollouts run to the 24-token budget
        assert 0 < m["truncated_frac"] <= 1 and (m["truncated_frac"] == 1) == (m["response_length"] == 24)
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
                         "--gradient_checkpointing", "--val_rows", "6"))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    # --val_rows 6: six training rows held out (1000 built-in ones), evaluated apart from eval_accuracy
    assert lines[0]["train_rows"] == 994 and lines[0]["eval_accuracy"] == lines[0]["eval_accuracy_eval"]
    assert 0 <= lines[3]["eval_accuracy_val"] <= 1 and lines[3]["demo_nll_val"] < lines[0]["demo_nll_val"]
    evals = [json.loads(x) for x in (out / "eval_problems.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and len(evals[0]["val"]["correct"]) == 6
    assert 0 < lines[0]["train_demos_truncated"] < lines[0]["train_rows"]  # level 3-4 demos exceed 24 tokens
    for m in lines[1:]:
        assert CORE_KEYS | {"sft_loss"} <= set(m) and m["reward"] is None and m["time_rollout"] == 0
        assert m["truncated_frac"] in (0, 0.25, 0.5, 0.75, 1)  # a batch of 4
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
    for name in ("metrics.jsonl", "eval_problems.jsonl"):
        with open(cut / name, "a") as f:
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
    # every evaluation's per-problem counts (steps 0, 2, 4), cut back and written again alike
    problems = [json.loads(x) for x in (full / "eval_problems.jsonl").read_text().splitlines()]
    assert [p["step"] for p in problems] == [0, 2, 4] and (cut / "eval_problems.jsonl").read_text() == \
        (full / "eval_problems.jsonl").read_text()
    for p, m in zip(problems, a[::2]):
        (name, counts), = [(k, v) for k, v in p.items() if k != "step"]  # the one evaluation set
        assert sum(counts["correct"]) / counts["k"] / len(counts["correct"]) == pytest.approx(m[f"eval_accuracy_{name}"])


def test_existing_run_is_not_overwritten(tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / "x"
    os.makedirs(out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    p = run("grpo.py", *small(tiny_model_dir, small_eval_file, out, "--max_steps", "1"), check=False)
    assert p.returncode != 0 and "--resume" in p.stderr and "--overwrite" in p.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_bad_rows_are_all_reported_before_anything_happens(small_eval_file, tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"problem": "1+1=?", "answer": "2"}
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        good, {"problem": "2+2=?", "solution": "4"}, good, {"problem": "", "answer": "3"},
        {"problem": "3+3=?", "answer": ["6", "7"]}, *[{"problem": "4+4=?"}] * 12]))
    out = tmp_path / "y"
    # the model does not exist: the data must be checked first, and output_dir left alone
    p = run("grpo.py", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--output_dir", str(out),
            check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "train.jsonl: 15 of 17 rows are bad; fix or drop them:" in p.stderr
    assert "row 2: no field 'answer'; fill in the gold answer or drop the row" in p.stderr
    assert "row 4: 'problem' is empty" in p.stderr and "row 5: 'answer' is list" in p.stderr
    assert "... and 5 more" in p.stderr
    assert not out.exists()


def test_missing_nested_key_suggests_the_closest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{
        "prompt": [{"content": "What is 6*7?", "role": "user"}], "ability": "math",
        "target": [{"content": "<think>\n6*7=42\n</think>\n\\boxed{42}", "role": "assistant"}],
        "reward_model": {"ground_truth": "42", "style": "rule"}}] * 3), tmp_path / "openr1.parquet")
    p = run("grpo.py", "--data", str(tmp_path / "openr1.parquet"), "--prompt_key", "prompt",
            "--answer_key", "reward_model.groundtruth", "--output_dir", str(tmp_path / "z"), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert ("no row has the field 'reward_model.groundtruth' (--answer_key): the rows' 'reward_model' has "
            "ground_truth, style; did you mean --answer_key reward_model.ground_truth?") in p.stderr


def test_fixed_choice_flags_are_checked_when_parsed(capsys):
    import common
    import grpo
    import sft
    for config, value in [(grpo.Config, "tokenmean"), (sft.Config, "constant")]:
        with pytest.raises(SystemExit) as err:
            common.parse_config(config, ["--loss_agg", value])
        assert err.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err


def test_mistyped_and_negative_flags_get_one_line(capsys):
    import common
    import grpo
    with pytest.raises(SystemExit) as err:
        common.parse_config(grpo.Config, ["--lrr", "1e-3", "--group_size", "4"])
    out = capsys.readouterr().err
    assert err.value.code == 2 and out.count("\n") == 1 and "usage:" not in out
    assert "unrecognized argument --lrr (did you mean --lr?)" in out
    with pytest.raises(SystemExit):
        common.parse_config(grpo.Config, ["--max_steps", "-3"])
    assert "--max_steps -3: must be at least 0" in capsys.readouterr().err


def test_help_shows_each_fields_comment_and_no_section_banners():
    p = run("grpo.py", "--help")
    assert "---" not in p.stdout  # the Config's "# --- run ---" banners are not option help
    assert "where the builtin base model is built and cached (default" in " ".join(p.stdout.split())
    assert "GRPO: group-relative policy optimisation, the on-policy RL baseline (and the template of every fusion " \
           "trainer in this repository)." in " ".join(p.stdout.split())  # the docstring's whole first paragraph


def test_config_flags_given_and_list_values():
    import common
    import grpo
    cfg = common.parse_config(grpo.Config, ["--eval_data", "a.jsonl:32", "b.jsonl", "--eval_data", "c.parquet",
                                            "--lr=1e-6", "--no-adv_std"])
    assert cfg.eval_data == ["a.jsonl:32", "b.jsonl", "c.parquet"] and cfg.lr == 1e-6 and cfg.adv_std is False
    assert common.given_flags(cfg) == {"eval_data", "lr", "adv_std"}
    default = common.parse_config(grpo.Config, [])
    assert default.eval_data == ["auto"] and common.given_flags(default) == set()
    default.data = "train.jsonl"  # file data: the laptop defaults that differ from GPU_RUN
    assert common.laptop_defaults(default, grpo.GPU_RUN)[:3] == [
        "--lr 0.0002 (paper: 1e-6)", "--prompts_per_step 16 (paper: 128)", "--prompts_per_minibatch 8 (paper: 64)"]
    assert "--adv_std (paper: --no-adv_std)" in common.laptop_defaults(default, grpo.GPU_RUN)
    assert "--lr_schedule cosine (paper: constant)" in common.laptop_defaults(default, grpo.GPU_RUN)
    assert not any(x.startswith("--lr ") or "adv_std" in x for x in common.laptop_defaults(cfg, grpo.GPU_RUN))  # given


def test_file_data_gets_the_papers_budgets_and_says_so(tiny_model_dir, tmp_path):
    model = tmp_path / "long_model"  # the tiny model with positions for the papers' 1024 + 8192 tokens
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+1=?", "answer": i + 1}) + "\n" for i in range(5)))
    out = tmp_path / "f"
    p = run("grpo.py", "--model", str(model), "--data", str(data), "--output_dir", str(out), "--max_steps", "0",
            "--no-compile", "--verifier_workers", "0")  # max_steps 0: set up, then stop
    assert "train.jsonl: 5 of 5 answers were JSON numbers; converted to text" in p.stdout
    assert "file data: --max_prompt_len 1024 and --max_response_len 8192 tokens (the papers' budgets" in p.stdout
    assert "no evaluation: file data has no held-out set of its own; name one or more with --eval_data" in p.stdout
    assert ("file data with laptop defaults you did not set: --lr 0.0002 (paper: 1e-6), --prompts_per_step 16 "
            "(paper: 128)") in p.stdout and "grpo.py's docstring" in p.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["max_prompt_len"] == 1024 and config["max_response_len"] == 8192 and config["eval_data"] == ["none"]
    assert metrics(out) == [{"step": 0, "train_rows": 5.0, "train_prompts_dropped": 0.0, "train_demos_truncated": 0.0,
                             "verifier_timeout_share": 0.0}]


def test_sft_reads_no_answer_and_counts_truncated_demonstrations(tiny_model_dir, tmp_path):
    import builtin_task
    from transformers import AutoTokenizer
    data = tmp_path / "demos.jsonl"  # no answer field: SFT does not need one; level-4 demos exceed 24 tokens
    rows = builtin_task.make_task(4, seed=0, levels=(1, 4))
    data.write_text("".join(json.dumps({"problem": r["problem"], "demo": r["demo"]}) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    longer = sum(len(tok(r["demo"], add_special_tokens=False)["input_ids"]) + 1 > 24 for r in rows)
    assert 0 < longer < 8
    out = tmp_path / "s"
    p = run("sft.py", "--model", tiny_model_dir, "--data", str(data), "--output_dir", str(out), "--no-compile",
            "--max_steps", "1", "--batch_size", "8", "--max_prompt_len", "64", "--max_response_len", "24",
            "--system_prompt", "", "--verifier_workers", "0")
    lines = metrics(out)
    truncated = lines[0]["train_demos_truncated"]
    assert truncated == longer and f"demos.jsonl: {longer} of 8 demonstrations are longer than --max_response_len 24" \
        in p.stdout
    assert lines[1]["truncated_frac"] == truncated / 8  # the batch is the whole file


def _wait_for_step(path, step, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()[-2000:]}\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no step logged in time")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_model_dir, tmp_path):
    out = tmp_path / "int"
    args = small(tiny_model_dir, None, out, *GRPO, "--eval_data", "none", "--save_every", "0")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "grpo.py"), *args, "--max_steps", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1"))
    _wait_for_step(out / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr
    step = metrics(out)[-1]["step"]
    ckpt = out / f"checkpoint-{step:06d}"
    assert ckpt.is_dir() and step < 500
    said = [line for line in stderr.splitlines() if "SIGINT" in line]
    assert said == ["SIGINT: saving a checkpoint at the end of this step, then exiting (Ctrl-C again exits at once)",
                    f"SIGINT: stopped after step {step} and saved {ckpt}; continue with --resume"], said
    p = run("grpo.py", *args, "--max_steps", str(step + 1), "--resume")
    assert f"resumed from {ckpt} (step {step})" in p.stdout
    assert [m["step"] for m in metrics(out)] == list(range(step + 2))


def test_second_signal_exits_at_once(tiny_model_dir, tmp_path):
    out = tmp_path / "twice"
    args = small(tiny_model_dir, None, out, *GRPO, "--eval_data", "none", "--max_steps", "500", "--save_every", "0",
                 "--group_size", "16", "--max_response_len", "64")  # slower steps: the 2nd signal comes mid-step
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "grpo.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1"))
    _wait_for_step(out / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    while "SIGTERM: saving a checkpoint" not in proc.stderr.readline():  # acknowledged: send the second one
        assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    assert "SIGTERM: exiting now; the newest checkpoint is kept" in stderr
    assert not list(out.glob("checkpoint-*"))  # it did not wait for the end of the step to save


# The flags that name a run's model, data and output: in the 8-GPU commands, not in GPU_RUN (not settings).
RUN_FLAGS = {"model", "data", "eval_data", "prompt_key", "answer_key", "demo_key", "output_dir", "seed"}


@pytest.mark.parametrize("script", ["sft", "grpo", "luffy", "srft", "relift", "uft", "bread", "prefix_rft"])
def test_docstring_paper_command_lists_exactly_paper(script):
    """Each trainer's GPU_RUN (data, used for the laptop-defaults line) is what its docstring's 8-GPU command
    says (prose, for the reader): the same flags with the same values."""
    import dataclasses
    import importlib
    import typing

    module = importlib.import_module(script)
    doc = module.__doc__
    tokens = doc[doc.index("--nproc_per_node 8 "):].split("#", 1)[0].replace("\\\n", " ").split()[3:]
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    hints = typing.get_type_hints(module.Config)
    flags, i = {}, 0
    while i < len(tokens):
        assert tokens[i].startswith("--"), (script, tokens[i])
        name = tokens[i][2:]
        if name.startswith("no-") and name[3:] in fields:
            flags[name[3:]], i = False, i + 1
        elif hints[name] is bool:
            flags[name], i = True, i + 1
        else:
            tp = hints[name]
            flags[name], i = (tokens[i + 1] if typing.get_origin(tp) is typing.Literal else tp(tokens[i + 1])), i + 2
    assert {k: v for k, v in flags.items() if k not in RUN_FLAGS} == module.GPU_RUN
    assert all(k in fields for k in module.GPU_RUN)
