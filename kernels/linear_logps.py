"""Fused LM head + log-probs: per-token log-probs of `labels` under `hidden @ weight.T (+ bias)` without the full
`[B, T, V]` logits ever existing.

Why. Even with `token_logps`, the model's LM head writes the logits (N x V, 2 bytes each: 5 GB for N = 16k tokens
and V = 151936) and autograd keeps them until backward, where their gradient (another N x V) is read twice by the
two gradient GEMMs. Here only the masked-in (completion) positions are projected, `chunk_size` tokens at a time,
into one reused `[chunk_size, V]` buffer: cuBLAS writes the chunk's logits, the row kernels of `logps.py` read them
once (online log-sum-exp in fp32, label logit gathered), and only the fp32 LSE per token is kept. The backward
recomputes each chunk's logits with the same GEMM, overwrites them in place with g * (onehot - softmax) and feeds
that buffer to `grad_hidden = G @ W` and `grad_weight += G^T @ h` (fp32 accumulator). Logit memory is
`chunk_size x V` whatever N is; the price is one extra N x V x H GEMM in backward.

Compared with TRL 1.16's `ChunkedLogProbFunction` (4096-token x 32768-vocab tiles):
  * a chunk spans the whole vocabulary, so `grad_hidden` of a chunk is one GEMM that accumulates over V inside
    cuBLAS: no fp32 [N, H] accumulator updated V / 32768 times, and the bias is folded into the GEMM (addmm);
  * with a frozen LM head (LoRA, or any head whose weight and bias need no gradient) the forward also computes the
    unit hidden gradient (onehot - softmax) @ W while the chunk is in memory, and the backward only scales it by
    the upstream gradient: 2 instead of 3 N x V x H GEMMs and no recomputation;
  * masked-out positions are never projected, on every device.

`logit_scale` (Cohere, Granite) and `softcap` (Gemma 2) are applied in fp32 inside the row kernels:
`logits = softcap * tanh((hidden @ W^T + bias) * logit_scale / softcap)`.

Determinism: no atomics; the default `chunk_size` is a function of V only, so the same inputs give bit-identical
outputs under `torch.no_grad` (reference precompute) and in training, whatever the batch composition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._utils import addmm_fp32_, mm_fp32_supported, resolve_backend
from .logps import (
    _check_softcap,
    token_logps_ref,
    torch_rows_backward,
    torch_rows_forward,
    triton_rows_backward_,
    triton_rows_forward,
)

__all__ = ["linear_token_logps", "linear_token_logps_ref", "LinearTokenLogpsFunction", "default_chunk_size"]

# Target logits per chunk: 2^27 16-bit logits = 256 MiB, the size of TRL's default tile
_CHUNK_LOGITS = 1 << 27


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: the power of two closest below 2^27 / V, clamped to [128, 4096]. Depends on V only."""
    target = max(1, _CHUNK_LOGITS // max(1, vocab_size))
    return min(4096, max(128, 1 << (target.bit_length() - 1)))


# ----------------------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------------------


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    # (C, H) @ (H, V) -> (C, V) into a reused buffer; the bias rides in the GEMM epilogue
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _row_gatherer(hidden: torch.Tensor):
    """idx (C,) of flat positions -> hidden rows (C, H), without copying all of a strided view like hidden[:, :-1]."""
    try:
        h2d = hidden.view(-1, hidden.shape[-1])
    except RuntimeError:
        return lambda idx: hidden[torch.unravel_index(idx, hidden.shape[:-1])]
    return lambda idx: h2d.index_select(0, idx)


def _rows_forward(tile, labels, backend, logit_scale, softcap):
    if backend == "triton":
        return triton_rows_forward(tile.unsqueeze(0), labels, None, logit_scale, softcap)
    return torch_rows_forward(tile, labels, logit_scale, softcap)


def _rows_backward_(tile, labels, lse, grad, backend, logit_scale, softcap) -> None:
    # tile (C, V) <- d(sum_c grad_c * logp_c) / d tile, in place
    if backend == "triton":
        triton_rows_backward_(tile.unsqueeze(0), labels, None, lse, grad, logit_scale, softcap)
    else:
        tile.copy_(torch_rows_backward(tile, labels, lse, grad, logit_scale, softcap))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # (C, V) @ (V, H) -> fp32 (C, H). Without an fp32-output GEMM for 16-bit inputs (CPU, torch < 2.8), round the
    # product once to the inputs' dtype rather than copy b, the whole LM head, to fp32
    if a.dtype != torch.float32 and mm_fp32_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


class LinearTokenLogpsFunction(torch.autograd.Function):
    """Fused LM head + per-token log-probs over the masked-in positions, `chunk_size` tokens at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, chunk_size, backend, logit_scale, softcap, eager_grad):
        device = hidden.device
        if torch.is_autocast_enabled(device.type):
            compute_dtype = torch.get_autocast_dtype(device.type)
        else:
            compute_dtype = hidden.dtype
        n_hidden, vocab = hidden.shape[-1], weight.shape[0]
        with torch.autocast(device.type, enabled=False):
            rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) masked-in positions only
            labels_act = labels.reshape(-1).index_select(0, rows).to(torch.long)
            gather = _row_gatherer(hidden)
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            n = rows.numel()
            logps = torch.empty(n, device=device, dtype=torch.float32)
            lse = torch.empty(n, device=device, dtype=torch.float32)
            grad_unit = torch.empty((n, n_hidden), device=device, dtype=torch.float32) if eager_grad else None
            buf = torch.empty((min(chunk_size, n), vocab), device=device, dtype=compute_dtype)  # (C, V)
            ones = torch.ones(min(chunk_size, n), device=device, dtype=torch.float32) if eager_grad else None
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h = gather(rows[start:end]).to(compute_dtype)  # (C, H)
                tile = _project(h, w, b, buf[: end - start])  # (C, V)
                lp, ls = _rows_forward(tile, labels_act[start:end], backend, logit_scale, softcap)
                logps[start:end], lse[start:end] = lp, ls
                if eager_grad:
                    # frozen head: d logp / d hidden = (onehot - softmax) @ W per token, scaled by g in backward
                    _rows_backward_(
                        tile, labels_act[start:end], lse[start:end], ones[: end - start], backend, logit_scale, softcap
                    )
                    grad_unit[start:end] = _mm_fp32(tile, w)
            out = torch.zeros(labels.numel(), device=device, dtype=torch.float32).index_copy_(0, rows, logps)
        ctx.save_for_backward(hidden, weight, bias, rows, labels_act, lse, grad_unit)
        ctx.compute_dtype, ctx.chunk_size, ctx.backend = compute_dtype, chunk_size, backend
        ctx.logit_scale, ctx.softcap = logit_scale, softcap
        return out.view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, rows, labels_act, lse, grad_unit = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        device, n_hidden, vocab = hidden.device, hidden.shape[-1], weight.shape[0]
        dt, chunk = ctx.compute_dtype, ctx.chunk_size
        with torch.autocast(device.type, enabled=False):
            g = grad_out.reshape(-1).index_select(0, rows).to(torch.float32)  # (N,) per-token upstream gradient
            grad_h = (
                torch.zeros((hidden.numel() // n_hidden, n_hidden), device=device, dtype=hidden.dtype)
                if need_h
                else None
            )
            if grad_unit is not None:
                if need_h:
                    grad_h.index_copy_(0, rows, (grad_unit * g.unsqueeze(1)).to(hidden.dtype))
                return (grad_h.view(hidden.shape) if need_h else None,) + (None,) * 9

            grad_w = torch.zeros((vocab, n_hidden), device=device, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros(vocab, device=device, dtype=torch.float32) if need_b else None
            if need_h or need_w or need_b:
                gather = _row_gatherer(hidden)
                w = weight.to(dt)
                b = bias.to(dt) if bias is not None else None
                n = rows.numel()
                buf = torch.empty((min(chunk, n), vocab), device=device, dtype=dt)
                for start in range(0, n, chunk):
                    end = min(start + chunk, n)
                    h = gather(rows[start:end]).to(dt)
                    tile = _project(h, w, b, buf[: end - start])  # same GEMM as the forward: same logits
                    _rows_backward_(
                        tile,
                        labels_act[start:end],
                        lse[start:end],
                        g[start:end],
                        ctx.backend,
                        ctx.logit_scale,
                        ctx.softcap,
                    )  # tile is now dlogp/dlogits (C, V)
                    if need_h:
                        grad_h.index_copy_(0, rows[start:end], torch.mm(tile, w).to(hidden.dtype))
                    if need_w:
                        addmm_fp32_(grad_w, tile.t(), h)
                    if need_b:
                        grad_b += tile.sum(0, dtype=torch.float32)
        return (
            grad_h.view(hidden.shape) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        ) + (None,) * 7


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    backend: str = "auto",
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token log-probs of `labels` under the LM head, without materialising the (B, T, V) logits.

    `logits = softcap * tanh((hidden @ weight.T + bias) * logit_scale / softcap)` (softcap optional), computed
    only at masked-in positions, `chunk_size` tokens at a time; the result is `log_softmax(logits)[labels]` in fp32,
    0 where `mask` is False.

    Args:
        hidden: (B, T, H) final hidden states, already shifted: position t scores `labels[b, t]`.
        weight: (V, H) LM-head weight. bias: optional (V,).
        labels: (B, T) integer ids; anything (e.g. -100) where `mask` is False.
        mask: (B, T) bool.
        chunk_size: tokens per chunk; logit memory is `chunk_size x V` in the compute dtype (default
            `default_chunk_size(V)`, a function of V only so results do not depend on the batch).
        backend: "triton", "torch" or "auto" (Triton on CUDA, torch elsewhere; FASTDPO_LOGPS_BACKEND overrides).
        logit_scale: multiplies the logits before the softcap (Cohere's `logit_scale`, Granite's
            `1 / logits_scaling`).
        softcap: Gemma-2's `final_logit_softcapping`; None disables it.

    The projection runs in `hidden.dtype` (or the autocast dtype), like `nn.Linear`; everything per token after
    it is fp32. Differentiable w.r.t. hidden, weight and bias; `grad_weight` and `grad_bias` are accumulated in
    fp32. When weight (and bias) need no gradient, the hidden gradient is computed during the forward (see the
    module docstring), which costs an (N, H) fp32 buffer until backward and saves the backward's recomputation.
    """
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) and weight (V, H) do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(
            f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must match hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if any(t.device != hidden.device for t in (weight, labels, mask) + ((bias,) if bias is not None else ())):
        raise ValueError("hidden, weight, bias, labels and mask must be on the same device")
    _check_softcap(softcap)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    backend = resolve_backend(backend, hidden.device)
    head_frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    eager_grad = torch.is_grad_enabled() and hidden.requires_grad and head_frozen
    return LinearTokenLogpsFunction.apply(
        hidden,
        weight,
        bias,
        labels,
        mask.to(torch.bool),
        int(chunk_size),
        backend,
        float(logit_scale),
        None if softcap is None else float(softcap),
        eager_grad,
    )


def linear_token_logps_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Eager reference: the full logits `F.linear(hidden, weight, bias)` (in the inputs' dtype, like `nn.Linear`),
    then scale, softcap and `token_logps_ref`. upcast=True does everything after the projection in fp32 (fp64
    stays fp64), upcast=False in the inputs' dtype."""
    logits = F.linear(hidden, weight, bias)
    if upcast and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return token_logps_ref(logits, labels, mask, upcast=upcast)
