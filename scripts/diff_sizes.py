"""How far each trainer and fork is from grpo.py, the template: its length and the lines `diff` shows.

    python scripts/diff_sizes.py            # a Markdown table, one row per file
    python scripts/diff_sizes.py --plain    # "file lines diff_lines", one line per file

The diff column is `diff grpo.py FILE | grep -c '^[<>]'`: the lines removed from grpo.py plus the lines
added, so the method and nothing else when a fork keeps grpo.py's text where its method does not change it.
sft.py is left out: it is the other template, not a fork of grpo.py, and its diff measures nothing.
"""
import argparse
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["luffy.py", "srft.py", "relift.py", "uft.py", "bread.py", "prefix_rft.py",
         "forks/nsr.py", "forks/forking_tokens.py", "forks/chord.py", "forks/hpt.py"]


def diff_lines(path: str) -> int:
    out = subprocess.run(["diff", os.path.join(ROOT, "grpo.py"), os.path.join(ROOT, path)], capture_output=True,
                         text=True).stdout
    return sum(line.startswith(("<", ">")) for line in out.splitlines())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plain", action="store_true", help="one line per file instead of a Markdown table")
    args = p.parse_args()
    rows = [("grpo.py", 0)] + [(f, diff_lines(f)) for f in FILES]
    if not args.plain:
        print("| file | lines | `diff grpo.py` lines |\n|---|---:|---:|")
    for f, n in rows:
        with open(os.path.join(ROOT, f)) as fh:
            length = sum(1 for _ in fh)
        print(f"{f} {length} {n}" if args.plain else f"| `{f}` | {length} | {n if f != 'grpo.py' else '-'} |")


if __name__ == "__main__":
    main()
