"""Log-probs + entropies of the response tokens (METHODS.md Eq. 1-2), forward + backward, three ways, side by side:

    python bench/logprob.py [--hidden 896] [--tokens 1024,2048] [--dtypes float32,bfloat16] [--repeats 5]
                            [--json bench/logprob.json]

  naive         full [N, V] logits, log_softmax, gather, full-softmax entropy (what a first version writes)
  checkpointed  the same compiled chunk kernel under torch.utils.checkpoint (an earlier version of this code's head)
  fused         lm_head.LMHead (this code's head now): chunks through one reused [chunk, V] buffer of at most
                256 MiB (441 float32 rows at this V, 883 bfloat16), logsumexp kept,
                the backward recomputes each chunk's logits once and turns them into dL/dz in place

Each case draws hidden states h [N, H], a head W [V, H] (V = 151,936, Qwen2.5's vocabulary) and upstream gradients
for logp and entropy (so the entropy's gradient is exercised), then takes d/dh and d/dW. Sides are interleaved
within every repeat (shuffled order); the table gives each side's median (min-max) seconds and extra peak resident
memory (VmHWM reset before the call, minus the resident set before it), and the ratios to naive's medians. First
repeat of each side is a warm-up (compilation) and is dropped. Every side's gradients are checked against naive's.

Why 0.8x is out of reach with the loss outside the head: a head that keeps no [N, V] logits must compute them twice
(forward, and again in backward to form dL/dz), so it does 4 [N, H] x [H, V]-sized matmuls against naive's 3; the
table prints that floor (4/3 of the matmul time, measured) beside each ratio.
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lm_head  # noqa: E402

VOCAB = 151_936


def naive(h, w, y, temperature, with_entropy):
    logq = torch.log_softmax((h @ w.T).float() / temperature, dim=-1)  # [N, V]
    logp = logq.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1) if with_entropy else torch.zeros_like(logp)
    return logp, entropy


_old = {}


def _old_kernel():
    """The head before lm_head.py: one compiled function, matmul included, replayed by checkpointing."""
    if not _old:
        _old["k"] = torch.compile(lambda hc, w, yc, t, e: lm_head._reduce(hc @ w.T, yc, t, e)[:2], dynamic=True)
    return _old["k"]


def checkpointed(h, w, y, temperature, with_entropy, chunk=1024):
    parts = [torch.utils.checkpoint.checkpoint(_old_kernel(), h[i:i + chunk], w, y[i:i + chunk], temperature,
                                               with_entropy, use_reentrant=False) for i in range(0, h.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fused(h, w, y, temperature, with_entropy, chunk=1024):
    rows = lm_head.rows_per_chunk(w.shape[0], w.dtype, chunk)  # as common.PolicyModel chooses them
    return lm_head.LMHead.apply(h, w, y, temperature, with_entropy, rows, True)


SIDES = {"naive": naive, "checkpointed": checkpointed, "fused": fused}


def rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def run_once(fn, h, w, y, g_logp, g_ent, with_entropy, chunk=1024):
    """(seconds, extra peak bytes, (dh, dW)) of one forward + backward."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = rss_bytes()
    t0 = time.perf_counter()
    logp, entropy = fn(h, w, y, 0.7, with_entropy, **({} if fn is naive else {"chunk": chunk}))
    loss = (g_logp * logp).sum() + ((g_ent * entropy).sum() if with_entropy else 0)
    grads = torch.autograd.grad(loss, (h, w))
    seconds = time.perf_counter() - t0
    return seconds, rss_bytes("VmHWM") - base, grads


def matmul_seconds(h, w, repeats):
    """Median seconds of one [N, H] x [H, V] matmul in the case's dtype (the unit all three sides are made of)."""
    out = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        h @ w.T
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def case(n, hidden, dtype, with_entropy, repeats, sides, seed=0, vocab=VOCAB, chunk=1024):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 2.0 / hidden ** 0.5).to(dtype).requires_grad_()  # peaked
    y = torch.randint(0, vocab, (n,), generator=g)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    times, peaks, grads = {s: [] for s in sides}, {s: [] for s in sides}, {}
    order = list(sides)
    for r in range(repeats + 1):  # repeat 0: warm-up
        random.Random(r).shuffle(order)
        for s in order:
            sec, peak, gr = run_once(SIDES[s], h, w, y, g_logp, g_ent, with_entropy, chunk)
            if r:
                times[s].append(sec), peaks[s].append(peak)
            grads[s] = gr
            del gr
    with torch.no_grad():
        mm = matmul_seconds(h, w, repeats)
    ref = grads.get("naive")
    errors = {}
    for s in sides:
        if ref is not None and s != "naive":
            errors[s] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                            for a, b in zip(grads[s], ref))
    res = {"tokens": n, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""), "entropy": with_entropy,
           "matmul_s": mm, "sides": {s: {"seconds": summary(times[s]), "peak_gib": summary([p / 2 ** 30 for p in peaks[s]])}
                                     for s in sides},
           "grad_rel_err_vs_naive": errors}
    if "naive" in sides:
        base_t, base_m = (statistics.median(times["naive"]), statistics.median(peaks["naive"]))
        res["ratio_to_naive"] = {s: {"time": statistics.median(times[s]) / base_t,
                                     "memory": statistics.median(peaks[s]) / base_m if base_m > 0 else float("nan")}
                                for s in sides if s != "naive"}  # a tiny case's peaks can round to 0 pages
        res["time_floor_4_of_3_matmuls"] = (4 * mm) / base_t  # a head keeping no [N, V] logits cannot beat this
        res["memory_floor_grad_w"] = w.numel() * 4 / base_m if base_m > 0 else float("nan")  # d/dW (fp32) itself
    return res


def print_case(r):
    head = f"N={r['tokens']} H={r['hidden']} {r['dtype']} entropy={'on' if r['entropy'] else 'off'}"
    print(f"\n{head}  (one [N,H]x[H,V] matmul: {r['matmul_s']:.2f} s)")
    for s, v in r["sides"].items():
        t, m = v["seconds"], v["peak_gib"]
        ratio = r.get("ratio_to_naive", {}).get(s)
        rt = f"  time {ratio['time']:.2f}x  memory {ratio['memory']:.2f}x" if ratio else ""
        err = r["grad_rel_err_vs_naive"].get(s)
        print(f"  {s:13s} {t['median']:7.2f} s ({t['min']:.2f}-{t['max']:.2f})  {m['median']:6.2f} GiB "
              f"({m['min']:.2f}-{m['max']:.2f}){rt}" + (f"  grad err {err:.1e}" if err is not None else ""))
    if "time_floor_4_of_3_matmuls" in r:
        print(f"  floors: time of a head without [N, V] logits (4 matmuls / naive) {r['time_floor_4_of_3_matmuls']:.2f}x; "
              f"memory of d/dW in float32 alone / naive's peak {r['memory_floor_grad_w']:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="896", help="comma-separated hidden sizes")
    p.add_argument("--tokens", default="1024,2048", help="comma-separated response-token counts N")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--entropy", default="on,off", help="with the entropy term: on, off or on,off")
    p.add_argument("--sides", default="naive,checkpointed,fused")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    sides = a.sides.split(",")
    info = {"command": "python bench/logprob.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_start": os.getloadavg()}
    print(f"{info['command']}\n{info['date']}, {info['cores']} cores, {info['threads']} threads, torch {torch.__version__}, "
          f"V={VOCAB}, median (min-max) of {a.repeats} interleaved repeats after a warm-up")
    results = []
    for hidden in map(int, a.hidden.split(",")):
        for n in map(int, a.tokens.split(",")):
            for dt in a.dtypes.split(","):
                for ent in a.entropy.split(","):
                    r = case(n, hidden, getattr(torch, dt), ent == "on", a.repeats, sides)
                    print_case(r)
                    results.append(r)
    info["load_end"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "cases": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
