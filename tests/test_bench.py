"""bench/gpu_paper.py's arithmetic helpers against numbers worked out by hand (the tables themselves are
arithmetic on stated inputs; nothing here is timed)."""
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))  # the bench scripts import each other by name, as when run
import gpu_paper  # noqa: E402

TINY = dict(vocab=10, hidden=4, intermediate=6, layers=2, heads=2, kv_heads=1, head_dim=2, tied=False)


def test_param_count_by_hand():
    # a layer: q 4x4+4, k 4x2+2, v 4x2+2, o 4x4 = 56; MLP 3x4x6 = 72; norms 2x4 = 8 -> 136
    # total: 2 x 136 + embed 40 + head 40 + final norm 4 = 356; matmuls: 2 x 136 + head 40 = 312
    assert gpu_paper.param_count(TINY) == {"total": 356, "matmul": 312}
    assert gpu_paper.param_count({**TINY, "tied": True})["total"] == 316


def test_qwen25_7b_matches_its_published_size():
    assert gpu_paper.param_count(gpu_paper.QWEN25_MATH_7B)["total"] == 7_615_616_512  # "7.62B"


def test_kv_bytes_and_flops_by_hand():
    assert gpu_paper.kv_bytes_per_token(TINY) == 2 * 2 * 1 * 2 * 2  # K and V, 2 layers, 1 head of 2, bf16
    # forward: 2 x 312 + 4 x 2 layers x 2 heads x 2 dims x 10 context = 624 + 320
    assert gpu_paper.train_flops_per_token(TINY, context=10, passes=1) == 944
    assert gpu_paper.train_flops_per_token(TINY, context=10, passes=5) == 5 * 944


def test_padding_factor():
    lengths = [1, 3, 2, 2]
    assert gpu_paper.padding_factor(lengths, micro_batch=1) == 1.0
    assert gpu_paper.padding_factor(lengths, micro_batch=4) == pytest.approx(4 * 3 / 8)
    equal = [5] * 8
    assert gpu_paper.padding_factor(equal, micro_batch=4) == 1.0
    assert gpu_paper.padding_factor(lengths, micro_batch=4, prompt=2) == pytest.approx(4 * (2 + 3) / (4 * 2 + 8))


def test_budget_padding_factor_groups_as_the_trainers_do():
    """common.token_groups on one step of [1, 3, 2, 2]: sorted 3, 2, 2, 1; with a budget of 6 the fewest micro-
    batches are two, and of the two-way cuts [3] + [2, 2, 1] pads least: 3 + 3 x 2 = 9 positions for 8 tokens."""
    lengths = [1, 3, 2, 2]
    assert gpu_paper.budget_padding_factor(lengths, per_step=4, budget=6) == pytest.approx(9 / 8)
    assert gpu_paper.budget_padding_factor(lengths, per_step=4, budget=1000) == pytest.approx(4 * 3 / 8)
    assert gpu_paper.budget_padding_factor(lengths, per_step=4, budget=1) == 1.0  # one sequence each: no padding
    xs = gpu_paper.draw_lengths(1024, mean=3000, cap=8192, seed=0)  # the 8-GPU step: fixed-size pads far more
    assert gpu_paper.budget_padding_factor(xs, 64, 4 * 9216, 200) < gpu_paper.padding_factor(xs, 4, 200) - 0.5


def test_draw_lengths_respects_the_cap_and_mean():
    xs = gpu_paper.draw_lengths(20000, mean=100, cap=10**9, seed=0)
    assert abs(sum(xs) / len(xs) - 100) < 3
    assert max(gpu_paper.draw_lengths(1000, mean=100, cap=150, seed=0)) == 150


def test_logprob_bench_sides_agree_on_a_tiny_head():
    """bench/logprob.py's three sides on a 13-token, vocabulary-23 head with chunks of 5: the gradients it checks
    against naive's agree to float32 rounding, and every side gets a time and a memory figure."""
    import logprob
    import torch

    for with_entropy in (True, False):
        r = logprob.case(13, 6, torch.float32, with_entropy, repeats=1, sides=list(logprob.SIDES), vocab=23, chunk=5)
        assert set(r["sides"]) == {"naive", "checkpointed", "fused"}
        assert all(err < 1e-5 for err in r["grad_rel_err_vs_naive"].values()), r["grad_rel_err_vs_naive"]
        assert set(r["ratio_to_naive"]) == {"checkpointed", "fused"}


def test_trl_step_phase_clock_and_summary():
    import trl_step

    class Owner:
        calls = 0

        @staticmethod
        def work(x):
            Owner.calls += 1
            return 2 * x

    clock = trl_step.PhaseClock()
    counting = {"on": True}
    clock.wrap(Owner, "work", "rollout", when=lambda: counting["on"])
    clock.lap()  # starts the clock: no lap yet
    assert Owner.work(3) == 6 and clock.current["rollout"] >= 0
    counting["on"] = False
    before = clock.current["rollout"]
    assert Owner.work(4) == 8 and clock.current["rollout"] == before  # `when` false: called, not counted
    clock.lap(generated_tokens=10)
    assert len(clock.laps) == 1 and set(clock.laps[0]) == {"step_s", "rollout", "generated_tokens"}
    assert clock.current == {} and Owner.calls == 2

    # medians over the steps after the first; update = step - rollout - reward - old log-probs, per step
    laps = [{"step_s": 100.0, "rollout": 50.0, "generated_tokens": 1.0},  # warm-up, dropped
            {"step_s": 4.0, "rollout": 1.0, "reward": 0.5, "old_logprobs": 0.5, "generated_tokens": 300.0},
            {"step_s": 6.0, "rollout": 2.0, "reward": 0.5, "old_logprobs": 0.5, "generated_tokens": 500.0},
            {"step_s": 5.0, "rollout": 3.0, "generated_tokens": 400.0}]  # no reward / old log-prob calls: 0
    s = trl_step.step_summary(laps)
    assert s == {"step_s": 5.0, "rollout": 2.0, "reward": 0.5, "old_logprobs": 0.5, "generated_tokens": 400.0,
                 "update_flops": 0.0, "update": 2.0, "steps": 3}  # updates 2, 3, 2


def test_trl_step_pairs_the_sides_within_each_repeat():
    import trl_step
    runs = {"ours": [{"step_s": 1.0}, {"step_s": 2.0}, {"step_s": 0.5}], "trl": [{"step_s": 1.5}, {"step_s": 2.0}, {"step_s": 1.0}]}
    assert trl_step.paired_ratios(runs) == [1.5, 1.0, 2.0]
    assert trl_step.spread(trl_step.paired_ratios(runs)) == {"median": 1.5, "min": 1.0, "max": 2.0}


def test_mfu_shape_and_flops_of_a_built_model(tmp_path):
    """bench/mfu.py's model description feeds gpu_paper's FLOP count: check it on a model built from a config."""
    import mfu
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=10, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    m = mfu.shape(lm)
    assert m == dict(vocab=10, hidden=128, intermediate=512, layers=2, heads=2, kv_heads=2, head_dim=64, tied=False)
    counted = mfu.gpu_paper.param_count(m)["total"]
    assert counted == sum(p.numel() for p in lm.parameters())  # the FLOP count's parameters are the model's


def test_scaling_fit_exponent_by_hand():
    import scaling
    assert scaling.fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)  # y = 3 x^2
    assert scaling.fit_exponent([64, 256, 1024], [5, 5, 5]) == pytest.approx(0.0)
    # not a power law: the least-squares slope of log y on log x, (log 10 - log 1) / (log 4 - log 1) here
    assert scaling.fit_exponent([1, 4], [1, 10]) == pytest.approx(math.log(10) / math.log(4))


def test_trl_step_counts_training_forwards_only():
    """bench/trl_step.py's update FLOPs: every forward with grad adds B x T tokens at bench/mfu.py's count per
    token (3 forward-equivalents, attention over half the sequence); a no-grad forward (old log-probs) adds none."""
    import trl_step
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=10, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))

    class Policy:
        def __init__(self):
            self.lm = lm

        def forward(self, input_ids, attention_mask=None):
            return input_ids.sum()

    clock = trl_step.PhaseClock()
    trl_step.count_update_flops(Policy, clock)
    policy, ids = Policy(), torch.ones(3, 8, dtype=torch.long)
    with torch.no_grad():
        assert policy.forward(ids) == 24 and "update_flops" not in clock.current
    policy.forward(ids)
    policy.forward(ids[:2])
    # "matmul" parameters as gpu_paper counts them: 2 layers x (q, k, v, o 4 x 128 x 128 + their biases 3 x 128
    # + MLP 3 x 128 x 512 + 2 norms x 128) + head 10 x 128
    matmul = 2 * (4 * 128 * 128 + 3 * 128 + 3 * 128 * 512 + 2 * 128) + 10 * 128
    per_token = 3 * (2 * matmul + 4 * 2 * 2 * 64 * 4)  # context T / 2 = 4
    assert clock.current["update_flops"] == 5 * 8 * per_token


def test_sampler_hand_loop_draws_what_generate_draws():
    """bench/sampler.py compares the same work only if its written-out decode loop draws generate's tokens:
    left-padded prompts of different lengths, a stop token some rows draw, three seeds."""
    import sampler
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
    ids, attn = sampler.left_pad([[3, 4, 5, 6], [7, 8], [9], [4, 4, 4]], pad_id=0)
    assert ids.tolist()[1] == [0, 0, 7, 8] and attn.tolist()[2] == [0, 0, 0, 1]
    stop = [2]
    lengths = set()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = lm.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               max_new_tokens=15, eos_token_id=stop, pad_token_id=0)[:, ids.shape[1]:]
        torch.manual_seed(seed)
        drawn = sampler.hand_loop(lm, ids, attn, stop, pad_id=0, max_new=15)
        assert sampler.cut(drawn, stop) == sampler.cut(expected, stop)
        lengths |= {len(x) for x in sampler.cut(drawn, stop)}
    assert len(lengths) > 1  # some rows stopped early, so the stop handling was exercised
    assert sampler.cut(torch.tensor([[5, 2, 0], [1, 1, 1]]), [2]) == [[5, 2], [1, 1, 1]]


def test_microbatch_bench_sides_agree_and_pad_less():
    """bench/microbatch.py on a tiny model: the three sides hold the same tokens and leave the same gradient (float32
    rounding), fixed-size micro-batches pad the most, packed rows not at all, and the full-scale draw pads like the
    scaled one (the share depends on lengths relative to each other)."""
    import microbatch

    r = microbatch.main(["--samples", "16", "--scale", "64", "--hidden", "64", "--layers", "1", "--repeats", "1"])
    s = r["sides"]
    assert s["fixed"]["tokens"] == s["tokens"]["tokens"] == s["packed"]["tokens"]
    assert all(v["grad_rel_diff"] < 1e-4 for v in s.values()), {k: v["grad_rel_diff"] for k, v in s.items()}
    assert s["packed"]["padding_share"] == 0 < s["tokens"]["padding_share"] < s["fixed"]["padding_share"]
    for v in s.values():
        assert abs(v["padding_share"] - v["full_scale"]["padding_share"]) < 0.03
    assert 0 < r["inputs"]["capped_share"] < 0.2 and r["inputs"]["budget"] == 4 * 9216 // 64
