"""sft.sft_loss (METHODS.md Eq. 13) on tiny hand-made tensors; every expected number is worked out in a comment."""
import pytest
import torch

import common
import sft


def test_sft_loss_token_mean_by_hand():
    # masked NLL: 1 + 2 + 3 + 0.5 = 6.5 over 4 tokens = 1.625 (the -7 is masked out)
    logp = torch.tensor([[-1.0, -2.0, -3.0],
                         [-0.5, -7.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1],
                         [1, 0, 0]])
    loss = sft.sft_loss(logp, mask, "token-mean", common.step_normaliser([mask], "token-mean"))
    assert loss.item() == pytest.approx(1.625, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -mask.float() / 4)


def test_sft_loss_seq_mean_by_hand():
    # per-sequence mean NLL: 2.0 and 0.5 -> mean 1.25
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -7.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss = sft.sft_loss(logp, mask, "seq-mean", common.step_normaliser([mask], "seq-mean"))
    assert loss.item() == pytest.approx(1.25, abs=1e-6)


def test_dft_loss_weighs_each_token_by_its_detached_probability():
    # Eq. (59): -sg(p) log p, token-mean. p = e^-1, e^-2, e^-0.5 on the three unmasked tokens:
    # (e^-1 * 1 + e^-2 * 2 + e^-0.5 * 0.5) / 3; Eq. (60): d/dlogp = -p / 3 (NLL's -1/3 times p)
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -7.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = sft.sft_loss(logp, mask, "token-mean", common.step_normaliser([mask], "token-mean"), "dft")
    e = torch.e
    assert loss.item() == pytest.approx((e ** -1 * 1 + e ** -2 * 2 + e ** -0.5 * 0.5) / 3, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, -logp.detach().exp() * mask / 3, rtol=0, atol=1e-15)
    nll = logp.detach().clone().requires_grad_(True)
    sft.sft_loss(nll, mask, "token-mean", common.step_normaliser([mask], "token-mean")).backward()
    assert torch.equal(nll.grad == 0, logp.grad == 0)  # the same tokens trained, only their weights differ
