"""The run directory's rules (docs/runs.md): --overwrite removes the old run,
--resume continues only the same trainer's run with the same settings, one process at a time, a torn
metrics line is dropped, a finished run says so."""
import fcntl
import json
import os
import shutil

import pytest

from test_cli import GRPO, metrics, run, small


def grpo(model, out, *extra, check=True):
    return run("grpo.py", *small(model, None, out, *GRPO, "--eval_data", "none", "--save_every", "1", *extra),
               check=check)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A 2-step GRPO run with checkpoints at steps 1 and 2, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("run_dir") / "grpo"
    grpo(tiny_model_dir, out, "--max_steps", "2")
    return out


def copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_overwrite_removes_the_old_run(finished, tiny_model_dir, tmp_path):
    out = copy(finished, tmp_path)
    (out / "notes.txt").write_text("mine")  # not the trainer's: kept
    p = grpo(tiny_model_dir, out, "--max_steps", "1", "--overwrite")
    assert "--overwrite: removed the run in" in p.stdout
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-000001"]
    assert [m["step"] for m in metrics(out)] == [0, 1]
    assert (out / "notes.txt").read_text() == "mine"
    p = grpo(tiny_model_dir, out, "--max_steps", "2", "--resume")  # continues the new run, not the old one
    assert "resumed from" in p.stdout and "checkpoint-000001" in p.stdout
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]


def test_another_trainer_does_not_resume_the_run(finished, tiny_model_dir, tmp_path):
    out = copy(finished, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    p = run("sft.py", *small(tiny_model_dir, None, out, "--eval_data", "none", "--resume"), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "holds a run of grpo.py" in p.stderr
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_on_another_number_of_ranks_is_refused_in_one_line(finished, tiny_model_dir, tmp_path):
    """Each rank's random state is in the checkpoint: a 1-rank run resumed on 2 ranks is refused by rank 0 before
    any model loads (rank 1 alone used to find no state of its own and exit silently, rank 0 then failing in a
    collective with a traceback)."""
    out = copy(finished, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    p = run("grpo.py", *small(tiny_model_dir, None, out, *GRPO, "--eval_data", "none", "--save_every", "1",
                              "--max_steps", "3", "--resume"), check=False, nproc=2)
    ours = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and ours == [
        f"error: {out / 'checkpoint-000002'} was written by a run on 1 rank and this one has 2: resume it on 1 (each "
        "rank's random state is in the checkpoint), or start a new run with another --output_dir"], p.stderr[-3000:]
    assert "[rank" not in p.stderr  # no rank's traceback, only torchrun's report of the exit codes
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_with_changed_settings_is_refused_and_the_config_kept(finished, tiny_model_dir, tmp_path):
    out = copy(finished, tmp_path)
    config = (out / "config.json").read_text()
    p = grpo(tiny_model_dir, out, "--max_steps", "3", "--resume", "--lr", "1e-3", "--group_size", "4", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--lr 0.001 (the run's: 0.0002)" in p.stderr and "--group_size 4 (the run's: 3)" in p.stderr
    assert (out / "config.json").read_text() == config


def test_a_second_process_cannot_write_the_same_run(finished, tiny_model_dir, tmp_path):
    out = copy(finished, tmp_path)
    with open(out / ".lock", "a+") as held:  # another run holds the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = grpo(tiny_model_dir, out, "--max_steps", "3", "--resume", check=False)
    assert p.returncode != 0 and "another process is writing a run in" in p.stderr
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]


def test_a_torn_metrics_line_is_dropped_on_resume(finished, tiny_model_dir, tmp_path):
    out = copy(finished, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a write cut by a crash
    p = grpo(tiny_model_dir, out, "--max_steps", "3", "--resume")
    assert "dropped 1 torn line" in p.stdout
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3]


def test_resuming_a_finished_run_says_so(finished, tiny_model_dir, tmp_path):
    out = copy(finished, tmp_path)
    p = grpo(tiny_model_dir, out, "--max_steps", "2", "--resume")
    assert "is complete" in p.stdout and "raise --max_steps" in p.stdout
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2


def test_a_checkpoint_directory_is_a_model(finished, tmp_path):
    """--model checkpoint-N/ (what a run writes) loads its model/ (what transformers reads)."""
    ckpt = finished / "checkpoint-000002"
    p = grpo(str(ckpt), tmp_path / "next", "--max_steps", "1")
    assert f"--model {ckpt} is a checkpoint: loading {ckpt / 'model'}" in p.stdout
    assert [m["step"] for m in metrics(tmp_path / "next")] == [0, 1]


def test_a_model_without_tokenizer_stops_before_anything_is_written(tiny_model_dir, small_eval_file, tmp_path):
    model = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    p = grpo(str(model), tmp_path / "out", "--max_steps", "1", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and not (tmp_path / "out").exists()
    assert f"--model {model} has no tokenizer: it needs tokenizer.json" in p.stderr
    assert "has config.json, generation_config.json, model.safetensors" in p.stderr
    p = run("evaluate.py", "--model", str(model), "--data", small_eval_file, "--output_dir", str(tmp_path / "ev"),
            "--max_prompt_len", "64", "--max_response_len", "24", check=False)
    assert p.returncode != 0 and "has no tokenizer" in p.stderr and "Traceback" not in p.stderr
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.json"), model)  # a tokenizer without its chat template
    p = grpo(str(model), tmp_path / "out", "--max_steps", "1", check=False)
    assert p.returncode != 0 and "its tokenizer has no chat template" in p.stderr and not (tmp_path / "out").exists()
