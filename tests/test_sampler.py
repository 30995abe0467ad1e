"""TorchSampler: n samples per prompt, EOS handling, response budget, continuation from a prefix."""
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import common

EOS, PAD = 2, 0


class ScriptedLM(torch.nn.Module):
    """Stands in for a HF model: records what generate() was given and answers from a script."""

    def __init__(self, script):
        super().__init__()
        self.script, self.calls, self.device = script, [], torch.device("cpu")

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.calls.append((input_ids.tolist(), attention_mask.tolist(), max_new_tokens, kw))
        rows = [self.script(row) + [PAD] * max_new_tokens for row in input_ids.tolist()]
        return torch.cat([input_ids, torch.tensor([r[:max_new_tokens] for r in rows])], dim=1)


class Tok:
    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (EOS, PAD)))


def test_groups_eos_cut_and_budget():
    # a prompt ending in 5 answers [7, 8, EOS]; one ending in 6 never stops
    lm = ScriptedLM(lambda row: [7, 8, EOS] if row[-1] == 5 else [9] * 10)
    sampler = common.TorchSampler(Tok(), lm, batch_size=3)  # 2 prompts x 2 samples: two generate calls
    out = sampler.generate([[4, 5], [3, 3, 6]], n=2, temperature=0.7, top_p=0.9, max_tokens=4)
    assert [len(g) for g in out] == [2, 2]
    a, b = out[0][0], out[1][1]
    assert a.prompt_ids == [4, 5] and a.generated_ids == [7, 8, EOS] and a.finished and a.text == "7 8"
    assert b.generated_ids == [9, 9, 9, 9] and not b.finished  # cut at the 4-token budget
    assert len(lm.calls) == 2
    ids, mask, max_new, kw = lm.calls[0]
    assert ids == [[PAD, 4, 5], [PAD, 4, 5], [3, 3, 6]]  # left padded
    assert mask == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert max_new == 4 and kw["temperature"] == 0.7 and kw["top_p"] == 0.9 and kw["top_k"] == 0
    assert kw["do_sample"] and kw["eos_token_id"] == EOS


def test_continuation_from_prefix():
    lm = ScriptedLM(lambda row: [row[-1] + 1, EOS])  # continues from the last token it sees
    sampler = common.TorchSampler(Tok(), lm)
    out = sampler.generate([[4, 5], [6]], n=1, temperature=1.0, top_p=1.0, max_tokens=6,
                           prefixes=[[10, 11, 12], []])
    s = out[0][0]
    assert lm.calls[0][0][0] == [4, 5, 10, 11, 12]  # the engine saw prompt + prefix
    assert s.prefix_ids == [10, 11, 12] and s.generated_ids == [13, EOS]
    assert s.response_ids == [10, 11, 12, 13, EOS] and s.text == "10 11 12 13"
    assert out[1][0].response_ids == [7, EOS]
    assert lm.calls[0][2] == 6  # budget of the longest continuation; the prefixed one is cut to 3


def test_prefix_counts_against_budget():
    lm = ScriptedLM(lambda row: [9] * 10)
    out = common.TorchSampler(Tok(), lm).generate([[4]], n=1, temperature=1.0, top_p=1.0, max_tokens=5,
                                                   prefixes=[[1, 1, 1]])
    assert out[0][0].response_ids == [1, 1, 1, 9, 9] and not out[0][0].finished


def test_real_generate_on_tiny_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      eos_token_id=EOS, pad_token_id=PAD)
    lm = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make EOS likely so that some samples stop early
        lm.lm_head.weight[EOS] *= 0
        lm.lm_head.weight[EOS] += lm.model.norm.weight.sign() * 0.3
    lm.train()
    out = common.TorchSampler(Tok(), lm).generate([[5, 6, 7], [8]], n=3, temperature=1.0, top_p=1.0,
                                                  max_tokens=6, prefixes=[[9], [10, 11]])
    assert lm.training  # the sampler restores the training mode
    for group, prefix in zip(out, [[9], [10, 11]]):
        assert len(group) == 3
        for s in group:
            assert s.prefix_ids == prefix and len(s.response_ids) <= 6
            assert s.finished == (EOS in s.generated_ids)
            if s.finished:
                assert s.generated_ids.index(EOS) == len(s.generated_ids) - 1  # nothing after EOS
            assert PAD not in s.generated_ids
