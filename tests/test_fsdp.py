"""FSDP2 on CPU (gloo, 2 ranks) must reproduce a single-process run on the same global batch."""
import json
import os
import socket
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "fsdp_worker.py")  # subprocesses: common from PYTHONPATH
ROOT_PATH = {"PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")]))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, nproc):
    out, ckpt = tmp_path / f"{name}.json", tmp_path / name
    if nproc == 1:
        cmd = [sys.executable, WORKER, str(out), str(ckpt)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1", WORKER, str(out), str(ckpt)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **ROOT_PATH)
    subprocess.run(cmd, check=True, env=env, timeout=300)
    return json.loads(out.read_text()), ckpt / "checkpoint-000002"


def test_two_rank_fsdp_equals_single_process(tmp_path):
    single, ckpt1 = _run(tmp_path, "single", 1)
    fsdp, ckpt2 = _run(tmp_path, "fsdp", 2)
    for a, b in zip(single["losses"], fsdp["losses"]):  # float32 sums of ~4: relative, as the norms below
        assert abs(a - b) < 1e-5 * max(1.0, abs(a)), (single["losses"], fsdp["losses"])
    for a, b in zip(single["grad_norms"], fsdp["grad_norms"]):
        assert abs(a - b) < 1e-5 * max(1.0, a), (single["grad_norms"], fsdp["grad_norms"])
    assert single["losses"][0] != single["losses"][1]  # the first step changed the weights
    # AdamW's state created up front (common.init_adam_state) is the state its first step creates: bit for bit
    assert single["prefilled_equal"] and fsdp["prefilled_equal"]
    assert set(single["weights"]) == set(fsdp["weights"])
    # AdamW steps every weight by ~lr = 1e-2 whatever its gradient's size, so where a gradient is tiny (the k_proj
    # biases) its float32 rounding moves the step: 5e-6 seen (MKL_CBWR=AVX); a rank that trained wrong is off by ~lr
    for k in single["weights"]:
        diff = (torch.tensor(single["weights"][k]) - torch.tensor(fsdp["weights"][k])).abs().max()
        assert diff < 1e-4, k

    # The FSDP checkpoint is a plain HF model equal to the trained weights, plus a sharded optimiser.
    loaded = AutoModelForCausalLM.from_pretrained(ckpt2 / "model")
    for k, v in loaded.state_dict().items():
        assert torch.allclose(v, torch.tensor(fsdp["weights"][k]), atol=1e-6), k
    assert sorted(os.listdir(ckpt2 / "optim"))[:1] == [".metadata"]
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(os.listdir(ckpt2))
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpt2.parent))


LOADER = os.path.join(HERE, "workers", "load_worker.py")


def test_sharded_loading_reads_once_and_equals_the_checkpoint(tiny_model_dir, tmp_path):
    """2 ranks: the policy, the reference model and the torch sampler's plain copy are built on the
    meta device and filled from rank 0's single read of the checkpoint: equal to the HF weights,
    tied embeddings still one parameter, RoPE buffers right, and the same log-probs as the HF model."""
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", LOADER, "load", tiny_model_dir, str(out)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", **ROOT_PATH), timeout=300)
    r = json.loads(out.read_text())
    assert r["sharded"]
    assert r["rank_reads"] == [2, 0]  # rank 0 read the weights (policy, reference); rank 1 never did
    for name in ("policy", "reference"):
        assert r[f"{name}_keys_equal"] and r[f"{name}_max_diff"] == 0.0, name
        assert r[f"{name}_tied"] and r[f"{name}_buffers_equal"], name
    assert r["bf16_push_exact"]  # the weight push: local shards cast to bf16, then gathered
    assert r["policy_trainable"] and r["reference_frozen"] and r["reference_eval"]
    assert r["generation_config_eos"] is not None
    assert r["plain_is_plain"] and r["plain_max_diff"] == 0.0 and r["plain_tied"] and r["plain_frozen"]
    assert r["logp_max_diff"] < 1e-5
    # FSDP2 leaves a root gathered after a no-grad forward; old_logprobs reshards the reference model's
    assert r["ref_root_gathered_after_forward"] and r["ref_root_sharded_after_old_logprobs"]


def test_one_rank_group_has_the_launcher_environment(tmp_path):
    """What `python grpo.py` on one GPU sets up (here with gloo): a one-rank group and the variables
    vLLM's external launcher and env:// read."""
    out = tmp_path / "one.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(ROOT_PATH)
    subprocess.run([sys.executable, LOADER, "one_rank", str(out)], check=True, env=env, timeout=120)
    r = json.loads(out.read_text())
    assert set(r["before"].values()) == {None}
    assert r["after"]["RANK"] == "0" and r["after"]["LOCAL_RANK"] == "0" and r["after"]["WORLD_SIZE"] == "1"
    assert r["after"]["MASTER_ADDR"] and int(r["after"]["MASTER_PORT"]) > 0
    assert r["initialized"] and r["world_size"] == 1 and r["rank"] == 0 and r["backend"] == "gloo"
    assert r["all_reduce"] == 3.0
