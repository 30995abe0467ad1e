"""The command line of every trainer and tool: a Config dataclass as `--field value` flags (parse_config), the
flags the user gave (given_flags), and the laptop defaults still in force against a trainer's GPU_RUN
(laptop_defaults). common.py imports these three for the trainers (`common.parse_config(Config)`); this module
imports nothing of the repository.
"""
import argparse
import dataclasses
import difflib
import inspect
import os
import re
import sys
import typing
from typing import Literal


def parse_config(cls, argv=None, variants: dict | None = None):
    """A dataclass as `--field value` flags, each field's trailing comment its help; a `list[str]` field
    takes several values. The flags given are kept (`given_flags`). variants: {name: {field: value}} for a
    Config with a `variant` field; the chosen one sets its fields except those given on the command line."""
    helps = {}
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            name = None
            for line in inspect.getsource(klass).splitlines():
                m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
                more = re.match(r"\s+#(?!\s*---)\s*(.+)$", line)  # continues the help above; a "# ---" banner does not
                if m:
                    name = m.group(1) if m.group(1) not in helps else None
                    helps.setdefault(m.group(1), m.group(2))
                elif more and name:
                    helps[name] += " " + more.group(1)
                else:
                    name = None
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]  # its first paragraph
    parser = _Parser(description=" ".join(doc.split()) or None, allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    defaults = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        defaults[f.name] = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kw = {"default": defaults[f.name], "help": helps.get(f.name, " ")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kw.update(type=type(typing.get_args(tp)[0]), choices=typing.get_args(tp))
        elif typing.get_origin(tp) is list:  # no argparse default: "extend" would add to a non-empty one
            kw.update(type=typing.get_args(tp)[0], nargs="+", action="extend", default=argparse.SUPPRESS,
                      help=kw["help"] + f" (default: {' '.join(defaults[f.name]) or 'none'})")
        else:
            kw["type"] = tp
        parser.add_argument(f"--{f.name}", **kw)
    args = {**defaults, **vars(parser.parse_args(argv))}
    negative = [f"--{k} {v}" for k, v in args.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and v < 0]
    if negative:  # every count, size, rate and coefficient here is >= 0
        parser.error(f"{', '.join(negative)}: must be at least 0")
    cfg = cls(**args)
    given = set()
    for token in sys.argv[1:] if argv is None else argv:
        name = token[2:].split("=")[0] if token.startswith("--") else ""
        given.add(name[3:] if name.startswith("no-") and name[3:] in args else name)
    cfg._given = frozenset(given & set(args))  # not a field: config.json and asdict() leave it out
    for name, value in ((variants or {}).get(getattr(cfg, "variant", None)) or {}).items():
        if name not in cfg._given:
            setattr(cfg, name, value)
    if hasattr(cfg, "output_dir") and not cfg.output_dir:
        cfg.output_dir = os.path.join("runs", os.path.splitext(os.path.basename(sys.argv[0]))[0] or "run")
    return cfg


class _Parser(argparse.ArgumentParser):
    """argparse, with one line per mistake instead of the whole usage: an unknown flag gets the
    closest known ones ("did you mean --lr?")."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (.+)", message)
        if unknown:
            known = [a for action in self._actions for a in action.option_strings]
            tokens = unknown.group(1).split()
            hints = []
            for token in [t for t in tokens if t.startswith("-")] or tokens:  # the flags, not their values
                close = difflib.get_close_matches(token.split("=")[0], known, n=2)
                hints.append(f"{token}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
            message = f"unrecognized argument{'s' if len(hints) > 1 else ''} {', '.join(hints)}"
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def given_flags(cfg) -> frozenset:
    """Names of the fields set on the command line (empty for a config built in code)."""
    return getattr(cfg, "_given", frozenset())


def _flag_text(value) -> str:  # a setting as the command line writes it: 1e-06 -> "1e-6"
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:g}") if isinstance(value, float) else str(value)


def laptop_defaults(cfg, gpu_run: dict) -> list[str]:
    """"--flag value (paper: value)" for every setting of `gpu_run` (the trainer's GPU_RUN, its docstring's
    8-GPU command with the paper's settings) that the user did not give and that differs: the laptop defaults
    still in force."""
    given, out = given_flags(cfg), []
    for name, value in gpu_run.items():
        current = getattr(cfg, name)
        if name in given or current == value:
            continue
        if isinstance(current, bool):
            out.append(f"--{'' if current else 'no-'}{name} (paper: --{'' if value else 'no-'}{name})")
        else:
            out.append(f"--{name} {_flag_text(current)} (paper: {_flag_text(value)})")
    return out
