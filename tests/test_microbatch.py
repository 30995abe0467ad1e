"""Micro-batches by tokens (--micro_batching tokens): the grouping, the packed layout, and every trainer's loss
and gradient unchanged by how a step is cut, on 2 gloo ranks whose micro-batch counts differ before they agree."""
import json
import os
import random
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import common
from test_cli import GRPO, metrics, run, small
from test_fsdp import ROOT_PATH, _free_port

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "microbatch_worker.py")


def plan(mode, size=3, tokens=0):
    return SimpleNamespace(micro_batching=mode, micro_batch_size=size, micro_batch_tokens=tokens, max_prompt_len=8,
                           max_response_len=12)


# =============================================================================================
# The grouping
# =============================================================================================


def test_token_groups_by_hand():
    # totals 10, 3, 5, 9, 2: longest first 0, 3, 2, 1, 4; [0, 3] pads to 2 x (2 + 8) = 20, the budget
    lengths = [(2, 8), (2, 1), (3, 2), (2, 7), (1, 1)]
    assert common.token_groups(lengths, 20) == [[0, 3], [2, 1, 4]]  # 20 + 3 x (3 + 2) = 35 tokens
    assert common.token_groups(lengths, 1) == [[0], [3], [2], [1], [4]]  # over the budget: one each
    assert common.token_groups(lengths, 10**6) == [[0, 3, 2, 1, 4]]
    assert common.token_groups(lengths, 20, packed=True) == [[0, 3], [2, 1, 4]]  # sums 19 and 10; ties: fuller first
    # the fewest micro-batches, then the least padding: not [long, short] + [short, short] (12 + 4 tokens),
    # which filling each up to the budget gives, but [long] + [short x 3] (6 + 6 tokens)
    assert common.token_groups([(1, 5), (1, 1), (1, 1), (1, 1)], 12) == [[0], [1, 2, 3]]
    assert common.token_groups([(1, 1)] * 4, 4) == [[0, 1], [2, 3]]  # equal lengths keep rollout order
    assert common.batch_tokens([(2, 0), (1, 3)]) == 2 * (2 + 3) and common.batch_tokens([(2, 0)]) == 3  # R >= 1
    assert common.batch_tokens([(2, 0), (1, 3)], packed=True) == 6


def test_sequences_and_auto_on_cpu_cut_as_before():
    steps = [[(3, 1)] * 7, [(1, 9)] * 7]
    fixed = [[[0, 1, 2], [3, 4, 5], [6]]] * 2
    assert common.micro_batch_groups(steps, 3, "cpu") == fixed
    assert common.micro_batch_groups(steps, plan("sequences"), "cpu") == fixed
    assert common.micro_batch_groups(steps, plan("auto"), "cpu") == fixed  # CPU runs stay bit-identical
    assert common.micro_batch_plan(plan("auto"), "cuda") == (3, 3 * (8 + 12))  # GPU: tokens, the fixed-size bound
    assert common.micro_batch_plan(plan("tokens", tokens=50), "cpu") == (3, 50)
    assert common.micro_batch_groups(steps, plan("tokens", tokens=28), "cpu") == [
        [[0, 1, 2, 3, 4, 5, 6]], [[0, 1], [2, 3], [4, 5], [6]]]  # 7 x 4 and 2 x 10 tokens


def _sample(i, prompt_len, prefix_len, generated_len):
    return common.Sample([100 + i] * prompt_len, [7] * prefix_len, [8 + i] * generated_len, "", True)


def test_minibatches_by_tokens_keep_every_tensor_with_its_sample():
    """Samples sorted by length across micro-batches: each row's advantage, prefix mask and tokens are its own
    sample's, and each optimizer step holds exactly its own samples."""
    rng = random.Random(0)
    samples = [_sample(i, rng.randint(1, 4), rng.randint(0, 2), rng.randint(0, 9)) for i in range(12)]
    adv = torch.arange(12.0)
    out = common.minibatches(samples, {"advantages": adv}, 2, plan("tokens", tokens=30), 0, "cpu")
    assert sum(len(m) for m in out) > 2  # cut by the budget, not one micro-batch a step
    for m, minibatch in enumerate(out):
        seen = []
        for mb in minibatch:
            assert common.batch_tokens([(len(samples[int(a)].prompt_ids), len(samples[int(a)].response_ids))
                                        for a in mb["advantages"]]) <= 30 or len(mb["advantages"]) == 1
            for row, a in enumerate(mb["advantages"].tolist()):
                s, n = samples[int(a)], int(mb["response_mask"][row].sum())
                seen.append(int(a))
                assert mb["input_ids"][row, mb["input_ids"].shape[1] - mb["response_mask"].shape[1] - 1] == 100 + a
                assert n == len(s.response_ids) and mb["prefix_mask"][row].sum() == len(s.prefix_ids)
                assert mb["input_ids"][row, -mb["response_mask"].shape[1]:][:n].tolist() == s.response_ids
        assert sorted(seen) == list(range(6 * m, 6 * m + 6))


# =============================================================================================
# Packing: several sequences in one row, position_ids restarting, no 2-D mask
# =============================================================================================


def _model(dtype):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return common.PolicyModel(AutoModelForCausalLM.from_config(cfg).to(dtype), compile=False)


def _ragged(seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 97) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    return prompts, [[rng.randrange(3, 97) for _ in range(n)] for n in (0, 1, 7, 3, 12)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(dtype, tol):
    """float64: equal to rounding; float32: the masked attention sums over different widths, ~1e-7 relative on
    log-probs of ~5 (2e-6 leaves room for the kernels of AVX2 vs AVX-512 machines)."""
    model = _model(dtype)
    prompts, responses = _ragged()
    out = {}
    for packed in (False, True):
        mb = common.make_batch(prompts, responses, 0, "cpu", prefix_lens=[0, 1, 2, 0, 3], packed=packed)
        logp, entropy = model(**common.model_inputs(mb), with_entropy=True)
        ((logp * mb["response_mask"]).sum() + 0.1 * entropy.sum()).backward()
        out[packed] = (mb, logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    (pad, lp, ep, gp), (pack, lk, ek, gk) = out[False], out[True]
    assert pack["input_ids"].shape == (1, sum(map(len, prompts)) + sum(map(len, responses)))  # no padding
    assert torch.equal(pad["response_mask"], pack["response_mask"]) and torch.equal(pad["prefix_mask"],
                                                                                    pack["prefix_mask"])
    torch.testing.assert_close(lk, lp, rtol=0, atol=tol * 10)
    torch.testing.assert_close(ek, ep, rtol=0, atol=tol * 10)
    for a, b in zip(gk, gp):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_packing_without_restarting_positions_would_be_caught():
    """The check above can fail: with positions running on across the row (one long sequence to transformers),
    the sequences attend to each other and the log-probs move by far more than rounding."""
    model = _model(torch.float64)
    prompts, responses = _ragged()
    pad = common.make_batch(prompts, responses, 0, "cpu")
    pack = common.make_batch(prompts, responses, 0, "cpu", packed=True)
    pack["position_ids"] = torch.arange(pack["input_ids"].shape[1])[None]
    with torch.no_grad():
        gap = (model(**common.model_inputs(pad))[0] - model(**common.model_inputs(pack))[0]).abs().max()
    assert gap > 1e-3


# =============================================================================================
# Every trainer on 2 gloo ranks: the same loss and gradient however a step is cut
# =============================================================================================


def _torchrun(tmp_path, mode, timeout):
    """The worker under torchrun, 2 ranks, in its own process group: on a timeout the whole group is killed,
    so no rank is left behind."""
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", WORKER, str(out), mode]
    p = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **ROOT_PATH), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        return None, log, out
    return p.returncode, log, out


def _rel(a, b, floor):
    return abs(a - b) / max(floor, abs(a), abs(b))


def test_every_trainer_same_loss_and_gradient_for_every_grouping(tmp_path):
    """tests/workers/microbatch_worker.py: each trainer's main() for one iteration (two optimizer steps; sft one)
    on identical rollouts, with fixed-size micro-batches of 3, a 200-token budget, and a 1-token budget (one
    sequence per micro-batch); rank 0's rollouts are all short, rank 1's all long. float64 model: the
    gradients agree to rounding. The logged terms agree to 1e-6: a few (clip_frac, ...) are float32 means of
    0/1 indicators in the loss functions, rounded differently when summed in another order."""
    code, log, out = _torchrun(tmp_path, "compare", timeout=600)
    assert code == 0, log[-4000:]
    r = json.loads(out.read_text())
    trainers = sorted({k.rsplit(" ", 1)[0] for k in r})
    assert len(trainers) == 12
    for t in trainers:
        base = r[f"{t} sequences"]
        for grouping in ("tokens", "one"):
            other = r[f"{t} {grouping}"]
            assert len(other["grad_norms"]) == len(base["grad_norms"]) >= 1, t
            for diff, norm in zip(other["grad_diffs"], base["grad_norms"]):
                assert diff <= 1e-10 * max(norm, 1e-3), (t, grouping, diff, norm)
            for k, v in base["metrics"].items():
                if k in ("time_rollout", "time_train", "tokens_per_second", "padding_frac") or v is None:
                    continue
                assert _rel(v, other["metrics"][k], 1e-6) < 1e-6, (t, grouping, k, v, other["metrics"][k])
        one, tokens = r[f"{t} one"], r[f"{t} tokens"]
        assert one["metrics"]["padding_frac"] == 0  # one sequence a micro-batch: nothing to pad
        for counts in tokens["counts"] + one["counts"]:
            assert counts["agreed"] == [max(c) for c in zip(*counts["local"])], t  # the most any rank has
    # rank 0 (short rollouts) fits a step in fewer micro-batches than rank 1 and is raised to rank 1's count
    unequal = [t for t in trainers for c in r[f"{t} tokens"]["counts"] if c["local"][0] != c["local"][1]]
    assert set(unequal) == set(trainers), set(trainers) - set(unequal)


def test_unagreed_counts_fail_instead_of_training(tmp_path):
    """The agreement is what keeps the ranks in step: with it switched off (rank 0 runs fewer micro-batches than
    rank 1), grpo.py's first step stops with an error (gloo, 20 s timeout) instead of finishing."""
    code, log, out = _torchrun(tmp_path, "unagreed", timeout=300)
    assert code != 0 and not out.exists(), log[-4000:]
    assert "Timed out" in log or "Connection closed" in log, log[-4000:]  # stuck in a collective, not a bug here


def test_grpo_run_on_two_ranks_logs_the_same_losses_by_tokens(tiny_model_dir, tmp_path):
    """The real thing, end to end: `torchrun --nproc_per_node 2 grpo.py --micro_batching tokens` against the same
    run cut into fixed-size micro-batches. Step 1's rollouts are the same (same seeds, same weights); its losses
    agree to float32 rounding (1e-5 relative on sums of ~1). (A random model's rollouts all run to the budget,
    so there is little padding to remove here; the benchmark measures that, bench/microbatch.py.)"""
    lines = {}
    for name, flags in (("sequences", ["--micro_batching", "sequences"]),
                        ("tokens", ["--micro_batching", "tokens", "--micro_batch_tokens", "150"])):
        out = tmp_path / name
        run("grpo.py", *small(tiny_model_dir, None, out, *GRPO, "--eval_data", "none", "--max_steps", "1",
                              "--entropy_coef", "0.01", *flags), nproc=2)
        lines[name] = metrics(out)[1]
    a, b = lines["sequences"], lines["tokens"]
    assert a["response_length"] == b["response_length"] and a["reward"] == b["reward"]  # the same rollouts
    for k in ("loss", "pg_loss", "entropy_bonus", "grad_norm"):
        assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    assert b["padding_frac"] <= a["padding_frac"]
