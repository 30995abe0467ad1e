"""Evaluation sets and their bookkeeping (METHODS.md 9), for common.evaluate_sets and evaluate.py: an --eval_data
entry as an EvalSet, the groups a row is counted under (its level, and the built-in task's stratum), the unbiased
pass@k of Eq. (58), an evaluation's metrics from its per-problem counts (set_metrics), and the one-line summary of
an evaluation. This module imports nothing of common.
"""
import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field

import builtin_task


@dataclass
class EvalSet:
    name: str  # its metrics: eval_accuracy_<name>, eval_accuracy_<name>_level<level>
    source: str  # a data file, or "builtin" (the held-out problems of the builtin task)
    k: int  # samples per problem
    rows: list = field(default_factory=list)  # encoded rows (encode_rows), filled in by the caller


def parse_eval_sets(entries: list[str], eval_samples: int) -> list[EvalSet]:
    """["aime24.parquet:32", "math500.jsonl", "builtin"] -> EvalSets (no rows), named by file stem; k from
    FILE:k, else --eval_samples (0: 1 for a file, the builtin task's k for builtin). ValueError: a bad entry."""
    default_k, builtin_k = eval_samples or 1, eval_samples or builtin_task.SETTINGS["eval_samples"]
    sets = []
    for entry in entries:
        if entry in ("none", ""):
            continue
        m = re.fullmatch(r"(.+):(\d+)", entry)
        source, k = (m.group(1), int(m.group(2))) if m and not os.path.exists(entry) else (entry, None)
        if k == 0:
            raise ValueError(f"--eval_data {entry}: k (after the colon) is the number of samples per problem, at "
                             "least 1")
        name = "builtin" if source == "builtin" else \
            re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(source))[0])
        if any(s.name == name for s in sets):
            raise ValueError(f"--eval_data: two sets would both log as eval_accuracy_{name}; give the files different "
                             "names")
        sets.append(EvalSet(name, source, k or (builtin_k if source == "builtin" else default_k)))
    return sets


def validation_split(rows: list[dict], n: int, source: str) -> tuple[list[dict], EvalSet]:
    """--val_rows: `n` of the training rows, picked by a fixed seed (the same split for every run and seed on the
    same data), become the set "val" (1 sample per problem), never trained on; the rest stay in their order."""
    if not 0 < n < len(rows):  # before a run directory is claimed: nothing is lost
        raise SystemExit(f"error: --val_rows {n}: the training data has {len(rows)} rows; hold out between 1 and "
                         f"{len(rows) - 1}")
    pick = set(random.Random(0).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in pick], EvalSet("val", source, 1, [rows[i] for i in sorted(pick)])


def level_key(level) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(level)).strip("_")


def groups_of(row: dict) -> list[str]:
    """The metric suffixes a row is counted under besides its set: level<L>, and stratum_<S> for the built-in
    task's levels 3-4 (builtin_task.STRATA: the base's prior on the problem's fact)."""
    return ([f"level{level_key(row['level'])}"] if row["level"] is not None else []) + \
        ([f"stratum_{row['stratum']}"] if row.get("stratum") else [])


def group_order(group: str):  # levels first, numerically, then strata
    return (not group.startswith("level"), not group[5:].isdigit(), int(group[5:]) if group[5:].isdigit() else 0, group)


PASS_K = (1, 2, 4, 8, 16, 32, 64)  # the k of --eval_pass_k, each up to the set's samples per problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """METHODS.md Eq. (58): the unbiased pass@k of a problem with c correct among n samples (arXiv 2107.03374),
    1 - C(n-c, k) / C(n, k), as 1 - prod_{i=n-c+1..n} (1 - k / i): no binomial is ever formed."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def set_metrics(s: EvalSet, correct: list[int], right_steps: list[int] | None, pass_k: bool = False) -> dict:
    """METHODS.md 9 from per-problem counts (one per row of s.rows, in order): `correct`, the samples of k rewarded 1;
    `right_steps` (the built-in task), those of them whose worked steps are right too. eval_accuracy_<set>: pass@1
    averaged over k, then over problems, and per group (groups_of); eval_wrong_steps_<set>: the rewarded samples
    whose steps are wrong (a right answer for wrong reasons); with pass_k, eval_pass@<k>_<set>[_<group>], Eq. (58),
    for k in PASS_K up to s.k."""
    members = {None: list(range(len(s.rows)))}  # None: the whole set
    for i, r in enumerate(s.rows):
        for g in groups_of(r):
            members.setdefault(g, []).append(i)
    metrics = {}
    for g in sorted(members, key=lambda g: (g is not None, g and group_order(g))):
        suffix, rows = s.name + (f"_{g}" if g else ""), members[g]
        metrics[f"eval_accuracy_{suffix}"] = sum(correct[i] for i in rows) / s.k / max(len(rows), 1)
        for k in [k for k in PASS_K if pass_k and k <= s.k]:
            metrics[f"eval_pass@{k}_{suffix}"] = sum(pass_at_k(s.k, correct[i], k) for i in rows) / max(len(rows), 1)
    if right_steps is not None:
        metrics[f"eval_wrong_steps_{s.name}"] = (sum(correct) - sum(right_steps)) / max(sum(correct), 1)
    return metrics


def problems_digest(rows: list[dict]) -> str:
    """A short hash of a set's problems, in order: two runs' per-problem counts pair up only where it is equal."""
    return hashlib.sha1("\n".join(str(r["problem"]) for r in rows).encode()).hexdigest()[:12]


def format_eval(metrics: dict, sets: list[EvalSet]) -> str:
    """One line: "builtin 0.338 (level 1 0.757, 2 0.550, ...) | math500 0.412"."""
    parts = []
    for s in sets:
        prefix = f"eval_accuracy_{s.name}_"
        groups = [(k.removeprefix(prefix), v) for k, v in metrics.items() if k.startswith(prefix)]
        levels = ", ".join(f"{g.removeprefix('level')} {v:.3f}" for g, v in groups if g.startswith("level"))
        strata = ", ".join(f"{g.removeprefix('stratum_')} {v:.3f}" for g, v in groups if g.startswith("stratum_"))
        parts.append(f"{s.name} {metrics[f'eval_accuracy_{s.name}']:.3f}" + (f" (level {levels}" if levels else "")
                     + (f"; {strata}" if strata else "") + (")" if levels else ""))
    return " | ".join(parts)
