"""Data files: loading, validation of every row, prompts."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import MATH_SYSTEM_PROMPT, format_prompt, load_rows, strip_think_prefix


# ---------------------------------------------------------------------------------------------- data

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_round_trip_and_numeric_answers(tmp_path, capsys):
    src = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "1+1?", "answer": "2", "level": 3},
        {"problem": "Half of 1?", "answer": 0.5},
        {"problem": "6*7?", "answer": 42, "solution": "<think>\n6*7=42</think>\\boxed{42}"},
        {"problem": "Tiny?", "answer": 1e-05},
    ])
    assert load_rows(src) == [
        {"prompt": "1+1?", "answer": "2", "demo": None, "level": 3},
        {"prompt": "Half of 1?", "answer": "0.5", "demo": None, "level": None},
        {"prompt": "6*7?", "answer": "42", "demo": None, "level": None},
        {"prompt": "Tiny?", "answer": "0.00001", "demo": None, "level": None},  # never an exponent
    ]
    assert "train.jsonl: 3 of 4 answers were JSON numbers; converted to text" in capsys.readouterr().out
    # a trainer reads only the fields it uses: no answer for SFT, a demonstration for every row
    with pytest.raises(ValueError, match="rows are bad") as err:
        load_rows(src, answer_key=None, demo_key="solution")
    assert "row 1: no field 'solution'; this trainer learns from a demonstration per row" in str(err.value)
    rows = load_rows(write_jsonl(tmp_path / "demos.jsonl", [{"problem": "6*7?", "solution": "42"}]),
                     answer_key=None, demo_key="solution")
    assert rows == [{"prompt": "6*7?", "answer": None, "demo": "42", "level": None}]


def test_json_list_and_object_with_one_list(tmp_path):
    records = [{"q": "2+2?", "meta": {"gt": "4"}}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.json").write_text(json.dumps({"version": 2, "data": records}))
    for name in ("a.json", "b.json"):
        rows = load_rows(str(tmp_path / name), prompt_key="q", answer_key="meta.gt")
        assert rows == [{"prompt": "2+2?", "answer": "4", "demo": None, "level": None}]


LUFFY_ROW = {
    "data_source": "openr1",
    "prompt": [{"content": "Be careful.", "role": "system"}, {"content": "What is 6*7?", "role": "user"}],
    "target": [{"content": "<think>\n6*7=42\n</think>\n\\boxed{42}", "role": "assistant"}],
    "ability": "math",
    "reward_model": {"ground_truth": "42", "style": "rule"},
    "extra_info": {"index": 0, "split": "default"},
}


@pytest.fixture
def openr1(tmp_path):
    """A file with the column layout of LUFFY's openr1.parquet: chat-message prompt and target, nested
    ground truth (pyarrow gives these back as lists and dicts)."""
    pq.write_table(pa.Table.from_pylist([LUFFY_ROW, LUFFY_ROW]), tmp_path / "openr1.parquet")
    return str(tmp_path / "openr1.parquet")


def test_parquet_luffy_layout(openr1):
    rows = load_rows(openr1, prompt_key="prompt", answer_key="reward_model.ground_truth", demo_key="target")
    assert rows[0] == {
        "prompt": [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "What is 6*7?"}],
        "answer": "42", "demo": "<think>\n6*7=42\n</think>\n\\boxed{42}", "level": None}
    assert type(rows[0]["prompt"]) is list


@pytest.mark.parametrize("kwargs, message", [
    ({"answer_key": "reward_model.groundtruth"},  # a typo in a nested key: the keys at that level
     "no row has the field 'reward_model.groundtruth' (--answer_key): the rows' 'reward_model' has "
     "ground_truth, style; did you mean --answer_key reward_model.ground_truth?"),
    ({"answer_key": "reward_model.gt"},  # an abbreviation: the field it abbreviates, not the parent
     "no row has the field 'reward_model.gt' (--answer_key): the rows' 'reward_model' has "
     "ground_truth, style; did you mean --answer_key reward_model.ground_truth?"),
    ({"answer_key": "reward_model.truth"},  # a part of the name
     "no row has the field 'reward_model.truth' (--answer_key): the rows' 'reward_model' has "
     "ground_truth, style; did you mean --answer_key reward_model.ground_truth?"),
    ({"answer_key": "ground_truth"},  # the nested key given without its parent
     "no row has the field 'ground_truth' (--answer_key): the rows have data_source, prompt, target, ability, "
     "reward_model, extra_info; did you mean --answer_key reward_model.ground_truth?"),
    ({"answer_key": "answer"},  # nothing close: list the fields and name the flag
     "no row has the field 'answer' (--answer_key): the rows have data_source, prompt, target, ability, "
     "reward_model, extra_info; name the field with --answer_key"),
    ({"answer_key": "ability.value"},
     "no row has the field 'ability.value' (--answer_key): 'ability' is str, not an object with fields; name "
     "the field with --answer_key"),
    ({"prompt_key": "problem"}, "no row has the field 'problem' (--prompt_key): the rows have data_source, "
     "prompt, target, ability, reward_model, extra_info; did you mean --prompt_key prompt?"),
    ({"demo_key": "demo"}, "no row has the field 'demo' (--demo_key): the rows have data_source, prompt, target, "
     "ability, reward_model, extra_info; did you mean --demo_key target?"),  # the field with an assistant turn
])
def test_a_key_no_row_has(openr1, kwargs, message):
    keys = {"prompt_key": "prompt", "answer_key": "reward_model.ground_truth", **kwargs}
    with pytest.raises(ValueError) as err:
        load_rows(openr1, **keys)
    assert str(err.value) == "openr1.parquet: " + message


GOOD = {"problem": "1+1?", "answer": "2", "target": "<think>\n2</think>\\boxed{2}"}


@pytest.mark.parametrize("bad, kwargs, message", [
    ({"problem": "1+1?"}, {}, "row 2: no field 'answer'; fill in the gold answer or drop the row"),
    ({"problem": "1+1?", "answer": "  "}, {}, "row 2: 'answer' is empty; fill in the gold answer or drop the row"),
    ({"problem": "1+1?", "answer": None}, {}, "row 2: 'answer' is empty (null); fill in the gold answer"),
    ({"problem": "1+1?", "answer": True}, {}, "row 2: 'answer' is bool True, not an answer; write the gold answer"),
    ({"problem": "1+1?", "answer": float("nan")}, {}, "row 2: 'answer' is float nan, not an answer"),
    ({"problem": "1+1?", "answer": ["2", "3"]}, {},
     "row 2: 'answer' is list ['2', '3']; the gold answer must be one string (several values go in one string"),
    ({"question": "1+1?", "answer": "2"}, {}, "row 2: no field 'problem'; fill in the problem or drop the row"),
    ({"problem": 12, "answer": "2"}, {}, "row 2: 'problem' is int 12; the problem must be a string or a list of"),
    ({"problem": [{"role": "user"}], "answer": "2"}, {}, "row 2: 'problem' is list [{'role': 'user'}]; the problem"),
    ({"problem": "1+1?", "answer": "2"}, {"demo_key": "target"},
     "row 2: no field 'target'; this trainer learns from a demonstration per row: fill it in or drop the row"),
    ({"problem": "1+1?", "answer": "2", "target": [{"role": "user", "content": "hi"}]}, {"demo_key": "target"},
     "row 2: 'target' has no assistant message; the demonstration is the assistant turn"),
    ({"problem": "1+1?", "answer": "2", "target": 5}, {"demo_key": "target"},
     "row 2: 'target' is int 5; the demonstration must be a string or a list of chat messages"),
    (["1+1?", "2"], {}, "row 2: is list ['1+1?', '2'], not an object with named fields; fix or drop the row"),
])
def test_bad_row_messages(tmp_path, bad, kwargs, message):
    src = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError) as err:
        load_rows(src, **kwargs)
    assert str(err.value).startswith("train.jsonl: 1 of 3 rows are bad; fix or drop them:\n  row 2: ")
    assert message in str(err.value)


def test_every_bad_row_is_counted_and_the_first_ones_listed(tmp_path):
    rows = [GOOD] * 3 + [{"problem": "1+1?"}] * 20 + [{"problem": "", "answer": ""}] * 2 + [GOOD]
    with pytest.raises(ValueError) as err:
        load_rows(write_jsonl(tmp_path / "train.jsonl", rows))
    lines = str(err.value).splitlines()
    assert lines[0] == "train.jsonl: 22 of 26 rows are bad; fix or drop them:"
    assert lines[1] == "  row 4: no field 'answer'; fill in the gold answer or drop the row"
    assert len(lines) == 1 + 10 + 1 and lines[-1] == "  ... and 14 more"  # 24 problems in 22 rows


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
