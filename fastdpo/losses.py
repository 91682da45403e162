"""Preference losses on sequence log-probabilities (DPO and friends).

Every loss takes the policy's and (for most) the reference's log-probabilities of the chosen and
rejected completions, each summed over completion tokens, shape (B,). ``preference_loss`` returns
per-pair losses (B,); the trainer averages them. Definitions follow TRL 1.16's ``DPOTrainer`` (and
``CPOTrainer`` for ``simpo``) where TRL has the same name; the deliberate differences are listed
below. Notation: ``c = pi_c - ref_c`` and ``r = pi_r - ref_r`` are the chosen and rejected
log-ratios, ``z = c - r`` (TRL's ``delta_score`` for the reverse-KL divergence), ``b`` is beta,
``eps`` is label_smoothing, ``len_c``/``len_r`` are completion token counts (clamped to >= 1),
``logsig`` is log-sigmoid and ``sig`` the sigmoid.

=================  ==========================================================================  =========
name               per-pair loss                                                               reference
=================  ==========================================================================  =========
``sigmoid``        -(1-eps)*logsig(b*z) - eps*logsig(-b*z)   (DPO; cDPO when eps > 0)          yes
``ipo``            (c/len_c - r/len_r - 1/(2b))^2                                              yes
``hinge``          relu(1 - b*z)                                                               yes
``robust``         (-(1-eps)*logsig(b*z) + eps*logsig(-b*z)) / (1 - 2*eps)                     yes
``exo_pair``       KL(softmax over {c, r} of b*logratio || [1-eps, eps])                       yes
``nca_pair``       -logsig(b*c) - logsig(-b*c)/2 - logsig(-b*r)/2                              yes
``bco_pair``       -logsig(b*c) - logsig(-b*r)                                                 yes
``sppo_hard``      (c - 1/(2b))^2 + (r + 1/(2b))^2                                             yes
``apo_zero``       sig(-b*c) + sig(b*r)                                                        yes
``apo_down``       sig(b*c) + sig(-b*z)                                                        yes
``discopop``       -logsig(b*z)*sig(-b*z/tau) + exp(-b*z)*sig(b*z/tau)                         yes
``aot``            cDPO on sort(pi_c - pi_r) - sort(ref_c - ref_r)   (batch-sorted)            yes
``aot_unpaired``   cDPO on sort(c) - sort(r)                         (batch-sorted)            yes
``sigmoid_norm``   -logsig(b*(c/len_c - r/len_r))                                              yes
``simpo``          cDPO on b*(pi_c/len_c - pi_r/len_r - gamma/b)                               no
``sft``            -pi_c * B / N_tok   (mean over the batch = token-mean NLL of chosen)        no
=================  ==========================================================================  =========

Mixtures: ``loss_type="sigmoid,sft"`` with ``loss_weights=[1.0, 0.2]`` (RPO) gives the per-pair loss
``sum_k w_k * loss_k``, so its mean equals TRL's ``sum_k w_k * mean(loss_k)``.

Differences from TRL 1.16, all deliberate:

* ``sigmoid`` honours ``label_smoothing`` (conservative DPO); TRL 1.16 ignores it. Identical at eps = 0.
* ``sft`` returns per-pair values ``-pi_c * B / N_tok`` instead of TRL's scalar broadcast to (B,); the
  mean is the same and ``N_tok`` can be the token count of a whole gradient-accumulation step.
* Numerics: every loss and its gradient stay finite for log-ratios of +-1e4 in fp32. Formulas are
  rewritten in log space where TRL's literal form overflows (``discopop``) and ``1 - sig(x)`` is
  written ``sig(-x)``; these are mathematically identical wherever TRL's form is finite.
* Inputs in half precision are upcast to fp32 (fp64 stays fp64); the outputs use that dtype.
* ``aot``/``aot_unpaired``: like TRL, the i-th returned loss belongs to the i-th *rank*, not pair i.
* ``validate_loss_config`` raises where TRL only warns (robust with eps outside [0, 0.5)) and adds checks
  TRL lacks (see its docstring).
* With LD-DPO, TRL's ``sft`` term still uses the plain (un-weighted) token sum; here every component sees
  the ``policy_chosen_logps`` it is given. To match TRL, compute the ``sft`` component in a second call
  with the plain sums (``ld_logps(..., alpha=None)``).

Normalisers: ``sft``'s ``N_tok`` is ``sft_num_tokens`` (default ``sum(chosen_lengths)``), so the mean of the
returned sft losses is ``-sum(pi_c) / N_tok``. Pass the chosen-token count of the whole accumulated batch
and *sum* micro-batch means to get the token-mean NLL of the accumulated batch (a trainer that averages
micro-batch losses over G accumulation steps should pass that count / G).

Rewards (for metrics only; always detached): ``b * (pi - ref)`` whenever some component uses the
reference (TRL DPOTrainer's ``rewards/*``); otherwise ``b * pi/len`` if ``simpo`` is a component
(TRL CPOTrainer with SimPO); otherwise (pure ``sft``) ``b * (pi - ref)`` if the reference is given
(as TRL DPOTrainer logs) and ``b * pi`` if not (TRL CPOTrainer).

LD-DPO (``ld_logps``) is a separate helper that turns per-token log-probs into sequence log-probs
before they reach ``preference_loss``.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BATCH_COUPLED",
    "LENGTH_NORMALISED",
    "LOSS_TYPES",
    "REFERENCE_FREE",
    "ld_logps",
    "needs_reference",
    "parse_loss_types",
    "preference_loss",
    "validate_loss_config",
]

REFERENCE_FREE = frozenset({"simpo", "sft"})
# Losses that divide by completion length; sft needs a token count (lengths or sft_num_tokens).
LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm", "simpo"})
# Losses whose per-pair values depend on the other pairs of the call (they sort across the batch).
BATCH_COUPLED = frozenset({"aot", "aot_unpaired"})
# Losses that read label_smoothing; the others ignore it.
_USES_LABEL_SMOOTHING = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"})


@dataclass
class _Batch:
    """Inputs of one call, already cast to the compute dtype."""

    pi_c: Tensor
    pi_r: Tensor
    ref_c: Tensor | None
    ref_r: Tensor | None
    len_c: Tensor | None  # clamped to >= 1
    len_r: Tensor | None
    beta: float
    eps: float
    gamma: float
    tau: float
    sft_num_tokens: Tensor | None

    @property
    def c(self) -> Tensor:  # chosen log-ratio
        return self.pi_c - self.ref_c

    @property
    def r(self) -> Tensor:  # rejected log-ratio
        return self.pi_r - self.ref_r


def _cdpo(x: Tensor, eps: float) -> Tensor:
    """-(1-eps)*logsig(x) - eps*logsig(-x): logistic loss on x with label smoothing eps."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _sigmoid(b: _Batch) -> Tensor:
    """DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 (Eq. 7), with conservative-DPO label
    smoothing (Mitchell 2023, "A note on DPO with noisy preferences", https://ericmitchell.ai/cdpo.pdf):

    -(1-eps) * logsig(b*z) - eps * logsig(-b*z)

    TRL 1.16's ``sigmoid`` ignores label_smoothing; at eps = 0 both are -logsig(b*z).
    """
    return _cdpo(b.beta * (b.c - b.r), b.eps)


def _ipo(b: _Batch) -> Tensor:
    """IPO, Azar et al. 2023, https://arxiv.org/abs/2310.12036 (Eq. 17), beta playing tau:

    (c/len_c - r/len_r - 1/(2b))^2

    Log-ratios are averaged per completion token, as TRL does (confirmed with the IPO authors).
    """
    delta = b.c / b.len_c - b.r / b.len_r
    return (delta - 1 / (2 * b.beta)) ** 2


def _hinge(b: _Batch) -> Tensor:
    """Hinge loss of SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425: relu(1 - b*z)."""
    return torch.relu(1 - b.beta * (b.c - b.r))


def _robust(b: _Batch) -> Tensor:
    """Robust DPO, Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409 (Eq. 8), eps = flip rate in [0, 0.5):

    (-(1-eps) * logsig(b*z) + eps * logsig(-b*z)) / (1 - 2*eps)
    """
    x = b.beta * (b.c - b.r)
    return (-(1 - b.eps) * F.logsigmoid(x) + b.eps * F.logsigmoid(-x)) / (1 - 2 * b.eps)


def _exo_pair(b: _Batch) -> Tensor:
    """EXO-pref, Ji et al. 2024, https://arxiv.org/abs/2402.00856 (Eq. 16), pairwise (K = 2) form:

    sig(b*z) * (logsig(b*z) - log(1-eps)) + sig(-b*z) * (logsig(-b*z) - log(eps))

    i.e. KL(q || p) with q = softmax over {chosen, rejected} of b*logratio and p = [1-eps, eps]; needs eps > 0.
    """
    x = b.beta * (b.c - b.r)
    log_pw, log_pl = math.log1p(-b.eps), math.log(b.eps)
    return torch.sigmoid(x) * (F.logsigmoid(x) - log_pw) + torch.sigmoid(-x) * (F.logsigmoid(-x) - log_pl)


def _nca_pair(b: _Batch) -> Tensor:
    """NCA, Chen et al. 2024, "Noise Contrastive Alignment", https://arxiv.org/abs/2402.05369, pairwise form:

    -logsig(b*c) - 0.5*logsig(-b*c) - 0.5*logsig(-b*r)
    """
    xc, xr = b.beta * b.c, b.beta * b.r
    return -F.logsigmoid(xc) - 0.5 * F.logsigmoid(-xc) - 0.5 * F.logsigmoid(-xr)


def _bco_pair(b: _Batch) -> Tensor:
    """BCO, Jung et al. 2024, https://arxiv.org/abs/2404.04656, TRL's pairwise form without the reward shift:

    -logsig(b*c) - logsig(-b*r)
    """
    return -F.logsigmoid(b.beta * b.c) - F.logsigmoid(-b.beta * b.r)


def _sppo_hard(b: _Batch) -> Tensor:
    """SPPO with hard probabilities (P = 1 for the winner), Wu et al. 2024, https://arxiv.org/abs/2405.00675
    (Eq. 4.7 / Algorithm 1):

    (c - 1/(2b))^2 + (r + 1/(2b))^2
    """
    return (b.c - 0.5 / b.beta) ** 2 + (b.r + 0.5 / b.beta) ** 2


def _aot(b: _Batch) -> Tensor:
    """AOT (paired), Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    https://arxiv.org/abs/2406.05882. Sorts across the batch, then cDPO on the sorted difference:

    d = sort(pi_c - pi_r) - sort(ref_c - ref_r);  -(1-eps)*logsig(b*d) - eps*logsig(-b*d)

    The i-th value belongs to the i-th rank, not to pair i. With B = 1 this is ``sigmoid``.
    """
    d = torch.sort(b.pi_c - b.pi_r, dim=0).values - torch.sort(b.ref_c - b.ref_r, dim=0).values
    return _cdpo(b.beta * d, b.eps)


def _aot_unpaired(b: _Batch) -> Tensor:
    """AOT (unpaired), Melnyk et al. 2024, https://arxiv.org/abs/2406.05882:

    d = sort(c) - sort(r);  -(1-eps)*logsig(b*d) - eps*logsig(-b*d)
    """
    d = torch.sort(b.c, dim=0).values - torch.sort(b.r, dim=0).values
    return _cdpo(b.beta * d, b.eps)


def _apo_zero(b: _Batch) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266 (Eq. 7):

    (1 - sig(b*c)) + sig(b*r)      computed as sig(-b*c) + sig(b*r)
    """
    return torch.sigmoid(-b.beta * b.c) + torch.sigmoid(b.beta * b.r)


def _apo_down(b: _Batch) -> Tensor:
    """APO-down, D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266 (Eq. 8):

    sig(b*c) + (1 - sig(b*z))      computed as sig(b*c) + sig(-b*z)
    """
    return torch.sigmoid(b.beta * b.c) + torch.sigmoid(-b.beta * (b.c - b.r))


def _discopop(b: _Batch) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024, https://arxiv.org/abs/2406.08414 (Eq. 5), x = b*z:

    -logsig(x) * (1 - sig(x/tau)) + exp(-x) * sig(x/tau)

    computed as -logsig(x)*sig(-x/tau) + exp(-x + logsig(x/tau)). TRL's literal exp(-x) overflows for
    x < -88 (fp32) and gives inf*0 = nan although the product tends to 0 for tau < 1. The exponent is
    clamped at log(finfo.max) - 2, which only matters when the true term exceeds ~4e37 (tau > 1 and
    very negative x).
    """
    x = b.beta * (b.c - b.r)
    max_exp = math.log(torch.finfo(x.dtype).max) - 2.0
    logistic = -F.logsigmoid(x) * torch.sigmoid(-x / b.tau)
    exponential = torch.exp(torch.clamp(-x + F.logsigmoid(x / b.tau), max=max_exp))
    return logistic + exponential


def _sigmoid_norm(b: _Batch) -> Tensor:
    """Length-normalised DPO (as in TRL; used by Tulu 3, Lambert et al. 2024, https://arxiv.org/abs/2411.15124):

    -logsig(b * (c/len_c - r/len_r))

    No label smoothing, as in TRL.
    """
    return -F.logsigmoid(b.beta * (b.c / b.len_c - b.r / b.len_r))


def _simpo(b: _Batch) -> Tensor:
    """SimPO, Meng et al. 2024, https://arxiv.org/abs/2405.14734 (Eq. 6), reference-free, as TRL's CPOTrainer
    (loss_type="simpo", alpha = 0) with label smoothing:

    logits = pi_c/len_c - pi_r/len_r - gamma/b;  -(1-eps)*logsig(b*logits) - eps*logsig(-b*logits)
    """
    logits = b.pi_c / b.len_c - b.pi_r / b.len_r - b.gamma / b.beta
    return _cdpo(b.beta * logits, b.eps)


def _sft(b: _Batch) -> Tensor:
    """NLL of the chosen completion (the "sft" term of RPO, Pang et al. 2024, https://arxiv.org/abs/2404.19733,
    and MPO, Wang et al. 2024, https://arxiv.org/abs/2411.10442):

    -pi_c * B / N_tok,   N_tok = sft_num_tokens if given, else sum(len_c)

    The mean over the B pairs is -sum(pi_c) / N_tok, TRL's mean NLL over all chosen tokens of the batch.
    """
    n_tok = b.sft_num_tokens if b.sft_num_tokens is not None else b.len_c.sum()
    return -b.pi_c * (b.pi_c.shape[0] / n_tok.clamp(min=1))


_LOSS_FNS = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
    "hinge": _hinge,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "sigmoid_norm": _sigmoid_norm,
    "simpo": _simpo,
    "sft": _sft,
}
LOSS_TYPES: tuple[str, ...] = tuple(_LOSS_FNS)


def parse_loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """``"sigmoid, sft"``, ``["sigmoid", "sft"]`` -> ``("sigmoid", "sft")``. Does not check the names."""
    parts = loss_type.split(",") if isinstance(loss_type, str) else [p for item in loss_type for p in item.split(",")]
    return tuple(p.strip() for p in parts if p.strip())


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    """True iff some component of the mixture is not reference-free."""
    return any(name not in REFERENCE_FREE for name in parse_loss_types(loss_type))


def validate_loss_config(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    has_reference: bool = True,
    has_lengths: bool = True,
    has_sft_num_tokens: bool = False,
    batch_size: int | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    ld_alpha: float | None = None,
) -> tuple[str, ...]:
    """Check a loss configuration; return the parsed loss names.

    Raises ``ValueError`` with a one-line, user-facing message (the CLI exits 2). The rules are TRL's
    (weights length, robust needs 0 <= eps < 0.5, exo_pair needs eps > 0, ld_alpha in [0, 1]) plus: beta
    finite and > 0, weights finite and >= 0, 0 <= eps < 1, discopop_tau > 0, simpo_gamma finite, lengths
    for length-normalised losses, a reference for reference-based losses, and (when ``batch_size`` is
    given) at least 2 pairs per micro-batch for aot/aot_unpaired, which sort across the batch and
    silently reduce to ``sigmoid`` with 1 pair (TRL has no such check). ``has_lengths``: per-pair
    completion lengths are available; ``has_sft_num_tokens``: the caller passes ``sft_num_tokens``.
    Warns (does not raise) when label_smoothing > 0 but no component reads it.
    """
    names = _check_config(
        loss_type, loss_weights, beta, label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau
    )
    aot = [n for n in names if n in ("aot", "aot_unpaired")]
    if aot and batch_size is not None and batch_size < 2:
        raise ValueError(
            f"loss type {aot[0]} sorts pairs across the micro-batch and needs at least 2 pairs per micro-batch, "
            f"got {batch_size}"
        )
    missing = sorted({n for n in names if n in LENGTH_NORMALISED})
    if not has_lengths and "sft" in names and not has_sft_num_tokens:
        missing.append("sft")
    if not has_lengths and missing:
        raise ValueError(f"loss type(s) {', '.join(missing)} need completion lengths, which were not provided")
    if not has_reference and needs_reference(names):
        ref_based = [n for n in names if n not in REFERENCE_FREE]
        raise ValueError(
            f"loss type(s) {', '.join(ref_based)} need reference log-probs, which were not provided "
            f"(reference-free losses: {', '.join(sorted(REFERENCE_FREE))})"
        )
    if ld_alpha is not None and not (0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if label_smoothing > 0 and not any(n in _USES_LABEL_SMOOTHING for n in names):
        warnings.warn(
            f"label_smoothing={label_smoothing} is ignored by loss type(s) {', '.join(names)}; it is used by "
            f"{', '.join(sorted(_USES_LABEL_SMOOTHING))}",
            UserWarning,
            stacklevel=2,
        )
    return names


def _check_config(loss_type, loss_weights, beta, label_smoothing, *, simpo_gamma, discopop_tau) -> tuple[str, ...]:
    """The checks that do not depend on what data is available (shared by validate_loss_config and
    preference_loss)."""
    names = parse_loss_types(loss_type)
    valid = ", ".join(LOSS_TYPES)
    if not names:
        raise ValueError(f"loss_type is empty; choose one or more (comma-separated) of: {valid}")
    for name in names:
        if name not in _LOSS_FNS:
            close = difflib.get_close_matches(name, LOSS_TYPES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown loss type {name!r}{hint}; valid loss types: {valid}")
    if loss_weights is not None:
        if len(loss_weights) != len(names):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} value(s) but loss_type has {len(names)} "
                f"({', '.join(names)}); give one weight per loss type"
            )
        for w in loss_weights:
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"loss_weights must be finite and >= 0, got {list(loss_weights)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    eps = label_smoothing
    if not (math.isfinite(eps) and 0.0 <= eps < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")
    if "robust" in names and not eps < 0.5:
        raise ValueError(f"loss type robust needs label_smoothing in [0, 0.5) (the label-flip rate), got {eps}")
    if "exo_pair" in names and eps == 0.0:
        raise ValueError("loss type exo_pair needs label_smoothing > 0; the EXO paper recommends 1e-3")
    if "discopop" in names and not (math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ValueError(f"discopop_tau must be a finite number > 0, got {discopop_tau}")
    if "simpo" in names and not math.isfinite(simpo_gamma):
        raise ValueError(f"simpo_gamma must be finite, got {simpo_gamma}")
    return names


def _check_inputs(names, pi_c, pi_r, ref_c, ref_r, len_c, len_r, sft_num_tokens) -> None:
    if pi_c.dim() != 1 or pi_c.shape != pi_r.shape:
        raise ValueError("policy_chosen_logps and policy_rejected_logps must both have shape (B,), got "
                         f"{tuple(pi_c.shape)} and {tuple(pi_r.shape)}")
    if needs_reference(names) and (ref_c is None or ref_r is None):
        raise ValueError(f"loss type(s) {', '.join(names)} need ref_chosen_logps and ref_rejected_logps")
    if any(n in LENGTH_NORMALISED for n in names) and (len_c is None or len_r is None):
        raise ValueError(f"loss type(s) {', '.join(names)} need chosen_lengths and rejected_lengths")
    if "sft" in names and len_c is None and sft_num_tokens is None:
        raise ValueError("loss type sft needs chosen_lengths or sft_num_tokens")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    sft_num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and rewards; see the module docstring for the formulas.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs summed over completion tokens.
        ref_chosen_logps, ref_rejected_logps: (B,) reference log-probs, or None if every component is
            reference-free (simpo, sft). Never differentiated through.
        loss_type: one name, a comma-separated string ("sigmoid,sft") or a sequence of names.
        loss_weights: mixture weights (default 1.0 each); per-pair loss = sum_k w_k * loss_k.
        beta: temperature / KL strength (tau of IPO).
        label_smoothing: eps of cDPO (sigmoid), robust, exo_pair, aot, aot_unpaired, simpo.
        chosen_lengths, rejected_lengths: (B,) completion token counts, needed by ipo, sigmoid_norm,
            simpo, and by sft when sft_num_tokens is None. Clamped to >= 1.
        simpo_gamma: SimPO target margin gamma.
        discopop_tau: DiscoPOP temperature tau.
        sft_num_tokens: normaliser N_tok of sft (default sum(chosen_lengths); see "Normalisers" above).

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are detached, for metrics ("Rewards"
    above). Raises ValueError for an invalid configuration, or missing reference log-probs or lengths.
    """
    names = _check_config(
        loss_type, loss_weights, beta, label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau
    )
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    _check_inputs(names, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths, rejected_lengths, sft_num_tokens)
    use_ref = needs_reference(names)

    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    device = policy_chosen_logps.device

    def cast(x):
        return None if x is None else torch.as_tensor(x, device=device).to(dtype)

    def cast_len(x):
        return None if x is None else cast(x).clamp(min=1)

    b = _Batch(pi_c=cast(policy_chosen_logps), pi_r=cast(policy_rejected_logps),
               ref_c=cast(ref_chosen_logps) if use_ref else None, ref_r=cast(ref_rejected_logps) if use_ref else None,
               len_c=cast_len(chosen_lengths), len_r=cast_len(rejected_lengths), beta=float(beta),
               eps=float(label_smoothing), gamma=float(simpo_gamma), tau=float(discopop_tau),
               sft_num_tokens=cast(sft_num_tokens))
    if b.ref_c is not None:  # the reference is a constant, even if the caller's tensor tracks gradients
        b.ref_c, b.ref_r = b.ref_c.detach(), b.ref_r.detach()

    losses = None
    for name, w in zip(names, weights):
        term = _LOSS_FNS[name](b)
        term = term if w == 1.0 else w * term
        losses = term if losses is None else losses + term

    with torch.no_grad():
        if use_ref:  # TRL DPOTrainer's rewards
            chosen_rewards, rejected_rewards = b.beta * b.c, b.beta * b.r
        elif "simpo" in names:  # SimPO's implicit reward (TRL CPOTrainer)
            chosen_rewards, rejected_rewards = b.beta * b.pi_c / b.len_c, b.beta * b.pi_r / b.len_r
        elif ref_chosen_logps is not None and ref_rejected_logps is not None:  # pure sft, reference given
            chosen_rewards = b.beta * (b.pi_c - cast(ref_chosen_logps))
            rejected_rewards = b.beta * (b.pi_r - cast(ref_rejected_logps))
        else:  # pure sft without reference (TRL CPOTrainer)
            chosen_rewards, rejected_rewards = b.beta * b.pi_c, b.beta * b.pi_r
    return losses, chosen_rewards, rejected_rewards


def ld_logps(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor | None = None,
    rejected_mask: Tensor | None = None,
    *,
    alpha: float | None,
) -> tuple[Tensor, Tensor]:
    """Sequence log-probs with LD-DPO length desensitisation (Liu et al. 2024, "Length Desensitization in
    Preference Optimization", https://arxiv.org/abs/2409.06411), as TRL's ``ld_alpha`` branch:

        shared = min(len_c, len_r)  (in completion tokens)
        logps  = sum of the first ``shared`` completion tokens + alpha * sum of the remaining ones

    Two call forms: separate ``(B, Tc)`` chosen and ``(B, Tr)`` rejected per-token log-probs with their
    completion masks (our cache's layout), or TRL's layout: one ``(2B, T)`` tensor ``[chosen; rejected]``
    and its ``(2B, T)`` mask as the first two arguments. Masks are 1 on completion tokens (aligned with the
    per-token log-probs); positions outside the mask are ignored even if they hold nan/inf (TRL relies on
    them being 0). ``alpha=None`` means no LD weighting (plain masked sums, same as alpha = 1).

    Returns (chosen_logps, rejected_logps), each (B,).
    """
    if rejected_token_logps is None:
        if rejected_mask is not None:
            raise ValueError("pass rejected_mask only together with rejected_token_logps")
        if chosen_token_logps.shape[0] % 2:
            raise ValueError(
                f"the concatenated form needs an even batch (2B, T), got {tuple(chosen_token_logps.shape)}"
            )
        chosen_token_logps, rejected_token_logps = chosen_token_logps.chunk(2, dim=0)
        chosen_mask, rejected_mask = chosen_mask.chunk(2, dim=0)
    elif rejected_mask is None:
        raise ValueError("rejected_token_logps needs rejected_mask")
    if alpha is not None and not (0.0 <= alpha <= 1.0):
        raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")

    mask_c, mask_r = chosen_mask.bool(), rejected_mask.bool()
    if alpha is None:
        return (
            torch.where(mask_c, chosen_token_logps, 0).sum(dim=1),
            torch.where(mask_r, rejected_token_logps, 0).sum(dim=1),
        )
    shared = torch.minimum(mask_c.sum(dim=1), mask_r.sum(dim=1)).unsqueeze(1)  # (B, 1)

    def weighted(token_logps: Tensor, mask: Tensor) -> Tensor:
        pos = mask.long().cumsum(dim=1)  # 1-based index among completion tokens
        in_shared = mask & (pos <= shared)
        in_tail = mask & (pos > shared)
        return torch.where(in_shared, token_logps, 0).sum(dim=1) + alpha * torch.where(in_tail, token_logps, 0).sum(
            dim=1
        )

    return weighted(chosen_token_logps, mask_c), weighted(rejected_token_logps, mask_r)
