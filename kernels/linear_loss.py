"""Fused LM head + preference loss: a loss of whole pairs' per-token log-probs under `hidden @ weight.T (+ bias)`,
with the head's gradients formed while each chunk's logits are in memory.

Why. `linear_token_logps` costs 4 N x V x H GEMMs when the head trains: the forward projection, and in backward
the recomputed projection, grad_hidden and grad_weight. The recomputation exists because a token's upstream
gradient is known only once the loss is. A preference loss needs only the per-token log-probs of whole pairs, so
if each chunk holds whole pairs, the chunk's loss and its gradient w.r.t. those log-probs can be formed while the
chunk's logits are still in memory, and grad_hidden and grad_weight accumulated right there (Liger-Kernel's
`LigerFusedLinearPreferenceBase` does the same, with a reference model run beside it; here the reference values
are inputs, read from the cache): 3 GEMMs, and backward only scales the stored gradients by the upstream one.

    for each chunk of whole pairs [p0, p1):                       # tokens [s, e), pair order
        tile   = hidden[s:e] @ W^T (+ b)                          # (C, V), GEMM 1, one reused buffer
        logp   = log_softmax(tile)[labels]                        # (C,) fp32, row kernels of logps.py
        out    = loss_fn(grids of logp, *pair_inputs[p0:p1])      # out[0]: the chunk's summed loss
        g      = d out[0] / d logp                                # (C,) autograd on the small loss graph
        tile   = g * (onehot - softmax)                           # in place: d loss / d logits
        grad_h[s:e] = tile @ W;  grad_W += tile^T @ hidden[s:e]   # GEMMs 2 and 3, fp32 accumulators

Layout of the scored tokens ("pair order"): pair 0's chosen tokens, pair 0's rejected tokens, pair 1's chosen,
and so on; `lengths[p] = (chosen tokens, rejected tokens)`. `pair_grids` turns such a flat vector into the (B, T)
grids a loss reads. The chunk size is a memory budget for the (C, V) tile (`loss_chunk_tokens`); a pair longer
than the budget gets a chunk of its own.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from ._utils import addmm_fp32_, resolve_backend
from .linear_logps import _mm_fp32, _project, _rows_backward_, _rows_forward
from .logps import _check_softcap

__all__ = ["linear_pair_loss", "LinearPairLossFunction", "loss_chunk_tokens", "pair_chunks", "pair_grids"]

# Bytes of one (C, V) logit tile: a memory budget, not a token count, so that the fp32 (V, H) grad_weight
# accumulator is read and written once per large chunk. FASTDPO_HEAD_CHUNK_MIB changes it.
_LOSS_TILE_BYTES = int(float(os.environ.get("FASTDPO_HEAD_CHUNK_MIB", "1024")) * 2**20)


def loss_chunk_tokens(vocab_size: int, element_size: int) -> int:
    """Token budget of one fused-loss chunk: the (C, V) logit tile fits `FASTDPO_HEAD_CHUNK_MIB` (1 GiB)."""
    return max(1, _LOSS_TILE_BYTES // max(1, vocab_size * element_size))


def pair_chunks(lengths: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Pair ranges [(p0, p1), ...] of at most `budget` tokens each (a longer pair gets a range of its own)."""
    chunks, start, used = [], 0, 0
    for p, (c, r) in enumerate(lengths):
        if used and used + c + r > budget:
            chunks.append((start, p))
            start, used = p, 0
        used += c + r
    if lengths:
        chunks.append((start, len(lengths)))
    return chunks


def pair_grids(values: torch.Tensor, lengths: list[tuple[int, int]]):
    """(S,) values in pair order -> chosen (B, Tc), chosen_mask, rejected (B, Tr), rejected_mask; 0 past each end.

    Differentiable w.r.t. `values` (the grids are filled by index_put)."""
    n = len(lengths)
    flat = [k for pair in lengths for k in pair]  # (2B,) tokens per sequence: c0, r0, c1, r1, ...
    seq = torch.repeat_interleave(torch.arange(2 * n), torch.tensor(flat, dtype=torch.long))  # (S,)
    starts = torch.tensor([0] + flat[:-1], dtype=torch.long).cumsum(0)
    pos = torch.arange(seq.numel()) - starts[seq]
    out = []
    for side in (0, 1):
        width = max((pair[side] for pair in lengths), default=0)
        pick = (seq % 2 == side).nonzero().squeeze(1)
        rows, cols = (seq[pick] // 2).to(values.device), pos[pick].to(values.device)
        grid = values.new_zeros((n, width)).index_put((rows, cols), values[pick.to(values.device)])
        mask = torch.zeros((n, width), dtype=torch.bool, device=values.device).index_put_(
            (rows, cols), torch.ones((), dtype=torch.bool, device=values.device))
        out += [grid, mask]
    return tuple(out)


class LinearPairLossFunction(torch.autograd.Function):
    """A loss of whole pairs' per-token log-probs through the LM head; gradients formed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, lengths, loss_fn, pair_inputs, chunks, backend, logit_scale,
                softcap):
        # hidden (S, H), labels (S,) in pair order; chunks: pair ranges of `pair_chunks`
        device = hidden.device
        dt = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        n_tokens, n_hidden, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
        ends = torch.tensor([c + r for c, r in lengths], dtype=torch.long).cumsum(0).tolist()
        edges = [0] + ends  # token offset of each pair
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dt)
            b = bias.to(dt) if bias is not None else None
            logps = torch.empty(n_tokens, device=device, dtype=torch.float32)
            # fp32 until backward scales it by the upstream gradient: one rounding to hidden's dtype, not two
            grad_h = torch.empty((n_tokens, n_hidden), device=device, dtype=torch.float32) if need_h else None
            grad_w = torch.zeros((vocab, n_hidden), device=device, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros(vocab, device=device, dtype=torch.float32) if need_b else None
            buf = torch.empty((max(edges[p1] - edges[p0] for p0, p1 in chunks), vocab), device=device, dtype=dt)
            loss, per_pair = torch.zeros((), device=device, dtype=torch.float32), []
            for p0, p1 in chunks:
                s, e = edges[p0], edges[p1]
                h = hidden[s:e].to(dt)  # (C, H)
                tile = _project(h, w, b, buf[: e - s])  # (C, V): GEMM 1
                lp, lse = _rows_forward(tile, labels[s:e], backend, logit_scale, softcap)
                logps[s:e] = lp
                with torch.enable_grad():  # forward runs without grad; the loss's own gradient needs it
                    lp_ = lp.detach().requires_grad_()
                    inputs = [None if x is None else x[p0:p1] for x in pair_inputs]
                    out = loss_fn(*pair_grids(lp_, lengths[p0:p1]), *inputs)  # (chunk loss, per-pair values...)
                    (g,) = torch.autograd.grad(out[0], lp_)
                loss += out[0].detach()
                per_pair.append([v.detach() for v in out[1:]])
                _rows_backward_(tile, labels[s:e], lse, g.float(), backend, logit_scale, softcap)  # tile: dL/dlogits
                if need_h:
                    grad_h[s:e] = _mm_fp32(tile, w)  # GEMM 2
                if need_w:
                    addmm_fp32_(grad_w, tile.t(), h)  # GEMM 3, accumulated in fp32
                if need_b:
                    grad_b += tile.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        outs = [torch.cat(column) for column in zip(*per_pair)]
        ctx.mark_non_differentiable(logps, *outs)
        return (loss, logps, *outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss.float()
        return (
            (grad_h * scale).to(ctx.dtypes[0]) if grad_h is not None else None,
            (grad_w * scale).to(ctx.dtypes[1]) if grad_w is not None else None,
            (grad_b * scale).to(ctx.dtypes[2]) if grad_b is not None else None,
        ) + (None,) * 8


def linear_pair_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lengths: list[tuple[int, int]],
    loss_fn,
    pair_inputs: tuple = (),
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """A preference loss of per-token log-probs under the LM head, the head's gradients formed chunk by chunk.

    Args:
        hidden: (S, H) hidden states of the scored tokens, in pair order (see the module docstring).
        weight: (V, H) LM-head weight. bias: optional (V,).
        labels: (S,) the scored tokens' ids.
        lengths: per pair, (chosen tokens, rejected tokens); they sum to S.
        loss_fn: `loss_fn(chosen, chosen_mask, rejected, rejected_mask, *inputs)` -> (summed loss of those pairs,
            *per-pair values (b,)): per-token fp32 log-probs as (b, T) grids (`pair_grids`), and `inputs` the
            `pair_inputs` sliced to the chunk's pairs (None stays None).
        pair_inputs: per-pair tensors (B, ...) the loss reads: reference log-probs, normalisers.
        logit_scale, softcap: `logits = softcap * tanh((hidden @ W^T + b) * logit_scale / softcap)`.
        chunk_tokens: tokens per chunk of whole pairs (default `loss_chunk_tokens(V, itemsize)`, a memory budget).
        backend: "triton", "torch" or "auto" (Triton on CUDA, torch elsewhere).

    Returns (loss, logps, *per-pair values): the summed loss, differentiable w.r.t. hidden, weight and bias; the
    (S,) fp32 log-probs and the loss function's per-pair values over all pairs, detached. Values equal
    `linear_token_logps` followed by `loss_fn` on the whole batch; the head's gradient costs 3 N x V x H GEMMs
    instead of 4, and grad_weight is accumulated in fp32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (S, H) and weight (V, H) do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}")
    lengths = [(int(c), int(r)) for c, r in lengths]
    if tuple(labels.shape) != (hidden.shape[0],) or sum(c + r for c, r in lengths) != hidden.shape[0]:
        raise ValueError(f"labels must be (S,) = ({hidden.shape[0]},) and the pair lengths must sum to S, got "
                         f"{tuple(labels.shape)} and {sum(c + r for c, r in lengths)}")
    if not lengths:
        raise ValueError("no pairs: lengths is empty")
    _check_softcap(softcap)
    if chunk_tokens is None:
        chunk_tokens = loss_chunk_tokens(weight.shape[0], hidden.element_size())
    backend = resolve_backend(backend, hidden.device)
    return LinearPairLossFunction.apply(hidden, weight, bias, labels.to(torch.long), lengths, loss_fn,
                                        tuple(pair_inputs), pair_chunks(lengths, chunk_tokens), backend,
                                        float(logit_scale), None if softcap is None else float(softcap))
