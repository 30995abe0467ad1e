"""The machine's limit: how close the training step and the sampler come to it on CPU (docs/performance.md).

    python bench/mfu.py [--hidden 512] [--layers 6] [--batch 32] [--seq 256] [--repeats 5] [--json bench/mfu.json]

A Qwen2 of about 20M parameters built from a config (the built-in tokenizer's vocabulary, nothing downloaded).

Training: forward + backward of common.PolicyModel (the trainers' code path: decoder, then the chunked LM head of
lm_head.py on the response tokens) on `batch` sequences of `seq` tokens, float32, with the gradient of the mean
log-prob. Its FLOPs are 3 forward-equivalents of 2 x matmul parameters per token plus attention (QK^T and AV over
the causal context, on average half the sequence; bench/gpu_paper.py's train_flops_per_token). Achieved FLOP/s over
the float32 matmul FLOP/s measured in the same run (a [4096, H] x [H, 4H] product, the MLP's shape, at the same
thread count) is the model FLOP utilisation (MFU).

Sampler: common.TorchSampler generating `--new_tokens` tokens for `batch` prompts. Decoding reads every weight and
the KV cache once per new token of the whole batch, so memory bandwidth bounds it at
    tokens/s <= batch x bandwidth / (weight bytes + mean KV-cache bytes),
with bandwidth measured in the same run (a large float32 copy, bytes read + written over time).
Measurements interleave within every repeat; medians (min-max) over repeats, the first pass of each a warm-up.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import gpu_paper  # noqa: E402  (bench/, this script's directory)


def build(hidden: int, layers: int, tokenizer_dir: str, seed=0):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(cfg).float(), tok


def shape(lm) -> dict:
    c = lm.config
    return dict(vocab=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                tied=c.tie_word_embeddings)


def matmul_flops(hidden: int, rows=4096, reps=5, intermediate: int | None = None) -> float:
    """float32 FLOP/s of a [rows, hidden] x [hidden, intermediate] product (intermediate: 4 x hidden by default)."""
    intermediate = intermediate or 4 * hidden
    a, b = torch.randn(rows, hidden), torch.randn(hidden, intermediate)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * rows * hidden * intermediate * reps / (time.perf_counter() - t0)


def bandwidth(n_bytes=512 * 2 ** 20, reps=5) -> float:
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return 2 * n_bytes * reps / (time.perf_counter() - t0)  # read + write


def train_step_seconds(model, batch, seq: int, prompt: int = 16) -> float:
    """One forward + backward of PolicyModel on `batch` sequences: a `prompt`-token prompt and seq - prompt response."""
    g = torch.Generator().manual_seed(0)
    vocab = model.lm.config.vocab_size
    prompts = [torch.randint(3, vocab, (prompt,), generator=g).tolist() for _ in range(batch)]
    responses = [torch.randint(3, vocab, (seq - prompt,), generator=g).tolist() for _ in range(batch)]
    mb = common.make_batch(prompts, responses, 0, "cpu")
    t0 = time.perf_counter()
    logp, _ = model(**common.model_inputs(mb))
    logp.sum().div(mb["response_mask"].sum()).backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def sample_seconds(sampler, model, batch: int, new_tokens: int, prompt: int = 16) -> tuple[float, int]:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.lm.config.vocab_size, (prompt,), generator=g).tolist() for _ in range(batch)]
    t0 = time.perf_counter()
    groups = sampler.generate(prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=new_tokens)
    return time.perf_counter() - t0, sum(len(s.generated_ids) for grp in groups for s in grp)


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=32, help="sequences per training forward + backward, prompts sampled")
    p.add_argument("--seq", type=int, default=256, help="tokens per training sequence (16 prompt + the response)")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import builtin_task

    tok_dir = builtin_task.build_base_model(os.path.expanduser("~/.cache/sft_rl_fusion"))
    lm, tok = build(a.hidden, a.layers, tok_dir)
    m = shape(lm)
    params = sum(x.numel() for x in lm.parameters())
    model = common.PolicyModel(lm, compile=True).train()
    sampler = common.TorchSampler(tok, lm)  # grpo.py's torch sampler on one process: generate from the model itself
    # forward + backward FLOPs per token: 3 forward-equivalents, attention over half the sequence on average
    flops_step = a.batch * a.seq * gpu_paper.train_flops_per_token(m, context=a.seq / 2, passes=3)
    rows = {"train_s": [], "matmul_flops": [], "sample_s": [], "sample_tokens": [], "bandwidth": []}
    for r in range(a.repeats + 1):
        t = train_step_seconds(model, a.batch, a.seq)
        mm = matmul_flops(a.hidden)
        s, n = sample_seconds(sampler, model, a.batch, a.new_tokens)
        bw = bandwidth()
        if r:  # repeat 0 warms up (compilation, allocator)
            for k, v in zip(rows, (t, mm, s, n, bw)):
                rows[k].append(v)
    mfu = [flops_step / t / mm for t, mm in zip(rows["train_s"], rows["matmul_flops"])]
    weight_bytes = 4 * params
    kv_mean = gpu_paper.kv_bytes_per_token(m, bytes_per=4) * (16 + a.new_tokens / 2)  # per sequence, on average
    bound = [a.batch * bw / (weight_bytes + a.batch * kv_mean) for bw in rows["bandwidth"]]
    speed = [n / s for n, s in zip(rows["sample_tokens"], rows["sample_s"])]
    res = {"info": {"command": "python bench/mfu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor(),
                    "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__},
           "model": {**m, "params": params}, "batch": a.batch, "seq": a.seq, "new_tokens": a.new_tokens,
           "train": {"seconds": spread(rows["train_s"]), "achieved_flops": spread([flops_step / t for t in rows["train_s"]]),
                     "matmul_flops": spread(rows["matmul_flops"]), "mfu": spread(mfu)},
           "sample": {"tokens_per_s": spread(speed), "bandwidth_bytes_s": spread(rows["bandwidth"]),
                      "bound_tokens_per_s": spread(bound), "fraction_of_bound": spread([s / b for s, b in zip(speed, bound)])}}
    tr, sa = res["train"], res["sample"]
    print(f"{res['info']['command']}\n{res['info']['date']}, {res['info']['cores']} cores, {res['info']['threads']} threads; "
          f"Qwen2 {params / 1e6:.1f}M params (hidden {a.hidden}, {a.layers} layers, vocab {m['vocab']}), float32; "
          f"median (min-max) of {a.repeats}")
    print(f"training forward + backward, {a.batch} x {a.seq} tokens: {tr['seconds']['median']:.3f} s, "
          f"{tr['achieved_flops']['median'] / 1e9:.1f} GFLOP/s achieved against {tr['matmul_flops']['median'] / 1e9:.1f} "
          f"GFLOP/s measured matmul: MFU {tr['mfu']['median']:.2f} ({tr['mfu']['min']:.2f}-{tr['mfu']['max']:.2f})")
    print(f"sampler, {a.batch} prompts x {a.new_tokens} new tokens: {sa['tokens_per_s']['median']:.0f} tokens/s against a "
          f"bandwidth bound of {sa['bound_tokens_per_s']['median']:.0f} ({sa['bandwidth_bytes_s']['median'] / 1e9:.1f} GB/s "
          f"measured): {sa['fraction_of_bound']['median']:.2f} of the bound")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
