"""Shared plumbing for the log-prob kernels: optional Triton import, backend choice.

Triton is optional (it does not exist on macOS): without it `triton_jit` leaves the kernel a plain Python
function that is never launched, and only the torch backend is available.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
ENV_BACKEND = "FASTDPO_LOGPS_BACKEND"

# torch >= 2.8 has `torch.addmm(..., out_dtype=torch.float32)` for 16-bit inputs, on CUDA only.
_MM_OUT_DTYPE_OK: dict[torch.device, bool] = {}


def triton_jit(fn):
    """`triton.jit` when Triton is installed, else the undecorated function (kept for introspection)."""
    return triton.jit(fn) if HAS_TRITON else fn


def interpreter_enabled() -> bool:
    """Whether Triton kernels run through its CPU interpreter.

    `triton.jit` fixes a function's mode from TRITON_INTERPRET when it decorates it, at import: triton.language's own
    helpers (tl.max, tl.sum, ...) when triton is imported, our kernels when fastdpo.kernels is. So TRITON_INTERPRET=1
    must be set before both imports; setting it afterwards changes nothing.
    """
    return _INTERPRETED


def _interpreted_at_import() -> bool:
    if not HAS_TRITON:
        return False
    try:
        ours = bool(triton.knobs.runtime.interpret)  # what triton.jit reads; the kernels are decorated right after
    except AttributeError:  # pragma: no cover - older Triton without knobs
        ours = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    return ours and type(tl.max).__name__ == "InterpretedFunction"


_INTERPRETED = _interpreted_at_import()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `backend` ("auto", "triton" or "torch") to the implementation that will run on `device`.

    "auto" honours the `FASTDPO_LOGPS_BACKEND` environment variable when set, otherwise picks Triton for CUDA
    tensors and torch elsewhere.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            return "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the `triton` package; use backend='torch'")
        if device.type == "cpu" and not interpreter_enabled():
            raise ValueError(
                "backend='triton' got CPU tensors: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "triton and fastdpo are imported to run its (slow) CPU interpreter; use backend='torch' (or 'auto') "
                "on CPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support {device.type} tensors; use backend='torch'")
    return backend


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def mm_fp32_supported(device: torch.device) -> bool:
    """Whether the fp32-output GEMMs of 16-bit inputs the fused head uses work here: `torch.mm(a, b,
    out_dtype=fp32)` and, for the weight gradient, `torch.addmm(acc, a, b, out_dtype=fp32, out=acc)` with an
    fp32 `acc` (CUDA; torch 2.8-2.9 accept the first and reject the second: "self and mat2 must have the same
    dtype")."""
    if device.type != "cuda":
        return False
    if device not in _MM_OUT_DTYPE_OK:
        try:
            x = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
            acc = torch.zeros(16, 16, device=device, dtype=torch.float32)
            ok = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
            _MM_OUT_DTYPE_OK[device] = ok and torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc).dtype == (
                torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[device] = False
    return _MM_OUT_DTYPE_OK[device]


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device, not the tensors': run a launch under the tensor's device
    (`fastdpo precompute --device cuda:1` while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc`, without rounding the product of 16-bit inputs to 16 bits first.

    Callers keep both operands chunk-sized: the fallback copies them to fp32.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif mm_fp32_supported(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())
