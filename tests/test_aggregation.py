"""common.aggregate and common.step_normaliser: token-mean (METHODS.md Eq. 6), seq-mean (Eq. 7) and
constant (Eq. 8) over a whole optimizer step made of several micro-batches, and gradient
accumulation that reproduces the gradient of one big batch (METHODS 1: test accumulation against a
single large batch)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import common
import sft

# Two micro-batches of different widths. 1000 marks masked entries: they must never count.
C_A = torch.tensor([[1., 2., 1000.],
                    [4., 5., 6.]])
M_A = torch.tensor([[1, 1, 0],
                    [1, 1, 1]])
C_B = torch.tensor([[10., 1000.],
                    [30., 40.]])
M_B = torch.tensor([[1, 0],
                    [1, 1]])
# By hand:
#   masked sums      A: (1+2) + (4+5+6) = 18 over 5 tokens;   B: 10 + (30+40) = 80 over 3 tokens
#   per-seq means    A: 1.5, 5.0;                             B: 10.0, 35.0
#   token-mean over the union (Eq. 6): (18 + 80) / 8 = 12.25  -> shares 18/8 = 2.25 and 80/8 = 10.0
#   seq-mean over the union (Eq. 7):  (1.5 + 5 + 10 + 35) / 4 = 12.875 -> shares 6.5/4 = 1.625, 45/4 = 11.25
#   constant C = 16 (Eq. 8):          98 / 16 = 6.125          -> shares 18/16 = 1.125, 80/16 = 5.0


def test_step_normaliser_values():
    assert common.step_normaliser([M_A, M_B], "token-mean") == 8.0
    assert common.step_normaliser([M_A, M_B], "seq-mean") == 4.0
    assert common.step_normaliser([M_A, M_B], "constant", 16.0) == 16.0
    assert common.step_normaliser([M_A], "token-mean") == 5.0
    assert common.step_normaliser([M_B], "seq-mean") == 2.0
    assert common.step_normaliser([M_A.bool(), M_B.bool()], "token-mean") == 8.0  # bool masks too
    # constant does not depend on the masks (lengths)
    assert common.step_normaliser([M_A], "constant", 16.0) == 16.0
    # nothing to count: no division by zero later
    assert common.step_normaliser([torch.zeros(2, 3)], "token-mean") == 1.0


@pytest.mark.parametrize("mode, norm_args, share_a, share_b, total", [
    ("token-mean", (), 2.25, 10.0, 12.25),
    ("seq-mean", (), 1.625, 11.25, 12.875),
    ("constant", (16.0,), 1.125, 5.0, 6.125),
])
def test_two_micro_batches_sum_to_union_aggregate(mode, norm_args, share_a, share_b, total):
    norm = common.step_normaliser([M_A, M_B], mode, *norm_args)
    # float64: exact algebra to 1e-12 (in float32, 1e-6 would be one ulp of 12.875)
    a = common.aggregate(C_A.double(), M_A, mode, norm)
    b = common.aggregate(C_B.double(), M_B, mode, norm)
    assert a.item() == pytest.approx(share_a, abs=1e-12)
    assert b.item() == pytest.approx(share_b, abs=1e-12)
    assert (a + b).item() == pytest.approx(total, abs=1e-12)
    assert a.dim() == 0


def test_single_micro_batch_by_hand():
    # token-mean of A alone: 18 / 5 = 3.6; seq-mean: (1.5 + 5) / 2 = 3.25; bool mask same as long
    for m in (M_A, M_A.bool(), M_A.float()):  # float64 values, as above
        assert common.aggregate(C_A.double(), m, "token-mean", common.step_normaliser([m], "token-mean")).item() \
            == pytest.approx(3.6, abs=1e-12)
        assert common.aggregate(C_A.double(), m, "seq-mean", common.step_normaliser([m], "seq-mean")).item() \
            == pytest.approx(3.25, abs=1e-12)


def test_float64_per_token_keeps_dtype():
    out = common.aggregate(C_A.double(), M_A, "token-mean", 5.0)
    assert out.dtype == torch.float64 and out.item() == pytest.approx(3.6, abs=1e-12)


def test_unknown_mode_raises():
    with pytest.raises(ValueError):
        common.step_normaliser([M_A], "sum")
    with pytest.raises(ValueError):
        common.step_normaliser([M_A], "token_mean")  # underscore typo is not silently accepted


def test_constant_needs_a_positive_constant():
    with pytest.raises((AssertionError, ValueError)):
        common.step_normaliser([M_A], "constant")


def test_aggregate_gradient_by_hand():
    # d/dc of token-mean over A: mask / 5; of seq-mean: mask / (len_i * 2)
    c = C_A.clone().requires_grad_(True)
    common.aggregate(c, M_A, "token-mean", 5.0).backward()
    torch.testing.assert_close(c.grad, M_A.float() / 5)
    c.grad = None
    common.aggregate(c, M_A, "seq-mean", 2.0).backward()
    torch.testing.assert_close(c.grad, torch.tensor([[1 / 4, 1 / 4, 0], [1 / 6, 1 / 6, 1 / 6]]))


# ---------------------------------------------------------------------------------------------
# gradient accumulation with the step normaliser == one big batch
# ---------------------------------------------------------------------------------------------

VOCAB = 61
PROMPTS = [[3, 4, 5], [6], [7, 8], [9, 10, 11, 12], [13, 14]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 26, 27], [28], [29, 30, 31], [32, 33]]
SPLIT = 2  # micro-batch 1 = sequences 0-1 (width P+R = 3+6), micro-batch 2 = sequences 2-4 (4+3)


def tiny_policy():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    lm = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return common.PolicyModel(lm, compile=False, chunk_size=4)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _accumulated(model, mode, per_micro_norm=False):
    model.zero_grad(set_to_none=True)
    micro = [common.make_batch(PROMPTS[:SPLIT], RESPONSES[:SPLIT], 0, "cpu"),
             common.make_batch(PROMPTS[SPLIT:], RESPONSES[SPLIT:], 0, "cpu")]
    assert micro[0]["input_ids"].shape[1] != micro[1]["input_ids"].shape[1]  # different widths
    norm = common.step_normaliser([mb["response_mask"] for mb in micro], mode)
    total = 0.0
    for mb in micro:
        if per_micro_norm:  # METHODS Eq. (14): mean of micro-batch means (what we must NOT match)
            norm = common.step_normaliser([mb["response_mask"]], mode) * len(micro)
        logp, _ = model(**mb)
        loss = sft.sft_loss(logp, mb["response_mask"], mode, norm)
        loss.backward()
        total += loss.item()
    return total, _grads(model)


def _big_batch(model, mode):
    """One batch of all five sequences, and the loss written out plainly in float64."""
    model.zero_grad(set_to_none=True)
    mb = common.make_batch(PROMPTS, RESPONSES, 0, "cpu")
    logp, _ = model(**mb)
    norm = common.step_normaliser([mb["response_mask"]], mode)
    loss = sft.sft_loss(logp, mb["response_mask"], mode, norm)
    loss.backward()
    nll = [-logp[i, :len(r)].double() for i, r in enumerate(RESPONSES)]  # per-sequence NLLs
    if mode == "token-mean":
        plain = sum(x.sum() for x in nll) / sum(len(r) for r in RESPONSES)  # Eq. (13) / (6)
    else:
        plain = sum(x.mean() for x in nll) / len(RESPONSES)  # Eq. (7)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)  # float32 sums of 16 terms vs float64
    return loss.item(), _grads(model)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean"])
def test_gradient_accumulation_equals_big_batch(mode):
    model = tiny_policy()
    big_loss, big = _big_batch(model, mode)
    acc_loss, acc = _accumulated(model, mode)
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    # float32 forward + backward in other batch shapes: up to 1e-5 of a tensor's largest entry where its sums cancel
    # (layer 1's q_proj under MKL_CBWR=AVX); the Eq. (14) normalisation below is off by 4e-2 or more
    for (name, _), g, r in zip(model.named_parameters(), acc, big):
        err = (g - r).abs().max().item()
        assert err <= 2e-4 * r.abs().max().item() + 1e-8, f"{name}: {err:.3g}"


def test_mean_of_micro_batch_means_differs():
    """Control: the Eq. (14) normalisation (each micro-batch its own token-mean) gives a different
    gradient here, so the equality above is not a coincidence of this data."""
    model = tiny_policy()
    _, big = _big_batch(model, "token-mean")
    _, naive = _accumulated(model, "token-mean", per_micro_norm=True)
    rel = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(naive, big))
    assert rel > 1e-2
