"""How often the verifier agrees with the human grades of a graded case set, next to plain math-verify
(the whole response, the gold wrapped in $...$), plus two checks of the fast path: its agreement with
math-verify on generated pairs of plain numbers, and the grading speed.

    python scripts/verifier_agreement.py              # tests/data/verifier_cases.jsonl, as in docs/data-and-verifier.md
    python scripts/verifier_agreement.py --study      # tests/data/verifier_study.jsonl (R1-style responses)
    python scripts/verifier_agreement.py --verbose    # and every case where a grader disagrees
    python scripts/verifier_agreement.py --fast       # fast path vs math-verify, and items per second

Both graders run with the same 2-second math-verify timeouts and the same hard bound per item.
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import answers  # noqa: E402
import common  # noqa: E402
from math_verify import parse, verify  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")
CASES = os.path.join(DATA, "verifier_cases.jsonl")  # written to pin down fixed weaknesses
STUDY = os.path.join(DATA, "verifier_study.jsonl")  # R1-style responses per kind of answer
TIMEOUT = 2


def load_cases(path: str = CASES):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def plain_math_verify(response: str, gold: str) -> float:
    """math-verify used directly: its own extraction on the whole response."""
    gold_parsed = parse("$" + gold + "$", parsing_timeout=TIMEOUT)
    pred = parse(response, parsing_timeout=TIMEOUT)
    return float(bool(gold_parsed) and bool(pred) and verify(gold_parsed, pred, timeout_seconds=TIMEOUT))


def _ignore_ctrl_c():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers.warm_up_math_verify(common.WORKER_START_S)  # as our workers do (a first interval is slow)


def grade_plain(cases) -> list[float]:
    """Plain math-verify in a process pool, each item bounded like ours (a stuck item scores 0)."""
    out = []
    ctx = mp.get_context("forkserver")
    pool = ctx.Pool(1, initializer=_ignore_ctrl_c)  # a worker that dies at start would time every item out
    for c in cases:
        try:
            out.append(pool.apply_async(plain_math_verify, (c["response"], c["gold"])).get(3 * TIMEOUT))
        except mp.TimeoutError:
            out.append(0.0)
            _kill(pool)
            pool = ctx.Pool(1, initializer=_ignore_ctrl_c)
    _kill(pool)
    return out


def _kill(pool):
    """Pool.terminate with SIGKILL: the workers come from the verifier's fork server, which ignores SIGTERM (as
    its children do: common.Verifier._spawn_fork_server), so a plain terminate waited forever on a timed-out one."""
    for worker in pool._pool:
        worker.terminate = worker.kill
    pool.terminate()


def agreement(path: str, verbose: bool):
    cases = load_cases(path)
    verifier = common.Verifier(num_workers=2, timeout_s=TIMEOUT)
    ours = verifier([c["response"] for c in cases], [c["gold"] for c in cases])
    verifier.close()
    plain = grade_plain(cases)
    if verbose:
        for c, a, b in zip(cases, ours, plain):
            if a != c["grade"] or b != c["grade"]:
                print(f"case {c['id']:3d} [{c['kind']}] {c['note']}: human {c['grade']}, ours {a:.0f}, "
                      f"plain math-verify {b:.0f}")
    print(f"\n{os.path.relpath(path)}")
    batches = sorted({c.get("batch") for c in cases} - {None})
    for batch in batches + ([None] if len(batches) != 1 else []):  # a set written in batches: each, then all
        picked = [(c, a, b) for c, a, b in zip(cases, ours, plain) if batch in (None, c.get("batch"))]
        print(f"\n{'all cases' if batch is None else f'batch {batch}'}\n\n| cases | n | ours | plain math-verify |"
              "\n|---|---|---|---|")
        kinds = list(dict.fromkeys(c["kind"] for c, _, _ in picked))
        total, agree_ours, agree_plain = Counter(), Counter(), Counter()
        for c, a, b in picked:
            total[c["kind"]] += 1
            agree_ours[c["kind"]] += a == c["grade"]
            agree_plain[c["kind"]] += b == c["grade"]
        for k in kinds:
            print(f"| {k} | {total[k]} | {agree_ours[k]} | {agree_plain[k]} |")
        n = sum(total.values())
        a, b = sum(agree_ours.values()), sum(agree_plain.values())
        print(f"| all | {n} | {a} ({a / n:.0%}) | {b} ({b / n:.0%}) |")


def random_number_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Plain integers and decimals, equal, different, and closer than math-verify's 6-place rounding."""
    rng, pairs = random.Random(seed), []
    for _ in range(n):
        kind = rng.randrange(6)
        x = rng.choice([rng.randrange(10), rng.randrange(10**6), rng.randrange(10**20)]) * rng.choice([1, -1])
        if kind == 0:  # integers, equal or off by a little
            pairs.append((str(x), str(x + rng.choice([0, 0, 1, -1, 10]))))
        elif kind == 1:  # leading zeros and signs
            pairs.append(("+" + str(abs(x)) if rng.random() < 0.5 else "0" + str(abs(x)), str(abs(x))))
        elif kind == 2:  # an integer written as a decimal
            pairs.append((f"{x}.{'0' * rng.randrange(1, 4)}", str(x)))
        else:  # decimals: equal, trailing zeros, or different by 1e-9 .. 1
            d = round(rng.uniform(-1000, 1000), rng.randrange(1, 9))
            delta = rng.choice([0, 0, 1e-9, 1e-7, 5e-7, 1e-6, 3e-6, 1e-5, 0.01, 1])
            pairs.append((f"{d:.{rng.randrange(1, 10)}f}", f"{d + delta:.{rng.randrange(1, 10)}f}"))
    return pairs


def fast_path(n: int):
    pairs = random_number_pairs(n)
    decided = agree = 0
    for a, g in pairs:
        fast = answers._fast_grade(a, g)
        if fast is not None:
            decided += 1
            agree += fast == answers._grade("boxed", a, g, TIMEOUT)[0]
    print(f"fast path: {len(pairs)} generated pairs of plain numbers, decided {decided} without math-verify, "
          f"agreed with math-verify on {agree} of those")

    cases = {"integer answers": ([f"Adding them up.\n</think>\nThe sum is \\boxed{{{i % 37}}}." for i in range(512)],
                                 [str((i * 7) % 37) for i in range(512)]),
             "fractions, which go to math-verify": (
                 [f"So.\n</think>\n\\boxed{{\\frac{{{i % 7 + 1}}}{{{i % 5 + 2}}}}}" for i in range(256)],
                 [f"{(i * 3) % 7 + 1}/{i % 5 + 2}" for i in range(256)])}
    verifier, slow = (cls(num_workers=2, timeout_s=TIMEOUT) for cls in (common.Verifier, WithoutFastPath))
    for v in (verifier, slow):
        v.start()
        v(*(x[:8] for x in cases["integer answers"]))  # warm
    for case, (responses, golds) in cases.items():
        methods = {"ours (fast path)": lambda: verifier(responses, golds),
                   "ours without the fast path": lambda: slow(responses, golds),
                   "plain math-verify, main thread": lambda: [plain_math_verify(r, g) for r, g in zip(responses, golds)]}
        rates = {name: [] for name in methods}
        for _ in range(3):  # interleaved, so that a noisy machine slows every method alike
            for name, fn in methods.items():
                start = time.perf_counter()
                fn()
                rates[name].append(len(responses) / (time.perf_counter() - start))
        for name, r in rates.items():
            print(f"{len(responses)} {case}, {name}: {statistics.median(r):,.0f} items/s (median of 3; "
                  f"{min(r):,.0f}-{max(r):,.0f})")
    verifier.close()
    slow.close()


class WithoutFastPath(common.Verifier):
    """The verifier with every answer sent to math-verify: what the fast path saves."""

    def fast_grade(self, answer: str, gold: str) -> None:
        return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="store_true", help="grade tests/data/verifier_study.jsonl")
    parser.add_argument("--cases", default=None, help="a graded case set (.jsonl) of your own")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--pairs", type=int, default=3000)
    args = parser.parse_args()
    if args.fast:
        fast_path(args.pairs)
    else:
        agreement(args.cases or (STUDY if args.study else CASES), args.verbose)
