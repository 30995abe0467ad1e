"""luffy.py: the mixed group (layout, Eq. 16), the shaped off-policy term (Eq. 17-18), the on-policy term
(Eq. 19), the total (Eq. 20), both variants, the RL + SFT-loss baseline, and the CLI. Every expected number
is worked out in a comment; gradients are checked against closed forms written out independently."""
import json
import math
import sys

import pytest
import torch

import common
import luffy
from test_cli import CORE_KEYS, metrics, run, small

GAMMA = 0.1


def cfg(**kw) -> luffy.Config:
    base = dict(clip_eps_low=0.2, clip_eps_high=0.2, clip=True, adv_std=True, entropy_coef=0.0,
                loss_agg="token-mean", shaping_gamma=GAMMA, demo_loss="shaped", sft_coef=1.0)
    return luffy.Config(**{**base, **kw})


# =============================================================================================
# Mixed-group advantage, Eq. (16): the demonstration is column 0 of each group
# =============================================================================================


def test_worked_example_official_no_std():
    """7 failed rollouts + a correct demonstration: mean 1/8, so A_demo = 7/8 and A_on = -1/8 each."""
    rewards = torch.tensor([[1.0] + [0.0] * 7])
    got = luffy.mixed_advantages(rewards, std=False, demo_in_group=True)
    torch.testing.assert_close(got, torch.tensor([[7 / 8] + [-1 / 8] * 7]), rtol=0, atol=1e-7)


def test_worked_example_paper_std_normalised():
    """Same group, std-normalised: squared deviations (7/8)^2 + 7 (1/8)^2 = 56/64 = 7/8; unbiased variance
    (7/8) / 7 = 1/8, std = 1/sqrt(8) = 0.35355339. A_demo = (7/8) sqrt(8) = 7/sqrt(8) = 2.4748737,
    A_on = -(1/8) sqrt(8) = -1/sqrt(8) = -0.3535534 (each over std + 1e-6). Float64: exact algebra (1e-6 would be
    4 float32 ulp of 2.47)."""
    got = luffy.mixed_advantages(torch.tensor([[1.0] + [0.0] * 7], dtype=torch.float64), std=True, demo_in_group=True)
    s = 1 / math.sqrt(8) + 1e-6
    torch.testing.assert_close(got, torch.tensor([[0.875 / s] + [-0.125 / s] * 7], dtype=torch.float64), rtol=0,
                               atol=1e-12)
    assert got[0, 0].item() == pytest.approx(2.4748737, abs=1e-5)
    assert got[0, 1].item() == pytest.approx(-0.3535534, abs=1e-5)


def test_baseline_advantage_ignores_the_demonstration():
    """RL + SFT-loss baseline: statistics over the rollouts only, the demonstration gets 0.
    Row 0: demo 1, rollouts [1, 0, 0, 0, 0, 0, 0]: rollout mean 1/7 -> 6/7, -1/7 (LUFFY's mixed group
    would give mean 2/8 -> 0.75, -0.25). Row 1: 7 failed rollouts + correct demo -> all 0 (LUFFY: 7/8).
    Float64: exact algebra (in float32, 1 - 1/7 and 6/7 may be 1 ulp = 6e-8 apart)."""
    rewards = torch.tensor([[1.0, 1.0] + [0.0] * 6,
                            [1.0] + [0.0] * 7], dtype=torch.float64)
    got = luffy.mixed_advantages(rewards, std=False, demo_in_group=False)
    want = torch.tensor([[0.0, 6 / 7] + [-1 / 7] * 6,
                         [0.0] * 8], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    mixed = luffy.mixed_advantages(rewards, std=False, demo_in_group=True)
    torch.testing.assert_close(mixed[0], torch.tensor([0.75, 0.75] + [-0.25] * 6, dtype=torch.float64), rtol=0,
                               atol=1e-12)


# =============================================================================================
# Group layout: G-1 rollouts + 1 demonstration (+EOS) as a whole response
# =============================================================================================


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))


def test_mixed_groups_layout_and_masks():
    rows = [{"prompt_ids": [7, 8], "demo_ids": [30, 31, 2]}, {"prompt_ids": [9], "demo_ids": [40, 2]}]
    rollouts = [[common.Sample([7, 8], [], [11, 2], "a", True), common.Sample([7, 8], [], [12], "b", False)],
                [common.Sample([9], [], [13, 14, 2], "c", True), common.Sample([9], [], [2], "d", True)]]
    samples = luffy.mixed_groups(rows, rollouts, _Tok())
    assert len(samples) == 6  # P * G with G = 3: per prompt [demo, rollout, rollout]
    demo = samples[0]
    assert (demo.prompt_ids, demo.prefix_ids, demo.generated_ids, demo.finished) == ([7, 8], [30, 31, 2], [], True)
    assert demo.text == "30 31"  # decoded without the EOS: what the verifier grades
    assert samples[1] is rollouts[0][0] and samples[2] is rollouts[0][1] and samples[4] is rollouts[1][0]
    assert samples[3].response_ids == [40, 2] and samples[3].prefix_ids == [40, 2]
    mbs = common.minibatches(samples, {"advantages": torch.arange(6.0)}, n_minibatches=2, micro=3,
                             pad_id=0, device="cpu")
    first = mbs[0][0]  # prompt 0's group: demo, then its two rollouts
    assert first["response_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert first["prefix_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]  # the whole demo, no rollout token
    assert mbs[1][0]["prefix_mask"].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert mbs[1][0]["advantages"].tolist() == [3.0, 4.0, 5.0]


def test_truncated_demonstration_is_refused():
    ok = [{"problem": "1+1=?", "demo_ids": [5, 6, 2], "demo_finished": True}]
    common.require_whole_demonstrations(ok, 3, "trained whole")
    with pytest.raises(SystemExit, match="1 of 2 demonstrations do not fit --max_response_len 3"):
        common.require_whole_demonstrations(ok + [{"problem": "2+2=?", "demo_ids": [5, 6, 7], "demo_finished": False}],
                                            3, "trained whole")
    chat = [{"role": "system", "content": "Think."}, {"role": "user", "content": "What is\n 6*7?"}]
    with pytest.raises(SystemExit) as err:  # a chat prompt: the problem's text, not the message list
        common.require_whole_demonstrations([{"problem": chat, "demo_ids": [5], "demo_finished": False}], 1, "x")
    assert 'for "What is 6*7?")' in str(err.value) and "role" not in str(err.value)


def test_official_variant_sets_all_four_and_flags_win():
    paper = common.parse_config(luffy.Config, [], {"official": luffy.OFFICIAL})
    assert (paper.clip, paper.adv_std, paper.loss_agg, paper.entropy_coef) == (True, True, "token-mean", 0.0)
    assert (paper.group_size, paper.shaping_gamma, paper.demo_loss, paper.sft_coef) == (8, 0.1, "shaped", 1.0)
    off = common.parse_config(luffy.Config, ["--variant", "official"], {"official": luffy.OFFICIAL})
    assert (off.clip, off.adv_std, off.loss_agg, off.entropy_coef) == (False, False, "constant", 0.001)
    mixed = common.parse_config(luffy.Config, ["--variant", "official", "--clip"], {"official": luffy.OFFICIAL})
    assert mixed.clip and not mixed.adv_std


# =============================================================================================
# The loss, Eq. (17)-(20), on a hand-built micro-batch (float64)
# =============================================================================================
#   row 0: demonstration, A = +0.5, p = (0.1, 0.4, 0.9), 4th position masked
#          f(p) = p / (p + 0.1) = (0.5, 0.8, 0.9): c_off = -0.5 f = (-0.25, -0.4, -0.45), sum -1.1
#   row 1: rollout, A = +1, rho = (1.5, 1.0, 0.5)
#          clip 0.2: -min(rho A, clip(rho, 0.8, 1.2) A) = (-1.2 clipped, -1.0, -0.5), sum -2.7
#          no clip: -rho A = (-1.5, -1.0, -0.5), sum -3.0
#   row 2: rollout, A = -2, rho = (0.5, 2.0), rest masked
#          clip 0.2: -min(-1.0, -1.6) = 1.6 clipped, -min(-4.0, -2.4) = 4.0: sum 5.6; no clip: 1 + 4 = 5
#   N = 8 tokens. Old log-probs of the demonstration are set far away (ratio e^{+-4}): they must not matter.

P_DEMO = [0.1, 0.4, 0.9]


def batch(dtype=torch.float64):
    old = torch.full((3, 4), math.log(0.5), dtype=dtype)
    old[0] = torch.tensor([4.0, -4.0, 4.0, 0.0]) + torch.log(torch.tensor(P_DEMO + [1.0], dtype=dtype))
    probs = torch.tensor([P_DEMO + [0.3],
                          [0.75, 0.5, 0.25, 0.3],  # 0.5 * rho
                          [0.25, 1.0, 0.3, 0.3]], dtype=dtype)
    logp = probs.log().requires_grad_(True)
    adv = torch.tensor([0.5, 1.0, -2.0], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    demo = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])  # prefix_mask: the whole demo row
    entropy = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.5, 0.5, 0.5, 9.0], [2.0, 2.0, 9.0, 9.0]], dtype=dtype)
    return logp, old, adv, mask, demo, entropy


def test_paper_variant_by_hand():
    logp, old, adv, mask, demo, entropy = batch()
    loss, t = luffy.luffy_loss(logp, old, adv, mask, demo, cfg(), norm=8.0, token_norm=8.0, demo_norm=3.0,
                               entropy=entropy)
    assert loss.item() == pytest.approx((-1.1 - 2.7 + 5.6) / 8, abs=1e-12)  # 0.225
    assert t["off_policy_loss"].item() == pytest.approx(-1.1 / 8, abs=1e-12)
    assert t["pg_loss"].item() == pytest.approx(2.9 / 8, abs=1e-12)
    assert t["clip_frac"].item() == pytest.approx(2 / 8, abs=1e-12)  # one token in each rollout
    assert t["demo_prob"].item() == pytest.approx(1.4 / 3, abs=1e-12)
    # f'(p) = 0.1 / (p + 0.1)^2 = 2.5, 0.4, 0.1 -> mean 1.0
    assert t["shaping_weight"].item() == pytest.approx(1.0, abs=1e-12)
    assert "entropy_bonus" not in t and "sft_loss" not in t
    loss.backward()
    # d c / d logp: demo -A f'(p) p / N = -0.5 (0.25, 0.16, 0.09) / 8; rollouts -A rho / N where unclipped
    want = torch.tensor([[-0.015625, -0.01, -0.005625, 0.0],
                         [0.0, -1.0 / 8, -0.5 / 8, 0.0],
                         [0.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12)


def test_official_variant_by_hand():
    """No clip, constant Z = 16, entropy bonus 0.001 over all 8 response tokens, the demo's included:
    H mean = (1 + 2 + 3 + 3 * 0.5 + 2 + 2) / 8 = 11.5 / 8 = 1.4375.
    loss = (-1.1 - 3.0 + 5.0) / 16 - 0.001 * 1.4375 = 0.05625 - 0.0014375 = 0.0548125."""
    logp, old, adv, mask, demo, entropy = batch()
    entropy.requires_grad_(True)
    c = cfg(**luffy.OFFICIAL)
    loss, t = luffy.luffy_loss(logp, old, adv, mask, demo, c, norm=16.0, token_norm=8.0, demo_norm=3.0,
                               entropy=entropy)
    assert loss.item() == pytest.approx(0.0548125, abs=1e-12)
    assert t["pg_loss"].item() == pytest.approx(2.0 / 16, abs=1e-12)
    assert t["off_policy_loss"].item() == pytest.approx(-1.1 / 16, abs=1e-12)
    assert t["entropy_bonus"].item() == pytest.approx(1.4375, abs=1e-12)
    assert t["clip_frac"].item() == 0.0
    loss.backward()
    want = torch.tensor([[-0.0078125, -0.005, -0.0028125, 0.0],
                         [-1.5 / 16, -1.0 / 16, -0.5 / 16, 0.0],
                         [1.0 / 16, 4.0 / 16, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy.grad, -0.001 / 8 * mask.double(), rtol=0, atol=1e-15)


def test_seq_mean_by_hand():
    """Eq. (7): per-sample means -1.1/3, -2.7/3, 5.6/2, over 3 samples = (-0.36667 - 0.9 + 2.8) / 3."""
    logp, old, adv, mask, demo, _ = batch()
    loss, _ = luffy.luffy_loss(logp, old, adv, mask, demo, cfg(loss_agg="seq-mean"), 3.0, 8.0, 3.0)
    assert loss.item() == pytest.approx((-1.1 / 3 - 0.9 + 2.8) / 3, abs=1e-12)


def test_two_micro_batches_sum_to_the_step():
    """Rows {0, 1} and {2} as two micro-batches with the step's normalisers give the one-batch loss and terms."""
    logp, old, adv, mask, demo, entropy = batch()
    c = cfg(entropy_coef=0.01)
    whole, tw = luffy.luffy_loss(logp, old, adv, mask, demo, c, 8.0, 8.0, 3.0, entropy)
    norms = [common.step_normaliser([mask[:2], mask[2:]], "token-mean"), 8.0,
             common.step_normaliser([(mask * demo)[:2], (mask * demo)[2:]], "token-mean")]
    assert norms == [8.0, 8.0, 3.0]
    parts = [luffy.luffy_loss(logp[s], old[s], adv[s], mask[s], demo[s], c, *norms, entropy[s])
             for s in (slice(0, 2), slice(2, 3))]
    assert (parts[0][0] + parts[1][0]).item() == pytest.approx(whole.item(), abs=1e-12)
    for k in tw:
        assert (parts[0][1][k] + parts[1][1][k]).item() == pytest.approx(tw[k].item(), abs=1e-12), k


def test_rl_with_sft_loss_baseline_by_hand():
    """--demo_loss sft: PG over the 5 rollout tokens only (Z = 5) + 1.0 x token-mean NLL of the demo.
    The demo's advantage (set to 99 here) must not enter: loss = 2.9 / 5 - (ln 0.1 + ln 0.4 + ln 0.9) / 3."""
    logp, old, adv, mask, demo, _ = batch()
    adv[0] = 99.0
    loss, t = luffy.luffy_loss(logp, old, adv, mask, demo, cfg(demo_loss="sft"), 5.0, 8.0, 3.0)
    nll = -(math.log(0.1) + math.log(0.4) + math.log(0.9)) / 3
    assert t["sft_loss"].item() == pytest.approx(nll, abs=1e-12)
    assert loss.item() == pytest.approx(2.9 / 5 + nll, abs=1e-12)
    assert "off_policy_loss" not in t and "shaping_weight" not in t
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3, 0.0], abs=1e-12)  # plain NLL
    assert logp.grad[1].tolist() == pytest.approx([0.0, -1.0 / 5, -0.5 / 5, 0.0], abs=1e-12)


def test_kl_term_covers_demonstration_and_rollout_tokens_by_hand():
    """Eq. (11) with --kl_coef 0.1 (k3, token-mean over ALL response tokens, the demonstration's too, as grpo.py
    and the official code's KL loss over the response mask). Row 0 the demonstration, row 1 a rollout; A = 0, so
    the policy terms vanish and the loss is the KL term alone. log_r = ref - logp per token:
       demo:    -0.5 -> e^-0.5 + 0.5 - 1 = 0.10653066;   1 -> e - 2 = 0.71828183
       rollout:  0   -> 0;                                 -1 -> e^-1 + 1 - 1 = 0.36787944
    KL = 1.19269193 / 4 = 0.29817298; loss = 0.1 KL; grad wrt logp = 0.1 (1 - e^log_r) / 4."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    log_r = torch.tensor([[-0.5, 1.0], [0.0, -1.0]], dtype=torch.float64)
    mask, demo = torch.ones(2, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, terms = luffy.luffy_loss(logp, logp.detach(), torch.zeros(2, dtype=torch.float64), mask, demo,
                                   cfg(kl_coef=0.1), 4.0, 4.0, 2.0, ref_logp=logp.detach() + log_r)
    kl = (math.exp(-0.5) + 0.5 - 1 + math.e - 2 + math.exp(-1)) / 4
    assert kl == pytest.approx(0.29817298, abs=1e-8)
    assert terms["kl"].item() == pytest.approx(kl, abs=1e-12) and loss.item() == pytest.approx(0.1 * kl, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, 0.1 * (1 - log_r.exp()) / 4, rtol=0, atol=1e-15)
    _, terms = luffy.luffy_loss(logp, logp.detach(), torch.zeros(2, dtype=torch.float64), mask, demo, cfg(), 4.0,
                                4.0, 2.0)
    assert "kl" not in terms  # --kl_coef 0 (the default): no reference model, no term


# =============================================================================================
# The point of the method: the demonstration-token gradient through p, never clipped
# =============================================================================================


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("a_demo", [0.875, -0.6])
def test_demo_gradient_is_shaped_and_never_clipped(variant, a_demo):
    """theta: logits of 6 demonstration tokens over a vocabulary of 5; p_t = softmax(theta_t)[y_t] spans
    0.004 .. 0.98, on both sides of gamma. Each token's gradient must be -A / N * gamma / (p + gamma)^2 *
    dp/dtheta, with dp_t/dtheta_{t,k} = p_t (1[k = y_t] - q_{t,k}) written out by hand, and equal autograd of
    the closed form -A sum f(p) / N. The old log-probs give ratios e^{+-6}, far outside any clip range:
    nothing changes."""
    torch.manual_seed(0)
    theta = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    theta[torch.arange(6), y] = torch.tensor([-4.0, -1.0, 0.0, 1.0, 3.0, 6.0], dtype=torch.float64)
    theta.requires_grad_(True)
    logp = torch.log_softmax(theta, -1)[torch.arange(6), y][None]  # [1, 6]
    p = logp.exp().detach()[0]
    assert p.min() < 0.01 and p.max() > 0.95
    old = logp.detach() + torch.tensor([[6.0, -6.0, 6.0, -6.0, 6.0, -6.0]], dtype=torch.float64)
    mask, demo = torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)
    c = cfg(**luffy.OFFICIAL) if variant == "official" else cfg()
    N = 6.0 if variant == "paper" else 48.0
    loss, _ = luffy.luffy_loss(logp, old, torch.tensor([a_demo], dtype=torch.float64), mask, demo, c, N, 6.0,
                               6.0, entropy=torch.zeros(1, 6, dtype=torch.float64))
    (got,) = torch.autograd.grad(loss, theta, retain_graph=True)

    q = torch.softmax(theta.detach(), -1)  # [6, 5]
    dp = p[:, None] * (torch.nn.functional.one_hot(y, 5).double() - q)  # [6, 5]: dp_t / dtheta_t
    closed = -a_demo / N * (GAMMA / (p + GAMMA) ** 2)[:, None] * dp
    torch.testing.assert_close(got, closed, rtol=1e-10, atol=1e-14)

    theta2 = theta.detach().clone().requires_grad_(True)
    p2 = torch.softmax(theta2, -1)[torch.arange(6), y]
    (ref,) = torch.autograd.grad(-a_demo * (p2 / (p2 + GAMMA)).sum() / N, theta2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    assert (got.abs().sum(-1) > 0).all()  # every demonstration token moves

    if variant == "paper":  # the same tokens as a rollout would be clipped where rho A is outside the range
        loss_on, _ = luffy.luffy_loss(logp, old, torch.tensor([a_demo], dtype=torch.float64), mask, 0 * demo, c,
                                      N, 6.0, 6.0)
        (g_on,) = torch.autograd.grad(loss_on, theta)
        assert (g_on.abs().sum(-1) == 0).sum() == 3  # half the ratios are clipped for either sign of A


# =============================================================================================
# The command line
# =============================================================================================

LUFFY = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4",
         "--max_steps", "2", "--max_response_len", "48"]  # level-4 demonstrations need 46 tokens with EOS


def test_luffy_smoke_paper(tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / "luffy"
    run("luffy.py", *small(tiny_model_dir, small_eval_file, out, *LUFFY, "--eval_every", "0"))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert CORE_KEYS | {"pg_loss", "off_policy_loss", "clip_frac", "demo_prob", "shaping_weight",
                            "demo_reward", "entropy_demo"} <= set(m), set(m)
        assert m["demo_reward"] == 1.0  # the builtin demonstrations are correct and graded as such
        assert 0 < m["demo_prob"] < 1 and m["shaping_weight"] > 0 and m["off_policy_loss"] != 0
        assert "sft_loss" not in m and "entropy_bonus" not in m
        assert m["demo_tokens"] == int(m["demo_tokens"]) and 4 * 10 < m["demo_tokens"] <= 4 * 48  # 4 whole demos


def test_luffy_smoke_official_sft_baseline(tiny_model_dir, small_eval_file, tmp_path):
    out = tmp_path / "luffy_sft"
    run("luffy.py", *small(tiny_model_dir, small_eval_file, out, *LUFFY, "--eval_data", "", "--variant", "official",
                           "--demo_loss", "sft", "--kl_coef", "0.001"))  # grpo.py's shared --kl_coef too
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2]  # step 0: the data counts (no evaluation asked for)
    lines = lines[1:]
    for m in lines:
        assert CORE_KEYS | {"pg_loss", "sft_loss", "entropy_bonus", "demo_prob", "demo_reward"} <= set(m), set(m)
        assert m["clip_frac"] == 0.0 and m["sft_loss"] > 0 and "off_policy_loss" not in m and m["kl"] >= 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["clip"], saved["adv_std"], saved["loss_agg"], saved["entropy_coef"]) == \
        (False, False, "constant", 0.001)


def test_group_of_one_is_refused_before_setup(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["luffy.py", "--group_size", "1"])
    with pytest.raises(SystemExit, match="--group_size must be at least 2"):
        luffy.main()


def test_cut_demonstrations_are_refused(tiny_model_dir, small_eval_file, tmp_path):
    p = run("luffy.py", *small(tiny_model_dir, small_eval_file, tmp_path / "b", *LUFFY, "--max_response_len", "24"),
            check=False)
    assert p.returncode != 0 and "do not fit --max_response_len 24" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
