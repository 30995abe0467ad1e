"""The unbiased pass@k of METHODS.md Eq. (58): common.pass_at_k by hand and against exact binomials, and
evaluate_sets' eval_pass@<k> keys (--eval_pass_k) on a scripted sampler."""
import math
from fractions import Fraction

import pytest

import common


def test_pass_at_k_by_hand():
    # n = 4 samples, c = 1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2;
    # pass@3 = 1 - C(3,3)/C(4,3) = 1 - 1/4 = 3/4; pass@4 = 1 (every draw of 4 contains the correct one)
    assert [common.pass_at_k(4, 1, k) for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-15)
    # n = 4, c = 2: pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6; n = 5, c = 2, k = 3: 1 - C(3,3)/C(5,3) = 0.9
    assert common.pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-15)
    assert common.pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)
    assert common.pass_at_k(4, 0, 4) == 0.0 and common.pass_at_k(4, 4, 1) == 1.0
    assert common.pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k: no draw of 2 misses every correct sample


def test_pass_at_k_against_exact_binomials():
    """Every (n, c, k) with n in {1, ..., 12, 33, 64}, k in {1, 2, 4, ..., 64} <= n: the product form equals
    1 - C(n-c, k) / C(n, k) computed with exact integers (math.comb is 0 when n - c < k); pass@1 = c / n."""
    for n in [*range(1, 13), 33, 64]:
        for c in range(n + 1):
            assert common.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)
            for k in (k for k in common.PASS_K if k <= n):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert common.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    # the binomials it avoids: C(64, 32) = 1.83e18; one correct sample in 64 gives pass@32 = 1/2 exactly
    assert common.pass_at_k(64, 1, 32) == pytest.approx(0.5, abs=1e-12)


def test_evaluate_sets_logs_pass_at_k_per_set_and_level():
    """Two problems, 4 samples each: level 1 with 1 correct (pass@1 1/4, @2 1/2, @4 1), level 2 with 2 correct
    (1/2, 5/6, 1). The set: pass@1 3/8 (= eval_accuracy), pass@2 (1/2 + 5/6) / 2 = 2/3, pass@4 1; no pass@8
    (only 4 samples); without pass_k no pass@ key at all."""
    rows = [{"problem": "1+1=?", "prompt_ids": [1], "answer": "2", "level": 1, "prompt_text": ""},
            {"problem": "2+2=?", "prompt_ids": [2], "answer": "4", "level": 2, "prompt_text": ""}]
    right, wrong = "</think>\n\\boxed{%s}", "</think>\n\\boxed{0}"
    texts = {1: [wrong, right % 2, wrong, wrong], 2: [right % 4, wrong, right % 4, wrong]}

    class Scripted:
        def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None, seed=None):
            return [[common.Sample(p, [], [], t, True) for t in texts[p[0]][:n]] for p in prompts]

    sets = [common.EvalSet("toy", "toy.jsonl", 4, rows)]
    kw = dict(temperature=0.6, max_tokens=8, seed=0)
    m = common.evaluate_sets(sets, Scripted(), common.Verifier(num_workers=0), common.Dist(), pass_k=True, **kw)
    assert m["eval_accuracy_toy"] == pytest.approx(3 / 8) and m["eval_pass@1_toy"] == pytest.approx(3 / 8)
    assert m["eval_pass@2_toy"] == pytest.approx(2 / 3) and m["eval_pass@4_toy"] == pytest.approx(1.0)
    assert m["eval_pass@2_toy_level1"] == pytest.approx(0.5) and m["eval_pass@2_toy_level2"] == pytest.approx(5 / 6)
    assert "eval_pass@8_toy" not in m
    plain = common.evaluate_sets(sets, Scripted(), common.Verifier(num_workers=0), common.Dist(), **kw)
    assert not any(k.startswith("eval_pass@") for k in plain) and plain["eval_accuracy_toy"] == m["eval_accuracy_toy"]


def test_eval_pass_k_flag():
    import grpo
    assert common.parse_config(grpo.Config, ["--eval_pass_k"]).eval_pass_k is True
    assert common.parse_config(grpo.Config, []).eval_pass_k is False


def test_validation_split_holds_out_a_fixed_pick():
    """--val_rows: n rows leave the training rows (their order kept) for the set "val"; the pick is the same on
    every call (every run and seed); n outside 1..len-1 is refused in one line."""
    rows = [{"problem": str(i)} for i in range(50)]
    train, val = common.validation_split(rows, 10, "builtin")
    assert len(train) == 40 and len(val.rows) == 10 and (val.name, val.k) == ("val", 1)
    assert sorted(train + val.rows, key=lambda r: int(r["problem"])) == rows
    assert [int(r["problem"]) for r in train] == sorted(int(r["problem"]) for r in train)
    assert common.validation_split(rows, 10, "builtin")[1].rows == val.rows
    assert val.rows != rows[-10:]  # not the last rows (the built-in data are ordered by level)
    for n in (0, 50):
        with pytest.raises(SystemExit, match=f"--val_rows {n}: the training data has 50 rows"):
            common.validation_split(rows, n, "builtin")
