"""forks/: NSR / PSR / W-REINFORCE (Eq. 49-50), forking tokens (Eq. 51-52), CHORD (Eq. 53-55) and HPT (Eq. 56-57).
Each loss against numbers worked out in a comment or against a plainly written float64 formula, the gradients
where the idea lives in the gradient, and a 2-step run of every fork through its command line."""
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
import test_cli
from test_cli import CORE_KEYS, ROOT, metrics, run, small

sys.path.insert(0, os.path.join(ROOT, "forks"))
import chord  # noqa: E402
import forking_tokens  # noqa: E402
import hpt  # noqa: E402
import nsr  # noqa: E402

FORKS = ["nsr", "forking_tokens", "chord", "hpt"]


def reference_clipped(logp, old, adv, eps_low=0.2, eps_high=0.2):
    """Eq. (4) written out element by element in float64: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)."""
    out = torch.zeros(logp.shape, dtype=torch.float64)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            rho = math.exp(float(logp[i, t]) - float(old[i, t]))
            a = float(adv[i])
            out[i, t] = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
    return out


# =============================================================================================
# NSR / PSR / W-REINFORCE (nsr.py)
# =============================================================================================


def test_decomposed_advantages_by_hand():
    """Eq. (49)-(50): A = lambda_+ r - lambda_- (1 - r); no group mean, so a group's statistics play no part."""
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(nsr.decomposed_advantages(r, "nsr", 0.1), torch.tensor([0., -1., 0., -1., -1.]))
    torch.testing.assert_close(nsr.decomposed_advantages(r, "psr", 0.1), torch.tensor([1., 0., 1., 0., 0.]))
    torch.testing.assert_close(nsr.decomposed_advantages(r, "w_reinforce", 0.1), torch.tensor([.1, -1., .1, -1., -1.]))
    torch.testing.assert_close(nsr.decomposed_advantages(r, "w_reinforce", 0.3), torch.tensor([.3, -1., .3, -1., -1.]))
    # an all-correct group: GRPO gives A = 0 everywhere, PSR keeps pushing every response up
    assert nsr.decomposed_advantages(torch.ones(3), "psr", 0.1).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("objective, want_row", [("nsr", {1: 0.0, 0: 1.0}), ("psr", {1: -1.0, 0: 0.0}),
                                                 ("w_reinforce", {1: -0.1, 0: 1.0})])
def test_objective_gradient_by_sample_sign(objective, want_row):
    """rho = 1: d/dlogp of -A rho / N = -A / N. NSR: exactly 0 on correct responses, +1/N on wrong ones (pushed
    down); PSR: the mirror image; W-REINFORCE: -0.1/N and +1/N. N = 7 response tokens."""
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -0.7], [-1.5, -0.2, -4.0]],
                        dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    adv = nsr.decomposed_advantages(rewards, objective, 0.1)
    loss, terms = nsr.grpo_loss(logp, logp.detach(), adv, mask, nsr.Config(), norm=7.0, token_norm=7.0)
    loss.backward()
    want = torch.tensor([[want_row[int(r)]] * 3 for r in rewards], dtype=torch.float64) * mask / 7
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-15)
    if objective == "nsr":
        assert torch.all(logp.grad[rewards == 1] == 0)  # exactly zero, not small
        assert loss.item() == pytest.approx(2 / 7)  # -(-1) * 2 tokens / 7


@pytest.mark.parametrize("objective", ["nsr", "psr", "w_reinforce"])
def test_nsr_loss_off_policy_against_float64_reference(objective):
    """A later mini-batch (rho != 1, both clip bounds crossed): the loss is Eq. (4) with Eq. (49)'s advantages,
    token-mean (Eq. 6), as an independent element-by-element float64 formula computes it."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(4, 5, generator=g, dtype=torch.float64) - 0.5)  # rho in [0.61, 1.65]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = nsr.decomposed_advantages(rewards, objective, 0.1)
    loss, _ = nsr.grpo_loss(logp, old, adv, mask, nsr.Config(), norm=13.0, token_norm=13.0)
    ref = (reference_clipped(logp, old, adv) * mask).sum() / 13
    assert loss.item() == pytest.approx(float(ref), abs=1e-12)
    assert abs(float(ref)) > 1e-3  # not trivially zero


# =============================================================================================
# Forking tokens (forking_tokens.py)
# =============================================================================================


def test_forking_gates_by_hand_across_micro_batches():
    """Two micro-batches, 9 response tokens in all (padding has the largest entropies and must not count):
    ceil(0.2 * 9) = 2 tokens, the two highest entropies of the whole step: 2.5 (micro-batch 0) and 3.0
    (micro-batch 1) - not the top 20% of each micro-batch separately, which would keep 2.5 and 1.9 too."""
    e1 = torch.tensor([[0.1, 2.5, 0.3, 9.0], [1.9, 0.2, 9.0, 9.0]])
    m1 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    e2 = torch.tensor([[3.0, 0.5, 0.4, 0.05]])
    m2 = torch.tensor([[1, 1, 1, 1]])
    g1, g2 = forking_tokens.forking_gates([e1, e2], [m1, m2], 0.2)
    torch.testing.assert_close(g1, torch.tensor([[0., 1., 0., 0.], [0., 0., 0., 0.]]))
    torch.testing.assert_close(g2, torch.tensor([[1., 0., 0., 0.]]))
    g1, g2 = forking_tokens.forking_gates([e1, e2], [m1, m2], 0.5)  # 5 tokens: 3.0, 2.5, 1.9, 0.5, 0.4
    assert g1.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]] and g2.tolist() == [[1, 1, 1, 0]]


def test_forking_gates_exact_count_with_ties_and_float_fractions():
    """15 tokens: 0.2 * 15 = 3.0000000000000004 in floating point, and ceil of that must still be 3. All entropies
    equal: a threshold H >= tau would keep all 15; exactly 3 are kept, the first 3 by position."""
    e = torch.ones(3, 5)
    gates = forking_tokens.forking_gates([e], [torch.ones(3, 5)], 0.2)[0]
    assert int(gates.sum()) == 3 and gates[0].tolist() == [1, 1, 1, 0, 0] and gates[1:].sum() == 0


@pytest.mark.parametrize("seed, frac", [(0, 0.2), (1, 0.2), (2, 0.35), (3, 0.05)])
def test_forking_gates_against_a_plain_sort(seed, frac):
    """Random entropies in three micro-batches with ragged masks: the gate keeps exactly the tokens that a plain
    Python ranking of (entropy, position) over the whole step puts in the top ceil(frac N)."""
    g = torch.Generator().manual_seed(seed)
    ents = [torch.rand(2, 7, generator=g), torch.rand(3, 4, generator=g), torch.rand(1, 9, generator=g)]
    masks = [(torch.rand(e.shape, generator=g) < 0.7).long() for e in ents]
    gates = forking_tokens.forking_gates(ents, masks, frac)
    tokens = [(float(e[r, c]), (k, r, c)) for k, (e, m) in enumerate(zip(ents, masks))
              for r in range(e.shape[0]) for c in range(e.shape[1]) if m[r, c]]
    n_keep = math.ceil(round(frac * len(tokens), 9))
    keep = {pos for _, pos in sorted(tokens, key=lambda x: (-x[0], x[1]))[:n_keep]}
    got = {(k, r, c) for k, gt in enumerate(gates) for r, c in (gt > 0).nonzero().tolist()}
    assert got == keep and len(got) == n_keep
    assert all(torch.all(gt[m == 0] == 0) for gt, m in zip(gates, masks))  # never a padding token


def _gate_worker(rank, store, ents, masks, out, unit="minibatch"):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if unit == "minibatch":
        gates = forking_tokens.forking_gates(ents[rank], masks[rank], 0.2)
    else:  # official: one micro-batch at a time, as the training loop calls it, no pooling with the other rank
        c = forking_tokens.Config(unit=unit)
        gates = [forking_tokens.microbatch_unit(e, m, c, 0.0, 2)[0] for e, m in zip(ents[rank], masks[rank])]
    torch.save(gates, f"{out}.{rank}")
    dist.destroy_process_group()


def test_forking_gates_pool_the_step_across_ranks(tmp_path):
    """Two gloo ranks with two micro-batches each give exactly the gates of one process holding all four (rank 0's
    first): ceil(0.2 N) over the whole step. Rank 0 holds only low entropies, so a per-rank top 20% would keep
    some of its tokens; pooled, the kept tokens are all rank 1's, and a tie at the boundary goes to the earlier."""
    ents = [[torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[0.15, 0.25, 0.05]])],
            [torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1.0, 3.0, 0.5]])]]
    masks = [[torch.ones(1, 3), torch.ones(1, 3)], [torch.tensor([[1, 1, 0]]), torch.ones(1, 3)]]
    mp.start_processes(_gate_worker, args=(str(tmp_path / "store"), ents, masks, str(tmp_path / "gates")), nprocs=2,
                       start_method="fork")
    got = [torch.load(tmp_path / f"gates.{r}") for r in range(2)]
    single = forking_tokens.forking_gates(ents[0] + ents[1], masks[0] + masks[1], 0.2)
    for r in range(2):
        assert all(torch.equal(a, b) for a, b in zip(got[r], single[2 * r:2 * r + 2]))
    # N = 11 response tokens -> ceil(2.2) = 3 kept: 3.0, 2.0 and the first of the two 1.0s (rank 1, micro-batch 0)
    assert [g.tolist() for g in got[0]] == [[[0, 0, 0]], [[0, 0, 0]]]
    assert [g.tolist() for g in got[1]] == [[[1, 1, 0]], [[0, 1, 0]]]


def test_forking_gates_per_micro_batch_do_not_pool_ranks(tmp_path):
    """--unit microbatch (official): each micro-batch on each rank keeps ceil(0.2 n) of its own n tokens, so rank 0,
    which holds only low entropies, keeps one token per micro-batch: 0.3 (3 tokens) and 0.25 (3 tokens); rank 1
    keeps 2.0 (2 tokens) and 3.0 (3 tokens). Pooled (above), rank 0 kept nothing."""
    ents = [[torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[0.15, 0.25, 0.05]])],
            [torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1.0, 3.0, 0.5]])]]
    masks = [[torch.ones(1, 3), torch.ones(1, 3)], [torch.tensor([[1, 1, 0]]), torch.ones(1, 3)]]
    mp.start_processes(_gate_worker, args=(str(tmp_path / "store"), ents, masks, str(tmp_path / "gates"),
                                           "microbatch"), nprocs=2, start_method="fork")
    got = [torch.load(tmp_path / f"gates.{r}") for r in range(2)]
    assert [g.tolist() for g in got[0]] == [[[0, 0, 1]], [[0, 1, 0]]]
    assert [g.tolist() for g in got[1]] == [[[1, 0, 0]], [[0, 1, 0]]]


def test_forking_loss_only_gated_tokens_get_gradient():
    """Eq. (52), rho = 1, A = (+1, -2): gated tokens give neither loss nor gradient but still count in the
    token-mean denominator N = 5 (the paper's 1 / sum |o_i|). Kept: (0, 1) with A = 1 and (1, 0) with A = -2:
    loss = (-1 + 2) / 5 = 0.2; grad = -A / 5 on the kept tokens, 0 elsewhere."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gate = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, terms = forking_tokens.forking_tokens_loss(logp, logp.detach(), adv, mask, gate, forking_tokens.Config(),
                                                     5.0, 5.0)
    assert loss.item() == pytest.approx(0.2, abs=1e-12)
    assert terms["forking_frac"].item() == pytest.approx(2 / 5, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0, -0.2, 0], [0.4, 0, 0]], dtype=torch.float64),
                               rtol=0, atol=1e-15)


E1 = torch.tensor([[0.1, 2.5, 0.3, 0.7, 0.2, 9.0], [1.9, 0.2, 0.05, 0.4, 0.6, 9.0]])  # last column: padding
M1 = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])  # 10 response tokens


@pytest.mark.parametrize("gate_norm, unit, norm", [("all", "minibatch", 10.0), ("selected", "minibatch", 2.0),
                                                   ("all", "microbatch", 30.0), ("selected", "microbatch", 6.0)])
def test_forking_unit_gates_and_selected_normaliser_by_hand(gate_norm, unit, norm):
    """10 response tokens, rho_H = 0.2: both units keep ceil(2) = 2 tokens, 2.5 at (0, 1) and 1.9 at (1, 0); the
    padding's 9.0 never counts. Agg's token-mean denominator: the paper's all 10 tokens, the official code's 2 gated
    ones (--gate_norm selected); with the micro-batch as the unit (official) it is multiplied by the rank's
    micro-batches per step, here 3, as verl's loss_scale_factor 1/3 does. The entropy-bonus/KL count stays 10 (x 3)."""
    c = forking_tokens.Config(gate_norm=gate_norm, unit=unit)
    if unit == "minibatch":
        gates, got, token_norm = forking_tokens.step_unit([E1], [M1], c, 0.0)
        gate = gates[0]
    else:
        gate, got, token_norm = forking_tokens.microbatch_unit(E1.clone().requires_grad_(), M1, c, 0.0, 3)
    assert gate.tolist() == [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert (got, token_norm) == (norm, 10.0 if unit == "minibatch" else 30.0)


def test_forking_gate_per_micro_batch_is_not_the_step_gate():
    """Two micro-batches of one step, 5 + 4 response tokens: pooled (paper), the step keeps ceil(0.2 * 9) = 2, 3.0
    and 2.8, both in micro-batch 1; per micro-batch (official), each keeps ceil(1.0) = ceil(0.8) = 1 of its own:
    0.5 in micro-batch 0, however low, and 3.0 in micro-batch 1."""
    e1, m1 = torch.tensor([[0.1, 0.5, 0.3, 9.0], [0.4, 0.2, 9.0, 9.0]]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    e2, m2 = torch.tensor([[3.0, 2.5, 2.8, 0.05]]), torch.tensor([[1, 1, 1, 1]])
    c = forking_tokens.Config(unit="microbatch")
    g1 = forking_tokens.microbatch_unit(e1, m1, c, 0.0, 2)[0]
    g2 = forking_tokens.microbatch_unit(e2, m2, c, 0.0, 2)[0]
    assert g1.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]] and g2.tolist() == [[1, 0, 0, 0]]
    step = forking_tokens.step_unit([e1, e2], [m1, m2], forking_tokens.Config(), 0.0)[0]
    assert step[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]] and step[1].tolist() == [[1, 0, 1, 0]]


@pytest.mark.parametrize("gate_norm, loss_agg, norm, want", [
    ("all", "token-mean", 10.0, 1 / 10), ("selected", "token-mean", 2.0, 1 / 2),  # 5x: 1 / rho_H
    ("all", "seq-mean", 2.0, (-1 / 5 + 2 / 5) / 2), ("selected", "seq-mean", 2.0, (-1 / 1 + 2 / 1) / 2)])
def test_forking_loss_selected_normaliser_by_hand(gate_norm, loss_agg, norm, want):
    """Eq. (52) on E1/M1's gate, rho = 1, A = (+1, -2): the two kept tokens give -1 and +2, sum 1. Token-mean: / 10
    (paper) or / 2 (official: the gated tokens), five times the loss and the gradient. Seq-mean: each row's token
    mean over its 5 tokens or its 1 gated token, then / 2 rows. Gradient -A / (norm * row count) on kept tokens."""
    logp = -torch.rand(2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.1
    logp.requires_grad_()
    gate = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    c = forking_tokens.Config(gate_norm=gate_norm, loss_agg=loss_agg)
    loss, _ = forking_tokens.forking_tokens_loss(logp, logp.detach(), adv, M1, gate, c, norm, 10.0)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    loss.backward()
    per_row = 1.0 if gate_norm == "selected" else 5.0  # the tokens each row's seq-mean divides by
    scale = norm if loss_agg == "token-mean" else norm * per_row
    want_grad = torch.zeros(2, 6, dtype=torch.float64)
    want_grad[0, 1], want_grad[1, 0] = -1.0 / scale, 2.0 / scale
    torch.testing.assert_close(logp.grad, want_grad, rtol=0, atol=1e-15)


# Rows: A = -1 with rho = (12, 5, 0.5), A = +1 with rho = (12, 1, 0.5); eps = 0.2; 6 tokens, token-mean.
# Eq. (4): row 0 -> (12, 5, 0.8), row 1 -> (-1.2, -1, -0.5); Eq. (5) caps row 0 at -kappa A = kappa:
# kappa 10 caps only the 12 (12 -> 10), kappa 3 also the 5 (-> 3); row 1 (A > 0) is never capped. Without the
# dual clip the rho = 12 token of row 0 is not clipped by Eq. (4) at all: gradient -A rho = 12.
DUAL = {0.0: ([12, 5, 0.8, -1.2, -1, -0.5], [12, 5, 0, 0, -1, -0.5], 0),
        10.0: ([10, 5, 0.8, -1.2, -1, -0.5], [0, 5, 0, 0, -1, -0.5], 1),
        3.0: ([3, 3, 0.8, -1.2, -1, -0.5], [0, 0, 0, 0, -1, -0.5], 2)}


def dual_batch():
    rho = torch.tensor([[12.0, 5.0, 0.5], [12.0, 1.0, 0.5]], dtype=torch.float64)
    logp = torch.tensor([[-0.7, -1.3, -2.0], [-0.4, -0.9, -3.1]], dtype=torch.float64, requires_grad=True)
    return logp, logp.detach() - torch.log(rho), torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.ones(2, 3)


@pytest.mark.parametrize("fork", ["forking_tokens", "chord"])
@pytest.mark.parametrize("kappa", [0.0, 10.0, 3.0])
def test_dual_clip_by_hand(fork, kappa):
    """Eq. (5) in both forks (official: kappa = 10 in forking tokens, 3 in CHORD; 0 = off, the paper): the loss of a
    token with A < 0 is min(c, -kappa A), and a capped token gets no gradient; d c / d logp = -A rho where Eq. (4)
    leaves rho unclipped. CHORD with mu = 0 and no demonstration is its GRPO term; forking tokens with every gate 1."""
    logp, old, adv, mask = dual_batch()
    per_token, grad, n_capped = DUAL[kappa]
    if fork == "chord":
        c = chord.Config(dual_clip=kappa)
        loss, terms = chord.chord_loss(logp, old, adv, mask, torch.zeros(2, 3), 0.0, c, 6.0, 6.0, 1.0)
    else:
        c = forking_tokens.Config(dual_clip=kappa)
        loss, terms = forking_tokens.forking_tokens_loss(logp, old, adv, mask, torch.ones(2, 3, dtype=torch.float64),
                                                         c, 6.0, 6.0)
    assert loss.item() == pytest.approx(sum(per_token) / 6, abs=1e-12)
    assert terms.get("dual_clip_frac", torch.tensor(0.0)).item() == pytest.approx(n_capped / 6, abs=1e-7)  # float32
    assert ("dual_clip_frac" in terms) == (kappa > 0)  # the paper variant logs exactly the keys it logged before
    loss.backward()
    torch.testing.assert_close(logp.grad.flatten(), torch.tensor(grad, dtype=torch.float64) / 6, rtol=0, atol=1e-12)


def test_official_variants_set_their_fields_and_flags_win():
    """--variant official sets every documented official behaviour; a flag on the command line wins over it."""
    ft, official = forking_tokens.Config, {"official": forking_tokens.OFFICIAL}
    paper = common.parse_config(ft, [], official)
    assert (paper.gate_norm, paper.unit, paper.dual_clip) == ("all", "minibatch", 0.0)
    off = common.parse_config(ft, ["--variant", "official"], official)
    assert (off.gate_norm, off.unit, off.dual_clip) == ("selected", "microbatch", 10.0)
    mixed = common.parse_config(ft, ["--variant", "official", "--dual_clip", "0", "--unit", "minibatch"], official)
    assert (mixed.gate_norm, mixed.unit, mixed.dual_clip) == ("selected", "minibatch", 0.0)
    official = {"official": chord.OFFICIAL}
    assert common.parse_config(chord.Config, [], official).dual_clip == 0.0
    assert common.parse_config(chord.Config, ["--variant", "official"], official).dual_clip == 3.0
    assert common.parse_config(chord.Config, ["--variant", "official", "--dual_clip", "0"], official).dual_clip == 0.0


@pytest.mark.parametrize("fork", [forking_tokens, chord])
def test_forks_refuse_a_dual_clip_at_or_below_one(fork, monkeypatch, tmp_path):
    """kappa <= 1 would cap the loss of A < 0 tokens below the unclipped -A at rho = 1: refused before setup."""
    monkeypatch.setattr(sys, "argv", ["fork.py", "--dual_clip", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--dual_clip"):
        fork.main()


# =============================================================================================
# CHORD (chord.py)
# =============================================================================================


def test_mu_schedule_by_hand():
    """Eq. (55), warm-up 10, decay 20, peak 0.5, valley 0.02: t = 5 -> 0.25 (half-way up); t = 10 -> 0.5;
    t = 20 (half the decay) -> 0.02 + 0.48 * (1 + cos(pi/2)) / 2 = 0.26; t >= 30 -> 0.02."""
    c = chord.Config(mu_peak=0.5, mu_valley=0.02, mu_warmup_steps=10, mu_decay_steps=20)
    got = [chord.mu_schedule(t, c) for t in (0, 5, 10, 20, 25, 30, 500)]
    want = [0.0, 0.25, 0.5, 0.26, 0.02 + 0.48 * (1 + math.cos(0.75 * math.pi)) / 2, 0.02, 0.02]
    assert got == pytest.approx(want, abs=1e-12)
    assert chord.mu_schedule(0, chord.Config(mu_peak=0.1, mu_valley=0.1, mu_decay_steps=0)) == 0.1  # CHORD-phi
    mu = chord.Config(mu_peak=0.9, mu_valley=0.05, mu_decay_steps=200)  # CHORD-mu: starts at the peak
    assert chord.mu_schedule(0, mu) == pytest.approx(0.9) and chord.mu_schedule(100, mu) == pytest.approx(0.475)


def chord_batch():
    """Row 0: a rollout (A = 1.5, 2 tokens); row 1: a demonstration, p = (0.5, 0.9, 0.2), the last token padding."""
    logp = torch.tensor([[-0.4, -1.1, -3.0], [math.log(0.5), math.log(0.9), math.log(0.2)]],
                        dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    demo = torch.tensor([[0, 0, 0], [1, 1, 1]])
    return logp, mask, demo, torch.tensor([1.5, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("phi", [True, False])
def test_chord_loss_and_gradient_by_hand(phi):
    """Eq. (53)-(54), mu = 0.3, rho = 1. GRPO part over the 2 rollout tokens: -1.5; SFT part over the 3 demo tokens:
    phi: -(0.25 ln 0.5 + 0.09 ln 0.9 + 0.16 ln 0.2) / 3; no phi: -(ln 0.5 + ln 0.9 + ln 0.2) / 3.
    Gradient: rollout tokens (1 - mu)(-A)/2; demo tokens -mu phi(p) / 3, phi taken as a constant (sg)."""
    logp, mask, demo, adv = chord_batch()
    mu, p = 0.3, [0.5, 0.9, 0.2]
    w = [q * (1 - q) for q in p] if phi else [1.0] * 3
    sft = -sum(wi * math.log(q) for wi, q in zip(w, p)) / 3
    loss, terms = chord.chord_loss(logp, logp.detach(), adv, mask, demo, mu, chord.Config(phi=phi), 2.0, 2.0, 3.0)
    assert terms["pg_loss"].item() == pytest.approx(-1.5, abs=1e-12)
    assert terms["sft_loss"].item() == pytest.approx(sft, abs=1e-12)
    assert terms["phi_weight"].item() == pytest.approx(sum(w) / 3, abs=1e-12)
    assert loss.item() == pytest.approx(0.7 * -1.5 + 0.3 * sft, abs=1e-12)
    loss.backward()
    want = torch.tensor([[0.7 * -1.5 / 2] * 2 + [0.0], [-0.3 * wi / 3 for wi in w]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12)


def test_chord_phi_gradient_vanishes_at_both_ends():
    """p (1 - p) is largest at p = 0.5 and falls to 0 as p -> 0 or 1: the SFT gradient of a near-certain token
    and of a nearly impossible one is tiny, a plain NLL (CHORD-mu) gives all three the same weight."""
    logp = torch.tensor([[math.log(1e-4), math.log(0.5), math.log(1 - 1e-4)]], dtype=torch.float64,
                        requires_grad=True)
    mask, demo = torch.ones(1, 3), torch.ones(1, 3)
    loss, _ = chord.chord_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), mask, demo, 1.0,
                               chord.Config(phi=True), 1.0, 1.0, 3.0)
    loss.backward()
    g = (-logp.grad * 3).tolist()[0]  # = phi(p)
    assert g == pytest.approx([1e-4 * (1 - 1e-4), 0.25, 1e-4 * (1 - 1e-4)], rel=1e-9)
    # the weight is detached: with phi's own gradient the p = 1e-4 entry would be p(1-p) + p(1-2p) ln p = -8.2e-4


def test_chord_mu_zero_is_grpo_and_mu_one_is_sft():
    logp, mask, demo, adv = chord_batch()
    grpo_only, t = chord.chord_loss(logp, logp.detach(), adv, mask, demo, 0.0, chord.Config(), 2.0, 2.0, 3.0)
    assert grpo_only.item() == pytest.approx(t["pg_loss"].item())
    sft_only, t = chord.chord_loss(logp, logp.detach(), adv, mask, demo, 1.0, chord.Config(), 2.0, 2.0, 3.0)
    assert sft_only.item() == pytest.approx(t["sft_loss"].item())


# =============================================================================================
# HPT (hpt.py)
# =============================================================================================


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))


def test_demonstration_sample_is_all_prefix():
    """common.demonstration_sample (CHORD's and HPT's demonstrations): y* + EOS as the sampler's prefix, nothing
    generated, so make_batch marks every response token prefix_mask = 1; the verifier grades it without EOS."""
    s = common.demonstration_sample({"prompt_ids": [7, 8], "demo_ids": [30, 31, 2]}, _Tok())
    assert (s.prompt_ids, s.prefix_ids, s.generated_ids, s.text, s.finished) == ([7, 8], [30, 31, 2], [], "30 31", True)
    mb = common.make_batch([s.prompt_ids], [s.response_ids], 0, "cpu", prefix_lens=[len(s.prefix_ids)])
    assert mb["prefix_mask"].tolist() == mb["response_mask"].tolist() == [[1, 1, 1]]


def test_hpt_gate_per_question_by_hand():
    """Eq. (56): SFT where the accuracy P <= gamma. gamma = 0 (official, Qwen): only all-failed questions;
    gamma = 2/8 (official, LLaMA): at most 2 of 8 solved."""
    r = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0],
                      [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    assert hpt.sft_prompts(r, 0.0).tolist() == [True, False, False, False, False]
    assert hpt.sft_prompts(r, 2 / 8).tolist() == [True, True, True, False, False]
    assert hpt.sft_prompts(r, 1.0).tolist() == [True] * 5
    assert hpt.sft_prompts(r, -1.0).tolist() == [False] * 5


def test_hpt_loss_masks_and_gradient_by_hand():
    """Rows: 0 an RL prompt's rollout (A = 0.5), 1 an SFT prompt's demonstration (p = 0.25, 0.5), 2 the SFT prompt's
    masked rollout (A = -0.7, but it must get nothing). loss = -0.5 (token-mean over row 0's 2 tokens)
    + 1.0 * -(ln 0.25 + ln 0.5) / 2; grad: row 0 -A/2, row 1 -sft_coef/2, row 2 exactly 0."""
    logp = torch.tensor([[-0.4, -1.0], [math.log(0.25), math.log(0.5)], [-0.2, -0.3]], dtype=torch.float64,
                        requires_grad=True)
    response = torch.ones(3, 2)
    rl = torch.tensor([1.0, 0.0, 0.0])
    prefix = torch.tensor([[0, 0], [1, 1], [0, 0]])
    mask, demo_mask = response * rl[:, None], response * prefix
    adv = torch.tensor([0.5, 0.0, -0.7], dtype=torch.float64)
    c = hpt.Config(sft_coef=1.0)
    loss, terms = hpt.hpt_loss(logp, logp.detach(), adv, mask, demo_mask, c, 2.0, 2.0, 2.0)
    sft = -(math.log(0.25) + math.log(0.5)) / 2
    assert terms["sft_loss"].item() == pytest.approx(sft, abs=1e-12)
    assert loss.item() == pytest.approx(-0.5 + sft, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25], [-0.5, -0.5], [0.0, 0.0]],
                                                       dtype=torch.float64), rtol=0, atol=1e-15)


def test_nsr_refuses_adv_std_before_setup(monkeypatch):
    """grpo.py's --adv_std divides by a group std that NSR's Eq. (49) does not have: refused, saying so."""
    monkeypatch.setattr(sys, "argv", ["nsr.py", "--adv_std"])
    with pytest.raises(SystemExit, match="--adv_std: NSR's advantages"):
        nsr.main()


# =============================================================================================
# The forks through their command line: 2 steps each, and each fork's docstring command = its GPU_RUN
# =============================================================================================

SMOKE = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4",
         "--max_steps", "2", "--eval_every", "0", "--eval_data", "none"]
DEMO = ["--max_response_len", "48"]  # level-4 demonstrations need 46 tokens with EOS


@pytest.mark.parametrize("script, extra, keys", [
    ("nsr", ["--objective", "nsr"], {"pg_loss", "clip_frac"}),
    ("nsr", ["--objective", "w_reinforce"], {"pg_loss", "clip_frac"}),
    ("forking_tokens", [], {"pg_loss", "forking_frac"}),
    ("forking_tokens", ["--variant", "official"], {"pg_loss", "forking_frac", "dual_clip_frac"}),
    ("chord", DEMO, {"pg_loss", "sft_loss", "phi_weight", "mu"}),
    ("chord", [*DEMO, "--variant", "official"], {"pg_loss", "sft_loss", "phi_weight", "mu", "dual_clip_frac"}),
], ids=["nsr", "w_reinforce", "forking_tokens", "forking_tokens-official", "chord", "chord-official"])
def test_fork_smoke(script, extra, keys, tiny_model_dir, tmp_path):
    out = tmp_path / script
    run(f"forks/{script}.py", *small(tiny_model_dir, None, out, *SMOKE, *extra))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert CORE_KEYS | keys <= set(m) and ("dual_clip_frac" in m) == ("dual_clip_frac" in keys), set(m)
        assert 0 <= m["accuracy"] <= 1
        # a random model solves next to nothing: GRPO's advantages (forking_tokens) are then all 0, NSR's and
        # CHORD's terms are not
        assert m["grad_norm"] > 0 or script == "forking_tokens"
    if script == "forking_tokens":  # 20% of each step's tokens, rounded up, averaged over the 2 steps
        assert all(0.2 <= m["forking_frac"] < 0.3 for m in lines[1:])
    if script == "chord":  # default schedule: mu from 0.5 down a 40-iteration cosine
        assert lines[1]["mu"] == pytest.approx(0.5) and lines[2]["mu"] < 0.5
        assert all(m["sft_loss"] > 0 and m["demo_tokens"] > 4 * 10 for m in lines[1:])
    assert os.path.isdir(out / "checkpoint-000002")


@pytest.mark.parametrize("gate", ["1.0", "0"])
def test_hpt_smoke_switches_per_question(gate, tiny_model_dir, tmp_path):
    """--sft_gate 1: every question is an SFT question (no policy gradient, demonstrations trained).
    --sft_gate 0: SFT exactly on the questions none of whose rollouts is correct, so every question is one
    (sft_frac 1) exactly when the step's rollout accuracy is 0, and demonstrations are trained iff sft_frac > 0."""
    out = tmp_path / "hpt"
    run("forks/hpt.py", *small(tiny_model_dir, None, out, *SMOKE, *DEMO, "--sft_gate", gate))
    lines = metrics(out)[1:]
    assert len(lines) == 2
    for m in lines:
        assert CORE_KEYS | {"pg_loss", "sft_loss", "sft_frac"} <= set(m), set(m)
        assert m["sft_frac"] in (0, 0.25, 0.5, 0.75, 1)  # 4 questions a step
        assert (m["demo_tokens"] > 0) == (m["sft_frac"] > 0) == (m["sft_loss"] > 0)
        if gate == "1.0":
            assert m["sft_frac"] == 1.0 and m["pg_loss"] == 0.0 and m["demo_tokens"] > 4 * 10
        else:
            assert (m["sft_frac"] == 1.0) == (m["accuracy"] == 0.0)


@pytest.mark.parametrize("script", FORKS)
def test_fork_docstring_paper_command_lists_exactly_paper(script):
    test_cli.test_docstring_paper_command_lists_exactly_paper(script)
