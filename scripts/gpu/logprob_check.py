"""PolicyModel's log-probs and entropies (METHODS.md Eq. 1-2) on a CUDA GPU, against float64.

    python scripts/gpu/logprob_check.py [--vocab 151936] [--hidden 896] [--tokens 4096] [--json OUT.json]

A 2-layer Qwen2 with Qwen2.5's vocabulary, built from a config (nothing downloaded). For float32 and
bfloat16 weights, eager and compiled kernel: the largest error of the log-probs, entropies and the LM
head's gradient against a float64 reference from the full [N, V] logits; then time and peak memory of
forward + backward against the naive form (full logits, log_softmax, gather, full-softmax entropy), both in
bfloat16, median of 5 after a warm-up. CPU only with --device cpu (slow at this vocabulary). --json writes the
numbers too (scripts/gpu/check.py)."""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
import common  # noqa: E402


def build(vocab, hidden, device, dtype):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=hidden // 64, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=False)
    lm = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        lm.lm_head.weight.normal_(0.0, 2.0 / hidden ** 0.5)  # peaked next-token distributions, not uniform
    return lm.to(device=device, dtype=dtype)


def batch_for(vocab, tokens, device, seqs=8):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, vocab, (16,), generator=g).tolist() for _ in range(seqs)]
    responses = [torch.randint(1, vocab, (tokens // seqs - 3 * i,), generator=g).tolist() for i in range(seqs)]
    return common.make_batch(prompts, responses, 0, device)


def reference(lm, batch, temperature):
    """float64 Eq. (1)-(2) from the full logits of the response positions, and d(sum logp + sum H)/dW_head."""
    R = batch["response_mask"].shape[1]
    with torch.no_grad():
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=pos).last_hidden_state[:, -R - 1:-1]
    mask = batch["response_mask"].bool()
    h = hidden[mask].double()
    w = lm.lm_head.weight.detach().double().requires_grad_()
    z = h @ w.T / temperature  # [N, V]
    logq = torch.log_softmax(z, -1)
    logp = logq.gather(-1, batch["input_ids"][:, -R:][mask][:, None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    (logp.sum() + ent.sum()).backward()
    return logp.detach(), ent.detach(), w.grad


def compare(lm, batch, compile, temperature=0.7):
    ref_lp, ref_en, ref_g = reference(lm, batch, temperature)
    model = common.PolicyModel(lm, compile=compile)
    lm.zero_grad(set_to_none=True)
    logp, ent = model(**common.model_inputs(batch), temperature=temperature, with_entropy=True)
    (logp.sum() + ent.sum()).backward()
    mask = batch["response_mask"].bool()
    g = lm.lm_head.weight.grad.double()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    return {"logp_max_abs": (logp[mask].double() - ref_lp).abs().max().item(), "logp_rel": rel(logp[mask], ref_lp),
            "entropy_max_abs": (ent[mask].double() - ref_en).abs().max().item(), "entropy_rel": rel(ent[mask], ref_en),
            "head_grad_rel": rel(g, ref_g)}


def naive(lm, batch, temperature=0.7):
    R = batch["response_mask"].shape[1]
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=pos).logits[:, -R - 1:-1].float() / temperature  # [B, R, V]
    logq = torch.log_softmax(logits, -1)
    logp = logq.gather(-1, batch["input_ids"][:, -R:, None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    m = batch["response_mask"]
    return logp * m, ent * m


def timed(fn, device, repeats=5):
    times, peaks = [], []
    for i in range(repeats + 1):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        logp, ent = fn()
        (logp.sum() + ent.sum()).backward()
        torch.cuda.synchronize(device)
        if i:  # the first is the warm-up (and compilation)
            times.append(time.perf_counter() - t)
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2 ** 30)
        del logp, ent
    return statistics.median(times), min(times), max(times), statistics.median(peaks)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="")
    a = p.parse_args()
    results = {"torch": torch.__version__, "vocab": a.vocab, "hidden": a.hidden, "tokens": a.tokens,
               "accuracy": [], "speed": []}
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"V={a.vocab} H={a.hidden} N~{a.tokens} response tokens")
    print(f"{'weights':8s} {'kernel':8s} {'logp max|err|':>13s} {'logp rel':>9s} {'H max|err|':>11s} {'H rel':>9s} "
          f"{'dW_head rel':>11s}")
    for dtype in (torch.float32, torch.bfloat16):
        lm = build(a.vocab, a.hidden, device, dtype)
        batch = batch_for(a.vocab, a.tokens, device)
        for compile in (False, True):
            r = compare(lm, batch, compile)
            results["accuracy"].append({"weights": str(dtype)[6:], "compiled": compile, **r})
            print(f"{str(dtype)[6:]:8s} {'compiled' if compile else 'eager':8s} {r['logp_max_abs']:13.2e} "
                  f"{r['logp_rel']:9.1e} {r['entropy_max_abs']:11.2e} {r['entropy_rel']:9.1e} {r['head_grad_rel']:11.1e}")
    if device.type != "cuda":
        return write(a.json, results)
    lm = build(a.vocab, a.hidden, device, torch.bfloat16)
    batch = batch_for(a.vocab, a.tokens, device)
    model = common.PolicyModel(lm, compile=True)
    rows = {"naive (full logits)": lambda: naive(lm, batch),
            "PolicyModel (chunked, compiled)": lambda: model(**common.model_inputs(batch), temperature=0.7,
                                                              with_entropy=True)}
    print("forward + backward, bf16 weights, log-probs and entropies: median (min-max) seconds, extra peak GiB")
    for name, fn in rows.items():
        med, lo, hi, peak = timed(fn, device)
        print(f"  {name:32s} {med * 1e3:7.1f} ms ({lo * 1e3:.1f}-{hi * 1e3:.1f})  {peak:6.2f} GiB")
        results["speed"].append({"form": name, "median_ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3,
                                 "extra_peak_gib": peak})
    write(a.json, results)


def write(path: str, results: dict):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
