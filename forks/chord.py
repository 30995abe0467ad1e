"""CHORD: GRPO plus SFT on the demonstrations as an auxiliary loss, weighted globally by a decaying mu and
per token by phi = p (1 - p) (forked from grpo.py).

Paper: "On-Policy RL Meets Off-Policy Experts: Harmonizing SFT and RL via Dynamic Weighting", arXiv 2508.11408.
Official code: github.com/modelscope/Trinity-RFT, examples/mix_chord. Reference: METHODS.md section 12, Eq. (53)-(55).

Objective, per rollout batch of B prompts x (G responses + the prompt's demonstration y*):

    L = (1 - mu(t)) L_GRPO + mu(t) L_SFT,  L_SFT = token-mean over y* of -sg(phi(p_t)) log p_t     Eq. (53)-(54)
    phi(p) = p (1 - p) (--no-phi: 1);  mu(t): warm-up to mu_peak, cosine decay to mu_valley       Eq. (55)
    L_GRPO = Agg_{i,t}[ -min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps_low, 1+eps_high) A_i) ]
               + beta_KL * KL(pi_theta || pi_ref) - beta_H * H(pi_theta)
    --dual_clip kappa > 0: where A_i < 0, the loss in [ ] is capped at -kappa A_i (no gradient there)    Eq. (5)

    rho = exp(logp_theta - logp_old)             Eq. (3), logp_old recomputed by the trainer
    A_i = (r_i - mean_g r) / (std_g r + 1e-6)    Eq. (9); Eq. (10) with --no-adv_std (Dr.GRPO)
    Agg = token-mean (6) | seq-mean (7) | constant (8), over the whole optimizer step

The B*G sequences of one iteration are split into B/b mini-batches, one optimizer step each
(METHODS 0.3): rho = 1 on the first, rho != 1 on the later ones, where the clip matters.

Paper vs official code (METHODS.md 12); `--variant official` sets (a flag written on the command line wins):
    1. L_GRPO of Eq. (53): the current mix_chord loss (Trinity-RFT's PPO loss) adds the dual clip of Eq. (5) with
       kappa = 3 on rollout tokens with A < 0                                             (--dual_clip 3)
    Not switched: its expert batches and per-micro-batch weights (METHODS.md 12, items 1-2).

Launch (GPU commands: a 16k-position model, since prompt + response budgets must fit its positions):
    python forks/chord.py                               # laptop: tiny model, builtin task, CPU, minutes
    python forks/chord.py --model RoadQAQ/Qwen2.5-Math-1.5B-16k-think --data openr1.parquet --demo_key target \\
        --prompt_key prompt --answer_key reward_model.ground_truth --max_prompt_len 1024 \\
        --max_response_len 8192 --micro_batch_size 4 --gradient_checkpointing   # 1 GPU (vLLM sampler)
    torchrun --nproc_per_node 8 forks/chord.py --model Qwen/Qwen2.5-7B-Instruct --data openr1.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target --eval_data valid.parquet \\
        --lr 1e-6 --prompts_per_step 32 --prompts_per_minibatch 32 --group_size 8 --mu_peak 0.1 --mu_valley 0.1 \\
        --mu_decay_steps 0 --max_prompt_len 1024 --max_response_len 10240 --lr_schedule constant \\
        --micro_batch_size 4 --gradient_checkpointing --max_steps 500   # 8 GPUs: CHORD-phi (METHODS.md 12)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 forks/chord.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
Run `bash scripts/gpu/smoke.sh` first on a new GPU machine (docs/gpu.md).
"""
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py lives one folder up
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
    clip: bool = True  # the PPO clip of Eq. (4); --no-clip: -rho A (the official runs of LUFFY, SRFT, ReLIFT, HPT)
    adv_std: bool = True  # divide by the group std: Eq. (9); --no-adv_std gives Dr.GRPO's Eq. (10)
    kl_coef: float = 0.0  # beta_KL of the k3 penalty, Eq. (11) (0 = no reference model)
    entropy_coef: float = 0.0  # beta_H of the entropy bonus, Eq. (12)
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"  # Eq. (6) | Eq. (7) | Eq. (8)
    loss_constant: float = 0.0  # C of Eq. (8); 0 = world_size * max_response_len (official: 8 * 8192)
    dual_clip: float = 0.0  # kappa of Eq. (5), a cap of -kappa A on the loss of A < 0 tokens (0 = off; official 3)
    mu_peak: float = 0.5  # mu of Eq. (53) after the warm-up (CHORD-mu 0.9, CHORD-phi 0.1)
    mu_valley: float = 0.02  # mu after the decay, Eq. (55) (CHORD-mu 0.05, CHORD-phi 0.1)
    mu_warmup_steps: int = 0  # iterations of linear rise from 0 to mu_peak, Eq. (55) (both variants: 0)
    mu_decay_steps: int = 40  # iterations of cosine decay to mu_valley, Eq. (55) (CHORD-mu 200, CHORD-phi 0)
    phi: bool = True  # Eq. (54): token weight p (1 - p) on demonstration tokens; --no-phi: plain NLL (CHORD-mu)


# What the official code (Trinity-RFT, trinity/algorithm/policy_loss_fn/chord_policy_loss.py) does now.
OFFICIAL = {"dual_clip": 3.0}


# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"lr": 1e-6, "prompts_per_step": 32, "prompts_per_minibatch": 32, "group_size": 8, "mu_peak": 0.1,
           "mu_valley": 0.1, "mu_decay_steps": 0, "max_prompt_len": 1024, "max_response_len": 10240,
           "lr_schedule": "constant",
           "micro_batch_size": 4, "gradient_checkpointing": True, "max_steps": 500}


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


def mu_schedule(t: int, cfg: Config) -> float:
    """Eq. (55), arXiv 2508.11408: mu after t iterations (linear warm-up, half-cosine decay, then constant)."""
    if t < cfg.mu_warmup_steps:
        return t / cfg.mu_warmup_steps * cfg.mu_peak
    if t >= cfg.mu_warmup_steps + cfg.mu_decay_steps:
        return cfg.mu_valley
    cosine = 0.5 * (1 + math.cos(math.pi * (t - cfg.mu_warmup_steps) / cfg.mu_decay_steps))
    return cfg.mu_valley + (cfg.mu_peak - cfg.mu_valley) * cosine


def chord_loss(logp, old_logp, advantages, mask, demo_mask, mu: float, cfg: Config, norm: float, token_norm: float,
               demo_norm: float, entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (53): Eq. (15) on the rollouts, Eq. (54) on the demonstrations (demo_mask).

    logp, old_logp, ref_logp, entropy, mask, demo_mask (1 on y* tokens): [B, R]; advantages: [B]; demo_norm: the
    step's y* token count. `norm` is the optimizer step's denominator for cfg.loss_agg, `token_norm` its token
    count (KL and entropy are token-means, Eq. 11-12). Returns (loss, dict of detached terms)."""
    mask, demo_mask = mask * (1 - demo_mask), mask * demo_mask  # [B, R]: rollout tokens, y* tokens
    ratio = torch.exp(logp - old_logp)  # Eq. (3): rho = 1 on the first mini-batch, grad = grad logp
    adv = advantages[:, None]  # [B, 1], broadcast to every token of response i
    unclipped = -ratio * adv  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv if cfg.clip else unclipped
    per_token = torch.maximum(unclipped, clipped)  # Eq. (4): -min(rho A, clip(rho) A); --no-clip: -rho A
    cap = -cfg.dual_clip * adv  # [B, 1]
    dual = (adv < 0) & (per_token > cap) if cfg.dual_clip > 0 else torch.zeros_like(mask, dtype=torch.bool)
    per_token = torch.where(dual, cap, per_token)  # Eq. (5): min(c, -kappa A) where A < 0, no gradient there
    pg_loss = common.aggregate(per_token, mask, cfg.loss_agg, norm)  # Eq. (6)/(7)/(8)
    prob = torch.exp(logp.detach())  # [B, R]: p_t, the weight carries no gradient
    phi = prob * (1 - prob) if cfg.phi else torch.ones_like(prob)  # Eq. (54): sg(phi(p_t))
    sft_loss = common.aggregate(-phi * logp, demo_mask, "token-mean", demo_norm)  # Eq. (54), arXiv 2508.11408
    loss = (1 - mu) * pg_loss + mu * sft_loss  # Eq. (53), arXiv 2508.11408
    terms = {"pg_loss": pg_loss.detach(), "sft_loss": sft_loss.detach(),
             "phi_weight": common.aggregate(phi, demo_mask, "token-mean", demo_norm),
             "clip_frac": common.aggregate((clipped > unclipped).float(), mask, "token-mean", token_norm)}
    if cfg.dual_clip > 0:
        terms["dual_clip_frac"] = common.aggregate(dual.float(), mask, "token-mean", token_norm)
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


# ======================================================================================
# Training loop
# ======================================================================================


def main():
    cfg = common.parse_config(Config, variants={"official": OFFICIAL})
    B, b, G = cfg.prompts_per_step, cfg.prompts_per_minibatch, cfg.group_size
    if B % b:
        common.fail("--prompts_per_step must be a multiple of --prompts_per_minibatch")
    if 0 < cfg.dual_clip <= 1:
        common.fail("--dual_clip (kappa of Eq. 5) must be > 1, or 0 for none")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b,
                       need_demo=True, whole_demos="a demonstration is trained as a whole response")
    model = run.model
    constant = cfg.loss_constant or run.dist.world_size * cfg.max_response_len  # Eq. (8)'s C
    run.evaluate_base()
    for step in run.progress():
        # ---- 1. Rollout: G responses per prompt from pi_old (METHODS 0.3 step 1) -------------
        t0 = time.time()
        mu = mu_schedule(step, cfg)  # Eq. (55): this iteration's weight of the SFT term
        prompts = run.next_prompts(B)  # this rank's B / world_size prompts
        run.sampler.sync_weights(model)
        groups = run.sampler.generate([p["prompt_ids"] for p in prompts], n=G, temperature=cfg.temperature,
                                      top_p=cfg.top_p, max_tokens=cfg.max_response_len)
        run.sampler.release()  # the rollout's last generate: a sleeping vLLM engine frees the GPU
        samples = [s for g in groups for s in g]  # prompt-major: sample j of prompt i at i*G + j
        rewards = torch.tensor(run.verifier([s.text for s in samples],
                                            [p["answer"] for p in prompts for _ in range(G)]))  # [P*G]
        advantages = group_advantages(rewards.view(-1, G), cfg.adv_std)  # [P, G], Eq. (9)/(10): rollouts only
        samples = [s for p, g in zip(prompts, groups) for s in [*g, common.demonstration_sample(p, run.tokenizer)]]
        advantages = torch.cat([advantages, torch.zeros(len(prompts), 1)], 1).view(-1)  # [P*(G+1)], y* last
        t1 = time.time()

        # ---- 2. B/b mini-batches of micro-batches; log-probs of pi_old (and pi_ref), no grad ----
        minibatches = common.minibatches(samples, {"advantages": advantages}, B // b, cfg,
                                         run.tokenizer.pad_token_id, run.dist.device)
        micro = [mb for minibatch in minibatches for mb in minibatch]
        common.old_logprobs(run, micro, cfg.temperature)

        # ---- 3. One optimizer step per mini-batch (ppo_epochs = 1) -----------------------------
        terms, grad_norms = [], []
        for minibatch in minibatches:
            masks = [mb["response_mask"] * (1 - mb["prefix_mask"]) for mb in minibatch]  # rollout tokens
            demo_norm = common.step_normaliser([mb["response_mask"] * mb["prefix_mask"] for mb in minibatch],
                                               "token-mean")  # y* tokens: L_SFT's denominator
            norm = common.step_normaliser(masks, cfg.loss_agg, constant)  # this step's Agg denominator
            token_norm = common.step_normaliser(masks, "token-mean")
            for mb in minibatch:
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0)  # [b_micro, R] each
                loss, mb_terms = chord_loss(logp, mb["old_logp"], mb["advantages"], mb["response_mask"],
                                            mb["prefix_mask"], mu, cfg, norm, token_norm, demo_norm, entropy,
                                            mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint -----------------------------------------------------
        demo_tokens = common.all_reduce([sum(float(mb["prefix_mask"].sum()) for mb in micro)])[0]  # y*, all ranks
        metrics = common.step_metrics(terms, [s for g in groups for s in g], rewards, micro, grad_norms,
                                      run.scheduler.get_last_lr()[0], t0, t1, t2, demo_tokens=demo_tokens)
        metrics.update(mu=mu)
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
