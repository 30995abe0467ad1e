"""The RL iteration's shared mechanics: prefix masks, mini-batch split, the core step metrics."""
import pytest
import torch

import common


def _sample(prompt, prefix, generated, finished=True):
    return common.Sample(prompt, prefix, generated, text="", finished=finished)


def test_prefix_mask_by_hand():
    b = common.make_batch([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0, device="cpu", prefix_lens=[2, 0])
    assert b["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["prefix_mask"].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert "prefix_mask" not in common.make_batch([[5]], [[1]], 0, "cpu")  # only when asked for


def test_minibatches_keep_order_and_slice_per_sample_tensors():
    samples = [_sample([9, i], [1] * (i % 2), [2, 3]) for i in range(6)]
    adv = torch.arange(6.0)
    mbs = common.minibatches(samples, {"advantages": adv}, n_minibatches=2, micro=2, pad_id=0,
                             device="cpu")
    assert [len(m) for m in mbs] == [2, 2]  # 3 samples per optimizer step: micro-batches of 2 and 1
    flat = [mb for m in mbs for mb in m]
    assert [mb["advantages"].tolist() for mb in flat] == [[0, 1], [2], [3, 4], [5]]
    assert [mb["input_ids"][:, 1].tolist() for mb in flat] == [[0, 1], [2], [3, 4], [5]]  # prompt [9, i]
    assert flat[0]["prefix_mask"].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert model_keys(flat[0]) == {"input_ids", "attention_mask", "response_mask"}
    with pytest.raises(ValueError, match="do not split"):
        common.minibatches(samples, {}, 4, 2, 0, "cpu")


def model_keys(mb):
    return set(common.model_inputs(mb))


def test_step_metrics_by_hand():
    rollouts = [_sample([1], [], [5, 6, 2]), _sample([1], [7], [8], finished=False), _sample([1], [], [2])]
    rewards = torch.tensor([1.0, 0.0, 0.5])
    mb = common.make_batch([s.prompt_ids for s in rollouts], [s.response_ids for s in rollouts], 0, "cpu",
                           prefix_lens=[len(s.prefix_ids) for s in rollouts])
    mb["old_entropy"] = torch.tensor([[1.0, 2.0, 3.0], [10.0, 4.0, 0.0], [6.0, 0.0, 0.0]])
    terms = [{"loss": torch.tensor(0.25), "pg_loss": torch.tensor(0.5)},
             {"loss": torch.tensor(0.75), "pg_loss": torch.tensor(-0.5)}]
    m = common.step_metrics(terms, rollouts, rewards, [mb], grad_norms=[1.0, 3.0], lr=0.1, t0=0.0, t1=1.0, t2=4.0)
    assert m["loss"] == pytest.approx(0.5) and m["pg_loss"] == pytest.approx(0.0)  # summed, / 2 optimizer steps
    assert m["reward"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(1 / 3)
    assert m["entropy"] == pytest.approx((1 + 2 + 3 + 4 + 6) / 5)  # the prefix token (entropy 10) excluded
    assert m["response_length"] == pytest.approx((3 + 2 + 1) / 3)
    assert m["truncated_frac"] == pytest.approx(1 / 3) and m["generated_tokens"] == 5  # prefix token not sampled
    assert m["grad_norm"] == 2.0 and m["lr"] == 0.1 and m["time_rollout"] == 1.0 and m["time_train"] == 3.0
    assert m["tokens_per_second"] == pytest.approx((4 + 3 + 2) / 4.0)


def test_variant_sets_its_fields_but_the_command_line_wins():
    from dataclasses import dataclass
    from typing import Literal

    @dataclass
    class Cfg(common.BaseConfig):
        variant: Literal["paper", "official"] = "paper"  # which settings
        clip: float = 0.2  # a clip
        adv_std: bool = True  # std or not

    official = {"official": {"clip": 1e9, "adv_std": False}}
    cfg = common.parse_config(Cfg, [], official)
    assert (cfg.clip, cfg.adv_std, common.given_flags(cfg)) == (0.2, True, set())
    cfg = common.parse_config(Cfg, ["--variant", "official"], official)
    assert (cfg.clip, cfg.adv_std) == (1e9, False)
    cfg = common.parse_config(Cfg, ["--variant", "official", "--clip", "0.3", "--adv_std"], official)
    assert (cfg.clip, cfg.adv_std) == (0.3, True) and common.given_flags(cfg) == {"variant", "clip", "adv_std"}
    with pytest.raises(SystemExit):  # a fixed set of values is checked when parsed
        common.parse_config(Cfg, ["--variant", "offical"], official)
