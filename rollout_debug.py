"""--rollout_debug: the sampler wrapper behind rollout_debug.jsonl (scripts/gpu/smoke.sh, tests/test_vllm.py).
common.setup imports it only when the flag is set, and hands it what it needs of common (make_batch): this
file imports nothing of the trainers' code."""
import json

import numpy as np
import torch
import torch.distributed as dist

GiB = 2 ** 30


class RolloutDebug:
    """--rollout_debug: wraps a sampler and writes <output_dir>/rollout_debug.jsonl, one line per
    generate() call with one entry per rank, for the GPU smoke test (scripts/gpu/smoke.sh):

      weights      sum of the trainer's weights (changes exactly when an update changed them)
      logprob_gap  mean / max |log-prob sampler - log-prob trainer| over the sampled tokens of up to
                   16 samples, for samplers that return log-probs (vLLM); stale or garbled engine
                   weights show up here
      probe        a seeded draw (n=4, 16 tokens) of a fixed prompt, the first training prompt cut in half
                   (mid-problem, where even a trained model is unsure what comes next, so that draws tell
                   weights and seeds apart) after the push, with its log-probs where
                   the sampler returns them: equal while the weights stay equal, different after an update
                   reached the sampler
      first        at the first call only, an unseeded draw of the same prompt from each rank's own
                   generators: equal across ranks would mean equal sampling seeds
      again        the same unseeded draw from the same generator state: equal to `first`, or the engine's
                   unseeded draws do not follow the generators the trainer seeds and checkpoints (on CPU
                   torch's, on GPUs numpy's, which seeds each request of vLLM's V2 runner)
      memory       GPU memory (GiB) after each phase: training peak, before the weight push, engine
                   awake, after generation

    Every rank calls generate() equally often, so the gathers and the trainer forward line up. The
    probes leave torch's and numpy's generators (which the samplers draw from) untouched: a debug run draws
    the rollouts that a run without it draws."""

    PROBE_SEED = 1234

    def __init__(self, sampler, d, path: str, probe_prompt: list[int], pad_id: int, make_batch):
        """d: the run's common.Dist; make_batch: common.make_batch, for the gap's trainer forward."""
        self.sampler, self.d, self.path, self.probe_prompt, self.pad_id = sampler, d, path, probe_prompt, pad_id
        self.make_batch = make_batch
        self.calls, self.model, self.record = 0, None, {}
        if d.main:
            open(path, "w").close()  # this process's calls only (a resumed run starts a new file)

    def sync_weights(self, model):
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):  # a no-grad forward (the gap's, below) leaves the root gathered:
            model.reshard()  # count shards only
        self.model, self.record = model, {"memory": {}}
        self._memory("train_peak")
        self._memory("before_push")
        local = sum(float((p.to_local() if hasattr(p, "to_local") else p).detach().double().sum())
                    for p in model.parameters())
        self.record["weights"] = self._sum_over_ranks(local)
        self.sampler.sync_weights(model)
        self._memory("engine_awake")
        # the seeded probe first: it puts the prompt in vLLM's prefix cache, so that `first` and `again` both
        # run on the cached prefix, the same computation
        for key, seed in [("probe", self.PROBE_SEED)] + ([("first", None), ("again", None)] if self.calls == 0 else []):
            self.record[key] = [[s.generated_ids, s.logprobs or []] for s in self._draw(seed)]

    def release(self):
        self.sampler.release()

    def generate(self, prompts, n, temperature, top_p, max_tokens, prefixes=None, **kw):
        groups = self.sampler.generate(prompts, n, temperature, top_p, max_tokens, prefixes, **kw)
        self._memory("after_generate")
        if getattr(self.sampler, "logprobs", False) and top_p == 1.0:
            self.record["logprob_gap"] = self._logprob_gap([s for g in groups for s in g][:16], temperature)
        records = [None] * self.d.world_size
        if dist.is_initialized():
            dist.all_gather_object(records, self.record)
        else:
            records = [self.record]
        if self.d.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"call": self.calls, "ranks": records}) + "\n")
        self.calls += 1
        return groups

    def _draw(self, seed):
        """n=4 samples of the probe prompt; they leave torch's and numpy's generators where they were."""
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else []):
            samples = self.sampler.generate([self.probe_prompt], 4, 1.0, 1.0, 16, seed=seed)[0]
        np.random.set_state(numpy_state)
        return samples

    @torch.no_grad()
    def _logprob_gap(self, samples: list, temperature: float) -> dict | None:
        """One trainer forward on every rank (a collective under FSDP), on a dummy row if none here."""
        batch = self.make_batch([s.prompt_ids + s.prefix_ids for s in samples] or [[self.pad_id]],
                                [s.generated_ids for s in samples] or [[self.pad_id]], self.pad_id, self.d.device)
        logp, _ = self.model(**batch, temperature=temperature)  # [B, R]
        gaps = [abs(float(logp[i, t]) - lp) for i, s in enumerate(samples) for t, lp in enumerate(s.logprobs)]
        return {"mean": sum(gaps) / len(gaps), "max": max(gaps), "tokens": len(gaps)} if gaps else None

    def _memory(self, phase: str):
        if not torch.cuda.is_available():
            return
        free, total = torch.cuda.mem_get_info()
        if phase == "train_peak":
            self.record["memory"][phase] = torch.cuda.max_memory_allocated() / GiB
            torch.cuda.reset_peak_memory_stats()
        else:
            self.record["memory"][phase] = {"allocated": torch.cuda.memory_allocated() / GiB,
                                            "reserved": torch.cuda.memory_reserved() / GiB,
                                            "used": (total - free) / GiB}

    @staticmethod
    def _sum_over_ranks(value: float) -> float:
        """value summed over ranks in float64, as common.all_reduce sums (itself in a single process)."""
        if not dist.is_initialized():
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.item()
