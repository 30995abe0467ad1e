"""The docs: the generated blocks are what scripts/build_docs.py would write, every repository path and relative
link in README.md and docs/*.md exists, and the README stays a landing page."""
import glob
import os
import re
import subprocess
import sys

NOT_YET = set()  # paths a page may name before the code that creates them lands (none now)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
FOLDERS = {"bench", "scripts", "tests", "forks", "docs", "lab_results", ".ci"}  # a path under one is checked
PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.(?:py|md|sh|json|jsonl|png|txt))(?![\w/])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def exists(path):
    return path in NOT_YET or os.path.exists(os.path.join(ROOT, path))


def repository_paths(text):
    """The repository paths named in inline code: under a known folder, or a top-level script or upper-case page.
    Bare output names (`metrics.jsonl`, `results.md`) and paths a run writes (runs/, lab_results/runs/) are not."""
    for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
        for path in PATH.findall(span):
            parts = path.split("/")
            if len(parts) == 1 and not (path.endswith((".py", ".sh", ".txt")) or path[:1].isupper()):
                continue
            if len(parts) > 1 and (parts[0] not in FOLDERS or parts[0] == "lab_results" and len(parts) > 2):
                continue
            yield path


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    return {slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", read(page)), re.M)}


def test_generated_blocks_are_current():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_is_a_landing_page():
    text = read("README.md")
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move a topic to docs/"
    quick = next(i for i, line in enumerate(lines) if line.startswith("## Quick start"))
    assert quick < 40, f"the quick start starts at line {quick + 1}, past the first screen"
    assert ("python3 -m venv .venv && . .venv/bin/activate\n"
            "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # a laptop: the CPU wheel\n"
            "pip install -r requirements.txt -r requirements-test.txt   # the second file: what the tests need\n"
            "python grpo.py          # or: python sft.py\n") in text
    assert "python -m pytest -q tests" in text
    for page in PAGES[1:]:
        assert f"({page})" in text, f"README.md does not link {page}"


def test_paths_in_the_docs_exist():
    missing = [f"{page}: {path}" for page in PAGES for path in repository_paths(read(page)) if not exists(path)]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_relative_links_exist():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", read(page))):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not exists(path):
                broken.append(f"{page}: {target} (no file {path})")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                broken.append(f"{page}: {target} (no heading #{anchor} in {path})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_file_tree_names_existing_files_and_every_script():
    text = read("README.md")
    tree = re.search(r"^## Files\n\n```\n(.*?)^```", text, re.S | re.M).group(1)
    listed, folder = set(), ""
    for line in tree.splitlines():
        name = line.split()[0]
        if line.startswith("  "):
            listed.add(folder + name)
        else:
            folder = name if name.endswith("/") else ""
            listed.add(name)
    missing = sorted(p for p in listed if not (p in NOT_YET or glob.glob(os.path.join(ROOT, p))))
    assert not missing, f"the README's file tree names files that do not exist: {missing}"
    scripts = {os.path.relpath(p, ROOT) for pattern in ("*.py", "forks/*.py", "bench/*.py")
               for p in glob.glob(os.path.join(ROOT, pattern))}
    assert not scripts - listed, f"files missing from the README's file tree: {sorted(scripts - listed)}"


def test_the_allow_list_holds_only_missing_paths():
    """Once the moves land, their paths exist and leave NOT_YET."""
    arrived = sorted(p for p in NOT_YET if os.path.exists(os.path.join(ROOT, p)))
    assert not arrived, f"these paths exist now: remove them from NOT_YET in tests/test_docs.py: {arrived}"
