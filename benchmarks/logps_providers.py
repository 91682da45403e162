"""The providers of benchmarks/bench_logps.py (its docstring lists them) and the inputs they share.

Each provider's `forward` returns the (B,) per-sequence log-prob sums (or a scalar loss) from inputs made once per
workload on the device; `available` says why a provider is skipped (a peer not installed, no CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fastdpo.kernels import (
    HAS_TRITON,
    linear_pair_loss,
    linear_token_logps,
    sequence_logps,
    sequence_logps_ref,
)

# The Triton interpreter runs a few hundred thousand logits per second: refuse anything bigger
INTERPRETER_MAX_LOGITS = 1 << 21


# ----------------------------------------------------------------------------------------------------------------
# inputs: made once per (case, workload) on the device, shared by the providers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    vocab: int
    tokens: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    seq_len: int

    @property
    def shape(self) -> tuple[int, int]:
        b = max(1, self.tokens // self.seq_len)
        return b, self.tokens // b


def make_inputs(case: Case, workload: str) -> dict:
    """The workload's tensors, generated where they are used (no host copy of N x V values) by a seeded generator."""
    g = torch.Generator(device=case.device).manual_seed(0)
    b, t = case.shape
    dev = case.device
    data = {
        "labels": torch.randint(0, case.vocab, (b, t), generator=g, device=dev),
        "mask": torch.ones(b, t, dtype=torch.bool, device=dev),
        "upstream": torch.randn(b, generator=g, device=dev),
    }  # per-sequence weights, as DPO gives
    if workload in ("logits", "copy"):
        data["logits"] = torch.randn(b, t, case.vocab, generator=g, device=dev, dtype=case.dtype).mul_(3)
    else:
        data["hidden"] = torch.randn(b, t, case.hidden, generator=g, device=dev, dtype=case.dtype)
        data["weight"] = torch.randn(case.vocab, case.hidden, generator=g, device=dev, dtype=case.dtype)
        data["weight"].mul_(case.hidden**-0.5)
    return data


# ----------------------------------------------------------------------------------------------------------------
# providers: each returns the (B,) per-sequence log-prob sums (or a scalar loss) from shared inputs
# ----------------------------------------------------------------------------------------------------------------


class Provider:
    name = ""
    workload = "logits"
    frozen = False  # head workload: an LM head without gradient (LoRA), only hidden gets one
    mutates = False  # its backward overwrites its input logits: a fresh copy each repetition

    def available(self, case: Case) -> str | None:
        """None when runnable, else the reason it is skipped."""
        return None

    def inputs(self, data):
        """Untimed, per repetition: the leaves autograd differentiates (views of the shared inputs)."""
        if self.workload == "logits":
            logits = data["logits"].clone() if self.mutates else data["logits"].detach()
            return [logits.requires_grad_()]
        hidden = data["hidden"].detach().requires_grad_()
        return [hidden] if self.frozen else [hidden, data["weight"].detach().requires_grad_()]

    def head(self, data, leaves):
        """(hidden, weight) for the head workload; the weight is a leaf unless the head is frozen."""
        return leaves[0], data["weight"] if self.frozen else leaves[1]

    def forward(self, data, leaves) -> torch.Tensor:
        raise NotImplementedError


class Copy(Provider):
    """Not a provider of log-probs: a device-to-device copy of the logits, the bandwidth reference."""

    name = "copy"
    workload = "copy"


class Eager(Provider):
    name = "eager"

    def forward(self, data, leaves):
        return sequence_logps_ref(leaves[0], data["labels"], data["mask"])


class Compiled(Provider):
    name = "compile"

    def __init__(self):
        self.fn = None

    def forward(self, data, leaves):
        if self.fn is None:
            self.fn = torch.compile(sequence_logps_ref, dynamic=False)
        return self.fn(leaves[0], data["labels"], data["mask"])


def _triton_reason(case: Case, logits: int) -> str | None:
    if not HAS_TRITON:
        return "triton not installed"
    if case.device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "needs CUDA or TRITON_INTERPRET=1"
    if logits > INTERPRETER_MAX_LOGITS:
        return f"too big for the Triton interpreter (> {INTERPRETER_MAX_LOGITS} logits)"
    return None


class FastdpoTriton(Provider):
    name = "fastdpo-triton"
    mutates = True  # its backward writes the gradient into the logits buffer

    def available(self, case):
        return _triton_reason(case, case.tokens * case.vocab)

    def forward(self, data, leaves):
        return sequence_logps(leaves[0], data["labels"], data["mask"], "triton")


class ChunkedTorch(Provider):
    name = "chunked-torch"

    def forward(self, data, leaves):
        return sequence_logps(leaves[0], data["labels"], data["mask"], "torch")


class LigerCE(Provider):
    name = "liger-ce"

    def available(self, case):
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception:  # noqa: BLE001 - any import failure means "not installed" here
            return "liger-kernel not installed"
        return None if case.device.type == "cuda" else "Liger needs CUDA"

    def forward(self, data, leaves):
        from liger_kernel.transformers import LigerCrossEntropyLoss

        logits, labels, mask = leaves[0], data["labels"], data["mask"]
        targets = labels.masked_fill(~mask, -100).reshape(-1)
        # Total log-prob (reduction="sum"): Liger precomputes its gradient for a scalar loss, so no per-row weights
        loss = LigerCrossEntropyLoss(ignore_index=-100, reduction="sum")(logits.reshape(-1, logits.shape[-1]), targets)
        return -loss.reshape(1)


class FastdpoLinear(Provider):
    name = "fastdpo-linear"
    workload = "head"  # backend "auto": Triton on CUDA, the torch backend on CPU

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        return linear_token_logps(h, w, data["labels"], data["mask"]).sum(-1)


class EagerHead(Provider):
    name = "eager-head"
    workload = "head"

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        return sequence_logps_ref(F.linear(h, w), data["labels"], data["mask"])


class CompiledHead(Provider):
    name = "compile-head"
    workload = "head"

    def __init__(self):
        self.fn = None

    def forward(self, data, leaves):
        if self.fn is None:
            self.fn = torch.compile(
                lambda h, w, labels, mask: sequence_logps_ref(F.linear(h, w), labels, mask), dynamic=False
            )
        h, w = self.head(data, leaves)
        return self.fn(h, w, data["labels"], data["mask"])


def _peer_reason(case: Case, module: str, package: str) -> str | None:
    """A fused cross-entropy made for this (Triton kernels): skipped when not installed or without CUDA (the
    interpreter, on tiny shapes, lets a CPU run check the call)."""
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return f"{package} not installed"
    return _triton_reason(case, case.tokens * case.vocab)


class LigerLinear(Provider):
    name = "liger-linear"
    workload = "head"

    def available(self, case):
        return _peer_reason(case, "liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel")

    def forward(self, data, leaves):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        h, w = self.head(data, leaves)
        labels, mask = data["labels"], data["mask"]
        targets = labels.masked_fill(~mask, -100).reshape(-1)
        # per-token losses (Liger then computes its gradient in the backward, with the per-row weights)
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="none")(
            w, h.reshape(-1, h.shape[-1]), targets
        )
        return -loss.reshape(labels.shape).sum(-1)


class LigerLinearSum(LigerLinear):
    """Liger's fused linear cross-entropy with reduction="sum": its gradient is made in the forward (3 GEMMs), like
    fastdpo-linear-loss; a scalar loss, so the harness weights it by one upstream value."""

    name = "liger-linear-sum"

    def forward(self, data, leaves):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        h, w = self.head(data, leaves)
        targets = data["labels"].masked_fill(~data["mask"], -100).reshape(-1)
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")(
            w, h.reshape(-1, h.shape[-1]), targets
        )
        return -loss.reshape(1)


class CceLinear(Provider):
    """Cut Cross-Entropy, exact (filter_eps=None): every logit's gradient computed, as fastdpo and Liger do."""

    name = "cce-linear"
    workload = "head"
    filter_eps = None

    def available(self, case):
        reason = _peer_reason(case, "cut_cross_entropy", "cut-cross-entropy")
        if reason is None and case.device.type != "cuda":
            return "CCE needs CUDA (its kernels fail on Triton's interpreter)"
        return reason

    def forward(self, data, leaves):
        from cut_cross_entropy import linear_cross_entropy

        h, w = self.head(data, leaves)
        labels, mask = data["labels"], data["mask"]
        kw = {} if self.filter_eps == "default" else {"filter_eps": self.filter_eps}
        loss = linear_cross_entropy(h, w, labels.masked_fill(~mask, -100), reduction="none", **kw)
        return -loss.reshape(labels.shape).sum(-1)


class CceLinearFiltered(CceLinear):
    """CCE with its default gradient filter: the backward skips logits whose probability is under a bf16 threshold
    (on std-1 random logits over 152k tokens, nearly all of them), so it is faster than exact and not comparable."""

    name = "cce-linear-filtered"
    filter_eps = "default"


class TritonHead(Provider):
    name = "triton-head"
    workload = "head"

    def available(self, case):
        return _triton_reason(case, case.tokens * case.vocab)

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        return sequence_logps(F.linear(h, w), data["labels"], data["mask"], "triton")


class TrlHead(Provider):
    name = "trl-head"
    workload = "head"

    def available(self, case):
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: F401
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"trl fused head unavailable ({type(e).__name__})"
        return None

    def forward(self, data, leaves):
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        h, w = self.head(data, leaves)
        labels, mask = data["labels"], data["mask"]
        # As TRL's add_fused_lm_head does on Triton devices: score the completion positions only
        logps, *_ = ChunkedLogProbFunction.apply(
            h[mask], w, None, labels[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
        )
        return logps.new_zeros(mask.shape).masked_scatter(mask, logps).sum(-1)


class FastdpoLinearLoss(Provider):
    """The loss formed inside the head (`linear_pair_loss`, each sequence a pair with no rejected side): a chunk's
    gradient is known while its logits are in memory, so forward + backward cost 3 GEMMs (all in the forward)
    instead of 4. Times are meaningful in `full` mode only. The loss is sum_b upstream_b * logp_b, returned divided
    by upstream_0 so that the harness's weighting (out * upstream[:1]) gives it back: the same gradient as every
    other provider."""

    name = "fastdpo-linear-loss"
    workload = "head"

    @staticmethod
    def weighted_sum(chosen, chosen_mask, rejected, rejected_mask, up):  # (b, t) log-probs, (b,) weights
        return ((up.float()[:, None] * chosen).sum(),)

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        b, t = data["labels"].shape
        loss, _ = linear_pair_loss(h.reshape(b * t, -1), w, data["labels"].reshape(-1), [(t, 0)] * b,
                                   self.weighted_sum, (data["upstream"],))
        return (loss / data["upstream"][0]).reshape(1)


class FastdpoLinearFrozen(FastdpoLinear):
    name = "fastdpo-linear-frozen"
    frozen = True  # the hidden gradient is computed in the forward: no recomputation in backward


class TrlHeadFrozen(TrlHead):
    name = "trl-head-frozen"
    frozen = True


PROVIDERS = {
    p.name: p
    for p in (
        Copy,
        FastdpoTriton,
        FastdpoLinear,
        FastdpoLinearLoss,
        Eager,
        Compiled,
        ChunkedTorch,
        TrlHead,
        LigerCE,
        EagerHead,
        CompiledHead,
        TritonHead,
        FastdpoLinearFrozen,
        TrlHeadFrozen,
        LigerLinear,
        LigerLinearSum,
        CceLinear,
        CceLinearFiltered,
    )
}
