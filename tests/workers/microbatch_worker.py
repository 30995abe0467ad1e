"""Every trainer's real loop, one iteration, on a fake run: the same samples and rewards each time, a float64
model (FSDP2 under torchrun), once per micro-batch grouping. Run under torchrun with 2 ranks:

    microbatch_worker.py OUT compare    every trainer x {sequences, tokens, one sequence per micro-batch}
    microbatch_worker.py OUT unagreed   grpo.py with tokens, the cross-rank count agreement switched off

The fake run replaces common.setup: its sampler draws tokens from a hash of (prompt, prefix, j), so every
grouping sees identical rollouts, rank 0 short ones (1-3 tokens, prompts with short demonstrations) and rank 1
long ones (near the budget, the longest demonstrations), and its verifier grades the text the sampler wrote.
Each trainer's main() runs unchanged; the worker records every optimizer step's full gradient
(common.optimizer_step wrapped) and writes its largest difference from the fixed-size grouping's, the step's
metrics and the micro-batch counts before and after the ranks agreed (common.agreed_counts wrapped). Rank 0
writes OUT.
"""
import datetime
import importlib.util
import json
import os
import random
import sys
import zlib

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import builtin_task  # noqa: E402
import common  # noqa: E402

RL = ["--prompts_per_step", "4", "--prompts_per_minibatch", "2", "--group_size", "4", "--lr", "1e-3"]
TRAINERS = {  # script: its flags (beyond the budgets and the grouping)
    "grpo.py": RL + ["--entropy_coef", "0.01", "--kl_coef", "0.01", "--loss_agg", "seq-mean"],
    "luffy.py": RL, "srft.py": RL, "relift.py": RL + ["--ft_threshold", "2"], "uft.py": RL,
    "bread.py": RL, "prefix_rft.py": RL, "sft.py": ["--batch_size", "10", "--lr", "1e-3"],
    "forks/nsr.py": RL, "forks/forking_tokens.py": RL, "forks/chord.py": RL, "forks/hpt.py": RL}
GROUPINGS = {"sequences": ["--micro_batching", "sequences", "--micro_batch_size", "3"],
             "tokens": ["--micro_batching", "tokens", "--micro_batch_tokens", "200"],
             "one": ["--micro_batching", "tokens", "--micro_batch_tokens", "1"]}  # one sequence per micro-batch
BUDGETS = ["--max_prompt_len", "64", "--max_response_len", "48", "--no-compile", "--max_steps", "1"]


class Sampler:
    """Rollouts from a hash of (prompt, prefix, j): rank 0 writes 1-3 tokens, rank 1 close to the budget. The
    text is "right" or "wrong": wrong for every plain rollout of about half the prompts (all-fail groups for
    ReLIFT's buffer and BREAD's search), half and half otherwise."""

    def __init__(self, rank, vocab):
        self.rank, self.vocab = rank, vocab

    def sync_weights(self, model):
        pass

    def release(self):
        pass

    def generate(self, prompts, n, temperature=1.0, top_p=1.0, max_tokens=24, prefixes=None):
        groups = []
        for i, p in enumerate(prompts):
            prefix = list(prefixes[i]) if prefixes else []
            group = []
            for j in range(n):
                rng = random.Random(zlib.crc32(repr((p, prefix, j)).encode()))
                room = max_tokens - len(prefix)
                length = min(room, rng.randint(1, 3)) if self.rank == 0 else rng.randint(max(1, room - 4), room)
                right = rng.random() < (0.0 if zlib.crc32(repr(p).encode()) % 2 == 0 and not prefix else 0.5)
                ids = [rng.randrange(3, self.vocab) for _ in range(length)]
                group.append(common.Sample(p, prefix, ids, "right" if right else "wrong", finished=length < room))
            groups.append(group)
        return groups


def verifier(texts, answers):
    return [1.0 if t == "right" else 0.0 for t in texts]


class FakeRun:
    def __init__(self, cfg, d, tok, rows, model, ref_model, optimizers, record):
        self.cfg, self.dist, self.tokenizer, self.train_rows, self.record = cfg, d, tok, rows, record
        self.model, self.ref_model, self.sampler, self.verifier = model, ref_model, Sampler(d.rank, len(tok)), verifier
        self.optimizer, self.scheduler = common.make_optimizer(model, cfg, 4)
        self.extra_optimizers = {name: common.adamw(model, lr, cfg.weight_decay) for name, lr in optimizers.items()}
        self.state, self.eval_sets, self.start_step = {}, [], 0

    def evaluate_base(self):
        pass

    def progress(self):
        return range(1)

    def next_prompts(self, global_batch):  # rank 0 the rows with the shortest demonstrations, rank 1 the longest
        per = global_batch // self.dist.world_size
        return self.train_rows[:per] if self.dist.rank == 0 else self.train_rows[-per:]

    def end_step(self, step, metrics, state=None):
        self.record["metrics"] = metrics


def main(out_file, mode):
    timeout = datetime.timedelta(seconds=20 if mode == "unagreed" else 120)
    dist.init_process_group("gloo", timeout=timeout)
    d = common.Dist(dist.get_rank(), dist.get_world_size(), 0, torch.device("cpu"))
    tok = builtin_task.build_tiny_tokenizer()
    raw = builtin_task.rows("train")
    rows, _ = common.encode_rows(raw[:400], tok, None, 64, 48, "train")
    rows = sorted([r for r in rows if r["demo_finished"]], key=lambda r: len(r["demo_ids"]))  # whole ones only
    rows = rows[:6] + rows[-6:]  # short demonstrations for rank 0, long ones for rank 1
    record = {}
    real_step, real_agree, real_shutdown = common.optimizer_step, common.agreed_counts, common.shutdown

    def optimizer_step(model, optimizer, scheduler, max_grad_norm):
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()
                 if p.grad is not None]
        record["grads"].append(torch.cat([g.reshape(-1) for g in grads]))
        return real_step(model, optimizer, scheduler, max_grad_norm)

    def agreed_counts(counts):
        agreed = real_agree(counts) if mode == "compare" else list(counts)
        record["counts"].append({"local": common.all_gather_1d(torch.tensor(counts)), "agreed": agreed})
        return agreed

    def setup(cfg, gpu_run=None, *, reference_model=False, extra_optimizers=None, **kwargs):
        common.seed_everything(cfg.seed + d.rank)
        torch.manual_seed(0)  # the same weights for every grouping
        from transformers import AutoModelForCausalLM
        config = builtin_task.tiny_model_config(tok)
        model = common.wrap_policy(AutoModelForCausalLM.from_config(config).double(), d, compile=False)
        ref = common.wrap_policy(AutoModelForCausalLM.from_config(config).double(), d, compile=False, train=False) \
            if reference_model else None
        for r in rows:
            r.pop("index", None)
        return FakeRun(cfg, d, tok, [dict(r) for r in rows], model, ref, extra_optimizers or {}, record)

    common.optimizer_step, common.agreed_counts, common.setup = optimizer_step, agreed_counts, setup
    common.shutdown = lambda: None
    results = {}
    trainers = TRAINERS if mode == "compare" else {"grpo.py": TRAINERS["grpo.py"]}
    groupings = GROUPINGS if mode == "compare" else {"tokens": GROUPINGS["tokens"]}
    for script, flags in trainers.items():
        name = os.path.basename(script)[:-3]
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # parse_config reads its source
        spec.loader.exec_module(module)
        grads = {}
        for grouping_name, grouping in groupings.items():
            record.update(grads=[], counts=[], metrics=None)
            sys.argv = [script, *BUDGETS, *flags, *grouping]
            module.main()
            grads[grouping_name] = record["grads"]
            results[f"{script} {grouping_name}"] = {
                "grad_norms": [float(g.norm()) for g in record["grads"]], "metrics": record["metrics"],
                # each optimizer step's largest gradient difference from the fixed-size grouping's
                "grad_diffs": [float((g - f).abs().max()) for g, f in zip(record["grads"], grads["sequences"])]
                if len(record["grads"]) == len(grads.get("sequences", [])) else None,
                "counts": [{"local": [t.tolist() for t in c["local"]], "agreed": c["agreed"]}
                           for c in record["counts"]]}
    if d.main:
        with open(out_file, "w") as f:
            json.dump(results, f)
    real_shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
