"""Forking tokens: GRPO's policy gradient on each optimizer step's 20% highest-entropy response tokens only
(forked from grpo.py).

Paper: "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM
Reasoning", arXiv 2506.01939. Official code: github.com/Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR (verl, released
after the paper). Reference: METHODS.md section 11, Eq. (51)-(52), with Eq. (5).

Objective, per rollout batch of B prompts x G responses (METHODS.md Eq. 15):

    L(theta) = Agg_{i,t}[ -g_{i,t} min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps_low, 1+eps_high) A_i) ]   Eq. (52)
               + beta_KL * KL(pi_theta || pi_ref) - beta_H * H(pi_theta)

    rho = exp(logp_theta - logp_old)             Eq. (3), logp_old recomputed by the trainer
    A_i = (r_i - mean_g r) / (std_g r + 1e-6)    Eq. (9); Eq. (10) with --no-adv_std (Dr.GRPO)
    Agg = token-mean (6) | seq-mean (7) | constant (8), over the whole optimizer step
    g_{i,t} = 1 for exactly ceil(rho_H N) of the step's N response tokens (all ranks), those of highest
              entropy H_{i,t} (Eq. 2, detached; ties by position), 0 elsewhere; rho_H = 0.2      Eq. (51)
    --dual_clip kappa > 0: where A_i < 0, the loss in [ ] is capped at -kappa A_i (no gradient there)    Eq. (5)

The B*G sequences of one iteration are split into B/b mini-batches, one optimizer step each
(METHODS 0.3): rho = 1 on the first, rho != 1 on the later ones, where the clip matters.
Gated tokens stay in Agg's denominator (the paper's 1 / sum |o_i|) but give no gradient. H is pi_old's, stored
with the old log-probs: the training forward's on the first mini-batch, [D] on later ones (METHODS.md 11).

Paper vs official code (METHODS.md 11); `--variant official` sets all three, and with item 2 the code's cut of a step
by tokens, --micro_batching tokens (verl's dynamic batch size; a flag written on the command line wins):
    1. Eq. (52): Agg counts the gated tokens only, about 1/rho_H = 5x the paper's gradient  (--gate_norm selected)
    2. Eq. (51), (6)-(8): each micro-batch is its own unit: its tokens ranked alone by the entropies of its training
       forward (the current policy), its own Agg denominator, weighted 1/n_micro             (--unit microbatch)
    3. Eq. (52) with Eq. (5): dual clip kappa = 10 on tokens with A < 0                      (--dual_clip 10)
    Not switched: the code leaves ties to torch.topk (here: by position, the same count either way).

Launch (GPU commands: a 16k-position model, since prompt + response budgets must fit its positions):
    python forks/forking_tokens.py                      # laptop: tiny model, builtin task, CPU, minutes
    python forks/forking_tokens.py --model RoadQAQ/Qwen2.5-Math-1.5B-16k-think --data openr1.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --max_prompt_len 1024 \\
        --max_response_len 8192 --micro_batch_size 4 --gradient_checkpointing   # 1 GPU (vLLM sampler)
    torchrun --nproc_per_node 8 forks/forking_tokens.py --model Qwen/Qwen3-8B-Base --data dapo17k.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --eval_data valid.parquet --lr_schedule constant \\
        --lr 1e-6 --prompts_per_step 512 --prompts_per_minibatch 32 --group_size 16 \\
        --clip_eps_high 0.28 --max_prompt_len 2048 --max_response_len 20480 \\
        --micro_batch_size 2 --gradient_checkpointing   # 8 GPUs: the paper's DAPO settings (METHODS.md 11)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 forks/forking_tokens.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
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
    loss_constant: float = 0.0  # C of Eq. (8) for one unit; 0 = world_size (minibatch) or 1 (microbatch) * L_max
    dual_clip: float = 0.0  # kappa of Eq. (5), a cap of -kappa A on the loss of A < 0 tokens (0 = off; official 10)
    top_entropy_frac: float = 0.2  # rho_H of Eq. (51): share of each unit's response tokens that get a gradient
    gate_norm: Literal["all", "selected"] = "all"  # Agg's tokens in Eq. (52): all response tokens | gated (official)
    unit: Literal["minibatch", "microbatch"] = "minibatch"  # U of Eq. (6)-(8), (51): step | each micro-batch (official)


# What the official code (Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR, recipe/rlvr_with_high_entropy_tokens_only) does.
OFFICIAL = {"gate_norm": "selected", "unit": "microbatch", "dual_clip": 10.0, "micro_batching": "tokens"}


# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"lr": 1e-6, "prompts_per_step": 512, "prompts_per_minibatch": 32, "group_size": 16, "clip_eps_high": 0.28,
           "lr_schedule": "constant",
           "max_prompt_len": 2048, "max_response_len": 20480, "micro_batch_size": 2, "gradient_checkpointing": True}


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


def forking_gates(entropies: list, masks: list, top_frac: float, unit: str = "minibatch") -> list[torch.Tensor]:
    """Eq. (51), arXiv 2506.01939: gates [b_micro, R] for this rank's micro-batches; of the step's N response
    tokens (all micro-batches, all ranks) exactly ceil(top_frac N), the highest-entropy ones, get 1; equal
    entropies are ordered by position (rank, micro-batch, row, token). The - 1e-9: 0.2 * 15 = 3.0000000000000004.
    unit "microbatch" (official): the N tokens of the micro-batches given, on this rank alone (give it one)."""
    local = torch.cat([e[m.bool()] for e, m in zip(entropies, masks)])  # [n], row-major order
    pool = common.all_gather_1d(local) if unit == "minibatch" else [local]  # every rank's, in rank order
    start = sum(p.numel() for p in pool[:common.rank()]) if unit == "minibatch" else 0  # this rank's first token
    flat = torch.cat(pool)  # [N]
    kept = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    kept[torch.sort(-flat, stable=True).indices[:math.ceil(top_frac * flat.numel() - 1e-9)]] = True
    mine = kept[start:start + local.numel()]  # this rank's share
    gates = [torch.zeros_like(e) for e in entropies]
    for g, m in zip(gates, masks):
        g[m.bool()], mine = mine[:int(m.sum())].to(g.dtype), mine[int(m.sum()):]
    return gates


def step_unit(entropies: list, masks: list, cfg: Config, constant: float):
    """--unit minibatch (the paper's batch): Eq. (51) over the whole optimizer step (all micro-batches, all ranks),
    ranked by pi_old's entropies, and the step's Agg denominators (Eq. 6-8) over the tokens cfg.gate_norm names.
    Returns (gates, norm, token_norm) for forking_tokens_loss."""
    gates = forking_gates(entropies, masks, cfg.top_entropy_frac)
    agg = [m * g for m, g in zip(masks, gates)] if cfg.gate_norm == "selected" else masks  # the tokens Agg counts
    return gates, common.step_normaliser(agg, cfg.loss_agg, constant), common.step_normaliser(masks, "token-mean")


def microbatch_unit(entropy, mask, cfg: Config, constant: float, scale: float):
    """--unit microbatch (the official code): Eq. (51) on this micro-batch alone, ranked by the entropies [B, R] of its
    training forward (the current policy), and Agg's denominators with the micro-batch as the unit (its tokens, its
    sequences or C, Eq. 6-8), times `scale`, the rank's sequences in the step over the micro-batch's (the code's
    loss_scale_factor; n_micro when the micro-batches are equal); FSDP averages the ranks.
    Returns (gate [B, R], norm, token_norm) for forking_tokens_loss."""
    gate = forking_gates([entropy.detach()], [mask], cfg.top_entropy_frac, "microbatch")[0]
    agg = mask * gate if cfg.gate_norm == "selected" else mask  # [B, R]: the tokens Agg counts
    size = {"token-mean": float(agg.sum()), "seq-mean": float(mask.shape[0]), "constant": constant}[cfg.loss_agg]
    return gate, scale * max(size, 1.0), scale * max(float(mask.sum()), 1.0)


def forking_tokens_loss(logp, old_logp, advantages, mask, gate, cfg: Config, norm: float, token_norm: float,
                        entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (52): Eq. (15) with the policy gradient on the forking tokens only (gate).

    logp, old_logp, ref_logp, entropy, mask, gate: [B, R]; advantages: [B]. `norm` is the unit's
    denominator for cfg.loss_agg over the tokens cfg.gate_norm names, `token_norm` its token count (KL and
    entropy are token-means, Eq. 11-12). Returns (loss, dict of detached terms)."""
    ratio = torch.exp(logp - old_logp)  # Eq. (3): rho = 1 on the first mini-batch, grad = grad logp
    adv = advantages[:, None]  # [B, 1], broadcast to every token of response i
    unclipped = -ratio * adv  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv if cfg.clip else unclipped
    per_token = torch.maximum(unclipped, clipped)  # Eq. (4): -min(rho A, clip(rho) A); --no-clip: -rho A
    cap = -cfg.dual_clip * adv  # [B, 1]
    dual = (adv < 0) & (per_token > cap) if cfg.dual_clip > 0 else torch.zeros_like(mask, dtype=torch.bool)
    per_token = gate * torch.where(dual, cap, per_token)  # Eq. (52), arXiv 2506.01939: g * Eq. (4), capped by Eq. (5)
    agg_mask = mask * gate if cfg.gate_norm == "selected" else mask  # [B, R]: the tokens Agg counts
    pg_loss = common.aggregate(per_token, agg_mask, cfg.loss_agg, norm)  # Eq. (6)/(7)/(8)
    loss = pg_loss
    terms = {"pg_loss": pg_loss.detach(),
             "clip_frac": common.aggregate((clipped > unclipped).float(), mask, "token-mean", token_norm),
             "forking_frac": common.aggregate(gate, mask, "token-mean", token_norm)}
    if cfg.dual_clip > 0:
        terms["dual_clip_frac"] = common.aggregate((dual & (gate > 0)).float(), mask, "token-mean", token_norm)
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
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b)
    model = run.model
    constant = cfg.loss_constant or (run.dist.world_size if cfg.unit == "minibatch" else 1) * cfg.max_response_len
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
        t1 = time.time()

        # ---- 2. B/b mini-batches of micro-batches; log-probs of pi_old (and pi_ref), no grad ----
        minibatches = common.minibatches(samples, {"advantages": advantages}, B // b, cfg,
                                         run.tokenizer.pad_token_id, run.dist.device)
        micro = [mb for minibatch in minibatches for mb in minibatch]
        common.old_logprobs(run, micro, cfg.temperature)

        # ---- 3. One optimizer step per mini-batch (ppo_epochs = 1) -----------------------------
        terms, grad_norms = [], []
        for minibatch in minibatches:
            masks = [mb["response_mask"] for mb in minibatch]
            if cfg.unit == "minibatch":  # Eq. (51) over the step's tokens, all ranks, by pi_old's entropies
                gates, norm, token_norm = step_unit([mb["old_entropy"] for mb in minibatch], masks, cfg, constant)
            for i, mb in enumerate(minibatch):
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0 or cfg.unit == "microbatch")  # [b_micro, R]
                if cfg.unit == "microbatch":  # official: Eq. (51) on this micro-batch, by its current entropies
                    gate, norm, token_norm = microbatch_unit(entropy, mb["response_mask"], cfg, constant,
                                                             sum(m.shape[0] for m in masks) / masks[i].shape[0])
                else:
                    gate = gates[i]
                loss, mb_terms = forking_tokens_loss(logp, mb["old_logp"], mb["advantages"], mb["response_mask"], gate,
                                                     cfg, norm, token_norm, entropy, mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint -----------------------------------------------------
        metrics = common.step_metrics(terms, samples, rewards, micro, grad_norms, run.scheduler.get_last_lr()[0],
                                      t0, t1, t2)
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
