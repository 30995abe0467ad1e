"""Rerun the per-seed rows of docs/task.md and compare the held-out pass@1 of a fresh run with the page's.

    python scripts/check_readme_rows.py --list                        # the rows found, and their commands
    python scripts/check_readme_rows.py --only sft,grpo --seeds 0     # rerun those rows, compare
    python scripts/check_readme_rows.py --only sft --seeds 0 --runs_dir /tmp/rows --reuse   # compare runs kept there

The table of docs/task.md "Measured: every trainer on the lab's budget" is checked: the lab's runs, written into the
page from lab_results/results.json by scripts/build_docs.py; each row is `python <trainer>.py --seed S` with the
flags `python lab.py` adds (lab.trainer_args: the budget, the evaluation and checkpoint schedule, the probe). Per row, the final evaluation's pass@1 per level (and the wrong-steps share where the table
has the column) is printed with the table's three decimals and compared exactly: a CPU run repeats bit
for bit on one machine with one thread count (OMP_NUM_THREADS), so any difference is a change in the
code, the base model, the machine or the thread count. Exit status 1 when a row differs.
"""
import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TABLES = {  # the page's section heading -> how its rows are run
    "Measured: every trainer on the lab's budget": "lab",
}
LEVELS = ("level 1", "level 2", "level 3", "level 4")


@dataclasses.dataclass
class Row:
    table: str  # the section heading
    trainer: str  # "sft", "grpo", "luffy", ...
    seed: int
    levels: tuple  # the page's pass@1 per level, as written ("0.969")
    wrong_steps: str | None  # the page's wrong-steps share, as written, where the table has the column
    line: int  # 1-based line of the row on the page


def parse_tables(text: str, tables=TABLES) -> list[Row]:
    """The trainer rows of each table in `tables`: the first Markdown table after the section heading.
    Rows whose first cell is not a `<trainer>.py` with a seed (the base row) are skipped."""
    lines, rows = text.splitlines(), []
    for heading in tables:
        start = next((i for i, l in enumerate(lines) if l.lstrip("#").strip() == heading and l.startswith("#")), None)
        if start is None:
            raise ValueError(f"the page has no section '{heading}'")
        i = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("|")), None)
        if i is None or lines[i - 1].startswith("#"):
            raise ValueError(f"no table under '{heading}'")
        header = [c.strip().lower() for c in lines[i].strip().strip("|").split("|")]
        missing = [c for c in ("seed",) + LEVELS if c not in header]
        if missing:
            raise ValueError(f"the table under '{heading}' has no column {', '.join(missing)}: {lines[i]}")
        for k in range(i + 2, len(lines)):
            if not lines[k].startswith("|"):
                break
            cells = [c.strip() for c in lines[k].strip().strip("|").split("|")]
            name = re.fullmatch(r"`(\w+)\.py`", cells[0])
            if not name or not cells[header.index("seed")].isdigit():
                continue
            rows.append(Row(heading, name.group(1), int(cells[header.index("seed")]),
                            tuple(cells[header.index(c)] for c in LEVELS),
                            cells[header.index("wrong steps")] if "wrong steps" in header else None, k + 1))
    return rows


def command(row: Row, out: str) -> list[str]:
    """The row's command line: the trainer's defaults, and for the lab's table the flags lab.py adds."""
    args = ["--seed", str(row.seed), "--output_dir", out]
    if TABLES[row.table] == "lab":
        import lab
        budget = lab.Budget()
        args = lab.trainer_args(row.trainer, budget, row.seed, budget.steps, out, budget.model, None)
    return [sys.executable, os.path.join(ROOT, f"{row.trainer}.py"), *args]


def final_evaluation(metrics_path: str) -> dict | None:
    """The last metrics.jsonl line with a built-in evaluation: {"step", "levels", "wrong_steps"}."""
    last = None
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                m = json.loads(line)
            except json.JSONDecodeError:  # a torn last line
                continue
            if "eval_accuracy_builtin_level1" in m:
                last = m
    if last is None:
        return None
    return {"step": last["step"], "levels": tuple(last.get(f"eval_accuracy_builtin_level{k}") for k in range(1, 5)),
            "wrong_steps": last.get("eval_wrong_steps_builtin")}


def differences(row: Row, fresh: dict) -> list[str]:
    """What differs between the page's row and a fresh run's final evaluation, at the page's precision."""
    out = []
    for name, written, value in zip(LEVELS, row.levels, fresh["levels"]):
        if value is None or _as_written(value, written) != written:
            out.append(f"{name}: docs {written}, fresh {_as_written(value, written)}")
    if row.wrong_steps is not None:
        value = fresh["wrong_steps"]
        if value is None or _as_written(value, row.wrong_steps) != row.wrong_steps:
            out.append(f"wrong steps: docs {row.wrong_steps}, fresh {_as_written(value, row.wrong_steps)}")
    return out


def _as_written(value, written: str) -> str:
    """`value` with as many decimals as the page's number has."""
    if value is None:
        return "missing"
    places = len(written.split(".")[1]) if "." in written else 0
    return f"{value:.{places}f}"


def select(rows: list[Row], only: str | None, seeds: str | None) -> list[Row]:
    trainers = {t.strip().removesuffix(".py") for t in only.split(",")} if only else None
    wanted = {int(s) for s in seeds.split(",")} if seeds else None
    return [r for r in rows if (trainers is None or r.trainer in trainers) and (wanted is None or r.seed in wanted)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--page", default=os.path.join(ROOT, "docs", "task.md"), help="the page whose tables are checked")
    p.add_argument("--only", help="comma-separated trainers, e.g. sft,grpo (default: every row)")
    p.add_argument("--seeds", help="comma-separated seeds (default: every seed)")
    p.add_argument("--runs_dir", help="where the runs go, one directory per command (default: a temporary one, "
                   "removed at the end)")
    p.add_argument("--reuse", action="store_true", help="compare a run already in --runs_dir instead of rerunning it")
    p.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    a = p.parse_args(argv)
    with open(a.page, encoding="utf-8") as f:
        rows = select(parse_tables(f.read()), a.only, a.seeds)
    if not rows:
        sys.exit("no row of the page matches --only / --seeds")
    runs_dir = a.runs_dir or tempfile.mkdtemp(prefix="doc_rows_")
    # A row of both tables (GRPO's) runs once per distinct command.
    jobs = {}
    for r in rows:
        out = os.path.join(runs_dir, f"{r.trainer}-s{r.seed}" + ("-lab" if TABLES[r.table] == "lab" else ""))
        jobs.setdefault(out, []).append(r)
    threads = os.environ.get("OMP_NUM_THREADS", "unset (torch uses every core)")
    print(f"{len(rows)} rows of {os.path.relpath(a.page, ROOT)}, {len(jobs)} commands; OMP_NUM_THREADS={threads}")
    failed = False
    for out, same in jobs.items():
        cmd = command(same[0], out)
        print(f"\n$ python {os.path.relpath(cmd[1], ROOT)} {shlex.join(cmd[2:])}   # "
              f"{os.path.relpath(a.page, ROOT)} line {', '.join(str(r.line) for r in same)}", flush=True)
        if a.list:
            continue
        metrics = os.path.join(out, "metrics.jsonl")
        if not (a.reuse and os.path.exists(metrics)):
            if os.path.exists(out):
                shutil.rmtree(out)
            start = time.time()
            done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                print(done.stderr[-3000:])
                print(f"FAILED: exit status {done.returncode}")
                failed = True
                continue
            print(f"ran in {time.time() - start:.0f} s")
        fresh = final_evaluation(metrics) if os.path.exists(metrics) else None
        if fresh is None:
            print(f"FAILED: no evaluation in {metrics}")
            failed = True
            continue
        for r in same:
            diff = differences(r, fresh)
            print(f"{r.trainer} seed {r.seed} ({r.table}), step {fresh['step']}: "
                  f"docs {' / '.join(r.levels)}, fresh {' / '.join(_as_written(v, w) for v, w in zip(fresh['levels'], r.levels))}"
                  + (f", wrong steps docs {r.wrong_steps}, fresh {_as_written(fresh['wrong_steps'], r.wrong_steps)}"
                     if r.wrong_steps is not None else "")
                  + (": SAME" if not diff else ": DIFFERS (" + "; ".join(diff) + ")"))
            failed |= bool(diff)
    if not a.runs_dir and not a.list:
        shutil.rmtree(runs_dir, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
