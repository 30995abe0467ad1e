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
