"""UFT: GRPO on prompts that carry an annealed hint (a prefix of the demonstration), plus a small
log-likelihood term on the hint tokens.

Paper: UFT: Unifying Supervised and Reinforcement Fine-Tuning, arXiv 2505.16984.
Reference: METHODS.md section 6, Eq. (32)-(38), on GRPO's Eq. (1)-(12); checklist items 9-10.

Objective, per rollout batch of B prompts x G responses (METHODS.md Eq. 37-38):

    L(theta) = Agg_{i, t generated}[ -min(rho_{i,t} A_i, clip(rho_{i,t}, 1-eps, 1+eps) A_i) ]   Eq. (4), (6)
               + beta * KL_k3(pi_theta || pi_ref) over generated tokens                       Eq. (11)
               - beta_H * H(pi_theta) over generated tokens                                   Eq. (12), official only
               + beta * L_hint,   L_hint = -mean_{hint tokens j} log pi_theta(h_j | x, h_<j)  Eq. (36)

    pieces s_1..s_n of the demonstration, K = min(5, n) chunks ending at b_k = round(k n / K)  Eq. (32)
    p_t = p_low + (p_high - p_low) (1 + cos(pi t / T_hint)) / 2 for t = 1..T_hint, no hint after    Eq. (33)
    k ~ Binomial(K, p_t) once per prompt; hint h = s_1 .. s_{b_k}; its G rollouts continue x + h   Eq. (34)-(35)
    A_i = (r_i - mean_g r) / (std_g r + 1e-6) over the G rollouts that share one hint              Eq. (9)

One beta weighs both the KL and the hint term (Eq. 38): --kl_coef; --hint_coef gives the hint term a weight of
its own (the lab's sweep of it: is UFT's result the regime or this knob?). Hint tokens get only the hint
term; generated tokens get only the RL, KL and entropy terms. The hint is given to the sampler as
a prefix, so the reward grades hint + continuation (the official reward also sees the hint text).

What a piece is here [D]: a line of the demonstration, i.e. its tokens up to and including one
whose text ends with a newline (Qwen-family tokenizers keep newlines out of the next word). The
last line (on the built-in task `\\boxed{N}`, in a math trace the final answer) and the EOS are
never hinted, so the policy always writes the answer itself, as in UFT's data, whose hints stop
before the <answer> tag. The same holds for file data (--demo_key): an OpenR1 trace's pieces are
its lines; a one-line demonstration is never hinted (counted at start-up).

Schedule on the built-in task: T_hint = round(0.6 * --max_steps) unless --hint_steps is given, the
official 300 of 500; with the default 80 steps hints stop after step 48.

Reward: METHODS 0.4's binary verifier by default, as in every trainer here, so that runs of
different methods compare; `--reward_scale uft` gives UFT's 1 / 0.1 / 0 (correct / an answer is
present but wrong / no answer), `--answer_format answer_tag` UFT's answer extraction (the last
<answer>...</answer> on the last line), for data prompted that way. Neither is the default: the
built-in task and OpenR1 answer in \\boxed{} after </think>, and a 0.1 format reward shifts what
the reward and accuracy of a run mean against the other trainers.

Paper vs official code (liumy2010/UFT; METHODS.md: consistent), and what `--variant official` sets:
  - Eq. (37) vs (38): the official run keeps verl's entropy bonus beta_H = 0.001 (Eq. 38 has none): entropy_coef 0.001
  - reward (METHODS 6, Reward [C]): UFT's 1 / 0.1 / 0 scale: reward_scale uft (the answer format is the data's flag)
  - run config: lr 1e-6, B 256, b 64 (4 optimizer steps), G 4, 500 steps (T_hint 300), beta 0.001 (our default too)
Not reproduced, either variant:
  - Eq. (6), (36): the official unit of every mean is a micro-batch of 4 sequences (hint-free micro-batches add 0 to
    the hint term); here it is the whole optimizer step (METHODS 0.2), for the hint term too
  - Eq. (36): the official clamps the hint logits to [-100, 100] before the cross-entropy (no effect below |100|)
  - Eq. (35): the official hint is tokenized apart from the prompt and counts against the prompt budget; here the hint
    is the demonstration's own tokens and counts against --max_response_len (common's prefix continuation)

Launch:
    python uft.py                                       # laptop: tiny model, builtin task, CPU, minutes
    python uft.py --model Qwen/Qwen2.5-1.5B --data openr1.parquet --prompt_key prompt \\
        --answer_key reward_model.ground_truth --demo_key target --max_prompt_len 1024 --max_response_len 8192 \\
        --micro_batch_size 4 --gradient_checkpointing   # 1 GPU (vLLM sampler), UFT's model size
    torchrun --nproc_per_node 8 uft.py --variant official --model Elliott/Qwen2.5-Math-7B-16k-think \\
        --lr_schedule constant \\
        --data openr1.parquet --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target \\
        --eval_data valid.parquet --max_prompt_len 1024 --max_response_len 8192 --micro_batch_size 4 \\
        --gradient_checkpointing                         # 8 GPUs: UFT's hyper-parameters (B 256, G 4, 500 steps)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 uft.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
Run `bash scripts/gpu/smoke.sh` first on a new GPU machine (docs/gpu.md).
"""
import math
import re
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
    group_size: int = 8  # G: responses per prompt, all continuing the prompt's one hint
    clip_eps_low: float = 0.2  # epsilon_low of Eq. (4)
    clip_eps_high: float = 0.2  # epsilon_high of Eq. (4)
    clip: bool = True  # the PPO clip of Eq. (4); --no-clip: -rho A (the official runs of LUFFY, SRFT, ReLIFT, HPT)
    adv_std: bool = True  # divide by the group std: Eq. (9); --no-adv_std gives Dr.GRPO's Eq. (10)
    kl_coef: float = 0.001  # beta of Eq. (37)-(38): weighs the k3 KL (Eq. 11) and the hint term (Eq. 36)
    entropy_coef: float = 0.0  # beta_H of the entropy bonus, Eq. (12) (official: 0.001)
    loss_agg: Literal["token-mean", "seq-mean", "constant"] = "token-mean"  # Eq. (6) | Eq. (7) | Eq. (8)
    loss_constant: float = 0.0  # C of Eq. (8); 0 = world_size * max_response_len (official: 8 * 8192)
    hint_chunks: int = 5  # most chunks a demonstration is cut into, Eq. (32)
    hint_prob_high: float = 0.95  # p_high of Eq. (33): hint probability at step 1
    hint_prob_low: float = 0.05  # p_low of Eq. (33): hint probability at step T_hint
    hint_coef: float = 0.0  # weight of the hint term, Eq. (36); 0 = tied to beta (--kl_coef), Eq. (38)
    hint_steps: int = 0  # T_hint of Eq. (33), no hint after it; 0 = round(0.6 * max_steps) (official 300 of 500)
    reward_scale: Literal["binary", "uft"] = "binary"  # binary (METHODS 0.4) | uft: 1 correct, 0.1 wrong answer, 0 none
    answer_format: Literal["boxed", "answer_tag"] = "boxed"  # boxed: after </think> | answer_tag: UFT's <answer> tag


# The official run's settings (liumy2010/UFT run.py, scripts/train.sh, verl's ppo_trainer.yaml).
OFFICIAL = {"lr": 1e-6, "prompts_per_step": 256, "prompts_per_minibatch": 64, "group_size": 4, "max_steps": 500,
            "kl_coef": 0.001, "entropy_coef": 0.001, "reward_scale": "uft"}
# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"variant": "official", "max_prompt_len": 1024, "max_response_len": 8192, "micro_batch_size": 4,
           "lr_schedule": "constant",
           "gradient_checkpointing": True}


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


def hint_probability(t: int, hint_steps: int, p_low: float, p_high: float) -> float:
    """Eq. (33): p_t for training step t = 1, 2, ...; 0 (no hint at all) after step T_hint."""
    if t < 1:
        raise ValueError(f"the step counter of Eq. (33) starts at 1, got {t}")
    if t > hint_steps:
        return 0.0
    return p_low + 0.5 * (p_high - p_low) * (1 + math.cos(math.pi * t / hint_steps))


def chunk_boundaries(n: int, max_chunks: int = 5) -> list[int]:
    """Eq. (32): n pieces -> [b_0 = 0, b_1, ..., b_K = n], K = min(max_chunks, n) chunks, b_k = round(k n / K)
    (Python's round, half to even, as the official code). No pieces: [0], one way to hint, nothing."""
    K = min(max_chunks, n)
    return [round(k * n / K) for k in range(K + 1)] if K else [0]


def draw_hint(piece_ends: list[int], p: float, max_chunks: int = 5) -> tuple[int, float]:
    """Eq. (34): k ~ Binomial(K, p) as K Bernoulli(p) draws from torch's global generator (checkpointed
    per rank, so a resumed run draws the same hints); hint = the first b_k pieces.
    piece_ends[i] = token position just after piece i+1. Returns (hint length in tokens, b_k / n)."""
    bounds = chunk_boundaries(len(piece_ends), max_chunks)
    k = int((torch.rand(len(bounds) - 1) < p).sum())
    pieces = bounds[k]
    return (piece_ends[pieces - 1] if pieces else 0), (pieces / len(piece_ends) if piece_ends else 0.0)


def add_piece_ends(rows: list[dict], tokenizer, max_response_len: int):
    """row["piece_ends"]: where each piece (line) of the demonstration ends, in tokens: after every token whose
    text ends with a newline, except a newline that ends the demonstration, so its last line is never hinted.
    Refuses demonstrations cut at the response budget (their last line would be a fragment)."""
    common.require_whole_demonstrations(rows, max_response_len, "the last line of a cut one would be a fragment")
    newline = {i for i in {i for r in rows for i in r["demo_ids"]} if tokenizer.decode([i]).endswith("\n")}
    for r in rows:
        demo = r["demo_ids"][:-1]  # without the EOS
        r["piece_ends"] = [j + 1 for j, token in enumerate(demo[:-1]) if token in newline]
    single = sum(not r["piece_ends"] for r in rows)
    if single == len(rows):
        common.fail("no demonstration has more than one line: UFT's hints are whole lines (--demo_key)")
    if single:
        common.print0(f"{single} of {len(rows)} demonstrations are a single line: their prompts never get a hint")


class AnswerTagVerifier(common.Verifier):
    """UFT's answer format: the last <answer>...</answer> on the text's last line, graded as the default."""

    def candidates(self, response: str) -> tuple[str, list[str]] | None:
        found = re.findall(r"<answer>(.*?)</answer>", response.split("\n")[-1])
        answer = found[-1].strip() if found else ""
        return ("boxed", [common.normalize_answer(answer)]) if answer and len(answer) <= common.MAX_ANSWER_CHARS \
            else None


def rewards_for(verifier, texts: list[str], golds: list[str], scale: str) -> list[float]:
    """METHODS 0.4's binary reward, or UFT's scale: 1 correct, 0.1 an answer present (a box, or UFT's
    answer tag) but wrong, 0 none."""
    correct = verifier(texts, golds)
    if scale == "binary":
        return correct
    present = [(found := verifier.candidates(text)) is not None and found[0] == "boxed" for text in texts]
    return [1.0 if c == 1.0 else 0.1 if p else 0.0 for c, p in zip(correct, present)]


def token_masks(mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's masks [B, R]: generated tokens (RL, KL, entropy) and hint tokens (Eq. 36 only)."""
    return mb["response_mask"] * (1 - mb["prefix_mask"]), mb["prefix_mask"]


def uft_loss(logp, old_logp, advantages, mask, hint_mask, cfg: Config, norm: float, token_norm: float,
             hint_norm: float, entropy=None, ref_logp=None):
    """One micro-batch's share of Eq. (37).

    logp, old_logp, ref_logp, entropy: [B, R]; mask: generated tokens [B, R]; hint_mask: hint tokens [B, R];
    advantages: [B]. `norm` is the optimizer step's denominator for cfg.loss_agg over generated tokens,
    `token_norm` their count (KL and entropy are token-means, Eq. 11-12), `hint_norm` the step's hint-token
    count (Eq. 36; 1 when the step has none, so the term is 0). Returns (loss, dict of detached terms)."""
    ratio = torch.exp(logp - old_logp)  # Eq. (3): rho = 1 on the first mini-batch, grad = grad logp
    adv = advantages[:, None]  # [B, 1], broadcast to every token of response i
    unclipped = -ratio * adv  # [B, R]
    clipped = -torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv if cfg.clip else unclipped
    per_token = torch.maximum(unclipped, clipped)  # Eq. (4): -min(rho A, clip(rho) A); --no-clip: -rho A
    pg_loss = common.aggregate(per_token, mask, cfg.loss_agg, norm)  # Eq. (6)/(7)/(8), generated tokens only
    loss = pg_loss
    terms = {"pg_loss": pg_loss.detach(),
             "clip_frac": common.aggregate((clipped > unclipped).float(), mask, "token-mean", token_norm)}
    if ref_logp is not None:  # Eq. (11): k3 estimator of KL(pi_theta || pi_ref), clamped
        log_r = ref_logp - logp
        kl = common.aggregate((torch.exp(log_r) - log_r - 1).clamp(-10, 10), mask, "token-mean", token_norm)
        loss = loss + cfg.kl_coef * kl
        terms["kl"] = kl.detach()
    if cfg.entropy_coef > 0:  # Eq. (12): entropy bonus over the generated tokens
        entropy_bonus = common.aggregate(entropy, mask, "token-mean", token_norm)
        loss = loss - cfg.entropy_coef * entropy_bonus
        terms["entropy_bonus"] = entropy_bonus.detach()
    # Eq. (36), UFT (arXiv 2505.16984): negative log-likelihood of the hint tokens, token-mean over the step
    hint_loss = common.aggregate(-logp, hint_mask, "token-mean", hint_norm)
    loss = loss + (cfg.hint_coef or cfg.kl_coef) * hint_loss  # Eq. (37)-(38): beta, unless --hint_coef unties it
    terms["hint_loss"] = hint_loss.detach()
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
    if not 0 <= cfg.hint_prob_low <= cfg.hint_prob_high <= 1:
        common.fail("need 0 <= --hint_prob_low <= --hint_prob_high <= 1 (Eq. 33; official 0.05 and 0.95)")
    if cfg.hint_chunks < 1:
        common.fail("--hint_chunks must be at least 1 (Eq. 32; official 5)")
    if cfg.hint_steps < 0:
        common.fail("--hint_steps must be >= 0 (0 = 0.6 * --max_steps)")
    if cfg.kl_coef < 0:
        common.fail("--kl_coef (beta of the KL and hint terms) must be >= 0")
    run = common.setup(cfg, GPU_RUN, optimizer_steps_per_step=B // b, reference_model=cfg.kl_coef > 0, global_batch=b,
                       need_demo=True, verifier=AnswerTagVerifier if cfg.answer_format == "answer_tag" else None)
    add_piece_ends(run.train_rows, run.tokenizer, cfg.max_response_len)
    hint_steps = cfg.hint_steps or max(1, round(0.6 * cfg.max_steps))  # T_hint of Eq. (33)
    model = run.model
    constant = cfg.loss_constant or run.dist.world_size * cfg.max_response_len  # Eq. (8)'s C
    run.evaluate_base()
    for step in run.progress():
        # ---- 1. Hints (Eq. 32-35), then G responses per hinted prompt from pi_old (METHODS 0.3 step 1)
        t0 = time.time()
        prompts = run.next_prompts(B)  # this rank's B / world_size prompts
        p_t = hint_probability(step + 1, hint_steps, cfg.hint_prob_low, cfg.hint_prob_high)  # Eq. (33), t from 1
        hints = [draw_hint(p["piece_ends"], p_t, cfg.hint_chunks) for p in prompts]  # (tokens, fraction) per prompt
        run.sampler.sync_weights(model)
        groups = run.sampler.generate([p["prompt_ids"] for p in prompts], n=G, temperature=cfg.temperature,
                                      top_p=cfg.top_p, max_tokens=cfg.max_response_len,
                                      prefixes=[p["demo_ids"][:h] for p, (h, _) in zip(prompts, hints)])
        run.sampler.release()  # the rollout's last generate: a sleeping vLLM engine frees the GPU
        samples = [s for g in groups for s in g]  # prompt-major: sample j of prompt i at i*G + j
        rewards = torch.tensor(rewards_for(run.verifier, [s.text for s in samples],  # hint + continuation
                                           [p["answer"] for p in prompts for _ in range(G)], cfg.reward_scale))
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
            masks = [token_masks(mb) for mb in minibatch]  # (generated, hint) [b_micro, R] each
            norm = common.step_normaliser([m for m, _ in masks], cfg.loss_agg, constant)  # this step's Agg denominator
            token_norm = common.step_normaliser([m for m, _ in masks], "token-mean")
            hint_norm = common.step_normaliser([h for _, h in masks], "token-mean")  # Eq. (36): the step's hint tokens
            for mb, (mask, hint_mask) in zip(minibatch, masks):
                logp, entropy = model(**common.model_inputs(mb), temperature=cfg.temperature,
                                      with_entropy=cfg.entropy_coef > 0)  # [b_micro, R] each
                loss, mb_terms = uft_loss(logp, mb["old_logp"], mb["advantages"], mask, hint_mask, cfg, norm,
                                          token_norm, hint_norm, entropy, mb.get("ref_logp"))
                loss.backward()
                terms.append(mb_terms)
            grad_norms.append(common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm))
        t2 = time.time()

        # ---- 4. Log, evaluate, checkpoint -----------------------------------------------------
        fraction, hinted, length, n = common.all_reduce([sum(f for _, f in hints), sum(h > 0 for h, _ in hints),
                                                         sum(h for h, _ in hints), len(hints)])
        metrics = common.step_metrics(terms, samples, rewards, micro, grad_norms, run.scheduler.get_last_lr()[0],
                                      t0, t1, t2, demo_tokens=length)  # hint tokens, once per prompt, all ranks
        metrics.update(hint_prob=p_t, hint_fraction=fraction / n, hint_share=hinted / n, hint_length=length / n)
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
