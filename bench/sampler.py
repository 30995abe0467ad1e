"""Why the torch sampler does not get faster on CPU: the rollout of bench/trl_step.py (16 prompts x 8 responses of at
most 48 tokens from the built-in base) drawn five ways from the same seed (docs/performance.md):

    python bench/sampler.py [--repeats 5] [--json bench/sampler.json]

  generate           common.TorchSampler: transformers' generate with its dynamic KV cache (what the trainers run)
  generate, 1 thread the same with one thread instead of the machine's cores
  static cache       generate with cache_implementation="static" (a preallocated cache, attention over all of it)
  hand loop          the decode loop written out: one forward per token on the cache, softmax, the same draw as
                     torch.multinomial (argmax of p / q with q ~ Exp(1), one q per row and token), no logits
                     processors or stopping criteria objects
  hand loop, compiled the same with the decode forward under torch.compile(dynamic=True); its compile time is
                     reported apart and not in its time

All five draw the same tokens (checked: they agree token for token with generate), so the times compare the
same work. Each repeat runs every variant once, in turn; the table gives the median (min-max) over repeats
and each variant's time as a ratio to generate's, and the floor: the decode's matmul FLOPs (2 x matmul
parameters a token: the prompts once, then every row of the batch at every step until the last one stops)
at the float32 matmul rate measured in the same run for the decode's MLP product ([128, H] x [H, I]).
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
import builtin_task  # noqa: E402
import common  # noqa: E402
from common import left_pad  # noqa: E402,F401  (the test builds its batch with it too)
import mfu  # noqa: E402  (bench/, this script's directory)

PROMPTS, G, MAX_NEW = 16, 8, 48


@torch.no_grad()
def hand_loop(lm, ids, attn, stop_ids, pad_id, max_new, forward=None) -> torch.Tensor:
    """generate()'s sampling written out: [B, steps] new tokens, pad after a row's stop token, the loop ending
    when every row has stopped; the same random draws as generate (torch.multinomial with one sample is
    argmax(p / q), q ~ Exp(1) drawn for the whole [B, V] grid)."""
    from transformers import DynamicCache

    forward = forward or lm.forward
    cache = DynamicCache(config=lm.config)
    position = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    logits = lm(input_ids=ids, attention_mask=attn, position_ids=position, past_key_values=cache, use_cache=True,
                logits_to_keep=1).logits[:, -1].float()
    position, stops = position[:, -1:], torch.tensor(stop_ids)
    running = torch.ones(ids.shape[0], dtype=torch.bool)
    out = []
    for t in range(max_new):
        probs = torch.softmax(logits, dim=-1)
        token = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)
        token = torch.where(running, token, pad_id)
        out.append(token)
        running &= ~torch.isin(token, stops)
        if t == max_new - 1 or not running.any():
            break
        attn, position = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=-1), position + 1
        logits = forward(input_ids=token[:, None], attention_mask=attn, position_ids=position, past_key_values=cache,
                         use_cache=True).logits[:, -1].float()
    return torch.stack(out, dim=1)


def cut(rows: torch.Tensor, stop_ids) -> list[list[int]]:
    """Each row up to and including its first stop token."""
    out = []
    for r in rows.tolist():
        k = next((i for i, t in enumerate(r) if t in stop_ids), None)
        out.append(r[:k + 1] if k is not None else r)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    path = builtin_task.build_base_model(os.path.expanduser("~/.cache/sft_rl_fusion"))
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sampler = common.TorchSampler(tok, lm)
    rows = builtin_task.rows("train")[:PROMPTS]
    prompts = [tok(common.format_prompt(tok, r["prompt"], None), add_special_tokens=False)["input_ids"] for r in rows]
    ids, attn = left_pad([x for x in prompts for _ in range(G)], sampler.pad_id)
    stop, pad = sampler.stop_ids, sampler.pad_id

    def generate(**extra):
        return lm.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           max_new_tokens=MAX_NEW, eos_token_id=stop, pad_token_id=pad, **extra)[:, ids.shape[1]:]

    def one_thread():
        torch.set_num_threads(1)
        try:
            return generate()
        finally:
            torch.set_num_threads(a.threads)

    compiled = torch.compile(lm.forward, dynamic=True)
    t0 = time.perf_counter()
    hand_loop(lm, ids, attn, stop, pad, MAX_NEW, compiled)
    compile_s = time.perf_counter() - t0
    variants = {"generate": generate, "generate, 1 thread": one_thread,
                "static cache": lambda: generate(cache_implementation="static"),
                "hand loop": lambda: hand_loop(lm, ids, attn, stop, pad, MAX_NEW),
                "hand loop, compiled": lambda: hand_loop(lm, ids, attn, stop, pad, MAX_NEW, compiled)}
    same, times, decode_rows = {}, {k: [] for k in variants}, []
    for r in range(a.repeats + 1):  # the first round warms every variant up and is not timed
        drawn = {}
        for name, fn in variants.items():
            torch.manual_seed(r)
            t0 = time.perf_counter()
            out = fn()
            if r:
                times[name].append(time.perf_counter() - t0)
            drawn[name] = cut(out, stop)
        for name in variants:
            same[name] = same.get(name, True) and drawn[name] == drawn["generate"]
        # tokens through the model: the prompts once, then every row at every step until the last one stops
        decode_rows.append(ids.numel() + len(drawn["generate"]) * max(len(x) for x in drawn["generate"]))
    rate = statistics.median(mfu.matmul_flops(lm.config.hidden_size, rows=PROMPTS * G, reps=200,  # the decode's MLP
                                              intermediate=lm.config.intermediate_size) for _ in range(3))
    matmul_params = mfu.gpu_paper.param_count(mfu.shape(lm))["matmul"]  # the count of every bench's FLOPs
    floor = 2 * matmul_params * statistics.median(decode_rows) / rate
    base = statistics.median(times["generate"])
    table = {name: {"median": statistics.median(ts), "min": min(ts), "max": max(ts),
                    "ratio_to_generate": statistics.median(ts) / base, "same_draws_as_generate": same[name]}
             for name, ts in times.items()}
    info = {"command": "python bench/sampler.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor(),
            "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__, "repeats": a.repeats}
    print(f"{info['command']}\n{info['date']}, {info['cores']} cores, {a.threads} threads; {PROMPTS} prompts x {G}, "
          f"at most {MAX_NEW} tokens; median (min-max) over {a.repeats} repeats")
    for name, t in table.items():
        print(f"  {name:20s} {t['median']:.3f} s ({t['min']:.3f}-{t['max']:.3f})  {t['ratio_to_generate']:.2f}x  "
              f"same draws: {t['same_draws_as_generate']}")
    print(f"  compile of the decode forward: {compile_s:.1f} s; matmul floor {floor:.3f} s "
          f"({rate / 1e9:.0f} GFLOP/s on the decode's MLP product)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "table": table, "compile_s": compile_s, "matmul_floor_s": floor,
                       "matmul_flops": rate, "matmul_params": matmul_params}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
