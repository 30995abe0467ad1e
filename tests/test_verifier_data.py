import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import common as verify_data
from common import MATH_SYSTEM_PROMPT, Verifier, extract_boxed, format_prompt, load_rows, strip_think_prefix

TIMEOUT = 1
BOUND_S = 3 * TIMEOUT + 2  # wall-clock bound for one pathological item, pool restart included


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(num_workers=2, timeout_s=TIMEOUT)
    yield v
    v.close()


# ---------------------------------------------------------------------------------------------- verifier

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{1} and finally \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{a_{\boxed{3}}} end", r"a_{\boxed{3}}"),  # outermost box, not the nested one
    (r"\boxed{5} then truncated \boxed{\frac{1}{", "5"),
    (r"\boxed{}", ""),
    ("no box here", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("response, gold, reward", [
    ("3+5=8\n</think>\n\\boxed{8}", "8", 1.0),
    ("half\n</think>\nSo the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("</think>\\boxed{2\\sqrt{2}}", "2\\sqrt{2}", 1.0),
    ("</think>\\boxed{68}", "68", 1.0),
    ("</think>\\boxed{68}", 68, 1.0),  # numeric gold
    ("</think>\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("</think>\\boxed{67}", "68", 0.0),
    ("</think>\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("</think>\\boxed{2}", "2\\sqrt{2}", 0.0),  # the bare-LaTeX gold trap: 2\sqrt{2} must not read as 2
    ("</think>\\boxed{68}</think>\\boxed{5}", "68", 1.0),  # LUFFY grades the text before a 2nd </think>
    ("</think>\\boxed{5}</think>\\boxed{68}", "68", 0.0),
    ("\\boxed{68}", "68", 0.0),  # no </think>
    ("", "68", 0.0),
    ("</think>", "68", 0.0),
    ("</think> The answer is 68.", "68", 0.0),  # no \boxed{}: 0 by our format rule
    ("</think>\\boxed{}", "68", 0.0),
    ("</think>\\boxed{" + "6" * 1001 + "}", "6" * 1001, 0.0),  # over MAX_ANSWER_CHARS
    ("</think>\\boxed{\x00\x07 )(}{ ^^_ \\frac}", "68", 0.0),
])
def test_rewards(verifier, response, gold, reward):
    assert verifier([response], [gold]) == [reward]


def test_batch_keeps_order(verifier):
    responses = [f"</think>\\boxed{{{i}}}" for i in range(40)]
    golds = [str(i if i % 3 else i + 1) for i in range(40)]
    assert verifier(responses, golds) == [0.0 if i % 3 == 0 else 1.0 for i in range(40)]


def test_require_think_off_grades_text_without_think():
    v = Verifier(num_workers=0, timeout_s=TIMEOUT, require_think=False)
    assert v(["\\boxed{68}", "x</think>\\boxed{68}", "\\boxed{7}"], ["68", "68", "68"]) == [1.0, 1.0, 0.0]


def test_fast_zero_never_calls_math_verify(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("math-verify was called")
    monkeypatch.setattr(verify_data, "parse", boom)
    v = Verifier(num_workers=0)
    assert v(["", "\\boxed{1}", "</think> 1", "</think>\\boxed{ }", "</think>\\boxed{" + "1" * 5000 + "}"],
             ["1"] * 5) == [0.0] * 5


@pytest.mark.parametrize("timeout_s", [2.0, 0.5])
def test_float_timeout_still_grades(timeout_s):
    # math-verify hands its timeout to signal.alarm, which rejects floats; math-verify swallows that
    # error and returns "no answer", so a float passed through would silently make every reward 0
    v = Verifier(num_workers=0, timeout_s=timeout_s)
    assert v(["</think>\\boxed{\\frac{1}{2}}"], ["0.5"]) == [1.0]


def test_mismatched_lengths(verifier):
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        verifier(["a", "b"], ["1"])


@pytest.mark.parametrize("answer", [
    "9^{9^{9^{9^{9}}}}",
    "".join("\\frac{1}{1+" for _ in range(60)) + "1" + "}" * 60,
    "{" * 400 + "1" + "}" * 400,
])
def test_pathological_is_bounded_and_verifier_recovers(verifier, answer):
    start = time.time()
    assert verifier(["</think>\\boxed{" + answer + "}", "</think>\\boxed{8}"], ["3", "8"]) == [0.0, 1.0]
    assert time.time() - start < BOUND_S
    assert verifier(["</think>\\boxed{68}"], ["68"]) == [1.0]


_real_grade = verify_data._grade


def _grade_or_hang(answer, gold, timeout):  # module level so the pool can pickle it by name
    if gold == "hang":  # stands for an input stuck in C code, where no SIGALRM can interrupt it
        time.sleep(60)
    return _real_grade(answer, gold, timeout)


def test_backstop_kills_stuck_worker_and_regrades_the_rest(monkeypatch):
    monkeypatch.setattr(verify_data, "_grade", _grade_or_hang)
    v = Verifier(num_workers=2, timeout_s=TIMEOUT)  # the lazily forked pool inherits the patch
    try:
        responses = ["</think>\\boxed{1}", "</think>\\boxed{2}", "</think>\\boxed{3}", "</think>\\boxed{4}"]
        start = time.time()
        assert v(responses, ["1", "hang", "3", "5"]) == [1.0, 0.0, 1.0, 0.0]
        assert time.time() - start < BOUND_S
        start = time.time()
        assert v(responses[:1], ["1"]) == [1.0]
        assert time.time() - start < 2
    finally:
        v.close()


# ---------------------------------------------------------------------------------------------- data

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_round_trip(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "1+1?", "answer": "2", "level": 3},
        {"problem": "Half of 1?", "answer": 0.5},
        {"problem": "6*7?", "answer": 42, "solution": "<think>\n6*7=42</think>\\boxed{42}"},
    ])
    assert load_rows(src) == [
        {"prompt": "1+1?", "answer": "2", "demo": None, "level": 3},
        {"prompt": "Half of 1?", "answer": "0.5", "demo": None, "level": None},
        {"prompt": "6*7?", "answer": "42", "demo": None, "level": None},
    ]
    assert load_rows(src, demo_key="solution")[2]["demo"] == "<think>\n6*7=42</think>\\boxed{42}"
    assert load_rows(src, demo_key="solution")[0]["demo"] is None


def test_json_list_and_object_with_one_list(tmp_path):
    records = [{"q": "2+2?", "meta": {"gt": "4"}}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.json").write_text(json.dumps({"version": 2, "data": records}))
    for name in ("a.json", "b.json"):
        rows = load_rows(str(tmp_path / name), prompt_key="q", answer_key="meta.gt")
        assert rows == [{"prompt": "2+2?", "answer": "4", "demo": None, "level": None}]


def test_parquet_luffy_layout(tmp_path):
    # the column layout of LUFFY's openr1.parquet: chat-message prompt and target, nested ground truth
    table = pa.Table.from_pylist([{
        "data_source": "openr1",
        "prompt": [{"content": "Be careful.", "role": "system"}, {"content": "What is 6*7?", "role": "user"}],
        "target": [{"content": "<think>\n6*7=42\n</think>\n\\boxed{42}", "role": "assistant"}],
        "ability": "math",
        "reward_model": {"ground_truth": "42", "style": "rule"},
        "extra_info": {"index": 0, "split": "default"},
    }])
    pq.write_table(table, tmp_path / "openr1.parquet")
    rows = load_rows(str(tmp_path / "openr1.parquet"), prompt_key="prompt",
                     answer_key="reward_model.ground_truth", demo_key="target", need_demo=True)
    assert rows == [{
        "prompt": [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "What is 6*7?"}],
        "answer": "42", "demo": "<think>\n6*7=42\n</think>\n\\boxed{42}", "level": None}]
    assert type(rows[0]["prompt"]) is list


GOOD = {"problem": "1+1?", "answer": "2", "target": "<think>\n2</think>\\boxed{2}"}


@pytest.mark.parametrize("bad, kwargs, message", [
    ({"problem": "1+1?"}, {}, "row 2 of train.jsonl has no field 'answer'; use --answer_key"),
    ({"problem": "1+1?", "answer": "  "}, {}, "row 2 of train.jsonl: answer field 'answer' must be a non-empty"),
    ({"problem": "1+1?", "answer": None}, {}, "row 2 of train.jsonl: answer field 'answer' must be a non-empty"),
    ({"problem": "1+1?", "answer": ["2", "3"]}, {}, "must be a non-empty string or number, not list"),
    ({"question": "1+1?", "answer": "2"}, {}, "row 2 of train.jsonl has no field 'problem'; use --prompt_key"),
    ({"problem": 12, "answer": "2"}, {}, "row 2 of train.jsonl: field 'problem' must be a non-empty string or a list"),
    ({"problem": [{"role": "user"}], "answer": "2"}, {}, "field 'problem' must be a non-empty string or a list"),
    ({"problem": "1+1?", "answer": "2"}, {"demo_key": "target", "need_demo": True},
     "row 2 of train.jsonl has no demonstration in field 'target'"),
    ({"problem": "1+1?", "answer": "2", "target": [{"role": "user", "content": "hi"}]},
     {"demo_key": "target", "need_demo": True}, "row 2 of train.jsonl has no demonstration in field 'target'"),
    ({"problem": "1+1?", "answer": "2", "target": 5}, {"demo_key": "target"},
     "row 2 of train.jsonl: demonstration field 'target' must be a string"),
    (["1+1?", "2"], {}, "row 2 of train.jsonl is not an object"),
])
def test_bad_row_messages(tmp_path, bad, kwargs, message):
    src = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError) as err:
        load_rows(src, **kwargs)
    assert message in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="data file not found: .*missing.jsonl"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "train.csv").write_text("problem,answer\n1+1?,2\n")
    with pytest.raises(ValueError, match="unsupported file type .*train.csv; use a .jsonl, .json or .parquet"):
        load_rows(str(tmp_path / "train.csv"))
    (tmp_path / "broken.jsonl").write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ValueError, match="cannot read .*broken.jsonl as jsonl: line 2 is not valid JSON"):
        load_rows(str(tmp_path / "broken.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match="cannot read .*broken.parquet as parquet"):
        load_rows(str(tmp_path / "broken.parquet"))
    (tmp_path / "dict.json").write_text(json.dumps({"a": [1], "b": [2]}))
    with pytest.raises(ValueError, match="expected a list of objects"):
        load_rows(str(tmp_path / "dict.json"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no rows"):
        load_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="need_demo|--demo_key"):
        load_rows(write_jsonl(tmp_path / "ok.jsonl", [GOOD]), need_demo=True)


def test_hub_name_offline_says_download():
    # no `datasets` package and no network here: either way the user must be told to pass a local file
    with pytest.raises(ValueError, match="Elliott/Openr1-Math-46k-8192 is not a local file .* download"):
        load_rows("Elliott/Openr1-Math-46k-8192")


# ---------------------------------------------------------------------------------------------- prompts

@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    # a Qwen-style template whose generation prompt opens the think block, like LUFFY's model
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    return tok


def test_format_prompt(tokenizer):
    user, gen = "<|user|>1+1?<|end|>\n", "<|assistant|><think>\n"
    assert format_prompt(tokenizer, "1+1?", "SYS") == "<|system|>SYS<|end|>\n" + user + gen
    assert format_prompt(tokenizer, "1+1?", None) == user + gen
    chat = [{"role": "user", "content": "1+1?"}]
    assert format_prompt(tokenizer, chat, "SYS") == "<|system|>SYS<|end|>\n" + user + gen
    own = [{"role": "system", "content": "OWN"}, {"role": "user", "content": "1+1?"}]
    assert format_prompt(tokenizer, own, "SYS") == "<|system|>OWN<|end|>\n" + user + gen
    assert chat == [{"role": "user", "content": "1+1?"}]  # the row's messages are not modified


def test_strip_think_prefix():
    assert strip_think_prefix("...<think>\n", "<think>\nstep</think>x") == "step</think>x"
    assert strip_think_prefix("...<think>\n", "<think>step</think>x") == "step</think>x"
    assert strip_think_prefix("...<think>\n", "step</think>x") == "step</think>x"
    assert strip_think_prefix("...assistant\n", "<think>\nstep</think>x") == "<think>\nstep</think>x"


def test_system_prompt_asks_for_think_and_boxed():
    assert all(tag in MATH_SYSTEM_PROMPT for tag in ("<think>", "</think>", "\\boxed{}"))
