"""prefix_rft.py (METHODS.md section 8, Eq. 42-48): the prefix schedule and lengths, the advantages, the
entropy gate (incl. across ranks), the loss and its gradients on hand-made tensors, ratio 1 on prefix tokens
with a real tiny model, and smoke runs through the command line. Expected numbers are worked out in comments."""
import json
import math
import random
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_cli import CORE_KEYS, metrics, run, small
from transformers import AutoModelForCausalLM

import common
import prefix_rft


def cfg(**kw) -> prefix_rft.Config:
    base = dict(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=3.0, entropy_coef=0.0, loss_agg="constant")
    return prefix_rft.Config(**{**base, **kw})


# =============================================================================================
# Eq. (42)-(43): prefix-ratio schedule and prefix lengths
# =============================================================================================


def test_l_low_cosine_schedule_by_hand():
    c = cfg(max_steps=100)  # l_start 0.95 -> l_end 0.05 over T = 100 iterations
    # l_low(t) = 0.05 + 0.45 (1 + cos(pi t / 100)): t = 25 -> 0.05 + 0.45 * 1.70710678 = 0.81819805
    #                                                t = 75 -> 0.05 + 0.45 * 0.29289322 = 0.18180195
    want = {0: 0.95, 25: 0.81819805, 50: 0.5, 75: 0.18180195, 100: 0.05, 101: 0.05, 400: 0.05}
    for t, v in want.items():
        assert prefix_rft.prefix_low(t, c) == pytest.approx(v, abs=1e-8), t
    c = cfg(max_steps=100, prefix_decay_steps=10, prefix_low_start=0.8, prefix_low_end=0.2)
    assert prefix_rft.prefix_low(5, c) == pytest.approx(0.5) and prefix_rft.prefix_low(10, c) == 0.2


def test_prefix_lengths_are_floor_of_a_uniform_ratio():
    """|y*| = 100, l ~ U(0.3, 0.7): L = floor(100 l) is uniform on {30, ..., 69}, 1/40 each. 40000 draws:
    each bin's frequency has sd 0.00078, so 0.003 is ~4 sd; Beta(2, 2) (0.0375 in the middle bins),
    l ~ U(0, 0.7), or rounding instead of flooring (L = 70 appears) would all fail."""
    g = torch.Generator().manual_seed(0)
    lengths = prefix_rft.prefix_lengths([100] * 40000, 0.3, 0.7, 1, generator=g)
    assert min(lengths) == 30 and max(lengths) == 69
    counts = torch.bincount(torch.tensor(lengths), minlength=70)[30:70].double() / len(lengths)
    assert (counts - 1 / 40).abs().max() < 0.003, counts
    assert sum(lengths) / len(lengths) == pytest.approx(49.5, abs=0.15)  # sd of the mean 0.058


def test_prefix_length_edge_rules():
    L = prefix_rft.prefix_lengths
    assert L([10], 0.05, 0.05, 1) == [1]  # floor(0.5) = 0, raised to L_min = 1
    assert L([10], 0.05, 0.05, 3) == [3]  # ... or to L_min = 3
    assert L([10], 0.95, 0.95, 1) == [9]  # floor(9.5) = 9
    assert L([10], 1.0, 1.0, 1) == [9]  # floor(10) = 10 would be the whole demonstration: capped at |y*| - 1
    assert L([4], 0.5, 0.5, 10) == [3]  # L_min above the cap: the cap wins (as in the official code)
    assert L([2], 0.0, 1.0, 1) == [1]
    assert L([40, 7], 0.5, 0.5, 1) == [20, 3]  # one draw per hybrid, each on its own |y*|
    eos = 2
    assert prefix_rft.demo_length([5, 6, 7, eos], eos) == 3  # the appended EOS is not part of y*
    assert prefix_rft.demo_length([5, 6, 7], eos) == 3  # truncated to the budget: no EOS to drop


# =============================================================================================
# Eq. (45) and the official code's prefix-aware estimators
# =============================================================================================


def test_advantages_by_hand():
    # G = 8: row 0: 2 of 7 plain rollouts right, hybrid right; row 1: 1 of 7 right, hybrid wrong
    rewards = torch.tensor([[1., 1., 0., 0., 0., 0., 0., 1.],
                            [0., 0., 0., 0., 0., 0., 1., 0.]])
    a, p = prefix_rft.hybrid_advantages(rewards, "dr_grpo", std=False)
    # Eq. (45): means over all 8 are 3/8 and 1/8
    torch.testing.assert_close(a, rewards - torch.tensor([[0.375], [0.125]]))
    assert torch.equal(a, p) and a[0, 7].item() == pytest.approx(0.625)
    a, p = prefix_rft.hybrid_advantages(rewards, "dr_grpo_prefix", std=False)
    # plain: r - mu' with mu' = 2/7, 1/7; hybrid sampled tokens r_h raw; prefix r_h - mu' (+5/7 = 0.714, -1/7)
    torch.testing.assert_close(a[:, :7], rewards[:, :7] - torch.tensor([[2 / 7], [1 / 7]]))
    torch.testing.assert_close(a[:, 7], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(p[:, 7], torch.tensor([5 / 7, -1 / 7]))
    torch.testing.assert_close(p[:, :7], a[:, :7])  # plain rows have no prefix tokens; same values anyway
    a, p = prefix_rft.hybrid_advantages(rewards, "dr_grpo_prefix_v2", std=False)
    torch.testing.assert_close(a[:, 7], torch.tensor([0.0, 0.0]))  # a group of one minus its own mean
    torch.testing.assert_close(p[:, 7], torch.tensor([-2 / 7, -1 / 7]))  # never a positive push
    # std: Eq. (9) over all 8; row 0: unbiased std sqrt((3 * 0.625^2 + 5 * 0.375^2) / 7) = 0.51754917
    a, _ = prefix_rft.hybrid_advantages(rewards.double(), "dr_grpo", std=True)  # float64: 1e-6 is 8 float32 ulp
    assert a[0, 7].item() == pytest.approx(0.625 / (0.51754917 + 1e-6), abs=1e-6)


def official_estimator(rewards, v2):
    """The official code's dr_grpo_prefix(_v2) written plainly: group by (prompt, prefix id), the plain
    rollouts share the empty prefix's id, each hybrid has its own; n rollouts per prefix = 1."""
    P, G = rewards.shape
    keys = [(i, "none" if j < G - 1 else f"hybrid-{i}") for i in range(P) for j in range(G)]
    r = rewards.reshape(-1).tolist()
    groups = defaultdict(list)
    for k, x in zip(keys, r):
        groups[k].append(x)
    mean = {k: (sum(v) / len(v) if (len(v) > 1 or v2) else 0.0) for k, v in groups.items()}
    sampled = [x - mean[k] for k, x in zip(keys, r)]
    prefix = [s - mean[(k[0], "none")] if k[1] != "none" else s for k, s in zip(keys, sampled)]
    return torch.tensor(sampled).view(P, G), torch.tensor(prefix).view(P, G)


@pytest.mark.parametrize("G", [2, 3, 8])
@pytest.mark.parametrize("estimator", ["dr_grpo_prefix", "dr_grpo_prefix_v2"])
def test_prefix_estimators_match_a_plain_reading_of_the_code(G, estimator):
    rewards = torch.tensor([[random.Random(G * 10 + i).choice([0.0, 1.0]) for i in range(G)] for _ in range(3)])
    rewards[0], rewards[1, :-1] = 1.0, 0.0  # an all-right group and one where only the hybrid may be right
    want = official_estimator(rewards, estimator.endswith("v2"))
    got = prefix_rft.hybrid_advantages(rewards, estimator, std=False)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# =============================================================================================
# Eq. (46): the entropy gate
# =============================================================================================


def hand_case():
    # micro-batch 0: a hybrid (prefix = first 3 tokens) and a plain rollout; micro-batch 1: a hybrid, all prefix
    e0 = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.3, 0.3, 0.0, 0.0]])
    p0 = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    e1 = torch.tensor([[0.9, 0.1, 0.9, 0.2]])
    p1 = torch.tensor([[1, 1, 1, 1]])
    return [e0, e1], [p0, p1]


def test_gate_keeps_exactly_ceil_kN_with_ties_by_position():
    """Prefix tokens in order: 0.5 0.9 0.9 | 0.9 0.1 0.9 0.2, N = 7. k = 0.3: ceil(2.1) = 3 are kept, the
    four 0.9s tie, so the first three by position: mb0 tokens 1, 2 and mb1 token 0 (a threshold H >= 0.9
    would keep four). Non-prefix tokens keep g = 1 whatever their entropy."""
    ents, pres = hand_case()
    g0, g1 = prefix_rft.entropy_gates(ents, pres, 0.3, "minibatch")
    assert g0.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and g1.tolist() == [[1, 0, 0, 0]]
    g0, g1 = prefix_rft.entropy_gates(ents, pres, 0.5, "minibatch")  # ceil(3.5) = 4: the four 0.9s
    assert g0.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and g1.tolist() == [[1, 0, 1, 0]]
    g0, g1 = prefix_rft.entropy_gates(ents, pres, 0.01, "minibatch")  # ceil(0.07) = 1
    assert g0.tolist() == [[0, 1, 0, 1], [1, 1, 1, 1]] and g1.tolist() == [[0, 0, 0, 0]]
    g0, g1 = prefix_rft.entropy_gates(ents, pres, 1.0, "minibatch")
    assert g0.min() == 1 and g1.min() == 1
    # official unit: each micro-batch alone. mb0: N = 3, ceil(0.9) = 1 -> its first 0.9;
    # mb1: N = 4, ceil(1.2) = 2 -> both of its 0.9s
    g0, g1 = prefix_rft.entropy_gates(ents, pres, 0.3, "microbatch")
    assert g0.tolist() == [[0, 1, 0, 1], [1, 1, 1, 1]] and g1.tolist() == [[1, 0, 1, 0]]


@pytest.mark.parametrize("k", [0.2, 0.3, 0.7])
def test_gate_count_and_order_on_random_entropies(k):
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        ents = [torch.randint(0, 5, (3, 9), generator=g).float() / 4 for _ in range(2)]  # many ties
        pres = [(torch.rand(3, 9, generator=g) < 0.6).long() for _ in range(2)]
        gates = prefix_rft.entropy_gates(ents, pres, k, "minibatch")
        n = sum(int(p.sum()) for p in pres)
        kept = torch.cat([e[(p == 1) & (gt == 1)] for e, p, gt in zip(ents, pres, gates)])
        dropped = torch.cat([e[(p == 1) & (gt == 0)] for e, p, gt in zip(ents, pres, gates)])
        assert kept.numel() == math.ceil(k * n - 1e-9), (trial, n)
        assert dropped.numel() == 0 or kept.numel() == 0 or kept.min() >= dropped.max()
        assert all(bool((gt[p == 0] == 1).all()) for p, gt in zip(pres, gates))


def _gate_worker(rank, store, ents, pres, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    gates = [prefix_rft.entropy_gates(ents[rank], pres[rank], 0.3, unit) for unit in ("minibatch", "microbatch")]
    torch.save(gates, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gate_pools_prefix_tokens_across_ranks(tmp_path):
    """Two gloo ranks, one micro-batch each, give the gates of one process holding both micro-batches
    (rank 0's first): the pool spans ranks, and the micro-batch unit does not."""
    ents, pres = hand_case()
    ents, pres = [[ents[0]], [ents[1]]], [[pres[0]], [pres[1]]]
    mp.start_processes(_gate_worker, args=(str(tmp_path / "store"), ents, pres, str(tmp_path / "gates")), nprocs=2,
                       start_method="fork")  # fork: no second import of torch and transformers
    got = [torch.load(tmp_path / f"gates.{r}") for r in range(2)]
    single = prefix_rft.entropy_gates(ents[0] + ents[1], pres[0] + pres[1], 0.3, "minibatch")
    assert torch.equal(got[0][0][0], single[0]) and torch.equal(got[1][0][0], single[1])
    assert got[1][0][0].tolist() == [[1, 0, 0, 0]]  # rank 1 loses the tie of its second 0.9 to rank 0
    per_micro = prefix_rft.entropy_gates(ents[0] + ents[1], pres[0] + pres[1], 0.3, "microbatch")
    assert torch.equal(got[0][1][0], per_micro[0]) and torch.equal(got[1][1][0], per_micro[1])


# =============================================================================================
# Eq. (47)-(48): the loss
# =============================================================================================


def loss_case():
    """Row 0: a hybrid (prefix = tokens 0-1), A = +1, its token 0 gated off; row 1: a plain rollout, A = -1."""
    ratios = torch.tensor([[1.5, 0.5, 1.1, 3.0],
                           [5.0, 2.0, 0.5, 1.0]])
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    prefix = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    gate = torch.tensor([[0.0, 1, 1, 1], [1, 1, 1, 1]])
    entropy = torch.tensor([[9.0, 9.0, 1.0, 7.0], [2.0, 2.0, 2.0, 2.0]], requires_grad=True)
    return logp, adv, mask, prefix, gate, entropy


def test_loss_by_hand_with_gate_clip_and_dual_clip():
    """eps 0.2, kappa 3, old_logp = 0 so rho = exp(logp). c = -min(rho A, clip(rho) A), then min(c, 3|A|) if A < 0:
        row 0 (A = +1): rho 1.5 -> -1.2 (clipped) but gated: 0 | 0.5 -> -0.5 | 1.1 -> -1.1 | masked
        row 1 (A = -1): rho 5 -> 5, dual-clipped to 3 | 2 -> 2 | 0.5 -> 0.8 (clipped) | 1 -> 1
    sum = -0.5 - 1.1 + 3 + 2 + 0.8 + 1 = 5.2; C = 10 -> 0.52. clip_frac 2/7, dual_clip_frac 1/7.
    Entropy bonus (beta 0.01) over sampled tokens only: (1 + 2 * 4) / 5 = 1.8 -> loss 0.52 - 0.018.
    d/dlogp = -A rho / C where unclipped: row 0: 0, -0.05, -0.11, 0; row 1: 0 (dual), 0.2, 0 (clip), 0.1."""
    logp, adv, mask, prefix, gate, entropy = loss_case()
    sampled = mask * (1 - prefix)
    loss, terms = prefix_rft.prefix_rft_loss(logp, torch.zeros(2, 4), adv, mask, gate, sampled, cfg(entropy_coef=0.01),
                                             10.0, 7.0, 5.0, entropy)
    assert terms["pg_loss"].item() == pytest.approx(0.52, abs=1e-6)
    assert terms["entropy_bonus"].item() == pytest.approx(1.8, abs=1e-6)
    assert loss.item() == pytest.approx(0.502, abs=1e-6) and terms["loss"].item() == pytest.approx(0.502, abs=1e-6)
    assert terms["clip_frac"].item() == pytest.approx(2 / 7) and terms["dual_clip_frac"].item() == pytest.approx(1 / 7)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.05, -0.11, 0.0], [0.0, 0.2, 0.0, 0.1]]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy.grad, torch.tensor([[0.0, 0.0, -0.002, 0.0], [-0.002] * 4]), rtol=0, atol=1e-8)


def test_dual_clip_off_and_positive_advantages_untouched():
    # kappa = 0: row 1 token 0 keeps c = 5, grad -A rho / C = 0.5: sum 5.2 + 2 = 7.2
    logp, adv, mask, prefix, gate, _ = loss_case()
    loss, terms = prefix_rft.prefix_rft_loss(logp, torch.zeros(2, 4), adv, mask, gate, mask * (1 - prefix),
                                             cfg(dual_clip=0.0), 10.0, 7.0, 5.0)
    assert loss.item() == pytest.approx(0.72, abs=1e-6) and terms["dual_clip_frac"].item() == 0
    loss.backward()
    assert logp.grad[1, 0].item() == pytest.approx(0.5, abs=1e-6)
    # A > 0 is never dual-clipped, however large rho: c = -1.2 (clip), not min(c, ...) of anything
    big = torch.tensor([[20.0]]).log().requires_grad_(True)
    one = torch.ones(1, 1)
    loss, _ = prefix_rft.prefix_rft_loss(big, torch.zeros(1, 1), one, one, one, one, cfg(), 1.0, 1.0, 1.0)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)


def test_gated_tokens_carry_no_gradient():
    """The same tensors with the gate open everywhere: only the gated token's gradient changes (to 0)."""
    g = torch.Generator().manual_seed(0)
    logp0 = (torch.randn(3, 6, generator=g) * 0.1 - 1).double()
    old = logp0 + torch.randn(3, 6, generator=g).double() * 0.3  # ratios in and out of the clip range
    adv = torch.tensor([[0.7], [-0.4], [0.2]]).double().expand(3, 6)
    mask = torch.ones(3, 6)
    gate = torch.ones(3, 6, dtype=torch.float64)
    gate[0, 1] = gate[2, 0] = gate[2, 3] = 0.0
    grads = []
    for gt in (torch.ones_like(gate), gate):
        logp = logp0.clone().requires_grad_(True)
        loss, _ = prefix_rft.prefix_rft_loss(logp, old, adv, mask, gt, mask, cfg(), 18.0, 18.0, 18.0)
        loss.backward()
        grads.append(logp.grad)
    off = gate == 0
    assert grads[1][off].abs().max() == 0 and grads[0][off].abs().min() > 0
    assert torch.equal(grads[0][~off], grads[1][~off])


def test_prefix_tokens_clipped_like_sampled_tokens():
    """Prefix and sampled tokens with the same rho and A get the same loss and gradient (Eq. 47): row 0's
    prefix half mirrors its sampled half, for A > 0 and A < 0 (dual clip at rho 5 included)."""
    ratios = torch.tensor([[1.5, 0.5, 1.0, 1.5, 0.5, 1.0], [5.0, 0.5, 1.1, 5.0, 0.5, 1.1]],
                          dtype=torch.float64)  # exact algebra: 1e-6 is 2 float32 ulp of 7.1
    adv = torch.tensor([[1.0] * 6, [-2.0] * 6])
    prefix = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    ones = torch.ones(2, 6)
    out = []
    for m in (prefix, 1 - prefix):
        logp = ratios.log().requires_grad_(True)
        loss, _ = prefix_rft.prefix_rft_loss(logp, torch.zeros(2, 6), adv, m, ones, 1 - prefix, cfg(), 1.0, 1.0, 1.0)
        loss.backward()
        out.append((loss.item(), logp.grad[:, :3] + logp.grad[:, 3:]))
    # by hand: row 0: -1.2 - 0.5 - 1 = -2.7; row 1 (A = -2): min(10, 6) + 1.6 + 2.2 = 9.8 -> 7.1
    assert out[0][0] == pytest.approx(7.1, abs=1e-6) and out[1][0] == pytest.approx(7.1, abs=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1])


def test_kl_term_covers_prefix_and_sampled_tokens_ungated_by_hand():
    """Eq. (11) with --kl_coef 0.1 added to Eq. (48): k3, token-mean over ALL response tokens of the unit, prefix
    tokens included and whatever their gate (as grpo.py and verl's KL loss over the response mask). Row 0 a hybrid
    (prefix, then a sampled token), row 1 a plain rollout; the gate drops the prefix token from the policy term
    only. log_r = ref - logp: -0.5, 1 | 0, -1 -> KL = (0.10653066 + 0.71828183 + 0 + 0.36787944) / 4 = 0.29817298
    (worked out in test_luffy.py). The loss moves by exactly 0.1 KL, its gradient by 0.1 (1 - e^log_r) / 4."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    log_r = torch.tensor([[-0.5, 1.0], [0.0, -1.0]], dtype=torch.float64)
    mask, prefix = torch.ones(2, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    gate, adv = 1 - prefix, torch.tensor([[0.5, 0.5], [-0.5, -0.5]], dtype=torch.float64)
    args = (logp, logp.detach(), adv, mask, gate, mask * (1 - prefix))
    base, _ = prefix_rft.prefix_rft_loss(*args, cfg(), 4.0, 4.0, 3.0)
    base_grad, = torch.autograd.grad(base, logp)
    loss, terms = prefix_rft.prefix_rft_loss(*args, cfg(kl_coef=0.1), 4.0, 4.0, 3.0, ref_logp=logp.detach() + log_r)
    kl = (math.exp(-0.5) + 0.5 - 1 + math.e - 2 + math.exp(-1)) / 4
    assert terms["kl"].item() == pytest.approx(kl, abs=1e-12)
    assert (loss - base).item() == pytest.approx(0.1 * kl, abs=1e-12)
    grad, = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad - base_grad, 0.1 * (1 - log_r.exp()) / 4, rtol=0, atol=1e-15)


def test_two_micro_batches_both_units():
    """Micro-batch 1: 2 rows (3 + 2 tokens), micro-batch 2: 1 row (1 token); rho = 1, gate open, A per row.
    Paper unit (whole step, C = 12): loss = sum of -A over tokens / 12.
        -(1 * 3 + (-2) * 2 + 4 * 1) = -3 -> -0.25
    Official unit (each micro-batch / L_max = 4 / n_micro = 2, i.e. C = 8): -(3 - 4) / 8 + (-4) / 8 = -0.375.
    Entropy bonus (sampled tokens: mb1 entropies sum 6 over 3, mb2 4 over 1): whole step 10 / 4 = 2.5;
    official: mean of the micro-batch means (2 + 4) / 2 = 3."""
    m1, m2 = torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([[1, 0, 0]])
    a1, a2 = torch.tensor([[1.0] * 3, [-2.0] * 3]), torch.tensor([[4.0] * 3])
    s1, s2 = torch.tensor([[0, 1, 1], [1, 0, 0]]), torch.tensor([[1, 0, 0]])  # sampled (non-prefix) tokens
    e1, e2 = torch.tensor([[9.0, 1.0, 2.0], [3.0, 9.0, 9.0]]), torch.tensor([[4.0, 9.0, 9.0]])
    c = cfg(entropy_coef=0.1)
    for unit, constant, pg, bonus in (("minibatch", 12.0, -0.25, 2.5), ("microbatch", 4.0, -0.375, 3.0)):
        norms = prefix_rft.unit_normalisers([m1, m2], "constant", constant, unit)
        tn = prefix_rft.unit_normalisers([m1, m2], "token-mean", 0.0, unit)
        sn = prefix_rft.unit_normalisers([s1, s2], "token-mean", 0.0, unit)
        total = {}
        for lp, a, m, s, e, n, t, sm in ((torch.zeros(2, 3), a1, m1, s1, e1, norms[0], tn[0], sn[0]),
                                         (torch.zeros(1, 3), a2, m2, s2, e2, norms[1], tn[1], sn[1])):
            _, terms = prefix_rft.prefix_rft_loss(lp, lp, a, m, torch.ones_like(lp), s, c, n, t, sm, e)
            for k, v in terms.items():
                total[k] = total.get(k, 0.0) + v.item()
        assert total["pg_loss"] == pytest.approx(pg, abs=1e-6), unit
        assert total["entropy_bonus"] == pytest.approx(bonus, abs=1e-6), unit
        assert total["loss"] == pytest.approx(pg - 0.1 * bonus, abs=1e-6), unit


# =============================================================================================
# With a real tiny model: old log-probs on prefix tokens, the gate's entropies, clipping after a step
# =============================================================================================


def test_prefix_ratio_is_one_then_clipped_after_a_step(tiny_model_dir):
    torch.manual_seed(0)
    model = common.PolicyModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                               compile=False)
    fake_run = SimpleNamespace(model=model, ref_model=None)
    V = model.lm.config.vocab_size
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, V) for _ in range(n)]

    samples = [common.Sample(ids(4), ids(5) if i % 2 else [], ids(3 + i), "", True) for i in range(4)]
    adv = torch.tensor([0.5, 1.0, -0.5, -1.0])
    minibatches = common.minibatches(samples, {"advantages": adv}, 2, 1, 0, "cpu")  # 2 steps x 2 micro-batches
    micro = [mb for m in minibatches for mb in m]
    common.old_logprobs(fake_run, micro, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    c = cfg(entropy_coef=0.0)
    for step, minibatch in enumerate(minibatches):
        gate_h = prefix_rft.gate_entropies(model, minibatch, step == 0, 1.0)
        for mb, h in zip(minibatch, gate_h):
            logp, entropy = model(**common.model_inputs(mb), with_entropy=True)
            m, pre = mb["response_mask"].bool(), mb["prefix_mask"].bool()
            # the gate's entropies are the training forward's, on both steps (pi_old's on the first)
            # (float32 forwards: they may differ by a few ulp of entropies and log-probs ~5, 5e-7 each)
            torch.testing.assert_close(h[m], entropy.detach()[m], rtol=1e-5, atol=1e-5)
            ratio = torch.exp(logp - mb["old_logp"]).detach()
            if step == 0:  # old log-probs were recomputed on the prefix: rho = 1 there too
                torch.testing.assert_close(ratio[m], torch.ones_like(ratio[m]), rtol=0, atol=1e-5)
            A = mb["advantages"][:, None].expand_as(logp)
            loss, _ = prefix_rft.prefix_rft_loss(logp, mb["old_logp"], A, mb["response_mask"], torch.ones_like(logp),
                                                 mb["response_mask"], c, 1.0, 1.0, 1.0)
            if step == 1 and pre.any():  # after a big step: prefix ratios leave the clip range...
                assert ((ratio[pre] - 1).abs() > 0.2).any(), ratio[pre]
                # ...and the loss is the plain formula of Eq. (4)-(5) on every token, float64
                r, a = ratio.double(), A.double()
                c4 = -torch.minimum(r * a, r.clamp(0.8, 1.2) * a)
                c5 = torch.where(a < 0, torch.minimum(c4, -3 * a), c4)
                assert loss.item() == pytest.approx(float((c5 * m).sum()), rel=1e-5)
            loss.backward()
        opt.step()
        opt.zero_grad()


# =============================================================================================
# Command line: smoke runs and bad input
# =============================================================================================

PRFT = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "2"]
KEYS = CORE_KEYS | {"pg_loss", "clip_frac", "dual_clip_frac", "entropy_bonus", "prefix_low", "prefix_ratio",
                    "gate_kept_frac", "reward_hybrid", "reward_plain", "entropy_prefix"}


def test_prefix_rft_smoke(tiny_model_dir, small_eval_file, tmp_path):
    """Two steps of the default (paper) run; the official variant's code paths (micro-batch unit of the gate
    and of the normalisers) are checked above on hand-made tensors, its settings below."""
    out = tmp_path / "paper"
    run("prefix_rft.py", *small(tiny_model_dir, small_eval_file, out, "--max_steps", "2", "--eval_every", "0", *PRFT,
                                "--kl_coef", "0.001"))  # grpo.py's shared --kl_coef, with its reference model
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert KEYS <= set(m), KEYS - set(m)
        assert m["kl"] >= 0
        assert 0 < m["prefix_ratio"] < 1 and 0 <= m["reward_hybrid"] <= 1 and m["reward_plain"] == m["reward"]
        assert 0.2 <= m["gate_kept_frac"] <= 1
        assert m["demo_tokens"] == int(m["demo_tokens"]) and 4 <= m["demo_tokens"] < 4 * 24  # 4 prefixes, never whole
    assert lines[1]["prefix_low"] == pytest.approx(0.95) and lines[2]["prefix_low"] == pytest.approx(0.5)
    assert "eval_accuracy" in lines[2] and json.loads((out / "config.json").read_text())["unit"] == "minibatch"


def test_official_variant_settings():
    c = common.parse_config(prefix_rft.Config, ["--variant", "official"], {"official": prefix_rft.OFFICIAL})
    assert c.unit == "microbatch" and c.advantage == "dr_grpo" and c.dual_clip == 3.0 and c.loss_constant == 0
    assert c.micro_batching == "sequences"  # the official unit: a micro-batch of --micro_batch_size sequences
    c = common.parse_config(prefix_rft.Config, ["--variant", "official", "--unit", "minibatch"],
                            {"official": prefix_rft.OFFICIAL})
    assert c.unit == "minibatch"  # the command line wins over the variant


@pytest.mark.parametrize("flags, message", [
    (["--group_size", "1"], "--group_size must be at least 2"),
    (["--entropy_top_k", "0"], "--entropy_top_k"),
    (["--prefix_low_start", "0.99"], "--prefix_high"),
    (["--dual_clip", "0.5"], "--dual_clip"),
    (["--advantage", "dr_grpo_prefix", "--adv_std"], "--adv_std"),
    (["--unit", "microbatch"], "--micro_batching sequences"),  # its unit is the micro-batch: cut by sequences
    (["--variant", "official", "--micro_batching", "tokens"], "--micro_batching sequences"),
])
def test_bad_settings_are_refused_before_setup(monkeypatch, flags, message):
    def setup(*args, **kwargs):
        raise AssertionError("reached common.setup")

    monkeypatch.setattr(common, "setup", setup)
    monkeypatch.setattr("sys.argv", ["prefix_rft.py", *flags])
    with pytest.raises(SystemExit, match=re.escape(message)):
        prefix_rft.main()
