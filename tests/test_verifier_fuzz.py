"""The verifier on bad model output, property-based (hypothesis): random text, invalid UTF-8 after
decoding, lone surrogates, no or unclosed boxes, megabytes of text, deeply nested LaTeX, inputs that
make sympy slow, code. For every response: a reward of 0.0 or 1.0, no exception, within BOUND_S, and
the grading workers still grade afterwards.

    VERIFIER_FUZZ_EXAMPLES=500 python -m pytest -q tests/test_verifier_fuzz.py -s   # the docs' figures
"""
import os
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from answers import MAX_DISTINCT_ANSWERS
from common import Verifier

TIMEOUT = 1  # --verifier_timeout: the backstop per grading item is 3x this
# One response is at most MAX_DISTINCT_ANSWERS boxed answers plus their joined alternative, each a
# grading item bounded by the backstop, and a replaced worker per overrun; plus slack for a loaded
# machine. What it catches is an unbounded item (minutes), not a slow one.
BOUND_S = (MAX_DISTINCT_ANSWERS + 1) * (3 * TIMEOUT + 2) + 10
EXAMPLES = int(os.environ.get("VERIFIER_FUZZ_EXAMPLES", "30"))
MARKER = "/tmp/sft_rl_fusion_verifier_ran_code"  # code in an answer that ran would create it

# Pieces of adversarial answers: what sympy and math-verify's LaTeX parser find slow or deep
SLOW = ["9^{9^{9^{9^{9}}}}", "2^{2^{100000}}", "10^{10^{10^{10}}}!", "1000000!", "(1+x)^{100000}",
        "\\binom{10^{9}}{5 \\cdot 10^{8}}", "\\sum_{n=1}^{10^{10}} n^{n}", "\\int_0^{\\infty} e^{-x^{9999}} dx",
        "x^{99999999999999999999}", "\\sqrt[99999]{2^{99999}}", "1e999999", "0.\\overline{142857}",
        "\\frac{1}{0}", "\\infty - \\infty", "\\det\\begin{pmatrix}a&b\\\\c&d\\end{pmatrix}"]
CODE = ["__import__('os').system('touch %s')" % MARKER, "exec(\"open('%s','w')\")" % MARKER,
        "(lambda: __import__('os').mknod('%s'))()" % MARKER, "1+__import__('os').getpid()",
        "().__class__.__base__.__subclasses__()", "eval('2+2')", "${__import__('os')}$"]
PIECES = ["</think>", "\\boxed{", "\\fbox{", "}", "{", "\\{", "\\}", "$", "$$", "\\(", "\\)", "\\frac{", "\\sqrt{",
          "^{", "_{", "\\left(", "\\right)", "\\begin{matrix}", "\\end{matrix}", "\\\\", "&", " ", "\n", "=",
          "The answer is ", "Final Answer: ", " or ", "1", "2", "-", "0.5", "x", "\\pi", "\\infty", "%",
          "\u2212", "\u00bd", "\u221a", "\uff14", "\ufffd", "\ud800", "\udfff", "\x00", "\u202e", *SLOW, *CODE]

_piece = st.sampled_from(PIECES)
# random Unicode, lone surrogates included (what a tokenizer's decode or a bad file can hand us)
_unicode = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)
# bytes that are not UTF-8, decoded as a tokenizer does (U+FFFD) or keeping them (surrogateescape)
_bytes = st.tuples(st.binary(max_size=200), st.sampled_from(["replace", "surrogateescape", "ignore"])).map(
    lambda b: b[0].decode("utf-8", errors=b[1]))
_mixed = st.lists(st.one_of(_piece, _unicode, _bytes), max_size=40).map("".join)
# megabytes: one piece repeated (a model that never stops), with or without a box around it
_huge = st.tuples(st.one_of(_piece, _unicode.filter(bool)), st.integers(1, 2_000_000),
                  st.sampled_from(["{}", "</think>{}", "</think>\\boxed{{{}}}", "</think>\\boxed{{{}",
                                   "</think>The answer is {}"])).map(
    lambda t: t[2].format((t[0] * (t[1] // max(1, len(t[0])) + 1))[:t[1]]))
# deep nesting: n levels of one construct around an answer, closed or not
_nested = st.tuples(st.sampled_from(["\\frac{1}{1+", "{", "\\sqrt{", "^{", "\\left(", "(", "\\boxed{", "[", "9^{"]),
                    st.integers(1, 5000), st.booleans(), st.sampled_from(["1", "x", "9", ""])).map(
    lambda t: "</think>\\boxed{" + t[0] * t[1] + t[3] + ("}" * t[1] if t[2] else "") + "}")
_slow = st.lists(st.sampled_from(SLOW + CODE), min_size=1, max_size=3).map(
    lambda xs: "</think>" + " ".join("\\boxed{%s}" % x for x in xs))
_response = st.one_of(_mixed, _huge, _nested, _slow, _unicode, _bytes,
                      _mixed.map(lambda s: "</think>" + s), _unicode.map(lambda s: "</think>\\boxed{" + s + "}"))
_gold = st.one_of(st.sampled_from(["5", "\\frac{1}{2}", "2\\sqrt{2}", "x^2+1", "(1, 2)", "\\infty", "-3", "0.5"]),
                  _unicode.filter(lambda s: s.strip()), st.sampled_from(SLOW + CODE))


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(num_workers=2, timeout_s=TIMEOUT)
    v.start()
    yield v
    v.close()


@pytest.fixture(scope="module")
def seen():
    """What the fuzzing saw: printed at the end (docs/data-and-verifier.md's figures come from a longer run)."""
    record = {"examples": 0, "slowest_s": 0.0, "rewards": {0.0: 0, 1.0: 0}, "overran": 0, "chars": 0}
    yield record
    print(f"\nverifier fuzz: {record}")


def test_bad_model_output_scores_0_or_1_within_the_bound(verifier, seen):
    if os.path.exists(MARKER):
        os.remove(MARKER)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(response=_response, gold=_gold)
    @example("</think>" + "x" * 3_000_000, "5")  # megabytes without a box (also drawn, but rarely this long)
    @example("</think>\\boxed{" + "1" * 2_000_000, "1")  # an unclosed box of megabytes
    @example("</think>\\boxed{" + "\\frac{1}{1+" * 80 + "1" + "}" * 81, "5")  # deep, under the length cap
    @example("</think>\\boxed{" + "{" * 450 + "1" + "}" * 451, "1")
    @example("</think> The answer is " + "9^" * 300 + "9.", "5")  # an unboxed tower: sympy's parse_expr path
    @example("</think>\\boxed{9^{9^{9^{9^{9}}}}} \\boxed{10^{10^{10^{10}}}!}", "5")
    @example("</think>\\boxed{\ud800\udfff}", "\ud800")  # lone surrogates
    @example(b"\xff\xfe</think>\\boxed{5}\x80".decode("utf-8", "surrogateescape"), "5")
    def grade(response, gold):
        start = time.time()
        rewards = verifier([response], [gold])  # an exception fails the test with this example
        took = time.time() - start
        assert rewards in ([0.0], [1.0]), rewards
        assert took < BOUND_S, f"{took:.1f} s for one response of {len(response):,} characters"
        overran, _ = verifier.take_stats()
        seen["examples"] += 1
        seen["slowest_s"] = max(seen["slowest_s"], round(took, 2))
        seen["rewards"][rewards[0]] += 1
        seen["overran"] += overran
        seen["chars"] = max(seen["chars"], len(response))

    grade()
    assert seen["examples"] >= min(EXAMPLES, 20)
    assert not os.path.exists(MARKER), "code in a model's answer ran"
    start = time.time()  # the workers are not hung: a plain answer grades at once
    assert verifier(["</think>\\boxed{\\frac{2}{4}}", "</think>\\boxed{3}"], ["0.5", "4"]) == [1.0, 0.0]
    assert time.time() - start < BOUND_S


@pytest.mark.parametrize("answer", CODE)
def test_code_in_an_answer_or_a_gold_is_never_run(verifier, answer):
    """math-verify reads LaTeX with its own parser and hands sympy's parse_expr (which evaluates Python)
    only digits, operators and parentheses (docs/data-and-verifier.md): an answer written as code is text."""
    if os.path.exists(MARKER):
        os.remove(MARKER)
    responses = ["</think>\\boxed{%s}" % answer, "</think> The answer is %s." % answer, "</think>" + answer]
    assert verifier(responses, ["5"] * 3) == [0.0] * 3
    assert verifier(["</think>\\boxed{5}"], [answer]) == [0.0]
    assert not os.path.exists(MARKER)
