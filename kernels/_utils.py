"""Shared plumbing for the log-prob kernels: optional Triton import, backend choice, interpreter support.

Triton is optional (it does not exist on macOS): without it `triton_jit` leaves the kernel a plain Python
function that is never launched, and only the torch backend is available.
"""

from __future__ import annotations

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
    """Whether Triton kernels run through the CPU interpreter (`TRITON_INTERPRET=1`), read at call time."""
    if HAS_TRITON:
        try:
            return bool(triton.knobs.runtime.interpret)
        except AttributeError:  # pragma: no cover - older Triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_TWINS: dict[int, object] = {}


def _twin(jit_fn):
    from triton.runtime.interpreter import InterpretedFunction

    twin = _TWINS.get(id(jit_fn))
    if twin is None:
        twin = _TWINS[id(jit_fn)] = InterpretedFunction(jit_fn.fn)
    return twin


class _InterpretedLaunch:
    """Launch a compiled-mode kernel on the interpreter: `triton.jit` chose the mode when triton was imported, so
    if that happened before TRITON_INTERPRET=1 was set, our kernels and triton.language's own @jit helpers
    (tl.max, tl.sum, tl.sigmoid, ...) are compiled-mode functions. Swap the helpers for interpreted twins during
    the launch and put them back afterwards."""

    def __init__(self, kernel):
        self.kernel = _twin(kernel)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            from triton.runtime.jit import JITFunction

            modules = [tl, tl.core, tl.standard, tl.math]
            saved = [(m, k, v) for m in modules for k, v in vars(m).items() if isinstance(v, JITFunction)]
            try:
                for m, k, v in saved:
                    setattr(m, k, _twin(v))
                return self.kernel[grid](*args, **kwargs)
            finally:
                for m, k, v in saved:
                    setattr(m, k, v)

        return run


def launchable(kernel, device: torch.device):
    """The kernel to launch for tensors on `device` (`kernel[grid](...)`)."""
    if device.type != "cpu" or is_interpreted(kernel) or not hasattr(kernel, "fn"):
        return kernel
    return _InterpretedLaunch(kernel)


def is_interpreted(kernel) -> bool:
    """Whether `kernel` (from `launchable`) runs on Triton's CPU interpreter."""
    return type(kernel).__name__ in ("InterpretedFunction", "_InterpretedLaunch")


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
                "backend='triton' got CPU tensors: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set to run "
                "its (slow) CPU interpreter; use backend='torch' (or 'auto') on CPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support {device.type} tensors; use backend='torch'")
    return backend


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def mm_fp32_supported(device: torch.device) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` works for 16-bit inputs here (CUDA, torch >= 2.8)."""
    if device.type != "cuda":
        return False
    if device not in _MM_OUT_DTYPE_OK:
        try:
            x = torch.zeros(16, 16, device=device, dtype=torch.bfloat16)
            _MM_OUT_DTYPE_OK[device] = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[device] = False
    return _MM_OUT_DTYPE_OK[device]


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
