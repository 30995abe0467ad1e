"""A run's output directory and what it holds (docs/runs.md): it claims its output_dir, keeps metrics.jsonl in
step with its checkpoints, writes and reads the checkpoints (model, optimizers, RNG, trainer state), and turns
Ctrl-C / SIGTERM into a checkpoint at the end of the step.

One process writes a run at a time (a lock on <output_dir>/.lock). Without --resume or --overwrite, a
directory that holds a run is refused. --overwrite removes the old run (its checkpoints, metrics, config and
logs; nothing else). --resume continues only a run of the same trainer with the same settings but those in
RESUME_MAY_CHANGE, never rewrites its config.json, and a run already at --max_steps says so and exits.
A resumed run's metrics.jsonl is cut back to its checkpoint's step. A checkpoint's pickles are read as data
only (safe_dcp_load): a tampered checkpoint runs nothing. File-system bookkeeping a reader of a trainer never
needs: trainers never call this file, common.py's Run does (setup, Run.save); it imports nothing of common.
"""
import contextlib
import dataclasses
import fcntl
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading

import numpy as np
import torch
import torch.distributed as dist


# What a trainer writes in its output_dir: a fresh start there (--overwrite, or --resume without a
# checkpoint) removes these and nothing else.
_RUN_FILE = re.compile(r"checkpoint-\d+(\.tmp)?|metrics\.jsonl|eval_problems\.jsonl|probe\.jsonl|config\.json|"
                       r"rollout_debug\.jsonl|vllm-rank\d+\.log")
# The settings a resumed run may change: how far it runs, how often it saves and evaluates, how it is
# watched. Any other change would make it another run than the one its checkpoint continues.
RESUME_MAY_CHANGE = {"max_steps", "probe_every", "save_every", "keep_checkpoints", "eval_every", "eval_data", "eval_samples",
                     "eval_temperature", "resume", "overwrite", "wandb", "wandb_project", "verifier_workers",
                     "max_bad_steps", "vllm_verbose", "rollout_debug", "cache_dir", "output_dir", "eval_pass_k"}
_run_lock = None  # rank 0's lock on its output_dir, held until the process exits


class Interrupts:
    """Ctrl-C and SIGTERM: before the loop, exit at once; in it, every rank saves at the end of the step
    (`Run.end_step`) and exits; a second signal of the same kind exits at once. (torchrun passes a signal
    on once, then kills its workers after --shutdown_timeout.)"""
    signum, training, main = 0, False, True

    def install(self, main_rank: bool):
        self.signum, self.training, self.main = 0, False, main_rank
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, self.handle)

    def _say(self, text: str):
        if self.main:  # os.write: print() is not safe inside a signal handler
            os.write(2, ("\n" + text + "\n").encode())

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.training or signum == self.signum:
            self._say(f"{name}: exiting now" + ("" if self.training else " (before the first step: nothing to save)")
                      + ("; the newest checkpoint is kept" if self.training else ""))
            raise SystemExit(128 + signum)
        if not self.signum:
            self.signum = signum
            self._say(f"{name}: saving a checkpoint at the end of this step, then exiting "
                      f"({'Ctrl-C' if signum == signal.SIGINT else name} again exits at once)")


interrupts = Interrupts()  # common.setup installs it; Run.end_step reads signum


WRITE_TEST_BYTES = 1 << 20  # written, synced and removed before training: a full disk fails here, not at a checkpoint


def check_writable(out: str) -> str | None:
    """Why output_dir cannot hold a run (not creatable, not writable, no space), or None. Leaves nothing
    behind: the test file is removed, and so is the directory if this made it."""
    made, probe = os.path.abspath(out), os.path.join(out, f".write-test-{os.getpid()}")
    while not os.path.exists(os.path.dirname(made)):  # the first directory makedirs will create
        made = os.path.dirname(made)
    made = None if os.path.exists(made) else made
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(WRITE_TEST_BYTES))
            f.flush()
            os.fsync(f.fileno())  # where a full disk with delayed allocation says so
        os.remove(probe)
        return None
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(probe)
        if made:
            shutil.rmtree(made, ignore_errors=True)
        return (f"--output_dir {out} cannot hold a run: {e.strerror or e} ({e.filename or out}); free space "
                "there, fix its permissions, or choose another --output_dir")


def claim(cfg, world_size: int = 1) -> tuple:
    """Rank 0's decision on cfg.output_dir: (error, notes, checkpoint to resume or None, run complete)."""
    global _run_lock
    out, script = cfg.output_dir, os.path.basename(sys.modules[type(cfg).__module__].__file__ or "trainer")
    if error := check_writable(out):
        return error, [], None, False
    lock = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return (f"another process is writing a run in {out} (it holds {os.path.join(out, '.lock')}): wait for it "
                f"to end, or use another --output_dir", [], None, False)
    _run_lock = lock
    ckpt, config_path = latest_checkpoint(out), os.path.join(out, "config.json")
    saved = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
    if cfg.resume and ckpt:
        if saved and saved.get("trainer", script) != script:
            return (f"{out} holds a run of {saved['trainer']}: resume it with {saved['trainer']}, or give {script} "
                    f"another --output_dir", [], None, False)
        changed = [f"--{k} {v} (the run's: {saved[k]})" for k, v in dataclasses.asdict(cfg).items()
                   if saved and k in saved and k not in RESUME_MAY_CHANGE and saved[k] != v]
        if changed:
            return (f"--resume continues the run in {out} with its own settings, and these differ from them: "
                    f"{', '.join(changed)}. Drop them (a resumed run may change only --"
                    f"{', --'.join(sorted(RESUME_MAY_CHANGE - {'resume', 'overwrite', 'output_dir'}))}), or start "
                    f"a new run with another --output_dir", [], None, False)
        step = int(ckpt.rsplit("-", 1)[1])
        if step >= cfg.max_steps:
            return (None, [f"the run in {out} is complete: its newest checkpoint is at step {step} and --max_steps "
                           f"is {cfg.max_steps}; raise --max_steps to train on"], ckpt, True)
        if (ranks := checkpoint_ranks(ckpt)) != world_size:  # each rank's random state is in it (rng-rank<r>.pt)
            return (f"{ckpt} was written by a run on {ranks} rank{'s' * (ranks != 1)} and this one has {world_size}: "
                    f"resume it on {ranks} (each rank's random state is in the checkpoint), or start a new run with "
                    f"another --output_dir", [], None, False)
        return None, [], ckpt, False
    notes = []
    if cfg.resume:
        notes.append(f"--resume: no checkpoint in {out}; starting from scratch")
    elif not cfg.overwrite and (ckpt or os.path.exists(os.path.join(out, "metrics.jsonl"))):
        return (f"{out} already holds a run: pass --resume to continue it, --overwrite to start afresh there, or "
                "another --output_dir", [], None, False)
    old = sorted(n for n in os.listdir(out) if _RUN_FILE.fullmatch(n))
    for name in old:  # nothing of an old run may mix into the new one (its checkpoints would be resumed)
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if cfg.overwrite and old:
        notes.append(f"--overwrite: removed the run in {out} ({', '.join(old)})")
    with open(config_path, "w") as f:
        json.dump({"trainer": script, **dataclasses.asdict(cfg)}, f, indent=1)
    return None, notes, None, False


def latest_checkpoint(output_dir: str) -> str | None:
    """Newest complete checkpoint: `checkpoint-<step>` directories appear only by rename."""
    if not os.path.isdir(output_dir):
        return None
    steps = [int(m.group(1)) for n in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", n))]
    return os.path.join(output_dir, f"checkpoint-{max(steps):06d}") if steps else None


def checkpoint_ranks(ckpt: str) -> int:
    """How many ranks wrote a checkpoint: one rng-rank<r>.pt each."""
    return sum(bool(re.fullmatch(r"rng-rank\d+\.pt", n)) for n in os.listdir(ckpt))


class MetricsLogger:
    """metrics.jsonl (or another `name`: probe.jsonl), one object per step, written by rank 0 (`main`), and
    optionally wandb (metrics.jsonl only). A resumed run
    (`resume_step`) cuts the file back to its checkpoint's step, dropping a line torn by a crash; a fresh
    run starts it empty."""

    def __init__(self, cfg, resume_step: int | None, main: bool, name: str = "metrics.jsonl"):
        self.path, self.main, self.wandb = os.path.join(cfg.output_dir, name), main, None
        if not main:
            return
        if resume_step is not None and os.path.exists(self.path):  # drop what came after the checkpoint
            kept, torn = [], 0
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a write cut off by a crash
                        torn += 1
                        continue
                    if record["step"] <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            if torn:
                print(f"{self.path}: dropped {torn} torn line{'s' if torn > 1 else ''} (a write cut off by a crash)",
                      flush=True)
            with open(self.path, "w") as f:
                f.writelines(kept)
        elif os.path.exists(self.path):
            os.remove(self.path)
        if cfg.wandb and name == "metrics.jsonl":
            try:
                import wandb
            except ImportError:
                raise SystemExit("error: --wandb needs the wandb package: pip install wandb")
            self.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg),
                                    dir=cfg.output_dir, resume="allow")

    def log(self, step: int, metrics: dict):
        record = {"step": step, **{k: None if v is None else float(v) for k, v in metrics.items()}}
        self.log_raw(record)
        if self.wandb and self.main:
            self.wandb.log(record, step=step)

    def log_raw(self, record: dict):
        """One JSON line as it is (a record with a "step")."""
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# What the metadata of a DCP checkpoint (optim/.metadata, a pickle) may name: its own record classes
_DCP_METADATA = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo")} | {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}


class _DataOnly(pickle.Unpickler):
    """A pickle that names nothing but _DCP_METADATA and torch dtypes: nothing in it can run code."""

    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's optimizer metadata")


def safe_dcp_load(state: dict, path: str):
    """dcp.load, reading nothing as code. DCP unpickles its metadata and its non-tensor entries (the
    optimizer's param_groups) with plain pickle: first read the metadata with _DataOnly and each such
    entry as torch.load(weights_only=True) reads (tensors and plain data only), which raise on anything else."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = _DataOnly(f).load()
    for index, where in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(os.path.join(path, where.relative_path), "rb") as f:
                f.seek(where.offset)
                torch.load(io.BytesIO(f.read(where.length)), weights_only=True)
    dcp.load(state, checkpoint_id=path)


def unpickling_detail(e: Exception) -> str:  # torch's weights_only message is a page; keep what it found
    m = re.search(r"[^\n]*(?:unsupported|not an allowed|blocked|no place)[^\n]*", str(e).split("\n", 1)[-1], re.I)
    return (m.group() if m else (str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


# ======================================================================================
# Checkpoints: HF model + sharded optimiser (DCP) + RNG + trainer state, written atomically
# ======================================================================================


def save_checkpoint(output_dir: str, step: int, model, tokenizer, optimizers: dict, schedulers: dict, state: dict,
                    keep: int = 2):
    """checkpoint-<step>/ {model/ (HF), optim/ (DCP shards), rng-rank<r>.pt, trainer_state.pt}, written to
    a .tmp directory and renamed (a crash leaves the previous one intact; multi-node: a shared
    filesystem). An unstepped optimizer is left out (`stepped`): its state is zeros, or, never created,
    get_optimizer_state_dict would take a zero-lr step and its first real step would count as the second in
    Adam's bias correction. A write that fails (a full disk, a lost mount) stops the run with one line from the
    rank it failed on; the earlier checkpoints are untouched. model: the trainer's common.PolicyModel (its .lm
    is the HF model), FSDP2-sharded or not."""
    from torch.distributed.checkpoint.api import CheckpointException

    r = _rank()
    final = os.path.join(output_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    try:
        _write_checkpoint(tmp, r, step, model, tokenizer, optimizers, schedulers, state)
    except (OSError, RuntimeError, CheckpointException) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        own = not isinstance(e, _PeerStopped)  # its own write failed, not a collective left by another rank
        if isinstance(e, CheckpointException):  # DCP names the ranks whose writes failed
            own = r in e.failures
            e = e.failures[r][0] if own else e
        why = f"{e.strerror} ({e.filename or tmp})" if isinstance(e, OSError) and e.strerror else \
            (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        # The rank whose own write failed says why, whichever it is; rank 0 says when a collective failed.
        message = f"writing {os.path.basename(final)} failed: {why}" if own else \
            (f"writing {os.path.basename(final)} stopped in a collective: {why}, so another rank probably stopped "
             "first (its error line, or torchrun's report, says why)")
        raise SystemExit(f"error: {f'rank {r}: ' if r else ''}{message}; "
                         + (f"the previous checkpoint {previous} is intact: fix the cause and continue with --resume"
                            if previous else "no earlier checkpoint exists: fix the cause and start again")
                         if own or r == 0 else 1) from None
    if r == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        old = sorted(n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", n))
        for n in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(output_dir, n), ignore_errors=True)
    _barrier()


class _PeerStopped(RuntimeError):
    """A collective of a checkpoint write failed: another rank stopped (its own error says why)."""


@contextlib.contextmanager
def _together():
    """The collectives of a checkpoint write, on several ranks: their failure (_PeerStopped) most likely means
    that another rank stopped (under NCCL a rank waits instead, until torchrun stops it)."""
    try:
        yield
    except RuntimeError as e:
        if _world_size() == 1:
            raise
        raise _PeerStopped(str(e)) from e


def _write_checkpoint(tmp: str, rank: int, step: int, model, tokenizer, optimizers: dict, schedulers: dict,
                      state: dict):
    """save_checkpoint's writes, all into tmp (renamed to the checkpoint only once complete)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    optimizers = {k: o for k, o in optimizers.items() if stepped(o)}  # the same on every rank
    with _together():
        _barrier()
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        weights = {k.removeprefix("lm."): v for k, v in weights.items()}
        model.lm.save_pretrained(os.path.join(tmp, "model"), state_dict=weights)
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
        torch.save({"step": step, "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                    "optimizers": sorted(optimizers), **state}, os.path.join(tmp, "trainer_state.pt"))
    with _together():  # a rank's own shard that fails to write comes as DCP's CheckpointException, on every rank
        dcp.save({k: get_optimizer_state_dict(model, o) for k, o in optimizers.items()},
                 checkpoint_id=os.path.join(tmp, "optim"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    with _together():
        _barrier()


def stepped(optimizer) -> bool:
    """Has this optimizer taken a step? Its state may exist before (common.init_adam_state), at step 0."""
    return any(float(s.get("step", 1)) > 0 for s in optimizer.state.values())


def load_checkpoint(path: str, model, optimizers: dict, schedulers: dict) -> dict:
    """Restore optimisers, schedulers and this rank's RNG (weights: loaded from path/model already);
    returns the trainer state (step, data position, method state). Nothing is read as code: every file
    is loaded as tensors and plain data only (weights_only=True, safe_dcp_load)."""
    try:
        return _load_checkpoint(path, model, optimizers, schedulers)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"error: {path} holds more than tensors and plain data, which could run code as it loads "
                         f"({unpickling_detail(e)}); not loading it. Resume only checkpoints this "
                         "code wrote") from None


def _load_checkpoint(path: str, model, optimizers: dict, schedulers: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    saved = {k: o for k, o in optimizers.items() if k in state.get("optimizers", optimizers)}  # others: unstepped
    optim = {k: get_optimizer_state_dict(model, o) for k, o in saved.items()}
    safe_dcp_load(optim, os.path.join(path, "optim"))
    for k, o in saved.items():
        set_optimizer_state_dict(model, o, optim[k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    rng_file = os.path.join(path, f"rng-rank{_rank()}.pt")
    if not os.path.exists(rng_file):  # claim refused another number of ranks: a file was removed
        raise SystemExit(f"error: rank {_rank()}: {rng_file} is missing; the checkpoint is incomplete")  # any rank
    # a checkpoint of an earlier version holds numpy's RNG key as an array: allow that type and no other
    numpy_array = [np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype("uint32"))]
    with torch.serialization.safe_globals(numpy_array):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _rank() -> int:  # common.rank(), which this file cannot import (common imports it)
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """This process's random state (Python, numpy, torch, CUDA), as plain data: a checkpoint's rng-rank<r>.pt."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # numpy's key as a list: plain data for torch.load
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), **cuda}


def set_rng_state(state: dict):
    """Restore what rng_state returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
