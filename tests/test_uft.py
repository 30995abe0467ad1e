"""uft.py (METHODS.md section 6, Eq. 32-38; arXiv 2505.16984): the hint schedule, chunking and draw,
the pieces of a demonstration, the loss on hand-built tensors and its gradients, the reward scale,
the official variant, bad input, and a CLI run killed and resumed."""
import json
import math
import os
import shutil
import sys

import pytest
import torch
from test_cli import CORE_KEYS, TIMING, metrics, run, small
from transformers import AutoTokenizer

import builtin_task

import common
import uft

# =============================================================================================
# Eq. (33): hint probability schedule
# =============================================================================================


def test_hint_probability_by_hand():
    p = lambda t, T=300: uft.hint_probability(t, T, 0.05, 0.95)  # noqa: E731
    # 0.05 + 0.45 (1 + cos(pi t / T)); cos(pi/300) = 0.999945169, cos(pi/4) = 0.707106781
    assert p(1) == pytest.approx(0.05 + 0.45 * 1.999945169, abs=1e-9)  # 0.949975326: t starts at 1, not 0.95
    assert p(75) == pytest.approx(0.818198052, abs=1e-9)
    assert p(150) == pytest.approx(0.5, abs=1e-12)
    assert p(225) == pytest.approx(0.181801948, abs=1e-9)
    assert p(300) == pytest.approx(0.05, abs=1e-12)  # p_low at T_hint itself...
    assert p(301) == 0.0 and p(500) == 0.0  # ...and no hint at all after it
    # the default laptop run: T_hint = round(0.6 * 40) = 24; cos(pi/3) = 0.5, cos(2 pi/3) = -0.5
    assert [round(p(t, 24), 12) for t in (8, 12, 16, 24, 25)] == [0.725, 0.5, 0.275, 0.05, 0.0]
    with pytest.raises(ValueError, match="starts at 1"):
        p(0)


# =============================================================================================
# Eq. (32): chunk boundaries; Eq. (34): the Binomial draw
# =============================================================================================


@pytest.mark.parametrize("n, max_chunks, want", [
    (0, 5, [0]),  # nothing to hint
    (1, 5, [0, 1]),  # fewer pieces than chunks: one chunk per piece
    (2, 5, [0, 1, 2]),
    (4, 5, [0, 1, 2, 3, 4]),
    (5, 5, [0, 1, 2, 3, 4, 5]),
    (6, 5, [0, 1, 2, 4, 5, 6]),  # 1.2, 2.4, 3.6, 4.8
    (7, 5, [0, 1, 3, 4, 6, 7]),  # 1.4, 2.8, 4.2, 5.6
    (12, 5, [0, 2, 5, 7, 10, 12]),  # 2.4, 4.8, 7.2, 9.6
    (100, 5, [0, 20, 40, 60, 80, 100]),
    (9, 1, [0, 9]),  # one chunk: all or nothing
    (6, 4, [0, 2, 3, 4, 6]),  # 1.5 -> 2 and 4.5 -> 4: Python's round, half to even, as the official code
])
def test_chunk_boundaries(n, max_chunks, want):
    assert uft.chunk_boundaries(n, max_chunks) == want


def test_draw_hint_edges():
    ends = [3, 7, 12]  # three pieces ending after tokens 3, 7 and 12
    assert uft.draw_hint(ends, 1.0) == (12, 1.0)  # p = 1: every chunk, the whole hintable demonstration
    assert uft.draw_hint(ends, 0.0) == (0, 0.0)  # p = 0 (after T_hint): no hint
    assert uft.draw_hint([], 0.9) == (0, 0.0)  # a one-line demonstration is never hinted
    assert uft.draw_hint(list(range(1, 9)), 1.0, max_chunks=1) == (8, 1.0)


def binomial_pmf(K, p):
    return [math.comb(K, k) * p ** k * (1 - p) ** (K - k) for k in range(K + 1)]


def chi_square(counts, pmf):
    n = sum(counts)
    return sum((o - n * q) ** 2 / (n * q) for o, q in zip(counts, pmf))


@pytest.mark.parametrize("n_pieces, p", [(7, 0.3), (3, 0.6)])
def test_hint_lengths_follow_binomial(n_pieces, p):
    """k = the chunk index of each drawn hint must follow Binomial(min(5, n), p) (Eq. 34): chi-square over
    20000 draws below the 0.1% critical value, while plausible wrong distributions land far above it."""
    ends = [2 * i for i in range(1, n_pieces + 1)]  # piece i ends after token 2i
    bounds = uft.chunk_boundaries(n_pieces)
    K = len(bounds) - 1
    torch.manual_seed(0)
    counts = [0] * (K + 1)
    for _ in range(20000):
        tokens, fraction = uft.draw_hint(ends, p)
        k = bounds.index(round(fraction * n_pieces))
        assert tokens == (ends[bounds[k] - 1] if k else 0)
        counts[k] += 1
    critical = {5: 20.515, 3: 16.266}[K]  # chi-square, K degrees of freedom, p-value 0.001
    assert chi_square(counts, binomial_pmf(K, p)) < critical
    assert chi_square(counts, binomial_pmf(K, p + 0.05)) > 10 * critical  # a slightly wrong p
    assert chi_square(counts, [1 / (K + 1)] * (K + 1)) > 10 * critical  # R3's uniform boundary


def test_hint_draws_come_from_the_checkpointed_generator():
    """Draws use torch's global generator, whose state each rank saves in its checkpoint."""
    ends = [1, 2, 3, 4, 5, 6, 7]
    state = torch.get_rng_state()
    first = [uft.draw_hint(ends, 0.5) for _ in range(50)]
    torch.set_rng_state(state)
    assert [uft.draw_hint(ends, 0.5) for _ in range(50)] == first
    assert len(set(first)) > 3


# =============================================================================================
# What a piece is: a line of the demonstration, the last line never
# =============================================================================================


def demo_rows(tok, demos, max_len=48):
    ids = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in demos]
    return [{"problem": d, "demo_ids": i[:max_len], "demo_finished": len(i) <= max_len} for d, i in zip(demos, ids)]


def test_pieces_are_lines_but_never_the_last(tiny_model_dir, capsys):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    demos = ["3+5=8\n8+7=15\n</think>\n\\boxed{15}",  # the built-in format: 3 hintable lines
             "step one\nstep two\n",  # ends with a newline: that last line is still never hinted
             "42"]  # a single line: never hinted
    rows = demo_rows(tok, demos)
    uft.add_piece_ends(rows, tok, 48)
    hints = [[tok.decode(r["demo_ids"][:e]) for e in r["piece_ends"]] for r in rows]
    assert hints[0] == ["3+5=8\n", "3+5=8\n8+7=15\n", "3+5=8\n8+7=15\n</think>\n"]
    assert hints[1] == ["step one\n"]
    assert hints[2] == []
    assert "1 of 3 demonstrations are a single line" in capsys.readouterr().out


def test_bad_demonstrations_are_refused(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(SystemExit, match="do not fit --max_response_len 8"):
        uft.add_piece_ends(demo_rows(tok, ["3+5=8\n8+7=15\n</think>\n\\boxed{15}"], max_len=8), tok, 8)
    with pytest.raises(SystemExit, match="no demonstration has more than one line"):
        uft.add_piece_ends(demo_rows(tok, ["42", "\\boxed{7}"]), tok, 48)


@pytest.mark.parametrize("flags, match", [
    (dict(hint_prob_low=0.5, hint_prob_high=0.4), "--hint_prob_low"),
    (dict(hint_prob_high=1.5), "--hint_prob_high"),
    (dict(hint_chunks=0), "--hint_chunks"),
    (dict(hint_steps=-1), "--hint_steps"),
    (dict(kl_coef=-0.1), "--kl_coef"),
])
def test_bad_hint_settings_are_refused_before_setup(monkeypatch, capsys, flags, match):
    def setup(*args, **kwargs):
        raise AssertionError("reached common.setup")

    monkeypatch.setattr(common, "setup", setup)
    monkeypatch.setattr(sys, "argv", ["uft.py", *(f"--{k}={v}" for k, v in flags.items())])
    with pytest.raises(SystemExit) as refused:
        uft.main()
    assert match in f"{refused.value} {capsys.readouterr().err}"  # main's refusal, or the parser's for a value < 0


# =============================================================================================
# Eq. (36)-(37): the loss on hand-built tensors
# =============================================================================================


def hand_batch():
    """Two micro-batches, R = 4, float64. H = hint token, g = generated, . = padding.
        mb1 row A (A_i = +1):   H H g g       mb1 row B (A_i = -0.5): g g g .
        mb2 row C (A_i = +2):   H g . .
    Generated tokens and their ratios rho: A 1.5 (clipped: -1.2), 1.0 (-1.0); B 0.5 (clipped: +0.4),
    1.1 (+0.55), 2.0 (A < 0 and rho > 1.2: unclipped +1.0); C 0.7 (unclipped -1.4).
    pg = (-1.2 - 1.0 + 0.4 + 0.55 + 1.0 - 1.4) / 6 = -1.65 / 6 = -0.275; clip_frac = 2 / 6.
    Hint tokens (rho = 5, wildly off, must not matter): -logp = 0.5, 1.0, 2.0 -> hint_loss = 3.5 / 3.
    log(ref / pi) = ln 2 on A's last token, -ln 2 on B's first, 0 elsewhere (5 on hint tokens, ignored):
    k3 = (2 - ln 2 - 1) + (1/2 + ln 2 - 1) = 0.5 -> kl = 0.5 / 6. Entropy 1..6 on generated tokens -> 3.5."""
    f = torch.float64
    ln2 = math.log(2)
    logp = [torch.tensor([[-0.5, -1.0, -0.3, -0.2], [-0.4, -0.6, -0.9, 0.0]], dtype=f),
            torch.tensor([[-2.0, -0.7, 0.0, 0.0]], dtype=f)]
    ratio = [torch.tensor([[5.0, 5.0, 1.5, 1.0], [0.5, 1.1, 2.0, 1.0]], dtype=f),
             torch.tensor([[5.0, 0.7, 1.0, 1.0]], dtype=f)]
    log_r = [torch.tensor([[5.0, 5.0, 0.0, ln2], [-ln2, 0.0, 0.0, 0.0]], dtype=f),
             torch.tensor([[5.0, 0.0, 0.0, 0.0]], dtype=f)]
    entropy = [torch.tensor([[100.0, 100.0, 1.0, 2.0], [3.0, 4.0, 5.0, 100.0]], dtype=f),
               torch.tensor([[100.0, 6.0, 100.0, 100.0]], dtype=f)]
    gen = [torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]], dtype=f), torch.tensor([[0, 1, 0, 0]], dtype=f)]
    hint = [torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=f), torch.tensor([[1, 0, 0, 0]], dtype=f)]
    adv = [torch.tensor([1.0, -0.5], dtype=f), torch.tensor([2.0], dtype=f)]
    return [dict(logp=lp, old_logp=lp - r.log(), ref_logp=lp + lr, entropy=e, mask=g, hint_mask=h, advantages=a)
            for lp, r, lr, e, g, h, a in zip(logp, ratio, log_r, entropy, gen, hint, adv)]


def total_loss(cfg, mbs, **override):
    norm = common.step_normaliser([m["mask"] for m in mbs], cfg.loss_agg, 7.0)  # C = 7 for "constant"
    token_norm = common.step_normaliser([m["mask"] for m in mbs], "token-mean")
    hint_norm = common.step_normaliser([m["hint_mask"] for m in mbs], "token-mean")
    loss, terms = 0.0, {}
    for m in mbs:
        m = {**m, **override}
        l, t = uft.uft_loss(m["logp"], m["old_logp"], m["advantages"], m["mask"], m["hint_mask"], cfg, norm,
                            token_norm, hint_norm, m["entropy"], m["ref_logp"])
        loss = loss + l
        terms = {k: terms.get(k, 0.0) + float(v) for k, v in t.items()}
    return loss, terms


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_uft_loss_by_hand(variant):
    cfg = common.parse_config(uft.Config, ["--variant", variant], {"official": uft.OFFICIAL})
    assert cfg.kl_coef == 0.001 and cfg.entropy_coef == (0.001 if variant == "official" else 0.0)
    loss, terms = total_loss(cfg, hand_batch())
    assert terms["pg_loss"] == pytest.approx(-0.275, abs=1e-12)
    assert terms["clip_frac"] == pytest.approx(2 / 6, abs=1e-7)  # counted in float32
    assert terms["hint_loss"] == pytest.approx(3.5 / 3, abs=1e-12)
    assert terms["kl"] == pytest.approx(0.5 / 6, abs=1e-12)
    # paper: -0.275 + 0.001 (0.5/6 + 3.5/3) = -0.27375; official also - 0.001 * 3.5 (entropy bonus)
    want = -0.27375 - (0.0035 if variant == "official" else 0.0)
    assert float(loss) == pytest.approx(want, abs=1e-12) and terms["loss"] == pytest.approx(want, abs=1e-12)
    assert ("entropy_bonus" in terms) == (variant == "official")


def reference_loss(mbs, beta, beta_h, agg):
    """Plain loops over every token: Eq. (4), (6)-(8), (11), (12), (36), (37)."""
    gen = [(m, i, t) for m in mbs for i in range(m["mask"].shape[0]) for t in range(4) if m["mask"][i, t]]
    hint = [(m, i, t) for m in mbs for i in range(m["hint_mask"].shape[0]) for t in range(4) if m["hint_mask"][i, t]]
    pg, kl, ent = 0.0, 0.0, 0.0
    seqs = {}
    for m, i, t in gen:
        rho = math.exp(float(m["logp"][i, t] - m["old_logp"][i, t]))
        a = float(m["advantages"][i])
        c = -min(rho * a, min(max(rho, 0.8), 1.2) * a)
        pg += c
        seqs.setdefault((id(m), i), []).append(c)
        x = float(m["ref_logp"][i, t] - m["logp"][i, t])
        kl += min(max(math.exp(x) - x - 1, -10), 10)
        ent += float(m["entropy"][i, t])
    n_seq = sum(m["mask"].shape[0] for m in mbs)
    pg = {"token-mean": pg / len(gen), "constant": pg / 7.0,
          "seq-mean": sum(sum(c) / len(c) for c in seqs.values()) / n_seq}[agg]
    nll = sum(-float(m["logp"][i, t]) for m, i, t in hint) / max(len(hint), 1)
    return pg + beta * kl / len(gen) - beta_h * ent / len(gen) + beta * nll


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "constant"])
@pytest.mark.parametrize("seed", [0, 1])
def test_uft_loss_against_plain_formula(agg, seed):
    """Random ratios far outside the clip range, both advantage signs, ragged masks, two micro-batches."""
    g = torch.Generator().manual_seed(seed)
    mbs = hand_batch()
    for m in mbs:
        m["old_logp"] = m["logp"] + torch.randn(m["logp"].shape, generator=g, dtype=torch.float64) * 0.7
        m["ref_logp"] = m["logp"] + torch.randn(m["logp"].shape, generator=g, dtype=torch.float64)
        m["advantages"] = torch.randn(m["advantages"].shape, generator=g, dtype=torch.float64) * 2
    cfg = uft.Config(loss_agg=agg, kl_coef=0.3, entropy_coef=0.2)  # large betas so every term shows
    loss, _ = total_loss(cfg, mbs)
    assert float(loss) == pytest.approx(reference_loss(mbs, 0.3, 0.2, agg), abs=1e-12)


# =============================================================================================
# Gradients: hint tokens get only the hint term, generated tokens never get it
# =============================================================================================


def grads(cfg, mbs, **override):
    for m in mbs:
        m["logp"] = m["logp"].detach().requires_grad_(True)
    loss, _ = total_loss(cfg, mbs, **override)
    loss.backward()
    return [m["logp"].grad for m in mbs]


def test_hint_tokens_get_only_the_hint_gradient():
    cfg = uft.Config(kl_coef=0.001, entropy_coef=0.0)
    g = grads(cfg, hand_batch())
    # hint tokens: d(beta * sum(-logp) / 3) / d logp = -0.001 / 3, whatever their ratio (5) and advantage
    assert g[0][0, :2].tolist() == pytest.approx([-0.001 / 3] * 2, abs=1e-15)
    assert g[1][0, 0].item() == pytest.approx(-0.001 / 3, abs=1e-15)
    # A's last token: rho = 1, A = +1, unclipped: -rho A / 6 = -1/6; k3 gradient 1 - exp(ln 2) = -1, times beta / 6
    assert g[0][0, 3].item() == pytest.approx(-1 / 6 - 0.001 / 6, abs=1e-15)
    # A's first generated token is clipped (rho 1.5 > 1.2, A > 0): no PG gradient, no KL (log r = 0)
    assert g[0][0, 2].item() == 0.0
    assert g[0][1, 3].item() == 0.0 and g[1][0, 2:].abs().sum().item() == 0.0  # padding
    # beta = 0: hint tokens get exactly nothing, although their ratios are far outside the clip range
    g0 = grads(uft.Config(kl_coef=0.0, entropy_coef=0.0), hand_batch())
    assert g0[0][0, :2].tolist() == [0.0, 0.0] and g0[1][0, 0].item() == 0.0
    # --hint_coef 0.3 unties the hint weight from beta: -0.3 / 3 on hint tokens, generated tokens as before
    g3 = grads(uft.Config(kl_coef=0.001, entropy_coef=0.0, hint_coef=0.3), hand_batch())
    assert g3[0][0, :2].tolist() == pytest.approx([-0.1] * 2, abs=1e-15) and g3[0][0, 3] == g[0][0, 3]
    assert common.parse_config(uft.Config, []).hint_coef == 0.0  # the default: tied to beta, every number >= 0


def test_generated_tokens_never_get_the_hint_gradient():
    cfg = uft.Config(kl_coef=0.5, entropy_coef=0.0)  # a large beta would show any leak
    mbs = hand_batch()
    with_hint = grads(cfg, mbs)
    # the same loss with the hint term removed: identical gradients on every generated token
    without = grads(cfg, hand_batch(), hint_mask=torch.zeros(1, 4, dtype=torch.float64))
    for gw, go, m in zip(with_hint, without, mbs):
        torch.testing.assert_close(gw * m["mask"], go * m["mask"], rtol=0, atol=0)
        assert torch.all((gw * m["hint_mask"] != 0) == m["hint_mask"].bool())


def test_token_masks_from_hinted_samples():
    """Hinted samples through common.minibatches: the hint is the prefix, the rest is generated."""
    samples = [common.Sample([9, 9], [4, 5], [6, 2], "", True), common.Sample([9], [], [7, 8, 2], "", True)]
    mb = common.minibatches(samples, {"advantages": torch.zeros(2)}, 1, 2, 0, "cpu")[0][0]
    gen, hint = uft.token_masks(mb)
    assert hint.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert gen.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_hint_term_is_zero_not_nan_without_hints():
    mbs = hand_batch()
    for m in mbs:
        m["hint_mask"] = torch.zeros_like(m["hint_mask"])
        m["logp"] = m["logp"].detach().requires_grad_(True)
    assert common.step_normaliser([m["hint_mask"] for m in mbs], "token-mean") == 1.0  # clamped denominator
    loss, terms = total_loss(uft.Config(kl_coef=0.001), mbs)
    assert terms["hint_loss"] == 0.0 and math.isfinite(terms["loss"])
    loss.backward()
    assert all(torch.isfinite(m["logp"].grad).all() for m in mbs)


# =============================================================================================
# Reward: binary by default, UFT's 1 / 0.1 / 0 and answer tags as options
# =============================================================================================


def test_reward_scales_and_answer_formats():
    boxed = common.Verifier(num_workers=0)
    texts = ["1+1=2\n</think>\n\\boxed{2}", "</think>\\boxed{3}", "no think \\boxed{2}", "</think> no box"]
    assert uft.rewards_for(boxed, texts, ["2"] * 4, "binary") == [1.0, 0.0, 0.0, 0.0]
    assert uft.rewards_for(boxed, texts, ["2"] * 4, "uft") == [1.0, 0.1, 0.0, 0.0]
    tags = uft.AnswerTagVerifier(num_workers=0)
    texts = ["think\n<answer> 2 </answer>", "<answer>1</answer> <answer>3</answer>",
             "<answer>2</answer>\nbut then more", "<answer> </answer>"]  # only the last line counts
    assert uft.rewards_for(tags, texts, ["2"] * 4, "uft") == [1.0, 0.1, 0.0, 0.0]
    assert uft.rewards_for(tags, texts, ["2"] * 4, "binary") == [1.0, 0.0, 0.0, 0.0]


def test_official_variant_sets_the_run_config_and_the_command_line_wins():
    variants = {"official": uft.OFFICIAL}
    paper = common.parse_config(uft.Config, [], variants)
    assert (paper.lr, paper.group_size, paper.entropy_coef, paper.reward_scale) == (2e-4, 8, 0.0, "binary")
    off = common.parse_config(uft.Config, ["--variant", "official", "--group_size", "8"], variants)
    assert (off.lr, off.prompts_per_step, off.prompts_per_minibatch, off.max_steps) == (1e-6, 256, 64, 500)
    assert (off.kl_coef, off.entropy_coef, off.reward_scale, off.group_size) == (0.001, 0.001, "uft", 8)
    assert off.answer_format == "boxed" and off.hint_steps == 0  # 0.6 * 500 = 300, the official T_hint


# =============================================================================================
# The CLI: a run killed after its step-1 checkpoint and resumed logs what the whole run logged
# =============================================================================================


def test_cli_run_and_resume(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"  # level-1 problems: demonstrations of 3 hintable lines fit in 24 tokens
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_task.make_task(40, seed=5, levels=(1,))))
    args = ["--data", str(data), "--variant", "official", "--prompts_per_step", "4", "--prompts_per_minibatch", "2",
            "--group_size", "3", "--micro_batch_size", "4", "--max_steps", "3", "--save_every", "1",
            "--keep_checkpoints", "3", "--eval_every", "0", "--lr", "1e-3", "--hint_prob_low", "0.5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run("uft.py", *small(tiny_model_dir, "", full, *args))  # no evaluation: common's, tested elsewhere
    a = metrics(full)
    assert [m["step"] for m in a] == [0, 1, 2, 3]  # step 0: the data counts (no evaluation asked for)
    a = a[1:]
    keys = CORE_KEYS | {"pg_loss", "clip_frac", "kl", "entropy_bonus", "hint_loss", "hint_prob", "hint_fraction",
                        "hint_share", "hint_length"}
    for m in a:
        assert keys <= set(m), keys - set(m)
        assert all(math.isfinite(m[k]) for k in keys - {"step"})
    # T_hint = round(0.6 * 3) = 2: p = 0.5 + 0.225 (1 + cos(pi t / 2)) = 0.725, 0.5, then no hint
    assert [m["hint_prob"] for m in a] == pytest.approx([0.725, 0.5, 0.0], abs=1e-12)
    assert all(m["hint_share"] > 0 and m["hint_loss"] > 0 and m["hint_length"] > 0 for m in a[:2])
    assert a[2]["hint_share"] == a[2]["hint_fraction"] == a[2]["hint_loss"] == a[2]["demo_tokens"] == 0.0
    assert all(m["demo_tokens"] == pytest.approx(4 * m["hint_length"]) for m in a)  # once per prompt, 4 prompts
    assert a[2]["loss"] != a[1]["loss"]

    shutil.copytree(full, cut)
    for step in (2, 3):
        shutil.rmtree(cut / f"checkpoint-{step:06d}")
    p = run("uft.py", *small(tiny_model_dir, "", cut, *args, "--resume"))
    assert "resumed from" in p.stdout + p.stderr
    b = metrics(cut)
    assert [m["step"] for m in b] == [0, 1, 2, 3]
    b = b[1:]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert os.path.isdir(cut / "checkpoint-000003")
