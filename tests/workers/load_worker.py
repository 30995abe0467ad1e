"""Loading a model into FSDP2 shards, and the one-rank process group; run by tests/test_fsdp.py.

    python load_worker.py load MODEL_DIR OUT      under torchrun: the policy, the reference model and
                                                  the torch sampler's plain copy, built from rank 0's read
    python load_worker.py one_rank OUT            plain python: the group a single GPU process sets up
Writes what the test checks to OUT (rank 0) as JSON.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import common  # on PYTHONPATH (tests/test_fsdp.py sets it)


def load(model_dir: str, out_file: str):
    reads = []
    real = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):  # who reads the checkpoint's weights into memory
        reads.append(os.environ["RANK"])
        return real(*args, **kwargs)

    AutoModelForCausalLM.from_pretrained = counting
    d = common.init_distributed()
    model = common.load_policy(model_dir, d, compile=False, gradient_checkpointing=True)
    ref = common.load_policy(model_dir, d, compile=False, train=False)
    AutoModelForCausalLM.from_pretrained = real
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # the reference values

    result = {"sharded": common.is_fsdp_module(model) and common.is_fsdp_module(ref), "rank_reads": [None] * d.world_size}
    dist.all_gather_object(result["rank_reads"], len(reads))
    expected = hf.state_dict()
    for name, m in (("policy", model), ("reference", ref)):
        got = dict(common.full_state_dict(m))
        result[f"{name}_keys_equal"] = set(got) == set(expected)
        result[f"{name}_max_diff"] = max(float((got[k] - v).abs().max()) for k, v in expected.items())
        result[f"{name}_tied"] = m.lm.lm_head.weight is m.lm.model.embed_tokens.weight
        result[f"{name}_buffers_equal"] = all(torch.equal(b, dict(hf.named_buffers())[k])
                                              for k, b in m.lm.named_buffers())
    pushed = dict(common.full_state_dict(model, dtype=torch.bfloat16))  # what vLLM receives: shards cast, then gathered
    result["bf16_push_exact"] = set(pushed) == set(expected) and all(
        pushed[k].dtype == torch.bfloat16 and torch.equal(pushed[k], v.to(torch.bfloat16)) for k, v in expected.items())
    result["policy_trainable"] = all(p.requires_grad for p in model.parameters())
    result["reference_frozen"] = not any(p.requires_grad for p in ref.parameters())
    result["reference_eval"] = not ref.training
    result["generation_config_eos"] = model.lm.generation_config.eos_token_id

    # the torch sampler's plain copy: full weights arrive through sync_weights, ties and buffers kept
    cfg = common.BaseConfig(sampler="torch")
    tok = type("Tok", (), {"eos_token_id": hf.config.eos_token_id, "pad_token_id": 0})()
    sampler = common.make_sampler(cfg, d, tok, model_dir, model)
    plain = sampler.lm
    result["plain_is_plain"] = not common.is_fsdp_module(plain) and plain is not model.lm
    result["plain_max_diff"] = max(float((plain.state_dict()[k] - v).abs().max()) for k, v in expected.items())
    result["plain_tied"] = plain.lm_head.weight is plain.model.embed_tokens.weight
    result["plain_frozen"] = not any(p.requires_grad for p in plain.parameters())

    # the sharded policy computes what the HF model computes (weights and RoPE buffers are right)
    g = torch.Generator().manual_seed(0)
    batch = common.make_batch([torch.randint(3, 50, (5,), generator=g).tolist() for _ in range(2)],
                              [torch.randint(3, 50, (4,), generator=g).tolist() for _ in range(2)], 0, d.device)
    with torch.no_grad():
        logp, _ = model(**batch)
        ref_logp, _ = common.PolicyModel(hf, compile=False)(**batch)
    result["logp_max_diff"] = float((logp - ref_logp).abs().max())

    # the reference model's root is resharded after old_logprobs' no-grad forwards (FSDP2 keeps a root
    # gathered for a backward that a reference model never runs): its root parameters are shards again
    run = type("Run", (), {"model": model, "ref_model": ref})()
    mb = dict(batch)
    with torch.no_grad():
        ref(**common.model_inputs(mb))
    root = lambda m: m.lm.model.embed_tokens.weight  # noqa: E731  (owned by the root FSDP module)
    result["ref_root_gathered_after_forward"] = not hasattr(root(ref), "to_local")
    common.old_logprobs(run, [mb], temperature=1.0)
    result["ref_root_sharded_after_old_logprobs"] = hasattr(root(ref), "to_local")
    if d.main:
        with open(out_file, "w") as f:
            json.dump(result, f)
    common.shutdown()


def one_rank(out_file: str):
    before = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    d = common.init_distributed(one_rank_group=True)
    after = {k: os.environ.get(k) for k in before}
    result = {"before": before, "after": after, "initialized": dist.is_initialized(),
              "world_size": d.world_size, "rank": d.rank, "backend": dist.get_backend(),
              "all_reduce": common.all_reduce([3.0])[0]}
    common.shutdown()
    with open(out_file, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3])
    else:
        one_rank(sys.argv[2])
