"""ReLIFT: reinforcement learning interleaved with online fine-tuning on the hardest questions.

Paper: "Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning for Hardest
Questions", arXiv 2506.07527. Official code: github.com/TheRoadQaQ/ReLIFT. Reference: METHODS.md
section 4, Eq. (21)-(24), checklist (section 11) item 8.

Every iteration t, on B prompts x G rollouts (no demonstration in the group, Eq. 22):

    RL step(s):  L_RL = Agg_{i,t}[ -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) ] - beta_H * H     Eq. (22)
                 A_i from the G rollouts only, Eq. (9) (paper) or Eq. (10) (official)
    hardest set: H_t = { x in the batch : r_i(x) = 0 for all G rollouts of x }                  Eq. (21)
    buffer:      Buf <- H_t (+) Buf    (prepended: newest first; H_t in batch order)            Eq. (23)
    if |Buf| >= M: pop the M newest (x, y*) and, AFTER this iteration's RL step, take ONE step of
    its own AdamW (own moments, lr --ft_lr on the RL lr's schedule, grad clip --ft_max_grad_norm) on
                 L_FT = - sum m_t log pi(y*_t | x, y*_<t) / sum m_t - beta_FT * E_demo           Eq. (24)
    (token-mean over all M demonstrations on all ranks; E_demo = token-mean entropy, temperature 1).

A group in H_t has zero advantage, so it gives the RL step no policy gradient (only entropy).
An iteration with no all-failed prompt and fewer than M buffered items takes no FT step (the
official trainer crashes when the buffer is still empty there). The buffer holds train-row
indices, is built from the all-failed prompts of every rank in global batch order (identical on
all ranks), and the FT batch is split over the ranks. At most one FT step per iteration, as in the
official code. The buffer, the FT step count and the FT optimizer's state are in the checkpoint.
The second AdamW doubles the optimizer memory (the official run offloads both optimizers to CPU).

Paper vs official code (METHODS.md 4); `--variant official` sets all of the RL ones at once:
  - Eq. (22) clip: paper eps = 0.2 (standard GRPO) | official no clip (--no-clip)
  - Eq. (22) advantage: paper Eq. (9) with std | official Eq. (10), no std (--no-adv_std)
  - Eq. (22) aggregation: paper token-mean Eq. (6) | official constant Eq. (8), C = D * L_max
  - Eq. (22) entropy bonus: paper none | official beta_H = 0.001 on all rollout tokens (one
    token-mean per optimizer step here; the official code sums per-micro-batch means)
  - RL grad-norm clip: paper 1.0 | official 0.7 (--max_grad_norm)
  - Eq. (24): both variants use the official FT step: its own AdamW and the entropy bonus
    beta_FT = 0.001 (the paper describes plain fine-tuning: --ft_entropy_coef 0); the official code
    averages micro-batch means (Eq. 14 form), we take one global token mean (Eq. 24 as written)
  - not reproduced: the official FT step also advances the RL lr schedule (constant there: no effect)
  - demonstrations: the paper collects or generates them online; the code (and we) use the data
    set's own trace (--demo_key)

Launch:
    python relift.py                                    # laptop: tiny model, builtin task, CPU, minutes
    python relift.py --variant official --model Qwen/Qwen2.5-Math-1.5B --data openr1.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target \\
        --max_prompt_len 1024 --max_response_len 3072 --lr 1e-6 --ft_lr 1e-6 \\
        --micro_batch_size 4 --gradient_checkpointing   # 1 GPU (vLLM sampler; 4k context)
    torchrun --nproc_per_node 8 relift.py --variant official --model Elliott/Qwen2.5-Math-7B-16k-think \\
        --data openr1.parquet --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target \\
        --eval_data valid.parquet --lr 1e-6 --ft_lr 1e-6 --prompts_per_step 128 --prompts_per_minibatch 64 \\
        --group_size 8 --ft_threshold 128 --max_prompt_len 1024 --max_response_len 8192 --lr_schedule constant \\
        --micro_batch_size 4 --gradient_checkpointing --max_steps 1070   # 8 GPUs: official run (3 epochs)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 relift.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
Run `bash scripts/gpu/smoke.sh` first on a new GPU machine (docs/gpu.md).
"""
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

import common


@dataclass
class Config(common.BaseConfig):
    variant: Literal["paper", "official"] = "paper"  # official: every official-code setting in OFFICIAL below
    lr: float = 2e-4  # peak learning rate (the papers' runs: 1e-6)
    prompts_per_step: int = 16  # B: prompts per rollout batch (global, all ranks)
    prompts_per_minibatch: int = 8  # b: prompts per optimizer step; B/b optimizer steps per iteration
    group_size: int = 8  # G: responses per prompt
    clip_eps_low: float = 0.2  # epsilon_low of Eq. (4)
    clip_eps_high: float = 0.2  # epsilon_high of Eq. (4)
    clip: bool = True  # the PPO clip of Eq. (4); --no-clip: -rho A (official)
    adv_std: bool = True  # divide by the group std: Eq. (9); --no-adv_std gives Dr.GRPO's Eq. (10)
    kl_coef: float = 0.0  # beta_KL of the k3 penalty, Eq. (11) (0 = no reference model)
    entropy_coef: float = 0.0  # beta_H of the entropy bonus, Eq. (12)
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"  # Eq. (6) | Eq. (7) | Eq. (8)
    loss_constant: float = 0.0  # C of Eq. (8); 0 = world_size * max_response_len (official: 8 * 8192)
    ft_threshold: int = 16  # M of Eq. (23): FT step when the buffer holds M items, on the M newest (official 128 = B)
    ft_lr: float = 2e-4  # peak lr of the FT step's own AdamW, on the RL lr's schedule (official 1e-6 = the RL lr)
    ft_entropy_coef: float = 0.001  # beta_FT of Eq. (24): entropy bonus on the demonstration tokens
    ft_max_grad_norm: float = 1.0  # grad-norm clip of the FT step (the RL steps use --max_grad_norm)


# The official ReLIFT run (examples/math-7b/train.sh): no clip, no std, Dr.GRPO constant, clip 0.7, entropy 0.001
OFFICIAL = dict(clip=False, adv_std=False, loss_agg="constant", max_grad_norm=0.7, entropy_coef=0.001)
# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"variant": "official", "lr": 1e-6, "ft_lr": 1e-6, "prompts_per_step": 128, "prompts_per_minibatch": 64,
           "group_size": 8, "ft_threshold": 128, "max_prompt_len": 1024, "max_response_len": 8192,
           "lr_schedule": "constant",
           "micro_batch_size": 4, "gradient_checkpointing": True, "max_steps": 1070}


# ======================================================================================
# The algorithm
# ======================================================================================


def group_advantages(rewards: torch.Tensor, std: bool) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]. Eq. (9) (unbiased std) or, with std=False, Eq. (10).
    A group of one has no statistics: mu = 0, sigma = 1 (METHODS 0.2)."""
    if rewards.shape[1] == 1:
        mean, sigma = torch.zeros_like(rewards), torch.ones_like(rewards)
    else:
        mean, sigma = rewards.mean(dim=1, keepdim=True), rewards.std(dim=1, keepdim=True)  # [P, 1]
    if not std:
        return rewards - mean  # Eq. (10)
    return (rewards - mean) / (sigma + 1e-6)  # Eq. (9)


def grpo_loss(logp, old_logp, advantages, mask, cfg: Config, norm: float, token_norm: float,
              entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (22), ReLIFT's RL loss (arXiv 2506.07527): GRPO, Eq. (15),
    on the rollouts alone; with --variant official no clip (-rho A).

    logp, old_logp, ref_logp, entropy, mask: [B, R]; advantages: [B]. `norm` is the optimizer
    step's denominator for cfg.loss_agg, `token_norm` its token count (KL and entropy are
    token-means, Eq. 11-12). Returns (loss, dict of detached terms)."""
    ratio = torch.exp(logp - old_logp)  # Eq. (3): rho = 1 on the first mini-batch, grad = grad logp
    adv = advantages[:, None]  # [B, 1], broadcast to every token of response i
    unclipped = -ratio * adv  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv if cfg.clip else unclipped
    per_token = torch.maximum(unclipped, clipped)  # Eq. (4): -min(rho A, clip(rho) A); --no-clip: -rho A
    pg_loss = common.aggregate(per_token, mask, cfg.loss_agg, norm)  # Eq. (6)/(7)/(8)
    loss = pg_loss
    terms = {"pg_loss": pg_loss.detach(),
             "clip_frac": common.aggregate((clipped > unclipped).float(), mask, "token-mean", token_norm)}
    if ref_logp is not None:  # Eq. (11): k3 estimator of KL(pi_theta || pi_ref), clamped
        log_r = ref_logp - logp
        kl = common.aggregate((torch.exp(log_r) - log_r - 1).clamp(-10, 10), mask, "token-mean", token_norm)
        loss = loss + cfg.kl_coef * kl
        terms["kl"] = kl.detach()
    if cfg.entropy_coef > 0:  # Eq. (12): entropy bonus over all response tokens
        entropy_bonus = common.aggregate(entropy, mask, "token-mean", token_norm)
        loss = loss - cfg.entropy_coef * entropy_bonus
        terms["entropy_bonus"] = entropy_bonus.detach()
    terms["loss"] = loss.detach()
    return loss, terms


def all_failed(rewards: torch.Tensor) -> list[bool]:
    """rewards [P, G] -> per prompt: did every one of its G rollouts score 0? Eq. (21)."""
    return (rewards == 0).all(dim=1).tolist()


def gather_hardest(indices: list[int], failed: list[bool], offset: int, global_batch: int) -> list[int]:
    """Eq. (21) over the global batch: this rank's prompts (train-row indices, at positions offset..
    of the global batch) and their all-fail flags -> the indices of every rank's all-failed prompts
    in global batch order, the same list on every rank (one all-reduce of a slot per prompt)."""
    slots = [0.0] * global_batch
    for j, (index, hard) in enumerate(zip(indices, failed)):
        if hard:
            slots[offset + j] = index + 1.0  # 0 = empty slot
    return [int(v) - 1 for v in common.all_reduce(slots) if v > 0]


def update_buffer(buffer: list[int], hardest: list[int], M: int) -> tuple[list[int], list[int]]:
    """Eq. (23): Buf <- H_t (+) Buf, newest first; then, if |Buf| >= M, pop the M newest for one FT step.
    Returns (the FT batch, [] if none; the buffer after). Empty H_t and empty buffer: ([], [])."""
    buffer = list(hardest) + list(buffer)
    if len(buffer) < M:
        return [], buffer
    return buffer[:M], buffer[M:]


def ft_loss(logp, entropy, mask, entropy_coef: float, norm: float):
    """One micro-batch's share of Eq. (24), ReLIFT's fine-tuning loss (arXiv 2506.07527):
    token-mean NLL of the demonstration tokens minus entropy_coef * their token-mean entropy.

    logp, entropy, mask: [B, R] (response = demonstration + EOS); `norm` is the FT step's token count
    over all micro-batches and ranks (common.step_normaliser). Returns (loss, dict of detached terms)."""
    nll = common.aggregate(-logp, mask, "token-mean", norm)  # Eq. (24), first term (Eq. 13 form)
    entropy_demo = common.aggregate(entropy, mask, "token-mean", norm)  # E_demo
    loss = nll - entropy_coef * entropy_demo
    return loss, {"ft_loss": loss.detach(), "sft_loss": nll.detach(), "entropy_demo": entropy_demo.detach()}


FT_NONE = {"ft_loss": 0.0, "sft_loss": 0.0, "entropy_demo": 0.0, "ft_grad_norm": 0.0, "ft_lr": 0.0}  # no FT step


def fine_tune(model, optimizer, rows: list[dict], cfg: Config, pad_id: int, device) -> dict:
    """One step of the FT optimizer (its own AdamW) on this rank's share of the popped (x, y*) rows,
    Eq. (24) at temperature 1. Returns the FT terms, reduced over ranks."""
    micro = common.demo_batches(rows, cfg, pad_id, device)
    norm = common.step_normaliser([mb["response_mask"] for mb in micro], "token-mean")  # global token count
    sums = dict.fromkeys(("ft_loss", "sft_loss", "entropy_demo"), 0.0)
    for mb in micro:
        logp, entropy = model(**common.model_inputs(mb), temperature=1.0, with_entropy=True)  # [b, R] each
        loss, terms = ft_loss(logp, entropy, mb["response_mask"], cfg.ft_entropy_coef, norm)
        loss.backward()
        for k in sums:
            sums[k] += float(terms[k])
    grad_norm = common.optimizer_step(model, optimizer, None, cfg.ft_max_grad_norm)  # constant lr
    world = common.world_size()
    out = {k: v / world for k, v in zip(sums, common.all_reduce(list(sums.values())))}
    return {**out, "ft_grad_norm": grad_norm}


# ======================================================================================
# Training loop
# ======================================================================================


def main():
    cfg = common.parse_config(Config, variants={"official": OFFICIAL})
    B, b, G, M = cfg.prompts_per_step, cfg.prompts_per_minibatch, cfg.group_size, cfg.ft_threshold
    if B % b:
        common.fail("--prompts_per_step must be a multiple of --prompts_per_minibatch")
    if M < 1 or cfg.ft_lr <= 0:
        common.fail("--ft_threshold (M) must be at least 1 and --ft_lr positive")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b,
                       need_demo=True, extra_optimizers={"ft": cfg.ft_lr})
    if M % run.dist.world_size:
        common.fail(f"--ft_threshold {M} (the FT batch) does not split over {run.dist.world_size} ranks")
    model, ft_optimizer, rank, world = run.model, run.extra_optimizers["ft"], run.dist.rank, run.dist.world_size
    constant = cfg.loss_constant or run.dist.world_size * cfg.max_response_len  # Eq. (8)'s C
    for i, row in enumerate(run.train_rows):
        row["index"] = i  # the buffer holds train-row indices (the same rows on every rank and restart)
    buffer = list(run.state.get("buffer", []))  # Eq. (23), newest first (restored on --resume)
    ft_steps_total = run.state.get("ft_steps_total", 0)
    run.evaluate_base()
    for step in run.progress():
        # ---- 1. Rollout: G responses per prompt from pi_old (METHODS 0.3 step 1) -------------
        t0 = time.time()
        prompts = run.next_prompts(B)  # this rank's B / world_size prompts
        run.sampler.sync_weights(model)
        groups = run.sampler.generate([p["prompt_ids"] for p in prompts], n=G, temperature=cfg.temperature,
                                      top_p=cfg.top_p, max_tokens=cfg.max_response_len)
        run.sampler.release()  # the rollout's last generate: a sleeping vLLM engine frees the GPU
        samples = [s for g in groups for s in g]  # prompt-major: sample j of prompt i at i*G + j
        rewards = torch.tensor(run.verifier([s.text for s in samples],
                                            [p["answer"] for p in prompts for _ in range(G)]))  # [P*G]
        advantages = group_advantages(rewards.view(-1, G), cfg.adv_std).view(-1)  # [P*G], Eq. (9)/(10)
        # Eq. (21), (23): the all-failed prompts of the whole batch join the buffer; M newest popped
        hardest = gather_hardest([p["index"] for p in prompts], all_failed(rewards.view(-1, G)),
                                 rank * len(prompts), B)
        ft_batch, buffer = update_buffer(buffer, hardest, M)
        t1 = time.time()

        # ---- 2. B/b mini-batches of micro-batches; log-probs of pi_old (and pi_ref), no grad ----
        minibatches = common.minibatches(samples, {"advantages": advantages}, B // b, cfg,
                                         run.tokenizer.pad_token_id, run.dist.device)
        micro = [mb for minibatch in minibatches for mb in minibatch]
        common.old_logprobs(run, micro, cfg.temperature)

        # ---- 3. One RL optimizer step per mini-batch (ppo_epochs = 1), Eq. (22) ---------------
        terms, grad_norms = [], []
        for minibatch in minibatches:
            masks = [mb["response_mask"] for mb in minibatch]
            norm = common.step_normaliser(masks, cfg.loss_agg, constant)  # this step's Agg denominator
            token_norm = common.step_normaliser(masks, "token-mean")
            for mb in minibatch:
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0)  # [b_micro, R] each
                loss, mb_terms = grpo_loss(logp, mb["old_logp"], mb["advantages"], mb["response_mask"], cfg, norm,
                                           token_norm, entropy, mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))

        # ---- 4. After the RL step: one FT step of the second optimizer on the popped items, Eq. (24)
        ft = FT_NONE
        if ft_batch:  # the same decision on every rank: the buffer is global
            share = ft_batch[rank * M // world:(rank + 1) * M // world]
            # the FT lr follows the RL lr's schedule (officially both constant): a constant one beside a decaying
            # RL lr kept moving the laptop runs away from their best evaluation (docs/lab.md)
            lr = cfg.ft_lr * run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
            for group in ft_optimizer.param_groups:
                group["lr"] = lr
            ft = {**fine_tune(model, ft_optimizer, [run.train_rows[i] for i in share], cfg,
                              run.tokenizer.pad_token_id, run.dist.device), "ft_lr": lr}
            ft_steps_total += 1
        t2 = time.time()

        # ---- 5. Log, evaluate, checkpoint (buffer and FT step count survive a restart) ---------
        demo_tokens = sum(len(run.train_rows[i]["demo_ids"]) for i in ft_batch)  # FT targets, all ranks
        metrics = common.step_metrics(terms, samples, rewards, micro, grad_norms, run.scheduler.get_last_lr()[0],
                                      t0, t1, t2, demo_tokens=demo_tokens)
        metrics.update(hardest_prompts=len(hardest), buffer_size=len(buffer), ft_steps=int(bool(ft_batch)),
                       ft_steps_total=ft_steps_total, **ft,
                       skipped_updates=metrics["skipped_updates"] + (not math.isfinite(ft["ft_grad_norm"])))  # + FT's
        run.end_step(step + 1, metrics, {"buffer": buffer, "ft_steps_total": ft_steps_total})
    common.shutdown()


if __name__ == "__main__":
    main()
