"""Prefix-RFT: blending supervised and reinforcement fine-tuning with prefix sampling.

Paper: arXiv 2507.01679; official code: github.com/ZeroYuHuang/prefix_rft (a verl recipe).
Reference: METHODS.md section 8, Eq. (42)-(48), with Eq. (3)-(5), (8)-(10), (12).

Per prompt, G - 1 plain rollouts y ~ pi_old(.|x) and one hybrid y^h = y*_{<=L} + z, z ~ pi_old(.|x, y*_{<=L}):

    l ~ U(l_low(t), l_high),  l_low(t) = l_end + (l_start - l_end) (1 + cos(pi t / T)) / 2    Eq. (42)
    L = min(max(floor(l |y*|), L_min), |y*| - 1)      (never the whole demonstration)     Eq. (43)
    A_i = r_i - mean of the group's G rewards, the hybrid's included                       Eq. (45)
    g_{i,t} = 1 on sampled tokens; of the unit's N prefix tokens, the ceil(k N) with the
              highest entropy keep g = 1, the others g = 0                                  Eq. (46)
    c_{i,t} = g_{i,t} * min(-min(rho A, clip(rho, 1-eps, 1+eps) A), -kappa A if A < 0)     Eq. (47), (4), (5)
    L(theta) = sum_{i,t} m_{i,t} c_{i,t} / C - beta_H * token-mean of H over sampled tokens  Eq. (48), (8), (12)

rho = exp(logp_theta - logp_old) on every response token (Eq. 3): pi_old's log-probs are recomputed on the
prefix too, so prefix tokens have rho = 1 on the first mini-batch and are clipped like sampled ones after.
The gate's H is the training forward's entropy (current weights, detached), as in the official code. To pool
a whole optimizer step (all micro-batches and ranks) it is fixed before the step's first backward: on the
first mini-batch the weights are pi_old's, so the entropies stored with the old log-probs are exactly it;
later mini-batches take one extra no-grad forward at the current weights.

Paper vs official code (METHODS.md 8, "paper vs code"); --variant official sets --unit microbatch (with
--micro_batching sequences: a unit is then the code's micro-batch of --micro_batch_size sequences):
  1. Eq. (46): the code pools the top-k prefix tokens per micro-batch, not per optimizer step.
  2. Eq. (48): the code divides each micro-batch's sum by L_max and by the micro-batches per rank and FSDP
     averages the D ranks: C = D * n_micro * L_max (paper [D]: C = |U| L_max); also Eq. (12): its entropy
     bonus is a mean of micro-batch token-means. Both follow from --unit microbatch.
  3. Eq. (45): the code also holds prefix-aware estimators (--advantage dr_grpo_prefix | dr_grpo_prefix_v2,
     worked out in hybrid_advantages); the released config does not say which produced the paper's
     numbers, so both variants use Eq. (45).
  4. Eq. (43): the code re-tokenises the decoded prefix after the chat template and shortens it to fit the
     prompt budget; here the prefix is token ids counted against the response budget L_max (common's prefix
     interface), so |prefix| <= L_max - 1 and no cut is needed.
  5. Eq. (47): a separate clip range for prefix tokens exists in the code but is inactive while clipping is on.
  6. The code's reward decodes prompt + prefix + continuation; here the verifier grades prefix + continuation.

Launch:
    python prefix_rft.py                                 # laptop: tiny model, builtin task, CPU, minutes
    python prefix_rft.py --model Qwen/Qwen2.5-Math-1.5B --data openr1.parquet --prompt_key prompt \\
        --answer_key reward_model.ground_truth --demo_key target            # 1 GPU (vLLM sampler)
    torchrun --nproc_per_node 8 prefix_rft.py --model Elliott/Qwen2.5-Math-7B-16k-think --data openr1.parquet \\
        --lr_schedule constant \\
        --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target --eval_data valid.parquet \\
        --lr 1e-6 --prompts_per_step 128 --prompts_per_minibatch 64 --group_size 8 --entropy_top_k 0.2 \\
        --prefix_high 0.95 --prefix_low_start 0.95 --prefix_low_end 0.05 --max_prompt_len 1024 \\
        --max_response_len 8192 --micro_batch_size 4 --gradient_checkpointing --max_steps 500  # 8 GPUs, paper
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 prefix_rft.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
Run `bash scripts/gpu/smoke.sh` first on a new GPU machine (docs/gpu.md).
"""
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

import common


@dataclass
class Config(common.BaseConfig):
    variant: Literal["paper", "official"] = "paper"  # official: every official-code setting in OFFICIAL below
    lr: float = 2e-4  # peak learning rate (the papers' runs: 1e-6)
    prompts_per_step: int = 16  # B: prompts per rollout batch (global, all ranks)
    prompts_per_minibatch: int = 8  # b: prompts per optimizer step; B/b optimizer steps per iteration
    group_size: int = 8  # G: responses per prompt, G - 1 plain rollouts and one hybrid
    clip_eps_low: float = 0.2  # epsilon_low of Eq. (4)
    clip_eps_high: float = 0.2  # epsilon_high of Eq. (4)
    clip: bool = True  # the PPO clip of Eq. (4); --no-clip: -rho A (the official runs of LUFFY, SRFT, ReLIFT, HPT)
    adv_std: bool = False  # divide by the group std (Eq. 9); default Eq. (45) = Dr.GRPO's Eq. (10)
    kl_coef: float = 0.0  # beta_KL of the k3 penalty, Eq. (11) (0 = no reference model)
    entropy_coef: float = 0.001  # beta_H of the entropy bonus over sampled (non-prefix) tokens, Eq. (12), (48)
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "constant"  # Eq. (6) | Eq. (7) | Eq. (8) (Eq. 48)
    loss_constant: float = 0.0  # C of Eq. (8) for one unit; 0 = |U| * L_max (minibatch) or L_max (microbatch, the code)
    dual_clip: float = 3.0  # kappa of Eq. (5), a cap of -kappa A on the loss of A < 0 tokens (0 = off)
    advantage: Literal["dr_grpo", "dr_grpo_prefix", "dr_grpo_prefix_v2"] = "dr_grpo"  # Eq. (45) | the code's (docstring 3)
    unit: Literal["minibatch", "microbatch"] = "minibatch"  # U of Eq. (6)-(8), (46): optimizer step, all ranks | each micro-batch
    entropy_top_k: float = 0.2  # k of Eq. (46): fraction of the unit's prefix tokens that keep their loss
    prefix_high: float = 0.95  # l_high of Eq. (42)
    prefix_low_start: float = 0.95  # l_start of Eq. (42): l_low at step 0
    prefix_low_end: float = 0.05  # l_end of Eq. (42): l_low from step T on
    prefix_decay_steps: int = 0  # T of Eq. (42), in iterations; 0 = --max_steps
    min_prefix_len: int = 1  # L_min of Eq. (43), in tokens


OFFICIAL = {"unit": "microbatch", "micro_batching": "sequences"}  # METHODS.md 8, paper vs code item 2 and Eq. (48)
# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"lr": 1e-6, "prompts_per_step": 128, "prompts_per_minibatch": 64, "group_size": 8, "entropy_top_k": 0.2,
           "prefix_high": 0.95, "prefix_low_start": 0.95, "prefix_low_end": 0.05, "max_prompt_len": 1024,
           "lr_schedule": "constant",
           "max_response_len": 8192, "micro_batch_size": 4, "gradient_checkpointing": True, "max_steps": 500}


# ======================================================================================
# The algorithm
# ======================================================================================


def prefix_low(t: int, cfg: Config) -> float:
    """l_low(t) of Eq. (42) after t iterations: cosine from l_start (t = 0) to l_end (t >= T)."""
    T = cfg.prefix_decay_steps or cfg.max_steps
    if t >= T:
        return cfg.prefix_low_end
    return cfg.prefix_low_end + 0.5 * (cfg.prefix_low_start - cfg.prefix_low_end) * (1 + math.cos(math.pi * t / T))


def demo_length(demo_ids: list[int], eos_id: int) -> int:
    """|y*| of Eq. (43): the demonstration's tokens without the EOS that common appends (as the code counts)."""
    return len(demo_ids) - int(demo_ids[-1] == eos_id)


def prefix_lengths(demo_lens: list[int], low: float, high: float, min_len: int, generator=None) -> list[int]:
    """Eq. (42)-(43): per hybrid l ~ U(low, high), L = floor(l |y*|), raised to min_len, capped at |y*| - 1
    (the cap wins: the hybrid never holds the whole demonstration). demo_lens: |y*| of each prompt."""
    u = torch.rand(len(demo_lens), dtype=torch.float64, generator=generator).tolist()  # [P]
    return [min(max(math.floor((low + (high - low) * ui) * n), min_len), n - 1) for ui, n in zip(u, demo_lens)]


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


def hybrid_advantages(rewards: torch.Tensor, estimator: str, std: bool):
    """rewards [P, G], the hybrid in the last column -> (A of sampled tokens, A of prefix tokens), [P, G] each.

    dr_grpo, Eq. (45): A = r - mean of all G rewards (the hybrid joins the statistics), on every token.
    The official code's prefix-aware estimators, worked out for this layout (one continuation per prefix;
    mu' = mean of the G - 1 plain rewards, which dr_grpo_prefix takes as 0 when G - 1 = 1):
      dr_grpo_prefix:    plain r - mu'; hybrid sampled tokens r_h (its own group of one), prefix r_h - mu'
      dr_grpo_prefix_v2: plain r - mu'; hybrid sampled tokens 0, prefix tokens -mu'"""
    if estimator == "dr_grpo":
        adv = group_advantages(rewards, std)  # [P, G], Eq. (45) = Eq. (10) (Eq. 9 with std)
        return adv, adv
    plain, hybrid = rewards[:, :-1], rewards[:, -1:]  # [P, G-1], [P, 1]
    if estimator == "dr_grpo_prefix":
        adv_plain, sampled = group_advantages(plain, std=False), hybrid
    else:
        adv_plain, sampled = plain - plain.mean(dim=1, keepdim=True), torch.zeros_like(hybrid)
    mu = (plain - adv_plain)[:, :1]  # [P, 1]: the baseline subtracted from the plain rollouts
    return torch.cat([adv_plain, sampled], dim=1), torch.cat([adv_plain, sampled - mu], dim=1)


@torch.no_grad()
def gate_entropies(model, minibatch: list[dict], first: bool, temperature: float) -> list[torch.Tensor]:
    """H of Eq. (46) for one optimizer step, [b_micro, R] per micro-batch: the training forward's entropy at
    the weights this step differentiates. On the first mini-batch those are pi_old's, stored already."""
    if first:
        return [mb["old_entropy"] for mb in minibatch]
    return [model(**common.model_inputs(mb), temperature=temperature, with_entropy=True)[1] for mb in minibatch]


def entropy_gates(entropies: list, prefix_masks: list, k: float, unit: str) -> list[torch.Tensor]:
    """Eq. (46): gates [b_micro, R] for this rank's micro-batches. 1 on every non-prefix token; of the N prefix
    tokens of a unit (minibatch: all micro-batches on all ranks; microbatch: each one alone) exactly ceil(k N)
    with the highest entropy keep 1, ties broken by position (rank, micro-batch, row, token), the others 0."""
    units = [list(range(len(entropies)))] if unit == "minibatch" else [[i] for i in range(len(entropies))]
    rank = common.rank() if unit == "minibatch" else 0
    gates = [torch.ones_like(e) for e in entropies]
    for members in units:
        local = torch.cat([entropies[i][prefix_masks[i].bool()] for i in members])  # [n], row-major order
        pool = common.all_gather_1d(local) if unit == "minibatch" else [local]  # every rank's, in rank order
        flat = torch.cat(pool)  # [N]
        keep = math.ceil(Fraction(str(k)) * flat.numel())  # exact: k as the decimal written
        kept = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        kept[torch.sort(-flat, stable=True).indices[:keep]] = True  # highest first, earlier position on ties
        start = sum(p.numel() for p in pool[:rank])
        mine = kept[start:start + local.numel()].to(gates[0].dtype)  # this rank's share, in the same order
        for i in members:
            n = int(prefix_masks[i].sum())
            gates[i][prefix_masks[i].bool()] = mine[:n]
            mine = mine[n:]
    return gates


def unit_normalisers(masks: list, mode: str, constant: float, unit: str) -> list[float]:
    """Denominator of Agg (Eq. 6-8) for each of this rank's micro-batches (masks [b_micro, R]) in one step.
    minibatch: U = the whole optimizer step on all ranks (common.step_normaliser, one value for all).
    microbatch (official code): each micro-batch is its own U and its loss is divided by the micro-batches
    per rank; FSDP averages the ranks, so the step's loss is the mean over its D * n_micro units."""
    if unit == "minibatch":
        return [common.step_normaliser(masks, mode, constant)] * len(masks)
    size = {"token-mean": lambda m: float(m.sum()), "seq-mean": lambda m: float(m.shape[0]),
            "constant": lambda m: constant}[mode]
    return [len(masks) * max(size(m), 1.0) for m in masks]


def prefix_rft_loss(logp, old_logp, advantages, mask, gate, sampled_mask, cfg: Config, norm: float,
                    token_norm: float, sampled_norm: float, entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (48).

    logp, old_logp, ref_logp, advantages, mask, gate, sampled_mask, entropy: [B, R]. Advantages are per token
    (Eq. 45 gives all tokens of response i the same A_i, the code's prefix-aware estimators do not); gate from
    Eq. (46); sampled_mask: the response tokens the policy sampled (no prefix). `norm` is the unit's
    denominator for cfg.loss_agg, `token_norm` / `sampled_norm` its response / sampled token counts. The KL
    term (Eq. 11, --kl_coef) covers all response tokens, prefix included and ungated, as grpo.py's and verl's
    KL loss over the response mask. Returns (loss, dict of detached terms)."""
    ratio = torch.exp(logp - old_logp)  # Eq. (3), prefix tokens included: rho = 1 on the first mini-batch
    unclipped = -ratio * advantages  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * advantages if cfg.clip else unclipped
    per_token = torch.maximum(unclipped, clipped)  # Eq. (4): -min(rho A, clip(rho) A); --no-clip: -rho A
    cap = -cfg.dual_clip * advantages  # [B, R]
    dual = (advantages < 0) & (per_token > cap) if cfg.dual_clip > 0 else torch.zeros_like(mask, dtype=torch.bool)
    per_token = torch.where(dual, cap, per_token)  # Eq. (5): min(c, -kappa A) where A < 0, no gradient there
    per_token = gate * per_token  # Eq. (47): gated prefix tokens keep no loss and no gradient
    pg_loss = common.aggregate(per_token, mask, cfg.loss_agg, norm)  # Eq. (48) with Eq. (8) (or 6 / 7)
    loss = pg_loss
    terms = {"pg_loss": pg_loss.detach(),
             "clip_frac": common.aggregate((clipped > unclipped).float(), mask, "token-mean", token_norm),
             "dual_clip_frac": common.aggregate(dual.float(), mask, "token-mean", token_norm)}
    if ref_logp is not None:  # Eq. (11): k3 estimator of KL(pi_theta || pi_ref), clamped
        log_r = ref_logp - logp
        kl = common.aggregate((torch.exp(log_r) - log_r - 1).clamp(-10, 10), mask, "token-mean", token_norm)
        loss = loss + cfg.kl_coef * kl
        terms["kl"] = kl.detach()
    if cfg.entropy_coef > 0:  # Eq. (12), (48): entropy bonus over the sampled tokens only
        entropy_bonus = common.aggregate(entropy, sampled_mask, "token-mean", sampled_norm)
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
        common.fail("--group_size must be at least 2: a group holds G - 1 plain rollouts and one hybrid")
    if not 0 < cfg.entropy_top_k <= 1:
        common.fail("--entropy_top_k (k of Eq. 46) must be in (0, 1]")
    if not 0 <= cfg.prefix_low_end <= cfg.prefix_high <= 1 or not 0 <= cfg.prefix_low_start <= cfg.prefix_high:
        common.fail("need 0 <= --prefix_low_end, --prefix_low_start <= --prefix_high <= 1 (Eq. 42)")
    if cfg.min_prefix_len < 1:
        common.fail("--min_prefix_len (L_min of Eq. 43) must be at least 1")
    if cfg.prefix_decay_steps < 0:
        common.fail("--prefix_decay_steps must be >= 0 (0 = --max_steps)")
    if 0 < cfg.dual_clip <= 1 or cfg.dual_clip < 0:
        common.fail("--dual_clip (kappa of Eq. 5) must be > 1, or 0 for none")
    if cfg.loss_constant < 0:
        common.fail("--loss_constant must be >= 0 (0 = the default C of Eq. 8)")
    if cfg.adv_std and cfg.advantage != "dr_grpo":
        common.fail("--adv_std applies to --advantage dr_grpo only; drop one")
    if cfg.unit == "microbatch" and cfg.micro_batching != "sequences":
        common.fail("--unit microbatch makes each micro-batch a unit of Eq. (46) and (48), so the loss depends on how "
                    "a step is cut: give --micro_batching sequences (--variant official does)")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b,
                       need_demo=True)
    model, eos = run.model, run.tokenizer.eos_token_id
    if short := sum(demo_length(r["demo_ids"], eos) < 2 for r in run.train_rows):
        common.fail(f"{short} training demonstrations are shorter than 2 tokens, so no prefix can leave "
                    "the policy a token (Eq. 43); drop those rows or raise --max_response_len")
    constant = cfg.loss_constant or (b * G if cfg.unit == "minibatch" else 1) * cfg.max_response_len  # Eq. (8)'s C
    run.evaluate_base()
    for step in run.progress():
        # ---- 1. Rollout: per prompt G - 1 plain rollouts and one hybrid (Eq. 42-44) -------------
        t0 = time.time()
        prompts = run.next_prompts(B)  # this rank's B / world_size prompts
        l_low = prefix_low(step, cfg)  # Eq. (42)
        demo_lens = [demo_length(p["demo_ids"], eos) for p in prompts]
        lengths = prefix_lengths(demo_lens, l_low, cfg.prefix_high, cfg.min_prefix_len)  # Eq. (43)
        run.sampler.sync_weights(model)
        # One request per response, so that one sampler call holds both kinds; the hybrid is last (Eq. 44).
        prefixes = [p["demo_ids"][:L] if j == G - 1 else [] for p, L in zip(prompts, lengths) for j in range(G)]
        groups = run.sampler.generate([p["prompt_ids"] for p in prompts for _ in range(G)], n=1,
                                      temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_len,
                                      prefixes=prefixes)
        run.sampler.release()  # the rollout's last generate: a sleeping vLLM engine frees the GPU
        samples = [g[0] for g in groups]  # prompt-major: sample j of prompt i at i*G + j, the hybrid at j = G-1
        rewards = torch.tensor(run.verifier([s.text for s in samples],
                                            [p["answer"] for p in prompts for _ in range(G)]))  # [P*G]
        advantages, prefix_advantages = hybrid_advantages(rewards.view(-1, G), cfg.advantage, cfg.adv_std)  # Eq. (45)
        t1 = time.time()

        # ---- 2. B/b mini-batches of micro-batches; log-probs of pi_old (and pi_ref), no grad; prefix too ---
        minibatches = common.minibatches(samples, {"advantages": advantages.view(-1),
                                                   "prefix_advantages": prefix_advantages.view(-1)}, B // b,
                                         cfg, run.tokenizer.pad_token_id, run.dist.device)
        micro = [mb for minibatch in minibatches for mb in minibatch]
        common.old_logprobs(run, micro, cfg.temperature)

        # ---- 3. One optimizer step per mini-batch; its entropy gate is fixed before any backward ----
        terms, grad_norms, kept = [], [], 0.0
        for m, minibatch in enumerate(minibatches):
            masks = [mb["response_mask"] for mb in minibatch]
            sampled = [mb["response_mask"] * (1 - mb["prefix_mask"]) for mb in minibatch]
            norms = unit_normalisers(masks, cfg.loss_agg, constant, cfg.unit)  # this step's Agg denominators
            token_norms = unit_normalisers(masks, "token-mean", 0.0, cfg.unit)
            sampled_norms = unit_normalisers(sampled, "token-mean", 0.0, cfg.unit)
            entropies = gate_entropies(model, minibatch, m == 0, cfg.temperature)
            gates = entropy_gates(entropies, [mb["prefix_mask"] for mb in minibatch], cfg.entropy_top_k, cfg.unit)
            for mb, gate, s, norm, tn, sn in zip(minibatch, gates, sampled, norms, token_norms, sampled_norms):
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0)  # [b_micro, R] each
                adv = torch.where(mb["prefix_mask"].bool(), mb["prefix_advantages"][:, None],
                                  mb["advantages"][:, None])  # [b_micro, R]
                loss, mb_terms = prefix_rft_loss(logp, mb["old_logp"], adv, mb["response_mask"], gate, s, cfg, norm,
                                                 tn, sn, entropy, mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
                kept += float((gate * mb["prefix_mask"]).sum())
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint -----------------------------------------------------
        plain = torch.arange(len(samples)) % G != G - 1  # [P*G]
        r_hybrid, n_hybrid, ratio_sum, n_kept, n_prefix, h_prefix = common.all_reduce([
            rewards[~plain].sum(), len(prompts), sum(L / n for L, n in zip(lengths, demo_lens)), kept,
            sum(float(mb["prefix_mask"].sum()) for mb in micro),
            sum(float((mb["old_entropy"] * mb["prefix_mask"]).sum()) for mb in micro)])
        metrics = common.step_metrics(terms, [s for s, p in zip(samples, plain) if p], rewards[plain], micro,
                                      grad_norms, run.scheduler.get_last_lr()[0], t0, t1, t2,
                                      demo_tokens=n_prefix)  # the hybrids' prefix tokens, all ranks
        metrics.update(prefix_low=l_low, prefix_ratio=ratio_sum / n_hybrid, reward_plain=metrics["reward"],
                       reward_hybrid=r_hybrid / n_hybrid, gate_kept_frac=n_kept / max(n_prefix, 1),
                       entropy_prefix=h_prefix / max(n_prefix, 1))  # pi_old's mean entropy on prefix tokens
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
