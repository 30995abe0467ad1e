import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import stratum_steps  # noqa: E402


def _record(problem, response, reward, level=3):
    return {"prompt": f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n<think>\n",
            "response": response, "reward": reward, "level": level}


def test_a_right_answer_from_a_wrong_line_is_graded_but_not_counted_with_right_steps():
    records = [
        _record("5*5+2+6=?", "5*4=25\n25+2=27\n27+6=33\n</think>\n\\boxed{33}", 1.0),  # the lab's 5*5 artifact
        _record("5*5+2+6=?", "5*5=25\n25+2=27\n27+6=33\n</think>\n\\boxed{33}", 1.0),  # right steps
        _record("5*5+2+6=?", "5*1=5\n5+2=7\n7+6=13\n</think>\n\\boxed{13}", 0.0),  # the base's habit
        _record("2+6+6*3=?", "6*3=18\n18+2=20\n20+6=26\n</think>\n\\boxed{26}", 1.0, level=4),  # the unseen fact
        _record("2+6+1=?", "2+6=8\n8+1=9\n</think>\n\\boxed{9}", 1.0, level=1),  # levels 1-2 are left out
    ]
    got = stratum_steps.score(records)
    assert got["5*5"] == {"n": 3, "pass": 2 / 3, "right_steps": 1 / 3}
    assert got["needle"] == got["5*5"]
    assert got["generalisation"] == {"n": 1, "pass": 1.0, "right_steps": 1.0}  # 6*3 is its own stratum here
    assert "moderate" not in got and set(got) == {"5*5", "needle", "6*3", "generalisation"}
