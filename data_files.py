"""Reading a data file's records, and the small helpers behind common.load_rows' checks.

common.py re-exports every name here; nothing else imports this file. load_rows (which validates
each row and says what to fix) and _missing_key stay in common.py's Data section.
"""
import json
import os


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


def _is_chat(x) -> bool:
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
