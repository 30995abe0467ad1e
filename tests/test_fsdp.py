"""FSDP2 on CPU (gloo, 2 ranks) must reproduce a single-process run on the same global batch."""
import json
import os
import socket
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fsdp_worker.py")


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
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, timeout=300)
    return json.loads(out.read_text()), ckpt / "checkpoint-000002"


def test_two_rank_fsdp_equals_single_process(tmp_path):
    single, ckpt1 = _run(tmp_path, "single", 1)
    fsdp, ckpt2 = _run(tmp_path, "fsdp", 2)
    for a, b in zip(single["losses"], fsdp["losses"]):
        assert abs(a - b) < 1e-5, (single["losses"], fsdp["losses"])
    for a, b in zip(single["grad_norms"], fsdp["grad_norms"]):
        assert abs(a - b) < 1e-5 * max(1.0, a), (single["grad_norms"], fsdp["grad_norms"])
    assert single["losses"][0] != single["losses"][1]  # the first step changed the weights
    assert set(single["weights"]) == set(fsdp["weights"])
    for k in single["weights"]:
        diff = (torch.tensor(single["weights"][k]) - torch.tensor(fsdp["weights"][k])).abs().max()
        assert diff < 1e-5, k

    # The FSDP checkpoint is a plain HF model equal to the trained weights, plus a sharded optimiser.
    loaded = AutoModelForCausalLM.from_pretrained(ckpt2 / "model")
    for k, v in loaded.state_dict().items():
        assert torch.allclose(v, torch.tensor(fsdp["weights"][k]), atol=1e-6), k
    assert sorted(os.listdir(ckpt2 / "optim"))[:1] == [".metadata"]
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(os.listdir(ckpt2))
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpt2.parent))
