"""CUDA-only tests for fastdpo.kernels at realistic sizes (V = 128256 and 151936), plus GPU memory bounds.

test_kernels.py runs its whole suite on CUDA too when a GPU is present; this file adds what is too large for the
CPU interpreter. Same tolerance rule: kernel error vs an fp64 oracle <= 2 x eager error (same dtype) + small atol.
"""

from __future__ import annotations

import pytest
import torch
from _compare import assert_close_report, check_vs_eager, run_token
from fastdpo.kernels import (
    linear_token_logps,
    linear_token_logps_ref,
    sequence_logps,
    sequence_logps_ref,
    token_logps,
    token_logps_ref,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCABS = [128256, 151936]
DTYPES = [torch.bfloat16, torch.float32]
MiB = 1 << 20


def batch(b, t, v, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(b, t, v, device="cuda", generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, t), device="cuda", generator=g)
    mask = torch.rand(b, t, device="cuda", generator=g) > 0.3
    mask[-1, : t // 2] = False
    labels[~mask] = -100
    return logits, labels, mask


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_token_and_sequence_logps_realistic(vocab, dtype, backend):
    logits, labels, mask = batch(2, 192, vocab, dtype)
    w_tok = torch.randn(labels.shape, device="cuda")
    out, grad = run_token(token_logps, logits, labels, mask, w_tok, backend=backend)
    ref, ref_grad = run_token(token_logps_ref, logits.double(), labels, mask, w_tok)
    eager, eager_grad = run_token(token_logps_ref, logits, labels, mask, w_tok)
    check_vs_eager(f"token_logps V={vocab}", out, eager, ref)
    check_vs_eager(f"grad V={vocab}", grad, eager_grad, ref_grad)
    assert torch.all(grad[~mask] == 0)

    w_seq = torch.randn(labels.shape[0], device="cuda")
    out, grad = run_token(sequence_logps, logits, labels, mask, w_seq, backend=backend)
    ref, ref_grad = run_token(sequence_logps_ref, logits.double(), labels, mask, w_seq)
    eager, eager_grad = run_token(sequence_logps_ref, logits, labels, mask, w_seq)
    check_vs_eager(f"sequence_logps V={vocab}", out, eager, ref)
    check_vs_eager(f"seq grad V={vocab}", grad, eager_grad, ref_grad)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", [(1.0, None), (0.5, 30.0)], ids=["plain", "scale+cap"])
def test_linear_token_logps_realistic(vocab, dtype, transform):
    logit_scale, softcap = transform
    hid = 2048
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(2, 300, hid, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(vocab, hid, device="cuda", generator=g) * 2 / hid**0.5).to(dtype)
    bias = torch.randn(vocab, device="cuda", generator=g).to(dtype)
    labels = torch.randint(0, vocab, (2, 300), device="cuda", generator=g)
    mask = torch.rand(2, 300, device="cuda", generator=g) > 0.4
    labels[~mask] = -100
    w = torch.randn(2, 300, device="cuda", generator=g)
    kw = dict(logit_scale=logit_scale, softcap=softcap)

    def run(fn, h, wt, b, **extra):
        h, wt, b = (t.detach().clone().requires_grad_() for t in (h, wt, b))
        out = fn(h, wt, labels, mask, bias=b, **kw, **extra)
        (out * w).sum().backward()
        return out.detach(), h.grad, wt.grad, b.grad

    got = run(linear_token_logps, hidden, weight, bias, chunk_size=96, backend="triton")
    eager = run(linear_token_logps_ref, hidden, weight, bias)
    ref = run(linear_token_logps_ref, hidden.double(), weight.double(), bias.double())
    for name, k, e, r in zip(("logps", "grad_hidden", "grad_weight", "grad_bias"), got, eager, ref):
        check_vs_eager(f"{name} V={vocab}", k, e, r)
    assert torch.all(got[1][~mask] == 0)


def test_token_logps_backward_allocates_no_vocab_buffer():
    n, vocab = 4096, 151936
    logits = torch.randn(1, n, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (1, n), device="cuda")
    mask = torch.ones(1, n, dtype=torch.bool, device="cuda")
    x = logits.requires_grad_()
    y = x.clone()  # intermediate; its backward passes the gradient through
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = sequence_logps(y, labels, mask, backend="triton")
    fwd_peak = torch.cuda.max_memory_allocated() - base
    (g,) = torch.autograd.grad(out.sum(), y)
    bwd_peak = torch.cuda.max_memory_allocated() - base
    assert g.data_ptr() == y.data_ptr(), "the gradient must live in the logits buffer"
    nv_bytes = n * vocab * 2
    assert fwd_peak < nv_bytes // 50 and bwd_peak < nv_bytes // 50, (fwd_peak / MiB, bwd_peak / MiB)


def test_fused_head_peak_memory_flat_in_tokens():
    vocab, hid, chunk = 151936, 2048, 512
    weight = (torch.randn(vocab, hid, device="cuda") / hid**0.5).to(torch.bfloat16).requires_grad_()

    def peak(n):
        hidden = torch.randn(1, n, hid, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (1, n), device="cuda")
        mask = torch.ones(1, n, dtype=torch.bool, device="cuda")
        weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = linear_token_logps(hidden, weight, labels, mask, chunk_size=chunk, backend="triton")
        out.sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(2048), peak(16384)
    # N-proportional: grad_hidden (2 B/elem), index_select'ed ids and per-token fp32 vectors; a naive head would add
    # (16384 - 2048) x V x 2 bytes = 4.1 GiB
    allowed = (16384 - 2048) * (hid * 2 + 256) + 64 * MiB
    assert large - small <= allowed, f"peak grew by {(large - small) / MiB:.0f} MiB (allowed {allowed / MiB:.0f})"
    # and the logits never exceed one chunk: fp32 grad_weight + its bf16 copy (V x H x 6), the chunk's logits
    # (plus an fp32 copy where addmm has no out_dtype), per-token buffers and slack
    assert small <= vocab * hid * 6 + 3 * chunk * vocab * 2 + 2048 * hid * 8 + 256 * MiB


def test_int64_offsets_beyond_2_31_elements():
    """Rows that start past 2^31 elements (int32 offsets would wrap) are scored and differentiated correctly."""
    n, vocab, tail = 14200, 151936, 8  # 2.16e9 logits
    logits = torch.empty(1, n, vocab, device="cuda", dtype=torch.bfloat16).normal_(std=3.0)
    labels = torch.randint(0, vocab, (1, n), device="cuda")
    mask = torch.zeros(1, n, dtype=torch.bool, device="cuda")
    mask[:, -tail:] = True
    assert (n - tail) * vocab > 2**31
    last = logits[:, -tail:].clone().requires_grad_()
    ref = token_logps_ref(last, labels[:, -tail:], mask[:, -tail:])
    (ref_grad,) = torch.autograd.grad(ref.sum(), last)

    x = logits.requires_grad_()
    out = token_logps(x, labels, mask, backend="triton")
    assert_close_report(out[:, -tail:], ref, atol=1e-4, rtol=0, name="logps past 2^31")
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert_close_report(grad[:, -tail:], ref_grad, atol=1e-2, rtol=0, name="grad past 2^31")
    assert grad[:, :-tail].abs().max().item() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_beyond_256k(backend):
    vocab = 262147  # > 256k and odd
    logits, labels, mask = batch(2, 64, vocab, torch.bfloat16, seed=3)
    w = torch.randn(labels.shape, device="cuda")
    out, grad = run_token(token_logps, logits, labels, mask, w, backend=backend)
    ref, ref_grad = run_token(token_logps_ref, logits.double(), labels, mask, w)
    eager, eager_grad = run_token(token_logps_ref, logits, labels, mask, w)
    check_vs_eager("token_logps V=262147", out, eager, ref)
    check_vs_eager("grad V=262147", grad, eager_grad, ref_grad)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_tensors_device_not_the_current_one():
    """precompute --device cuda:1 while cuda:0 is current: the launches follow the tensors."""
    assert torch.cuda.current_device() == 0
    logits, labels, mask = (x.to("cuda:1") for x in batch(2, 33, 1000, torch.float32))
    out = token_logps(logits, labels, mask, backend="triton")
    ref = token_logps_ref(logits, labels, mask)
    assert out.device == torch.device("cuda:1")
    assert_close_report(out, ref, atol=1e-5, rtol=0, name="token_logps on cuda:1")
