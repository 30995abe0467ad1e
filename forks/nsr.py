"""NSR / PSR / W-REINFORCE: RL on the negative samples only, the positive samples only, or both with the
positives down-weighted (forked from grpo.py; one file, three objectives behind --objective).

Paper: "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", arXiv 2506.01347.
Official code: github.com/TianHongZXY/RLVR-Decomposed. Reference: METHODS.md section 10, Eq. (49)-(50).

Objective, per rollout batch of B prompts x G responses (METHODS.md Eq. 15):

    L(theta) = Agg_{i,t}[ -min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps_low, 1+eps_high) A_i) ]
               + beta_KL * KL(pi_theta || pi_ref) - beta_H * H(pi_theta)

    rho = exp(logp_theta - logp_old)             Eq. (3), logp_old recomputed by the trainer
    A_i = lambda_+ r_i - lambda_- (1 - r_i)      Eq. (49): r_i = 1 correct, 0 wrong; no group mean, no std
    NSR (lambda_+, lambda_-) = (0, 1) | PSR (1, 0) | W-REINFORCE (lambda, 1), lambda = 0.1     Eq. (50)
    Agg = token-mean (6) | seq-mean (7) | constant (8), over the whole optimizer step

The B*G sequences of one iteration are split into B/b mini-batches, one optimizer step each
(METHODS 0.3): rho = 1 on the first, rho != 1 on the later ones, where the clip matters.
NSR gives every correct response A = 0, hence no gradient: only wrong responses are pushed down.

Launch (GPU commands: a 16k-position model, since prompt + response budgets must fit its positions):
    python forks/nsr.py                                 # laptop (--objective psr | w_reinforce for the others)
    python forks/nsr.py --model RoadQAQ/Qwen2.5-Math-1.5B-16k-think --data openr1.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --max_prompt_len 1024 \\
        --max_response_len 8192 --micro_batch_size 4 --gradient_checkpointing   # 1 GPU (vLLM sampler)
    torchrun --nproc_per_node 8 forks/nsr.py --model Qwen/Qwen2.5-Math-7B --data math_train.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --eval_data valid.parquet --lr_schedule constant \\
        --lr 1e-6 --prompts_per_step 1024 --prompts_per_minibatch 256 --group_size 8 \\
        --entropy_coef 0.001 --max_prompt_len 1024 --max_response_len 3072 \\
        --micro_batch_size 4 --gradient_checkpointing --max_steps 140   # 8 GPUs: the official script
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 forks/nsr.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
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
    adv_std: bool = False  # grpo.py's Eq. (9) std: none here, Eq. (49) has no group statistics (--adv_std is refused)
    objective: Literal["nsr", "psr", "w_reinforce"] = "nsr"  # Eq. (50): which samples carry the gradient
    positive_weight: float = 0.1  # lambda of W-REINFORCE, Eq. (50) (official recommendation 0.1)
    kl_coef: float = 0.0  # beta_KL of the k3 penalty, Eq. (11) (0 = no reference model)
    entropy_coef: float = 0.0  # beta_H of the entropy bonus, Eq. (12)
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"  # Eq. (6) | Eq. (7) | Eq. (8)
    loss_constant: float = 0.0  # C of Eq. (8); 0 = world_size * max_response_len (official: 8 * 8192)


# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"lr": 1e-6, "prompts_per_step": 1024, "prompts_per_minibatch": 256, "group_size": 8, "entropy_coef": 0.001,
           "max_prompt_len": 1024, "max_response_len": 3072, "micro_batch_size": 4, "gradient_checkpointing": True,
           "lr_schedule": "constant",
           "max_steps": 140}


# ======================================================================================
# The algorithm
# ======================================================================================


def decomposed_advantages(rewards: torch.Tensor, objective: str, positive_weight: float) -> torch.Tensor:
    """rewards [N] in {0, 1} -> advantages [N], Eq. (49)-(50), arXiv 2506.01347: lambda_+ on correct
    responses, -lambda_- on wrong ones; no group statistics."""
    plus, minus = {"nsr": (0.0, 1.0), "psr": (1.0, 0.0), "w_reinforce": (positive_weight, 1.0)}[objective]
    return plus * rewards - minus * (1 - rewards)  # Eq. (49), arXiv 2506.01347


def grpo_loss(logp, old_logp, advantages, mask, cfg: Config, norm: float, token_norm: float,
              entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (15).

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


# ======================================================================================
# Training loop
# ======================================================================================


def main():
    cfg = common.parse_config(Config)
    B, b, G = cfg.prompts_per_step, cfg.prompts_per_minibatch, cfg.group_size
    if B % b:
        common.fail("--prompts_per_step must be a multiple of --prompts_per_minibatch")
    if cfg.adv_std:
        common.fail("--adv_std: NSR's advantages (Eq. 49) have no group mean or std to divide by")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b)
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
        advantages = decomposed_advantages(rewards, cfg.objective, cfg.positive_weight)  # [P*G], Eq. (49)
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
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint -----------------------------------------------------
        metrics = common.step_metrics(terms, samples, rewards, micro, grad_norms, run.scheduler.get_last_lr()[0],
                                      t0, t1, t2)
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
