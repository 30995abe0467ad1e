"""TorchSampler: n samples per prompt, stop tokens, response budget, continuation from a prefix."""
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

import common

EOS, PAD = 2, 0
GEN_EOS = 3  # a second stop token, from the model's generation_config (as <|endoftext|> in Qwen2.5 instruct)


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
    assert kw["do_sample"] and kw["eos_token_id"] == [EOS]  # no generation_config: the tokenizer's EOS only


def test_stop_token_ids_union_tokenizer_and_generation_config():
    assert common.stop_token_ids(Tok()) == [EOS]
    assert common.stop_token_ids(Tok(), GenerationConfig(eos_token_id=GEN_EOS)) == [EOS, GEN_EOS]
    assert common.stop_token_ids(Tok(), GenerationConfig(eos_token_id=[GEN_EOS, EOS, 7])) == [EOS, GEN_EOS, 7]
    assert common.stop_token_ids(Tok(), GenerationConfig()) == [EOS]  # eos_token_id None


def test_stops_on_every_stop_token_and_appends_nothing():
    """A response that ends with the generation_config's EOS is finished and ends there; nothing the
    model did not sample (such as the tokenizer's EOS) is appended, so the mask covers only samples."""
    script = {5: [7, GEN_EOS, 8, EOS], 6: [9, EOS], 4: [9, 9, 9, 9, 9, 9]}
    lm = ScriptedLM(lambda row: script[row[-1]])
    lm.generation_config = GenerationConfig(eos_token_id=[EOS, GEN_EOS])
    sampler = common.TorchSampler(Tok(), lm)
    assert sampler.stop_ids == [EOS, GEN_EOS]
    out = sampler.generate([[5], [6], [4]], n=1, temperature=1.0, top_p=1.0, max_tokens=5)
    a, b, c = (g[0] for g in out)
    assert a.generated_ids == [7, GEN_EOS] and a.finished and a.text == "7 3"
    assert b.generated_ids == [9, EOS] and b.finished
    assert c.generated_ids == [9] * 5 and not c.finished
    assert lm.calls[0][3]["eos_token_id"] == [EOS, GEN_EOS]  # generate() stops on the same set
    # a stop token beyond the budget was never part of the response
    cut = common.TorchSampler(Tok(), lm).generate([[5]], n=1, temperature=1.0, top_p=1.0, max_tokens=1)[0][0]
    assert cut.generated_ids == [7] and not cut.finished


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
    lm.generation_config = GenerationConfig(eos_token_id=[EOS, GEN_EOS])
    with torch.no_grad():  # make both stop tokens likely so that some samples stop early
        for t in (EOS, GEN_EOS):
            lm.lm_head.weight[t] *= 0
            lm.lm_head.weight[t] += lm.model.norm.weight.sign() * 0.3
    lm.train()
    out = common.TorchSampler(Tok(), lm).generate([[5, 6, 7], [8]], n=8, temperature=1.0, top_p=1.0,
                                                  max_tokens=6, prefixes=[[9], [10, 11]])
    assert lm.training  # the sampler restores the training mode
    ends = set()
    for group, prefix in zip(out, [[9], [10, 11]]):
        assert len(group) == 8
        for s in group:
            assert s.prefix_ids == prefix and len(s.response_ids) <= 6
            stops = [k for k, t in enumerate(s.generated_ids) if t in (EOS, GEN_EOS)]
            assert s.finished == bool(stops)
            if s.finished:  # exactly one stop token, the last one: nothing after it
                assert stops == [len(s.generated_ids) - 1]
                ends.add(s.generated_ids[-1])
            else:  # not finished: it used the whole budget (a sampled PAD id is a real token here)
                assert len(s.response_ids) == 6
    assert ends == {EOS, GEN_EOS}  # both stop tokens ended some response
