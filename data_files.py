"""Reading and validating a data file: load_rows, behind common.read_rows (setup, evaluate.py); and
PromptStream, the seeded, resumable order in which a run draws its training rows.

Every row is checked before anything else happens, and each problem is named with its row, field and
fix. Trainers never call this file; common.py re-exports load_rows and PromptStream.
"""
import decimal
import difflib
import json
import math
import os

import numpy as np


def load_rows(source: str, prompt_key: str = "problem", answer_key: str | None = "answer",
              demo_key: str | None = None) -> list[dict]:
    """Rows {prompt: str | chat messages, answer: str | None, demo: str | None, level[, stratum]} from a local
    .jsonl / .json / .parquet file or a hub data set.

    A trainer asks only for the fields it uses (answer_key=None: no answer is read; demo_key=None: no
    demonstration). Every row is checked before anything else happens; a bad file raises ValueError
    that lists the first MAX_BAD_ROWS_SHOWN problems (row number, field, fix) and counts the rest. A
    key that no row has is reported with the fields that exist at that level and the closest match.
    Answers given as JSON numbers are converted to text (42 -> "42"), with a count printed; booleans,
    lists and empty answers are refused. Messages name each key's command-line flag.
    LUFFY's openr1.parquet: prompt_key="prompt", answer_key="reward_model.ground_truth", demo_key="target"."""
    flags = {"prompt": "--prompt_key", "answer": "--answer_key", "demo": "--demo_key"}
    name, records = os.path.basename(source), _read_records(source)
    if not records:
        raise ValueError(f"{source} holds no rows")
    objects = [r for r in records if isinstance(r, dict)]
    keys = {"prompt": prompt_key, "answer": answer_key, "demo": demo_key}
    absent = [_missing_key(objects, key, flags[role]) for role, key in keys.items()
              if key and objects and not any(_field(r, key) is not _MISSING for r in objects)]
    if absent:
        raise ValueError(f"{name}: " + "\n  ".join(absent))
    rows, problems, bad_rows, converted = [], [], 0, 0
    for n, record in enumerate(records, start=1):
        found = []  # this row's problems
        if not isinstance(record, dict):
            problems.append(f"row {n}: is {_show(record)}, not an object with named fields; fix or drop the row")
            bad_rows += 1
            continue
        prompt = _field(record, prompt_key)
        if prompt is _MISSING:
            found.append(f"no field '{prompt_key}'; fill in the problem or drop the row")
        elif is_chat(prompt):
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        elif isinstance(prompt, str) and not prompt.strip() or prompt is None:
            found.append(f"'{prompt_key}' is empty; fill in the problem or drop the row")
        elif not isinstance(prompt, str):
            found.append(f"'{prompt_key}' is {_show(prompt)}; the problem must be a string or a list of "
                         "{role, content} chat messages")
        answer = None
        if answer_key:
            answer = _field(record, answer_key)
            if answer is _MISSING:
                found.append(f"no field '{answer_key}'; fill in the gold answer or drop the row")
            elif answer is None or isinstance(answer, str) and not answer.strip():
                found.append(f"'{answer_key}' is empty{' (null)' if answer is None else ''}; fill in the gold "
                             "answer or drop the row")
            elif isinstance(answer, bool) or isinstance(answer, float) and not math.isfinite(answer):
                found.append(f"'{answer_key}' is {_show(answer)}, not an answer; write the gold answer as a "
                             "string or drop the row")
            elif isinstance(answer, (int, float)):
                answer, converted = _number_text(answer), converted + 1
            elif isinstance(answer, (list, tuple, dict)):
                found.append(f"'{answer_key}' is {_show(answer)}; the gold answer must be one string (several "
                             "values go in one string, e.g. \"2, 3\")")
            elif not isinstance(answer, str):
                found.append(f"'{answer_key}' is {_show(answer)}; write the gold answer as a string")
            else:
                answer = answer.strip()
        demo = None
        if demo_key:
            demo = _field(record, demo_key)
            if is_chat(demo):  # a message list such as LUFFY's target: the assistant turn is the demonstration
                turns = [m["content"] for m in demo if m["role"] == "assistant"]
                demo = turns[-1] if turns else _MISSING
                if not turns:
                    found.append(f"'{demo_key}' has no assistant message; the demonstration is the assistant "
                                 "turn: fix or drop the row")
            elif demo is _MISSING:
                found.append(f"no field '{demo_key}'; this trainer learns from a demonstration per row: fill "
                             "it in or drop the row")
            elif demo is None or isinstance(demo, str) and not demo.strip():
                found.append(f"'{demo_key}' is empty; this trainer learns from a demonstration per row: fill it "
                             "in or drop the row")
            elif not isinstance(demo, str):
                found.append(f"'{demo_key}' is {_show(demo)}; the demonstration must be a string or a list of "
                             "chat messages with an assistant turn")
        if found:
            problems += [f"row {n}: {p}" for p in found]
            bad_rows += 1
        else:
            rows.append({"prompt": prompt, "answer": answer, "demo": demo, "level": record.get("level"),
                         **({"stratum": record["stratum"]} if record.get("stratum") else {})})  # the built-in task's
    if problems:
        shown = problems[:MAX_BAD_ROWS_SHOWN]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ValueError(f"{name}: {bad_rows} of {len(records)} rows are bad; fix or drop them:\n  "
                         + "\n  ".join(shown) + more)
    if converted:
        _print0(f"{name}: {converted} of {len(rows)} answers were JSON numbers; converted to text (42 -> \"42\")")
    return rows


def _print0(message: str):
    """common.print0's rule, rank 0 prints, without importing common (which imports this file)."""
    import torch.distributed as dist  # at call time: reading a file needs no torch

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _missing_key(records: list[dict], key: str, flag: str) -> str:
    """No row has `key`: say which fields exist where the dotted path breaks, and suggest the closest."""
    parts = key.split(".")
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        level = [r if not prefix else _field(r, prefix, None) for r in records[:1000]]
        dicts = [v for v in level if isinstance(v, dict)]
        if not any(parts[depth] in v for v in dicts):
            break
    paths = _key_paths(records)
    if depth and not dicts:
        found = next(v for v in level if v is not None)
        there, close = f"'{prefix}' is {type(found).__name__}, not an object with fields", []
    else:
        fields = list(dict.fromkeys(str(k) for v in dicts for k in v))
        there = f"the rows' '{prefix}' has {', '.join(fields)}" if depth else f"the rows have {', '.join(fields)}"
        # first a field of that name anywhere, then a sibling where the path breaks that the typed name
        # abbreviates (gt -> ground_truth) or resembles, then anything alike, never the path's own parents
        siblings = [f for f in fields if _abbreviates(parts[depth], f)] or \
            difflib.get_close_matches(parts[depth], fields, n=1, cutoff=0.5)
        parents = {".".join(parts[:i]) for i in range(1, len(parts))}
        close = [p for p in paths if p.split(".")[-1] == parts[-1]] or \
            [f"{prefix}.{f}" if prefix else f for f in siblings] or \
            [p for p in difflib.get_close_matches(key, paths, n=3, cutoff=0.6) if p not in parents][:1] or \
            difflib.get_close_matches(parts[-1], paths, n=1, cutoff=0.6)
    if not close and flag == "--demo_key":  # a chat-message field with an assistant turn is a demonstration
        close = [p for p in paths if is_chat(v := _field(records[0], p, None)) and
                 any(m["role"] == "assistant" for m in v)]
    advice = f"did you mean {flag} {close[0]}?" if close else f"name the field with {flag}"
    return f"no row has the field '{key}' ({flag}): {there}; {advice}"


def _abbreviates(typed: str, name: str) -> bool:
    """Every character of `typed` appears in `name` in order, starting with its first: gt, grnd_truth,
    groundtruth -> ground_truth."""
    typed, name = typed.lower(), name.lower()
    if not typed or typed[0] != name[:1]:
        return False
    rest = iter(name)
    return all(c in rest for c in typed)


def _number_text(x) -> str:
    """A JSON number as answer text: 42 -> "42", 0.5 -> "0.5", 1e-05 -> "0.00001" (never an exponent,
    which math-verify does not read)."""
    return str(x) if isinstance(x, int) else format(decimal.Decimal(repr(x)), "f")


def _json_line(line: str, k: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:  # its own message would say "line 1"
        raise ValueError(f"line {k} is not valid JSON ({e.msg})") from e


def _read_records(source: str) -> list:
    ext = os.path.splitext(source)[1].lower()
    if ext not in (".jsonl", ".json", ".parquet"):
        if os.path.exists(source):
            raise ValueError(f"unsupported file type {source}; use a .jsonl, .json or .parquet file")
        try:  # not a local file: a hub data set name, usable only when online
            import datasets
            return datasets.load_dataset(source, split="train").to_list()
        except Exception as e:
            raise ValueError(f"{source} is not a local file and could not be loaded from the hub ({e}); "
                             f"download the data set and pass the local .jsonl, .json or .parquet path") from e
    if not os.path.isfile(source):
        raise ValueError(f"data file not found: {os.path.abspath(source)}")
    try:
        if ext == ".parquet":  # to_pylist gives plain lists and dicts (pandas would give numpy arrays)
            import pyarrow.parquet as pq
            return pq.read_table(source).to_pylist()
        with open(source, encoding="utf-8") as f:
            if ext == ".jsonl":
                return [_json_line(line, k) for k, line in enumerate(f, start=1) if line.strip()]
            data = json.load(f)
    except Exception as e:  # bad JSON line, corrupt parquet, undecodable bytes, no permission
        raise ValueError(f"cannot read {source} as {ext[1:]}: {e}") from e
    if isinstance(data, dict) and len(lists := [v for v in data.values() if isinstance(v, list)]) == 1:
        data = lists[0]  # {"data": [...], "version": ...}
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a list of objects, or an object with exactly one list field")
    return data


_MISSING = object()


def _field(record, key: str, default=_MISSING):
    """record[key], where a dotted key reaches a nested field (reward_model.ground_truth)."""
    for part in key.split("."):
        if not isinstance(record, dict) or part not in record:
            return default
        record = record[part]
    return record


def is_chat(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)


MAX_BAD_ROWS_SHOWN = 10  # a bad file lists this many problems, then a count of the rest


def _show(value) -> str:
    """A bad value, short, for an error message."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _key_paths(records: list[dict], depth: int = 3) -> list[str]:
    """Dotted paths of the fields in the first rows (reward_model, reward_model.ground_truth, ...)."""
    paths = {}

    def walk(obj, prefix, d):
        for k, v in obj.items():
            path = f"{prefix}{k}"
            paths[path] = None
            if isinstance(v, dict) and d > 1:
                walk(v, path + ".", d - 1)

    for r in records[:100]:
        walk(r, "", depth)
    return list(paths)


class PromptStream:
    """Seeded, resumable walk over the training rows: a fresh permutation every epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.pos = size, seed, 0, 0

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            take = min(k - len(out), self.size - self.pos)
            out += perm[self.pos:self.pos + take].tolist()
            self.pos += take
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict):
        self.epoch, self.pos = s["epoch"], s["pos"]
