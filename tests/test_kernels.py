"""Tests for fastdpo.kernels: token_logps, sequence_logps and the fused LM head, on both backends.

Without CUDA the Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py before
anything imports triton; slow: small shapes only), with its fp32 -> bf16 conversion rounded to nearest even as on a
GPU (tests/_triton_interp.py); with CUDA the same tests run the compiled kernels (realistic shapes are in
test_kernels_cuda.py).

Tolerance rule (flash-attention's): against an fp64 oracle, the kernel's max error is at most twice the max error
of eager PyTorch on the same-dtype inputs (`log_softmax(logits.float())`, the recipe the kernel replaces) plus a
small atol. The factor 2 allows a different but equally accurate summation order (online log-sum-exp, chunked
GEMMs); the atol (a few fp32 ulp of the largest value) covers sets where the eager path happens to be exact. A
kernel that rounded per-token values to bf16 would miss the bound by ~1000x.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _triton_interp
import fastdpo.kernels as K
import pytest
import torch
from _compare import assert_close_report, check_vs_eager, run_token
from fastdpo.kernels import _utils as kernel_utils
from fastdpo.kernels import (
    linear_token_logps,
    linear_token_logps_ref,
    sequence_logps,
    sequence_logps_ref,
    token_logps,
    token_logps_ref,
)
from fastdpo.kernels import logps as logps_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

INTERPRETED = kernel_utils.interpreter_enabled()
if INTERPRETED:
    assert _triton_interp.install(), "cannot patch Triton's interpreter: see tests/_triton_interp.py"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not K.HAS_TRITON, reason="no triton"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def python_without_interpreter(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python -c CODE` in a fresh process whose environment does not set TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def make_batch(b, t, v, dtype, seed=0, p_mask=0.3, all_masked_row=None, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > p_mask
    if all_masked_row is not None:
        mask[all_masked_row] = False
    labels[~mask] = -100  # what a collator writes: the kernels must never read these
    upstream = torch.randn(labels.shape, generator=g)  # per-token weights: every row differs
    return logits.to(DEVICE), labels.to(DEVICE), mask.to(DEVICE), upstream.to(DEVICE)


# ----------------------------------------------------------------------------------------------------------------
# token_logps / sequence_logps
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 47, 1000), (1, 2, 70000)], ids=["3x47x1000", "1x2x70000"])
def test_token_logps_matches_reference(backend, dtype, shape):
    logits, labels, mask, w = make_batch(*shape, dtype)
    mask[0, 0] = True  # the 70000-vocab case keeps at least one scored row
    labels[0, 0] = shape[2] - 1  # the last column: past 65536 in the wide case
    out, grad = run_token(token_logps, logits, labels, mask, w, backend=backend)
    assert out.dtype == torch.float32 and out.shape == labels.shape

    ref_out, ref_grad = run_token(token_logps_ref, logits.double(), labels, mask, w)
    eager_out, eager_grad = run_token(token_logps_ref, logits, labels, mask, w)
    check_vs_eager(f"token_logps[{backend},{dtype}]", out, eager_out, ref_out)
    check_vs_eager(f"grad[{backend},{dtype}]", grad, eager_grad, ref_grad)
    assert grad.dtype == dtype
    assert torch.all(out[~mask] == 0)
    assert torch.all(grad[~mask] == 0), "masked rows must get exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_logps_matches_reference(backend, dtype):
    logits, labels, mask, _ = make_batch(4, 33, 777, dtype, seed=1, all_masked_row=2)
    w = torch.randn(4, device=DEVICE)  # per-sequence weights, as the DPO loss gives
    out, grad = run_token(sequence_logps, logits, labels, mask, w, backend=backend)
    assert out.shape == (4,) and out.dtype == torch.float32
    ref_out, ref_grad = run_token(sequence_logps_ref, logits.double(), labels, mask, w)
    eager_out, eager_grad = run_token(sequence_logps_ref, logits, labels, mask, w)
    check_vs_eager(f"sequence_logps[{backend},{dtype}]", out, eager_out, ref_out)
    check_vs_eager(f"grad[{backend},{dtype}]", grad, eager_grad, ref_grad)
    assert out[2] == 0 and torch.all(grad[2] == 0), "an all-masked sequence scores 0 and gets no gradient"
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_beyond_256k(backend):
    """One odd-sized row wider than 256k (several loop iterations, last block partial)."""
    logits, labels, mask, w = make_batch(1, 2, 262147, torch.bfloat16, seed=11, p_mask=-1.0)
    labels[0, 1] = 262146  # the very last column
    out, grad = run_token(token_logps, logits, labels, mask, w, backend=backend)
    ref_out, ref_grad = run_token(token_logps_ref, logits.double(), labels, mask, w)
    eager_out, eager_grad = run_token(token_logps_ref, logits, labels, mask, w)
    check_vs_eager(f"token_logps[{backend}]", out, eager_out, ref_out)
    check_vs_eager(f"grad[{backend}]", grad, eager_grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_in_place_and_guards_other_users(backend):
    logits, labels, mask, w = make_batch(2, 9, 300, torch.bfloat16, seed=2)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    (token_logps(x, labels, mask, backend=backend) * w).sum().backward()
    assert seen == [x.data_ptr()], "the logits gradient must be written into the logits buffer itself"

    # A node that saved the logits (tanh saves its output) must fail loudly, not silently use the gradient
    leaf = logits.float().clone().requires_grad_()
    y = torch.tanh(leaf)
    out = token_logps(y, labels, mask, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_are_not_copied(backend):
    """logits[:, :-1] (the usual shift) is scored in place: gradient written into the model's buffer."""
    logits, labels, mask, w = make_batch(2, 8, 300, torch.bfloat16, seed=10)
    full = torch.cat([logits, logits[:, :1]], dim=1).requires_grad_()
    buf = full * 1
    shifted = buf[:, :-1]
    seen = []
    shifted.register_hook(lambda g: seen.append(g.data_ptr()))
    (token_logps(shifted, labels, mask, backend=backend) * w).sum().backward()
    assert seen == [shifted.data_ptr()]
    _, ref_grad = run_token(token_logps_ref, logits, labels, mask, w)
    assert_close_report(full.grad[:, :-1], ref_grad, atol=1e-2, rtol=0, name="grad through a strided view")
    assert torch.all(full.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_all_masked_and_bad_labels(backend):
    logits, labels, mask, w = make_batch(2, 5, 260, torch.float32, seed=3)
    none = torch.zeros_like(mask)
    out, grad = run_token(token_logps, logits, labels, none, w, backend=backend)
    assert torch.all(out == 0) and torch.all(grad == 0)

    # an unmasked label outside [0, V) is a caller bug: NaN, not a silent number
    bad = labels.clone()
    bad[0, 0], mask[0, 0] = 260, True
    with torch.no_grad():
        out = token_logps(logits, bad, mask, backend=backend)
    assert torch.isnan(out[0, 0]) and not torch.isnan(out[1]).any()

    # -inf logits (e.g. banned tokens) are fine; a row of -inf but the label gives log p = 0
    x = torch.full((1, 2, 300), float("-inf"), device=DEVICE)
    x[0, :, 5] = 1.0
    lab = torch.tensor([[5, 5]], device=DEVICE)
    with torch.no_grad():
        out = token_logps(x, lab, torch.ones_like(lab, dtype=torch.bool), backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(1, 2))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 9),
    v=st.integers(2, 300),
    p_mask=st.floats(0.0, 1.0),
    chunk=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_property(b, t, v, p_mask, chunk, seed):
    logits, labels, mask, w = make_batch(b, t, v, torch.float32, seed=seed, p_mask=p_mask)
    out, grad = run_token(sequence_logps, logits, labels, mask, w[:, 0], backend="torch", chunk_size=chunk)
    ref, ref_grad = run_token(sequence_logps_ref, logits.double(), labels, mask, w[:, 0])
    assert_close_report(out, ref, atol=1e-5, rtol=1e-6, name="sequence_logps")
    assert_close_report(grad, ref_grad, atol=1e-6, rtol=1e-5, name="grad")
    assert torch.all(grad[~mask] == 0)


def test_backends_agree_and_are_deterministic():
    logits, labels, mask, _ = make_batch(3, 20, 501, torch.bfloat16, seed=4)
    with torch.no_grad():
        a = token_logps(logits, labels, mask, backend="torch")
        b = token_logps(logits, labels, mask, backend="torch", chunk_size=7)
        c = token_logps(logits, labels, mask, backend="torch")
    assert torch.equal(a, c), "the torch backend must be deterministic"
    assert_close_report(a, b, atol=1e-5, rtol=0, name="chunk size independence")
    if K.HAS_TRITON:
        with torch.no_grad():
            t1 = token_logps(logits, labels, mask, backend="triton")
            t2 = token_logps(logits, labels, mask, backend="triton")
        assert torch.equal(t1, t2)
        assert_close_report(t1, a, atol=1e-5, rtol=0, name="triton vs torch")


# ----------------------------------------------------------------------------------------------------------------
# fused LM head
# ----------------------------------------------------------------------------------------------------------------


def make_head(b, t, h, v, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype)
    bvec = torch.randn(v, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[-1] = False  # an all-masked row
    labels[~mask] = -100
    upstream = torch.randn(b, t, generator=g)
    to = lambda x: None if x is None else x.to(DEVICE)
    return to(hidden), to(weight), to(bvec), to(labels), to(mask), to(upstream)


def run_head(fn, hidden, weight, bias, labels, mask, w, frozen=False, **kw):
    """Forward + backward; returns (out, grad_hidden, grad_weight, grad_bias)."""
    h = hidden.detach().clone().requires_grad_()
    wt = weight.detach().clone().requires_grad_(not frozen)
    b = None if bias is None else bias.detach().clone().requires_grad_(not frozen)
    out = fn(h, wt, labels, mask, bias=b, **kw)
    (out * w).sum().backward()
    return out.detach(), h.grad, wt.grad, None if b is None else b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("transform", [(1.0, None), (0.25, None), (0.5, 4.0)], ids=["plain", "scale", "scale+cap"])
def test_linear_token_logps_matches_reference(backend, dtype, bias, transform):
    logit_scale, softcap = transform
    hidden, weight, bvec, labels, mask, w = make_head(3, 11, 24, 333, dtype, bias)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    assert int(mask.sum()) % 5 != 0, "chunk_size=5 must not divide the number of scored tokens"
    got = run_head(linear_token_logps, hidden, weight, bvec, labels, mask, w, chunk_size=5, backend=backend, **kw)
    f64 = lambda x: None if x is None else x.double()
    ref = run_head(linear_token_logps_ref, f64(hidden), f64(weight), f64(bvec), labels, mask, w, **kw)
    eager = run_head(linear_token_logps_ref, hidden, weight, bvec, labels, mask, w, **kw)
    for name, k, e, r in zip(("logps", "grad_hidden", "grad_weight", "grad_bias"), got, eager, ref):
        if r is None:
            assert k is None
            continue
        check_vs_eager(f"{name}[{backend},{dtype}]", k, e, r)
    assert torch.all(got[0][~mask] == 0)
    assert torch.all(got[1][~mask] == 0), "masked positions must get exactly zero hidden gradient"
    assert got[2].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", [(1.0, None), (0.5, 4.0)], ids=["plain", "scale+cap"])
def test_linear_frozen_head_eager_gradient(backend, transform):
    """Frozen weight and bias (LoRA): the hidden gradient comes from the forward pass, and must still be right."""
    logit_scale, softcap = transform
    hidden, weight, bvec, labels, mask, w = make_head(2, 13, 16, 257, torch.bfloat16, True, seed=5)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    out, gh, gw, gb = run_head(
        linear_token_logps, hidden, weight, bvec, labels, mask, w, frozen=True, chunk_size=5, backend=backend, **kw
    )
    assert gw is None and gb is None
    f64 = lambda x: x.double()
    ref = run_head(linear_token_logps_ref, f64(hidden), f64(weight), f64(bvec), labels, mask, w, frozen=True, **kw)
    eager = run_head(linear_token_logps_ref, hidden, weight, bvec, labels, mask, w, frozen=True, **kw)
    check_vs_eager(f"logps[{backend}]", out, eager[0], ref[0])
    check_vs_eager(f"grad_hidden[{backend}]", gh, eager[1], ref[1])
    assert torch.all(gh[~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_precompute_and_train_are_bit_identical(backend):
    """The reference precompute (no_grad) and training (grad, frozen or not) must score identically."""
    hidden, weight, bvec, labels, mask, _ = make_head(2, 17, 16, 300, torch.bfloat16, True, seed=6)
    with torch.no_grad():
        pre = linear_token_logps(hidden, weight, labels, mask, chunk_size=6, backend=backend, bias=bvec)
    train = linear_token_logps(
        hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels, mask, 6, backend, bvec
    )
    lora = linear_token_logps(hidden.clone().requires_grad_(), weight, labels, mask, 6, backend, bvec)
    assert torch.equal(pre, train.detach()) and torch.equal(pre, lora.detach())
    # Per-token values do not depend on the chunk size beyond GEMM rounding (cuBLAS may pick another kernel for
    # another row count, hence fp32 and a looser bound on CUDA)
    h32, w32, b32 = hidden.float(), weight.float(), bvec.float()
    small = linear_token_logps(h32, w32, labels, mask, chunk_size=6, backend=backend, bias=b32)
    large = linear_token_logps(h32, w32, labels, mask, chunk_size=16, backend=backend, bias=b32)
    atol = 1e-5 if DEVICE.type == "cpu" else 2e-4
    assert_close_report(large, small, atol=atol, rtol=0, name="chunk size independence")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_strided_hidden(backend):
    """The caller passes hidden_states[:, :-1], a view that cannot be flattened without a copy."""
    hidden, weight, bvec, labels, mask, w = make_head(2, 10, 8, 120, torch.float32, True, seed=9)
    full = torch.cat([hidden, torch.randn_like(hidden[:, :1])], dim=1)
    shifted = full.detach().requires_grad_()
    out = linear_token_logps(shifted[:, :-1], weight, labels, mask, chunk_size=3, backend=backend, bias=bvec)
    (out * w).sum().backward()
    ref_h = hidden.clone().requires_grad_()
    ref = linear_token_logps_ref(ref_h, weight, labels, mask, bvec)
    (ref * w).sum().backward()
    assert_close_report(out, ref, atol=1e-5, rtol=0, name="logps")
    assert_close_report(shifted.grad[:, :-1], ref_h.grad, atol=1e-5, rtol=0, name="grad_hidden")
    assert torch.all(shifted.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_all_masked(backend):
    hidden, weight, _, labels, mask, w = make_head(2, 4, 8, 100, torch.float32, False)
    none = torch.zeros_like(mask)
    out, gh, gw, _ = run_head(linear_token_logps, hidden, weight, None, labels, none, w, backend=backend)
    assert torch.all(out == 0) and torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_autocast_projects_in_autocast_dtype(backend):
    hidden, weight, _, labels, mask, w = make_head(2, 9, 16, 200, torch.float32, False)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = run_head(linear_token_logps, hidden, weight, None, labels, mask, w, backend=backend)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    eager = run_head(linear_token_logps_ref, h16, w16, None, labels, mask, w)
    ref = run_head(linear_token_logps_ref, h16.double(), w16.double(), None, labels, mask, w)
    for name, k, e, r in zip(("logps", "grad_hidden", "grad_weight"), got, eager, ref):
        check_vs_eager(f"autocast {name}", k, e, r)


# ----------------------------------------------------------------------------------------------------------------
# memory: the torch backend works in bounded chunks (a structural check that fails on a naive implementation)
# ----------------------------------------------------------------------------------------------------------------


class _LargestAllocation(TorchDispatchMode):
    """Largest tensor (in elements) that any op creates, ignoring views and in-place results."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in _tensors((args, kwargs)) if a.numel()}
        for t in _tensors(out):
            if t.numel() > self.largest and t.untyped_storage().data_ptr() not in inputs:
                self.largest, self.op = t.numel(), str(func)
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def test_torch_backend_memory_is_bounded_by_the_chunk():
    n_rows, vocab, chunk = 64, 500, 8
    logits, labels, mask, w = make_batch(4, 16, vocab, torch.bfloat16, seed=7, p_mask=0.1)
    x = logits.clone().requires_grad_()
    with _LargestAllocation() as naive:
        (token_logps_ref(x, labels, mask) * w).sum().backward()
    assert naive.largest >= n_rows * vocab, "the probe must see the eager [N, V] buffers"

    y = logits.clone().requires_grad_()
    z = y.clone()  # an intermediate whose backward passes the gradient through without a copy
    with _LargestAllocation() as probe:
        (token_logps(z, labels, mask, backend="torch", chunk_size=chunk) * w).sum().backward()
    assert 0 < probe.largest <= chunk * vocab, f"{probe.op} made {probe.largest} elements > chunk x V"

    hidden, weight, bvec, hl, hm, hw = make_head(8, 8, 4, vocab, torch.bfloat16, True, seed=8)
    h, wt, b = (t.clone().requires_grad_() for t in (hidden, weight, bvec))
    with _LargestAllocation() as head:
        (linear_token_logps(h, wt, hl, hm, chunk_size=chunk, backend="torch", bias=b) * hw).sum().backward()
    assert 0 < head.largest <= chunk * vocab, f"fused head: {head.op} made {head.largest} elements > chunk x V"


def test_default_chunk_size_depends_on_vocab_only():
    assert K.default_chunk_size(151936) == 512 and K.default_chunk_size(128256) == 1024
    assert K.default_chunk_size(32000) == 4096 and K.default_chunk_size(10**7) == 128
    assert logps_mod.default_torch_chunk_rows(1000) == logps_mod._TORCH_CHUNK_ELEMENTS // 1000


# ----------------------------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    logits, labels, mask, _ = make_batch(1, 3, 50, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logps(logits, labels, mask, backend="cuda")
    monkeypatch.delenv(kernel_utils.ENV_BACKEND, raising=False)
    assert kernel_utils.resolve_backend("auto", torch.device("cpu")) == "torch"
    if K.HAS_TRITON:
        assert kernel_utils.resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv(kernel_utils.ENV_BACKEND, "torch")
    assert kernel_utils.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert kernel_utils.resolve_backend("triton", torch.device("cuda")) == "triton" or not K.HAS_TRITON
    monkeypatch.setenv(kernel_utils.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match=kernel_utils.ENV_BACKEND):
        kernel_utils.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv(kernel_utils.ENV_BACKEND)
    if K.HAS_TRITON:
        monkeypatch.setattr(kernel_utils, "interpreter_enabled", lambda: False)  # as if imported without it
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            token_logps(logits.cpu(), labels.cpu(), mask.cpu(), backend="triton")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            linear_token_logps(logits.cpu(), torch.randn(7, 50), labels.cpu(), mask.cpu(), backend="triton")


def test_shape_checks():
    logits, labels, mask, _ = make_batch(2, 3, 50, torch.float32)
    with pytest.raises(ValueError, match="must match"):
        token_logps(logits, labels[:, :2], mask[:, :2])
    with pytest.raises(ValueError, match="do not match"):
        linear_token_logps(logits, torch.randn(7, 49, device=DEVICE), labels, mask)
    with pytest.raises(ValueError, match="softcap"):
        linear_token_logps(logits, torch.randn(7, 50, device=DEVICE), labels, mask, softcap=0.0)


@pytest.mark.integration
@pytest.mark.skipif(not K.HAS_TRITON, reason="no triton")
def test_interpreter_set_after_import_is_a_clear_error():
    """triton.jit fixes the mode at import: TRITON_INTERPRET=1 set afterwards gives backend='triton' on CPU tensors
    a clear error (set it before importing), while the torch backend and 'auto' keep working."""
    code = (
        "import os, torch, fastdpo.kernels as K\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "x = torch.randn(2, 3, 300); lab = torch.randint(0, 300, (2, 3)); m = lab > 50\n"
        "assert torch.allclose(K.token_logps(x, lab, m), K.token_logps_ref(x, lab, m), atol=1e-5)\n"
        "try:\n"
        "    K.token_logps(x, lab, m, backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    res = python_without_interpreter(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "TRITON_INTERPRET=1 set before triton and fastdpo are imported" in res.stdout, res.stdout[-2000:]


@pytest.mark.skipif(not INTERPRETED, reason="kernels are not on Triton's CPU interpreter")
def test_interpreter_rounds_bf16_to_nearest_even():
    """The test shim (tests/_triton_interp.py): the interpreter's fp32 -> bf16 store rounds like torch and GPUs."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=offs < n)

    # ties (down to even, up to even), carries into the exponent and to inf, then random magnitudes
    edges = [0x3F808000, 0x3F818000, 0x3F7FFFFF, 0x477FFFFF, 0x7F7FFFFF, 0xBF808001, 0x00018000]
    edges = torch.tensor(edges, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([edges, torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))])
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, x.numel(), BLOCK=2048)
    ref = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16)[:-3], ref.view(torch.int16)[:-3])
    assert y[-3].isnan() and y[-2] == 0 and y[-1] == 0 and y[-1].view(torch.int16) < 0


@pytest.mark.integration
def test_import_and_torch_backend_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdpo.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "x = torch.randn(2, 3, 11, requires_grad=True); lab = torch.randint(0, 11, (2, 3)); m = lab > 2\n"
        "out = K.sequence_logps(x * 1, lab, m); out.sum().backward()\n"
        "ref = K.sequence_logps_ref(x.detach(), lab, m)\n"
        "assert torch.allclose(out, ref, atol=1e-5), (out, ref)\n"
        "print('ok')\n"
    )
    res = python_without_interpreter(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# compiled path without a GPU: the interpreter is lenient, so also compile the kernels for Hopper (sm_90). In a
# subprocess without TRITON_INTERPRET: in this one triton.language's helpers are the interpreter's.
# ----------------------------------------------------------------------------------------------------------------

_AOT_CHECK = """
import sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
except ImportError as e:
    print("SKIP", e); sys.exit(0)
from fastdpo.kernels import logps as L

common = {"n_cols": "i32", "seq_len": "i32", "stride_b": "i64", "stride_t": "i64"}
common.update({"logit_scale": "fp32", "softcap": "fp32"})
flags = ("HAS_MASK", "HAS_SCALE", "HAS_SOFTCAP")
# what the JIT specializes for 16-aligned tensors and V % 16 == 0 (all real vocabularies)
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 7, 8)}
for dtype in ("bf16", "fp16", "fp32"):
    fwd = {"logits_ptr": "*" + dtype, "labels_ptr": "*i64", "mask_ptr": "*u8", "logps_ptr": "*fp32"}
    fwd.update({"lse_ptr": "*fp32", **common, **dict.fromkeys((*flags, "BLOCK_V"), "constexpr")})
    bwd = {"logits_ptr": "*" + dtype, "labels_ptr": "*i64", "mask_ptr": "*u8", "lse_ptr": "*fp32"}
    bwd.update({"grad_ptr": "*fp32", **common, **dict.fromkeys((*flags, "BLOCK_V"), "constexpr")})
    block, warps = L._fwd_config(151936, 4 if dtype == "fp32" else 2)
    bblock, bwarps = L._bwd_config(151936)
    for on in (False, True):
        consts = dict.fromkeys(flags, on)
        for kernel, sig, extra, nw in (
            (L._logps_fwd_kernel, fwd, {"BLOCK_V": block}, warps),
            (L._logps_bwd_kernel, bwd, {"BLOCK_V": bblock}, bwarps),
        ):
            try:
                src = ASTSource(JITFunction(kernel.fn), sig, constexprs={**consts, **extra}, attrs=aligned)
            except TypeError as e:
                print("SKIP", e); sys.exit(0)
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw}).asm["ptx"]
            name = kernel.fn.__name__
            assert "ld.global.v4" in ptx, name + ": logits loads are not 16-byte vectorized"
            if "bwd" in name:
                assert "st.global.v4" in ptx, name + ": gradient stores are not 16-byte vectorized"
print("OK")
"""


@pytest.mark.integration
@pytest.mark.skipif(not K.HAS_TRITON, reason="no triton")
def test_kernels_compile_for_sm90():
    """Every dtype / flag variant compiles to sm_90 PTX with 16-byte vectorized logits loads and stores."""
    res = python_without_interpreter(_AOT_CHECK, timeout=300)
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"Triton AOT API unavailable: {res.stdout[5:200]}")
    assert res.returncode == 0 and "OK" in res.stdout, (res.stdout + res.stderr)[-3000:]


def test_every_triton_launch_runs_under_its_tensors_device():
    """Triton launches on the current CUDA device: each launch sits in `with device_guard(tensor)`, and the
    guard selects the tensor's device (a CPU-side check; the two-GPU test is in test_kernels_cuda.py)."""
    import ast
    import contextlib

    from fastdpo.kernels._utils import device_guard

    class OnSecondGPU:
        device = torch.device("cuda", 1)

    guard = device_guard(OnSecondGPU())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.zeros(1)), contextlib.nullcontext)
    launches = 0
    for path in Path(K.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") ==
                    "device_guard" for item in node.items):
                guarded |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and getattr(node.func.value, "id", "").endswith("_kernel")):
                launches += 1
                assert id(node) in guarded, f"{path.name}:{node.lineno}: a Triton launch outside device_guard"
    assert launches >= 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("transform", [(1.0, None), (0.5, 4.0)], ids=["plain", "scale+cap"])
def test_linear_pair_loss_matches_reference(backend, dtype, bias, transform):
    """The fused pair loss (the loss an explicit input, gradients formed in the chunk loop, 3 GEMMs) against
    linear_token_logps_ref + the same loss on the whole batch: loss, log-probs, the per-pair outputs and every
    gradient, on an ugly shape: 7 pairs of uneven lengths in chunks of 2, 1, 3 and 1 whole pairs."""
    from fastdpo.kernels import linear_pair_loss, pair_chunks, pair_grids

    logit_scale, softcap = transform
    g = torch.Generator().manual_seed(3)
    lens = [(3, 1), (1, 4), (5, 2), (2, 2), (1, 1), (6, 3), (2, 5)]  # (chosen, rejected) tokens per pair
    n, h_dim, vocab = sum(c + r for c, r in lens), 19, 333
    hidden = (torch.randn(n, h_dim, generator=g)).to(dtype).to(DEVICE)
    weight = (torch.randn(vocab, h_dim, generator=g) * 0.3).to(dtype).to(DEVICE)
    bvec = (torch.randn(vocab, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    offset = (torch.arange(len(lens), dtype=torch.float64) * 0.25).to(DEVICE)  # a per-pair input, sliced per chunk
    chunk_tokens = 9  # pairs of 4, 5 | 7 | 4, 2, 9 (alone: longer than the budget) ... as pair_chunks cuts them
    assert pair_chunks(lens, chunk_tokens) == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]
    kw = dict(logit_scale=logit_scale, softcap=softcap)

    def loss_fn(chosen, chosen_mask, rejected, rejected_mask, off):  # a DPO-shaped loss of the grids
        margin = 0.7 * (chosen.sum(-1) - rejected.sum(-1)) + off.to(chosen.dtype)
        per_pair = -torch.nn.functional.logsigmoid(margin)
        return per_pair.sum(), per_pair, chosen_mask.sum(-1) - rejected_mask.sum(-1)

    def fused(h, w, b):
        loss, logps, per_pair, len_diff = linear_pair_loss(h, w, labels, lens, loss_fn, (offset,), bias=b,
                                                           chunk_tokens=chunk_tokens, backend=backend, **kw)
        assert len_diff.tolist() == [c - r for c, r in lens]
        return loss, logps, per_pair

    def reference(h, w, b):
        logps = linear_token_logps_ref(h[None], w, labels[None], torch.ones(1, n, dtype=torch.bool, device=DEVICE),
                                       bias=b, **kw)[0]
        loss, per_pair, _ = loss_fn(*pair_grids(logps, lens), offset)
        return loss, logps, per_pair

    def run(fn, h, w, b):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        b = None if b is None else b.detach().clone().requires_grad_()
        loss, logps, per_pair = fn(h, w, b)
        (loss * 1.7).backward()  # a non-unit upstream gradient: backward scales the stored gradients
        return loss.detach(), logps.detach(), per_pair.detach(), h.grad, w.grad, None if b is None else b.grad

    got = run(fused, hidden, weight, bvec)
    f64 = lambda x: None if x is None else x.double()  # noqa: E731
    ref = run(reference, f64(hidden), f64(weight), f64(bvec))
    eager = run(reference, hidden, weight, bvec)
    names = ("loss", "logps", "per_pair", "grad_hidden", "grad_weight", "grad_bias")
    for name, k, e, r in zip(names, got, eager, ref):
        if r is None:
            assert k is None
            continue
        check_vs_eager(f"{name}[{backend},{dtype}]", k, e, r)
    assert got[3].dtype == dtype


def test_pair_grids_lays_out_pair_order():
    """Pair order (c0, r0, c1, r1, ...) -> right-padded (B, T) grids and masks, an empty side included."""
    from fastdpo.kernels import pair_grids

    values = torch.arange(1.0, 8.0)  # pair 0: chosen 1 2, rejected 3; pair 1: chosen 4 5 6 7, rejected none
    c, cm, r, rm = pair_grids(values, [(2, 1), (4, 0)])
    assert c.tolist() == [[1, 2, 0, 0], [4, 5, 6, 7]] and cm.sum(-1).tolist() == [2, 4]
    assert r.tolist() == [[3], [0]] and rm.tolist() == [[True], [False]]
