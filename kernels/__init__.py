"""Fused log-prob kernels for DPO (imported as `fastdpo.kernels`).

- `token_logps(logits, labels, mask)` -> (B, T) fp32 per-token log-probs, 0 where masked.
- `sequence_logps(logits, labels, mask)` -> (B,) fp32 masked sums.
- `linear_token_logps(hidden, weight, labels, mask, ...)` -> (B, T): the LM head fused in, logits never built.
- `linear_pair_loss(hidden, weight, labels, lengths, loss_fn, pair_inputs, ...)` -> (loss, logps, *per-pair
  values): a preference loss of whole pairs' log-probs, `loss_fn` an explicit input, with the head's gradients
  formed in the forward's chunk loop (3 GEMMs instead of 4 when the head trains).

Each takes `backend="auto" | "triton" | "torch"`. The backward of `token_logps` / `sequence_logps` overwrites the
logits buffer with its gradient. `*_ref` are the eager PyTorch references. Triton is optional: without it (e.g.
macOS) the torch backend still works.
"""

from ._utils import ENV_BACKEND, HAS_TRITON
from .linear_logps import LinearTokenLogpsFunction, default_chunk_size, linear_token_logps, linear_token_logps_ref
from .linear_loss import LinearPairLossFunction, linear_pair_loss, loss_chunk_tokens, pair_chunks, pair_grids
from .logps import TokenLogpsFunction, sequence_logps, sequence_logps_ref, token_logps, token_logps_ref

__all__ = [
    "ENV_BACKEND",
    "HAS_TRITON",
    "LinearTokenLogpsFunction",
    "LinearPairLossFunction",
    "TokenLogpsFunction",
    "default_chunk_size",
    "linear_token_logps",
    "linear_token_logps_ref",
    "linear_pair_loss",
    "loss_chunk_tokens",
    "pair_chunks",
    "pair_grids",
    "sequence_logps",
    "sequence_logps_ref",
    "token_logps",
    "token_logps_ref",
]
