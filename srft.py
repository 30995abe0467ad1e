"""SRFT: A Single-Stage Method with Supervised and Reinforcement Fine-Tuning for Reasoning (arXiv 2506.19767),
forked from luffy.py.

Reference: METHODS.md section 5, Eq. (25)-(31), on top of GRPO's Eq. (2)-(4), (6)-(10), (12) and LUFFY's (17).

Every group of G samples holds G-1 rollouts of pi_old and ONE demonstration y* + EOS, used as a
whole response (an off-policy sample from the teacher pi_phi), graded by the same verifier
(official run: G = 8 = 7 rollouts + 1 demonstration). H_t is the per-token entropy of Eq. (2) from the
training forward, detached; each weight uses the entropy of the token it weighs. Per rollout batch:

    A_k    = (r_k - mean(G_aug r)) / std(G_aug r)                Eq. (25): statistics over all G samples
    w_SFT  = 0.5 sg(exp(-H_t))                                   Eq. (26): demonstration tokens
    L_SFT  = sum_demo w_SFT (-log pi_theta(y*_t | x, y*_<t)) / N_demo   Eq. (27): token-mean, demo tokens
    c_demo = -A_demo * pi_theta(y*_t | x, y*_<t)                 Eq. (28): pi_phi = 1, gradient through p, no clip
    w_RL   = 0.1 sg(exp(+H_t))                                   Eq. (29): rollout tokens with A_i > 0 only
    c_self = w_it * -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i),  w_it = w_RL if A_i > 0 else 1   Eq. (30)
    L      = L_SFT + [sum_demo c_demo + sum_rollouts c_self] / Z - beta_H E          Eq. (31)

Signs (METHODS checklist 7): w_SFT shrinks as the policy grows unsure of a demonstration token (exp(-H));
w_RL shrinks as it grows sure of its own successful tokens (exp(+H)), damping the push that positive
rollouts give towards certainty, which is what collapses entropy under plain RL. Negative-advantage
rollout tokens keep weight 1. Neither weight carries gradient.
Aggregation, both variants: Eq. (27) is a token-mean over the optimizer step's demonstration tokens (METHODS 5
[D]: the sources do not document it); Eq. (28) and (30) share one Z, that of --loss_agg (token-mean of all
response tokens, demonstrations included, as LUFFY's paper; official: the constant C of Eq. 8); E is the
token-mean entropy over all response tokens, demonstrations included (Eq. 12), beta_H = 0.001 (Eq. 31).

Paper vs official code. The official SRFT code was not available to us: these differences come from
secondary reading (METHODS.md 5, tagged [3P]; two reimplementations read, see METHODS.md 5).
`--variant official` sets all five (a flag written on the command line wins):
    1. Eq. (26): w_SFT = 0.5 sg(exp(+H_t)), the opposite exponent           (--w_sft_sign plus)
    2. Eq. (28): shaped demonstration ratio f(p) = p / (p + 0.1), Eq. (17)   (--demo_ratio shaped)
    3. Eq. (25): no std, A_k = r_k - mean over the G samples (Eq. 10); LUFFY code base, unconfirmed
       for SRFT (METHODS 5)                                                  (--no-adv_std)
    4. Eq. (30): no clip on rollout tokens, c = -A rho (LUFFY code base)      (--no-clip)
    5. Eq. (31): Z = the constant C of Eq. (8), D * L_max = 8 * 8192          (--loss_agg constant)
Not followed (METHODS 5): the paper's derivation with +-1 rewards (positive rollouts -log p, negative
+log p); the reimplementations' per-sequence entropies; see METHODS.md 5 for what they do.

Launch:
    python srft.py                                      # laptop: tiny model, builtin task, CPU, minutes
    python srft.py --model Qwen/Qwen2.5-Math-1.5B --data openr1.parquet --prompt_key prompt \\
        --answer_key reward_model.ground_truth --demo_key target --max_prompt_len 1024 \\
        --max_response_len 3072   # 1 GPU; 4k context: keep rows whose demonstration fits (others are refused)
    torchrun --nproc_per_node 8 srft.py --variant official --model Elliott/Qwen2.5-Math-7B-16k-think \\
        --lr_schedule constant \\
        --data openr1.parquet --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target \\
        --eval_data valid.parquet --lr 1e-6 --prompts_per_step 128 --prompts_per_minibatch 64 --group_size 8 \\
        --max_prompt_len 1024 --max_response_len 8192 --micro_batch_size 4 --gradient_checkpointing \\
        --max_steps 500   # 8 GPUs: the paper's hyper-parameters (it used 4 nodes x 8 A100)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 srft.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
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
    clip_eps_low: float = 0.2  # epsilon_low of Eq. (4), rollout tokens only (Eq. 30)
    clip_eps_high: float = 0.2  # epsilon_high of Eq. (4), rollout tokens only (Eq. 30)
    clip: bool = True  # Eq. (30): PPO clip on rollout tokens ([D]); --no-clip: -A rho (official)
    adv_std: bool = True  # Eq. (25): divide by the group std (paper); --no-adv_std: r - mean (official, Eq. 10)
    kl_coef: float = 0.0  # beta_KL of the k3 penalty, Eq. (11) (0 = no reference model)
    entropy_coef: float = 0.001  # beta_H of Eq. (31) over all response tokens, Eq. (12); 0 = the three terms alone
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"  # Z of Eq. (31): Eq. (6) paper | (7) | (8) official
    loss_constant: float = 0.0  # C of Eq. (8); 0 = world_size * max_response_len (official: 8 * 8192)
    shaping_gamma: float = 0.1  # gamma of the shaping function f(p) = p / (p + gamma), Eq. (17)
    demo_ratio: Literal["plain", "shaped"] = "plain"  # Eq. (28): pi_theta (paper) | f(pi_theta) of Eq. (17) (official)
    w_sft_coef: float = 0.5  # the 0.5 of w_SFT, Eq. (26)
    w_sft_sign: Literal["minus", "plus"] = "minus"  # Eq. (26): w_SFT ~ exp(-H) (paper) | exp(+H) (official)
    w_rl_coef: float = 0.1  # the 0.1 of w_RL on positive-advantage rollout tokens, Eq. (29)


# What the official code does differently from the paper, by secondary reading (METHODS.md 5 [3P]).
OFFICIAL = {"w_sft_sign": "plus", "demo_ratio": "shaped", "adv_std": False, "clip": False,
            "loss_agg": "constant"}
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


def shaping(prob: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (17): f(p) = p / (p + gamma), applied elementwise."""
    return prob / (prob + gamma)


def sft_weight(entropy: torch.Tensor, coef: float, sign: str) -> torch.Tensor:
    """Eq. (26), arXiv 2506.19767: w_SFT = coef * sg(exp(-H)) (paper; sign "minus") or coef * sg(exp(+H))
    (official code; sign "plus"), per token. entropy [B, R] -> [B, R], no gradient."""
    return coef * torch.exp(-entropy.detach() if sign == "minus" else entropy.detach())


def rl_weight(entropy: torch.Tensor, coef: float) -> torch.Tensor:
    """Eq. (29), arXiv 2506.19767: w_RL = coef * sg(exp(+H)), per token, the same sign in paper and code.
    entropy [B, R] -> [B, R], no gradient."""
    return coef * torch.exp(entropy.detach())


def srft_loss(logp, old_logp, advantages, mask, demo_mask, cfg: Config, norm: float, token_norm: float,
              demo_norm: float, rollout_norm: float, entropy, ref_logp=None):
    """One micro-batch's share of Eq. (31).

    logp, old_logp, ref_logp, entropy, mask, demo_mask: [B, R]; advantages: [B]. demo_mask is 1 on
    demonstration tokens; entropy is this forward's Eq. (2) (the weights detach it; the bonus E does not).
    `norm` is the optimizer step's Z for cfg.loss_agg over all response tokens, `token_norm`, `demo_norm`,
    `rollout_norm` its counts of all response tokens, demonstration tokens and rollout tokens. The KL term
    (Eq. 11, --kl_coef; not in the paper) covers all response tokens, demonstrations included, as grpo.py's
    and the LUFFY code base's. Returns (loss, dict of detached terms)."""
    on_mask = mask * (1 - demo_mask)  # [B, R]: tokens the policy sampled
    off_mask = mask * demo_mask  # [B, R]: demonstration tokens
    # (c) self-rollout term, Eq. (29)-(30), arXiv 2506.19767
    ratio = torch.exp(logp - old_logp)  # Eq. (3): rho = 1 on the first mini-batch, grad = grad logp
    adv = advantages[:, None]  # [B, 1], broadcast to every token of response i
    unclipped = -ratio * adv  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv if cfg.clip else unclipped
    on_token = torch.maximum(unclipped, clipped)  # Eq. (4); --no-clip: -A rho
    w_rl = rl_weight(entropy, cfg.w_rl_coef)  # [B, R], Eq. (29)
    w_self = torch.where(adv > 0, w_rl, torch.ones_like(w_rl))  # [B, R]: w_RL on positive advantages only
    pg_loss = common.aggregate(w_self * on_token, on_mask, cfg.loss_agg, norm)  # rollout share of Eq. (31)
    # (b) demonstration RL term, Eq. (28): pi_phi = 1, so no ratio to pi_old and nothing to clip
    prob = torch.exp(logp)  # [B, R]: pi_theta(y*_t | x, y*_<t), with its gradient
    demo_ratio = shaping(prob, cfg.shaping_gamma) if cfg.demo_ratio == "shaped" else prob  # [B, R]
    off_token = -adv * demo_ratio  # [B, R]
    off_policy_loss = common.aggregate(off_token, off_mask, cfg.loss_agg, norm)  # demo share of Eq. (31)
    # (a) entropy-weighted SFT term, Eq. (26)-(27): token-mean over the step's demonstration tokens
    w_sft = sft_weight(entropy, cfg.w_sft_coef, cfg.w_sft_sign)  # [B, R], Eq. (26)
    sft_loss = common.aggregate(-w_sft * logp, off_mask, "token-mean", demo_norm)  # Eq. (27)
    loss = sft_loss + off_policy_loss + pg_loss  # Eq. (31)
    h = entropy.detach()
    terms = {"sft_loss": sft_loss.detach(), "off_policy_loss": off_policy_loss.detach(), "pg_loss": pg_loss.detach(),
             "clip_frac": common.aggregate((clipped > unclipped).float(), on_mask, "token-mean", token_norm),
             "demo_prob": common.aggregate(prob.detach(), off_mask, "token-mean", demo_norm),
             "w_sft": common.aggregate(w_sft, off_mask, "token-mean", demo_norm),  # mean over demo tokens
             "w_rl": common.aggregate(w_rl, on_mask, "token-mean", rollout_norm),  # over all rollout tokens
             "entropy_demo": common.aggregate(h, off_mask, "token-mean", demo_norm),
             "entropy_rollout": common.aggregate(h, on_mask, "token-mean", rollout_norm)}
    if ref_logp is not None:  # Eq. (11): k3 estimator of KL(pi_theta || pi_ref), clamped
        log_r = ref_logp - logp
        kl = common.aggregate((torch.exp(log_r) - log_r - 1).clamp(-10, 10), mask, "token-mean", token_norm)
        loss = loss + cfg.kl_coef * kl
        terms["kl"] = kl.detach()
    if cfg.entropy_coef > 0:  # Eq. (12)/(31): entropy bonus over all response tokens, demonstrations included
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
        common.fail("--group_size must be at least 2: an SRFT group is G-1 rollouts plus one demonstration "
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
        advantages = group_advantages(rewards.view(-1, G), cfg.adv_std).view(-1)  # [P*G], Eq. (25): demo in the group
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
            norm = common.step_normaliser(masks, cfg.loss_agg, constant)  # this step's Agg denominator
            token_norm = common.step_normaliser(masks, "token-mean")
            demo_norm = common.step_normaliser(demo_masks, "token-mean")
            rollout_norm = common.step_normaliser([m - d for m, d in zip(masks, demo_masks)], "token-mean")
            for mb in minibatch:
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=True)  # [b_micro, R] each; the weights need H_t
                loss, mb_terms = srft_loss(logp, mb["old_logp"], mb["advantages"], mb["response_mask"],
                                           mb["prefix_mask"], cfg, norm, token_norm, demo_norm, rollout_norm, entropy,
                                           mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint (reward, accuracy, entropy: rollouts only) ----------
        by_group = rewards.view(-1, G)  # [P, G], column 0 the demonstrations
        demo_r, n_demo, demo_tokens = common.all_reduce([float(by_group[:, 0].sum()), by_group.shape[0],
                                                         sum(float(mb["prefix_mask"].sum())
                                                             for mb in micro)])  # the whole demonstrations
        metrics = common.step_metrics(terms, [s for g in rollouts for s in g], by_group[:, 1:].reshape(-1), micro,
                                      grad_norms, run.scheduler.get_last_lr()[0], t0, t1, t2, demo_tokens=demo_tokens)
        metrics.update(demo_reward=demo_r / n_demo)
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
