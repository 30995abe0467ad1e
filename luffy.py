"""LUFFY: Learning to Reason under Off-Policy Guidance (arXiv 2504.14945), forked from grpo.py.

Reference: METHODS.md section 3, Eq. (16)-(20), on top of GRPO's Eq. (3), (4), (6)-(10), (12).

Every group of G samples holds G-1 rollouts of pi_old and ONE demonstration y* + EOS, used as a
whole response (an off-policy sample from the teacher pi_phi), graded by the same verifier
(official run: G = 8 = 7 rollouts + 1 demonstration). Per rollout batch:

    A_k   = (r_k - mean(R_on u R_off)) / std(R_on u R_off)      Eq. (16): statistics over all G samples
    f(p)  = p / (p + gamma),  gamma = 0.1                        Eq. (17): policy shaping
    c_off = -A_demo * f(pi_theta(y*_t | x, y*_<t))               Eq. (18): demonstration tokens; pi_phi = 1,
                                                                   gradient through p, no ratio, no clip
    c_on  = -min(rho A_i, clip(rho, 1-eps_low, 1+eps_high) A_i)  Eq. (19) = Eq. (4): rollout tokens
    L     = [sum_demo m c_off + sum_rollouts m c_on] / Z - beta_H E     Eq. (20), Z = all tokens

The gradient of c_off is -A_demo * gamma / (p + gamma)^2 * grad p: largest where the policy finds a
demonstration token unlikely, vanishing as p -> 1, so the demonstration's surprising steps are learned
without pushing already-likely tokens to certainty (plain p, or log p as in SFT, weigh them otherwise).

Paper vs official code; `--variant official` sets all four (a flag written on the command line wins):
    1. Eq. (19): no clip on rollout tokens, c_on = -A rho                  (--no-clip)
    2. Eq. (16): no std, A_k = r_k - mean over the G samples (Eq. 10)       (--no-adv_std)
    3. Eq. (20): Z = the constant C of Eq. (8), D * L_max = 8 * 8192        (--loss_agg constant)
    4. Eq. (20): entropy bonus beta_H = 0.001 over all response tokens, demonstrations included
       (--entropy_coef 0.001; the official code sums per-micro-batch entropy means, we take one
       token-mean per optimizer step, METHODS.md Eq. 20)
The paper's "RL with an SFT loss" baseline is `--demo_loss sft` (official train_rl_sft_loss.sh): the same
groups, the advantage over the G-1 rollouts only, the policy-gradient term over the rollouts only, plus
sft_coef (1.0) times the token-mean NLL of the demonstrations (Eq. 13); its official run has no clip
either, so use it with --variant official to reproduce that run.

Launch:
    python luffy.py                                     # laptop: tiny model, builtin task, CPU, minutes
    python luffy.py --model Qwen/Qwen2.5-Math-1.5B --data openr1.parquet --prompt_key prompt \\
        --answer_key reward_model.ground_truth --demo_key target --max_prompt_len 1024 \\
        --max_response_len 3072   # 1 GPU; 4k context: keep rows whose demonstration fits (others are refused)
    torchrun --nproc_per_node 8 luffy.py --variant official --model Elliott/Qwen2.5-Math-7B-16k-think \\
        --lr_schedule constant \\
        --data openr1.parquet --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target \\
        --eval_data valid.parquet --lr 1e-6 --prompts_per_step 128 --prompts_per_minibatch 64 --group_size 8 \\
        --max_prompt_len 1024 --max_response_len 8192 --micro_batch_size 4 --gradient_checkpointing \\
        --max_steps 500   # 8 GPUs: the official train.sh (add --demo_loss sft for its RL + SFT-loss baseline)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 luffy.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
Run `bash scripts/gpu/smoke.sh` first on a new GPU machine (docs/gpu.md).
"""
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
    group_size: int = 8  # G: samples per prompt = G-1 rollouts + 1 demonstration (official 8 = 7 + 1)
    clip_eps_low: float = 0.2  # epsilon_low of Eq. (4), rollout tokens only (Eq. 19)
    clip_eps_high: float = 0.2  # epsilon_high of Eq. (4), rollout tokens only (Eq. 19)
    clip: bool = True  # Eq. (19): PPO clip on rollout tokens (paper); --no-clip: -A rho (official)
    adv_std: bool = True  # Eq. (16): divide by the group std (paper); --no-adv_std: r - mean (official, Eq. 10)
    kl_coef: float = 0.0  # beta_KL of the k3 penalty, Eq. (11) (0 = no reference model)
    entropy_coef: float = 0.0  # beta_H of Eq. (20) over all response tokens, Eq. (12) (official: 0.001)
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"  # Z of Eq. (20): Eq. (6) paper | (7) | (8) official
    loss_constant: float = 0.0  # C of Eq. (8); 0 = world_size * max_response_len (official: 8 * 8192)
    shaping_gamma: float = 0.1  # gamma of the shaping function f(p) = p / (p + gamma), Eq. (17)
    demo_loss: Literal["shaped", "sft"] = "shaped"  # shaped: LUFFY, Eq. (17)-(18); sft: the RL + SFT-loss baseline
    sft_coef: float = 1.0  # weight of the demonstration NLL with --demo_loss sft (official sft_loss_coef)


# What the official code (ElliottYan/LUFFY, exp_scripts/train.sh) does differently from the paper.
OFFICIAL = {"clip": False, "adv_std": False, "loss_agg": "constant", "entropy_coef": 0.001}
# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"variant": "official", "lr": 1e-6, "prompts_per_step": 128, "prompts_per_minibatch": 64, "group_size": 8,
           "max_prompt_len": 1024, "max_response_len": 8192, "micro_batch_size": 4, "gradient_checkpointing": True,
           "lr_schedule": "constant",
           "max_steps": 500}


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


# The group layout: per prompt [demonstration, rollout_1, ..., rollout_{G-1}] (the demonstration first, as
# in the official rollout), prompt-major, so sample j of prompt i sits at i*G + j and column 0 of a
# [P, G] view is the demonstration (common.demonstration_sample: y* + EOS, all of it prefix, nothing generated).


def mixed_groups(prompts: list[dict], rollouts: list[list[common.Sample]], tokenizer) -> list[common.Sample]:
    """P prompts and their G-1 rollouts each -> the P*G samples of LUFFY's mixed groups (layout above)."""
    return [s for row, group in zip(prompts, rollouts) for s in [common.demonstration_sample(row, tokenizer), *group]]


def mixed_advantages(rewards: torch.Tensor, std: bool, demo_in_group: bool) -> torch.Tensor:
    """rewards [P, G], column 0 the demonstration -> advantages [P, G].
    demo_in_group: Eq. (16), one group statistic over on- and off-policy samples together (LUFFY).
    Otherwise (the RL + SFT-loss baseline) the statistics of the G-1 rollouts only; the demonstration
    gets 0, unused: its loss is the NLL."""
    if demo_in_group:
        return group_advantages(rewards, std)  # Eq. (16): Eq. (9) or, official, Eq. (10) over all G
    advantages = torch.zeros_like(rewards)
    advantages[:, 1:] = group_advantages(rewards[:, 1:], std)
    return advantages


def shaping(prob: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (17): f(p) = p / (p + gamma), applied elementwise."""
    return prob / (prob + gamma)


def luffy_loss(logp, old_logp, advantages, mask, demo_mask, cfg: Config, norm: float, token_norm: float,
               demo_norm: float, entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (20), or of the RL + SFT-loss baseline with cfg.demo_loss == "sft".

    logp, old_logp, ref_logp, entropy, mask, demo_mask: [B, R]; advantages: [B]. demo_mask is 1 on
    demonstration tokens. `norm` is the optimizer step's Z for cfg.loss_agg over the tokens of the policy
    terms, `token_norm` its count of all response tokens (KL, entropy, clip_frac), `demo_norm` its count of
    demonstration tokens (their NLL and diagnostics). The KL term (Eq. 11, --kl_coef) covers all response
    tokens, demonstrations included, as grpo.py's and the official code's (verl's KL loss over the response
    mask). Returns (loss, dict of detached terms)."""
    on_mask = mask * (1 - demo_mask)  # [B, R]: tokens the policy sampled
    off_mask = mask * demo_mask  # [B, R]: demonstration tokens
    ratio = torch.exp(logp - old_logp)  # Eq. (3): rho = 1 on the first mini-batch, grad = grad logp
    adv = advantages[:, None]  # [B, 1], broadcast to every token of response i
    unclipped = -ratio * adv  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv if cfg.clip else unclipped
    on_token = torch.maximum(unclipped, clipped)  # Eq. (19) = Eq. (4); --no-clip: -A rho
    pg_loss = common.aggregate(on_token, on_mask, cfg.loss_agg, norm)  # rollout share of Eq. (20)
    prob = torch.exp(logp)  # [B, R]: pi_theta(y*_t | x, y*_<t), with its gradient
    terms = {"pg_loss": pg_loss.detach(),
             "clip_frac": common.aggregate((clipped > unclipped).float(), on_mask, "token-mean", token_norm),
             "demo_prob": common.aggregate(prob.detach(), off_mask, "token-mean", demo_norm)}
    if cfg.demo_loss == "shaped":
        # Eq. (17)-(18), arXiv 2504.14945: pi_phi = 1, so no ratio to pi_old and nothing to clip
        off_token = -adv * shaping(prob, cfg.shaping_gamma)  # [B, R]
        off_policy_loss = common.aggregate(off_token, off_mask, cfg.loss_agg, norm)  # demo share of Eq. (20)
        loss = pg_loss + off_policy_loss  # Eq. (20): both sums over the same Z
        weight = cfg.shaping_gamma / (prob.detach() + cfg.shaping_gamma) ** 2  # f'(p): grad c_off = -A f'(p) grad p
        terms["off_policy_loss"] = off_policy_loss.detach()
        terms["shaping_weight"] = common.aggregate(weight, off_mask, "token-mean", demo_norm)
    else:
        # the paper's RL + SFT-loss baseline: token-mean NLL over the demonstration tokens (Eq. 13)
        sft_loss = common.aggregate(-logp, off_mask, "token-mean", demo_norm)
        loss = pg_loss + cfg.sft_coef * sft_loss
        terms["sft_loss"] = sft_loss.detach()
    if ref_logp is not None:  # Eq. (11): k3 estimator of KL(pi_theta || pi_ref), clamped
        log_r = ref_logp - logp
        kl = common.aggregate((torch.exp(log_r) - log_r - 1).clamp(-10, 10), mask, "token-mean", token_norm)
        loss = loss + cfg.kl_coef * kl
        terms["kl"] = kl.detach()
    if cfg.entropy_coef > 0:  # Eq. (12)/(20): entropy bonus over all response tokens, demonstrations included
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
    if G < 2:
        common.fail("--group_size must be at least 2: a LUFFY group is G-1 rollouts plus one demonstration "
                    "(official: 8 = 7 + 1)")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b,
                       need_demo=True, whole_demos="a demonstration is trained as a whole response")
    model = run.model
    constant = cfg.loss_constant or run.dist.world_size * cfg.max_response_len  # Eq. (8)'s C
    run.evaluate_base()
    for step in run.progress():
        # ---- 1. Rollout: G-1 responses per prompt from pi_old, plus its demonstration --------
        t0 = time.time()
        prompts = run.next_prompts(B)  # this rank's B / world_size prompts
        run.sampler.sync_weights(model)
        rollouts = run.sampler.generate([p["prompt_ids"] for p in prompts], n=G - 1, temperature=cfg.temperature,
                                        top_p=cfg.top_p, max_tokens=cfg.max_response_len)
        run.sampler.release()  # the rollout's last generate: a sleeping vLLM engine frees the GPU
        samples = mixed_groups(prompts, rollouts, run.tokenizer)  # [P*G]: per prompt [demo, rollouts]
        rewards = torch.tensor(run.verifier([s.text for s in samples],
                                            [p["answer"] for p in prompts for _ in range(G)]))  # [P*G]
        advantages = mixed_advantages(rewards.view(-1, G), cfg.adv_std,
                                      demo_in_group=cfg.demo_loss == "shaped").view(-1)  # [P*G], Eq. (16)
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
            demo_masks = [mb["prefix_mask"] for mb in minibatch]  # the demonstration rows' response tokens
            # Z of Eq. (20) counts every sample; the baseline's policy-gradient term only the rollouts
            pg_masks = masks if cfg.demo_loss == "shaped" else [m[d.sum(-1) == 0] for m, d in zip(masks, demo_masks)]
            norm = common.step_normaliser(pg_masks, cfg.loss_agg, constant)  # this step's Agg denominator
            token_norm = common.step_normaliser(masks, "token-mean")
            demo_norm = common.step_normaliser(demo_masks, "token-mean")
            for mb in minibatch:
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0)  # [b_micro, R] each
                loss, mb_terms = luffy_loss(logp, mb["old_logp"], mb["advantages"], mb["response_mask"],
                                            mb["prefix_mask"], cfg, norm, token_norm, demo_norm, entropy,
                                            mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint (reward, accuracy, entropy: rollouts only) ----------
        by_group = rewards.view(-1, G)  # [P, G], column 0 the demonstrations
        demo_masks = [mb["prefix_mask"] for mb in micro]
        demo_r, n_demo, demo_h, demo_tokens = common.all_reduce([
            float(by_group[:, 0].sum()), by_group.shape[0],
            sum(float((mb["old_entropy"] * m).sum()) for mb, m in zip(micro, demo_masks)),
            sum(float(m.sum()) for m in demo_masks)])
        metrics = common.step_metrics(terms, [s for g in rollouts for s in g], by_group[:, 1:].reshape(-1), micro,
                                      grad_norms, run.scheduler.get_last_lr()[0], t0, t1, t2, demo_tokens=demo_tokens)
        metrics.update(demo_reward=demo_r / n_demo, entropy_demo=demo_h / max(demo_tokens, 1))
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
