"""Faults a long run meets (docs/runs.md, "Faults"): a non-finite loss, a bad output directory, a
checkpoint write that fails, paths that do not exist. Each is detected, said in one line, and loses
nothing that was already saved."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import run_dir
from test_cli import GRPO, ROOT, metrics, run, small

WORKERS = os.path.join(ROOT, "tests", "workers")


def optimizer_state(ckpt) -> dict:
    """A checkpoint's optimizer state (DCP shards) as one flat dict of tensors and numbers."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = ckpt.parent / f"{ckpt.name}-optim.pt"
    dcp_to_torch_save(str(ckpt / "optim"), str(target))
    state = torch.load(target, weights_only=True)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = x
    walk("", state)
    return flat


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def weights(ckpt) -> dict:
    return load_file(str(ckpt / "model" / "model.safetensors"))


# ---------------------------------------------------------------------------------- numerical faults

def test_a_non_finite_gradient_skips_the_update():
    """optimizer_step on NaN gradients: no change to the weights, the optimizer's moments and step
    count, or the learning-rate schedule; the skip is counted for Run.end_step (step_metrics' skipped_updates,
    from the norms optimizer_step returns)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(3, 4)).sum().backward()
    norms = [common.optimizer_step(model, opt, sched, 1.0)]  # a good step: Adam has state now
    before = ({k: v.clone() for k, v in model.state_dict().items()}, str(opt.state_dict()), sched.state_dict())
    (model(torch.randn(3, 4)).sum() * float("nan")).backward()
    norms.append(common.optimizer_step(model, opt, sched, 1.0))
    assert norms[-1] != norms[-1] and skipped(norms) == 1  # NaN norm, counted
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert str(opt.state_dict()) == before[1] and sched.state_dict() == before[2]
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradient is gone
    model(torch.randn(3, 4)).sum().backward()
    norms.append(common.optimizer_step(model, opt, sched, 1.0))  # a good step after it trains as usual
    assert not torch.equal(model.weight, before[0]["weight"]) and sched.last_epoch == 2
    assert skipped(norms) == 1


def skipped(grad_norms: list[float]) -> int:
    """skipped_updates as step_metrics logs it for a step whose optimizer steps returned grad_norms."""
    mask = torch.ones(1, 2)
    micro = [{"response_mask": mask, "old_entropy": torch.zeros(1, 2), "attention_mask": mask,
              "input_ids": torch.zeros(1, 2, dtype=torch.long)}]
    metrics = common.step_metrics([{"loss": torch.tensor(0.0)}], [], torch.zeros(0), micro, grad_norms, 1e-3,
                                  0.0, 1.0, 2.0)
    return metrics["skipped_updates"]


def fault_run(kind, steps, script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(WORKERS, "fault_run.py"), kind, steps,
                           os.path.join(ROOT, script), *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)


def test_nan_steps_are_skipped_logged_and_k_in_a_row_stop_the_run(tiny_model_dir, tmp_path):
    """A real GRPO run whose loss is NaN at steps 2, 4 and 5, --max_bad_steps 2: step 2's updates are
    skipped (weights and optimizer as after step 1), step 3 trains, steps 4-5 are skipped and the run
    saves and stops after step 5 with one message; --resume then goes on."""
    out = tmp_path / "nan"
    args = small(tiny_model_dir, None, out, *GRPO, "--eval_data", "none", "--save_every", "1",
                 "--keep_checkpoints", "0", "--max_steps", "6", "--max_bad_steps", "2", "--lr", "1e-3",
                 "--entropy_coef", "0.01")  # a gradient even when all rewards of a group are equal
    p = fault_run("nan", "2,4,5", "grpo.py", *args)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4, 5]
    assert [m["skipped_updates"] for m in lines[1:]] == [0, 2, 0, 2, 2]  # two mini-batches per step
    assert lines[2]["grad_norm"] != lines[2]["grad_norm"] and lines[3]["grad_norm"] > 0  # NaN, then finite
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: step")]
    assert len(warnings) == 3 and warnings[0].startswith(
        "warning: step 2: non-finite loss or gradient: skipped 2 updates (weights and optimizer unchanged; "
        "1 step in a row); rows of builtin in this step: ")
    assert "2 steps in a row" in warnings[2]
    rows = [int(r) for r in warnings[0].rsplit(": ", 1)[1].split(", ")]
    assert len(rows) == 4 and len(set(rows)) == 4  # the step's four prompts, by row number
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: stopped after step 5: 2 steps in a row had a non-finite loss or gradient and their updates were "
        f"skipped (--max_bad_steps 2); saved {out / 'checkpoint-000005'} (the skipped updates changed no weight). "
        "Look at the rows named above, lower --lr or --max_grad_norm, then continue with --resume")
    ckpt = [out / f"checkpoint-{s:06d}" for s in range(6)]
    assert not (out / "checkpoint-000006").exists()
    w = {s: weights(ckpt[s]) for s in (1, 2, 3, 4, 5)}
    assert same_state(w[1], w[2]) and same_state(w[3], w[4]) and same_state(w[3], w[5])
    assert not same_state(w[2], w[3])  # the good step between trained
    opt = {s: optimizer_state(ckpt[s]) for s in (1, 2, 3, 5)}
    assert same_state(opt[1], opt[2]) and same_state(opt[3], opt[5]) and not same_state(opt[2], opt[3])
    state = {s: torch.load(ckpt[s] / "trainer_state.pt", weights_only=True) for s in (1, 2, 5)}
    assert state[1]["schedulers"] == state[2]["schedulers"] and state[5]["bad_steps"] == 2
    p = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *args, "--resume"], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3, 4, 5, 6] and metrics(out)[-1]["skipped_updates"] == 0


# ---------------------------------------------------------------------------------- environment faults

def one_error_line(p) -> str:
    """A refusal: a non-zero exit, no traceback, and exactly one line on stderr, the error."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def plain_run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900, cwd=ROOT)


def test_an_output_dir_that_cannot_hold_a_run_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    out = tmp_path / "a_file" / "run"  # a file where a directory must be
    line = one_error_line(plain_run("grpo.py", *small(tiny_model_dir, None, out, "--max_steps", "1")))
    assert line.startswith(f"error: --output_dir {out} cannot hold a run: Not a directory")
    assert (tmp_path / "a_file").read_text() == "mine"
    for out in (tmp_path / "new" / "run", tmp_path / "old"):  # a full disk, a new and an existing directory
        (tmp_path / "old").mkdir(exist_ok=True)
        (tmp_path / "old" / "notes.txt").write_text("mine")
        line = one_error_line(fault_run("full", "-", "grpo.py", *small(tiny_model_dir, None, out, "--max_steps", "1")))
        assert line.startswith(f"error: --output_dir {out} cannot hold a run: No space left on device")
        assert "free space there" in line
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "old") == ["notes.txt"]


def grpo_args(model, out):
    return small(model, None, out, *GRPO, "--eval_data", "none", "--save_every", "1", "--keep_checkpoints", "1")


@pytest.fixture(scope="module")
def one_step(tiny_model_dir, tmp_path_factory):
    """A 1-step GRPO run with its checkpoint, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    p = plain_run("grpo.py", *grpo_args(tiny_model_dir, out), "--max_steps", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(one_step, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    args = grpo_args(tiny_model_dir, out)
    ckpt = out / "checkpoint-000001"
    before = {f: (ckpt / f).read_bytes() for f in map(str, ckpt.rglob("*")) if os.path.isfile(ckpt / f)}
    p = fault_run("savefail", "2", "grpo.py", *args, "--max_steps", "3", "--resume")
    line = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert line == (f"error: writing checkpoint-000002 failed: No space left on device "
                    f"({out / 'checkpoint-000002.tmp' / 'trainer_state.pt'}); the previous checkpoint {ckpt} is "
                    "intact: fix the cause and continue with --resume")
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-000001", "config.json", "metrics.jsonl", "probe.jsonl"]
    assert {f: (ckpt / f).read_bytes() for f in before} == before  # byte for byte, nothing rotated away
    p = plain_run("grpo.py", *args, "--max_steps", "3", "--resume")
    assert p.returncode == 0 and f"resumed from {ckpt} (step 1)" in p.stdout, p.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000003"]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_checkpoint_write_that_fails_on_one_rank_stops_every_rank_and_says_why(failing, tiny_model_dir, tmp_path):
    """Two ranks, the step-2 checkpoint's write failing on one rank only, its disk full: on rank 0 its model is
    written and its trainer state is not, while rank 1 writes its shards and waits for it; on rank 1 its random
    state. The failing rank says why in one line (rank 1 used to exit without a word, and the one line came from
    rank 0: "Connection closed by peer"), torchrun stops the other (no rank waits forever), and the step-1
    checkpoint is left whole, the one --resume continues from."""
    out = tmp_path / "run"
    p = run("tests/workers/fault_run.py", "savefail", f"2@{failing}", os.path.join(ROOT, "grpo.py"),
            *grpo_args(tiny_model_dir, out), "--max_steps", "3", check=False, nproc=2)
    ckpt, tmp = out / "checkpoint-000001", out / "checkpoint-000002.tmp"
    file = "trainer_state.pt" if failing == 0 else "rng-rank1.pt"
    line = (f"error: {'rank 1: ' if failing else ''}writing checkpoint-000002 failed: No space left on device "
            f"({tmp / file}); the previous checkpoint {ckpt} is intact: fix the cause and continue with --resume")
    ours = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode != 0 and line in ours, p.stderr[-3000:]
    # the other rank, waiting in a collective, stops without a word, or (rank 0) says that another rank stopped
    # when the collective fails before torchrun has stopped it
    assert all(x == line or x.startswith("error: writing checkpoint-000002 stopped in a collective: ") and
               failing == 1 for x in ours), ours
    assert "[rank" not in p.stderr  # no rank's traceback, only torchrun's report of the exit codes
    assert run_dir.latest_checkpoint(str(out)) == str(ckpt) and run_dir.checkpoint_ranks(str(ckpt)) == 2
    assert sorted(os.listdir(ckpt)) == ["model", "optim", "rng-rank0.pt", "rng-rank1.pt", "trainer_state.pt"]
    assert [m["step"] for m in metrics(out)] == [0, 1, 2]  # --resume cuts step 2 back to the checkpoint's


@pytest.mark.parametrize("case", ["no model", "no data", "unknown type", "bad json"])
def test_missing_or_unreadable_inputs_get_one_line_and_nothing_is_written(case, tiny_model_dir, tmp_path):
    model, data = tiny_model_dir, "builtin"
    if case == "no model":
        model = str(tmp_path / "no-such-model")
    elif case == "no data":
        data = str(tmp_path / "no-such-file.jsonl")
    elif case == "unknown type":
        data = str(tmp_path / "train.csv")
        (tmp_path / "train.csv").write_text("problem,answer\n1+1,2\n")
    else:
        data = str(tmp_path / "train.jsonl")
        (tmp_path / "train.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    out = tmp_path / "out"
    line = one_error_line(plain_run("grpo.py", *small(model, None, out, "--data", data, "--max_steps", "1")))
    assert {"no model": f"error: cannot read the model config of --model {model}",
            "no data": f"error: data file not found: {data}",
            "unknown type": f"error: unsupported file type {data}; use a .jsonl, .json or .parquet file",
            "bad json": f"error: cannot read {data} as jsonl: line 2 is not valid JSON"}[case] in line
    assert not out.exists()


# ---------------------------------------------------------------------------------- safety

class Planted:
    """A pickle that runs a command as it loads (what a tampered checkpoint could hold)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_not_loaded(one_step, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_step, out)
    ckpt, marker = out / "checkpoint-000001", tmp_path / "ran"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    torch.save({**state, "data": Planted(marker)}, ckpt / "trainer_state.pt")
    p = plain_run("grpo.py", *grpo_args(tiny_model_dir, out), "--max_steps", "2", "--resume")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: {ckpt} holds more than tensors and plain data, which could run code as it loads (Trying to load "
        "unsupported GLOBAL posix.system whose module posix is blocked.); not loading it. Resume only checkpoints "
        "this code wrote")
    assert not marker.exists() and [m["step"] for m in metrics(out)] == [0, 1]
    # DCP unpickles its metadata with plain pickle: ours reads it as data first
    with open(ckpt / "optim" / ".metadata", "wb") as f:
        pickle.dump(Planted(marker), f)
    with pytest.raises(pickle.UnpicklingError, match="posix.system has no place in a checkpoint"):
        run_dir.safe_dcp_load({}, str(ckpt / "optim"))
    assert not marker.exists()


def test_pickled_weights_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    model = tmp_path / "bin_model"
    shutil.copytree(tiny_model_dir, model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    line = one_error_line(plain_run("grpo.py", *small(str(model), None, out, "--max_steps", "1")))
    assert line.startswith(f"error: --model {model} has no .safetensors weights (it has ")
    assert "pytorch_model.bin" in line and "can run code as it loads" in line and not out.exists()


def test_code_shipped_with_a_model_never_runs(tiny_model_dir, tmp_path):
    """trust_remote_code is never turned on: a model directory whose config.json points at its own
    Python code (auto_map) is loaded with transformers' built-in architecture, and that code never runs."""
    import json
    from transformers import AutoTokenizer
    model, marker = tmp_path / "own_code", tmp_path / "ran"
    shutil.copytree(tiny_model_dir, model)
    (model / "own.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                  "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
                                  "class OwnConfig(Qwen2Config): pass\n"
                                  "class OwnModel(Qwen2ForCausalLM): config_class = OwnConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "own.OwnConfig", "AutoModelForCausalLM": "own.OwnModel"}
    (model / "config.json").write_text(json.dumps(config))
    common.check_context_length(str(model), 64)
    common.check_model_files(str(model))
    policy = common.load_policy(str(model), common.Dist(), compile=False)
    AutoTokenizer.from_pretrained(str(model))
    assert type(policy.lm).__name__ == "Qwen2ForCausalLM" and not marker.exists()


def test_closing_a_grader_whose_fork_server_died_does_not_hang(monkeypatch, capfd):
    """SIGTERM to a run's whole process group can kill the grading pool's fork server (its workers ignore SIGTERM,
    the server does not). The pool's worker-handler thread then dies replacing a worker, and a worker can die
    holding the task queue's lock, which Pool.terminate takes before it kills anyone: a trainer that had saved
    never exited (CI's kill test, twice). Both are made certain here: the pool's context cannot start a process
    (as with the server gone), and the queue's lock stays taken. close must return, kill the workers, and say so."""
    import threading
    import time

    monkeypatch.setattr(common, "POOL_CLOSE_S", 2)
    v = common.Verifier(num_workers=1)
    pool = v.start()

    def no_server(*args, **kwargs):
        raise ConnectionRefusedError("the fork server is gone")
    monkeypatch.setattr(pool._ctx, "Process", no_server)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the handler's dying traceback
    pool._pool[0].kill()  # a worker to replace; an idle worker holds the queue's lock while it waits
    deadline = time.time() + 30
    while pool._worker_handler.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not pool._worker_handler.is_alive(), "the worker handler should have died replacing the worker"
    lock = pool._inqueue._rlock
    ours = lock.acquire(timeout=1)  # False: the killed worker died holding it
    try:
        closing = threading.Thread(target=v.close, daemon=True)
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "Verifier.close hung on a pool whose fork server died"
        assert "the grading pool did not shut down within 2 s" in capfd.readouterr().err
        assert v._pool is None
    finally:
        if ours:
            lock.release()  # lets the abandoned terminate finish
        for t in threading.enumerate():  # close gave up on its Pool.terminate, as it must here: it may run on
            if t.name.endswith("(terminate)"):
                t.abandoned = True


@pytest.mark.parametrize("how", ["start", "start_in_background"])  # evaluate.py's way; the trainers' way
def test_sigterm_to_the_group_leaves_the_grading_fork_server_alive(how):
    """The fork server is spawned ignoring SIGTERM, as its workers do: a SIGTERM to the run's whole process group
    (Slurm) no longer kills it, so the pool can still replace a worker and shut down cleanly. The trainers start
    the pool on a thread, where signals cannot be changed: the server must be spawned before it."""
    import multiprocessing.forkserver
    import signal
    import time

    server = multiprocessing.forkserver._forkserver
    if server._forkserver_pid is not None:  # start a fresh one, as a trainer's first verifier does
        os.kill(server._forkserver_pid, signal.SIGKILL)
        time.sleep(0.2)
    v = common.Verifier(num_workers=1)
    if how == "start":
        pool = v.start()
    else:
        v.start_in_background().join()
        pool = v.start()
    pid = server._forkserver_pid
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    with open(f"/proc/{pid}/status") as f:
        state = next(line for line in f if line.startswith("State:"))
    assert "Z" not in state, "the fork server died of SIGTERM"
    # Kill the worker while it runs a task (an idle one would die holding the queue's lock, and nothing could
    # run after it): the pool replaces it from the same server, and the replacement grades.
    pool.apply_async(time.sleep, (60,))
    time.sleep(0.5)
    pool._pool[0].kill()
    assert pool.apply_async(os.getppid).get(timeout=30) == pid
    assert v(["<think>x</think> \\boxed{\\frac{1}{2}}"], ["0.5"]) == [1.0]  # math-verify's, in that worker
    t0 = time.time()
    v.close()
    assert time.time() - t0 < common.POOL_CLOSE_S  # it shut down, not the bound
