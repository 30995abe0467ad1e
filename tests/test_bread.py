"""bread.py (BREAD, arXiv 2506.17211; METHODS.md Eq. 39-41): episodes, the batched episode-anchor
search with a scripted sampler, the group replacement, the loss on generated tokens only, and the CLI."""
import json
import math
import random

import pytest
import torch
from test_cli import CORE_KEYS, metrics, run, small

import bread
import builtin_task
import common

EOS = 2


class ScriptedSampler:
    """The sampler interface (generate with prefixes), answering from a script instead of a model:
    outcome(question, k) -> number of correct samples in the group. Question q's prompt is [q] and
    episode k of its demonstration ends at token 2k, so an anchor of 2k tokens means k episodes.
    Every call is recorded as [(question, k), ...]; sample j has j + 1 generated tokens."""

    def __init__(self, outcome):
        self.outcome, self.calls = outcome, []

    def sync_weights(self, model):
        raise AssertionError("the search must sample from pi_old: no weight sync between its rounds")

    def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None):
        assert prefixes is not None and len(prefixes) == len(prompts)
        self.calls.append([(p[0], len(pre) // 2) for p, pre in zip(prompts, prefixes)])
        out = []
        for p, pre in zip(prompts, prefixes):
            assert EOS not in pre, "an anchor never contains the demonstration's EOS"
            wins = self.outcome(p[0], len(pre) // 2)
            out.append([common.Sample(p, list(pre), [5] * (j + 1), "ok" if j < wins else "no", True)
                        for j in range(n)])
        return out


def verifier(texts, golds):
    assert len(texts) == len(golds)
    return [1.0 if t == "ok" else 0.0 for t in texts]


def question(q, K):
    """Prompt [q]; demonstration of K episodes of 2 tokens each, then the EOS; ends [2, 4, ..., 2K]."""
    return {"prompt_ids": [q], "demo_ids": [9] * (2 * K) + [EOS], "answer": "1"}, [2 * k for k in range(1, K + 1)]


def search(outcome, Ks, G=4, max_rounds=0):
    qs, ends = zip(*(question(q, K) for q, K in enumerate(Ks)))
    sampler = ScriptedSampler(outcome)
    results, calls = bread.anchor_search(sampler, verifier, list(qs), list(ends), G, max_rounds,
                                         temperature=1.0, top_p=1.0, max_tokens=64)
    assert calls == len(sampler.calls)
    return results, sampler.calls


# =============================================================================================
# Eq. (39): episodes
# =============================================================================================

LEVEL1 = ['1', '+', '9', '=', '1', '0', '\n', '1', '0', '+', '3', '=', '1', '3', '\n', '</think>', '\n',
          '\\boxed{', '1', '3', '}']  # the builtin tokenizer's pieces of a level-1 demonstration


def test_episodes_are_lines_of_the_builtin_demo():
    assert bread.episode_ends(LEVEL1, 10, "line") == [7, 15, 17, 21]  # 2 sums, </think>, \boxed{13}
    # K = 3: cut nearest to 21/3 = 7 and 14 -> 7 and 15
    assert bread.episode_ends(LEVEL1, 3, "line") == [7, 15, 21]
    # K = 2: nearest to 10.5 among 7, 15, 17 -> 7 (3.5 away; 15 is 4.5 away)
    assert bread.episode_ends(LEVEL1, 2, "line") == [7, 21]
    assert bread.episode_ends(LEVEL1, 1, "line") == [21]


def test_episode_split_rules():
    texts = ["a", "\n", "b", "\n\n", "c", "\n", "\n", "d"]
    assert bread.episode_ends(texts, 10, "line") == [2, 4, 6, 7, 8]
    # blank lines: "\n\n" in one token (cut after 4) or over two tokens (cut after 7)
    assert bread.episode_ends(texts, 10, "paragraph") == [4, 7, 8]
    assert bread.episode_ends(["x", "\n"], 10, "line") == [2]  # a final newline ends the last piece once
    assert bread.episode_ends(["x", "\n", "", "y"], 10, "line") == [2, 4]  # an empty token never cuts
    assert bread.episode_ends([], 10, "line") == []
    # 10 tokens in 4 equal pieces: ceil(2.5) = 3, 5, ceil(7.5) = 8, 10; fewer tokens than K: one each
    assert bread.episode_ends(list("abcdefghij"), 4, "tokens") == [3, 5, 8, 10]
    assert bread.episode_ends(list("abc"), 10, "tokens") == [1, 2, 3]
    # 4 lines > K = 3 are merged: targets 33.3 and 66.7 both pick the cut after token 3 -> 2 pieces
    assert bread.episode_ends(["\n"] * 3 + ["a"] * 97, 3, "line") == [3, 100]
    # 20 one-line tokens into 4 pieces of 5
    assert bread.episode_ends(["\n"] * 20, 4, "line") == [5, 10, 15, 20]


# =============================================================================================
# Eq. (40): the search, batched over questions
# =============================================================================================


def test_search_transitions_fallback_skip_and_one_call_per_round():
    G = 4
    script = {  # question: {k: "fail" | "win" | "mix"}, K = 7 unless noted; binary search over [1, K]
        0: {4: "mix"},  # mixed at the first probe: accept k = 4
        1: {4: "fail", 6: "win", 5: "mix"},  # longer, shorter (fallback 6), then mixed: accept 5
        2: {4: "fail", 6: "fail", 7: "win"},  # longer twice, then only the full anchor works: fallback 7
        3: {4: "fail", 6: "fail", 7: "fail"},  # even P_K fails: skip
        4: {2: "win", 1: "win"},  # K = 4: shorter twice, fallback = the smallest all-success k = 1
        5: {4: "win", 2: "fail", 3: "win"},  # fallback 4, then 3 replaces it: the smallest wins
        6: {1: "fail"},  # K = 1: one round, skip
    }
    wins = {"fail": 0, "win": G, "mix": 1}
    results, calls = search(lambda q, k: wins[script[q][k]], [7, 7, 7, 7, 4, 7, 1], G)
    # One sampler call per round, holding every question still searching, each at its own k:
    assert calls == [[(0, 4), (1, 4), (2, 4), (3, 4), (4, 2), (5, 4), (6, 1)],
                     [(1, 6), (2, 6), (3, 6), (4, 1), (5, 2)],
                     [(1, 5), (2, 7), (3, 7), (5, 3)]]
    want = [("mixed", 4, 1), ("mixed", 5, 3), ("fallback", 7, 3), ("skip", 0, 3), ("fallback", 1, 2),
            ("fallback", 3, 3), ("skip", 0, 1)]
    assert [(r["status"], r["k"], r["rounds"]) for r in results] == want
    for r in results:
        assert r["samples"] == G * r["rounds"] and r["tokens"] == (1 + 2 + 3 + 4) * r["rounds"]
        if r["status"] == "skip":
            assert r["group"] is None
        else:  # the group kept is the one sampled at k: anchor of 2k tokens, rewards of that round
            assert len(r["group"]) == G and all(s.prefix_ids == [9] * (2 * r["k"]) for s in r["group"])
            assert r["rewards"] == [1.0 if s.text == "ok" else 0.0 for s in r["group"]]
    assert results[0]["rewards"] == [1.0, 0.0, 0.0, 0.0] and results[4]["rewards"] == [1.0] * G


def test_search_round_cap():
    # max_rounds = 1: q0 fails at k = 4 and stops (skip); q1 succeeds at 4 and keeps it (fallback)
    results, calls = search(lambda q, k: 0 if q == 0 else 3, [7, 7], G=3, max_rounds=1)
    assert [(r["status"], r["k"], r["rounds"]) for r in results] == [("skip", 0, 1), ("fallback", 4, 1)]
    assert len(calls) == 1


@pytest.mark.parametrize("K", range(1, 13))
def test_search_finds_the_threshold_within_the_bound(K):
    """Outcomes monotone in k (all fail below t, all succeed from t): the search returns the fallback
    k = t (skip when t = K + 1), in at most ceil(log2(K + 1)) rounds, a bound some t reaches."""
    ts = list(range(1, K + 2))
    results, calls = search(lambda q, k: 2 * (k >= ts[q]), [K] * len(ts), G=2)
    bound = math.ceil(math.log2(K + 1))
    assert [(r["status"], r["k"]) for r in results] == [("fallback", t) for t in ts[:-1]] + [("skip", 0)]
    assert max(r["rounds"] for r in results) == bound == len(calls)


def test_search_distribution_with_random_outcomes():
    """K = 3, G = 2, each sample correct with p_k = 0.3, 0.6, 0.9 at k = 1, 2, 3 (seeded). Per group
    at k: all fail (1 - p)^2, all succeed p^2, mixed the rest. The search probes k = 2 first:
      mixed at 2: 0.48                                   -> mixed 2
      fail at 2 (0.16) -> k = 3: fail 0.01 -> skip 0.0016, win 0.81 -> fallback 3 0.1296, mixed 0.18 -> 0.0288
      win at 2 (0.36)  -> k = 1: fail 0.49 -> fallback 2 0.1764, win 0.09 -> fallback 1 0.0324,
                                  mixed 0.42 -> mixed 1 0.1512
    Extra rounds: 1 with probability 0.48, else 2 -> mean 1.52."""
    rng, n = random.Random(0), 20000
    p = {1: 0.3, 2: 0.6, 3: 0.9}
    results, _ = search(lambda q, k: sum(rng.random() < p[k] for _ in range(2)), [3] * n, G=2)
    want = {("mixed", 2): 0.48, ("mixed", 3): 0.0288, ("fallback", 3): 0.1296, ("skip", 0): 0.0016,
            ("fallback", 2): 0.1764, ("fallback", 1): 0.0324, ("mixed", 1): 0.1512}
    assert sum(want.values()) == pytest.approx(1.0)
    for key, prob in want.items():
        got = sum((r["status"], r["k"]) == key for r in results) / n
        assert abs(got - prob) < 4 * math.sqrt(prob * (1 - prob) / n) + 1e-3, (key, got, prob)
    assert sum(r["rounds"] for r in results) / n == pytest.approx(1.52, abs=0.015)


# =============================================================================================
# Eq. (41): the selected group replaces the failed one; advantage within it; loss on generated tokens
# =============================================================================================


def _s(tag, prefix=(), n_gen=2):
    return common.Sample([1, 4], list(prefix), [3] * n_gen, tag, True)


@pytest.mark.parametrize("fallback", ["success", "skip"])
def test_replacement_and_advantage_within_the_group(fallback):
    G = 4
    rollouts = [_s(f"q{i}s{j}") for i in range(4) for j in range(G)]
    first = torch.tensor([1., 0., 0., 0.] + [0.] * 12)  # q0 solved; q1, q2, q3 failed
    anchored = [_s(f"a{j}", prefix=[9, 9]) for j in range(G)]
    fell = [_s(f"f{j}", prefix=[9, 9, 9]) for j in range(G)]
    results = [{"status": "mixed", "group": anchored, "rewards": [1., 1., 0., 0.]},
               {"status": "skip", "group": None, "rewards": None},
               {"status": "fallback", "group": fell, "rewards": [1.] * G}]
    samples, rewards, weights = bread.replace_failed_groups(rollouts, first, [1, 2, 3], results, G, fallback)
    assert samples[:G] == rollouts[:G] and samples[G:2 * G] == anchored  # q0 kept, q1's group replaced
    assert samples[2 * G:3 * G] == rollouts[2 * G:3 * G]  # q2 skipped: its failed group stays, weight 0
    assert samples[3 * G:] == (fell if fallback == "success" else rollouts[3 * G:])
    assert rewards.tolist() == [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0] + ([1] * 4 if fallback == "success" else [0] * 4)
    assert weights.tolist() == [1] * 8 + [0] * 4 + ([1] * 4 if fallback == "success" else [0] * 4)
    adv = bread.group_advantages(rewards.view(-1, G).double(), std=True)  # float64: atol 1e-6 is 8 float32 ulp
    # q0: mean 0.25, unbiased std 0.5 -> 0.75 / 0.500001, -0.25 / 0.500001
    # q1 (anchored group alone): mean 0.5, std sqrt(1/3) -> +-0.5 / (0.5773503 + 1e-6) = +-0.8660239
    # q2 (skipped) and q3 (all succeed): 0
    torch.testing.assert_close(adv, torch.tensor([[1.4999970, -0.4999990, -0.4999990, -0.4999990],
                                                  [0.8660239, 0.8660239, -0.8660239, -0.8660239],
                                                  [0.] * 4, [0.] * 4], dtype=torch.float64), rtol=0, atol=1e-6)


def cfg(**kw):
    return bread.Config(**{**dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, entropy_coef=0.0), **kw})


def test_loss_on_generated_tokens_by_hand_two_micro_batches():
    """Four samples in one optimizer step, micro-batches of 2; eps 0.2 (clip range [0.8, 1.2]);
    old_logp = 0, so rho = exp(logp). Anchor tokens marked *; they must not count anywhere.
      a: A = +1, anchor 2, rho [5.0*, 0.1*, 1.5, 1.1]: -1.2 (clipped), -1.1
      b: A = -1, rho [0.5, 1.0, 1.5]:          -min(-0.5, -0.8) = 0.8 (clipped), 1.0, 1.5 (unclipped)
      c: A = +2, anchor 1, rho [9.0*, 0.7, 1.25]: -min(1.4, 1.6) = -1.4, -min(2.5, 2.4) = -2.4 (clipped)
      d: skipped question (weight 0), A = 0
    N = 7 generated tokens: loss = (-1.2 - 1.1 + 0.8 + 1.0 + 1.5 - 1.4 - 2.4) / 7 = -0.4; clip_frac 3/7.
    d loss / d logp = -A rho / N where unclipped, 0 where clipped or masked."""
    samples = [_s("a", [7, 7], 2), _s("b", [], 3), _s("c", [7], 2), _s("d", [], 3)]
    adv, weights = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    [minibatch] = common.minibatches(samples, {"advantages": adv, "weights": weights}, 1, 2, 0, "cpu")
    ratios = [torch.tensor([[5.0, 0.1, 1.5, 1.1], [0.5, 1.0, 1.5, 3.0]]),
              torch.tensor([[9.0, 0.7, 1.25], [4.0, 4.0, 4.0]])]
    masks = [bread.generated_mask(mb)[mb["weights"] > 0] for mb in minibatch]
    norm = common.step_normaliser(masks, "token-mean")
    assert norm == 7 and common.step_normaliser(masks, "seq-mean") == 3  # d is not a sequence of the loss
    total, clip, grads = 0.0, 0.0, []
    for mb, r in zip(minibatch, ratios):
        logp = r.log().requires_grad_(True)
        loss, t = bread.grpo_loss(logp, torch.zeros_like(logp), mb["advantages"], bread.generated_mask(mb), cfg(),
                                   norm, norm)
        loss.backward()
        total, clip = total + loss.item(), clip + t["clip_frac"].item()
        grads.append(logp.grad)
    assert total == pytest.approx(-0.4, abs=1e-6) and clip == pytest.approx(3 / 7, abs=1e-7)
    torch.testing.assert_close(grads[0], torch.tensor([[0, 0, 0, -1.1 / 7], [0, 1.0 / 7, 1.5 / 7, 0]]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], torch.tensor([[0, -0.2, 0], [0, 0, 0]]), rtol=0, atol=1e-6)


def test_kl_and_entropy_terms_skip_anchor_tokens():
    """Eq. (11)-(12) over the generated tokens only. One row: anchor of 2 tokens (entropy 100, log-ratio
    to the reference 5), then 2 generated tokens with entropy 1 and 3 and ref - logp = 0 and 1.
    Entropy bonus = (1 + 3) / 2 = 2; KL = (0 + (e - 1 - 1)) / 2 = 0.35914091; A = 0, so
    loss = 0.1 * KL - 0.01 * 2."""
    [[mb]] = common.minibatches([_s("a", [7, 7], 2)], {"advantages": torch.zeros(1), "weights": torch.ones(1)},
                                1, 1, 0, "cpu")
    f64 = torch.float64  # exact algebra: float32's exp(1) may be 1-2 ulp off on other CPUs
    logp, entropy = torch.zeros(1, 4, dtype=f64), torch.tensor([[100.0, 100.0, 1.0, 3.0]], dtype=f64)
    ref = torch.tensor([[5.0, 5.0, 0.0, 1.0]], dtype=f64)
    mask = bread.generated_mask(mb)
    loss, t = bread.grpo_loss(logp, logp, mb["advantages"], mask, cfg(kl_coef=0.1, entropy_coef=0.01), 2.0, 2.0,
                               entropy, ref)
    assert t["entropy_bonus"].item() == pytest.approx(2.0) and t["kl"].item() == pytest.approx(0.35914091)
    assert loss.item() == pytest.approx(0.1 * 0.35914091 - 0.02, abs=1e-7)


def test_anchor_is_context_only_gradient_equals_anchor_in_prompt(tiny_model_dir):
    """Eq. (41) on a real tiny model: the gradient of the loss with the anchor as a response prefix
    (masked by generated_mask) equals the gradient with the anchor moved into the prompt, and the
    anchor positions' log-probs get exactly zero gradient."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = common.PolicyModel(lm, compile=False)
    prompts, anchors, gens = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], [[14, 15, 2], [16, 17, 18, 2]]
    adv, weights = torch.tensor([1.5, -0.5]), torch.ones(2)

    def grads(samples):
        mb = common.make_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples], 0, "cpu",
                               prefix_lens=[len(s.prefix_ids) for s in samples])
        mb.update(advantages=adv, weights=weights)
        model.zero_grad()
        logp, _ = model(**common.model_inputs(mb))
        logp.retain_grad()
        mask = bread.generated_mask(mb)
        loss, _ = bread.grpo_loss(logp, logp.detach() - 0.1, adv, mask, cfg(), float(mask.sum()), float(mask.sum()))
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}, logp.grad, mb["prefix_mask"]

    as_anchor = [common.Sample(p, a, g, "", True) for p, a, g in zip(prompts, anchors, gens)]
    in_prompt = [common.Sample(p + a, [], g, "", True) for p, a, g in zip(prompts, anchors, gens)]
    loss1, g1, logp_grad, prefix = grads(as_anchor)
    loss2, g2, _, _ = grads(in_prompt)
    assert loss1 == pytest.approx(loss2, rel=1e-5)  # float32 forwards of two layouts: relative
    for k in g1:  # float32 forward + backward of two layouts: up to 2e-7 apart on gradients of up to 0.1
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=5e-6)
    generated = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]])  # rows: anchor 3 + 3 tokens, 1 + 4
    assert prefix.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert torch.all(logp_grad[prefix.bool()] == 0) and torch.all(logp_grad[generated.bool()] != 0)


# =============================================================================================
# The command line
# =============================================================================================

BREAD = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4"]
SEARCH_KEYS = {"search_frac", "anchor_mixed_frac", "anchor_fallback_frac", "anchor_skip_frac", "prefix_ratio",
               "anchor_episode_frac", "anchor_tokens", "anchored_reward", "search_rounds", "search_calls",
               "extra_samples", "extra_tokens", "generated_tokens"}


def test_bread_smoke(tiny_model_dir, small_eval_file, tmp_path):
    """Level-1 training problems from a file (demonstrations of 21 tokens + EOS fit the 24-token budget)."""
    data, out = tmp_path / "train.jsonl", tmp_path / "bread"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_task.make_task(20, seed=5, levels=(1,))))
    run("bread.py", *small(tiny_model_dir, small_eval_file, out, "--data", str(data), "--max_steps", "2",
                           "--eval_every", "0", *BREAD))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert CORE_KEYS | {"pg_loss", "clip_frac"} | SEARCH_KEYS <= set(m), set(m)
        # a random model fails every question, so each one is searched (K_q = 4 lines: <= 3 rounds)
        assert m["search_frac"] == 1.0 and 1 <= m["search_calls"] <= 3
        assert m["anchor_mixed_frac"] + m["anchor_fallback_frac"] + m["anchor_skip_frac"] == pytest.approx(1.0)
        assert m["extra_samples"] == pytest.approx(m["search_rounds"] * 4 * 3)  # rounds x questions x G
        assert m["generated_tokens"] > m["extra_tokens"] > 0
        used = (m["anchor_mixed_frac"] + m["anchor_fallback_frac"]) * 4  # trained anchored groups (fallback success)
        assert m["demo_tokens"] == pytest.approx((m["anchor_tokens"] or 0) * used)


def test_bread_refuses_bad_input(tiny_model_dir, small_eval_file, tmp_path):
    p = run("bread.py", *small(tiny_model_dir, small_eval_file, tmp_path / "g", *BREAD, "--group_size", "1"),
            check=False)
    assert p.returncode != 0 and "--group_size must be at least 2" in p.stderr
    p = run("bread.py", *small(tiny_model_dir, small_eval_file, tmp_path / "d", *BREAD), check=False)  # builtin data
    assert p.returncode != 0 and "do not fit --max_response_len 24" in p.stderr and "Traceback" not in p.stderr
