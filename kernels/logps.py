"""Fused log-softmax + gather + mask (+ sum) over `[B, T, V]` logits: per-token and per-sequence log-probs.

Why a kernel. DPO scores `labels` under the policy: `log_softmax(logits.float()).gather(labels)`, masked and summed
over the completion. With N = B * T rows, V the vocabulary and 16-bit logits, eager PyTorch moves, per step:

    forward   .float()          read 2NV  write 4NV   (fp32 copy #1)
              log_softmax       read 8NV  write 4NV   (two passes; fp32 output #2 is saved for backward)
    backward  gather backward   write 4NV             (dense zeros + scatter, fp32 #3)
              log_softmax bwd   read 8NV  write 4NV   (fp32 #4)
              .float() bwd      read 4NV  write 2NV
    total     ~40 NV bytes, and up to three fp32 [N, V] buffers live at once

For 16 x 1024 tokens and V = 151936 (NV = 2.5G) that is ~100 GB of traffic and ~30 GB of fp32 buffers. This file
reads each masked-in row once in the forward (2NV, an online log-sum-exp in fp32 that also picks the label logit),
keeps only the fp32 log-sum-exp per row, and in the backward reads the row again and overwrites it with its gradient
(2NV + 2NV): ~6 NV bytes and no [N, V] allocation at all. Masked-out rows are not even read in the forward.

Backends: "triton" (the kernels below; on CPU only under TRITON_INTERPRET=1), "torch" (the same semantics in
row chunks of bounded size, used on CPU and wherever Triton cannot run) and "auto" (Triton on CUDA, torch elsewhere;
the FASTDPO_LOGPS_BACKEND environment variable overrides it). Both backends are deterministic: no atomics, and every
per-token value depends only on its own row. `token_logps_ref` and `sequence_logps_ref` are the plain PyTorch
references the tests and benchmarks compare against.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._utils import cdiv, device_guard, next_power_of_2, resolve_backend, tl, triton_jit

__all__ = [
    "token_logps",
    "sequence_logps",
    "token_logps_ref",
    "sequence_logps_ref",
    "TokenLogpsFunction",
]

# torch backend: rows per chunk so that one fp32 [rows, V] temporary holds about this many elements (64 MiB)
_TORCH_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton_jit
def _logps_fwd_kernel(
    # pointers
    logits_ptr,  # (B, T, V) any float dtype, unit stride over V; row = b * T + t
    labels_ptr,  # (N,) int64
    mask_ptr,  # (N,) uint8, read only if HAS_MASK
    logps_ptr,  # (N,) fp32 out
    lse_ptr,  # (N,) fp32 out, saved for backward
    # sizes
    n_cols,
    seq_len,
    # strides
    stride_b,
    stride_t,
    # scalars
    logit_scale,
    softcap,
    # meta-parameters
    HAS_MASK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # z_v = softcap * tanh(logit_scale * x_v / softcap)   (each factor optional)
    # lse = m + log(sum_v exp(z_v - m)), with the running max m and the sum rescaled block by block (online)
    # logp = z[label] - lse, 0 where masked, NaN if an unmasked label lies outside [0, V)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // seq_len) * stride_b + (row % seq_len) * stride_t  # strided views, no copy
    label = tl.load(labels_ptr + row)
    active = True
    if HAS_MASK:
        active = tl.load(mask_ptr + row) != 0
    n_read = tl.where(active, n_cols, 0)  # masked rows read nothing

    m = -float("inf")
    s = 0.0
    for start in range(0, n_read, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_SCALE:
            z = z * logit_scale
        if HAS_SOFTCAP:
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # tanh, via sigmoid
        z = tl.where(in_row, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
        m = m_new
    lse = m + tl.log(tl.where(active, s, 1.0))

    valid = active & (label >= 0) & (label < n_cols)
    zt = tl.load(row_ptr + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
    if HAS_SCALE:
        zt = zt * logit_scale
    if HAS_SOFTCAP:
        zt = softcap * (2.0 * tl.sigmoid(2.0 * zt / softcap) - 1.0)
    logp = tl.where(valid, zt - lse, float("nan"))
    tl.store(logps_ptr + row, tl.where(active, logp, 0.0))
    tl.store(lse_ptr + row, lse)


@triton_jit
def _logps_bwd_kernel(
    # pointers
    logits_ptr,  # (B, T, V) in: logits, out: their gradient (in place)
    labels_ptr,  # (N,) int64
    mask_ptr,  # (N,) uint8, read only if HAS_MASK
    lse_ptr,  # (N,) fp32, from the forward
    grad_ptr,  # (N,) fp32 upstream gradient per row
    # sizes
    n_cols,
    seq_len,
    # strides
    stride_b,
    stride_t,
    # scalars
    logit_scale,
    softcap,
    # meta-parameters
    HAS_MASK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # d logp / d x_v = g * mask * (1[v == label] - exp(z_v - lse)) * dz_v/dx_v,
    # dz/dx = logit_scale * (1 - tanh^2) with softcap, logit_scale without; grid = (rows, column blocks)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ptrs = logits_ptr + (row // seq_len) * stride_b + (row % seq_len) * stride_t + cols
    in_row = cols < n_cols
    active = True
    if HAS_MASK:
        active = tl.load(mask_ptr + row) != 0
    n_read = tl.where(active, n_cols, 0)  # masked rows read nothing
    g = tl.load(grad_ptr + row)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)

    y = tl.load(ptrs, mask=cols < n_read, other=0.0).to(tl.float32)
    if HAS_SCALE:
        y = y * logit_scale
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0
        z = softcap * t
    else:
        z = y
    p = tl.exp(z - lse)
    grad = g * (tl.where(cols == label, 1.0, 0.0) - p)
    if HAS_SOFTCAP:
        grad = grad * (1.0 - t * t)
    if HAS_SCALE:
        grad = grad * logit_scale
    grad = tl.where(active, grad, 0.0)  # exactly zero on masked rows, whatever they held
    tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


# Fixed launch configs, no autotuning: BLOCK_V sets the summation order of the LSE, and the reference precompute and
# training must agree bit for bit. Functions of V and dtype only; untuned starting points (~16 KiB per iteration).
def _fwd_config(n_cols: int, element_size: int) -> tuple[int, int]:
    block = min(next_power_of_2(n_cols), 8192 if element_size <= 2 else 4096)
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def _bwd_config(n_cols: int) -> tuple[int, int]:
    block = min(next_power_of_2(n_cols), 4096)
    return block, 8 if block >= 4096 else 4


def _scalars(logit_scale: float, softcap: float | None) -> dict:
    return {
        "logit_scale": float(logit_scale),
        "softcap": float(softcap) if softcap is not None else 1.0,
        "HAS_SCALE": float(logit_scale) != 1.0,
        "HAS_SOFTCAP": softcap is not None,
    }


# ----------------------------------------------------------------------------------------------------------------
# Host functions (shared with linear_logps.py): rows of a (B, T, V) logits buffer, fp32 results
# ----------------------------------------------------------------------------------------------------------------


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")


def triton_rows_forward(
    logits3d: torch.Tensor,  # (B, T, V), unit stride over V
    labels: torch.Tensor,  # (B * T,) int64
    mask: torch.Tensor | None,  # (B * T,) bool, None: every row is scored
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward over every row; returns fp32 (logps, lse), each (B * T,), logps 0 on masked rows."""
    n_batch, seq_len, n_cols = logits3d.shape
    n_rows = n_batch * seq_len
    logps = torch.empty(n_rows, device=logits3d.device, dtype=torch.float32)
    lse = torch.empty(n_rows, device=logits3d.device, dtype=torch.float32)
    if n_rows == 0:
        return logps, lse
    block, num_warps = _fwd_config(n_cols, logits3d.element_size())
    mask_u8 = mask.view(torch.uint8) if mask is not None else labels
    with device_guard(logits3d):
        _logps_fwd_kernel[(n_rows,)](
            logits3d,
            labels,
            mask_u8,
            logps,
            lse,
            n_cols,
            seq_len,
            logits3d.stride(0),
            logits3d.stride(1),
            HAS_MASK=mask is not None,
            BLOCK_V=block,
            num_warps=num_warps,
            **_scalars(logit_scale, softcap),
        )
    return logps, lse


def triton_rows_backward_(
    logits3d: torch.Tensor,  # (B, T, V), overwritten with the gradient
    labels: torch.Tensor,  # (B * T,) int64
    mask: torch.Tensor | None,  # (B * T,) bool
    lse: torch.Tensor,  # (B * T,) fp32
    grad: torch.Tensor,  # (B * T,) fp32
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> None:
    """Triton backward: overwrite `logits3d` with d(sum_rows grad * logps) / d logits3d."""
    n_batch, seq_len, n_cols = logits3d.shape
    n_rows = n_batch * seq_len
    if n_rows == 0:
        return
    block, num_warps = _bwd_config(n_cols)
    mask_u8 = mask.view(torch.uint8) if mask is not None else labels
    with device_guard(logits3d):
        _logps_bwd_kernel[(n_rows, cdiv(n_cols, block))](
            logits3d,
            labels,
            mask_u8,
            lse,
            grad,
            n_cols,
            seq_len,
            logits3d.stride(0),
            logits3d.stride(1),
            HAS_MASK=mask is not None,
            BLOCK_V=block,
            num_warps=num_warps,
            **_scalars(logit_scale, softcap),
        )


def _transform(x: torch.Tensor, logit_scale: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 z = softcap * tanh(logit_scale * x / softcap), and t = tanh(.) for the derivative (None without cap)."""
    z = x.float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def torch_rows_forward(
    x: torch.Tensor,  # (C, V), every row scored
    labels: torch.Tensor,  # (C,) int64
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch forward on one chunk of rows; fp32 (logps, lse). Temporaries: a few fp32 (C, V)."""
    n_cols = x.shape[-1]
    z, _ = _transform(x, logit_scale, softcap)  # (C, V) fp32
    valid = (labels >= 0) & (labels < n_cols)
    idx = labels.clamp(0, n_cols - 1).unsqueeze(1)
    # log_softmax is one fused pass on CPU (logsumexp is several, ~4x slower); the LSE follows from the label's logit
    lp = torch.log_softmax(z, dim=-1).gather(1, idx).squeeze(1)
    lse = z.gather(1, idx).squeeze(1) - lp
    odd = ~torch.isfinite(lse)  # e.g. a label whose logit is -inf: take the LSE directly
    if odd.any():
        lse[odd] = torch.logsumexp(z[odd], dim=-1)
    return torch.where(valid, lp, torch.full_like(lp, math.nan)), lse


def torch_rows_backward(
    x: torch.Tensor,  # (C, V), every row active
    labels: torch.Tensor,  # (C,) int64
    lse: torch.Tensor,  # (C,) fp32
    grad: torch.Tensor,  # (C,) fp32
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """torch backward on one chunk of rows; returns the fp32 (C, V) gradient for the caller to store."""
    n_cols = x.shape[-1]
    z, t = _transform(x, logit_scale, softcap)
    out = z.sub(lse.unsqueeze(1)).exp_().neg_()  # -p, (C, V) fp32
    valid = (labels >= 0) & (labels < n_cols)
    out.scatter_add_(1, labels.clamp(0, n_cols - 1).unsqueeze(1), valid.to(out.dtype).unsqueeze(1))
    out.mul_((grad * logit_scale).unsqueeze(1))
    if t is not None:
        out.mul_(t.mul_(t).neg_().add_(1.0))
    return out


def default_torch_chunk_rows(n_cols: int) -> int:
    """Rows per chunk of the torch backend: a function of V only, so results never depend on the batch."""
    return max(1, _TORCH_CHUNK_ELEMENTS // max(1, n_cols))


def _torch_forward(logits3d, labels, mask, chunk_rows) -> tuple[torch.Tensor, torch.Tensor]:
    n_batch, seq_len, _ = logits3d.shape
    logps = torch.zeros(n_batch * seq_len, device=logits3d.device, dtype=torch.float32)
    lse = torch.zeros(n_batch * seq_len, device=logits3d.device, dtype=torch.float32)
    rows = mask.nonzero().squeeze(1)  # only masked-in rows are read
    for start in range(0, rows.numel(), chunk_rows):
        idx = rows[start : start + chunk_rows]
        x = logits3d[idx // seq_len, idx % seq_len]  # (C, V) gathered copy
        lp, ls = torch_rows_forward(x, labels.index_select(0, idx))
        logps.index_copy_(0, idx, lp)
        lse.index_copy_(0, idx, ls)
    return logps, lse


def _torch_backward_(logits3d, labels, mask, lse, grad, chunk_rows) -> None:
    n_batch, seq_len, _ = logits3d.shape
    rows = mask.nonzero().squeeze(1)
    for start in range(0, rows.numel(), chunk_rows):
        idx = rows[start : start + chunk_rows]
        b, t = idx // seq_len, idx % seq_len
        g = torch_rows_backward(
            logits3d[b, t], labels.index_select(0, idx), lse.index_select(0, idx), grad.index_select(0, idx)
        )
        logits3d[b, t] = g.to(logits3d.dtype)  # index_put_: in place, bumps the version counter
    logits3d.masked_fill_(~mask.view(n_batch, seq_len, 1), 0)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    """(..., T, V) -> (B, T, V) with unit stride over V: a view for (B, T, V) and strided slices such as
    logits[:, :-1]; a copy only for layouts no such view expresses (then the backward writes into the copy)."""
    if logits.dim() == 2:
        x = logits.unsqueeze(0)
    elif logits.dim() == 3:
        x = logits
    else:
        x = logits.reshape(-1, *logits.shape[-2:])
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    return x


class TokenLogpsFunction(torch.autograd.Function):
    """Per-token (or, with `reduce`, per-sequence) log-probs; the backward overwrites the logits buffer in place."""

    @staticmethod
    def forward(ctx, logits, labels, mask, backend, chunk_rows, reduce):
        logits3d = _as_3d(logits)
        labels1d = labels.reshape(-1).to(torch.long).contiguous()
        mask1d = mask.reshape(-1).to(torch.bool).contiguous()
        if backend == "triton":
            logps, lse = triton_rows_forward(logits3d, labels1d, mask1d)
        else:
            logps, lse = _torch_forward(logits3d, labels1d, mask1d, chunk_rows)
        ctx.save_for_backward(logits, labels1d, mask1d, lse)
        ctx.backend, ctx.chunk_rows = backend, chunk_rows
        logps = logps.view(labels.shape)
        return logps.sum(-1) if reduce else logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, labels1d, mask1d, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        # per-row upstream gradient; (B,) from sequence_logps broadcasts over T
        shape = logits.shape[:-1]
        grad = (grad_out.unsqueeze(-1) if grad_out.dim() < len(shape) else grad_out).expand(shape)
        grad = grad.reshape(-1).to(torch.float32).contiguous()
        logits3d = _as_3d(logits)
        if ctx.backend == "triton":
            triton_rows_backward_(logits3d, labels1d, mask1d, lse, grad)
            # Let autograd catch any other node that saved these logits (e.g. a tanh): they are now gradient
            torch.autograd.graph.increment_version(logits)
        else:
            _torch_backward_(logits3d, labels1d, mask1d, lse, grad, ctx.chunk_rows)
        return logits3d.reshape(logits.shape), None, None, None, None, None


def _check(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., V), got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]) or tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(
            f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must match logits' leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.device != logits.device or mask.device != logits.device:
        raise ValueError("logits, labels and mask must be on the same device")


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    backend: str = "auto",
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs `log_softmax(logits)[..., labels]` in fp32, 0 where `mask` is False.

    Args:
        logits: (B, T, V) fp32, bf16 or fp16 (any leading dims), already shifted: `logits[b, t]` scores
            `labels[b, t]`. **Consumed by the backward**: its contents are overwritten by its own gradient, so no
            (B, T, V) gradient is allocated. Do not read the logits after `backward()`, and do not pass a tensor
            that another autograd node saved (the backward then raises rather than silently corrupt it).
        labels: (B, T) integer token ids; anything (e.g. -100) where `mask` is False. An unmasked label
            outside [0, V) gives NaN.
        mask: (B, T) bool; False positions give 0 and get exactly zero gradient.
        backend: "triton", "torch" or "auto" (see the module docstring).
        chunk_size: rows per chunk of the torch backend (default: about 16M logits per chunk, a function of V
            only). Ignored by the Triton backend.

    Returns:
        (B, T) fp32, differentiable w.r.t. `logits`.
    """
    _check(logits, labels, mask)
    backend = resolve_backend(backend, logits.device)
    chunk_rows = int(chunk_size) if chunk_size else default_torch_chunk_rows(logits.shape[-1])
    return TokenLogpsFunction.apply(logits, labels, mask, backend, chunk_rows, False)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    backend: str = "auto",
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-sequence sums of the masked per-token log-probs: `token_logps(...).sum(-1)` as one op, (B,) fp32.

    The per-token values never leave fp32 and are summed in a fixed order (deterministic, no atomics). The
    backward takes the per-sequence upstream gradient and, like `token_logps`, **overwrites `logits` in place**
    with the gradient. Arguments as for `token_logps`.
    """
    _check(logits, labels, mask)
    backend = resolve_backend(backend, logits.device)
    chunk_rows = int(chunk_size) if chunk_size else default_torch_chunk_rows(logits.shape[-1])
    return TokenLogpsFunction.apply(logits, labels, mask, backend, chunk_rows, True)


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------


def token_logps_ref(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, upcast: bool = True
) -> torch.Tensor:
    """Eager reference: `log_softmax(logits).gather(labels)`, masked; materialises everything.

    upcast=True computes in fp32 (fp64 stays fp64): the usual `log_softmax(logits.float())` recipe. upcast=False
    computes in the logits' dtype, the naive low-precision path. Returns fp32 (fp64 for fp64 logits).
    """
    x = logits.float() if upcast and logits.dtype in (torch.float16, torch.bfloat16) else logits
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    logp = torch.log_softmax(x, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp.to(out_dtype), torch.zeros((), dtype=out_dtype, device=logp.device))


def sequence_logps_ref(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, upcast: bool = True
) -> torch.Tensor:
    """Eager reference for `sequence_logps`: `token_logps_ref(...).sum(-1)`."""
    return token_logps_ref(logits, labels, mask, upcast=upcast).sum(-1)
