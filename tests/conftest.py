import json
import os
import signal
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # The suite compiles into its own torch.compile cache under the checkout (.cache/, ignored by git), keyed by the
    # kernel path (lm_head.compile_cache_dir): a kernel another run left in the machine-wide default aborted the
    # whole suite once (SIGABRT inside a compiled backward, CI exit 134). The trainers the tests start inherit it.
    from lm_head import compile_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir(os.path.join(ROOT, ".cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2 + the builtin tokenizer, saved in HF format (no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    import builtin_task

    path = tmp_path_factory.mktemp("tiny_model")
    tok = builtin_task.build_tiny_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(builtin_task.tiny_model_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def small_eval_file(tmp_path_factory):
    """Eight held-out builtin problems as a .jsonl file (exercises the file loader)."""
    import builtin_task

    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    rows = builtin_task.make_task(2, seed=builtin_task.EVAL_SEED)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Every test leaves the pytest process as it found it: signal handlers, threads, torch's threads
# ---------------------------------------------------------------------------------------------

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


def _process_state():
    import torch

    return {"handlers": {s.name: signal.getsignal(s) for s in SIGNALS},
            "torch threads": torch.get_num_threads(), "torch.set_num_threads": torch.set_num_threads,
            "alarm": signal.alarm(0)}


@pytest.fixture(autouse=True)
def leaves_the_process_as_it_found_it(request):
    """After every test: the signal handlers, torch's thread count and set_num_threads are as before, no
    alarm is pending, and no thread the test started is still running (a grading pool's, a stray worker's).
    A test that changed one fails, naming what it left, and the state is put back so later tests do not
    inherit it: a SIGTERM handler left in pytest's process turns a SIGTERM into SystemExit inside whatever
    test runs next, and the suite no longer stops. A test that calls common.setup in this process asks for
    `trainer_in_process`, which restores what setup installs."""
    import torch

    before, threads = _process_state(), set(threading.enumerate())
    if before["alarm"]:
        signal.alarm(before["alarm"])
    yield
    after = _process_state()
    left = [k for k in before if k != "alarm" and after[k] != before[k]]
    left += ["a pending SIGALRM"] if after["alarm"] else []
    for s in SIGNALS:
        signal.signal(s, before["handlers"][s.name])
    torch.set_num_threads = before["torch.set_num_threads"]
    torch.set_num_threads(before["torch threads"])
    running = [t for t in set(threading.enumerate()) - threads if t.is_alive() and not _lives_on(t)]
    for t in running:  # a pool's threads end a moment after its close() returns
        t.join(timeout=5)
    running = [t.name for t in running if t.is_alive()]
    left += [f"running threads {running}"] if running else []
    if left:
        pytest.fail(f"{request.node.nodeid} left the process changed: {', '.join(left)} "
                    f"(was {[before[k] for k in left if k in before]}, is {[after[k] for k in left if k in after]})",
                    pytrace=False)


def _lives_on(thread) -> bool:
    """tqdm's monitor thread: one per process, started by the first progress bar, meant to outlive it;
    torch.compile's compile pool, started by the first compile that misses the cache and kept for the process;
    and a thread a test abandons on purpose and says so (`thread.abandoned = True`)."""
    from tqdm._monitor import TMonitor

    if isinstance(thread, TMonitor) or getattr(thread, "abandoned", False):
        return True
    inductor = sys.modules.get("torch._inductor.async_compile")
    if inductor is None or inductor.AsyncCompile.pool.cache_info().currsize == 0:
        return False
    return thread in getattr(inductor.AsyncCompile.pool(), "_threads", ())


@pytest.fixture
def trainer_in_process():
    """For a test that calls common.setup in pytest's own process: what setup installs (Ctrl-C / SIGTERM
    handlers, a process group, vLLM engines) is undone afterwards, as a trainer's exit would."""
    import common
    import run_dir

    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    yield
    common.shutdown()
    run_dir.interrupts.signum, run_dir.interrupts.training, run_dir.interrupts.main = 0, False, True
    for s, h in handlers.items():
        signal.signal(s, h)
