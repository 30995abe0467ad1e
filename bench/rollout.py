"""Rollout time of the vLLM sampler (its CPU build) against the torch sampler on the built-in task, in
one process, interleaved, and the engine's log-prob gap to the trainer. What docs/vllm-cpu.md quotes
and what `--sampler auto` on CPU is decided from.

    python bench/rollout.py                        # grpo.py's default batch: 16 prompts x 8, 48 tokens
    python bench/rollout.py --dtype bfloat16       # the gap of a bf16 engine instead
    python bench/rollout.py --prompts 64 --repeats 7 --json out.json

Both samplers sample the same prompts from the same weights (the built-in base), alternating, each
call timed alone; the first call of each is a warm-up and not counted. Prints the median and the
spread (min-max) of each, their ratio, the engine's weight push (which a trainer pays every step and
the torch sampler does not, in one process), and the gap |log-prob vLLM - log-prob trainer| per token.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import builtin_task  # noqa: E402
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=builtin_task.SETTINGS["max_response_len"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the vLLM engine's dtype")
    p.add_argument("--json", default="", help="also write the numbers here")
    args = p.parse_args()

    os.environ.update(common.one_rank_environment())
    dist.init_process_group("gloo")
    path = builtin_task.build_base_model(os.path.expanduser("~/.cache/sft_rl_fusion"))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    rows = builtin_task.make_task(args.prompts // 4 + 1, seed=1)[:args.prompts]
    prompts = [tok(r["problem"], add_special_tokens=False)["input_ids"] for r in rows]
    model = common.load_policy(path, common.Dist(), compile=False, train=False)
    stops = common.stop_token_ids(tok, model.lm.generation_config)
    torch_sampler = common.TorchSampler(tok, model.lm, stop_ids=stops)
    vllm_sampler = common.VLLMSampler(tok, path, rank=0, seed=0, max_model_len=64 + args.max_tokens,
                                      device=torch.device("cpu"), stop_ids=stops, max_num_batched_tokens=8192,
                                      kv_cache_bytes=common.vllm_kv_cache_bytes(path, 64 + args.max_tokens,
                                                                                getattr(torch, args.dtype)),
                                      logprobs=True, log_dir="/tmp", dtype=getattr(torch, args.dtype))
    vllm_sampler.sync_weights(model)
    times = {"torch": [], "vllm": [], "vllm_sync": []}
    tokens = {"torch": [], "vllm": []}
    gaps = []
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        vllm_sampler.sync_weights(model)  # what a trainer step pays before it samples
        if r:
            times["vllm_sync"].append(time.perf_counter() - t0)
        for name, sampler in (("torch", torch_sampler), ("vllm", vllm_sampler)):
            t0 = time.perf_counter()
            groups = sampler.generate(prompts, n=args.group_size, temperature=1.0, top_p=1.0,
                                      max_tokens=args.max_tokens)
            dt = time.perf_counter() - t0
            if r == 0:
                continue  # warm-up
            times[name].append(dt)
            tokens[name].append(sum(len(s.generated_ids) for g in groups for s in g))
            if name == "vllm":
                samples = [s for g in groups for s in g]
                batch = common.make_batch([s.prompt_ids for s in samples], [s.generated_ids for s in samples],
                                          tok.pad_token_id, torch.device("cpu"))
                with torch.no_grad():
                    logp, _ = model(**batch)
                gaps += [abs(float(logp[i, t]) - lp) for i, s in enumerate(samples) for t, lp in enumerate(s.logprobs)]
    out = {"prompts": args.prompts, "group_size": args.group_size, "max_tokens": args.max_tokens,
           "repeats": args.repeats, "engine_dtype": args.dtype, "threads": torch.get_num_threads(),
           "vllm_start_seconds": vllm_sampler.start_seconds}
    for name in ("torch", "vllm"):
        out[name] = {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                     "max_s": max(times[name]), "tokens_per_s": statistics.median(
                         t / s for t, s in zip(tokens[name], times[name]))}
    out["vllm_sync"] = {"median_s": statistics.median(times["vllm_sync"]), "min_s": min(times["vllm_sync"]),
                        "max_s": max(times["vllm_sync"])}
    out["vllm_over_torch"] = out["vllm"]["median_s"] / out["torch"]["median_s"]
    out["logprob_gap"] = {"mean": sum(gaps) / len(gaps), "max": max(gaps), "tokens": len(gaps)}
    print(f"{args.prompts} prompts x {args.group_size} samples, <= {args.max_tokens} tokens, {args.repeats} "
          f"interleaved repeats, {out['threads']} threads; vLLM engine {args.dtype}, started in "
          f"{vllm_sampler.start_seconds:.1f} s")
    for name in ("torch", "vllm"):
        o = out[name]
        print(f"  {name:5s}  median {o['median_s']:.3f} s  (min {o['min_s']:.3f}, max {o['max_s']:.3f})  "
              f"{o['tokens_per_s']:.0f} generated tokens/s")
    o = out["vllm_sync"]
    print(f"  vLLM weight push (sync_weights): median {o['median_s']:.3f} s  (min {o['min_s']:.3f}, max {o['max_s']:.3f})")
    print(f"  vLLM / torch: {out['vllm_over_torch']:.2f}x the time")
    print(f"  log-prob gap |vLLM - trainer|: mean {out['logprob_gap']['mean']:.2e}, max {out['logprob_gap']['max']:.2e}"
          f" over {len(gaps)} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    vllm_sampler.close()


if __name__ == "__main__":
    main()
