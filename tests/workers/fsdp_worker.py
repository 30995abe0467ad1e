"""Two optimizer steps on a fixed global batch; run as one process or under torchrun (FSDP2, gloo).

Writes {losses, grad_norms} and the final full weights to argv[1] (rank 0), and a checkpoint under
argv[2] through run_dir.save_checkpoint, so tests can compare single-process and 2-rank runs.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import common  # on PYTHONPATH (tests/test_fsdp.py sets it)
import run_dir


def main(out_file: str, ckpt_dir: str):
    d = common.init_distributed()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64, eos_token_id=2, pad_token_id=0)
    lm = AutoModelForCausalLM.from_config(cfg)
    model = common.wrap_policy(lm, d, compile=False)
    assert common.is_fsdp_module(model) == (d.world_size > 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)

    g = torch.Generator().manual_seed(1)  # the same global batch on every rank
    prompts = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (8,), generator=g)]
    responses = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 7, (8,), generator=g)]
    adv = torch.randn(8, generator=g)
    per = 8 // d.world_size
    mine = range(d.rank * per, (d.rank + 1) * per)
    micro = [[i for i in mine][s:s + 2] for s in range(0, per, 2)]  # micro-batches of 2 sequences
    losses, norms = [], []
    for _ in range(2):
        batches = [common.make_batch([prompts[i] for i in idx], [responses[i] for i in idx], 0, d.device)
                   for idx in micro]
        norm = common.step_normaliser([b["response_mask"] for b in batches], "token-mean")
        total = 0.0
        for idx, b in zip(micro, batches):
            logp, ent = model(**b, with_entropy=True)
            per_token = -adv[idx][:, None] * logp - 0.1 * ent
            loss = common.aggregate(per_token, b["response_mask"], "token-mean", norm)
            loss.backward()
            total += float(loss)
        losses.append(common.all_reduce([total])[0] / d.world_size)
        norms.append(common.clip_grad_norm(model, 1e9))
        opt.step()
        opt.zero_grad()
    weights = {k: v.tolist() for k, v in common.full_state_dict(model)}
    if d.main:
        with open(out_file, "w") as f:
            json.dump({"losses": losses, "grad_norms": norms, "weights": weights}, f)

    class Tok:  # save_checkpoint stores the tokenizer beside the weights
        def save_pretrained(self, path):
            pass

    run_dir.save_checkpoint(ckpt_dir, 2, model, Tok(), {"main": opt}, {}, {"note": "fsdp"})
    common.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
