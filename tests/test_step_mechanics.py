"""The RL iteration's shared mechanics: prefix masks, mini-batch split, the core step metrics."""
import sys

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


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_adam_state_made_up_front_changes_no_bit(tiny_model_dir, tmp_path, monkeypatch, trainer_in_process):
    """setup creates every AdamW's state before the sampler (common.init_adam_state), so that a vLLM engine's
    free-memory measurement counts it (docs/gpu.md, "GPU memory"). A grpo.py run with it is the run whose state
    its first step creates: every metric and every weight, bit for bit; and its step-0 optimizer stays out of
    checkpoints until it steps (run_dir.stepped)."""
    import json

    from safetensors.torch import load_file

    import grpo
    import run_dir

    real, real_sampler, mode, created = common.init_adam_state, common.make_sampler, [""], []

    def init_adam_state(opt):
        created.append(mode[0])
        if mode[0] == "up front":
            real(opt)
            assert opt.state and not run_dir.stepped(opt)

    def make_sampler(*args, **kwargs):  # the sampler (a vLLM engine: its memory budget) comes after the state
        created.append("sampler")
        return real_sampler(*args, **kwargs)
    monkeypatch.setattr(common, "init_adam_state", init_adam_state)
    monkeypatch.setattr(common, "make_sampler", make_sampler)
    runs = {}
    for mode[0] in ("at the first step", "up front"):
        out = tmp_path / mode[0].replace(" ", "_")
        monkeypatch.setattr(sys, "argv", [
            "grpo.py", "--model", tiny_model_dir, "--output_dir", str(out), "--no-compile", "--eval_data", "none",
            "--max_prompt_len", "64", "--max_response_len", "24", "--verifier_workers", "0", "--system_prompt", "",
            "--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "3", "--micro_batch_size", "4",
            "--max_steps", "2", "--save_every", "1", "--lr", "1e-3", "--entropy_coef", "0.01"])
        grpo.main()
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode[0]] = ([{k: v for k, v in m.items() if k not in ("time_rollout", "time_train", "tokens_per_second")}
                          for m in lines], load_file(out / "checkpoint-000002" / "model" / "model.safetensors"))
    assert created == ["at the first step", "sampler", "up front", "sampler"]  # one AdamW each, then the sampler
    (m1, w1), (m2, w2) = runs.values()
    assert len(m1) == 3 and m1 == m2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1[1]["loss"] != m1[2]["loss"]  # the steps did something
