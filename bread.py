"""BREAD: Branched Rollouts from Expert Anchors Bridge SFT & RL for Reasoning (arXiv 2506.17211).

GRPO, except for a question whose whole group fails: then the policy is re-rolled from an
"anchor", a prefix of the demonstration found by binary search, so that the update sees a success.
Reference: METHODS.md section 7, Eq. (39)-(41), on top of GRPO's Eq. (1)-(12), (15).

Objective, per rollout batch of B questions x G responses:

    group of x       = G rollouts of pi_old(.|x)                 if some rollout is correct,
                       G rollouts of pi_old(.|x, P_k)            else, k from Eq. (40)
    L(theta)         = GRPO (Eq. 15) on the selected groups: Agg_{i,t}[ -min(rho A_i, clip(rho) A_i) ]
                       over the *generated* tokens only; the anchor P_k is context, no loss (Eq. 41)
    A_i              = (r_i - mean_g r) / (std_g r + 1e-6) within the selected group (Eq. 9)
    P_k              = e_1 + ... + e_k, the first k of the K_q <= K episodes of y* (Eq. 39)
    search (Eq. 40)  : lo, hi = 1, K_q; k = (lo + hi) // 2; G rollouts from x + P_k;
                       all fail -> lo = k + 1 | all succeed -> hi = k - 1, remember as fallback |
                       mixed -> accept k. At most ceil(log2(K_q + 1)) extra rounds per question.

All search rounds sample from pi_old (the weights of the first round; no update happens before the
last round), and one round is one sampler call for every question still searching, not one per
question. The selected group replaces the failed one in the batch, so the batch keeps its shape.

No official code exists, so there is no `--variant official`. The paper leaves these open; each is
a project default [D] of METHODS.md 7 and a flag:
  - episodes (Eq. 39): --episode_split line (cut after tokens whose text ends a line; METHODS 7
    suggests blank lines: --episode_split paragraph; --episode_split tokens for data without
    newlines), --num_episodes 10 (the paper's K ~ 10 [3P]). More than K lines are merged into at
    most K pieces of roughly equal token count (the cut nearest to j*n/K for j < K); fewer lines stay
    fewer pieces (never cut inside a line). The demonstration's EOS is never part of an anchor, so
    P_K = the whole demonstration text and the model still writes at least the EOS.
  - fallback (Eq. 40): --fallback success trains on the smallest all-success group (zero advantage
    under Eq. 9; it counts in the token-mean); --fallback skip drops it. A question whose anchors
    all fail (even P_K) is skipped: its failed group stays in the batch with no loss (weight 0).
  - --max_search_rounds 0: no cap below the binary search's own bound; N > 0 stops earlier.
  - the anchored group replaces the failed group (Eq. 41 [D]); keeping both is not offered, since
    it would make the batch size depend on the search (ranks must run equal micro-batch counts).
  - loss (Eq. 41 [D]): eps 0.2, token-mean (Eq. 6), beta_KL 0 (--kl_coef 0.001 for k3), beta_H 0.
The core keys `reward`, `accuracy`, `response_length` are those of the first, anchor-free round
(the policy's own success, comparable with grpo.py; `entropy` is over the generated tokens of the
trained batch); the search's cost and anchors have their own keys (search_metrics).

Launch:
    python bread.py                                     # laptop: tiny model, builtin task, CPU, minutes
    python bread.py --model Qwen/Qwen2.5-1.5B-Instruct --data numina_hard.jsonl --demo_key solution \\
        --no-require_think --max_prompt_len 1024 --max_response_len 4096 --lr 1e-6 \\
        --micro_batch_size 4 --gradient_checkpointing   # 1 GPU (vLLM); file rows: problem, answer, solution
    torchrun --nproc_per_node 8 bread.py --model Qwen/Qwen2.5-3B-Instruct --data numina_hard.jsonl \\
        --demo_key solution --no-require_think --eval_data valid.jsonl --lr 1e-6 --lr_schedule constant \\
        --prompts_per_step 128 --prompts_per_minibatch 64 --group_size 8 --num_episodes 10 \\
        --max_prompt_len 1024 --max_response_len 4096 --micro_batch_size 4 --gradient_checkpointing \\
        --max_steps 500      # 8 GPUs: METHODS 7 reference [D] (G 8, B 128, lr 1e-6, L_max 4096, K 10)
    torchrun --nproc_per_node 8 bread.py --model Elliott/Qwen2.5-Math-7B-16k-think --data openr1.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target ...flags above... \\
        --max_response_len 8192 --episode_split paragraph   # 8 GPUs on LUFFY's data (1024 + 8192 tokens)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 bread.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
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
    lr: float = 2e-4  # peak learning rate (the papers' runs: 1e-6)
    prompts_per_step: int = 16  # B: prompts per rollout batch (global, all ranks)
    prompts_per_minibatch: int = 8  # b: prompts per optimizer step; B/b optimizer steps per iteration
    group_size: int = 8  # G: responses per prompt and per search round (>= 2: the search wants a mixed group)
    clip_eps_low: float = 0.2  # epsilon_low of Eq. (4)
    clip_eps_high: float = 0.2  # epsilon_high of Eq. (4)
    clip: bool = True  # the PPO clip of Eq. (4); --no-clip: -rho A (the official runs of LUFFY, SRFT, ReLIFT, HPT)
    adv_std: bool = True  # divide by the group std: Eq. (9); --no-adv_std gives Dr.GRPO's Eq. (10)
    kl_coef: float = 0.0  # beta_KL of the k3 penalty, Eq. (11) (0 = no reference model)
    entropy_coef: float = 0.0  # beta_H of the entropy bonus, Eq. (12)
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"  # Eq. (6) | Eq. (7) | Eq. (8)
    loss_constant: float = 0.0  # C of Eq. (8); 0 = world_size * max_response_len (official: 8 * 8192)
    num_episodes: int = 10  # K of Eq. (39): at most K episodes per demonstration (paper ~10; builtin: 4-7 lines)
    episode_split: Literal["line", "paragraph", "tokens"] = "line"  # Eq. (39) cuts [D]: line | blank line | K equal
    max_search_rounds: int = 0  # extra rounds per question at most; 0 = the search's own bound ceil(log2(K_q+1))
    fallback: Literal["success", "skip"] = "success"  # no mixed group: smallest all-success group [D] | skip


# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"require_think": False, "lr": 1e-6, "prompts_per_step": 128, "prompts_per_minibatch": 64, "group_size": 8,
           "num_episodes": 10, "max_prompt_len": 1024, "max_response_len": 4096, "micro_batch_size": 4,
           "lr_schedule": "constant",
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


def episode_ends(token_texts: list[str], K: int, split: str) -> list[int]:
    """METHODS.md Eq. (39), BREAD (arXiv 2506.17211): cut a demonstration (its tokens' texts, EOS
    excluded) into at most K episodes; returns their end offsets [e_1, ..., e_Kq = n], so the anchor
    P_k is demo[:ends[k - 1]]. `line`: a piece ends after a token whose text ends a line;
    `paragraph`: after a token that ends a blank line ("\\n\\n", also across tokens); `tokens`:
    min(K, n) pieces of equal token count. More than K pieces are merged: the cuts kept are those
    nearest to j * n / K, j = 1..K-1 (ties: the earlier cut), so pieces are roughly equal in tokens."""
    n = len(token_texts)
    if n == 0:
        return []
    if split == "tokens":
        k = min(K, n)
        return [-(-j * n // k) for j in range(1, k + 1)]  # ceil(j * n / k), in integers
    need, cuts, trailing = (1 if split == "line" else 2), [], 0
    for j, text in enumerate(token_texts):  # trailing: newlines at the end of the text so far
        stripped = len(text) - len(text.rstrip("\n"))
        trailing = trailing + stripped if stripped == len(text) else stripped
        if stripped and trailing >= need:  # a token with no newline of its own never ends a piece
            cuts.append(j + 1)
    if not cuts or cuts[-1] != n:
        cuts.append(n)  # the last piece ends with the demonstration, newline or not
    if len(cuts) <= K:
        return cuts
    kept = {min(cuts[:-1], key=lambda c: (abs(c - j * n / K), c)) for j in range(1, K)}
    return sorted(kept | {n})


def anchor_search(sampler, verifier, questions: list[dict], ends: list[list[int]], G: int, max_rounds: int,
                  **sampling) -> tuple[list[dict], int]:
    """METHODS.md Eq. (40), BREAD (arXiv 2506.17211): the episode-anchor binary search for every
    failed question at once. questions: rows {prompt_ids, demo_ids (EOS last), answer}; ends: their
    episode ends (Eq. 39). Each round is ONE sampler call with G samples for every question still
    searching, then one verifier call. Per question the search stops when a group is mixed, when
    lo > hi, or after min(ceil(log2(K_q + 1)), max_rounds or inf) rounds.

    Returns (per question {status: "mixed" | "fallback" | "skip", k, group (list of G Samples or
    None), rewards, rounds, samples, tokens (generated, anchors excluded)}, number of sampler calls)."""
    state = [{"lo": 1, "hi": len(e), "status": "skip", "k": 0, "group": None, "rewards": None, "rounds": 0,
              "samples": 0, "tokens": 0, "limit": min(math.ceil(math.log2(len(e) + 1)), max_rounds or math.inf)}
             for e in ends]
    calls = 0
    while active := [q for q, s in enumerate(state)
                     if s["status"] != "mixed" and s["lo"] <= s["hi"] and s["rounds"] < s["limit"]]:
        ks = [(state[q]["lo"] + state[q]["hi"]) // 2 for q in active]  # the middle episode
        anchors = [questions[q]["demo_ids"][:ends[q][k - 1]] for q, k in zip(active, ks)]  # P_k, never the EOS
        groups = sampler.generate([questions[q]["prompt_ids"] for q in active], n=G, prefixes=anchors, **sampling)
        rewards = verifier([s.text for g in groups for s in g],
                           [questions[q]["answer"] for q in active for _ in range(G)])  # [len(active) * G]
        calls += 1
        for j, (q, k, group) in enumerate(zip(active, ks, groups)):
            s, r = state[q], rewards[j * G:(j + 1) * G]
            s["rounds"], s["samples"] = s["rounds"] + 1, s["samples"] + G
            s["tokens"] += sum(len(x.generated_ids) for x in group)
            wins = sum(x == 1 for x in r)
            if wins == 0:  # all fail: the anchor is too short
                s["lo"] = k + 1
            elif wins == G:  # all succeed: too long; remember it, the last one is the smallest k
                s.update(hi=k - 1, status="fallback", k=k, group=group, rewards=r)
            else:  # mixed: accept P_k
                s.update(status="mixed", k=k, group=group, rewards=r)
    return [{k: s[k] for k in ("status", "k", "group", "rewards", "rounds", "samples", "tokens")} for s in state], calls


def replace_failed_groups(samples: list, rewards: torch.Tensor, failed: list[int], results: list[dict], G: int,
                          fallback: str):
    """Eq. (41) [D]: the selected anchored group replaces question failed[j]'s group (samples
    prompt-major, G per question). A skipped question keeps its failed group with weight 0 (no loss).
    Returns (samples, rewards [N], weights [N])."""
    samples, rewards, weights = list(samples), rewards.clone(), torch.ones(len(samples))
    for i, res in zip(failed, results):
        span = slice(i * G, (i + 1) * G)
        if res["status"] == "mixed" or res["status"] == "fallback" and fallback == "success":
            samples[span], rewards[span] = res["group"], torch.tensor(res["rewards"], dtype=rewards.dtype)
        else:
            weights[span] = 0.0
    return samples, rewards, weights


def generated_mask(mb: dict) -> torch.Tensor:
    """Eq. (41): the loss mask [B, R] = response tokens the policy generated; the anchor's tokens
    (prefix_mask) are context only and get no loss; rows of a skipped question (weight 0) get none."""
    return mb["response_mask"] * (1 - mb["prefix_mask"]) * mb["weights"][:, None]


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


def search_metrics(results: list[dict], ends: list[list[int]], n_prompts: int, calls: int, fallback: str,
                   first_round: list) -> dict:
    """The search's diagnostics, over all ranks: shares of the step's questions that needed a search
    and how it ended, the anchors of the trained anchored groups (tokens / demonstration tokens =
    prefix_ratio, k / K_q), and the cost: extra rounds, samples and generated tokens."""
    used = [(r, e) for r, e in zip(results, ends) if r["status"] == "mixed" or r["status"] == "fallback"
            and fallback == "success"]
    sums = common.all_reduce([
        n_prompts, len(results), *(sum(r["status"] == s for r in results) for s in ("mixed", "fallback", "skip")),
        len(used), sum(e[r["k"] - 1] / e[-1] for r, e in used), sum(r["k"] / len(e) for r, e in used),
        sum(e[r["k"] - 1] for r, e in used), sum(sum(r["rewards"]) / len(r["rewards"]) for r, _ in used),
        sum(r["rounds"] for r in results), calls, sum(r["samples"] for r in results),
        sum(r["tokens"] for r in results), sum(len(s.generated_ids) for s in first_round)])
    n, searched, mixed, fell, skipped, n_used, frac_tok, frac_ep, tok, rew, rounds, calls, extra_s, extra_t, first_t \
        = sums
    world = common.world_size()
    per_used = (lambda v: v / n_used) if n_used else (lambda v: None)  # means over the trained anchored groups
    return {"search_frac": searched / n, "anchor_mixed_frac": mixed / n, "anchor_fallback_frac": fell / n,
            "anchor_skip_frac": skipped / n, "prefix_ratio": per_used(frac_tok),
            "anchor_episode_frac": per_used(frac_ep), "anchor_tokens": per_used(tok), "anchored_reward": per_used(rew),
            "search_rounds": rounds / searched if searched else None, "search_calls": calls / world,
            "extra_samples": extra_s, "extra_tokens": extra_t, "generated_tokens": first_t + extra_t,
            "demo_tokens": tok}  # anchor tokens of the trained anchored groups, once per question


# ======================================================================================
# Training loop
# ======================================================================================


def main():
    cfg = common.parse_config(Config)
    B, b, G = cfg.prompts_per_step, cfg.prompts_per_minibatch, cfg.group_size
    if B % b:
        common.fail("--prompts_per_step must be a multiple of --prompts_per_minibatch")
    if G < 2:
        common.fail("--group_size must be at least 2: the anchor search looks for a group with both a "
                    "success and a failure (Eq. 40), and Eq. (9) needs two samples")
    if cfg.num_episodes < 1 or cfg.max_search_rounds < 0:
        common.fail("--num_episodes must be >= 1 and --max_search_rounds >= 0 (0 = no cap)")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b,
                       need_demo=True, whole_demos="anchors reach the whole demonstration (Eq. 40)")
    model = run.model
    vocab_text = run.tokenizer.batch_decode([[i] for i in range(len(run.tokenizer))])  # token id -> its text
    constant = cfg.loss_constant or run.dist.world_size * cfg.max_response_len  # Eq. (8)'s C
    run.evaluate_base()
    for step in run.progress():
        # ---- 1. Rollout: G responses per prompt from pi_old; anchor search for all-fail groups ---
        t0 = time.time()
        prompts = run.next_prompts(B)  # this rank's B / world_size prompts
        run.sampler.sync_weights(model)  # pi_old: the first round and every search round sample from it
        sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_len)
        groups = run.sampler.generate([p["prompt_ids"] for p in prompts], n=G, **sampling)
        rollouts = [s for g in groups for s in g]  # prompt-major: sample j of prompt i at i*G + j
        first_rewards = torch.tensor(run.verifier([s.text for s in rollouts],
                                                  [p["answer"] for p in prompts for _ in range(G)]))  # [P*G]
        failed = [i for i in range(len(prompts)) if not (first_rewards[i * G:(i + 1) * G] == 1).any()]
        ends = [episode_ends([vocab_text[t] for t in prompts[i]["demo_ids"][:-1]], cfg.num_episodes,
                             cfg.episode_split) for i in failed]  # Eq. (39), EOS excluded
        results, calls = anchor_search(run.sampler, run.verifier, [prompts[i] for i in failed], ends, G,
                                       cfg.max_search_rounds, **sampling)  # Eq. (40)
        run.sampler.release()  # the rollout's last generate: a sleeping vLLM engine frees the GPU
        samples, rewards, weights = replace_failed_groups(rollouts, first_rewards, failed, results, G, cfg.fallback)
        advantages = group_advantages(rewards.view(-1, G), cfg.adv_std).view(-1)  # [P*G], Eq. (9) per group
        t1 = time.time()

        # ---- 2. B/b mini-batches of micro-batches; log-probs of pi_old (and pi_ref), no grad ----
        minibatches = common.minibatches(samples, {"advantages": advantages, "weights": weights}, B // b,
                                         cfg, run.tokenizer.pad_token_id, run.dist.device)
        micro = [mb for minibatch in minibatches for mb in minibatch]
        common.old_logprobs(run, micro, cfg.temperature)

        # ---- 3. One optimizer step per mini-batch (ppo_epochs = 1) -----------------------------
        terms, grad_norms = [], []
        for minibatch in minibatches:
            masks = [generated_mask(mb)[mb["weights"] > 0] for mb in minibatch]  # the rows and tokens with loss
            norm = common.step_normaliser(masks, cfg.loss_agg, constant)  # this step's Agg denominator
            token_norm = common.step_normaliser(masks, "token-mean")
            for mb in minibatch:
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0)  # [b_micro, R] each
                # Eq. (41) = GRPO's Eq. (15) on the selected groups; anchor tokens never enter a term
                loss, mb_terms = grpo_loss(logp, mb["old_logp"], mb["advantages"], generated_mask(mb), cfg, norm,
                                           token_norm, entropy, mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint -----------------------------------------------------
        search = search_metrics(results, ends, len(prompts), calls, cfg.fallback, rollouts)
        metrics = common.step_metrics(terms, rollouts, first_rewards, micro, grad_norms, run.scheduler.get_last_lr()[0],
                                      t0, t1, t2, demo_tokens=search.pop("demo_tokens"))  # core keys: first round
        metrics.update(search)
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
