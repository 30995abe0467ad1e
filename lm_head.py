"""The LM head's per-token log-probs and entropies (METHODS.md Eq. 1-2) with their gradient written out, for
common.PolicyModel (which is all that uses it; trainers never import this file).

Given the hidden states h [N, H] that predict N response tokens y, the head W [V, H] and a temperature T, with
logits z = h W^T / T and q = softmax(z):

    logp_t = z_t[y_t] - logsumexp(z_t)                            Eq. (1)
    H_t    = -sum_v q_tv log q_tv                                  Eq. (2)
    dL/dz_tv = g_logp_t (1[v = y_t] - q_tv) - g_H_t q_tv (log q_tv + H_t)

for upstream gradients g_logp, g_H. A [N, V] logits tensor is the memory problem (at Qwen2.5's V = 151,936,
2,048 tokens of float32 logits are 1.2 GB, and autograd keeps several), so the head runs in chunks of rows through
ONE reused [chunk, V] buffer: the forward keeps only logsumexp and H per token, the backward recomputes a chunk's
logits into the buffer, turns them into dL/dz in place (one fused pass) and multiplies out d/dh and d/dW. That is
one matmul more than naive autograd (4 against 3) and no [N, V] tensor, with no allocation per chunk (on CPU each
fresh buffer of that size costs ~0.4 s of page faults). bench/logprob.py measures it against both alternatives.

torch.compile caches what it generates (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), and on CPU
its key leaves out the vector instruction set: a kernel generated on the AVX-512 path served to a process on the
AVX2 one (ATEN_CPU_CAPABILITY=avx2, or another CPU sharing the directory) computed log-probs off by 1e36, and the
other way round NaN. compile_cache_dir keys the cache by what decides the kernels; common.py points torch at it
unless the user set TORCHINDUCTOR_CACHE_DIR.
"""
import hashlib
import os
import platform
from importlib.metadata import version

import torch


def compile_cache_dir(parent: str) -> str:
    """<parent>/inductor-<hash of torch's version, the CPU's model and flags, ATEN_CPU_CAPABILITY and MKL's
    instruction-set switches>: one torch.compile cache per kernel path."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))
    switches = "|".join(os.environ.get(k, "") for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"))
    key = f"{version('torch')}|{switches}|{cpu}".encode()
    return os.path.join(parent, "inductor-" + hashlib.sha256(key).hexdigest()[:12])


def _reduce(z, labels, temperature: float, with_entropy: bool):
    """A chunk's raw logits z = h W^T [n, V] (weights' dtype) -> logp, entropy, logsumexp [n] of z / T, in float32
    (float64 for float64 weights). Compiled, the cast, softmax and the sums fuse into one pass over z."""
    logits = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, labels[:, None]).squeeze(-1) - logz  # Eq. (1)
    if not with_entropy:
        return logp, torch.zeros_like(logp), logz
    return logp, logz - (torch.softmax(logits, dim=-1) * logits).sum(-1), logz  # Eq. (2): -sum q log q


def _grad_logits_(z, labels, logz, entropy, g_logp, g_entropy, temperature: float, with_entropy: bool):
    """In place: a chunk's raw logits z = h W^T [n, V] become dL/d(h W^T) (the module docstring's dL/dz over T)."""
    logq = z.to(logz.dtype) / temperature - logz[:, None]
    coef = g_logp[:, None] + g_entropy[:, None] * (logq + entropy[:, None]) if with_entropy else g_logp[:, None]
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == labels[:, None]
    z.copy_((onehot * g_logp[:, None] - logq.exp() * coef) / temperature)


def rows_per_chunk(vocab: int, dtype: torch.dtype, max_rows: int = 1024, max_bytes: int = 256 * 2 ** 20) -> int:
    """Rows of the [chunk, V] buffer: at most max_rows, and at most max_bytes of logits in the weights' dtype
    (Qwen2.5's V = 151,936: 441 float32 rows, 883 bfloat16; a small vocabulary: max_rows)."""
    return max(1, min(max_rows, max_bytes // (vocab * torch.finfo(dtype).bits // 8)))


_compiled = {}


def kernels(compile: bool):
    """(_reduce, _grad_logits_), compiled on first request (importing, or --no-compile, never pays for it)."""
    if compile and "kernels" not in _compiled:
        _compiled["kernels"] = tuple(torch.compile(f, dynamic=True) for f in (_reduce, _grad_logits_))
    return _compiled["kernels"] if compile else (_reduce, _grad_logits_)


class LMHead(torch.autograd.Function):
    """logp, entropy [N] = LMHead.apply(h [N, H], W [V, H], y [N], T, with_entropy, chunk_size, compile)."""

    @staticmethod
    def forward(ctx, h, weight, y, temperature, with_entropy, chunk_size, compile):
        reduce, _ = kernels(compile)
        buf = weight.new_empty(min(chunk_size, h.shape[0]), weight.shape[0])  # the one [chunk, V] buffer
        out = []
        for i in range(0, max(1, h.shape[0]), chunk_size):  # N = 0: one empty chunk
            hc = h[i:i + chunk_size]
            out.append(reduce(torch.mm(hc, weight.T, out=buf[:len(hc)]), y[i:i + chunk_size], temperature,
                              with_entropy))
        logp, entropy, logz = (torch.cat(parts) for parts in zip(*out))
        ctx.save_for_backward(h, weight, y, logz, entropy)
        ctx.args = temperature, with_entropy, chunk_size, compile
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        h, weight, y, logz, entropy = ctx.saved_tensors
        temperature, with_entropy, n, compile = ctx.args
        _, grad_logits_ = kernels(compile)
        buf = weight.new_empty(min(n, h.shape[0]), weight.shape[0])
        # d/dW in the weights' dtype, as autograd would give it: each chunk's product accumulates in float32 inside
        # the GEMM and is added once (bf16: one rounding a chunk, no float32 copy of W's size)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        for i in range(0, h.shape[0], n):
            hc, z = h[i:i + n], buf[:len(h[i:i + n])]
            torch.mm(hc, weight.T, out=z)
            grad_logits_(z, y[i:i + n], logz[i:i + n], entropy[i:i + n], g_logp[i:i + n], g_entropy[i:i + n],
                         temperature, with_entropy)  # z is dL/d(h W^T) now
            torch.mm(z, weight, out=grad_h[i:i + n])
            grad_w.addmm_(z.T, hc)
        return grad_h, grad_w, None, None, None, None, None
