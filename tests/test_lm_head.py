"""common.PolicyModel and common.make_batch: per-token log-probs (METHODS.md Eq. 1) and entropies
(Eq. 2) of the response tokens, against a plain float64 reference built from the HF model's full
[B, T, V] logits. Tiny Qwen2 built from a config (nothing downloaded); CPU only."""
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import common
import lm_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB = 97
PAD = 0


def tiny_lm(seed: int = 0, tie: bool = False) -> Qwen2ForCausalLM:
    """2-layer Qwen2, hidden 32. Weights re-drawn with std 0.3 so the next-token distributions are
    far from uniform (with the default init every entropy is ~log V and every logp ~ -log V, which
    would let a wrong index or a wrong temperature pass)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    lm = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return lm.eval()


def random_pairs(seed: int, prompt_lens, response_lens):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in response_lens]
    return prompts, responses


def reference(lm, batch, prompts, responses, temperature):
    """Float64 Eq. (1)-(2) from the plain HF forward over the padded batch. Row i's response token t
    sits at column P + t (P = longest prompt) and is predicted by the logits at column P + t - 1;
    every other entry is 0. Returns (logp, entropy) [B, R] float64, differentiable w.r.t. lm."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = lm(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits.double()
    P = max(len(p) for p in prompts)
    R = batch["response_mask"].shape[1]
    logp = torch.zeros(len(prompts), R, dtype=torch.float64)
    entropy = torch.zeros(len(prompts), R, dtype=torch.float64)
    for i, r in enumerate(responses):
        for t, token in enumerate(r):
            z = logits[i, P + t - 1] / temperature  # [V]
            logq = torch.log_softmax(z, dim=-1)
            logp[i, t] = logq[token]
            entropy[i, t] = -(logq.exp() * logq).sum()
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# make_batch layout, by hand
# ---------------------------------------------------------------------------------------------


def test_make_batch_layout_by_hand():
    # prompts of 3 and 1 tokens -> P = 3 (left-padded); responses of 2 and 3 -> R = 3 (right-padded)
    b = common.make_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, device="cpu")
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 2, 0],
                                       [0, 0, 8, 3, 4, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0],
                                            [0, 0, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[1, 1, 0],
                                           [1, 1, 1]]
    assert b["input_ids"].dtype == torch.long
    assert set(b) == {"input_ids", "attention_mask", "response_mask"}


def test_make_batch_pad_id_and_empty_response():
    # an empty response still gets one (masked) response column: R = max(1, longest response)
    b = common.make_batch([[4, 5]], [[]], pad_id=63, device="cpu")
    assert b["input_ids"].tolist() == [[4, 5, 63]]
    assert b["attention_mask"].tolist() == [[1, 1, 0]]
    assert b["response_mask"].tolist() == [[0]]
    b = common.make_batch([[4], [1, 2]], [[9], []], pad_id=63, device="cpu")
    assert b["input_ids"].tolist() == [[63, 4, 9], [1, 2, 63]]
    assert b["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 0]]
    assert b["response_mask"].tolist() == [[1], [0]]


# ---------------------------------------------------------------------------------------------
# log-probs and entropies
# ---------------------------------------------------------------------------------------------

# (prompt lengths, response lengths): ragged on both sides; the second case has an empty response
CASES = [([3, 5, 1, 4], [4, 1, 6, 2]), ([2, 6, 4], [5, 0, 3])]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_logprobs_and_entropy_match_reference(temperature, case):
    lm = tiny_lm(seed=case)
    prompts, responses = random_pairs(10 + case, *CASES[case])
    batch = common.make_batch(prompts, responses, PAD, "cpu")
    n_tokens = sum(len(r) for r in responses)
    model = common.PolicyModel(lm, compile=False, chunk_size=3)
    assert model.chunk_size < n_tokens  # several chunks, the last one partial
    with torch.no_grad():
        logp, entropy = model(**batch, temperature=temperature, with_entropy=True)
        ref_logp, ref_entropy = reference(lm, batch, prompts, responses, temperature)
    assert logp.shape == entropy.shape == batch["response_mask"].shape
    assert logp.dtype == entropy.dtype == torch.float32
    mask = batch["response_mask"].bool()
    assert torch.all(logp[~mask] == 0) and torch.all(entropy[~mask] == 0)  # exactly 0, not just small
    # float32 forward vs float64 head: errors are a few ulp of logits of magnitude ~10 (1e-6 each), so relative
    # above 1 with an absolute floor of ~10 ulp (logp reaches -13 here)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    # the test is not vacuous: values spread, and tau changes them
    assert ref_entropy[mask].std() > 0.1 and ref_logp[mask].std() > 0.3
    assert torch.all(ref_logp[mask] < 0) and torch.all(ref_entropy[mask] > 0)
    assert torch.all(ref_entropy[mask] < math.log(VOCAB))


def test_temperature_is_applied():
    """tau = 0.7 differs from tau = 1 (guards against a temperature that is silently ignored)."""
    lm = tiny_lm(seed=3)
    prompts, responses = random_pairs(3, [2, 3], [3, 2])
    batch = common.make_batch(prompts, responses, PAD, "cpu")
    model = common.PolicyModel(lm, compile=False, chunk_size=2)
    with torch.no_grad():
        lp1, en1 = model(**batch, temperature=1.0, with_entropy=True)
        lp7, en7 = model(**batch, temperature=0.7, with_entropy=True)
    mask = batch["response_mask"].bool()
    assert (lp1 - lp7)[mask].abs().min() > 1e-3
    assert torch.all(en7[mask] < en1[mask])  # sharper distribution at lower temperature


def test_padding_does_not_change_logprobs():
    """Each row of the padded batch equals the same sequence run alone, unpadded (Eq. 1)."""
    lm = tiny_lm(seed=4)
    prompts, responses = random_pairs(4, [1, 5, 3], [4, 2, 5])
    batch = common.make_batch(prompts, responses, PAD, "cpu")
    model = common.PolicyModel(lm, compile=False, chunk_size=4)
    with torch.no_grad():
        logp, entropy = model(**batch, temperature=1.0, with_entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = lm(input_ids=torch.tensor([p + r])).logits[0].double()  # [len, V], no padding
            logq = torch.log_softmax(logits[len(p) - 1:len(p) + len(r) - 1], dim=-1)  # [len(r), V]
            want_lp = logq.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            want_en = -(logq.exp() * logq).sum(-1)
            torch.testing.assert_close(logp[i, :len(r)].double(), want_lp, rtol=1e-5, atol=1e-5)  # as above
            torch.testing.assert_close(entropy[i, :len(r)].double(), want_en, rtol=1e-5, atol=1e-5)


def test_chunk_size_and_entropy_flag_do_not_change_results():
    lm = tiny_lm(seed=5)
    prompts, responses = random_pairs(5, [3, 2, 4], [5, 3, 4])
    batch = common.make_batch(prompts, responses, PAD, "cpu")
    with torch.no_grad():
        lp_big, en_big = common.PolicyModel(lm, compile=False, chunk_size=1024)(**batch, with_entropy=True)
        lp_1, en_1 = common.PolicyModel(lm, compile=False, chunk_size=1)(**batch, with_entropy=True)
        lp_no, en_no = common.PolicyModel(lm, compile=False, chunk_size=3)(**batch, with_entropy=False)
    # float32 both sides, but the head's matmul and sums run in other blockings (rows 1 vs 12): they differ by a few
    # ulp of the logits (magnitude ~10, 1e-6 each; 1.4e-6 seen on an AVX2 CPU), so relative above 1, floor 1e-5
    torch.testing.assert_close(lp_1, lp_big, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(en_1, en_big, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_no, lp_big, rtol=1e-5, atol=1e-5)
    assert torch.all(en_no == 0)  # with_entropy=False: zeros, not garbage


# ---------------------------------------------------------------------------------------------
# gradients (through the chunked, checkpointed kernel)
# ---------------------------------------------------------------------------------------------


def _check_grads(lm, model, prompts, responses, temperature):
    batch = common.make_batch(prompts, responses, PAD, "cpu")
    params = [p for p in lm.parameters()]
    logp, entropy = model(**batch, temperature=temperature, with_entropy=True)
    grads = torch.autograd.grad(logp.sum() + entropy.sum(), params)
    ref_logp, ref_entropy = reference(lm, batch, prompts, responses, temperature)
    ref_grads = torch.autograd.grad(ref_logp.sum() + ref_entropy.sum(), params)
    for (name, _), g, r in zip(lm.named_parameters(), grads, ref_grads):
        scale = r.abs().max().item()
        assert scale > 0, name  # every parameter (lm_head included) gets a gradient
        err = (g.double() - r.double()).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: max err {err:.3g} vs max |grad| {scale:.3g}"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_match_reference(temperature):
    lm = tiny_lm(seed=6)
    prompts, responses = random_pairs(6, [3, 1, 4], [4, 5, 2])
    _check_grads(lm, common.PolicyModel(lm, compile=False, chunk_size=3), prompts, responses, temperature)


def test_gradients_tied_embeddings():
    """Tied input/output embeddings: the LM-head grad and the embedding grad land on one tensor."""
    lm = tiny_lm(seed=7, tie=True)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    prompts, responses = random_pairs(7, [2, 4], [3, 3])
    _check_grads(lm, common.PolicyModel(lm, compile=False, chunk_size=2), prompts, responses, 1.0)


def test_compiled_kernel_matches_reference():
    """The only compiled test (torch.compile on CPU is slow cold): values and gradients."""
    lm = tiny_lm(seed=8)
    prompts, responses = random_pairs(8, [2, 3], [3, 2])
    model = common.PolicyModel(lm, compile=True, chunk_size=3)
    assert model.compile_head and lm_head.kernels(True)[0] is not lm_head._reduce  # the compiled kernels run
    batch = common.make_batch(prompts, responses, PAD, "cpu")
    with torch.no_grad():
        logp, entropy = model(**batch, temperature=0.7, with_entropy=True)
        ref_logp, ref_entropy = reference(lm, batch, prompts, responses, 0.7)
    mask = batch["response_mask"].bool()
    assert torch.all(logp[~mask] == 0) and torch.all(entropy[~mask] == 0)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)  # as in the eager test
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-5)
    _check_grads(lm, model, prompts, responses, 0.7)


# ---------------------------------------------------------------------------------------------
# lm_head.LMHead's written-out gradient, alone
# ---------------------------------------------------------------------------------------------


def _head_case(dtype, seed=0, n=7, hidden=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, dtype=torch.float64, generator=g)
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    g_logp, g_entropy = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y, g_logp, g_entropy


def _naive_float64(h, w, y, temperature, with_entropy, g_logp, g_entropy):
    """Eq. (1)-(2) from the full logits, by autograd in float64: values and d/dh, d/dW of sum(g_logp logp + g_H H)."""
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logq = torch.log_softmax(h @ w.T / temperature, dim=-1)
    logp = logq.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    loss = (g_logp * logp).sum() + ((g_entropy * entropy).sum() if with_entropy else 0)
    return logp, entropy, torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_lm_head_gradient_equals_autograd_in_float64(compile, with_entropy):
    """For arbitrary upstream gradients of logp and H (not just their sums), chunks of 3 over 7 rows (the last one
    partial, one reused buffer), T = 0.7: values and both gradients equal autograd's to float64 rounding."""
    h, w, y, g_logp, g_entropy = _head_case(torch.float64)
    logp, entropy = lm_head.LMHead.apply(h, w, y, 0.7, with_entropy, 3, compile)
    grads = torch.autograd.grad((g_logp * logp).sum() + (g_entropy * entropy).sum(), (h, w))
    ref_logp, ref_entropy, ref_grads = _naive_float64(h, w, y, 0.7, with_entropy, g_logp, g_entropy)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-13)
    torch.testing.assert_close(entropy, ref_entropy if with_entropy else torch.zeros_like(ref_entropy), rtol=0,
                               atol=1e-13)
    for got, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_lm_head_bfloat16_weights_within_bfloat16_rounding():
    """bf16 weights (FSDP2's compute dtype on GPUs): logits are rounded to bf16 as naive autograd's would be, sums
    run in float32, and d/dW is summed over 3 chunks in bf16; errors stay at bf16's ~1e-2 relative."""
    h, w, y, g_logp, g_entropy = _head_case(torch.bfloat16, seed=1, n=9)
    logp, entropy = lm_head.LMHead.apply(h, w, y, 1.0, True, 4, False)
    assert logp.dtype == entropy.dtype == torch.float32
    grads = torch.autograd.grad((g_logp.float() * logp).sum() + (g_entropy.float() * entropy).sum(), (h, w))
    ref_logp, ref_entropy, ref_grads = _naive_float64(h, w, y, 1.0, True, g_logp, g_entropy)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=0.05 * ref_logp.abs().max().item())
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=0.05 * ref_entropy.abs().max().item())
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=0.05 * ref.abs().max().item())


def test_rows_per_chunk_by_hand():
    """At most 1024 rows and 256 MiB of logits per chunk: 2**28 / (151,936 x 4 B) = 441.7, x 2 B = 883.5."""
    assert lm_head.rows_per_chunk(151_936, torch.float32) == 441
    assert lm_head.rows_per_chunk(151_936, torch.bfloat16) == 883
    assert lm_head.rows_per_chunk(97, torch.float32) == 1024  # a small vocabulary: the row cap
    assert lm_head.rows_per_chunk(97, torch.float32, max_rows=3) == 3
    assert lm_head.rows_per_chunk(10 ** 9, torch.float32) == 1  # never 0 rows


def test_compile_cache_is_keyed_by_the_kernel_path(monkeypatch, tmp_path):
    """torch.compile's CPU cache key leaves out the vector ISA (a kernel from the AVX-512 path gave log-probs off by
    1e36 on the AVX2 one): one directory per torch, CPU, ATEN_CPU_CAPABILITY and MKL switch; common.py points torch
    at it unless the user chose a TORCHINDUCTOR_CACHE_DIR."""
    for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"):
        monkeypatch.delenv(k, raising=False)
    plain = lm_head.compile_cache_dir("/c")
    assert plain.startswith("/c/inductor-") and lm_head.compile_cache_dir("/c") == plain
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    avx2 = lm_head.compile_cache_dir("/c")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert len({plain, avx2, lm_head.compile_cache_dir("/c")}) == 3
    code = "import os, common; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT, capture_output=True,  # noqa: E731
                                   text=True, check=True).stdout.strip()
    assert run(dict(env, HOME=str(tmp_path))).startswith(str(tmp_path / ".cache" / "sft_rl_fusion" / "inductor-"))
    assert run(dict(env, TORCHINDUCTOR_CACHE_DIR="/mine")) == "/mine"
