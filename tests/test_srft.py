"""srft.py: the entropy weights (Eq. 26, 29: worked values, direction, no gradient, which tokens), the three
terms and the total (Eq. 27, 28, 30, 31) by hand for both variants, two micro-batches, the mixed-group
advantage (Eq. 25), and the CLI. Every expected number is worked out in a comment or by a plainly written
independent formula (float64)."""
import json
import math
import sys

import pytest
import torch

import common
import srft
from test_cli import CORE_KEYS, metrics, run, small

LN = math.log


def cfg(**kw) -> srft.Config:
    base = dict(clip_eps_low=0.2, clip_eps_high=0.2, clip=True, adv_std=True, shaping_gamma=0.1,
                demo_ratio="plain", w_sft_coef=0.5, w_sft_sign="minus", w_rl_coef=0.1, entropy_coef=0.0,
                loss_agg="token-mean")
    return srft.Config(**{**base, **kw})


OFFICIAL = dict(srft.OFFICIAL)


# =============================================================================================
# The entropy weights, Eq. (26) and (29)
# =============================================================================================


def test_worked_weights():
    """METHODS 5: H = 1.0 -> w_SFT = 0.5 e^-1 = 0.18394, w_RL = 0.1 e = 0.27183;
    H = 0.2 -> w_SFT = 0.5 e^-0.2 = 0.40937, w_RL = 0.1 e^0.2 = 0.12214. Official w_SFT(1.0) = 0.5 e = 1.35914."""
    h = torch.tensor([1.0, 0.2], dtype=torch.float64)
    assert srft.sft_weight(h, 0.5, "minus").tolist() == pytest.approx([0.18394, 0.40937], abs=1e-5)
    assert srft.rl_weight(h, 0.1).tolist() == pytest.approx([0.27183, 0.12214], abs=1e-5)
    assert srft.sft_weight(h, 0.5, "plus").tolist() == pytest.approx([1.35914, 0.61070], abs=1e-5)
    assert srft.sft_weight(torch.zeros(1), 0.5, "minus").item() == 0.5  # a certain policy: the full 0.5
    assert srft.rl_weight(torch.zeros(1), 0.1).item() == pytest.approx(0.1)


def test_each_weight_moves_with_entropy_in_the_documented_direction():
    """Paper w_SFT falls as H grows (exp(-H)); w_RL rises (exp(+H)); the official w_SFT rises."""
    h = torch.linspace(0.0, 5.0, 11, dtype=torch.float64)
    w_sft, w_rl, w_sft_off = srft.sft_weight(h, 0.5, "minus"), srft.rl_weight(h, 0.1), srft.sft_weight(h, 0.5, "plus")
    assert (w_sft.diff() < 0).all() and (w_rl.diff() > 0).all() and (w_sft_off.diff() > 0).all()
    assert w_sft[-1] < 0.01 < 10 < w_rl[-1]  # 0.5 e^-5 = 0.0034, 0.1 e^5 = 14.8


def _softmax_batch():
    """A real policy: logits theta [3, 4, 6] whose softmax gives logp and entropy (both depend on theta, so a
    weight that kept its gradient would change the gradient). Row 0 the demonstration (A = +0.8), row 1 a
    rollout with A = +0.5, row 2 a rollout with A = -0.7; ragged masks."""
    torch.manual_seed(1)
    theta = (2 * torch.randn(3, 4, 6, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, 6, (3, 4))
    logq = torch.log_softmax(theta, -1)
    logp = logq.gather(-1, y[..., None]).squeeze(-1)  # [3, 4]
    entropy = -(logq.exp() * logq).sum(-1)  # [3, 4], Eq. (2)
    old = logp.detach() + torch.tensor([[0.1, -0.1, 0.05, 0.0]], dtype=torch.float64)  # ratios inside the clip
    adv = torch.tensor([0.8, 0.5, -0.7], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    demo = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    return theta, logp, entropy, old, adv, mask, demo


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_the_weights_carry_no_gradient(variant):
    """d loss / d theta equals the gradient of the same loss written out with w_SFT and w_RL as plain numbers
    (computed once, outside autograd); the same formula with live (undetached) weights gives another gradient."""
    theta, logp, entropy, old, adv, mask, demo = _softmax_batch()
    c = cfg(**OFFICIAL) if variant == "official" else cfg()
    Z = 9.0 if variant == "paper" else 32.0
    loss, _ = srft.srft_loss(logp, old, adv, mask, demo, c, Z, 9.0, 3.0, 6.0, entropy)
    (got,) = torch.autograd.grad(loss, theta, retain_graph=True)

    def by_hand(h):  # Eq. (26)-(31) on this batch, token by token; h = the entropies the weights use
        p = logp.exp()
        sign = -1 if variant == "paper" else 1
        total = 0.0
        for t in range(3):  # demonstration row 0
            total = total + 0.5 * torch.exp(sign * h[0, t]) * -logp[0, t] / 3.0  # Eq. (27)
            f = p[0, t] if variant == "paper" else p[0, t] / (p[0, t] + 0.1)
            total = total - 0.8 * f / Z  # Eq. (28)
        for i, n in ((1, 4), (2, 2)):  # rollouts; ratios inside the clip range, so c = -A rho
            for t in range(n):
                w = 0.1 * torch.exp(h[i, t]) if adv[i] > 0 else 1.0
                total = total + w * -adv[i] * torch.exp(logp[i, t] - old[i, t]) / Z  # Eq. (30)
        return total

    (ref,) = torch.autograd.grad(by_hand(entropy.detach()), theta, retain_graph=True)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    (live,) = torch.autograd.grad(by_hand(entropy), theta)
    assert (live - ref).abs().max() > 1e-3  # the test can fail: a weight with gradient moves theta differently


def test_w_rl_touches_only_positive_advantage_rollout_tokens():
    """Changing w_RL's coefficient, or the entropy of any token other than a positive-advantage rollout token,
    leaves the rollout part of the loss and its gradient unchanged on every other token."""
    _, logp, entropy, old, adv, mask, demo = _softmax_batch()
    logp, entropy = logp.detach().requires_grad_(True), entropy.detach()

    def grad(c, h):
        logp.grad = None
        loss, t = srft.srft_loss(logp, old, adv, mask, demo, c, 9.0, 9.0, 3.0, 6.0, h)
        loss.backward()
        return logp.grad.clone(), t

    base, t0 = grad(cfg(), entropy)
    big, t1 = grad(cfg(w_rl_coef=0.7), entropy)
    changed = (base - big).abs() > 1e-12  # [3, 4]
    assert changed.tolist() == [[False] * 4, [True] * 4, [False] * 4]  # row 1: the positive-advantage rollout
    assert t0["sft_loss"] == t1["sft_loss"] and t0["off_policy_loss"] == t1["off_policy_loss"]
    assert t1["pg_loss"] != t0["pg_loss"]
    # row 1 by hand: grad = -w_RL A rho / Z, w_RL = coef e^H
    want = -0.1 * entropy[1].exp() * 0.5 * torch.exp(logp[1].detach() - old[1]) / 9.0
    torch.testing.assert_close(base[1], want, rtol=1e-12, atol=0)
    # the negative-advantage rollout's entropies do not enter its loss at all
    hot = entropy.clone()
    hot[2] += 3.0
    other, t2 = grad(cfg(), hot)
    torch.testing.assert_close(other[1:], base[1:], rtol=0, atol=0)
    assert t2["pg_loss"] == t0["pg_loss"]


# =============================================================================================
# The three terms and the total by hand, Eq. (27), (28), (30), (31)
# =============================================================================================
#   row 0: demonstration, A = +0.5, p = (0.1, 0.4, 0.9), H = (ln 2, ln 4, 0), 4th position masked
#          (a) paper   w_SFT = 0.5 (1/2, 1/4, 1) = (0.25, 0.125, 0.5)
#              official w_SFT = 0.5 (2, 4, 1)   = (1.0, 2.0, 0.5)
#              L_SFT = sum w (-ln p) / 3: paper (0.25 ln 10 + 0.125 ln 2.5 + 0.5 ln(10/9)) / 3 = 0.2476210
#                                         official (ln 10 + 2 ln 2.5 + 0.5 ln(10/9)) / 3     = 1.3959490
#          (b) paper   -A p        = (-0.05, -0.2, -0.45),  sum -0.7
#              official -A p/(p+0.1) = (-0.25, -0.4, -0.45), sum -1.1
#   row 1: rollout, A = +1, rho = (1.5, 1.0, 0.5), H = (ln 10, ln 5, ln 20): w_RL = 0.1 e^H = (1, 0.5, 2)
#          clip 0.2: -min(rho A, clip(rho) A) = (-1.2, -1.0, -0.5) -> x w: (-1.2, -0.5, -1.0), sum -2.7
#          no clip: (-1.5, -1.0, -0.5) -> x w: (-1.5, -0.5, -1.0), sum -3.0
#   row 2: rollout, A = -2, rho = (0.5, 2.0), H = (1, 3), weight 1, rest masked
#          clip 0.2: -min(-1.0, -1.6) = 1.6 (clipped), -min(-4.0, -2.4) = 4.0: sum 5.6; no clip 1 + 4 = 5
#   N = 8 response tokens, 3 demonstration tokens, 5 rollout tokens.
#   E = (ln 2 + ln 4 + 0 + ln 10 + ln 5 + ln 20 + 1 + 3) / 8 = (ln 8000 + 4) / 8 = 1.6233996
#   The demonstration's old log-probs are set far away (ratio e^{+-4}): they must not matter.

P_DEMO = [0.1, 0.4, 0.9]
SFT_PAPER = (0.25 * LN(10) + 0.125 * LN(2.5) + 0.5 * LN(10 / 9)) / 3
SFT_OFFICIAL = (LN(10) + 2 * LN(2.5) + 0.5 * LN(10 / 9)) / 3
E_MEAN = (LN(8000) + 4) / 8


def batch(dtype=torch.float64):
    old = torch.full((3, 4), LN(0.5), dtype=dtype)
    old[0] = torch.tensor([4.0, -4.0, 4.0, 0.0]) + torch.log(torch.tensor(P_DEMO + [1.0], dtype=dtype))
    probs = torch.tensor([P_DEMO + [0.3],
                          [0.75, 0.5, 0.25, 0.3],  # 0.5 * rho
                          [0.25, 1.0, 0.3, 0.3]], dtype=dtype)
    logp = probs.log().requires_grad_(True)
    adv = torch.tensor([0.5, 1.0, -2.0], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    demo = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])  # prefix_mask: the whole demo row
    entropy = torch.tensor([[LN(2), LN(4), 0.0, 9.0], [LN(10), LN(5), LN(20), 9.0], [1.0, 3.0, 9.0, 9.0]],
                           dtype=dtype)
    return logp, old, adv, mask, demo, entropy


def test_paper_variant_by_hand():
    logp, old, adv, mask, demo, entropy = batch()
    entropy.requires_grad_(True)
    loss, t = srft.srft_loss(logp, old, adv, mask, demo, cfg(entropy_coef=0.001), 8.0, 8.0, 3.0, 5.0, entropy)
    assert SFT_PAPER == pytest.approx(0.2476210, abs=1e-7) and E_MEAN == pytest.approx(1.6233996, abs=1e-7)
    assert t["sft_loss"].item() == pytest.approx(SFT_PAPER, abs=1e-12)
    assert t["off_policy_loss"].item() == pytest.approx(-0.7 / 8, abs=1e-12)
    assert t["pg_loss"].item() == pytest.approx((-2.7 + 5.6) / 8, abs=1e-12)
    assert t["entropy_bonus"].item() == pytest.approx(E_MEAN, abs=1e-12)
    assert loss.item() == pytest.approx(SFT_PAPER + (-0.7 - 2.7 + 5.6) / 8 - 0.001 * E_MEAN, abs=1e-12)
    assert t["clip_frac"].item() == pytest.approx(2 / 8, abs=1e-12)  # one token in each rollout
    assert t["demo_prob"].item() == pytest.approx(1.4 / 3, abs=1e-12)
    assert t["w_sft"].item() == pytest.approx(0.875 / 3, abs=1e-12)  # (0.25 + 0.125 + 0.5) / 3
    assert t["w_rl"].item() == pytest.approx((1 + 0.5 + 2 + 0.1 * math.e + 0.1 * math.e ** 3) / 5, abs=1e-12)
    assert t["entropy_demo"].item() == pytest.approx(LN(8) / 3, abs=1e-12)
    assert t["entropy_rollout"].item() == pytest.approx((LN(1000) + 4) / 5, abs=1e-12)
    loss.backward()
    # d/dlogp: demo -w_SFT / 3 - A p / 8; row 1 -w_RL A rho / 8 where unclipped; row 2 -A rho / 8 where unclipped
    want = torch.tensor([[-0.25 / 3 - 0.05 / 8, -0.125 / 3 - 0.2 / 8, -0.5 / 3 - 0.45 / 8, 0.0],
                         [0.0, -0.5 / 8, -2.0 * 0.5 / 8, 0.0],
                         [0.0, 4.0 / 8, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy.grad, -0.001 / 8 * mask.double(), rtol=0, atol=1e-15)  # only the bonus


def test_official_variant_by_hand():
    """exp(+H) in w_SFT, shaped demonstration term, no clip, constant Z = 16, the same entropy bonus."""
    logp, old, adv, mask, demo, entropy = batch()
    c = cfg(**OFFICIAL, entropy_coef=0.001)
    loss, t = srft.srft_loss(logp, old, adv, mask, demo, c, 16.0, 8.0, 3.0, 5.0, entropy)
    assert SFT_OFFICIAL == pytest.approx(1.3959490, abs=1e-7)
    assert t["sft_loss"].item() == pytest.approx(SFT_OFFICIAL, abs=1e-12)
    assert t["off_policy_loss"].item() == pytest.approx(-1.1 / 16, abs=1e-12)
    assert t["pg_loss"].item() == pytest.approx((-3.0 + 5.0) / 16, abs=1e-12)
    assert loss.item() == pytest.approx(SFT_OFFICIAL + (-1.1 - 3.0 + 5.0) / 16 - 0.001 * E_MEAN, abs=1e-12)
    assert t["w_sft"].item() == pytest.approx(3.5 / 3, abs=1e-12) and t["clip_frac"].item() == 0.0
    loss.backward()
    # demo: -w_SFT / 3 - A f'(p) p / 16 with f'(p) p = 0.1 p / (p + 0.1)^2 = (0.25, 0.16, 0.09)
    want = torch.tensor([[-1.0 / 3 - 0.125 / 16, -2.0 / 3 - 0.08 / 16, -0.5 / 3 - 0.045 / 16, 0.0],
                         [-1.5 / 16, -0.5 / 16, -1.0 / 16, 0.0],
                         [1.0 / 16, 4.0 / 16, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12)


def test_seq_mean_by_hand():
    """Eq. (7) for the RL terms: per-sample means -0.7/3, -2.7/3, 5.6/2 over 3 samples; Eq. (27) unchanged."""
    logp, old, adv, mask, demo, entropy = batch()
    loss, _ = srft.srft_loss(logp, old, adv, mask, demo, cfg(loss_agg="seq-mean"), 3.0, 8.0, 3.0, 5.0, entropy)
    assert loss.item() == pytest.approx(SFT_PAPER + (-0.7 / 3 - 0.9 + 2.8) / 3, abs=1e-12)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_two_micro_batches_sum_to_the_step(variant):
    """Rows {0, 1} and {2} as two micro-batches with the step's normalisers give the one-batch loss and terms."""
    logp, old, adv, mask, demo, entropy = batch()
    c = cfg(**OFFICIAL, entropy_coef=0.01) if variant == "official" else cfg(entropy_coef=0.01)
    rollout = [mask[:2] * (1 - demo[:2]), mask[2:] * (1 - demo[2:])]
    norms = [common.step_normaliser([mask[:2], mask[2:]], c.loss_agg, 16.0),
             common.step_normaliser([mask[:2], mask[2:]], "token-mean"),
             common.step_normaliser([(mask * demo)[:2], (mask * demo)[2:]], "token-mean"),
             common.step_normaliser(rollout, "token-mean")]
    assert norms == [8.0 if variant == "paper" else 16.0, 8.0, 3.0, 5.0]
    whole, tw = srft.srft_loss(logp, old, adv, mask, demo, c, *norms, entropy)
    parts = [srft.srft_loss(logp[s], old[s], adv[s], mask[s], demo[s], c, *norms, entropy[s])
             for s in (slice(0, 2), slice(2, 3))]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(whole.item(), abs=1e-12)
    for k in tw:
        assert (parts[0][1][k] + parts[1][1][k]).item() == pytest.approx(tw[k].item(), abs=1e-12), k


def test_kl_term_covers_demonstration_and_rollout_tokens_by_hand():
    """Eq. (11) with --kl_coef 0.1 added to Eq. (31): k3, token-mean over ALL response tokens, the demonstration's
    too (as grpo.py and the LUFFY code base's KL loss over the response mask). Row 0 the demonstration, row 1 a
    rollout, log_r = ref - logp: demo -0.5, 1; rollout 0, -1 -> KL = (0.10653066 + 0.71828183 + 0 + 0.36787944) / 4
    = 0.29817298 (worked out in test_luffy.py). The loss moves by exactly 0.1 KL, its gradient by
    0.1 (1 - e^log_r) / 4 per token."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    log_r = torch.tensor([[-0.5, 1.0], [0.0, -1.0]], dtype=torch.float64)
    mask, demo = torch.ones(2, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    adv, entropy = torch.tensor([0.5, -0.5], dtype=torch.float64), torch.full((2, 2), 0.3, dtype=torch.float64)
    base, _ = srft.srft_loss(logp, logp.detach(), adv, mask, demo, cfg(), 4.0, 4.0, 2.0, 2.0, entropy)
    base_grad, = torch.autograd.grad(base, logp)
    loss, terms = srft.srft_loss(logp, logp.detach(), adv, mask, demo, cfg(kl_coef=0.1), 4.0, 4.0, 2.0, 2.0, entropy,
                                 ref_logp=logp.detach() + log_r)
    kl = (math.exp(-0.5) + 0.5 - 1 + math.e - 2 + math.exp(-1)) / 4
    assert terms["kl"].item() == pytest.approx(kl, abs=1e-12)
    assert (loss - base).item() == pytest.approx(0.1 * kl, abs=1e-12)
    grad, = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad - base_grad, 0.1 * (1 - log_r.exp()) / 4, rtol=0, atol=1e-15)


# =============================================================================================
# Mixed-group advantage, Eq. (25), and the variant switch
# =============================================================================================


def test_advantage_over_the_augmented_group():
    """7 failed rollouts + a correct demonstration: mean 1/8; no std: A_demo = 7/8, A_on = -1/8; with the
    unbiased std 1/sqrt(8): 7/sqrt(8) = 2.4748737 and -1/sqrt(8) = -0.3535534."""
    rewards = torch.tensor([[1.0] + [0.0] * 7])
    no_std = srft.group_advantages(rewards, std=False)
    torch.testing.assert_close(no_std, torch.tensor([[7 / 8] + [-1 / 8] * 7]), rtol=0, atol=1e-7)
    std = srft.group_advantages(rewards, std=True)
    assert std[0, 0].item() == pytest.approx(2.4748737, abs=1e-5)
    assert std[0, 1].item() == pytest.approx(-0.3535534, abs=1e-5)


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))


def test_group_layout_demonstration_first_with_its_prefix_mask():
    """Per prompt [demo, rollouts]; the demonstration's tokens (EOS included) are the ones srft_loss treats as
    demonstration tokens (prefix_mask), no rollout token is."""
    rows = [{"prompt_ids": [7, 8], "demo_ids": [30, 31, 2]}]
    rollouts = [[common.Sample([7, 8], [], [11, 2], "a", True), common.Sample([7, 8], [], [12], "b", False)]]
    samples = srft.mixed_groups(rows, rollouts, _Tok())
    assert [s.response_ids for s in samples] == [[30, 31, 2], [11, 2], [12]] and samples[0].text == "30 31"
    (mb,), = common.minibatches(samples, {"advantages": torch.arange(3.0)}, 1, 3, pad_id=0, device="cpu")
    assert mb["response_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert mb["prefix_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]


def test_official_variant_sets_all_five_and_flags_win():
    variants = {"official": srft.OFFICIAL}
    paper = common.parse_config(srft.Config, [], variants)
    assert (paper.w_sft_sign, paper.demo_ratio, paper.adv_std, paper.clip, paper.loss_agg) == \
        ("minus", "plain", True, True, "token-mean")
    assert (paper.w_sft_coef, paper.w_rl_coef, paper.entropy_coef, paper.shaping_gamma, paper.group_size) == \
        (0.5, 0.1, 0.001, 0.1, 8)
    off = common.parse_config(srft.Config, ["--variant", "official"], variants)
    assert (off.w_sft_sign, off.demo_ratio, off.adv_std, off.clip, off.loss_agg) == \
        ("plus", "shaped", False, False, "constant")
    mixed = common.parse_config(srft.Config, ["--variant", "official", "--w_sft_sign", "minus"], variants)
    assert mixed.w_sft_sign == "minus" and mixed.demo_ratio == "shaped"


# =============================================================================================
# The command line
# =============================================================================================

SRFT = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4",
        "--max_steps", "2", "--max_response_len", "48"]  # level-4 demonstrations need 46 tokens with EOS
KEYS = CORE_KEYS | {"sft_loss", "off_policy_loss", "pg_loss", "w_sft", "w_rl", "entropy_demo", "entropy_rollout",
                    "clip_frac", "demo_prob", "demo_reward", "entropy_bonus"}


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_srft_smoke(variant, tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / variant
    kl = ["--kl_coef", "0.001"] if variant == "official" else []  # grpo.py's shared --kl_coef
    run("srft.py", *small(tiny_model_dir, small_eval_file, out, *SRFT, "--eval_data", "", "--variant", variant, *kl))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]  # step 0: the data counts (no evaluation asked for)
    lines = lines[1:]
    for m in lines:
        assert KEYS <= set(m), set(m)
        assert ("kl" in m) == bool(kl) and m.get("kl", 0) >= 0
        assert m["demo_reward"] == 1.0 and m["sft_loss"] > 0 and m["off_policy_loss"] != 0
        assert m["demo_tokens"] == int(m["demo_tokens"]) and 4 * 10 < m["demo_tokens"] <= 4 * 48  # 4 whole demos
        # the mean of a convex function of H is at least the function of the mean H (Jensen), per step and
        # averaged over steps: the logged weights and entropies are of the same tokens
        sign = -1 if variant == "paper" else 1
        assert m["w_sft"] >= 0.5 * math.exp(sign * m["entropy_demo"]) - 1e-6
        assert m["w_rl"] >= 0.1 * math.exp(m["entropy_rollout"]) - 1e-6
        assert (m["w_sft"] <= 0.5) == (variant == "paper")
    saved = json.loads((out / "config.json").read_text())
    want = ("minus", "plain") if variant == "paper" else ("plus", "shaped")
    assert (saved["w_sft_sign"], saved["demo_ratio"]) == want


def test_group_of_one_is_refused_before_setup(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["srft.py", "--group_size", "1"])
    with pytest.raises(SystemExit, match="--group_size must be at least 2"):
        srft.main()
