"""Two optimizer steps on a fixed global batch; run as one process or under torchrun (FSDP2, gloo).

Writes {losses, grad_norms} and the final full weights to argv[1] (rank 0), and a checkpoint under
argv[2] through run_dir.save_checkpoint, so tests can compare single-process and 2-rank runs. A twin model
trained alongside with its AdamW state created up front (common.init_adam_state) must end bit for bit equal,
weights and optimizer state (DTensors under FSDP2): `prefilled_equal`.
"""
import copy
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
    twin_lm = copy.deepcopy(lm)
    model = common.wrap_policy(lm, d, compile=False)
    assert common.is_fsdp_module(model) == (d.world_size > 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)  # state created at its first step
    twin = common.wrap_policy(twin_lm, d, compile=False)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.01)
    common.init_adam_state(twin_opt)  # state created now

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
        for m, o in ((model, opt), (twin, twin_opt)):
            total = 0.0
            for idx, b in zip(micro, batches):
                logp, ent = m(**b, with_entropy=True)
                per_token = -adv[idx][:, None] * logp - 0.1 * ent
                loss = common.aggregate(per_token, b["response_mask"], "token-mean", norm)
                loss.backward()
                total += float(loss)
            if m is model:
                losses.append(common.all_reduce([total])[0] / d.world_size)
                norms.append(common.clip_grad_norm(m, 1e9))
            else:
                common.clip_grad_norm(m, 1e9)
            o.step()
            o.zero_grad()
    weights = {k: v.tolist() for k, v in common.full_state_dict(model)}
    same = all(torch.equal(a, b) for (_, a), (_, b) in zip(common.full_state_dict(model), common.full_state_dict(twin)))
    for p, q in zip(model.parameters(), twin.parameters()):
        a, b = opt.state[p], twin_opt.state[q]
        same &= a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k].dtype == b[k].dtype and
                                             a[k].device == b[k].device and torch.equal(local(a[k]), local(b[k]))
                                             for k in a)
    same = bool(common.all_reduce([same], op=torch.distributed.ReduceOp.MIN)[0])
    if d.main:
        with open(out_file, "w") as f:
            json.dump({"losses": losses, "grad_norms": norms, "weights": weights, "prefilled_equal": same}, f)

    class Tok:  # save_checkpoint stores the tokenizer beside the weights
        def save_pretrained(self, path):
            pass

    run_dir.save_checkpoint(ckpt_dir, 2, model, Tok(), {"main": opt}, {}, {"note": "fsdp"})
    common.shutdown()


def local(t):  # a DTensor's shard on this rank
    return t.to_local() if hasattr(t, "to_local") else t


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
