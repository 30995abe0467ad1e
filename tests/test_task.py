"""The embedded task: tokenizer round trip, problems, demonstrations and the held-out split."""
from transformers import AutoTokenizer

import common


def test_tokenizer_survives_save_and_reload(tmp_path):
    tok = common.build_tiny_tokenizer()
    common.tiny_model_config(tok).save_pretrained(tmp_path)  # a Qwen2 config beside it, as in a model dir
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    row = common.make_task(1, seed=3, levels=(4,))[0]
    prompt = common.format_prompt(tok, row["problem"], "Think, then answer.")
    assert prompt == common.format_prompt(again, row["problem"], "Think, then answer.")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    for text in (prompt, row["demo"] + "<|im_end|>", "any other text: ünïcode 123"):
        assert tok(text)["input_ids"] == again(text)["input_ids"], text
    ids = again(row["demo"], add_special_tokens=False)["input_ids"]
    assert again.decode(ids + [again.eos_token_id], skip_special_tokens=True) == row["demo"]  # </think> kept
    assert again.eos_token == "<|im_end|>" and again.pad_token == "<|endoftext|>"
    assert len(again(row["demo"])["input_ids"]) < 64  # short enough for CPU training


def test_problems_and_demonstrations_are_right():
    rows = common.make_task(50, seed=0)
    assert sorted({r["level"] for r in rows}) == [1, 2, 3, 4] and len(rows) == 200
    verifier = common.Verifier(num_workers=0)
    for r in rows:
        terms = [int(t) for t in r["problem"].removesuffix("=?").split("+")]
        assert len(terms) == r["level"] + 2 and int(r["answer"]) == sum(terms)
        steps = r["demo"].split("</think>")[0].strip().splitlines()
        assert len(steps) == len(terms) - 1 and steps[-1].endswith(f"={r['answer']}")
    assert verifier([r["demo"] for r in rows], [r["answer"] for r in rows]) == [1.0] * len(rows)
    assert verifier([rows[0]["demo"]], [str(int(rows[0]["answer"]) + 1)]) == [0.0]


def test_held_out_problems_never_train():
    held_out = common.make_task(common.HELDOUT_PER_LEVEL, common.EVAL_SEED)
    train = common.make_task(500, seed=0, exclude={r["problem"] for r in held_out})
    assert not {r["problem"] for r in held_out} & {r["problem"] for r in train}
    assert len({r["problem"] for r in train}) == len(train)  # distinct
    assert common.make_task(5, seed=7) == common.make_task(5, seed=7)  # deterministic
    assert common.make_task(3, seed=7, levels=(2,)) == common.make_task(5, seed=7, levels=(2,))[:3]  # prefix
