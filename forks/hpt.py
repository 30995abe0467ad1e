"""HPT, hybrid post-training: per question, SFT on its demonstration when the policy's G rollouts mostly fail,
GRPO on the rollouts otherwise (forked from grpo.py).

Paper: "Towards a Unified View of Large Language Model Post-Training", arXiv 2509.04419. Official code:
github.com/TsinghuaC3I/Unify-Post-Training. Reference: METHODS.md section 13, Eq. (56)-(57).

Objective, per rollout batch of B prompts x G responses; P_x = accuracy of the G rollouts of prompt x:

    (alpha_x, beta_x) = (1, 0) if P_x > gamma else (0, 1)   (gamma = 0: SFT only when all G fail)  Eq. (56)
    L = Agg over RL prompts' rollouts [GRPO below] + sft_coef * token-mean over SFT prompts' y* of -log p   Eq. (57)
    L_GRPO = Agg_{i,t}[ -min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps_low, 1+eps_high) A_i) ]
               + beta_KL * KL(pi_theta || pi_ref) - beta_H * H(pi_theta)

    rho = exp(logp_theta - logp_old)             Eq. (3), logp_old recomputed by the trainer
    A_i = (r_i - mean_g r) / (std_g r + 1e-6)    Eq. (9); Eq. (10) with --no-adv_std (Dr.GRPO)
    Agg = token-mean (6) | seq-mean (7) | constant (8), over the whole optimizer step

The B*G sequences of one iteration are split into B/b mini-batches, one optimizer step each
(METHODS 0.3): rho = 1 on the first, rho != 1 on the later ones, where the clip matters.
An SFT prompt's group keeps G samples, its demonstration in place of the first rollout and the other
rollouts out of every loss (so mini-batches split evenly on all ranks); the gate is METHODS.md Eq. (56).

Launch (GPU commands: a 16k-position model, since prompt + response budgets must fit its positions):
    python forks/hpt.py                                 # laptop: tiny model, builtin task, CPU, minutes
    python forks/hpt.py --model RoadQAQ/Qwen2.5-Math-1.5B-16k-think --data openr1.parquet --demo_key target \\
        --prompt_key prompt --answer_key reward_model.ground_truth --max_prompt_len 1024 \\
        --max_response_len 8192 --micro_batch_size 4 --gradient_checkpointing   # 1 GPU (vLLM sampler)
    torchrun --nproc_per_node 8 forks/hpt.py --model Elliott/Qwen2.5-Math-7B-16k-think --data openr1.parquet \\
        --demo_key target --lr_schedule constant \\
        --prompt_key prompt --answer_key reward_model.ground_truth --eval_data valid.parquet --max_grad_norm 80 \\
        --lr 5e-6 --prompts_per_step 128 --prompts_per_minibatch 64 --group_size 8 --no-adv_std --no-clip \\
        --loss_agg constant --entropy_coef 0.001 --max_prompt_len 1024 --max_response_len 8192 \\
        --micro_batch_size 4 --gradient_checkpointing --max_steps 500   # 8 GPUs: the official train.sh
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 forks/hpt.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
Run `bash scripts/gpu/smoke.sh` first on a new GPU machine (docs/gpu.md).
"""
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
    sft_gate: float = 0.0  # gamma of Eq. (56): SFT when the rollouts' accuracy is <= gamma (official: 0; LLaMA 2/8)
    sft_coef: float = 1.0  # weight of the SFT term, Eq. (57) (official sft_loss_coef 1.0)


# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"lr": 5e-6, "prompts_per_step": 128, "prompts_per_minibatch": 64, "group_size": 8, "adv_std": False,
           "clip": False, "loss_agg": "constant", "entropy_coef": 0.001, "lr_schedule": "constant",
           "max_grad_norm": 80.0, "max_prompt_len": 1024, "max_response_len": 8192, "micro_batch_size": 4,
           "gradient_checkpointing": True, "max_steps": 500}


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


def sft_prompts(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """rewards [P, G] -> [P] bool, True where the prompt trains with SFT: accuracy <= gamma, Eq. (56),
    arXiv 2509.04419 (the official gate counts solved rollouts: count <= gamma * G, the same rule)."""
    return rewards.mean(dim=1) <= gamma + 1e-9


def hpt_loss(logp, old_logp, advantages, mask, demo_mask, cfg: Config, norm: float, token_norm: float,
             demo_norm: float, entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (57): Eq. (15) on the RL prompts' rollout tokens (mask), the NLL on the SFT
    prompts' demonstration tokens (demo_mask, demo_norm their count over the step).

    logp, old_logp, ref_logp, entropy, mask: [B, R]; advantages: [B]. `norm` is the optimizer
    step's denominator for cfg.loss_agg, `token_norm` its token count (KL and entropy are
    token-means, Eq. 11-12). Returns (loss, dict of detached terms)."""
    ratio = torch.exp(logp - old_logp)  # Eq. (3): rho = 1 on the first mini-batch, grad = grad logp
    adv = advantages[:, None]  # [B, 1], broadcast to every token of response i
    unclipped = -ratio * adv  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv if cfg.clip else unclipped
    per_token = torch.maximum(unclipped, clipped)  # Eq. (4): -min(rho A, clip(rho) A); --no-clip: -rho A
    pg_loss = common.aggregate(per_token, mask, cfg.loss_agg, norm)  # Eq. (6)/(7)/(8)
    sft_loss = common.aggregate(-logp, demo_mask, "token-mean", demo_norm)  # Eq. (57), arXiv 2509.04419: NLL of y*
    loss = pg_loss + cfg.sft_coef * sft_loss  # Eq. (57): alpha_x, beta_x of Eq. (56) live in the two masks
    terms = {"pg_loss": pg_loss.detach(), "sft_loss": sft_loss.detach(),
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


# ======================================================================================
# Training loop
# ======================================================================================


def main():
    cfg = common.parse_config(Config)
    B, b, G = cfg.prompts_per_step, cfg.prompts_per_minibatch, cfg.group_size
    if B % b:
        common.fail("--prompts_per_step must be a multiple of --prompts_per_minibatch")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b,
                       need_demo=True, whole_demos="a demonstration is trained as a whole response")
    model = run.model
    constant = cfg.loss_constant or run.dist.world_size * cfg.max_response_len  # Eq. (8)'s C
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
        sft = sft_prompts(rewards.view(-1, G), cfg.sft_gate)  # [P], Eq. (56)
        samples = [s for p, g, f in zip(prompts, groups, sft.tolist())
                   for s in ([common.demonstration_sample(p, run.tokenizer), *g[1:]] if f else g)]  # y* for rollout 1
        rl = (~sft).float().repeat_interleave(G)  # [P*G]: 1 on the samples of RL prompts
        t1 = time.time()

        # ---- 2. B/b mini-batches of micro-batches; log-probs of pi_old (and pi_ref), no grad ----
        minibatches = common.minibatches(samples, {"advantages": advantages, "rl": rl}, B // b, cfg,
                                         run.tokenizer.pad_token_id, run.dist.device)
        micro = [mb for minibatch in minibatches for mb in minibatch]
        common.old_logprobs(run, micro, cfg.temperature)

        # ---- 3. One optimizer step per mini-batch (ppo_epochs = 1) -----------------------------
        terms, grad_norms = [], []
        for minibatch in minibatches:
            masks = [mb["response_mask"] * mb["rl"][:, None] for mb in minibatch]  # RL prompts' rollout tokens
            demo_masks = [mb["response_mask"] * mb["prefix_mask"] for mb in minibatch]  # SFT prompts' y* tokens
            demo_norm = common.step_normaliser(demo_masks, "token-mean")
            norm = common.step_normaliser(masks, cfg.loss_agg, constant)  # this step's Agg denominator
            token_norm = common.step_normaliser(masks, "token-mean")
            for mb, mask, demo_mask in zip(minibatch, masks, demo_masks):
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0)  # [b_micro, R] each
                loss, mb_terms = hpt_loss(logp, mb["old_logp"], mb["advantages"], mask, demo_mask, cfg, norm,
                                          token_norm, demo_norm, entropy, mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint -----------------------------------------------------
        n_sft, demo_tokens = common.all_reduce([float(sft.sum()), sum(float(mb["prefix_mask"].sum()) for mb in micro)])
        metrics = common.step_metrics(terms, [s for g in groups for s in g], rewards, micro, grad_norms,
                                      run.scheduler.get_last_lr()[0], t0, t1, t2, demo_tokens=demo_tokens)
        metrics.update(sft_frac=n_sft / B)
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
