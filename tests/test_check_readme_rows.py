"""scripts/check_readme_rows.py: the tables of docs/task.md parse, and a fresh run is compared at the page's
precision (the runs themselves are not run here)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_readme_rows as rows  # noqa: E402

SAMPLE = """# Title

### Measured: every trainer on the lab's budget

Some text.

| trainer | seed | level 1 | level 2 | level 3 | level 4 | wrong steps | wall |
|---|---|---|---|---|---|---|---|
| base | | 0.616 | 0.405 | 0.000 | 0.000 | | |
| `sft.py` | 0 | 0.998 | 0.984 | 0.969 | 0.560 | 0.010 | 47 s |
| `grpo.py` | 1 | 0.945 | 0.924 | 0.000 | 0.000 | 0.000 | 69 s |
| `srft.py` | 2 | 0.991 | 0.983 | 0.621 | 0.440 | 0.033 | 93 s |

After the table.
"""


def test_parse_tables_reads_the_trainer_rows():
    found = rows.parse_tables(SAMPLE)
    assert [(r.trainer, r.seed, r.levels, r.wrong_steps) for r in found] == [
        ("sft", 0, ("0.998", "0.984", "0.969", "0.560"), "0.010"),
        ("grpo", 1, ("0.945", "0.924", "0.000", "0.000"), "0.000"),
        ("srft", 2, ("0.991", "0.983", "0.621", "0.440"), "0.033"),
    ]  # the base row (no trainer, no seed) is skipped
    assert SAMPLE.splitlines()[found[0].line - 1].startswith("| `sft.py` | 0 |")
    assert [rows.TABLES[r.table] for r in found] == ["lab"] * 3


def test_parse_tables_names_what_is_missing():
    with pytest.raises(ValueError, match="no section"):
        rows.parse_tables(SAMPLE.replace("### Measured: every trainer on the lab's budget", "### Other"))
    with pytest.raises(ValueError, match="no column level 4"):
        rows.parse_tables(SAMPLE.replace("| level 4 | wrong steps", "| L4 | wrong steps"))


def test_the_docs_page_parses():
    """docs/task.md keeps its table in a form this script reads: every trainer's seeds."""
    with open(os.path.join(ROOT, "docs", "task.md"), encoding="utf-8") as f:
        found = rows.parse_tables(f.read())
    lab = {(r.trainer, r.seed) for r in found}
    assert {(t, s) for t in ("sft", "grpo", "luffy", "srft", "relift", "uft", "prefix_rft", "bread")
            for s in (0, 1, 2)} <= lab
    assert all(len(r.levels) == 4 and all(v.count(".") == 1 for v in r.levels) for r in found)


def test_differences_at_the_pages_precision(tmp_path):
    row = rows.parse_tables(SAMPLE)[2]  # srft seed 2, with wrong steps
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval_accuracy_builtin_level1": 0.5},
             {"step": 40, "loss": 1.0},
             {"step": 80, "eval_accuracy_builtin_level1": 0.99125, "eval_accuracy_builtin_level2": 0.98250,
              "eval_accuracy_builtin_level3": 0.62125, "eval_accuracy_builtin_level4": 0.44,
              "eval_wrong_steps_builtin": 0.0331}]
    metrics.write_text("\n".join(json.dumps(m) for m in lines) + "\n{\"step\": 81, \"eval_acc")  # a torn last line
    fresh = rows.final_evaluation(str(metrics))
    assert fresh["step"] == 80
    assert rows.differences(row, fresh) == []  # 0.99125 -> 0.991, 0.9825 -> 0.983 (as printed), 0.0331 -> 0.033
    fresh["levels"] = (0.99125, 0.9825, 0.62125, 0.4412)
    fresh["wrong_steps"] = 0.036
    assert rows.differences(row, fresh) == ["level 4: docs 0.440, fresh 0.441",
                                            "wrong steps: docs 0.033, fresh 0.036"]
    fresh["levels"] = (0.99125, None, 0.62125, 0.44)
    assert rows.differences(row, fresh)[0] == "level 2: docs 0.983, fresh missing"


def test_commands_and_selection():
    found = rows.parse_tables(SAMPLE)
    assert [(r.trainer, r.seed) for r in rows.select(found, "sft.py,srft", None)] == [("sft", 0), ("srft", 2)]
    assert [(r.trainer, r.seed) for r in rows.select(found, None, "1,2")] == [("grpo", 1), ("srft", 2)]
    sft = rows.command(found[0], "/out")
    assert sft[1].endswith("sft.py") and sft[sft.index("--batch_size") + 1] == "16"  # the lab's prompts per step
    lab = rows.command(found[2], "/out")  # the lab's flags, which repeat the trainer's defaults
    assert lab[1].endswith("srft.py") and lab[2:6] == ["--seed", "2", "--output_dir", "/out"]
    assert "--keep_checkpoints" in lab and lab[lab.index("--max_steps") + 1] == "80"


def test_fusion_table_counters_by_hand():
    """scripts/fusion_table.py's per-method counters on fabricated metrics lines (evaluation lines have no loss)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fusion_table", os.path.join(ROOT, "scripts", "fusion_table.py"))
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    steps = [{"step": s, "loss": 0.0, "demo_prob": 0.5 + s / 50, "entropy_rollout": [0.1, 0.3, 0.2][s % 3],
              "ft_steps_total": s // 2, "hint_length": 2.0 if s <= 11 else 0.0, "gate_kept_frac": 0.2 if s % 2 else 0.3,
              "extra_tokens": 1000.0} for s in range(1, 21)]
    rows = [{"step": 0, "eval_accuracy": 0.1}] + steps
    assert ft.counter("luffy", rows) == "demonstration p 0.59 -> 0.83"  # mean of 0.52..0.66 -> of 0.76..0.90
    assert ft.counter("srft", rows) == "rollout entropy peaks at 0.300"
    assert ft.counter("relift", rows) == "10 fine-tuning steps"
    assert ft.counter("uft", rows) == "last hint at step 11"
    assert ft.counter("prefix_rft", rows) == "gate keeps 25% of prefix tokens"
    assert ft.counter("bread", rows) == "20k tokens from branches and search"
    assert ft.tokens(263_000) == "263k" and ft.tokens(35_168) == "35.2k" and ft.tokens(0) == "0"
