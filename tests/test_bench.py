"""bench/gpu_paper.py's arithmetic helpers against numbers worked out by hand (the tables themselves are
arithmetic on stated inputs; nothing here is timed)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_paper", os.path.join(ROOT, "bench", "gpu_paper.py"))
gpu_paper = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_paper)

TINY = dict(vocab=10, hidden=4, intermediate=6, layers=2, heads=2, kv_heads=1, head_dim=2, tied=False)


def test_param_count_by_hand():
    # a layer: q 4x4+4, k 4x2+2, v 4x2+2, o 4x4 = 56; MLP 3x4x6 = 72; norms 2x4 = 8 -> 136
    # total: 2 x 136 + embed 40 + head 40 + final norm 4 = 356; matmuls: 2 x 136 + head 40 = 312
    assert gpu_paper.param_count(TINY) == {"total": 356, "matmul": 312}
    assert gpu_paper.param_count({**TINY, "tied": True})["total"] == 316


def test_qwen25_7b_matches_its_published_size():
    assert gpu_paper.param_count(gpu_paper.QWEN25_MATH_7B)["total"] == 7_615_616_512  # "7.62B"


def test_kv_bytes_and_flops_by_hand():
    assert gpu_paper.kv_bytes_per_token(TINY) == 2 * 2 * 1 * 2 * 2  # K and V, 2 layers, 1 head of 2, bf16
    # forward: 2 x 312 + 4 x 2 layers x 2 heads x 2 dims x 10 context = 624 + 320
    assert gpu_paper.train_flops_per_token(TINY, context=10, passes=1) == 944
    assert gpu_paper.train_flops_per_token(TINY, context=10, passes=5) == 5 * 944


def test_padding_factor():
    lengths = [1, 3, 2, 2]
    assert gpu_paper.padding_factor(lengths, micro_batch=1) == 1.0
    assert gpu_paper.padding_factor(lengths, micro_batch=4) == pytest.approx(4 * 3 / 8)
    equal = [5] * 8
    assert gpu_paper.padding_factor(equal, micro_batch=4) == 1.0


def test_draw_lengths_respects_the_cap_and_mean():
    xs = gpu_paper.draw_lengths(20000, mean=100, cap=10**9, seed=0)
    assert abs(sum(xs) / len(xs) - 100) < 3
    assert max(gpu_paper.draw_lengths(1000, mean=100, cap=150, seed=0)) == 150
