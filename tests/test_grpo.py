"""grpo.group_advantages (METHODS.md Eq. 9-10) and grpo.grpo_loss (Eq. 3, 4, 6-8, 11, 12, 15) on tiny
hand-made tensors; every expected number is worked out in a comment."""
import math

import pytest
import torch

import common
import grpo


def cfg(**kw) -> grpo.Config:
    base = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, entropy_coef=0.0, loss_agg="token-mean")
    return grpo.Config(**{**base, **kw})


# =============================================================================================
# group advantages
# =============================================================================================


def test_group_advantage_eq9_by_hand():
    rewards = torch.tensor([[1., 0., 0., 0.],
                            [1., 0., 0., 1.],
                            [0., 0.1, 1., 1.]])
    # row 0: mean 0.25; squared deviations 0.5625 + 3 * 0.0625 = 0.75; unbiased var 0.75 / 3 = 0.25,
    #        std 0.5 -> A = 0.75 / 0.500001, -0.25 / 0.500001
    # row 1: mean 0.5; squared deviations 4 * 0.25 = 1; var 1/3; std 0.5773503 -> A = +-0.5 / (std + 1e-6)
    # row 2 (UFT-style rewards): mean 0.525; squared deviations 0.275625 + 0.180625 + 2 * 0.225625
    #        = 0.9075; var 0.3025; std 0.55 -> A = (-0.525, -0.425, 0.475, 0.475) / 0.550001
    s1 = math.sqrt(1 / 3) + 1e-6
    want = torch.tensor([[0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001],
                         [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1],
                         [-0.525 / 0.550001, -0.425 / 0.550001, 0.475 / 0.550001, 0.475 / 0.550001]])
    got = grpo.group_advantages(rewards, std=True)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # biased (n) std would give row 0 std sqrt(0.75/4) = 0.433 and A_0 = 1.732, not 1.5
    assert got[0, 0].item() == pytest.approx(1.4999970, abs=1e-5)


def test_group_advantage_epsilon_is_1e6():
    # rewards 0 and 2e-6: mean 1e-6, unbiased std sqrt(2 * 1e-12 / 1) = 1.4142136e-6, so
    # A = +-1e-6 / (1.4142136e-6 + 1e-6) = +-0.41421356 (with eps 1e-8 it would be +-0.70215)
    got = grpo.group_advantages(torch.tensor([[0.0, 2e-6]]), std=True)
    torch.testing.assert_close(got, torch.tensor([[-0.41421356, 0.41421356]]), rtol=0, atol=1e-4)


def test_group_advantage_eq10_by_hand():
    rewards = torch.tensor([[1., 0., 0., 0.],
                            [0., 0.1, 1., 1.]])
    # Dr.GRPO: r - mean, no division. means 0.25 and 0.525
    want = torch.tensor([[0.75, -0.25, -0.25, -0.25],
                         [-0.525, -0.425, 0.475, 0.475]])
    torch.testing.assert_close(grpo.group_advantages(rewards, std=False), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("std", [True, False])
def test_all_equal_group_gives_zero(std):
    rewards = torch.tensor([[1., 1., 1.], [0., 0., 0.]])
    got = grpo.group_advantages(rewards, std=std)
    assert torch.all(torch.isfinite(got))
    assert torch.all(got == 0)


def test_group_of_size_one_eq9():
    """METHODS.md Eq. (9): 'A group of size one gets mu = 0, sigma = 1' -> A = r / (1 + 1e-6)."""
    rewards = torch.tensor([[1.], [0.], [0.1]])
    got = grpo.group_advantages(rewards, std=True)
    assert torch.all(torch.isfinite(got))  # torch's unbiased std of one element is nan
    torch.testing.assert_close(got, rewards / (1 + 1e-6), rtol=0, atol=1e-6)


def test_group_of_size_one_eq10():
    """Same convention (mu = 0 for a group of one) without the std: A = r."""
    rewards = torch.tensor([[1.], [0.], [0.1]])
    torch.testing.assert_close(grpo.group_advantages(rewards, std=False), rewards, rtol=0, atol=1e-6)


# =============================================================================================
# GRPO loss
# =============================================================================================


def test_ratio_one_is_policy_gradient():
    """rho = 1 (old = current): loss = token-mean of -A, grad wrt logp = -A m / N (Eq. 3-4, 6)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5],
                         [-0.3, -4.0, -9.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1],
                         [1, 1, 0]])
    # N = 5 tokens: loss = (-2 * 3 + 1 * 2) / 5 = -0.8
    loss, terms = grpo.grpo_loss(logp, old, adv, mask, cfg(), norm=5.0, token_norm=5.0)
    assert loss.item() == pytest.approx(-0.8, abs=1e-6)
    assert terms["pg_loss"].item() == pytest.approx(-0.8, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(-0.8, abs=1e-6)
    assert terms["clip_frac"].item() == 0.0
    loss.backward()
    # d/dlogp (-A rho) / N = -A rho / N = -A / N: row 0 -> -0.4, row 1 -> +0.2, masked -> 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.4, -0.4, -0.4],
                                                        [0.2, 0.2, 0.0]]), rtol=0, atol=1e-6)


def test_ratio_one_seq_mean():
    """Same tensors, Eq. (7): per-sequence means -2 and +1, mean over 2 sequences = -0.5."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -9.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, terms = grpo.grpo_loss(logp, logp.detach(), adv, mask, cfg(loss_agg="seq-mean"),
                                 norm=2.0, token_norm=5.0)
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    loss.backward()
    # d/dlogp: -A / (len_i * 2): row 0 -> -2/6, row 1 -> 1/4
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3, -1 / 3], [0.25, 0.25, 0.0]]),
                               rtol=0, atol=1e-6)


def test_clipping_by_hand():
    """eps_low = 0.2, eps_high = 0.28 (asymmetric, so swapped bounds would fail). old_logp = 0, so
    rho = exp(logp). Per-token c = -min(rho A, clip(rho, 0.8, 1.28) A):

        row 0, A = +1: rho 1.5  -> clip 1.28: c = -1.28, clipped, grad 0
                       rho 1.25 -> inside:    c = -1.25, grad -A rho / N = -1.25 / 6
                       rho 0.5  -> min(0.5, 0.8) = 0.5 unclipped: c = -0.5, grad -0.5 / 6
                       rho 3.0 masked
        row 1, A = -1: rho 0.5  -> -min(-0.5, -0.8) = 0.8, clipped, grad 0
                       rho 0.75 -> -min(-0.75, -0.8) = 0.8, clipped, grad 0
                       rho 1.5  -> -min(-1.5, -1.28) = 1.5 unclipped, grad +1.5 / 6
                       rho 3.0 masked
    N = 6: loss = (-1.28 - 1.25 - 0.5 + 0.8 + 0.8 + 1.5) / 6 = 0.07 / 6; clip_frac = 3 / 6."""
    ratios = torch.tensor([[1.5, 1.25, 0.5, 3.0],
                           [0.5, 0.75, 1.5, 3.0]])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0],
                         [1, 1, 1, 0]])
    c = cfg(clip_eps_low=0.2, clip_eps_high=0.28)
    loss, terms = grpo.grpo_loss(logp, old, adv, mask, c, norm=6.0, token_norm=6.0)
    assert loss.item() == pytest.approx(0.07 / 6, abs=1e-6)
    assert terms["clip_frac"].item() == pytest.approx(0.5, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.25 / 6, -0.5 / 6, 0.0],
                                                        [0.0, 0.0, 1.5 / 6, 0.0]]), rtol=0, atol=1e-6)


def test_kl_k3_by_hand():
    """Eq. (11): k = exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10], token-mean.
       token 0: log_r = -1.5 - (-1) = -0.5 -> e^-0.5 + 0.5 - 1 = 0.10653066
       token 1: log_r = -1 - (-2) = 1      -> e - 1 - 1       = 0.71828183
       token 2: log_r = -5 - (-25) = 20    -> e^20 - 21, clamped to 10
       token 3: masked (would be huge)
    KL = (0.10653066 + 0.71828183 + 10) / 3 = 3.60827083; A = 0 so loss = 0.1 * KL.
    grad wrt logp: beta (1 - e^log_r) / N, 0 where clamped. Float64: exact algebra (float32's exp may be 1-2 ulp
    off on other CPUs, which is 5e-7 of the KL)."""
    logp = torch.tensor([[-1.0, -2.0, -25.0, -30.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -5.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, terms = grpo.grpo_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), mask, cfg(kl_coef=0.1),
                                 norm=3.0, token_norm=3.0, ref_logp=ref)
    kl = (math.exp(-0.5) + 0.5 - 1 + math.e - 2 + 10) / 3
    assert kl == pytest.approx(3.60827083, abs=1e-7)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * kl, rel=1e-6)
    loss.backward()
    want = torch.tensor([[0.1 * (1 - math.exp(-0.5)) / 3, 0.1 * (1 - math.e) / 3, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-6)


def test_kl_zero_when_policy_equals_reference():
    logp = torch.tensor([[-1.0, -2.0]])
    loss, terms = grpo.grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), cfg(kl_coef=1.0),
                                 norm=2.0, token_norm=2.0, ref_logp=logp.clone())
    assert terms["kl"].item() == 0.0 and loss.item() == 0.0


def test_entropy_bonus_sign_and_value():
    """Eq. (12)/(15): loss gets - beta_H * token-mean(H). H masked mean = (1 + 2) / 2 = 1.5, so
    beta_H = 0.01 lowers the loss by 0.015; grad wrt H = -beta_H / N on response tokens. Float64: the difference
    of two losses near -0.5 to 1e-7 would be 2 float32 ulp."""
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    adv = torch.tensor([0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    base, _ = grpo.grpo_loss(logp, logp, adv, mask, cfg(entropy_coef=0.0), 2.0, 2.0, entropy=entropy)
    loss, terms = grpo.grpo_loss(logp, logp, adv, mask, cfg(entropy_coef=0.01), 2.0, 2.0, entropy=entropy)
    assert base.item() == pytest.approx(-0.5, abs=1e-6)  # pg term: token-mean of -A
    assert terms["entropy_bonus"].item() == pytest.approx(1.5, abs=1e-6)
    assert (loss - base).item() == pytest.approx(-0.015, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.005, -0.005, 0.0]], dtype=torch.float64), rtol=0,
                               atol=1e-8)


def test_loss_shares_over_micro_batches_sum_to_step_loss():
    """Two micro-batches with the step normalisers (6 tokens in all) give the loss of the union:
    A = (1, -2) over 2 + 1 tokens and A = (3) over 3 tokens, rho = 1:
    token-mean of -A = (-1 * 2 + 2 * 1 - 3 * 3) / 6 = -1.5; clip_frac shares sum to 0."""
    lp1, m1, a1 = torch.zeros(2, 2), torch.tensor([[1, 1], [1, 0]]), torch.tensor([1.0, -2.0])
    lp2, m2, a2 = torch.zeros(1, 3), torch.tensor([[1, 1, 1]]), torch.tensor([3.0])
    norm = common.step_normaliser([m1, m2], "token-mean")
    l1, t1 = grpo.grpo_loss(lp1, lp1, a1, m1, cfg(), norm, norm)
    l2, t2 = grpo.grpo_loss(lp2, lp2, a2, m2, cfg(), norm, norm)
    assert (l1 + l2).item() == pytest.approx(-1.5, abs=1e-6)
    assert (t1["clip_frac"] + t2["clip_frac"]).item() == 0.0
