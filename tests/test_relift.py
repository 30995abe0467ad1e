"""relift.py (ReLIFT, arXiv 2506.07527; METHODS.md Eq. 21-24): the hardest set, the newest-first
buffer and its threshold, the fine-tuning loss and step (its own optimizer, after the RL step),
the RL loss under both variants, a buffer that is global over two ranks, checkpoints of the
second optimizer, and the command line (smoke, FT after RL, kill-and-resume with a non-empty buffer).
Every expected number is worked out in a comment."""
import json
import math
import shutil
import sys

import pytest
import torch

import builtin_task
import common
import relift
import run_dir
from test_cli import CORE_KEYS, TIMING, metrics, run, small

RELIFT_KEYS = {"pg_loss", "clip_frac", "hardest_prompts", "buffer_size", "ft_steps", "ft_steps_total", "ft_loss",
               "sft_loss", "entropy_demo", "ft_grad_norm", "ft_lr"}


def cfg(**kw) -> relift.Config:
    return relift.Config(**kw)


# =============================================================================================
# Eq. (21) hardest set, Eq. (23) buffer
# =============================================================================================


def test_all_failed_eq21():
    rewards = torch.tensor([[0., 0., 0.],
                            [0., 1., 0.],
                            [0., 0., 0.],
                            [0.1, 0., 0.]])  # a partial reward is not a failure
    assert relift.all_failed(rewards) == [True, False, True, False]


def test_buffer_newest_first_and_threshold():
    """M = 4. Each call prepends H_t (in batch order) and pops the 4 newest once the buffer holds 4."""
    ft, buf = relift.update_buffer([], [3, 7], 4)
    assert (ft, buf) == ([], [3, 7])  # 2 < M: no FT step
    ft, buf = relift.update_buffer(buf, [1], 4)
    assert (ft, buf) == ([], [1, 3, 7])  # 3 < M
    ft, buf = relift.update_buffer(buf, [9, 2], 4)
    assert (ft, buf) == ([9, 2, 1, 3], [7])  # 5 >= M: the 4 newest go, the oldest (7) stays
    ft, buf = relift.update_buffer(buf, [7], 4)
    assert (ft, buf) == ([], [7, 7])  # the same question may come back (duplicates allowed)
    ft, buf = relift.update_buffer(buf, [5, 6, 8, 4, 0, 1], 4)
    assert (ft, buf) == ([5, 6, 8, 4], [0, 1, 7, 7])  # one FT step per iteration even when 8 >= 2M
    ft, buf = relift.update_buffer([0, 1, 2], [6], 4)
    assert (ft, buf) == ([6, 0, 1, 2], [])  # exactly M: the buffer empties


def test_empty_iteration_is_a_no_op():
    """No all-failed prompt and an empty buffer (the official trainer crashes here): no FT step."""
    assert relift.update_buffer([], [], 4) == ([], [])
    assert relift.update_buffer([8], [], 4) == ([], [8])
    assert relift.gather_hardest([5, 6], [False, False], 0, 2) == []


def test_gather_hardest_single_process():
    # global batch of 4 on one rank: positions 0 and 3 failed; index 0 must survive the slot encoding
    assert relift.gather_hardest([0, 11, 12, 13], [True, False, False, True], 0, 4) == [0, 13]


def test_buffer_is_global_over_two_ranks(monkeypatch):
    """Two ranks, 3 prompts each (global batch of 6), the all-reduce of common simulated as the sum
    of both ranks' slot vectors. Rank 0 holds rows 40, 0, 7 (the first two failed), rank 1 rows 13,
    5, 21 (the last two failed). Both ranks must see H_t = [40, 0, 5, 21] (global batch order) and,
    with M = 4 and an old item 99, pop exactly those 4, keep [99] and fine-tune on 2 rows each."""
    indices, failed = [[40, 0, 7], [13, 5, 21]], [[True, True, False], [False, True, True]]
    slots = []
    monkeypatch.setattr(common, "all_reduce", lambda values: slots.append(values) or values)
    for rank in (0, 1):  # each rank's own contribution
        relift.gather_hardest(indices[rank], failed[rank], 3 * rank, 6)
    total = [a + b for a, b in zip(*slots)]
    monkeypatch.setattr(common, "all_reduce", lambda values: total)
    for rank in (0, 1):
        hardest = relift.gather_hardest(indices[rank], failed[rank], 3 * rank, 6)
        ft, buffer = relift.update_buffer([99], hardest, 4)
        assert (hardest, ft, buffer) == ([40, 0, 5, 21], [40, 0, 5, 21], [99])
        assert ft[rank * 4 // 2:(rank + 1) * 4 // 2] == [[40, 0], [5, 21]][rank]  # main()'s split of the FT batch


# =============================================================================================
# Eq. (24) fine-tuning loss
# =============================================================================================


def test_ft_loss_by_hand_two_micro_batches():
    """Two micro-batches, 5 demonstration tokens in all (ragged; padding holds junk 100s):
    NLL = (1 + 2 + 3 + 0.5 + 4) / 5 = 2.1, E_demo = (1 + 2 + 3 + 4 + 5) / 5 = 3,
    beta = 0.1: L = 2.1 - 0.3 = 1.8 (shares 1.3 - 0.2 = 1.1 and 0.8 - 0.1 = 0.7).
    Gradients: dL/dlogp = -1/5 and dL/dH = -0.1/5 on demonstration tokens, 0 on padding."""
    lp1 = torch.tensor([[-1., -2., -3.], [-0.5, 100., 100.]], dtype=torch.float64, requires_grad=True)
    h1 = torch.tensor([[1., 2., 3.], [4., 100., 100.]], dtype=torch.float64, requires_grad=True)
    m1 = torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp2 = torch.tensor([[-4., 100.]], dtype=torch.float64, requires_grad=True)
    h2 = torch.tensor([[5., 100.]], dtype=torch.float64, requires_grad=True)
    m2 = torch.tensor([[1, 0]])
    norm = common.step_normaliser([m1, m2], "token-mean")
    assert norm == 5.0
    l1, t1 = relift.ft_loss(lp1, h1, m1, 0.1, norm)
    l2, t2 = relift.ft_loss(lp2, h2, m2, 0.1, norm)
    assert l1.item() == pytest.approx(1.1, abs=1e-12) and l2.item() == pytest.approx(0.7, abs=1e-12)
    assert (t1["sft_loss"] + t2["sft_loss"]).item() == pytest.approx(2.1, abs=1e-12)
    assert (t1["entropy_demo"] + t2["entropy_demo"]).item() == pytest.approx(3.0, abs=1e-12)
    assert (t1["ft_loss"] + t2["ft_loss"]).item() == pytest.approx(1.8, abs=1e-12)
    (l1 + l2).backward()
    torch.testing.assert_close(lp1.grad, -0.2 * m1.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(lp2.grad, -0.2 * m2.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(h1.grad, -0.02 * m1.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(h2.grad, -0.02 * m2.double(), rtol=0, atol=1e-12)


# =============================================================================================
# Eq. (22) RL loss, both variants
# =============================================================================================


def test_variants_set_the_official_rl_settings_only():
    paper = common.parse_config(relift.Config, [], {"official": relift.OFFICIAL})
    off = common.parse_config(relift.Config, ["--variant", "official"], {"official": relift.OFFICIAL})
    assert (paper.clip, paper.clip_eps_low, paper.adv_std, paper.loss_agg, paper.max_grad_norm, paper.entropy_coef) == \
        (True, 0.2, True, "token-mean", 1.0, 0.0)
    assert (off.clip, off.adv_std, off.loss_agg, off.max_grad_norm, off.entropy_coef) == \
        (False, False, "constant", 0.7, 0.001)  # no clip: -rho A
    for c in (paper, off):  # the FT step is the same in both variants (Eq. 24 with its own AdamW)
        assert (c.ft_threshold, c.ft_lr, c.ft_entropy_coef, c.ft_max_grad_norm) == (16, c.lr, 0.001, 1.0)
    mixed = common.parse_config(relift.Config, ["--variant", "official", "--clip"], {"official": relift.OFFICIAL})
    assert mixed.clip and not mixed.adv_std


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_rl_loss_both_variants_two_micro_batches(variant):
    """rho = exp(logp - old) with old = 0. Micro-batch 1: A = +1, rho (1.5, 1.1, 0.5, [3 masked]);
    A = -1, rho (0.5, 1.5). Micro-batch 2: A = -0.5, rho (0.9, 0.7, 1.3).
    paper (eps 0.2, token-mean over N = 8):
        A=+1: -min(1.5, 1.2) = -1.2 (clipped), -1.1, -min(0.5, 0.8) = -0.5
        A=-1: -min(-0.5, -0.8) = 0.8 (clipped), -min(-1.5, -1.2) = 1.5
        A=-0.5: -min(-0.45, -0.4) = 0.45, -min(-0.35, -0.4) = 0.4 (clipped), -min(-0.65, -0.6) = 0.65
        sum = -1.2 - 1.1 - 0.5 + 0.8 + 1.5 + 0.45 + 0.4 + 0.65 = 1.0 -> loss 1/8, clip_frac 3/8
    official (no clip, constant C = 16): -A rho: -1.5 - 1.1 - 0.5 + 0.5 + 1.5 + 0.45 + 0.35 + 0.65 = 0.35
        -> loss 0.35 / 16; gradient -A rho / C on every token."""
    c = common.parse_config(relift.Config, ["--variant", variant], {"official": relift.OFFICIAL})
    r1 = torch.tensor([[1.5, 1.1, 0.5, 3.0], [0.5, 1.5, 1.0, 1.0]], dtype=torch.float64)
    m1 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    r2 = torch.tensor([[0.9, 0.7, 1.3]], dtype=torch.float64)
    m2 = torch.tensor([[1, 1, 1]])
    a1, a2 = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([-0.5], dtype=torch.float64)
    lp1, lp2 = r1.log().requires_grad_(True), r2.log().requires_grad_(True)
    norm = common.step_normaliser([m1, m2], c.loss_agg, 16.0)
    zeros1, zeros2 = torch.zeros_like(r1), torch.zeros_like(r2)  # old log-probs, and entropies
    l1, t1 = relift.grpo_loss(lp1, zeros1, a1, m1, c, norm, 8.0, entropy=zeros1)
    l2, t2 = relift.grpo_loss(lp2, zeros2, a2, m2, c, norm, 8.0, entropy=zeros2)
    (l1 + l2).backward()
    if variant == "paper":
        assert (l1 + l2).item() == pytest.approx(1.0 / 8, abs=1e-12)
        assert (t1["clip_frac"] + t2["clip_frac"]).item() == pytest.approx(3 / 8, abs=1e-12)
        g1 = torch.tensor([[0, -1.1, -0.5, 0], [0, 1.5, 0, 0]], dtype=torch.float64) / 8
        g2 = torch.tensor([[0.45, 0, 0.65]], dtype=torch.float64) / 8
    else:
        assert (l1 + l2).item() == pytest.approx(0.35 / 16, abs=1e-12)
        assert (t1["clip_frac"] + t2["clip_frac"]).item() == 0.0
        assert "entropy_bonus" in t1  # official: beta_H = 0.001 (0 here: zero entropies)
        g1 = torch.tensor([[-1.5, -1.1, -0.5, 0], [0.5, 1.5, 0, 0]], dtype=torch.float64) / 16
        g2 = torch.tensor([[0.45, 0.35, 0.65]], dtype=torch.float64) / 16
    torch.testing.assert_close(lp1.grad, g1, rtol=0, atol=1e-12)
    torch.testing.assert_close(lp2.grad, g2, rtol=0, atol=1e-12)


def test_all_failed_group_gives_no_policy_gradient():
    """A group in H_t has A = 0 under Eq. (9) and (10): pg gradient 0, only the entropy bonus pushes."""
    rewards = torch.tensor([[0., 0., 0.], [1., 0., 0.]])
    for std in (True, False):
        adv = relift.group_advantages(rewards, std).view(-1)
        assert torch.all(adv[:3] == 0) and adv[3] > 0
    c = common.parse_config(relift.Config, ["--variant", "official"], {"official": relift.OFFICIAL})
    logp = torch.full((3, 2), -1.0, requires_grad=True)
    entropy = torch.ones(3, 2, requires_grad=True)
    loss, _ = relift.grpo_loss(logp, logp.detach(), torch.zeros(3), torch.ones(3, 2), c, 16.0, 6.0, entropy)
    loss.backward()
    assert torch.all(logp.grad == 0)
    torch.testing.assert_close(entropy.grad, torch.full((3, 2), -0.001 / 6))


# =============================================================================================
# The FT step: its own optimizer, after the RL step; checkpoints of a second optimizer
# =============================================================================================


def _model_and_rows(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = common.load_policy(tiny_model_dir, common.Dist(), compile=False)
    rows = []
    for r in builtin_task.make_task(1, seed=5, levels=(1, 3, 4)):  # demonstrations of 3 different lengths
        text = common.format_prompt(tok, r["problem"], None)
        rows.append({"prompt_ids": tok(text, add_special_tokens=False)["input_ids"],
                     "demo_ids": tok(r["demo"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]})
    return model, tok, rows


def test_fine_tune_steps_its_own_optimizer_only(tiny_model_dir):
    """After an RL-like step of the main AdamW, fine_tune() on 3 demonstrations (2 micro-batches):
    - its loss is Eq. (24) computed independently from the full logits (log_softmax, float64),
    - the FT AdamW takes its first step (step 1, moments move), the main AdamW's state is untouched,
    - the first Adam step moves every parameter by ft_lr * sign(g) plus decoupled weight decay."""
    model, tok, rows = _model_and_rows(tiny_model_dir)
    c = cfg(micro_batch_size=2, ft_lr=1e-3, ft_entropy_coef=0.01)
    main_opt, ft_opt = common.adamw(model, 5e-4, 0.01), common.adamw(model, c.ft_lr, 0.01)
    mb = common.make_batch([r["prompt_ids"] for r in rows], [r["demo_ids"] for r in rows], tok.pad_token_id, "cpu")
    logp, _ = model(**mb)
    (-logp.sum()).backward()
    main_opt.step()
    main_opt.zero_grad(set_to_none=True)
    main_state = {(p, k): v.clone() for p, s in main_opt.state.items() for k, v in s.items()}

    # independent Eq. (24): full logits in float64, token-mean over all demonstration tokens
    nll, ent, n = 0.0, 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["demo_ids"]])
            logits = model.lm(input_ids=ids).logits[0].double()  # [T, V]
            P, D = len(r["prompt_ids"]), len(r["demo_ids"])
            lsm = torch.log_softmax(logits[P - 1:P - 1 + D], -1)  # positions predicting the demo tokens
            nll -= lsm.gather(-1, torch.tensor(r["demo_ids"])[:, None]).sum().item()
            ent -= (lsm.exp() * lsm).sum().item()
            n += D
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = relift.fine_tune(model, ft_opt, rows, c, tok.pad_token_id, "cpu")
    assert out["sft_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert out["entropy_demo"] == pytest.approx(ent / n, rel=1e-5)
    assert out["ft_loss"] == pytest.approx(nll / n - 0.01 * ent / n, rel=1e-5)
    assert out["ft_grad_norm"] > 0

    assert all(s["step"].item() == 1 for s in ft_opt.state.values())
    assert any(s["exp_avg"].abs().sum() > 0 for s in ft_opt.state.values())
    after = {(p, k): v for p, s in main_opt.state.items() for k, v in s.items()}
    assert main_state.keys() == after.keys() and all(torch.equal(main_state[k], after[k]) for k in main_state)
    assert len(main_opt.state) == len(ft_opt.state)  # both optimizers hold every parameter
    assert all(p.grad is None for p in model.parameters())  # the FT step leaves no gradient behind
    for name, p in model.named_parameters():
        step = p.detach() - before[name] * (1 - c.ft_lr * 0.01)  # remove the decoupled weight decay
        moved = step.abs()[ft_opt.state[p]["exp_avg"].abs() > 1e-5]  # |g| > 1e-4 >> Adam's eps 1e-8
        # 2e-3: one float32 ulp of a weight near 1 (the norms) is 1.2e-4 of the step, Adam's eps up to 1e-4 of it
        torch.testing.assert_close(moved, torch.full_like(moved, c.ft_lr), rtol=2e-3, atol=1e-9)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_unstepped_optimizer_stays_out_of_the_checkpoint(tiny_model_dir, tmp_path):
    """A never-stepped optimizer (its state created at step 0 by common.init_adam_state) is left out of the
    checkpoint, and neither saving nor loading steps it (were its state empty, torch's get_optimizer_state_dict
    would take a zero-lr step, so the first FT step would count as Adam's second). Once the FT optimizer has
    stepped, both are saved and restored."""
    model, tok, rows = _model_and_rows(tiny_model_dir)
    main_opt, ft_opt = common.adamw(model, 1e-3, 0.01), common.adamw(model, 1e-3, 0.01)
    mb = common.make_batch([r["prompt_ids"] for r in rows], [r["demo_ids"] for r in rows], tok.pad_token_id, "cpu")

    def step(opt):
        logp, _ = model(**mb)
        (-logp.sum()).backward()
        common.optimizer_step(model, opt, None, 1.0)

    step(main_opt)
    run_dir.save_checkpoint(str(tmp_path), 1, model, tok, {"main": main_opt, "ft": ft_opt}, {}, {"buffer": [3, 1]})
    assert not run_dir.stepped(ft_opt)  # saving left the unstepped optimizer alone
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() for s in ft_opt.state.values())
    state = torch.load(tmp_path / "checkpoint-000001" / "trainer_state.pt", weights_only=False)
    assert state["optimizers"] == ["main"] and state["buffer"] == [3, 1]
    fresh_main, fresh_ft = common.adamw(model, 1e-3, 0.01), common.adamw(model, 1e-3, 0.01)
    run_dir.load_checkpoint(str(tmp_path / "checkpoint-000001"), model, {"main": fresh_main, "ft": fresh_ft}, {})
    assert run_dir.stepped(fresh_main) and not run_dir.stepped(fresh_ft)  # loading does not step it either

    step(ft_opt)
    step(main_opt)
    run_dir.save_checkpoint(str(tmp_path), 3, model, tok, {"main": main_opt, "ft": ft_opt}, {}, {})
    fresh_main, fresh_ft = common.adamw(model, 1e-3, 0.01), common.adamw(model, 1e-3, 0.01)
    run_dir.load_checkpoint(str(tmp_path / "checkpoint-000003"), model, {"main": fresh_main, "ft": fresh_ft}, {})
    for new, old in ((fresh_main, main_opt), (fresh_ft, ft_opt)):
        for p in model.parameters():
            assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
            assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
            assert new.state[p]["step"].item() == old.state[p]["step"].item()
    p0 = next(model.parameters())
    assert (fresh_ft.state[p0]["step"].item(), fresh_main.state[p0]["step"].item()) == (1, 2)


# =============================================================================================
# Command line: smoke, FT after RL, kill-and-resume with a non-empty buffer, bad input
# =============================================================================================

# The random tiny model fails every rollout: H_t = all 4 prompts every step. With M = 6 the buffer
# goes 4 -> 8, FT, 2 -> 6, FT, 0 -> 4 over steps 1-4: the step-2 checkpoint holds 2 items and a
# stepped FT optimizer. Official variant: the entropy bonus gives the RL step a gradient.
ARGS = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4",
        "--variant", "official", "--lr", "1e-3", "--ft_lr", "1e-3"]


def test_cli_smoke_ft_after_rl_and_resume(tiny_model_dir, small_eval_file, tmp_path):
    args = [*ARGS, "--ft_threshold", "6", "--max_steps", "4", "--save_every", "2", "--eval_every", "2"]
    full, cut, early = tmp_path / "full", tmp_path / "cut", tmp_path / "early"
    run("relift.py", *small(tiny_model_dir, small_eval_file, full, *args))
    a = metrics(full)
    assert [m["step"] for m in a] == [0, 1, 2, 3, 4]
    for m in a[1:]:
        assert CORE_KEYS | RELIFT_KEYS <= set(m), set(m)
    assert [(m["hardest_prompts"], m["buffer_size"], m["ft_steps"], m["ft_steps_total"]) for m in a[1:]] == \
        [(4, 4, 0, 0), (4, 2, 1, 1), (4, 0, 1, 2), (4, 4, 0, 2)]
    assert a[1]["ft_loss"] == a[1]["sft_loss"] == a[1]["ft_grad_norm"] == 0  # no FT step: zeros, same keys
    assert a[2]["sft_loss"] > 0 and a[2]["ft_grad_norm"] > 0
    assert a[1]["demo_tokens"] == 0 and 6 * 10 < a[2]["demo_tokens"] <= 6 * 24  # the 6 popped demonstrations
    assert a[2]["ft_loss"] == pytest.approx(a[2]["sft_loss"] - 0.001 * a[2]["entropy_demo"], rel=1e-6)
    # the FT lr follows the RL lr's cosine schedule over 4 x 2 optimizer steps: after 4 of them 1e-3 x 0.5, after
    # 6 of them 1e-3 x (1 + cos(3 pi / 4)) / 2; 0 logged without an FT step
    assert [m["ft_lr"] for m in a[1:]] == pytest.approx([0, 5e-4, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2, 0])

    # The FT step comes after the RL step: with M = 4 an FT step ends step 1, yet step 1's RL
    # numbers equal the run without one (an FT step before RL would change loss and grad norm).
    run("relift.py", *small(tiny_model_dir, small_eval_file, early, *ARGS, "--ft_threshold", "4", "--max_steps", "1",
                            "--eval_data", ""))
    e = metrics(early)[-1]
    assert (e["ft_steps"], e["buffer_size"]) == (1, 0)
    for k in ("loss", "pg_loss", "entropy_bonus", "grad_norm", "entropy", "reward", "response_length"):
        assert e[k] == a[1][k], k
    state = torch.load(early / "checkpoint-000001" / "trainer_state.pt", weights_only=False)
    assert state["optimizers"] == ["ft", "main"] and state["ft_steps_total"] == 1

    # Killed after the step-2 checkpoint (buffer of 2, FT optimizer stepped), resumed: same log
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoint-000004")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    state = torch.load(cut / "checkpoint-000002" / "trainer_state.pt", weights_only=False)
    assert len(state["buffer"]) == 2 and state["optimizers"] == ["ft", "main"]
    p = run("relift.py", *small(tiny_model_dir, small_eval_file, cut, *args, "--resume"))
    assert "resumed from" in p.stdout + p.stderr
    b = metrics(cut)
    assert [m["step"] for m in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert a[3]["ft_loss"] != a[2]["ft_loss"]  # the FT steps are not trivially equal


def test_bad_input_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["relift.py", "--ft_threshold", "0"])
    with pytest.raises(SystemExit, match="--ft_threshold"):
        relift.main()  # refused before setup

    def setup(cfg, paper, **kw):  # every row must carry a demonstration: common refuses rows without one
        assert kw["need_demo"] and kw["extra_optimizers"] == {"ft": cfg.ft_lr}
        raise SystemExit("checked")

    monkeypatch.setattr(common, "setup", setup)
    monkeypatch.setattr(sys, "argv", ["relift.py"])
    with pytest.raises(SystemExit, match="checked"):
        relift.main()
