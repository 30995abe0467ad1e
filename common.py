"""Shared infrastructure for the single-file trainers (sft.py, grpo.py, ...).

Nothing in here is a method's loss: a trainer file holds its whole algorithm, this file holds the
mechanics every trainer needs. Read it top to bottom; each section is independent:

    config -> CLI | distributed | data | embedded task | model + log-probs | verifier | sampling
    | loss aggregation | optimiser | checkpoints | logging | evaluation | run setup

Equation numbers refer to ../shared/docs/METHODS.md (reproduced in README.md's references).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# torch.distributed.checkpoint warns on every save/load in a plain single process, which is fine here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
from math_verify import parse, verify  # forked grading workers inherit it
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# ======================================================================================
# Config -> CLI: one dataclass per script; the comment after each field is its --help text
# ======================================================================================


@dataclass
class BaseConfig:
    # --- model and data -------------------------------------------------------------------
    model: str = "builtin"  # HF hub id or local directory; "builtin" = tiny base model built on first use
    data: str = "builtin"  # .jsonl/.json/.parquet file or hub dataset; "builtin" = embedded arithmetic task
    eval_data: str = "builtin"  # evaluation set, same formats; "" = no evaluation
    prompt_key: str = "problem"  # field holding the problem (a string or a list of chat messages)
    answer_key: str = "answer"  # field holding the gold answer (dotted keys reach nested fields)
    demo_key: str = "demo"  # field holding the demonstration (string or chat messages)
    system_prompt: str = "auto"  # "auto": METHODS 0.4 instruction for files, none for builtin; "" = none
    max_prompt_len: int = 64  # prompts longer than this (tokens) are dropped, with a count printed
    max_response_len: int = 48  # L_max: response budget in tokens (demonstrations truncated to it)
    cache_dir: str = "~/.cache/sft_rl_fusion"  # where the builtin base model is built and cached
    # --- run ------------------------------------------------------------------------------
    output_dir: str = ""  # default: runs/<script name>
    overwrite: bool = False  # start afresh even if output_dir already holds a run
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    max_steps: int = 80  # training iterations (one batch of prompts each)
    seed: int = 0  # base seed; rank r uses seed + r
    save_every: int = 40  # checkpoint every N steps (and always at the end); 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    eval_every: int = 20  # evaluate every N steps (and before and after training); 0 = only then
    eval_samples: int = 4  # k samples per eval problem; pass@1 is averaged over them (METHODS 9)
    eval_temperature: float = 0.6  # METHODS 9: temperature 0.6 for evaluation
    # --- optimiser (METHODS 0.3 step 5: AdamW, betas (0.9, 0.999), wd 0.01) -----------------
    lr: float = 1e-6  # peak learning rate
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant or cosine to 0
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # global grad-norm clip
    # --- sampling ---------------------------------------------------------------------------
    sampler: Literal["auto", "torch", "vllm"] = "auto"  # auto = vllm on GPU, torch on CPU
    temperature: float = 1.0  # tau of Eq. (1)-(2): rollouts, training forward and old log-probs
    top_p: float = 1.0  # nucleus sampling for rollouts
    vllm_gpu_memory_utilization: float = 0.0  # GPU fraction for vLLM; 0 = auto from the memory arithmetic (README)
    vllm_sleep: bool = True  # free vLLM's weights and KV cache while training (sleep mode)
    vllm_max_num_batched_tokens: int = 8192  # tokens per vLLM engine step (prefill chunk): bounds its activations
    rollout_debug: bool = False  # debug: write rollout_debug.jsonl (log-prob gap, probes, GPU memory; gpu_smoke.sh)
    # --- verifier (METHODS 0.4) -------------------------------------------------------------
    require_think: bool = True  # reward 0 unless the response closes </think>; grade the text after it
    verifier_workers: int = 2  # fork processes grading with math-verify (0 = main thread, no backstop)
    verifier_timeout: float = 2.0  # seconds per math-verify parse/compare
    # --- systems ----------------------------------------------------------------------------
    micro_batch_size: int = 64  # sequences per forward/backward (gradient accumulation below that)
    compile: bool = True  # torch.compile the log-prob / entropy kernel
    gradient_checkpointing: bool = False  # recompute decoder activations in backward
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "sft-rl-fusion"  # wandb project name


def parse_config(cls, argv=None, variants: dict | None = None):
    """Turn a dataclass into `--field value` flags; the trailing comment of each field is its help.

    variants: {name: {field: value}} for a trainer whose Config has a `variant` field (e.g. the
    settings of the official code, METHODS.md "paper vs code"). The chosen variant sets its fields,
    except those the user wrote on the command line: `--variant official --clip_eps_low 0.2` mixes.
    The flags given on the command line are kept in `cfg.cli_flags` (a set of field names)."""
    helps = {}
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
                if m:
                    helps.setdefault(m.group(1), m.group(2))
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
    hints = typing.get_type_hints(cls)

    def parser(defaults: bool):
        p = argparse.ArgumentParser(description=doc[0] if doc else None,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                    argument_default=None if defaults else argparse.SUPPRESS)
        for f in dataclasses.fields(cls):
            tp, kw = hints[f.name], {"help": helps.get(f.name, " ")}
            if defaults:
                kw["default"] = f.default
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is Literal:
                kw.update(type=type(typing.get_args(tp)[0]), choices=typing.get_args(tp))
            else:
                kw["type"] = tp
            p.add_argument(f"--{f.name}", **kw)
        return p

    cfg = cls(**vars(parser(True).parse_args(argv)))
    cfg.cli_flags = set(vars(parser(False).parse_args(argv)))  # what the user wrote, not defaults
    for name, value in ((variants or {}).get(getattr(cfg, "variant", None)) or {}).items():
        if name not in cfg.cli_flags:
            setattr(cfg, name, value)
    if not cfg.output_dir:
        cfg.output_dir = os.path.join("runs", os.path.splitext(os.path.basename(sys.argv[0]))[0] or "run")
    return cfg


# ======================================================================================
# Distributed: `python x.py` (one process) or `torchrun --nproc_per_node N x.py`
# ======================================================================================


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(one_rank_group: bool | None = None) -> Dist:
    """nccl on GPUs, gloo on CPU; a plain single process for `python x.py` on CPU.

    On a GPU even one process needs a process group: FSDP2's device mesh and vLLM's external
    launcher both read it, and the launcher also reads RANK and LOCAL_RANK from the environment.
    So `python x.py` on a GPU machine sets up the one-rank group torchrun would have made
    (`one_rank_group` forces that choice; tests use it on CPU)."""
    if one_rank_group is None:
        one_rank_group = torch.cuda.is_available()
    if "RANK" not in os.environ:
        if not one_rank_group:
            return Dist()
        for key, value in one_rank_environment().items():
            os.environ.setdefault(key, value)
        if torch.cuda.device_count() > 1:
            print(f"note: {torch.cuda.device_count()} GPUs are visible but only GPU 0 is used; for all of them "
                  f"launch with `torchrun --nproc_per_node {torch.cuda.device_count()} {sys.argv[0]} ...`",
                  flush=True)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=60))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)


def one_rank_environment() -> dict:
    """What torchrun would export for a single process: env:// rendezvous on a free local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(values, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce a list of Python numbers over ranks (identity in a single process)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_gather_1d(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D tensor (lengths may differ), in rank order; [t] in a single process."""
    if not dist.is_initialized():
        return [t]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=device))
    padded = torch.zeros(max(1, *(int(s) for s in sizes)), dtype=t.dtype, device=device)  # gloo needs >= 1
    padded[:t.numel()] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[:int(s)].to(t.device) for o, s in zip(out, sizes)]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# ======================================================================================
# Data: load and validate every row before training starts
# ======================================================================================

# Our wording of the reasoning instruction of METHODS.md 0.4 (LUFFY's prompt says the same in more words).
MATH_SYSTEM_PROMPT = (
    "Solve the problem in two parts. First think it through step by step inside <think> </think> tags: "
    "explore approaches, check each step and fix your mistakes. Then, after </think>, write a clear "
    "solution that ends with the final answer in \\boxed{}."
)


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


def load_rows(source: str, prompt_key: str = "problem", answer_key: str = "answer",
              demo_key: str | None = None, need_demo: bool = False) -> list[dict]:
    """Rows {prompt: str | chat messages, answer: str, demo: str | None, level} from a local .jsonl /
    .json / .parquet file or a hub data set. The first bad row raises ValueError saying how to fix it.
    LUFFY's openr1.parquet: prompt_key="prompt", answer_key="reward_model.ground_truth", demo_key="target"."""
    if need_demo and demo_key is None:
        raise ValueError("this method trains on demonstrations: name their field with --demo_key")
    name, rows = os.path.basename(source), []
    for n, record in enumerate(_read_records(source), start=1):
        where = f"row {n} of {name}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} is not an object with named fields")
        prompt, answer = _field(record, prompt_key), _field(record, answer_key)
        if prompt is _MISSING:
            raise ValueError(f"{where} has no field '{prompt_key}'; use --prompt_key to name the prompt field")
        if _is_chat(prompt):
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        elif not (isinstance(prompt, str) and prompt.strip()):
            raise ValueError(f"{where}: field '{prompt_key}' must be a non-empty string or a list of "
                             f"{{role, content}} messages, not {type(prompt).__name__} {str(prompt)[:50]!r}")
        if answer is _MISSING:
            raise ValueError(f"{where} has no field '{answer_key}'; use --answer_key to name the answer field")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(f"{where}: answer field '{answer_key}' must be a non-empty string or number, "
                             f"not {type(answer).__name__} {str(answer)[:50]!r}; fix or drop the row")
        demo = _field(record, demo_key, None) if demo_key else None
        if _is_chat(demo):  # a message list such as LUFFY's target: the assistant turn is the demonstration
            demo = next((m["content"] for m in reversed(demo) if m["role"] == "assistant"), None)
        if demo is not None and not isinstance(demo, str):
            raise ValueError(f"{where}: demonstration field '{demo_key}' must be a string or a list of "
                             f"{{role, content}} messages with an assistant turn, not {type(demo).__name__}")
        if need_demo and not (demo and demo.strip()):
            raise ValueError(f"{where} has no demonstration in field '{demo_key}'; this method needs one "
                             f"per row: drop the row or use --demo_key to name the demonstration field")
        rows.append({"prompt": prompt, "answer": str(answer).strip(), "demo": demo or None,
                     "level": record.get("level")})
    if not rows:
        raise ValueError(f"{source} holds no rows")
    return rows


def format_prompt(tokenizer, prompt: str | list[dict], system_prompt: str | None) -> str:
    """Chat-templated prompt text ending with the generation prompt (for LUFFY's model: `<think>\\n`)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:  # a data set's own messages win: add our system prompt only where it has none
        messages = list(prompt)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def strip_think_prefix(prompt_text: str, demo: str) -> str:
    """METHODS.md 0.4: when the prompt already opens the think block, the demonstration must not open it again."""
    if prompt_text.endswith("<think>\n"):
        for tag in ("<think>\n", "<think>"):
            if demo.startswith(tag):
                return demo[len(tag):]
    return demo


# ======================================================================================
# Embedded task: tiny tokenizer, tiny Qwen2, arithmetic problems, a pre-trained "base"
# ======================================================================================
# Everything is generated locally and deterministically (no hub downloads). The task is a yardstick for
# the question every fusion method answers: on problems the base model never solves, on-policy RL has
# no signal, and demonstrations bring it. So it has two kinds of level:
#
#   reachable     level 1  a+b+c            level 2  a+b+c+d                      (digits 1-9)
#   out of reach  level 3  t*k+b, b+t*k     level 4  three terms, one of them t*k
#
# A demonstration writes one line per step: the product first ("7*3=21"), then the running sum of the
# other terms in order ("21+5=26"). The base is pre-trained on levels 1-2 only, so it knows addition but
# has never seen "*": levels 3-4 need a handful of times-table facts and the rule "multiply first", which
# a demonstration shows in one line and which the base's own samples never contain. Every addition has a
# left operand of at most 27 (the base's range), so that one line is all a demonstration must teach.
# Digits are 1-9: with a 0, "skipping the 0" gives right answers for wrong reasons. The base learns
# from a fallible teacher that sometimes writes a partial sum one too high (never too low, so a slipped
# chain ends at a wrong answer): it solves levels 1-2 often, not always (mass for RL to sharpen).

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, eos (as in Qwen2.5)
# Added but not special: decode(skip_special_tokens=True) keeps them, so graders still find them.
ADDED = ["<think>", "</think>", "\\boxed{"]
# Qwen-style template; the generation prompt opens the thinking block like Qwen2.5-Math-16k-think.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
# Held-out problems are make_task(n, EVAL_SEED) with n <= HELDOUT_PER_LEVEL; the base never sees them.
EVAL_SEED, HELDOUT_PER_LEVEL = 1234, 200
TRAIN_PER_LEVEL = 250  # builtin training problems per level: equal, so every level weighs the same in training
TASK_VERSION = 3  # part of the base model's cache key: bump whenever the task or the base changes
BUILTIN_SETTINGS = {"max_prompt_len": 64, "max_response_len": 48}  # the task's budgets (demonstrations <= 40 tokens)
MAX_LEFT_OPERAND = 27  # the largest partial sum the base adds to (level 2: 9+9+9)
# The times-table facts t*k of levels 3-4. Chosen so that no wrong-steps shortcut reaches the product:
# it is at least 10 above t (a first line "t+X" with a digit X cannot land on it, a shortcut RL finds
# otherwise) and far from the misreading t+k. Products stay within the base's range of left operands.
FACTS = [(t, k) for k in (3, 4, 5) for t in range(2, 10) if t * k - t >= 10 and t * k <= MAX_LEFT_OPERAND]
# level: (number of terms, whether one of them is a product t*k)
LEVELS = {1: (3, "none"), 2: (4, "none"), 3: (3, "first"), 4: (3, "later")}


def _problem(terms) -> str:
    """terms: ints and at most one (t, k) product -> "5+7*3=?"."""
    return "+".join(f"{t[0]}*{t[1]}" if isinstance(t, tuple) else str(t) for t in terms) + "=?"


def _value(terms) -> int:
    return sum(t[0] * t[1] if isinstance(t, tuple) else t for t in terms)


def _slip_prob(s: int) -> float:
    """Probability that the base's teacher writes partial sum s as s + 1."""
    return min(0.5, (s / 25) ** 2)


def _demo(terms, slip=None):
    """The worked solution: the product first, then a running sum over the other terms in order. With
    `slip` (a random.Random) each written sum s is one too high with probability _slip_prob(s) and the
    chain goes on from the written value, so the answer is right only when every step is."""
    products = [t for t in terms if isinstance(t, tuple)]
    lines = [f"{t}*{k}={t * k}\n" for t, k in products]
    addends = [t * k for t, k in products] + [t for t in terms if not isinstance(t, tuple)]
    total = addends[0]
    for t in addends[1:]:
        s = total + t
        if slip is not None and slip.random() < _slip_prob(s):
            s += 1
        lines.append(f"{total}+{t}={s}\n")
        total = s
    return "".join(lines) + "</think>\n\\boxed{" + str(total) + "}"


def _level_problems(level: int) -> list:
    """Every problem of a level, in a fixed order (lists of ints with at most one (t, k) product)."""
    n_terms, product = LEVELS[level]
    out = []
    for digits in itertools.product(range(1, 10), repeat=n_terms - (product != "none")):
        if product == "none":
            if sum(digits[:-1]) <= MAX_LEFT_OPERAND:
                out.append(list(digits))
            continue
        for t, k in FACTS:
            if t * k + sum(digits[:-1]) > MAX_LEFT_OPERAND:
                continue
            for where in ([0] if product == "first" else range(1, n_terms)):
                out.append(list(digits[:where]) + [(t, k)] + list(digits[where:]))
    return out


def steps_correct(problem: str, response: str) -> bool:
    """Whether a response's worked steps (the text before </think>) are exactly the right running sums
    of `problem`: what the answer-only verifier cannot see (a right answer for wrong reasons)."""
    terms = [(int(t), int(k)) if k else int(t) for t, k in re.findall(r"(\d)(?:\*(\d))?", problem.removesuffix("=?"))]
    return response.split("</think>")[0].strip() == _demo(terms).split("</think>")[0].strip()


def make_task(n_per_level, seed, levels=(1, 2, 3, 4), exclude=frozenset()):
    """Rows {problem, answer, demo, level}: up to n_per_level distinct problems per level, not in
    `exclude`, drawn without replacement from a shuffle seeded by (seed, level); a smaller n gives a
    prefix of a larger n."""
    rows = []
    for level in levels:
        problems = _level_problems(level)
        random.Random(f"{seed}:{level}").shuffle(problems)
        taken = [p for p in problems if _problem(p) not in exclude][:n_per_level]
        rows += [{"problem": _problem(p), "answer": str(_value(p)), "demo": _demo(p), "level": level}
                 for p in taken]
    return rows


def build_tiny_tokenizer():
    """Byte-level BPE (a few hundred tokens) trained on task text with exactly the Qwen2 normaliser and
    pre-tokeniser: with a Qwen2 config, AutoTokenizer reloads a Qwen2Tokenizer that rebuilds this
    pipeline from vocab + merges, so anything else would change the ids after a save/load round trip.
    The Qwen2 regex splits numbers into single digits, which suits arithmetic."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # The trainer would learn merges across "<|im_end|>" etc., so train only on the text between them.
    split = re.compile("|".join(map(re.escape, SPECIAL + ADDED)))
    texts = [f"<|im_start|>{role}\n{r['problem']}<|im_end|>\n<|im_start|>assistant\n<think>\n{r['demo']}<|im_end|>\n"
             for role in ("system", "user") for r in make_task(200, seed=0)]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # any text encodes
    bpe.train_from_iterator([piece for t in texts for piece in split.split(t) if piece], trainer)
    trained = json.loads(bpe.to_str())["model"]
    # Build it the way from_pretrained will rebuild it; the specials keep ids 0-2 from the trainer.
    tok = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"])
    tok.add_tokens(ADDED)  # one token each; the Qwen2 regex alone would split "\boxed" from "{"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model_config(tokenizer):
    """0.6M-parameter Qwen2. On 2 CPU cores its cost is mostly matmul FLOPs, so narrow MLPs (256)
    buy steps; 4 layers are needed to find the next term in the prompt reliably."""
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _pretrain(model, tokenizer, exclude, seed, steps=1200, batch_size=32, lr=3e-3, share2=0.35, share_x1=0.15):
    """Plain SFT on level-1/2 problems (a share2 fraction at level 2, none of them held out) with the
    fallible teacher's demonstrations, plus a share_x1 fraction of three-term problems with one t*1
    term anywhere: the base knows the notation and the rule "the product's line comes first" (so a
    demonstration's first tokens are unlikely to it, not impossible), but no fact beyond t*1 = t. Cross-entropy on demo +
    eos only (prompt masked), AdamW, 5% warm-up, then linear decay to 0."""
    rng = random.Random(seed)
    pools = {level: [p for p in _level_problems(level) if _problem(p) not in exclude] for level in (1, 2)}
    pools["x1"] = [list(p[:i]) + [(t, 1)] + list(p[i:]) for t in range(1, 10) for p in itertools.product(range(1, 10), repeat=2)
                   for i in range(3)]

    def example():
        u = rng.random()
        terms = rng.choice(pools["x1" if u < share_x1 else 2 if u < share_x1 + share2 else 1])
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": _problem(terms)}],
                                               add_generation_prompt=True, tokenize=False)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(_demo(terms, slip=rng) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return p + t, [-100] * len(p) + t

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm)))
    model.train()
    for _ in (bar := tqdm(range(steps), desc="pre-training the tiny base model", mininterval=2)):
        batch = [example() for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)  # right padding; pad is never a target
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        loss = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def build_base_model(cache_dir, seed=0):
    """Directory with the pre-trained tiny base (safetensors) and its tokenizer; built once (about a
    minute on 2 CPU cores), then reused. Written to a temporary directory and renamed into place, so
    an interrupted build never leaves a directory that looks complete."""
    path = os.path.join(cache_dir, f"tiny-qwen2-arith-v{TASK_VERSION}-seed{seed}")
    if os.path.isdir(path):
        return path
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_model_config(tokenizer))
    _pretrain(model, tokenizer, {r["problem"] for r in make_task(HELDOUT_PER_LEVEL, EVAL_SEED)}, seed)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)  # same file system, so the rename is atomic
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same build first: keep its copy
        shutil.rmtree(tmp)
    return path


# ======================================================================================
# Model, FSDP2, and per-token log-probs / entropies (Eq. 1-2)
# ======================================================================================


def _logprob_entropy(hidden, weight, labels, temperature: float, with_entropy: bool):
    """Eq. (1) and Eq. (2) for a chunk of response positions.

    hidden [n, H], weight [V, H], labels [n] -> logp [n], entropy [n] (fp32). Only this chunk's
    [n, V] logits ever exist; compiled, the fp32 cast, softmax and reductions fuse into one pass.
    """
    logits = (hidden @ weight.T).float() / temperature  # [n, V]
    logz = torch.logsumexp(logits, dim=-1)  # [n]
    logp = logits.gather(-1, labels[:, None]).squeeze(-1) - logz  # Eq. (1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # Eq. (2): -sum q log q
    return logp, entropy


_compiled = {}


def logprob_entropy_kernel(compile: bool):
    """_logprob_entropy, torch.compile'd on first request (so that importing common, and a --no-compile
    run, never pay for the compiler's import)."""
    if not compile:
        return _logprob_entropy
    if "kernel" not in _compiled:
        _compiled["kernel"] = torch.compile(_logprob_entropy, dynamic=True)
    return _compiled["kernel"]


class PolicyModel(nn.Module):
    """A causal LM that returns per-token log-probs and entropies of the response tokens only.

    Batch layout (see `make_batch`): prompts left-padded to width P, responses right-padded to
    width R, so response token t of every row sits at column P + t and is predicted from column
    P + t - 1. Outputs are [B, R] matrices, the c_{i,t} / m_{i,t} grid of the equations.
    The LM head runs on the masked response positions only, in chunks, under activation
    checkpointing, so the [B, T, V] logits never exist (ENGINEERING.md: log-prob memory).
    This wrapper is also the FSDP2 root, so the root's hooks cover the LM head call.
    """

    def __init__(self, lm: nn.Module, compile: bool = True, chunk_size: int = 1024):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size
        self.kernel = logprob_entropy_kernel(compile)

    def forward(self, input_ids, attention_mask, response_mask, temperature: float = 1.0,
                with_entropy: bool = False):
        R = response_mask.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, -R - 1:-1]  # [B, R, H]: the positions that predict the response tokens
        labels = input_ids[:, -R:]  # [B, R]
        mask = response_mask.bool()
        h, y = hidden[mask], labels[mask]  # [N, H], [N]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        logps, ents = [], []
        for i in range(0, h.shape[0], self.chunk_size):
            args = (h[i:i + self.chunk_size], weight, y[i:i + self.chunk_size], temperature, with_entropy)
            if torch.is_grad_enabled():
                lp, en = torch.utils.checkpoint.checkpoint(self.kernel, *args, use_reentrant=False)
            else:
                lp, en = self.kernel(*args)
            logps.append(lp)
            ents.append(en)
        logp = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)  # [B, R]
        entropy = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)  # [B, R]
        if logps:
            logp = logp.masked_scatter(mask, torch.cat(logps))
            entropy = entropy.masked_scatter(mask, torch.cat(ents))
        return logp, entropy


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device,
               prefix_lens: list[int] | None = None) -> dict:
    """Left-pad prompts, right-pad responses: {input_ids, attention_mask [B, P+R], response_mask [B, R]}.
    With prefix_lens also prefix_mask [B, R]: 1 on the first prefix_lens[i] response tokens, the ones
    given to the sampler (a demonstration, hint or anchor) rather than sampled by it."""
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    ids = torch.full((len(prompts), P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, P - len(p):P + len(r)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "response_mask": attn[:, P:].to(device)}
    if prefix_lens is not None:
        batch["prefix_mask"] = (torch.arange(R)[None, :] < torch.tensor(prefix_lens)[:, None]).long().to(device)
    return batch


def model_inputs(mb: dict) -> dict:
    """The keys of a (micro-)batch that PolicyModel.forward takes."""
    return {k: mb[k] for k in ("input_ids", "attention_mask", "response_mask")}


def check_context_length(model_path: str, total: int):
    """Stop before any weights load when prompt + response budgets exceed the model's positions:
    vLLM refuses such an engine, and the training forward would silently run past the positions
    the model was trained on."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if limit and rope.get("rope_type", rope.get("type")) in ("linear", "dynamic", "yarn") and rope.get("factor"):
        limit = int(rope.get("original_max_position_embeddings", limit) * rope["factor"])  # extended context
    if limit and total > limit:
        raise SystemExit(
            f"error: --max_prompt_len + --max_response_len = {total} tokens, but {model_path} has {limit} "
            f"positions (max_position_embeddings). Use a long-context variant, e.g. the 16k-position "
            f"Qwen2.5-Math with RoPE theta 40,000 of LUFFY (Elliott/Qwen2.5-Math-7B-16k-think) or ReLIFT "
            f"(RoadQAQ/Qwen2.5-Math-1.5B-16k-think), or lower the two budgets to sum to at most {limit}.")


def is_sharded(d: Dist) -> bool:
    """FSDP2 whenever several ranks run or on a GPU (bf16 compute, fp32 master weights)."""
    return d.world_size > 1 or d.device.type == "cuda"


def wrap_policy(lm, d: Dist, compile: bool, train: bool = True) -> PolicyModel:
    """PolicyModel around `lm`, sharded with FSDP2 when `is_sharded(d)`: each decoder layer, then the
    root (embeddings, final norm and LM head, so tied embeddings stay one parameter)."""
    model = PolicyModel(lm, compile=compile)
    if is_sharded(d):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if d.device.type == "cuda" else MixedPrecisionPolicy()
        for layer in lm.get_decoder().layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    model.train(train)
    if not train:
        model.requires_grad_(False)
    return model


def load_policy(path: str, d: Dist, compile: bool = True, gradient_checkpointing: bool = False,
                train: bool = True) -> PolicyModel:
    """The HF model at `path` as a PolicyModel with fp32 weights (FSDP2 casts to bf16 for compute on GPU).

    Sharded, no rank ever holds the whole model on its GPU, and only rank 0 reads it into host RAM:
    every rank builds the model on the meta device (no memory), shards it, allocates its own shard,
    and rank 0 broadcasts the checkpoint tensor by tensor into the shards. A single CPU process
    simply loads it."""
    if not is_sharded(d):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(d.device)
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return wrap_policy(lm, d, compile, train)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, GenerationConfig

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    try:  # stop tokens come from here (see `stop_token_ids`), so keep the checkpoint's own
        lm.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the one derived from the model config stays
        pass
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_policy(lm, d, compile, train)
    model.to_empty(device=d.device)  # this rank's shards, uninitialised
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) if d.main else None
    set_model_state_dict(model, {"lm." + k: v for k, v in full.state_dict().items()} if full else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Non-persistent buffers (RoPE inv_freq) are in no checkpoint: rank 0's freshly built ones are broadcast.
    source = dict(full.named_buffers()) if full else {}
    with torch.no_grad():
        for name, buf in lm.named_buffers():
            if full:
                buf.copy_(source[name])
            dist.broadcast(buf, src=0)
    return model


def plain_copy(model: PolicyModel, device) -> nn.Module:
    """An unsharded copy of the policy's HF model, for the torch sampler under FSDP. Built on the
    meta device and allocated, with the policy's buffers; its weights arrive with `sync_weights`."""
    lm = model.lm
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32)
    copy.to_empty(device=device)
    copy.tie_weights()  # to_empty gave tied weights separate tensors
    with torch.no_grad():
        for (name, buf), (name2, src) in zip(copy.named_buffers(), lm.named_buffers()):
            assert name == name2, (name, name2)
            buf.copy_(src)
    copy.generation_config = lm.generation_config
    return copy.eval().requires_grad_(False)


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: PolicyModel, dtype: torch.dtype | None = None):
    """(name, full tensor) over the HF model's weights, with HF names, one tensor at a time: never a
    full copy of the model. With `dtype`, each local shard is cast before it is gathered (a bf16
    engine receives bf16 all-gathers, not the fp32 master weights). A collective under FSDP2:
    every rank must iterate it to the end."""
    for name, tensor in model.state_dict().items():
        if dtype is not None:
            tensor = tensor.to(dtype)
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name.removeprefix("lm."), tensor


# ======================================================================================
# Verifier: binary math reward, METHODS.md 0.4
# ======================================================================================

MAX_ANSWER_CHARS = 1000  # a longer \boxed{} is never a real final answer, and it is where parsing blows up


def extract_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (balanced braces; \\{ and \\} are not braces), else None."""
    found, i = None, text.find("\\boxed{")
    while i != -1:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            if text[j] == "\\":
                j += 1  # skip the escaped character
            elif text[j] in "{}":
                depth += 1 if text[j] == "{" else -1
            j += 1
        if depth:  # unclosed (truncated generation): keep the last complete one
            break
        found = text[i + len("\\boxed{"): j - 1]
        i = text.find("\\boxed{", j)  # boxes nested inside this one are not final answers
    return found


def _grade(answer: str, gold: str, timeout: int) -> float:
    # The gold must be wrapped in math delimiters: bare LaTeX golds are misread (2\sqrt{2} parses as 2).
    gold_parsed = parse("$" + gold + "$", parsing_timeout=timeout)
    pred_parsed = parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
    # Never str()/repr() a parsed expression: on deeply nested input that takes minutes, outside any timeout.
    ok = bool(gold_parsed) and bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=timeout)
    return float(ok)


class Verifier:
    """rewards = Verifier()(responses, golds): 1.0 if the final answer equals the gold answer, else 0.0.

    A response is the text generated after a prompt that ends with `<think>\\n`. As in LUFFY, the answer
    is the text after the first `</think>` and before a second one, if any (LUFFY prepends `<think>\\n`
    and takes `split("</think>")[1]`); without `</think>` the reward is 0 when require_think. Unlike
    LUFFY, which gives the whole answer text to math-verify, we grade only its last \\boxed{} (the system
    prompt asks for one), so a response without one scores 0 without calling math-verify.

    math-verify times out with SIGALRM, which works only on a process's main thread and cannot stop
    work outside its timed sections or inside one long C call. So grading runs in a fork pool, one task
    per item, each awaited at most `backstop_s`; an item that overruns scores 0 and the pool is replaced,
    so a stuck worker cannot stall later calls. num_workers=0 grades on the calling thread, which must be
    the main thread: handy for debugging, but with no backstop.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 2.0, require_think: bool = True):
        self.num_workers, self.require_think = num_workers, require_think
        # math-verify passes its timeouts to signal.alarm, which takes whole seconds: a float makes
        # every parse raise inside math-verify, which then silently returns "no answer" (reward 0).
        self.timeout = max(1, math.ceil(timeout_s))
        self.backstop_s = 3.0 * self.timeout  # two parses and one comparison, each up to its own timeout
        self._pool = None  # created on first use, so a verifier that is never called costs nothing

    def answer(self, response: str) -> str | None:
        """The text to grade, or None when the response scores 0 without grading."""
        if "</think>" in response:
            response = response.split("</think>", 2)[1]
        elif self.require_think:
            return None
        boxed = extract_boxed(response)
        return boxed if boxed and boxed.strip() and len(boxed) <= MAX_ANSWER_CHARS else None

    def __call__(self, responses: list[str], golds: list[str]) -> list[float]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        rewards = [0.0] * len(responses)
        todo = [(i, a, str(g)) for i, (r, g) in enumerate(zip(responses, golds))
                if (a := self.answer(r)) is not None]
        if self.num_workers == 0:
            for i, a, g in todo:
                rewards[i] = _grade(a, g, self.timeout)
            return rewards
        while todo:
            if self._pool is None:
                # fork: workers start at once and inherit math_verify; they never touch torch or CUDA
                self._pool = mp.get_context("fork").Pool(self.num_workers)
            pending = [self._pool.apply_async(_grade, (a, g, self.timeout)) for _, a, g in todo]
            for k, ((i, _, _), result) in enumerate(zip(todo, pending)):
                # Tasks run in submission order, so item k is already running when we start waiting:
                # the backstop bounds its own run time, not the queue before it.
                try:
                    rewards[i] = result.get(timeout=self.backstop_s)
                except mp.TimeoutError:  # item k keeps its 0; kill the stuck worker, regrade the rest
                    self.close()
                    todo = todo[k + 1:]
                    break
            else:
                todo = []
        return rewards

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


# ======================================================================================
# Sampling: one interface, two backends (torch `generate` on CPU, colocated vLLM on GPUs)
# ======================================================================================


@dataclass
class Sample:
    prompt_ids: list[int]
    prefix_ids: list[int]  # demonstration tokens given as the start of the response (may be empty)
    generated_ids: list[int]  # exactly the sampled tokens, the stop token included when one was sampled
    text: str  # decoded prefix + continuation: what the verifier grades
    finished: bool  # the last sampled token is a stop token (False: cut at the response budget)
    logprobs: list[float] | None = None  # the sampler's log-prob of each generated token (vLLM, if asked)

    @property
    def response_ids(self) -> list[int]:
        return self.prefix_ids + self.generated_ids


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The one set of tokens that ends a response, for both samplers: the tokenizer's EOS plus the
    eos_token_id(s) of the model's generation_config (an int or a list), which vLLM stops on too
    (Qwen2.5 instruct models: <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(i for i in ids if i is not None)


class TorchSampler:
    """Batched sampling with a KV cache through `transformers.generate`.

    In one process it samples from the training model itself; under FSDP it keeps its own plain
    copy of the model and receives the full weights after each update, exactly as vLLM does.
    """

    def __init__(self, tokenizer, lm, batch_size: int = 256, stop_ids: list[int] | None = None):
        self.tokenizer, self.lm, self.batch_size = tokenizer, lm, batch_size
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_ids if stop_ids is not None else \
            stop_token_ids(tokenizer, getattr(lm, "generation_config", None))

    def sync_weights(self, model: PolicyModel):
        if model.lm is self.lm:
            return
        params = dict(self.lm.named_parameters())
        with torch.no_grad():
            for name, tensor in full_state_dict(model):
                if name in params:
                    params[name].copy_(tensor)

    @torch.no_grad()
    def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None) -> list[list[Sample]]:
        """n samples for each prompt (optionally continuing from prefixes[i]); responses get at
        most max_tokens tokens, prefix included."""
        prefixes = prefixes or [[] for _ in prompts]
        rows = [(i, p + pre) for i, (p, pre) in enumerate(zip(prompts, prefixes)) for _ in range(n)]
        budget = max_tokens - min(len(pre) for pre in prefixes)
        was_training = self.lm.training
        self.lm.eval()  # also re-enables the KV cache when gradient checkpointing is on
        out = [[] for _ in prompts]
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            width = max(len(x) for _, x in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for j, (_, x) in enumerate(chunk):  # left padding
                ids[j, width - len(x):], attn[j, width - len(x):] = torch.tensor(x), 1
            gen = self.lm.generate(input_ids=ids.to(self.lm.device), attention_mask=attn.to(self.lm.device),
                                   do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                   max_new_tokens=max(budget, 1), eos_token_id=self.stop_ids,
                                   pad_token_id=self.pad_id)[:, width:].tolist()
            for (i, _), g in zip(chunk, gen):
                out[i].append(self._sample(prompts[i], prefixes[i], g, max_tokens))
        self.lm.train(was_training)
        return out

    def _sample(self, prompt, prefix, generated, max_tokens) -> Sample:
        generated = generated[:max_tokens - len(prefix)]
        stop = next((k for k, t in enumerate(generated) if t in self.stop_ids), None)
        if stop is not None:  # cut the padding that generate() appends after the stop token
            generated = generated[:stop + 1]
        text = self.tokenizer.decode(prefix + generated, skip_special_tokens=True)
        return Sample(prompt, list(prefix), generated, text, finished=stop is not None)


VLLM_MISSING = ("error: sampling on GPUs uses vLLM (--sampler auto or vllm), which is not importable here ({}). "
                "Install it with `pip install vllm==0.33.0`, or pass --sampler torch.")
ENGINE_DTYPE = torch.bfloat16  # the engine's weights; pushed weights are cast to it before gathering


class VLLMSampler:
    """A colocated vLLM engine in every rank (vLLM 0.33; ENGINEERING.md). GPU only: it has not run
    on a GPU yet; tests/test_vllm_contract.py pins its side of the protocol with a stand-in vllm.

    One engine per torchrun rank (`external_launcher`, tensor parallel 1, seed + rank), created
    after the policy shards and before the optimizer state. Per step, `sync_weights` then
    `generate`: with sleep mode, wake the weights, push every weight under its HF name (one gathered
    bf16 tensor at a time), reset the prefix cache (its KV blocks belong to the old policy), wake
    the KV cache, generate, sleep (level 2: weights and KV cache dropped, the GPU is the trainer's
    again). Without sleep mode, the same without the wake and sleep calls.
    """

    def __init__(self, tokenizer, model_path: str, rank: int, seed: int, max_model_len: int,
                 gpu_memory_utilization: float, sleep: bool, max_num_batched_tokens: int,
                 stop_ids: list[int], logprobs: bool = False):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise SystemExit(VLLM_MISSING.format(e))
        self.tokenizer, self.rank, self.sleep, self.stop_ids = tokenizer, rank, sleep, list(stop_ids)
        self.logprobs, self.SamplingParams = logprobs, SamplingParams
        # logprobs_mode: the log-probs of the distribution sampled from (after temperature), as the trainer's
        extra = {"logprobs_mode": "processed_logprobs"} if logprobs else {}
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=str(ENGINE_DTYPE).removeprefix("torch."),
                       seed=seed, distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       max_num_batched_tokens=max_num_batched_tokens, enable_sleep_mode=sleep,
                       enable_prefix_caching=True, **extra)
        self.asleep = False
        if sleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def sync_weights(self, model: PolicyModel):
        if self.asleep:
            torch.cuda.empty_cache()  # return the trainer's cached blocks before the engine maps its memory
            self.llm.wake_up(tags=["weights"])
        weights = full_state_dict(model, dtype=ENGINE_DTYPE)  # every rank gathers: a collective
        self.llm.apply_model(lambda m: m.load_weights(weights))
        self.llm.reset_prefix_cache()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None,
                 seed: int | None = None) -> list[list[Sample]]:
        """n samples for each prompt (optionally continuing from prefixes[i]), as token ids; responses
        get at most max_tokens tokens, prefix included. With `seed`, every request gets its own seed
        (`request_seeds`), so the same call draws the same samples (evaluation); without, the
        engine's seed (--seed + rank) drives the draws."""
        assert not self.asleep, "sync_weights() must run before generate() in sleep mode"
        prefixes = prefixes or [[] for _ in prompts]
        seeds = request_seeds(seed, self.rank, len(prompts)) if seed is not None else [None] * len(prompts)
        params = [self.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1, seed=s,
                                      max_tokens=max(1, max_tokens - len(pre)), stop_token_ids=self.stop_ids,
                                      logprobs=0 if self.logprobs else None, detokenize=False)
                  for pre, s in zip(prefixes, seeds)]
        outs = self.llm.generate([{"prompt_token_ids": p + pre} for p, pre in zip(prompts, prefixes)],
                                 params, use_tqdm=False)
        result = []
        for p, pre, o in zip(prompts, prefixes, outs):
            if len(o.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(o.outputs)} samples for a prompt, expected {n}")
            result.append([self._sample(p, pre, c, max_tokens) for c in sorted(o.outputs, key=lambda c: c.index)])
        if self.sleep:
            self.llm.sleep(level=2)
            self.asleep = True
        return result

    def _sample(self, prompt, prefix, c, max_tokens) -> Sample:
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason={c.finish_reason!r}")
        ids = list(c.token_ids)[:max(0, max_tokens - len(prefix))]  # vLLM keeps a sampled stop token here
        # finished = the last sampled token stops, also when it came exactly at the budget (vLLM then
        # reports "length"); nothing is ever appended, so the loss mask covers exactly what was sampled
        finished = bool(ids) and ids[-1] in self.stop_ids
        if c.finish_reason == "stop" and not finished and len(ids) == len(c.token_ids):
            raise RuntimeError(f"vLLM stopped on token {ids[-1] if ids else None}, which is not in the stop set "
                               f"{self.stop_ids}: the trainer and the engine disagree on where responses end")
        logprobs = [step[t].logprob for step, t in zip(c.logprobs, ids)] if self.logprobs else None
        text = self.tokenizer.decode(prefix + ids, skip_special_tokens=True)
        return Sample(prompt, list(prefix), ids, text, finished, logprobs)


def request_seeds(seed: int, rank: int, count: int) -> list[int]:
    """Per-request seeds of a seeded generate() on `rank`: the same for the same (seed, rank, position),
    independent 47-bit draws otherwise. vLLM seeds the k-th of a request's n samples with seed + k;
    two requests' ranges of n seeds meet with probability about 2n / 2**47."""
    if seed < 0:
        raise ValueError(f"sampling seeds must be non-negative, got {seed}")
    words = np.random.SeedSequence([seed, rank]).generate_state(count, dtype=np.uint64)
    return [int(w) >> 17 for w in words]


GiB = 2 ** 30


def vllm_memory_fraction(free: int, total: int, param_bytes: int, sleep: bool, headroom: int = 3 * GiB) -> float:
    """Default --vllm_gpu_memory_utilization, from the memory arithmetic (README, GPU section).

    vLLM claims `fraction x total` bytes for its bf16 weights, activations and KV cache. It starts
    after this rank's fp32 policy (and reference) shards are on the GPU, so `free` already excludes
    them. Still to come and resident for the whole run: AdamW's two fp32 moments per trainable
    parameter, 2 x `param_bytes` (this rank's trainable shards, fp32). Gradients are freed after
    every optimizer step (zero_grad(set_to_none=True)), before the next generation.

    Sleep mode: the engine's memory and training's working memory (gradients, activations) are never
    held at once, so the engine takes everything beside the resident state and a headroom (NCCL
    buffers, the root module's gathered bf16 weights, fragmentation):
        fraction = (free - 2 * param_bytes - headroom) / total
    No sleep mode: the engine keeps its share while training runs, which also needs the gradients
    (param_bytes) and activations; the engine takes half of what is left after those."""
    spare = free - 2 * param_bytes - headroom
    return math.floor(1000 * (spare if sleep else (spare - param_bytes) / 2) / total) / 1000  # rounded down


def sampler_kind(cfg: BaseConfig) -> str:
    return cfg.sampler if cfg.sampler != "auto" else ("vllm" if torch.cuda.is_available() else "torch")


def alloc_conf_expandable() -> str | None:
    """The allocator variable that turns expandable segments on, if any (vLLM's sleep mode asserts on it)."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        items = os.environ.get(var, "").replace(" ", "").split(",")
        settings = dict(item.split(":", 1) for item in items if ":" in item)
        if settings.get("expandable_segments", "").lower() == "true":
            return var
    return None


def check_sampler(cfg: BaseConfig):
    """The sampler's requirements that need no weights: checked before anything loads, one line each."""
    if sampler_kind(cfg) != "vllm":
        return
    if not torch.cuda.is_available():
        raise SystemExit("error: --sampler vllm needs a CUDA GPU; on CPU use --sampler torch (the default there)")
    if importlib.util.find_spec("vllm") is None:  # found, not imported: importing waits for the engine
        raise SystemExit(VLLM_MISSING.format("no module named 'vllm'"))
    if cfg.vllm_sleep and (var := alloc_conf_expandable()):
        raise SystemExit(f"error: {var}={os.environ[var]} turns on expandable segments, which vLLM's sleep mode "
                         f"cannot work with (its memory pool asserts). Remove expandable_segments:True from {var}, "
                         f"or pass --no-vllm_sleep.")


def make_sampler(cfg: BaseConfig, d: Dist, tokenizer, model_path: str, model: PolicyModel):
    """The sampler for this run; call it after the policy (and reference) model, before the optimizer."""
    stop_ids = stop_token_ids(tokenizer, model.lm.generation_config)
    if sampler_kind(cfg) == "vllm":
        fraction = cfg.vllm_gpu_memory_utilization
        if fraction <= 0:
            free, total = torch.cuda.mem_get_info(d.device)
            shard = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes
                        for p in model.parameters() if p.requires_grad)
            fraction = vllm_memory_fraction(free, total, shard, cfg.vllm_sleep)
            weights = 2 * sum(p.numel() for p in model.parameters())  # the engine's bf16 copy
            print0(f"vLLM memory: {fraction:.3f} of {total / GiB:.1f} GiB ({free / GiB:.1f} GiB free now, "
                   f"{2 * shard / GiB:.1f} GiB of optimizer state to come, sleep mode {cfg.vllm_sleep})")
            if fraction * total < weights + 2 * GiB:
                raise SystemExit(
                    f"error: only {max(fraction, 0) * total / GiB:.1f} GiB of GPU memory would be left for vLLM beside "
                    f"the training state, not enough for its {weights / GiB:.1f} GiB of weights and a KV cache. "
                    f"Use more GPUs (smaller shards), a smaller model, or set --vllm_gpu_memory_utilization.")
        return VLLMSampler(tokenizer, model_path, d.rank, seed=cfg.seed + d.rank,
                           max_model_len=cfg.max_prompt_len + cfg.max_response_len,
                           gpu_memory_utilization=fraction, sleep=cfg.vllm_sleep,
                           max_num_batched_tokens=cfg.vllm_max_num_batched_tokens, stop_ids=stop_ids,
                           logprobs=cfg.rollout_debug)
    if is_fsdp(model):  # the sampler needs whole weights: its own plain copy, filled now
        sampler = TorchSampler(tokenizer, plain_copy(model, d.device), stop_ids=stop_ids)
        sampler.sync_weights(model)
        return sampler
    return TorchSampler(tokenizer, model.lm, stop_ids=stop_ids)


class RolloutDebug:
    """--rollout_debug: wraps a sampler and writes <output_dir>/rollout_debug.jsonl, one line per
    generate() call with one entry per rank, for the GPU smoke test (scripts/gpu_smoke.sh):

      weights      sum of the trainer's weights (changes exactly when an update changed them)
      logprob_gap  mean / max |log-prob sampler - log-prob trainer| over the sampled tokens of up to
                   16 samples, for samplers that return log-probs (vLLM); stale or garbled engine
                   weights show up here
      probe        a seeded draw (one fixed prompt, n=2, 16 tokens) before the call: equal while the
                   weights stay equal, different after an update reached the sampler
      first        at the first call only, an unseeded draw of the same prompt from each rank's own
                   generator: equal across ranks would mean equal sampling seeds
      memory       GPU memory (GiB) after each phase: training peak, before the weight push, engine
                   awake, after generation (engine asleep again with sleep mode)

    Every rank calls generate() equally often, so the gathers and the trainer forward line up. The
    probes leave torch's generator untouched (a torch-sampler run logs what it logs without them),
    but the unseeded one advances vLLM's: a debug run is for smoke tests, not for results."""

    PROBE_SEED = 1234

    def __init__(self, sampler, d: Dist, path: str, probe_prompt: list[int], pad_id: int):
        self.sampler, self.d, self.path, self.probe_prompt, self.pad_id = sampler, d, path, probe_prompt, pad_id
        self.calls, self.model, self.record = 0, None, {}
        if d.main:
            open(path, "w").close()  # this process's calls only (a resumed run starts a new file)

    def sync_weights(self, model: PolicyModel):
        self.model, self.record = model, {"memory": {}}
        self._memory("train_peak")
        self._memory("before_push")
        local = sum(float((p.to_local() if hasattr(p, "to_local") else p).detach().double().sum())
                    for p in model.parameters())
        self.record["weights"] = all_reduce([local])[0]
        for key, seed in ([("first", None)] if self.calls == 0 else []) + [("probe", self.PROBE_SEED)]:
            self.sampler.sync_weights(model)  # a sleeping engine needs the push again after every draw
            self.record[key] = [s.generated_ids for s in self._draw(seed)]
        self.sampler.sync_weights(model)
        self._memory("engine_awake")

    def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None, **kw):
        groups = self.sampler.generate(prompts, n, temperature, top_p, max_tokens, prefixes, **kw)
        self._memory("after_generate")
        if getattr(self.sampler, "logprobs", False) and top_p == 1.0:
            self.record["logprob_gap"] = self._logprob_gap([s for g in groups for s in g][:16], temperature)
        records = [None] * self.d.world_size
        if dist.is_initialized():
            dist.all_gather_object(records, self.record)
        else:
            records = [self.record]
        if self.d.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"call": self.calls, "ranks": records}) + "\n")
        self.calls += 1
        return groups

    def _draw(self, seed):
        """n=2 samples of the probe prompt; they leave the torch generator where it was."""
        seeded = seed is not None and "seed" in inspect.signature(self.sampler.generate).parameters
        with torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else []):
            if seed is not None and not seeded:  # a sampler without a seed parameter draws from torch's
                torch.manual_seed(seed)
            return self.sampler.generate([self.probe_prompt], 2, 1.0, 1.0, 16, **({"seed": seed} if seeded else {}))[0]

    @torch.no_grad()
    def _logprob_gap(self, samples: list[Sample], temperature: float) -> dict | None:
        """One trainer forward on every rank (a collective under FSDP), on a dummy row if none here."""
        batch = make_batch([s.prompt_ids + s.prefix_ids for s in samples] or [[self.pad_id]],
                           [s.generated_ids for s in samples] or [[self.pad_id]], self.pad_id, self.d.device)
        logp, _ = self.model(**batch, temperature=temperature)  # [B, R]
        gaps = [abs(float(logp[i, t]) - lp) for i, s in enumerate(samples) for t, lp in enumerate(s.logprobs)]
        return {"mean": sum(gaps) / len(gaps), "max": max(gaps), "tokens": len(gaps)} if gaps else None

    def _memory(self, phase: str):
        if not torch.cuda.is_available():
            return
        free, total = torch.cuda.mem_get_info()
        if phase == "train_peak":
            self.record["memory"][phase] = torch.cuda.max_memory_allocated() / GiB
            torch.cuda.reset_peak_memory_stats()
        else:
            self.record["memory"][phase] = {"allocated": torch.cuda.memory_allocated() / GiB,
                                            "reserved": torch.cuda.memory_reserved() / GiB,
                                            "used": (total - free) / GiB}


# ======================================================================================
# Loss aggregation (Eq. 6-8) over a whole optimizer step: all micro-batches, all ranks
# ======================================================================================

AGGREGATIONS = ("token-mean", "seq-mean", "constant")


def step_normaliser(masks: list[torch.Tensor], mode: str, constant: float = 0.0) -> float:
    """Denominator of one optimizer step's loss, from the response masks [B, R] of all its
    micro-batches on this rank (all-reduced over ranks):

        token-mean  Eq. (6): total number of response tokens,
        seq-mean    Eq. (7): total number of sequences (each one a token-mean itself, see `aggregate`),
        constant    Eq. (8): the given constant C (e.g. D * L_max), independent of lengths.

    The result is divided by the world size: FSDP averages gradients over ranks, so each rank's
    loss is scaled by D to make the averaged gradient that of the global sum / denominator.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mode == "token-mean":
        total = all_reduce([sum(float(m.sum()) for m in masks)])[0]
    elif mode == "seq-mean":
        total = all_reduce([sum(m.shape[0] for m in masks)])[0]
    elif mode == "constant":
        assert constant > 0, "the constant normaliser of Eq. (8) needs a positive constant"
        total = constant
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")
    return max(total, 1.0) / world


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """This micro-batch's share of Agg(c) (Eq. 6-8); summed over micro-batches and averaged over
    ranks by FSDP it equals the aggregate over the whole optimizer step. per_token, mask: [B, R]."""
    mask = mask.to(per_token.dtype)
    if mode == "seq-mean":  # Eq. (7): mean over sequences of per-sequence token-means
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    return (per_token * mask).sum() / normaliser  # Eq. (6) / Eq. (8)


# ======================================================================================
# Optimiser: AdamW, constant or warm-up + cosine, global grad-norm clipping (FSDP2-aware)
# ======================================================================================


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, betas (0.9, 0.999) (METHODS 0.3 step 5)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                             weight_decay=weight_decay)


def make_optimizer(model: nn.Module, cfg: BaseConfig, total_steps: int):
    opt = adamw(model, cfg.lr, cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global L2 norm of all gradients (over shards and ranks), clipped to max_norm; returns it."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ======================================================================================
# One RL iteration's mechanics: mini-batches, old log-probs, optimizer step, core metrics
# ======================================================================================


def minibatches(samples: list, per_sample: dict, n_minibatches: int, micro_batch_size: int, pad_id: int,
                device) -> list[list[dict]]:
    """This rank's samples, in order, as n_minibatches optimizer steps of micro-batches (METHODS 0.3
    step 4). A micro-batch is make_batch of its samples (prefix_mask marks Sample.prefix_ids) plus its
    slice of every per-sample tensor in `per_sample` ({name: [N]} -> {name: [b_micro]})."""
    if len(samples) % n_minibatches:
        raise ValueError(f"{len(samples)} samples do not split into {n_minibatches} mini-batches")
    per = len(samples) // n_minibatches
    out = []
    for m in range(0, len(samples), per):
        minibatch = []
        for s in range(m, m + per, micro_batch_size):
            idx = list(range(s, min(s + micro_batch_size, m + per)))
            mb = make_batch([samples[i].prompt_ids for i in idx], [samples[i].response_ids for i in idx], pad_id,
                            device, prefix_lens=[len(samples[i].prefix_ids) for i in idx])
            mb.update({k: v[idx].to(device) for k, v in per_sample.items()})
            minibatch.append(mb)
        out.append(minibatch)
    return out


@torch.no_grad()
def old_logprobs(run: "Run", micro: list[dict], temperature: float):
    """Store logp_old of Eq. (3) and the entropies of pi_old (the model before this iteration's
    updates) in every micro-batch, and logp_ref (Eq. 11) when the run has a reference model."""
    for mb in micro:
        mb["old_logp"], mb["old_entropy"] = run.model(**model_inputs(mb), temperature=temperature, with_entropy=True)
        if run.ref_model is not None:
            mb["ref_logp"], _ = run.ref_model(**model_inputs(mb), temperature=temperature)


def optimizer_step(model: nn.Module, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the global grad norm, step the optimizer and its schedule (None: constant lr), zero the
    grads; returns the norm."""
    norm = clip_grad_norm(model, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def step_metrics(terms: list[dict], rollouts: list, rewards: torch.Tensor, micro: list[dict],
                 grad_norms: list[float], lr: float, t0: float, t1: float, t2: float) -> dict:
    """The core keys every RL trainer logs (README, "Metrics"), reduced over ranks.

    terms: one dict of detached loss terms per micro-batch, each the micro-batch's share of its
    optimizer step (same keys everywhere); summed, averaged over ranks and optimizer steps.
    rollouts, rewards: the samples the policy generated this step and their rewards (a demonstration
    is not a rollout). entropy: token-mean of Eq. (2) under pi_old over the sampled (non-prefix)
    tokens of `micro`; generated_tokens: their number (all ranks), the step's sampling cost.
    t0-t1 rollout, t1-t2 training, in seconds."""
    keys = sorted(terms[0])
    sampled = [mb["response_mask"] * (1 - mb.get("prefix_mask", torch.zeros_like(mb["response_mask"])))
               for mb in micro]
    sums = all_reduce([sum(float(t[k]) for t in terms) for k in keys] + [
        float(rewards.sum()), float((rewards == 1).sum()), len(rollouts),
        sum(len(s.response_ids) for s in rollouts), sum(not s.finished for s in rollouts),
        sum(float((mb["old_entropy"] * m).sum()) for mb, m in zip(micro, sampled)),
        sum(float(m.sum()) for m in sampled), sum(float(mb["attention_mask"].sum()) for mb in micro)])
    *term_sums, r_sum, correct, n_seq, n_resp, n_cut, ent_sum, n_sampled, n_tokens = sums
    world = dist.get_world_size() if dist.is_initialized() else 1
    metrics = {k: v / world / len(grad_norms) for k, v in zip(keys, term_sums)}
    metrics.update(reward=r_sum / max(n_seq, 1), accuracy=correct / max(n_seq, 1),
                   entropy=ent_sum / max(n_sampled, 1), response_length=n_resp / max(n_seq, 1),
                   generated_tokens=n_sampled,
                   truncated_frac=n_cut / max(n_seq, 1), grad_norm=sum(grad_norms) / len(grad_norms), lr=lr,
                   time_rollout=t1 - t0, time_train=t2 - t1, tokens_per_second=n_tokens / (t2 - t0))
    return metrics


# ======================================================================================
# Checkpoints: HF model + sharded optimiser (DCP) + RNG + trainer state, written atomically
# ======================================================================================


def latest_checkpoint(output_dir: str) -> str | None:
    """Newest complete checkpoint: `checkpoint-<step>` directories appear only by rename."""
    if not os.path.isdir(output_dir):
        return None
    steps = [int(m.group(1)) for n in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", n))]
    return os.path.join(output_dir, f"checkpoint-{max(steps):06d}") if steps else None


def save_checkpoint(output_dir: str, step: int, model: PolicyModel, tokenizer, optimizers: dict,
                    schedulers: dict, state: dict, keep: int = 2):
    """Write checkpoint-<step>/ {model/ (HF, safetensors), optim/ (DCP shards), rng-rank<r>.pt,
    trainer_state.pt} into a temporary directory, then rename it: a crash at any moment leaves the
    previous checkpoint intact. Multi-node runs need output_dir on a shared filesystem.
    An optimizer that has never stepped (ReLIFT's fine-tuning AdamW before its first step) is left
    out: get_optimizer_state_dict would initialise its state with a zero-lr step, so its first real
    step would count as the second in Adam's bias correction."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(output_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    optimizers = {k: o for k, o in optimizers.items() if o.state}  # stepped ones (same on every rank)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        weights = {k.removeprefix("lm."): v for k, v in weights.items()}
        model.lm.save_pretrained(os.path.join(tmp, "model"), state_dict=weights)
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
        torch.save({"step": step, "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                    "optimizers": sorted(optimizers), **state}, os.path.join(tmp, "trainer_state.pt"))
    dcp.save({k: get_optimizer_state_dict(model, o) for k, o in optimizers.items()},
             checkpoint_id=os.path.join(tmp, "optim"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        old = sorted(n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", n))
        for n in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(output_dir, n), ignore_errors=True)
    barrier()


def load_checkpoint(path: str, model: PolicyModel, optimizers: dict, schedulers: dict) -> dict:
    """Restore optimisers, schedulers and this rank's RNG; the weights were already loaded from
    path/model. Returns the trainer state dict (step, data position, method state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    saved = {k: o for k, o in optimizers.items() if k in state.get("optimizers", optimizers)}  # others: unstepped
    optim = {k: get_optimizer_state_dict(model, o) for k, o in saved.items()}
    dcp.load(optim, checkpoint_id=os.path.join(path, "optim"))
    for k, o in saved.items():
        set_optimizer_state_dict(model, o, optim[k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    rng_file = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.exists(rng_file):
        raise SystemExit(f"{path} was written by a run with fewer ranks; resume with the same world size")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state


# ======================================================================================
# Logging: metrics.jsonl (one object per step), console, optional wandb
# ======================================================================================


class MetricsLogger:
    def __init__(self, cfg: BaseConfig, resume_step: int | None):
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.main = not dist.is_initialized() or dist.get_rank() == 0
        self.wandb = None
        if not self.main:
            return
        if resume_step is not None and os.path.exists(self.path):  # drop what came after the checkpoint
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        elif os.path.exists(self.path):
            os.remove(self.path)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--wandb needs the wandb package: pip install wandb")
            self.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg),
                                    dir=cfg.output_dir, resume="allow")

    def log(self, step: int, metrics: dict):
        if not self.main:
            return
        record = {"step": step, **{k: None if v is None else float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=step)


# ======================================================================================
# Evaluation: pass@1 averaged over k samples per problem (METHODS 9), by difficulty level
# ======================================================================================


def evaluate(run: "Run") -> dict:
    cfg, d = run.cfg, run.d
    rows = run.eval_rows[d.rank::d.world_size]
    run.sampler.sync_weights(run.model)
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 10_000 + d.rank)  # same eval draws every time; training RNG untouched
        groups = run.sampler.generate([r["prompt_ids"] for r in rows], n=cfg.eval_samples,
                                      temperature=cfg.eval_temperature, top_p=1.0,
                                      max_tokens=cfg.max_response_len)
    rewards = run.verifier([s.text for g in groups for s in g],
                           [r["answer"] for r in rows for _ in range(cfg.eval_samples)])
    levels = sorted({r["level"] for r in run.eval_rows if r["level"] is not None}, key=str)
    sums = [0.0] * (2 + 2 * len(levels))  # [correct, count] overall, then per level
    for i, r in enumerate(rows):
        acc = sum(rewards[i * cfg.eval_samples:(i + 1) * cfg.eval_samples]) / cfg.eval_samples
        sums[0], sums[1] = sums[0] + acc, sums[1] + 1
        if r["level"] is not None:
            j = 2 + 2 * levels.index(r["level"])
            sums[j], sums[j + 1] = sums[j] + acc, sums[j + 1] + 1
    sums = all_reduce(sums)
    out = {"eval_accuracy": sums[0] / max(sums[1], 1)}
    for j, level in enumerate(levels):
        out[f"eval_accuracy_{level}"] = sums[2 + 2 * j] / max(sums[3 + 2 * j], 1)
    return out


def format_eval(metrics: dict) -> str:
    return "  ".join(f"{k.removeprefix('eval_accuracy').strip('_') or 'all'}={v:.3f}"
                     for k, v in metrics.items() if k.startswith("eval_accuracy"))


# ======================================================================================
# Run setup: everything a trainer needs before its loop, resume included
# ======================================================================================


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


@dataclass
class Run:
    cfg: BaseConfig
    d: Dist
    tokenizer: object
    model: PolicyModel
    ref_model: PolicyModel | None
    sampler: object
    verifier: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_rows: list
    eval_rows: list
    stream: PromptStream
    logger: MetricsLogger | None
    start_step: int = 0
    state: dict = field(default_factory=dict)  # method state restored from the checkpoint
    extra_optimizers: dict = field(default_factory=dict)  # name -> a second AdamW over the same parameters
    bar: object = None  # the progress bar of progress()

    def next_prompts(self, global_batch: int) -> list[dict]:
        """This rank's share of the next `global_batch` prompts (same draw on every rank)."""
        idx = self.stream.next(global_batch)
        per = global_batch // self.d.world_size
        return [self.train_rows[i] for i in idx[self.d.rank * per:(self.d.rank + 1) * per]]

    def save(self, step: int, state: dict | None = None):
        save_checkpoint(self.cfg.output_dir, step, self.model, self.tokenizer,
                        {"main": self.optimizer, **self.extra_optimizers}, {"main": self.scheduler},
                        {"data": self.stream.state_dict(), **(state or {})}, keep=self.cfg.keep_checkpoints)

    def evaluate_base(self):
        """Held-out accuracy before training (step 0), unless this run resumes."""
        if self.start_step == 0 and self.eval_rows:
            metrics = evaluate(self)
            self.logger.log(0, metrics)
            print0(f"eval before training: {format_eval(metrics)}")

    def end_step(self, step: int, metrics: dict, state: dict | None = None):
        """After training step `step` (1-based): evaluate when due, log, checkpoint when due."""
        cfg = self.cfg
        last = step == cfg.max_steps
        if self.eval_rows and (cfg.eval_every and step % cfg.eval_every == 0 or last):
            metrics.update(evaluate(self))
            if last:
                print0(f"eval after training:  {format_eval(metrics)}")
        self.logger.log(step, metrics)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("reward", "loss") if metrics.get(k) is not None})
        if cfg.save_every and step % cfg.save_every == 0 or last:
            self.save(step, state)

    def progress(self):
        """The training steps still to run, with a progress bar on rank 0."""
        self.bar = tqdm(range(self.start_step, self.cfg.max_steps), initial=self.start_step,
                        total=self.cfg.max_steps, disable=not self.d.main, dynamic_ncols=True)
        return self.bar


def setup(cfg: BaseConfig, *, optimizer_steps_per_step: int = 1, need_demo: bool = False,
          reference_model: bool = False, global_batch: int = 1, extra_optimizers: dict | None = None) -> Run:
    """extra_optimizers: {name: lr} for a trainer that also steps the same parameters with its own
    AdamW (constant lr, no schedule; ReLIFT's fine-tuning step): run.extra_optimizers[name],
    checkpointed and restored with the main optimizer."""
    check_sampler(cfg)  # vLLM present, a GPU, a usable allocator setting: before anything loads
    if cfg.model != "builtin":  # the budgets fit the model's positions (the builtin one: once built)
        check_context_length(cfg.model, cfg.max_prompt_len + cfg.max_response_len)
    d = init_distributed()
    if global_batch % d.world_size:
        raise SystemExit(f"the batch of {global_batch} prompts does not split over {d.world_size} ranks")
    verifier = Verifier(cfg.verifier_workers, cfg.verifier_timeout, cfg.require_think)
    verifier(["</think>\\boxed{1}"], ["1"])  # start the fork pool now, before threads and CUDA exist

    ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        print0(f"--resume: no checkpoint in {cfg.output_dir}; starting from scratch")
    if not cfg.resume and not cfg.overwrite and (latest_checkpoint(cfg.output_dir) or
                                                 os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl"))):
        raise SystemExit(f"{cfg.output_dir} already holds a run: pass --resume to continue it, --overwrite "
                         "to start afresh there, or another --output_dir")
    if d.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    base_path = cfg.model
    if cfg.model == "builtin":
        cache = os.path.expanduser(cfg.cache_dir)
        if d.main:
            build_base_model(cache)  # cached after the first build
        barrier()
        base_path = build_base_model(cache)
        check_context_length(base_path, cfg.max_prompt_len + cfg.max_response_len)
    # Seeded only now: a first run builds the base above, which seeds torch itself, and must still equal
    # the same command run with the base already cached (--seed decides the run, not the cache).
    seed_everything(cfg.seed + d.rank)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = encode_rows(cfg, tokenizer, cfg.data, "train", need_demo)
    eval_rows = encode_rows(cfg, tokenizer, cfg.eval_data, "eval", False) \
        if cfg.eval_data else []
    print0(f"data: {len(train_rows)} training prompts, {len(eval_rows)} evaluation prompts")

    model_path = os.path.join(ckpt, "model") if ckpt else base_path
    model = load_policy(model_path, d, cfg.compile, cfg.gradient_checkpointing)
    ref_model = load_policy(base_path, d, cfg.compile, train=False) if reference_model else None
    sampler = make_sampler(cfg, d, tokenizer, model_path, model)  # before optimiser state fills the GPU
    if cfg.rollout_debug:
        sampler = RolloutDebug(sampler, d, os.path.join(cfg.output_dir, "rollout_debug.jsonl"),
                               train_rows[0]["prompt_ids"], tokenizer.pad_token_id)
    optimizer, scheduler = make_optimizer(model, cfg, cfg.max_steps * optimizer_steps_per_step)
    extra = {name: adamw(model, lr, cfg.weight_decay) for name, lr in (extra_optimizers or {}).items()}
    assert "main" not in extra, "'main' names the trainer's own optimizer"
    stream = PromptStream(len(train_rows), cfg.seed)
    run = Run(cfg, d, tokenizer, model, ref_model, sampler, verifier, optimizer, scheduler, train_rows,
              eval_rows, stream, logger=None, extra_optimizers=extra)
    if ckpt:
        run.state = load_checkpoint(ckpt, model, {"main": optimizer, **extra}, {"main": scheduler})
        stream.load_state_dict(run.state["data"])
        run.start_step = run.state["step"]
        print0(f"resumed from {ckpt} (step {run.start_step})")
    run.logger = MetricsLogger(cfg, run.start_step if ckpt else None)
    return run


def encode_rows(cfg: BaseConfig, tokenizer, source: str, split: str, need_demo: bool) -> list[dict]:
    """Load, validate and tokenize a data set: rows of {problem, prompt_ids, answer, demo_ids, level}.
    demo_ids = demonstration tokens + EOS, truncated to max_response_len (METHODS 0.4)."""
    if source == "builtin":  # training problems never include the held-out evaluation problems
        held_out = make_task(HELDOUT_PER_LEVEL, EVAL_SEED)
        raw = held_out if split == "eval" else make_task(
            TRAIN_PER_LEVEL, seed=0, exclude={r["problem"] for r in held_out})
        rows = [{"prompt": r["problem"], "answer": r["answer"], "demo": r["demo"], "level": r["level"]} for r in raw]
        system = None if cfg.system_prompt == "auto" else (cfg.system_prompt or None)
    else:
        try:
            rows = load_rows(source, cfg.prompt_key, cfg.answer_key, cfg.demo_key, need_demo)
        except ValueError as e:  # bad input: say what and where, without a traceback
            raise SystemExit(f"error: {e}")
        system = MATH_SYSTEM_PROMPT if cfg.system_prompt == "auto" else (cfg.system_prompt or None)
    out, too_long = [], 0
    for r in rows:
        text = format_prompt(tokenizer, r["prompt"], system)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > cfg.max_prompt_len:
            too_long += 1
            continue
        demo_ids = None
        if r["demo"] is not None:
            demo = strip_think_prefix(text, r["demo"])
            demo_ids = (tokenizer(demo, add_special_tokens=False)["input_ids"] +
                        [tokenizer.eos_token_id])[:cfg.max_response_len]
        out.append({"problem": r["prompt"], "prompt_ids": prompt_ids, "answer": r["answer"],
                    "demo_ids": demo_ids, "level": r["level"]})
    if too_long:
        print0(f"{source}: dropped {too_long} of {len(rows)} prompts longer than --max_prompt_len "
               f"{cfg.max_prompt_len} tokens")
    if not out:
        raise SystemExit(f"{source}: no usable {split} prompts (raise --max_prompt_len?)")
    return out
