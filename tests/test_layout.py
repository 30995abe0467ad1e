"""The imports between the repository's modules form no loop, and library code reaches no script or test."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = {"common", "answers", "builtin_task", "cli", "data_files", "eval_sets", "lm_head", "rollout_debug",
           "run_dir"}


def imports(path: str) -> set[str]:
    """Top-level names of every import in the file, at module level or inside a function (a lazy import is still
    a dependency)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def graph() -> dict[str, set[str]]:
    mods = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "*.py"))}
    return {m: imports(os.path.join(ROOT, m + ".py")) & mods - {m} for m in mods}


def test_the_imports_between_root_modules_form_no_loop():
    g, state = graph(), {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            assert state.get(d) != "open", f"import loop: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert g["data_files"] == g["run_dir"] == g["rollout_debug"] == g["answers"] == g["cli"] == set()


def test_library_code_imports_no_script_trainer_or_test():
    scripts = {os.path.basename(f)[:-3] for d in ("scripts", "bench", "tests", "forks")
               for f in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)}
    g = graph()
    trainers = set(g) - LIBRARY - {"lab", "lab_regimes"}  # the trainers, evaluate.py, lab.py
    for m in LIBRARY & set(g):
        assert not (imports(os.path.join(ROOT, m + ".py")) & (scripts | trainers)) - {"common"} - LIBRARY, m
    assert LIBRARY <= set(g), LIBRARY - set(g)
