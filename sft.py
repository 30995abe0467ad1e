"""SFT: supervised fine-tuning on demonstrations, the off-policy baseline of every fusion paper.

Reference: METHODS.md section 1, Eq. (13) (baselines of LUFFY arXiv 2504.14945, UFT arXiv
2505.16984, SRFT arXiv 2506.19767).

Objective (METHODS.md Eq. 13), over the whole optimizer batch U:

    L_SFT(theta) = - sum_{(x,y*) in U} sum_t m_t log pi_theta(y*_t | x, y*_<t) / sum_{U} sum_t m_t

Prompt tokens are masked, the appended EOS is trained, and the denominator is the *global* token
count of the optimizer step (all micro-batches, all ranks): gradient accumulation gives exactly
the gradient of one large batch. The common "mean of micro-batch means" (Eq. 14) re-weights short
vs long examples; `--loss_agg seq-mean` gives the per-sequence variant for comparison.

`--token_loss dft` is DFT ("dynamic fine-tuning", arXiv 2508.05629; METHODS.md section 14, Eq. 59-60): every
token's NLL weighted by its own detached probability, -sg(p) log p, whose gradient -grad p leaves the tokens the
model finds unlikely almost untouched. It is the one-line change to this file that tests where the base's prior
decides which SFT loss wins (arXiv 2510.00526; docs/lab.md, "Regimes").

Launch (GPU commands: a 16k-position model, since prompt + response budgets must fit its positions):
    python sft.py                                       # laptop: tiny model, builtin task, CPU, minutes
    python sft.py --model RoadQAQ/Qwen2.5-Math-1.5B-16k-think --data openr1.parquet --prompt_key prompt \\
        --answer_key reward_model.ground_truth --demo_key target --max_prompt_len 1024 \\
        --max_response_len 8192 --micro_batch_size 2 --gradient_checkpointing   # 1 GPU
    torchrun --nproc_per_node 8 sft.py --model Elliott/Qwen2.5-Math-7B-16k-think --data openr1.parquet \\
        --prompt_key prompt --answer_key reward_model.ground_truth --demo_key target \\
        --eval_data valid.parquet --lr 5e-5 --batch_size 64 --lr_schedule cosine --warmup_steps 200 \\
        --max_prompt_len 1024 --max_response_len 8192 --micro_batch_size 2 --gradient_checkpointing \\
        --max_steps 2200   # 8 GPUs: LUFFY's SFT baseline (3 epochs of 46k at batch 64, warm-up 10%)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 \\
        --nproc_per_node 8 sft.py ...same flags...   # 2 nodes (output_dir on a shared filesystem)
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
    lr: float = 5e-4  # peak learning rate (LUFFY's SFT baseline: 5e-5)
    batch_size: int = 32  # demonstrations per optimizer step (global, all ranks)
    max_steps: int = 150  # optimizer steps (one batch of demonstrations each)
    eval_every: int = 50  # evaluate every N steps (and before and after training); 0 = only then
    save_every: int = 50  # checkpoint every N steps (and at the end, and on Ctrl-C / SIGTERM); 0 = only then
    loss_agg: Literal["token-mean", "seq-mean"] = "token-mean"  # token-mean = Eq. (13); seq-mean = Eq. (7) form
    token_loss: Literal["nll", "dft"] = "nll"  # nll: -log p, Eq. (13); dft: -sg(p) log p, Eq. (59) (DFT)


# The 8-GPU command of the docstring, as data: the paper's settings (tests/test_cli.py checks that the two agree).
GPU_RUN = {"lr": 5e-5, "batch_size": 64, "lr_schedule": "cosine", "warmup_steps": 200, "max_prompt_len": 1024,
           "max_response_len": 8192, "micro_batch_size": 2, "gradient_checkpointing": True, "max_steps": 2200}


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, agg: str, norm: float, token_loss: str = "nll") -> torch.Tensor:
    """Eq. (13): negative log-likelihood of the demonstration tokens; logp, mask [B, R]. token_loss "dft": Eq. (59),
    each token's NLL times its detached probability (DFT, arXiv 2508.05629), gradient -grad p, Eq. (60)."""
    per_token = -logp if token_loss == "nll" else -logp.detach().exp() * logp  # [B, R]
    return common.aggregate(per_token, mask, agg, norm)


def main():
    cfg = common.parse_config(Config)
    run = common.setup(cfg, GPU_RUN, need_answer=False, need_demo=True, global_batch=cfg.batch_size)
    model, tok = run.model, run.tokenizer
    run.evaluate_base()
    for step in run.progress():
        t0 = time.time()
        rows = run.next_prompts(cfg.batch_size)  # this rank's share of the batch
        micro = common.demo_batches(rows, cfg, tok.pad_token_id, run.dist.device)
        norm = common.step_normaliser([mb["response_mask"] for mb in micro], cfg.loss_agg)  # global count
        loss_sum, entropy_sum = 0.0, 0.0
        for mb in micro:
            logp, entropy = model(**mb, temperature=cfg.temperature, with_entropy=True)
            loss = sft_loss(logp, mb["response_mask"], cfg.loss_agg, norm, cfg.token_loss)
            loss.backward()
            loss_sum += float(loss.detach())
            entropy_sum += float((entropy.detach() * mb["response_mask"]).sum())
        grad_norm = common.optimizer_step(model, run.optimizer, run.scheduler, cfg.max_grad_norm)
        t1 = time.time()

        n_tok = sum(float(mb["response_mask"].sum()) for mb in micro)
        loss_sum, entropy_sum, n_tok, n_seq, n_cut, all_tok, positions = common.all_reduce(
            [loss_sum, entropy_sum, n_tok, len(rows), sum(not r["demo_finished"] for r in rows),
             sum(float(mb["attention_mask"].sum()) for mb in micro), sum(mb["input_ids"].numel() for mb in micro)])
        # reward / accuracy: SFT samples nothing during training, so they are None (see eval_accuracy)
        metrics = dict(loss=loss_sum / run.dist.world_size, sft_loss=loss_sum / run.dist.world_size, reward=None,
                       accuracy=None, entropy=entropy_sum / n_tok, response_length=n_tok / n_seq,
                       truncated_frac=n_cut / n_seq,  # demonstrations cut at the response budget
                       demo_tokens=n_tok,  # demonstration tokens trained on (all ranks)
                       grad_norm=grad_norm, lr=run.scheduler.get_last_lr()[0], time_rollout=0.0,
                       time_train=t1 - t0, tokens_per_second=all_tok / (t1 - t0), padding_frac=1 - all_tok / positions,
                       skipped_updates=int(not math.isfinite(grad_norm)))  # optimizer_step skipped the update
        run.end_step(step + 1, metrics)
    common.shutdown()


if __name__ == "__main__":
    main()
