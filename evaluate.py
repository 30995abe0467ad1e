"""Evaluate a model on math test sets: pass@1 averaged over k samples per problem (METHODS.md section 9).

The same verifier, prompt format and evaluation code as the trainers' --eval_data (common.evaluate_sets):
the chat template without the training system message, the answer graded after </think>, k samples
per problem at temperature 0.6, accuracy per file and per level (rows with a `level` field).
Writes metrics.json (with every problem's counts: samples rewarded, and of them with right worked steps on the
built-in task) and one JSON record per sample (prompt, response, extracted answer, reward) to
records.jsonl in --output_dir.

    python evaluate.py --model runs/grpo/checkpoint-000040 --data builtin          # CPU, torch sampler
    python evaluate.py --model Qwen/Qwen2.5-Math-7B --data aime24.parquet:32 amc23.parquet:32 \\
        math500.jsonl --prompt_key prompt --answer_key reward_model.ground_truth   # 1 GPU, vLLM
    torchrun --nproc_per_node 8 evaluate.py --model runs/luffy/checkpoint-000500 --data ...  # 8 GPUs

--model is an HF model directory or hub id, a trainer's checkpoint directory (checkpoint-N/, whose
model/ is loaded), a run directory (its newest checkpoint), or "builtin" (the tiny base model).
Each --data entry is FILE[:k] or builtin[:k]: k samples per problem (the papers use 32 for AIME and
AMC, 1 elsewhere); without ":k", --eval_samples. --pass_k adds the unbiased pass@k for k = 1, 2, 4, ...
up to each set's k (at most 64), e.g. `--data builtin:64 --pass_k`.

Which regime am I in (docs/lab.md, "Regimes")? --demo_probs measures how likely the model finds each set's
demonstrations, teacher-forced at temperature 1 (common.demo_probabilities: the median least-likely token, the
mean log-prob of the key tokens, the share of tokens below 0.01), before choosing a method:

    python evaluate.py --model Qwen/Qwen2.5-Math-7B --data openr1.parquet --prompt_key prompt \\
        --answer_key reward_model.ground_truth --demo_key target --demo_probs --no-sample
"""
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Literal

import builtin_task

import common


@dataclass
class Config:
    model: str = ""  # HF directory or hub id, checkpoint-N/ directory, run directory, or "builtin"
    data: list[str] = field(default_factory=list)  # evaluation sets, each FILE[:k] or builtin[:k]
    # (k samples per problem, e.g. --data aime24.parquet:32 math500.jsonl); several entries or the flag repeated
    prompt_key: str = "problem"  # field holding the problem (a string or a list of chat messages)
    answer_key: str = "answer"  # field holding the gold answer (dotted keys reach nested fields)
    eval_samples: int = 0  # k for sets given without ":k"; 0 = auto: 1 for files, the builtin task's for builtin
    temperature: float = 0.6  # METHODS 9: sampling temperature (top-p 1.0)
    demo_probs: bool = False  # also how likely the model finds each set's demonstrations (demo_* metrics)
    demo_key: str = "demo"  # field holding the demonstration, for --demo_probs (string or chat messages)
    sample: bool = True  # --no-sample: no generation or grading, only --demo_probs
    pass_k: bool = False  # also unbiased pass@k (METHODS.md Eq. 58) for k = 1, 2, 4, ... up to each set's k (<= 64)
    max_prompt_len: int = 0  # prompts longer than this (tokens) are dropped, with a count printed;
    # 0 = auto: 1024 with files (the papers'), the builtin task's when only builtin is evaluated
    max_response_len: int = 0  # response budget in tokens; 0 = auto: 8192 with files (the papers'), the
    # builtin task's when only builtin is evaluated
    seed: int = 0  # the draws of each set are seeded by (seed, set name, rank): repeatable
    output_dir: str = ""  # where metrics.json and records.jsonl go; default runs/eval/<model name>
    sampler: Literal["auto", "torch", "vllm"] = "auto"  # auto = vllm on GPU, torch on CPU (docs/vllm-cpu.md)
    vllm_gpu_memory_utilization: float = 0.8  # fraction of GPU memory the vLLM engine may take
    vllm_max_num_batched_tokens: int = 8192  # vLLM's token budget per engine step (bounds its activations)
    vllm_enforce_eager: bool = False  # a GPU engine without torch.compile and CUDA graphs (docs/gpu.md)
    require_think: bool = True  # reward 0 unless the response closes </think>; grade the text after it
    verifier_workers: int = 2  # grading processes with math-verify (0 = main thread, no hard time bound)
    verifier_timeout: float = 2.0  # seconds per math-verify parse/compare
    cache_dir: str = "~/.cache/sft_rl_fusion"  # where the builtin base model is built and cached
    vllm_sleep: bool = False  # (no training here: the vLLM engine stays awake)
    vllm_verbose: bool = False  # show the vLLM engine's own start-up log (default: one line; the log goes to
    # output_dir/vllm-rank<r>.log)


def model_directory(model: str, cache_dir: str) -> str:
    """The HF directory (or hub id) to load for --model."""
    if model == "builtin":
        return builtin_task.build_base_model(os.path.expanduser(cache_dir))
    if os.path.isdir(model) and (ckpt := common.latest_checkpoint(model)):  # a run directory
        common.print0(f"--model {model} is a run directory: evaluating its newest checkpoint, {ckpt}")
        return os.path.join(ckpt, "model")
    return common.model_directory(model)  # a checkpoint-N/ directory: its model/


def main():
    cfg = common.parse_config(Config)
    if not cfg.model or not cfg.data:
        common.fail("name the model and the data: evaluate.py --model DIR --data FILE[:k] [FILE[:k] ...]")
    if not (cfg.sample or cfg.demo_probs):
        common.fail("--no-sample leaves nothing to measure: add --demo_probs (with --demo_key for files)")
    common.check_sampler(cfg)  # vLLM importable, allocator settings: before anything loads
    d = common.init_distributed(one_rank_group=common.sampler_kind(cfg) == "vllm")
    builtin_only = all(re.sub(r":\d+$", "", e) == "builtin" for e in cfg.data)
    settings = builtin_task.SETTINGS if builtin_only else common.FILE_DATA_SETTINGS
    for key in ("max_prompt_len", "max_response_len"):
        if getattr(cfg, key) <= 0:
            setattr(cfg, key, settings[key])
    try:
        sets = common.parse_eval_sets(cfg.data, cfg.eval_samples)
    except ValueError as err:
        common.fail(str(err))
    raw = {s.name: common.read_rows(cfg, s.source, "eval", need_answer=cfg.sample, need_demo=cfg.demo_probs)
           for s in sets}  # every row checked before a model loads
    if "output_dir" not in common.given_flags(cfg):
        name = "-".join(p for p in os.path.normpath(cfg.model).split(os.sep)[-2:] if p not in (".", "runs"))
        cfg.output_dir = os.path.join("runs", "eval", re.sub(r"[^A-Za-z0-9_.-]", "_", name))

    path = model_directory(cfg.model, cfg.cache_dir)
    common.check_context_length(path, cfg.max_prompt_len + cfg.max_response_len)  # before any weights load
    common.check_tokenizer(path)
    common.check_model_files(path)
    verifier = common.Verifier(cfg.verifier_workers, cfg.verifier_timeout, cfg.require_think)
    verifier.start()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for s in sets:  # METHODS 9: no system message (a data set's own messages are kept)
        s.rows, _ = common.encode_rows(raw[s.name], tokenizer, None, cfg.max_prompt_len, cfg.max_response_len,
                                       s.name)
    common.print0("evaluating " + ", ".join(f"{s.name} ({len(s.rows)} problems x {s.k} samples)" for s in sets)
                  + f" with at most {cfg.max_response_len} response tokens")
    vllm = cfg.sample and common.sampler_kind(cfg) == "vllm"  # the vLLM engine loads the weights itself
    policy = common.load_policy(path, d, compile=False, train=False) if cfg.demo_probs or not vllm else None
    records, metrics, per_problem = [], {}, {}
    if cfg.sample:
        sampler = common.make_sampler(cfg, d, tokenizer, path, None if vllm else policy)
        metrics = common.evaluate_sets(sets, sampler, verifier, d, temperature=cfg.temperature,
                                       max_tokens=cfg.max_response_len, seed=cfg.seed, records=records,
                                       pass_k=cfg.pass_k, per_problem=per_problem)
    for s in sets if cfg.demo_probs else []:
        metrics.update(common.demo_probabilities(policy, s, tokenizer, d))
    verifier.close()
    if d.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "records.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "model_path": path, "metrics": metrics,
                       "per_problem": per_problem}, f, indent=1)
        if cfg.sample:
            common.print0(common.format_eval(metrics, sets))
        for s in sets if cfg.demo_probs else []:
            groups = sorted({k.removeprefix(f"demo_min_p_{s.name}").lstrip("_") for k in metrics
                             if k.startswith(f"demo_min_p_{s.name}")})
            for g in groups:
                suffix = s.name + (f"_{g}" if g else "")
                key = metrics[f"demo_key_logp_{suffix}"]
                common.print0(f"{s.name} demonstrations{' ' + g if g else ''}: median least-likely token p = "
                              f"{metrics[f'demo_min_p_{suffix}']:.3g}, tokens below 0.01: "
                              f"{metrics[f'demo_low_p_share_{suffix}']:.1%}, key-token log-prob "
                              f"{'n/a' if key is None else f'{key:.3f}'}")
        common.print0(f"wrote {os.path.join(cfg.output_dir, 'metrics.json')} and records.jsonl "
                      f"({len(records)} samples)")
    common.shutdown()


if __name__ == "__main__":
    main()
