"""One answer against its gold, in the forms a human grader accepts (docs/data-and-verifier.md).

common.Verifier batches responses, runs `_grade` in its pool of grading processes under a time bound and
turns the verdicts into rewards; this module is the work on one answer, no torch: which boxes stand (a box
the response takes back or puts before its "Final Answer" heading does not: `candidates`), how an answer is
rewritten before math-verify reads it (`normalize_answer`), the plain numbers settled without it
(`_fast_grade`), the answer forms read the way a human grader reads them (`_readings`: option letters,
yes/no, percentages, inequalities, decimal commas, a sentence in a box), and math-verify's verdict
(`_grade`). Every rule has graded cases in tests/data/verifier_cases.jsonl, verifier_study.jsonl or
tests/test_verifier.py.
"""
from __future__ import annotations

import bisect
import contextlib
import decimal
import logging
import re
import unicodedata

from math_verify import parse, verify

MAX_ANSWER_CHARS = 1000  # a longer \boxed{} is never a real final answer, and it is where parsing blows up
MAX_DISTINCT_ANSWERS = 4  # more different boxed answers than this is hedging, whatever they say
MAX_TEXT_CHARS = 2000  # an unboxed answer is looked for in the last 2,000 characters of the answer text

_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|[{}]", re.DOTALL)
_HEDGE = re.compile(r"\s(?:or|and/or)\s", re.IGNORECASE)
_ANSWER_STATEMENT = re.compile(r"\banswer\b(?:[^.\n]{0,40}?\b(?:is|are|be)\b|\W{0,3}[:=])", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n\s*\n")  # a decimal point is followed by a digit


def _last(pattern: re.Pattern, text: str, pos: int = 0) -> re.Match | None:
    """The last match of `pattern` in `text` from `pos` (matches do not overlap)."""
    m = None
    for m in pattern.finditer(text, pos):
        pass
    return m


def boxed_answers(text: str, spans: bool = False) -> list:
    """Contents of every complete top-level \\boxed{...} / \\fbox{...}, in order, braces balanced (\\{ is
    not one); an unclosed box (truncated) is skipped without hiding later ones. Linear time. spans=True:
    (start, end, content) per box."""
    stack, closed = [], []  # stack: (content start, is a box, command start); closed: (start, end, content)
    for m in _BOX_TOKENS.finditer(text):
        tok = m.group()
        if tok[-1] == "{" and tok != "\\{":  # a brace, or a box command with its brace
            stack.append((m.end(), tok != "{", m.start()))
        elif tok == "}" and stack:
            start, is_box, cmd = stack.pop()
            if is_box:
                closed.append((cmd, m.end(), text[start:m.start()]))
    out, end = [], -1
    for start, stop, content in sorted(closed):  # closed boxes nest properly: keep the outermost
        if start >= end:
            out.append((start, stop, content) if spans else content)
            end = stop
    return out


# Which boxes stand (docs/data-and-verifier.md, answer-form rules a, b, h): a box the response takes back, or one
# before its "Final Answer" heading, is not a final answer. Exactly one reading stands, so none rewards a hedge.
_RETRACTION = re.compile(r"\b(?:wait|oops|mistake|miscalculat|incorrect|wrong|correction|correcting|actually|"
                         r"recheck|recount|recomput|recalculat|redo|on reflection|on second thought)|"
                         r"\bthe correct \w+ is", re.IGNORECASE)
RETRACTION_REACH = 100  # a correction names the box it takes back right after it (characters)
_CLAUSE_END = re.compile(r"[.!?;](?=\s|$)|\n")
_FINAL_HEADING = re.compile(r"^[\W_]*final answer\b[\W_]*(?:$|:)", re.IGNORECASE | re.MULTILINE)
_RESTATED = re.compile(_ANSWER_STATEMENT.pattern + r"|\bthe correct \w+ (?:is|are)\b", re.IGNORECASE)


def standing_boxes(text: str) -> list[str]:
    """The boxed answers of `text` that stand: those after the last "Final Answer" heading that has a box
    after it, less the boxes of any sentence that a correction ("wait", "that is wrong", "the correct area
    is", ...) follows within RETRACTION_REACH characters, before the next box."""
    boxes = boxed_answers(text, spans=True)
    headings = [m.end() for m in _FINAL_HEADING.finditer(text) if boxes and m.end() <= boxes[-1][0]]
    if headings:
        boxes = [b for b in boxes if b[0] >= headings[-1]]
    clause_ends, withdrawn = [0] + [m.end() for m in _CLAUSE_END.finditer(text)], set()
    for k, (start, stop, _) in enumerate(boxes[:-1]):
        if _RETRACTION.search(text, stop, min(stop + RETRACTION_REACH, boxes[k + 1][0])):
            sentence = clause_ends[bisect.bisect_right(clause_ends, start) - 1]  # "x = \\boxed{-3} and \\boxed{3}. Wait"
            j = k
            while j >= 0 and boxes[j][0] >= sentence and j not in withdrawn:
                withdrawn.add(j)
                j -= 1
    return [c for k, (_, _, c) in enumerate(boxes) if k not in withdrawn]


def final_statement(text: str) -> int | None:
    """Where the final answer starts when a statement after the last box stands instead of the boxes
    (docs/data-and-verifier.md, rule h): after a "Final Answer" heading that follows the last box and has text after it
    (MATH's few-shot ending), or at a correction of the last box within RETRACTION_REACH that a restated
    answer ("the answer is 11", "the correct count is 11") follows. None: the boxes stand."""
    boxes = boxed_answers(text, spans=True)
    if not boxes:
        return None
    last = boxes[-1][1]
    heading = _last(_FINAL_HEADING, text, last)
    if heading and re.search(r"\w", text[heading.end():]):
        return heading.end()
    fix = _RETRACTION.search(text, last, last + RETRACTION_REACH)
    return fix.start() if fix and _RESTATED.search(text, fix.start()) else None


def _unboxed_text(text: str) -> str:
    """The text of a response without a box that stands: blank boxes dropped, cut at an unclosed box (a
    truncated generation). Read with boxed_answers' tokens, so that both read \\\\boxed{ (an escaped
    backslash, as in text JSON-escaped twice) as text, not as a box."""
    blank = {start: stop for start, stop, _ in boxed_answers(text, spans=True)}
    out, pos = [], 0
    for m in _BOX_TOKENS.finditer(text):
        if m.start() >= pos and m.group().startswith(("\\boxed", "\\fbox")):
            out.append(text[pos:m.start()])
            if m.start() not in blank:
                return "".join(out)
            pos = blank[m.start()]
    return "".join(out) + text[pos:]


# Spellings math-verify 0.9 misreads or cannot parse, rewritten before grading (tests/data/verifier_cases.jsonl)
_UNICODE_MATH = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ",
    "\u00f7": "\\div ", "\u00b1": "\\pm ", "\u2213": "\\mp ", "\u03c0": "\\pi ", "\u221e": "\\infty ",
    "\u00b0": "^\\circ ", "\u2264": "\\le ", "\u2265": "\\ge ", "\u2260": "\\ne ", "\u2205": "\\emptyset ",
    "\u222a": "\\cup ", "\u2229": "\\cap ", "\u03b8": "\\theta ", "\u03b1": "\\alpha ", "\u03b2": "\\beta ",
}
_VULGAR = {"\u00bd": (1, 2), "\u2153": (1, 3), "\u2154": (2, 3), "\u00bc": (1, 4), "\u00be": (3, 4),
           "\u2155": (1, 5), "\u2156": (2, 5), "\u2157": (3, 5), "\u2158": (4, 5), "\u2159": (1, 6),
           "\u215a": (5, 6), "\u215b": (1, 8), "\u215c": (3, 8), "\u215d": (5, 8), "\u215e": (7, 8)}
_SUPERSCRIPT = dict(zip("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207b\u207a", "0123456789-+"))
_SQRT_ARG = re.compile(r"\u221a\s*(\d+(?:\.\d+)?|[A-Za-z]|\([^()]*\)|\{)")
_SPACED_NUMBER = re.compile(r"[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?")  # 40 320: the SI's thousands separator
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:(?:\\[,;: ]|~|\{,\})\d{3})+)(?![\d])")
_DECIMAL_COMMA = re.compile(r"(\d)\{,\}(\d)")
_MIXED_SLASH = re.compile(r"(?<![\w.,/^])(-?)(\d+) (\d+)/(\d+)(?![\w.,/])")  # 1 1/2 (1\frac12 math-verify reads)
# Upright constants (ISO 80000-2 sets e, i and pi upright): math-verify reads \mathrm{e} as text and stops
# there, so that 1 - \frac{1}{\mathrm{e}} parsed as 1 and \boxed{1} equalled it. Each becomes the italic one.
UPRIGHT_CONSTANTS = ("e", "i", "\\pi")  # Euler's number, the imaginary unit, pi
UPRIGHT_COMMANDS = ("mathrm", "mathup", "mathit", "textrm", "textup", "text", "operatorname", "rm")
_CONSTANT, _COMMAND = "(" + "|".join(map(re.escape, UPRIGHT_CONSTANTS)) + ")", "|".join(UPRIGHT_COMMANDS)
_UPRIGHT = re.compile(  # \mathrm{e}, \rm e, {\rm e}, \mathrm\pi, \uppi
    r"(\{\s*)?\\(?:%s)(?:\s*\{\s*%s\s*\}|\s+%s(?![A-Za-z]))(?(1)\s*\})" % (_COMMAND, _CONSTANT, _CONSTANT)
    + r"|\\(?:%s)\s*(\\pi)(?![A-Za-z])|\\uppi(?![A-Za-z])" % _COMMAND)


def _upright(m: re.Match) -> str:
    r"""The italic constant: spaced from a letter next to it (\pi\mathrm{i} -> \pi i, not \pii); {\rm e} keeps
    its braces only as an argument (\frac{1}{\rm e}): latex2sympy reads a bare {i} as another symbol than i."""
    c = next((g for g in m.groups()[1:] if g), "\\pi")
    before, after = m.string[m.start() - 1:m.start()], m.string[m.end():m.end() + 1]
    if m.group(1) and (before.isalpha() or before in ("}", "]", "^", "_")):
        return "{" + c + "}"
    return (" " if before.isalpha() else "") + c + (" " if after.isalpha() else "")


def _mixed(m: re.Match) -> str:
    whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
    return m.group(0) if not 0 < num < den else f"{m.group(1)}{whole * den + num}/{den}"


def normalize_answer(text: str) -> str:
    """Rewrite what math-verify does not read: Unicode math, vulgar fractions, superscripts, full-width
    digits (NFKC); upright constants \\mathrm{e}, \\operatorname{i}, \\mathrm{\\pi}; thousands separators
    1\\,000 / 1{,}000 (and 40 320 as a whole answer), the decimal comma 3{,}5; \\varnothing; the mixed number
    1 1/2 (-> 3/2)."""
    if text.isascii():
        out = text
    else:
        out = _SQRT_ARG.sub(lambda m: "\\sqrt{" + m.group(1).strip("()") + "}" if m.group(1) != "{"
                            else "\\sqrt{", text)
        out = re.sub("[" + "".join(_VULGAR) + "]", lambda m: "\\frac{%d}{%d}" % _VULGAR[m.group()], out)
        out = re.sub("[" + "".join(_SUPERSCRIPT) + "]+",
                     lambda m: "^{" + "".join(_SUPERSCRIPT[c] for c in m.group()) + "}", out)
        out = "".join(_UNICODE_MATH.get(c, c) for c in out).replace("\u221a", "\\sqrt")
        out = unicodedata.normalize("NFKC", out).replace("\u00a0", " ")
    out = _UPRIGHT.sub(_upright, out) if "\\" in out else out
    out = _THOUSANDS.sub(lambda m: m.group(1) + re.sub(r"\D", "", m.group(2)), out)
    out = out.replace(" ", "") if _SPACED_NUMBER.fullmatch(out) else out  # a whole answer, never prose
    out = _DECIMAL_COMMA.sub(r"\1.\2", out)
    out = _MIXED_SLASH.sub(_mixed, out) if "/" in out else out
    return out.replace("\\varnothing", "\\emptyset")


_PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _fast_grade(answer: str, gold: str) -> bool | None:
    """Verdict on plain integers and decimals without math-verify, None when unsure; agrees with it
    wherever it answers (scripts/verifier_agreement.py --fast). It rounds floats to 6 places: decimals
    closer than 2e-6 but unequal, or of over 12 significant digits, go to math-verify."""
    a, g = answer.strip(), gold.strip()
    if not (_PLAIN_NUMBER.fullmatch(a) and _PLAIN_NUMBER.fullmatch(g)):
        return None
    if "." not in a and "." not in g:
        return int(a) == int(g)
    x, y = decimal.Decimal(a), decimal.Decimal(g)
    if max(len(x.normalize().as_tuple().digits), len(y.normalize().as_tuple().digits)) > 12:
        return None
    if x == y:
        return True
    return False if abs(x - y) > decimal.Decimal("2e-6") else None


# Answer forms math-verify grades otherwise than a human grader (docs/data-and-verifier.md, rules c-f, i-j)
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")
_CHOICE = re.compile(r"\(?([A-E])\)?|\(([A-E])\)\s*(.+)|([A-E])[.:]\s+(.+)", re.DOTALL)
_CHOICE_STATEMENT = re.compile(_ANSWER_STATEMENT.pattern.replace(r"\banswer\b", r"\b(?:answer|option|choice)\b"),
                               re.IGNORECASE)  # "the answer is (C)", "the correct option is (B)", "Answer: C"
_YES_NO = re.compile(r"(yes|no)(?:\s*[,.;:!]|$)", re.IGNORECASE)
_PERCENT = re.compile(r"(.+?)(?:\\[,;:! ]|\s)*(?:\\?%|\\text\s*\{\s*(?:\\?%|percent)\s*\})", re.DOTALL)
_RELATION = re.compile(r"\\(?:le|ge|leq|geq|lt|gt|leqslant|geqslant)(?![a-zA-Z])|<|>")
_OR = re.compile(r"\\text\s*\{\s*or\s*\}|\\(?:lor|vee)(?![a-zA-Z])|\bor\b")
_UPPER = {"<": ")", "\\lt": ")", "\\le": "]", "\\leq": "]", "\\leqslant": "]"}  # x < b: (.., b); x \le b: (.., b]
_LOWER = {">": "(", "\\gt": "(", "\\ge": "[", "\\geq": "[", "\\geqslant": "["}
_FORMULA = re.compile(r"\$\$?([^$]+)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)  # $..$, $$..$$, \(..\), \[..\]
_COMMA_DECIMAL = re.compile(r"[+-]?\d+,(?!\d{3}$)\d+")  # 1,22 3,5 1000,99; not 1,000 (a thousands separator)
_LIST = re.compile(r"[,;()\[\]]|\\[{}]|\\cup\b")  # what makes an answer a pair, a set, an interval or a list
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_QUALIFIED = re.compile(r"\b(?:not|no|never|none|nor|least|most|more|less|fewer|than|over|under|between|or|except)\b",
                        re.IGNORECASE)  # "not 17", "at least 17", "between 3 and 5": the number is not the answer


def _unwrap(text: str) -> str:
    return _WRAPPER.sub(lambda m: m.group(1), text).strip().strip("$").strip()


def _stated_choice(text: str) -> str | None:
    """(c) The option letter an unboxed answer names: after its last "the answer is" / "the correct option
    is" / "Answer:", to the end of that sentence, or the whole text ("(C)")."""
    stated = _last(_CHOICE_STATEMENT, text)
    if stated:
        end = _SENTENCE_END.search(text, stated.end())
        text = text[stated.end():end.start() if end else len(text)]
    return _choice(text.strip(" *."))


def _choice(text: str) -> str | None:
    """The option letter of a multiple-choice answer: C, (C), \\textbf{(C) } 12, C: 12; None otherwise (or
    when a second option letter follows: a hedge)."""
    m = _CHOICE.fullmatch(_unwrap(text))
    if not m or re.search(r"\([A-E]\)|\b[A-E]\b", m.group(3) or m.group(5) or ""):
        return None
    return m.group(1) or m.group(2) or m.group(4)


def _interval(part: str) -> str | None:
    """x < b, x \\ge a, a \\le x < b (one variable) as an interval; None for anything else."""
    sides = [t.strip() for t in _RELATION.split(part)]
    ops = [o.strip() for o in _RELATION.findall(part)]
    var = re.compile(r"[a-zA-Z]")
    if len(ops) == 1 and var.fullmatch(sides[0]) and sides[1]:
        return (f"(-\\infty, {sides[1]}{_UPPER[ops[0]]}" if ops[0] in _UPPER
                else f"{_LOWER[ops[0]]}{sides[1]}, \\infty)")
    if len(ops) == 2 and var.fullmatch(sides[1]) and sides[0] and sides[2]:
        if ops[0] in _UPPER and ops[1] in _UPPER:  # a < x \le b
            return f"{'(' if _UPPER[ops[0]] == ')' else '['}{sides[0]}, {sides[2]}{_UPPER[ops[1]]}"
        if ops[0] in _LOWER and ops[1] in _LOWER:  # b > x \ge a
            return f"{'(' if _LOWER[ops[1]] == '(' else '['}{sides[2]}, {sides[0]}{')' if _LOWER[ops[0]] == '(' else ']'}"
    return None


def _as_interval(answer: str, gold: str) -> tuple[str, str] | None:
    """(f) For a gold without an inequality: one-variable inequalities as the interval or union they describe."""
    if _RELATION.search(answer) and not _RELATION.search(gold):
        parts = [_interval(p) for p in _OR.split(answer)]
        if all(parts):
            return " \\cup ".join(parts), gold
    return None


def _decimal_comma(answer: str, gold: str) -> tuple[str, str] | None:
    """(i) A whole answer or gold 1,22 (a comma not followed by exactly three digits) has a decimal comma
    when the other side is a single number, nothing a pair, set or list has; None otherwise."""
    if _COMMA_DECIMAL.fullmatch(answer) and not _LIST.search(gold):
        return answer.replace(",", "."), gold
    if _COMMA_DECIMAL.fullmatch(gold) and not _LIST.search(answer):
        return answer, gold.replace(",", ".")
    return None


def _sentence_number(answer: str) -> str | None:
    r"""(j) The one number of a box that holds a sentence (\text{There are } 17 \text{ apples}, \text{There
    are 17 apples.}); None for a box of no sentence, of no or several numbers, or one that qualifies it."""
    words = " ".join(_WRAPPER.findall(answer))
    numbers = [p.strip() for p in _WRAPPER.split(answer)[::2] if p.strip()] + _NUMBER.findall(words)
    if len(numbers) == 1 and len(re.findall(r"[A-Za-z]{2,}", words)) > 1 and not _QUALIFIED.search(words):
        return numbers[0]
    return None


def _readings(kind: str, answer: str, gold: str) -> list[tuple[str, str]] | bool:
    """The (answer, gold) pairs to grade, any of which equal is right, or the verdict itself."""
    if kind == "text":  # an unboxed final answer: its option letter (c), or its last formula read as a box (f, i)
        letter, gold_letter = _stated_choice(answer), _choice(gold)
        if letter and gold_letter:
            return letter == gold_letter
        formula = _last(_FORMULA, answer)
        formula = formula and next(g for g in formula.groups() if g).strip()
        read = formula and (_as_interval(formula, gold) or _decimal_comma(formula, gold))
        comma = [(answer, gold.replace(",", "."))] if _COMMA_DECIMAL.fullmatch(gold) else []  # (i) either reading
        return [(answer, gold)] + comma + ([("$" + read[0] + "$", read[1])] if read else [])
    gold_letter = _choice(gold)
    if gold_letter and _choice(answer):  # (c) a choice names its option by the letter
        return _choice(answer) == gold_letter
    yes_no = _YES_NO.fullmatch(_unwrap(gold))
    said = _YES_NO.match(_unwrap(answer))
    if yes_no and said:  # (d) "No, it is not possible." answers a yes/no question with its first word
        return said.group(1).lower() == yes_no.group(1).lower()
    pct_gold, pct = _PERCENT.fullmatch(gold), _PERCENT.fullmatch(answer)
    if pct_gold:  # (e) a percentage gold: the answer's number is read in percent (25 or 25%, not 0.25)
        return [(pct.group(1) if pct else answer, pct_gold.group(1))]
    if pct:  # (e) 25% for the gold 25 (a percent asked) or 0.25 (a fraction asked)
        x = pct.group(1).strip()
        hundredth = (str(decimal.Decimal(x) / 100) if _PLAIN_NUMBER.fullmatch(x) else "\\frac{" + x + "}{100}")
        return [(x, gold), (hundredth, gold)]
    read = _as_interval(answer, gold) or _decimal_comma(answer, gold)  # (f) inequalities, (i) a decimal comma
    if read:
        return [read]
    number = _sentence_number(answer)  # (j) a sentence in a box is graded by its number
    return [(number or answer, gold)]


def candidates(response: str, require_think: bool = True) -> tuple[str, list[str]] | None:
    """What a response offers as its final answer: ("boxed", the different boxed answers that stand) or
    ("text", [the answer text without a box]), normalised; None when it scores 0 without grading: no
    `</think>` (when required), more than MAX_DISTINCT_ANSWERS boxes, a box over MAX_ANSWER_CHARS, a hedge."""
    if "</think>" in response:
        text = response.split("</think>", 2)[1]
    elif require_think:
        return None
    else:
        text = response
    boxes = list(dict.fromkeys(normalize_answer(b.strip()) for b in boxed_answers(text) if b.strip()))
    if boxes:
        if len(boxes) > MAX_DISTINCT_ANSWERS or any(len(b) > MAX_ANSWER_CHARS for b in boxes):
            return None
        restated = final_statement(text)  # (h) a final answer stated after the last box stands instead
        if restated is None:
            boxes = list(dict.fromkeys(normalize_answer(b.strip()) for b in standing_boxes(text) if b.strip()))
            return ("boxed", boxes) if boxes else None
        text = text[restated:]
    text = _unboxed_text(text).strip()
    if len(text) > MAX_TEXT_CHARS:  # the final answer is at the end; start the tail at a line break
        tail = text[-MAX_TEXT_CHARS:]
        text = tail[tail.index("\n") + 1:] if "\n" in tail else tail
    statement = _last(_ANSWER_STATEMENT, text)  # the last "the answer is ..." / "Answer: ..."
    if statement is not None:  # grade that sentence: a check after it must not be read as the answer
        end = _SENTENCE_END.search(text, statement.end())
        text = text[statement.start():end.start() + 1 if end else len(text)]
        if _HEDGE.search(text):  # "the answer is 5 or 6": math-verify would take the 5
            return None
    return ("text", [normalize_answer(text)]) if text else None


def _grade(kind: str, answer: str, gold: str, timeout: int) -> tuple[bool, str]:
    """math-verify on one candidate: (equals the gold, the text it extracted). kind "boxed": one box's
    content; "text": answer text without a box, from which math-verify extracts the answer (as LUFFY)."""
    # The gold must be wrapped in math delimiters: bare LaTeX golds are misread (2\sqrt{2} parses as 2).
    gold_parsed = parse("$" + gold + "$", parsing_timeout=timeout)
    pred = parse("\\boxed{" + answer + "}" if kind == "boxed" else answer, parsing_timeout=timeout)
    # Never str()/repr() a parsed expression: on deeply nested input that takes minutes, outside any timeout.
    extracted = pred[-1] if pred and isinstance(pred[-1], str) else ""
    ok = bool(gold_parsed) and bool(pred) and verify(gold_parsed, pred, timeout_seconds=timeout)
    return bool(ok), extracted


class _ShortLog(logging.Filter):
    """math-verify logs each timeout with the whole expression it gave up on (thousands of characters
    from a runaway answer): keep the line, cut to its first 160 characters."""

    def filter(self, record):
        text = record.getMessage()
        if len(text) > 160:
            record.msg, record.args = f"{text[:160]}... ({len(text):,} characters)", ()
        return True


for _name in ("math_verify.parser", "math_verify.grader", "math_verify.metric"):
    logging.getLogger(_name).addFilter(_ShortLog())


def warm_up_math_verify(timeout: int):
    """One grade of an interval, a set and a radical: math-verify's first in a process can take seconds."""
    for answer, gold in (("[1, 5)", "[1,5)"), ("\\{1, 2\\}", "\\{2,1\\}"), ("2\\sqrt{2}", "\\sqrt{8}")):
        with contextlib.suppress(Exception):
            _grade("boxed", answer, gold, timeout)
