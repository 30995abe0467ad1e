import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2 + the builtin tokenizer, saved in HF format (no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    import builtin_task

    path = tmp_path_factory.mktemp("tiny_model")
    tok = builtin_task.build_tiny_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(builtin_task.tiny_model_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def small_eval_file(tmp_path_factory):
    """Eight held-out builtin problems as a .jsonl file (exercises the file loader)."""
    import builtin_task

    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    rows = builtin_task.make_task(2, seed=builtin_task.EVAL_SEED)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
