"""Tests for fastdpo.losses: every loss against independent references, numerics at extremes, TRL parity.

References are naive transcriptions of the papers' / TRL's formulas evaluated in 50-digit mpmath (a torch
dependency via sympy), so they cannot overflow and share no code with the implementation; their
gradients are mpmath numerical derivatives.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from types import SimpleNamespace

import mpmath as mp
import pytest
import torch
import torch.nn.functional as F
from _compare import assert_close_report
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdpo.losses import (
    LENGTH_NORMALISED,
    LOSS_TYPES,
    REFERENCE_FREE,
    ld_logps,
    needs_reference,
    parse_loss_types,
    preference_loss,
    validate_loss_config,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny; torch's CPU log_sigmoid still fans out to worker threads, which stalls for
    milliseconds per call when the cores are busy. One thread keeps the file fast; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LABEL_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")
BATCH_COUPLED = ("aot", "aot_unpaired")


# --------------------------------------------------------------------------------------------------------------
# Independent references (mpmath, naive formulas)
# --------------------------------------------------------------------------------------------------------------


def _sig(x):
    return 1 / (1 + mp.exp(-x))


def _logsig(x):
    return -mp.log(1 + mp.exp(-x))


def _ref_elementwise(name, pc, pr, rc, rr, lc, lr, p):
    """Loss of one pair; p holds beta, eps, gamma, tau, B (batch size), N (sft token count)."""
    beta, eps = p["beta"], p["eps"]
    c, r = pc - rc, pr - rr
    z = c - r
    if name == "sigmoid":  # cDPO
        return -(1 - eps) * _logsig(beta * z) - eps * _logsig(-beta * z)
    if name == "ipo":
        return (c / lc - r / lr - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return max(mp.mpf(0), 1 - beta * z)
    if name == "robust":
        return ((1 - eps) * -_logsig(beta * z) - eps * -_logsig(-beta * z)) / (1 - 2 * eps)
    if name == "exo_pair":  # KL(q || p), q = softmax(beta*c, beta*r), p = (1-eps, eps)
        ew, el = mp.exp(beta * c), mp.exp(beta * r)
        qw, ql = ew / (ew + el), el / (ew + el)
        return qw * mp.log(qw / (1 - eps)) + ql * mp.log(ql / eps)
    if name == "nca_pair":
        return -_logsig(beta * c) - _logsig(-beta * c) / 2 - _logsig(-beta * r) / 2
    if name == "bco_pair":
        return -_logsig(beta * c) - _logsig(-beta * r)
    if name == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if name == "apo_zero":
        return 1 - _sig(beta * c) + _sig(beta * r)
    if name == "apo_down":
        return _sig(beta * c) + 1 - _sig(beta * (c - r))
    if name == "discopop":
        x, tau = beta * z, p["tau"]
        return -_logsig(x) * (1 - _sig(x / tau)) + mp.exp(-x) * _sig(x / tau)
    if name == "sigmoid_norm":
        return -_logsig(beta * (c / lc - r / lr))
    if name == "simpo":
        logits = pc / lc - pr / lr - p["gamma"] / beta
        return -(1 - eps) * _logsig(beta * logits) - eps * _logsig(-beta * logits)
    if name == "sft":
        return -pc * p["B"] / p["N"]
    raise KeyError(name)


def _ref_batch(name, pcs, prs, rcs, rrs, p):
    """aot / aot_unpaired: per-rank losses of a whole batch."""
    beta, eps = p["beta"], p["eps"]
    if name == "aot":
        d = [a - b for a, b in zip(sorted(x - y for x, y in zip(pcs, prs)), sorted(x - y for x, y in zip(rcs, rrs)))]
    else:
        cs = sorted(x - y for x, y in zip(pcs, rcs))
        rs = sorted(x - y for x, y in zip(prs, rrs))
        d = [a - b for a, b in zip(cs, rs)]
    return [-(1 - eps) * _logsig(beta * v) - eps * _logsig(-beta * v) for v in d]


def _ref_batch_grads(name, pcs, prs, rcs, rrs, p):
    """d(sum of per-rank losses)/d(pi_c_j), d/d(pi_r_j) for aot / aot_unpaired. Without ties, moving one input a
    little keeps every rank, so only the term at that input's rank changes: differentiate that term alone."""
    beta, eps = p["beta"], p["eps"]

    def cdpo(v):
        return -(1 - eps) * _logsig(beta * v) - eps * _logsig(-beta * v)

    B = len(pcs)
    g_c, g_r = [], []
    if name == "aot":  # term k: cdpo(sort(pi_c - pi_r)[k] - sort(ref_c - ref_r)[k])
        u = [pcs[j] - prs[j] for j in range(B)]
        t = sorted(rcs[j] - rrs[j] for j in range(B))
        rank = {j: k for k, j in enumerate(sorted(range(B), key=lambda j: u[j]))}
        for j in range(B):
            k = rank[j]
            g_c.append(mp.diff(lambda x, j=j, k=k: cdpo(x - prs[j] - t[k]), pcs[j]))
            g_r.append(mp.diff(lambda x, j=j, k=k: cdpo(pcs[j] - x - t[k]), prs[j]))
    else:  # term k: cdpo(sort(c)[k] - sort(r)[k])
        c = [pcs[j] - rcs[j] for j in range(B)]
        r = [prs[j] - rrs[j] for j in range(B)]
        cs, rs = sorted(c), sorted(r)
        rank_c = {j: k for k, j in enumerate(sorted(range(B), key=lambda j: c[j]))}
        rank_r = {j: k for k, j in enumerate(sorted(range(B), key=lambda j: r[j]))}
        for j in range(B):
            kc, kr = rank_c[j], rank_r[j]
            g_c.append(mp.diff(lambda x, j=j, k=kc: cdpo(x - rcs[j] - rs[k]), pcs[j]))
            g_r.append(mp.diff(lambda x, j=j, k=kr: cdpo(cs[k] - (x - rrs[j])), prs[j]))
    return g_c, g_r


def reference_losses_and_grads(name, pc, pr, rc, rr, lc, lr, params):
    """Exact per-pair losses and d(sum of losses)/d(policy logps), as float lists."""
    with mp.workdps(50):
        vals = [[mp.mpf(float(v)) for v in t.tolist()] for t in (pc, pr, rc, rr, lc, lr)]
        pcs, prs, rcs, rrs, lcs, lrs = vals
        p = {k: mp.mpf(v) for k, v in params.items()}
        B = len(pcs)
        if name in BATCH_COUPLED:
            losses = _ref_batch(name, pcs, prs, rcs, rrs, p)
            g_c, g_r = _ref_batch_grads(name, pcs, prs, rcs, rrs, p)
        else:
            row = [(pcs[i], prs[i], rcs[i], rrs[i], lcs[i], lrs[i]) for i in range(B)]
            losses = [_ref_elementwise(name, *args, p) for args in row]
            g_c = [mp.diff(lambda x, a=a: _ref_elementwise(name, x, *a[1:], p), a[0]) for a in row]
            g_r = [mp.diff(lambda x, a=a: _ref_elementwise(name, a[0], x, *a[2:], p), a[1]) for a in row]
        return [float(v) for v in losses], [float(v) for v in g_c], [float(v) for v in g_r]


# --------------------------------------------------------------------------------------------------------------
# Fixed inputs: log-ratios on a grid with extremes, all exactly representable in fp32
# --------------------------------------------------------------------------------------------------------------

GRID = (-1e4, -1e2, -1.5, 0.0, 0.75, 1e2, 1e4)


def grid_batch(dtype=torch.float32):
    """49 pairs: every (chosen, rejected) log-ratio combination from GRID, with small distinct offsets so that
    the batch-sorting losses have no ties. All values are multiples of 2**-7 below 2**14 in magnitude, so the
    fp32 tensors, and the differences the losses take, are exact."""
    lc_, lr_, rc_, rr_ = [], [], [], []
    for a, gc in enumerate(GRID):
        for b, gr in enumerate(GRID):
            i = 7 * a + b
            lc_.append(gc + i / 64)
            lr_.append(gr - i / 128)
            rc_.append(-(20 + 0.5 * ((i * 17) % 49)))
            rr_.append(-(30 + 0.25 * ((i * 23) % 49)))
    rc = torch.tensor(rc_, dtype=torch.float64)
    rr = torch.tensor(rr_, dtype=torch.float64)
    pc = rc + torch.tensor(lc_, dtype=torch.float64)
    pr = rr + torch.tensor(lr_, dtype=torch.float64)
    for t in (pc, pr, rc, rr):
        assert torch.equal(t.to(torch.float32).double(), t), "grid values must be exact in fp32"
    for v in (pc - pr, rc - rr, pc - rc, pr - rr):  # no ties for aot / aot_unpaired
        assert len(set(v.tolist())) == len(v)
    idx = torch.arange(49)
    len_c = (1 + (idx * 5) % 37).to(dtype)
    len_r = (1 + (idx * 11) % 41).to(dtype)
    return pc.to(dtype), pr.to(dtype), rc.to(dtype), rr.to(dtype), len_c, len_r


def run(name, pc, pr, rc, rr, len_c, len_r, **kw):
    """Our loss with gradients of the summed loss w.r.t. the policy log-probs."""
    pc = pc.detach().clone().requires_grad_()
    pr = pr.detach().clone().requires_grad_()
    losses, cr, rr_ = preference_loss(
        pc, pr, rc, rr, loss_type=name, chosen_lengths=len_c, rejected_lengths=len_r, **kw
    )
    losses.sum().backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (pc, pr)]  # sft ignores pi_r
    return losses.detach(), *grads, cr, rr_


def _eps_values(name):
    if name == "exo_pair":
        return (1e-3, 0.1)
    if name in LABEL_SMOOTHED:
        return (0.0, 0.1)
    return (0.0,)


REFERENCE_CASES = [
    pytest.param(name, beta, eps, id=f"{name}-beta{beta}-eps{eps}")
    for name in LOSS_TYPES
    for beta in (0.1, 1.0)
    for eps in _eps_values(name)
]


@pytest.mark.parametrize("name, beta, eps", REFERENCE_CASES)
def test_against_independent_reference(name, beta, eps):
    pc, pr, rc, rr, len_c, len_r = grid_batch()
    params = {"beta": beta, "eps": eps, "gamma": 0.5, "tau": 0.05, "B": 49, "N": float(len_c.sum())}
    losses, g_c, g_r, _, _ = run(name, pc, pr, rc, rr, len_c, len_r, beta=beta, label_smoothing=eps)
    exp_loss, exp_gc, exp_gr = reference_losses_and_grads(name, pc, pr, rc, rr, len_c, len_r, params)
    # fp32 vs exact: relative error of a few ulps of the largest intermediate (log-ratios up to 2e4).
    assert_close_report(losses, exp_loss, atol=5e-6, rtol=5e-6, name=f"{name} loss")
    assert_close_report(g_c, exp_gc, atol=5e-7, rtol=5e-6, name=f"{name} d/d policy_chosen")
    assert_close_report(g_r, exp_gr, atol=5e-7, rtol=5e-6, name=f"{name} d/d policy_rejected")


def test_reference_grid_covers_extremes():
    pc, pr, rc, rr, *_ = grid_batch()
    logratios = set((pc - rc).round().tolist()) | set((pr - rr).round().tolist())
    assert {-1e4, -1e2, 0.0, 1e2, 1e4} <= logratios


# --------------------------------------------------------------------------------------------------------------
# Numerics at extremes
# --------------------------------------------------------------------------------------------------------------

EXTREMES = (-1e4, -1e2, 0.0, 1e2, 1e4)


def _extreme_batch():
    pairs = [(c, r) for c in EXTREMES for r in EXTREMES]
    rc = torch.full((len(pairs),), -37.5)
    rr = torch.full((len(pairs),), -12.25)
    pc = rc + torch.tensor([c for c, _ in pairs])
    pr = rr + torch.tensor([r for _, r in pairs])
    n = len(pairs)
    len_c = torch.tensor([1.0, 1000.0] * (n // 2) + [7.0] * (n % 2))
    len_r = torch.tensor([1000.0, 1.0] * (n // 2) + [3.0] * (n % 2))
    return pc, pr, rc, rr, len_c, len_r


@pytest.mark.parametrize("name", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.01, 0.1, 10.0])
def test_finite_at_extremes(name, beta):
    pc, pr, rc, rr, len_c, len_r = _extreme_batch()
    for eps in _eps_values(name):
        for tau in (0.05, 2.0) if name == "discopop" else (0.05,):
            losses, g_c, g_r, cr, rr_ = run(
                name, pc, pr, rc, rr, len_c, len_r, beta=beta, label_smoothing=eps, discopop_tau=tau
            )
            for what, t in (("loss", losses), ("grad chosen", g_c), ("grad rejected", g_r), ("rewards", cr)):
                assert torch.isfinite(t).all(), f"{name} beta={beta} eps={eps} tau={tau}: non-finite {what}: {t}"


def test_discopop_matches_literal_formula_where_that_is_finite():
    """TRL's literal exp(-x)*sig(x/tau) overflows for x < -88; elsewhere our log-space form agrees."""
    x = torch.linspace(-80, 80, 321, dtype=torch.float64)
    tau = 0.05
    literal = -F.logsigmoid(x) * (1 - torch.sigmoid(x / tau)) + torch.exp(-x) * torch.sigmoid(x / tau)
    zeros = torch.zeros_like(x)
    ours, _, _ = preference_loss(x, zeros, zeros, zeros, loss_type="discopop", beta=1.0, discopop_tau=tau)
    assert_close_report(ours, literal, atol=1e-12, rtol=1e-12, name="discopop vs literal")


@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_finite_inputs_give_finite_losses_and_grads(data):
    B = data.draw(st.integers(1, 6), label="B")
    logp = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)

    def vec(strategy, label):
        return torch.tensor(data.draw(st.lists(strategy, min_size=B, max_size=B), label=label), dtype=torch.float32)

    pc, pr, rc, rr = (vec(logp, k) for k in ("pc", "pr", "rc", "rr"))
    len_c, len_r = (vec(st.integers(0, 4096), k) for k in ("len_c", "len_r"))
    beta = data.draw(st.floats(1e-3, 10.0), label="beta")
    eps = data.draw(st.floats(0.0, 0.49), label="eps")
    tau = data.draw(st.floats(1e-2, 5.0), label="tau")
    gamma = data.draw(st.floats(-5.0, 5.0), label="gamma")
    for name in LOSS_TYPES:
        e = max(eps, 1e-4) if name == "exo_pair" else eps
        losses, g_c, g_r, cr, rr_ = run(
            name, pc, pr, rc, rr, len_c, len_r, beta=beta, label_smoothing=e, discopop_tau=tau, simpo_gamma=gamma
        )
        for t in (losses, g_c, g_r, cr, rr_):
            assert torch.isfinite(t).all(), f"{name}: {t}"


# --------------------------------------------------------------------------------------------------------------
# Sanity and algebraic properties
# --------------------------------------------------------------------------------------------------------------


def test_dpo_at_reference_is_ln2_with_zero_rewards_and_correct_gradient_signs():
    ref_c = torch.tensor([-12.5, -300.0, -1.0])
    ref_r = torch.tensor([-40.0, -2.0, -1e4])
    losses, g_c, g_r, cr, rr = run("sigmoid", ref_c, ref_r, ref_c, ref_r, None, None, beta=0.1)
    assert_close_report(losses, [math.log(2)] * 3, atol=1e-7, rtol=1e-7, name="DPO loss at policy == ref")
    assert torch.equal(cr, torch.zeros(3)) and torch.equal(rr, torch.zeros(3))
    # descent direction -grad raises the chosen log-prob and lowers the rejected one
    assert (g_c < 0).all() and (g_r > 0).all()
    assert_close_report(g_c, [-0.05] * 3, atol=1e-8, rtol=1e-6, name="dL/dpi_c = -beta/2")
    assert_close_report(g_r, [0.05] * 3, atol=1e-8, rtol=1e-6, name="dL/dpi_r = +beta/2")


def test_sigmoid_without_smoothing_is_plain_dpo_bitwise():
    pc, pr, rc, rr, *_ = grid_batch()
    losses, *_ = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=0.1, label_smoothing=0.0)
    assert torch.equal(losses, -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))))


@pytest.mark.parametrize("name", ["sigmoid", "simpo"])
def test_label_smoothing_mixes_in_the_flipped_pair(name):
    """cDPO: loss_eps(c, r) = (1-eps) * loss_0(c, r) + eps * loss_0(r, c) (for simpo, flip the margin too)."""
    pc, pr, rc, rr, len_c, len_r = grid_batch(torch.float64)
    eps = 0.2
    kw = {"loss_type": name, "beta": 0.1, "chosen_lengths": len_c, "rejected_lengths": len_r}
    smoothed, *_ = preference_loss(pc, pr, rc, rr, label_smoothing=eps, **kw)
    plain, *_ = preference_loss(pc, pr, rc, rr, label_smoothing=0.0, **kw)
    if name == "sigmoid":
        flipped, *_ = preference_loss(pr, pc, rr, rc, label_smoothing=0.0, **kw)
    else:  # flipping SimPO's logits: swap chosen/rejected and negate gamma
        kw.update(chosen_lengths=len_r, rejected_lengths=len_c)
        flipped, *_ = preference_loss(pr, pc, label_smoothing=0.0, simpo_gamma=-0.5, **kw)
    assert_close_report(smoothed, (1 - eps) * plain + eps * flipped, atol=1e-9, rtol=1e-12, name="cDPO")


def test_mixture_is_linear_in_losses_and_gradients():
    pc, pr, rc, rr, len_c, len_r = grid_batch(torch.float64)
    names, weights = ["sigmoid", "sft", "ipo", "simpo"], [1.0, 0.2, 0.5, 3.0]
    mix, g_c, g_r, cr, rr_ = run(",".join(names), pc, pr, rc, rr, len_c, len_r, loss_weights=weights, beta=0.1)
    exp_loss, exp_gc, exp_gr = 0, 0, 0
    for name, w in zip(names, weights):
        loss, gc, gr, _, _ = run(name, pc, pr, rc, rr, len_c, len_r, beta=0.1)
        exp_loss, exp_gc, exp_gr = exp_loss + w * loss, exp_gc + w * gc, exp_gr + w * gr
    assert_close_report(mix, exp_loss, atol=1e-9, rtol=1e-12, name="mixture loss")
    assert_close_report(g_c, exp_gc, atol=1e-12, rtol=1e-12, name="mixture grad chosen")
    assert_close_report(g_r, exp_gr, atol=1e-12, rtol=1e-12, name="mixture grad rejected")
    # a mixture with a reference-based component reports reference-based rewards
    assert_close_report(cr, 0.1 * (pc - rc), atol=0, rtol=1e-15, name="mixture rewards")
    # the list form and the comma-separated form agree
    as_list, *_ = preference_loss(
        pc, pr, rc, rr, loss_type=names, loss_weights=weights, chosen_lengths=len_c, rejected_lengths=len_r
    )
    assert torch.equal(as_list, mix)


def _token_batch(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    tok = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return tok, mask, lengths


def test_sft_mean_is_token_mean_nll_and_accumulates_like_one_batch():
    tok, mask, lengths = _token_batch(6, 9, seed=0)
    pc = (tok * mask).sum(1)
    token_mean_nll = -tok[mask].mean()
    losses, *_ = preference_loss(pc, pc - 1.0, loss_type="sft", chosen_lengths=lengths)
    assert_close_report(losses.mean(), token_mean_nll, atol=1e-12, rtol=1e-12, name="sft mean vs token mean")
    # two micro-batches normalised by the global token count: summed micro-batch means == one big batch
    n_global = mask.sum()
    parts = [
        preference_loss(pc[s], pc[s] - 1.0, loss_type="sft", sft_num_tokens=n_global)[0].mean()
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert_close_report(sum(parts), token_mean_nll, atol=1e-12, rtol=1e-12, name="sft accumulation")


def test_rewards_definitions_and_detachment():
    pc, pr, rc, rr, len_c, len_r = grid_batch(torch.float64)
    rc_tracked = rc.clone().requires_grad_()
    losses, cr, rr_ = preference_loss(
        pc, pr, rc_tracked, rr, loss_type="ipo", beta=0.3, chosen_lengths=len_c, rejected_lengths=len_r
    )
    assert not cr.requires_grad and not rr_.requires_grad
    assert not losses.requires_grad, "the reference must not be differentiated through"
    assert_close_report(cr, 0.3 * (pc - rc), atol=0, rtol=1e-15, name="reward chosen")
    assert_close_report(rr_, 0.3 * (pr - rr), atol=0, rtol=1e-15, name="reward rejected")
    _, cr, rr_ = preference_loss(pc, pr, loss_type="simpo,sft", beta=2.0, chosen_lengths=len_c, rejected_lengths=len_r)
    assert_close_report(cr, 2.0 * pc / len_c, atol=0, rtol=1e-15, name="simpo reward")
    # pure sft: reference-based rewards if the reference is given (TRL DPOTrainer), else b * pi (TRL CPOTrainer)
    _, cr, rr_ = preference_loss(pc, pr, rc, rr, loss_type="sft", beta=2.0, chosen_lengths=len_c)
    assert_close_report(cr, 2.0 * (pc - rc), atol=0, rtol=1e-15, name="sft reward with reference")
    assert_close_report(rr_, 2.0 * (pr - rr), atol=0, rtol=1e-15, name="sft reward rejected with reference")
    _, cr, rr_ = preference_loss(pc, pr, loss_type="sft", beta=2.0, chosen_lengths=len_c)
    assert_close_report(cr, 2.0 * pc, atol=0, rtol=1e-15, name="sft reward")
    assert_close_report(rr_, 2.0 * pr, atol=0, rtol=1e-15, name="sft reward rejected")


def test_dtypes():
    pc, pr, rc, rr, len_c, len_r = grid_batch()
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64,) * 2):
        losses, cr, _ = preference_loss(pc.to(dtype), pr.to(dtype), rc.to(dtype), rr.to(dtype))
        assert losses.dtype == expected and cr.dtype == expected


def test_reference_free_losses_need_no_reference():
    pc, pr, _, _, len_c, len_r = grid_batch()
    assert REFERENCE_FREE == {"simpo", "sft"}
    losses, *_ = preference_loss(pc, pr, loss_type="simpo,sft", chosen_lengths=len_c, rejected_lengths=len_r)
    assert losses.shape == (49,)
    assert not needs_reference("simpo, sft") and needs_reference("simpo,sigmoid") and needs_reference(["hinge"])
    assert LENGTH_NORMALISED == {"ipo", "sigmoid_norm", "simpo"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "sigmoid"}, "need ref_chosen_logps"),
        ({"loss_type": "sft,hinge", "chosen_lengths": torch.ones(2)}, "need ref_chosen_logps"),
        ({"loss_type": "ipo", "ref": True}, "need chosen_lengths and rejected_lengths"),
        ({"loss_type": "simpo", "chosen_lengths": torch.ones(2)}, "need chosen_lengths and rejected_lengths"),
        ({"loss_type": "sft"}, "sft needs chosen_lengths or sft_num_tokens"),
        ({"loss_type": "sigmoid", "ref": True, "beta": 0.0}, "beta must be"),
        ({"loss_type": "dpo", "ref": True}, "unknown loss type 'dpo'"),
    ],
)
def test_preference_loss_rejects_missing_inputs(kwargs, match):
    kwargs = dict(kwargs)
    refs = (torch.zeros(2), torch.zeros(2)) if kwargs.pop("ref", False) else ()
    with pytest.raises(ValueError, match=match):
        preference_loss(torch.zeros(2), torch.zeros(2), *refs, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# validate_loss_config
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("sigmod",), {}, r"unknown loss type 'sigmod' \(did you mean sigmoid\?\); valid loss types: sigmoid, ipo"),
        (("sigmoid,bogus",), {}, r"unknown loss type 'bogus'.*aot_unpaired, sigmoid_norm, simpo, sft$"),
        (("",), {}, "loss_type is empty"),
        (("sigmoid,sft", [1.0]), {}, r"loss_weights has 1 value\(s\) but loss_type has 2 \(sigmoid, sft\)"),
        (("sigmoid", [1.0, 2.0]), {}, r"loss_weights has 2 value\(s\) but loss_type has 1"),
        (("sigmoid,sft", [1.0, -0.2]), {}, "loss_weights must be finite and >= 0"),
        (("sigmoid", None, 0.0), {}, "beta must be a finite number > 0, got 0.0"),
        (("sigmoid", None, -0.1), {}, "beta must be a finite number > 0"),
        (("sigmoid", None, float("nan")), {}, "beta must be a finite number > 0"),
        (("sigmoid", None, 0.1, 1.0), {}, r"label_smoothing must be in \[0, 1\)"),
        (("sigmoid", None, 0.1, -0.1), {}, r"label_smoothing must be in \[0, 1\)"),
        (("robust", None, 0.1, 0.5), {}, r"robust needs label_smoothing in \[0, 0.5\)"),
        (("exo_pair", None, 0.1, 0.0), {}, "exo_pair needs label_smoothing > 0"),
        (("discopop",), {"discopop_tau": 0.0}, "discopop_tau must be a finite number > 0"),
        (("simpo",), {"simpo_gamma": float("inf")}, "simpo_gamma must be finite"),
        (("aot",), {"batch_size": 1}, "aot sorts pairs across the micro-batch and needs at least 2"),
        (("sigmoid,aot_unpaired",), {"batch_size": 1}, "aot_unpaired sorts pairs"),
        (("ipo",), {"has_lengths": False}, "loss type.* ipo need completion lengths"),
        (("simpo,sigmoid_norm,sft",), {"has_lengths": False}, r"sigmoid_norm, simpo, sft need completion lengths"),
        (("sigmoid,sft",), {"has_lengths": False}, r"loss type\(s\) sft need completion lengths"),
        (("sigmoid",), {"has_reference": False}, "sigmoid need reference log-probs"),
        (("simpo,hinge",), {"has_reference": False}, r"hinge need reference.*\(reference-free losses: sft, simpo\)$"),
        (("sigmoid",), {"ld_alpha": 1.5}, r"ld_alpha must be in \[0, 1\]"),
    ],
)
def test_validate_loss_config_messages(args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        validate_loss_config(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_validate_loss_config_accepts_valid_configs():
    assert validate_loss_config("sigmoid, sft", [1.0, 0.2]) == ("sigmoid", "sft")
    assert validate_loss_config(["simpo", "sft"], has_reference=False) == ("simpo", "sft")
    assert validate_loss_config("sft", has_lengths=False, has_sft_num_tokens=True) == ("sft",)
    assert validate_loss_config("robust", label_smoothing=0.49) == ("robust",)
    assert validate_loss_config("exo_pair", label_smoothing=1e-3) == ("exo_pair",)
    assert validate_loss_config("aot", batch_size=2, ld_alpha=0.0) == ("aot",)
    assert validate_loss_config(list(LOSS_TYPES), label_smoothing=0.1) == LOSS_TYPES
    assert parse_loss_types(["sigmoid,sft", " ipo "]) == ("sigmoid", "sft", "ipo")


def test_validate_loss_config_warns_on_ignored_label_smoothing():
    with pytest.warns(UserWarning, match="label_smoothing=0.1 is ignored by loss type"):
        validate_loss_config("hinge,sft", label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_loss_config("hinge,sigmoid", label_smoothing=0.1)


# --------------------------------------------------------------------------------------------------------------
# LD-DPO
# --------------------------------------------------------------------------------------------------------------


def _ld_reference(tok, mask, other_mask, alpha):
    """Plain-Python LD weighting of one row set: first min(len, other_len) completion tokens at weight 1, rest alpha."""
    out = []
    for row, m, om in zip(tok.tolist(), mask.tolist(), other_mask.tolist()):
        shared, seen, total = min(sum(m), sum(om)), 0, 0.0
        for v, keep in zip(row, m):
            if keep:
                seen += 1
                total += v if seen <= shared else alpha * v
        out.append(total)
    return out


def _ld_inputs():
    g = torch.Generator().manual_seed(3)
    B = 5
    tok_c = -torch.rand(B, 11, generator=g, dtype=torch.float64)
    tok_r = -torch.rand(B, 8, generator=g, dtype=torch.float64)
    # prompt / padding positions, including a non-contiguous mask and left padding
    mask_c = torch.rand(B, 11, generator=g) < 0.7
    mask_r = torch.rand(B, 8, generator=g) < 0.6
    mask_c[0], mask_r[0] = False, False
    mask_c[0, 3:9], mask_r[0, 1:3] = True, True
    return tok_c, mask_c, tok_r, mask_r


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_logps_matches_plain_python(alpha):
    tok_c, mask_c, tok_r, mask_r = _ld_inputs()
    garbage_c = tok_c.masked_fill(~mask_c, float("nan"))  # masked positions must be ignored
    garbage_r = tok_r.masked_fill(~mask_r, float("-inf"))
    c, r = ld_logps(garbage_c, mask_c, garbage_r, mask_r, alpha=alpha)
    assert_close_report(c, _ld_reference(tok_c, mask_c, mask_r, alpha), atol=1e-12, rtol=1e-12, name="ld chosen")
    assert_close_report(r, _ld_reference(tok_r, mask_r, mask_c, alpha), atol=1e-12, rtol=1e-12, name="ld rejected")


def test_ld_logps_concatenated_form_and_no_alpha():
    tok_c, mask_c, tok_r, mask_r = _ld_inputs()
    T = 11
    tok = torch.cat([tok_c, F.pad(tok_r, (0, T - 8))])
    mask = torch.cat([mask_c, F.pad(mask_r, (0, T - 8))])
    sep = ld_logps(tok_c, mask_c, tok_r, mask_r, alpha=0.5)
    cat = ld_logps(tok, mask, alpha=0.5)
    for a, b in zip(sep, cat):
        assert_close_report(a, b, atol=1e-12, rtol=0, name="ld separate vs concatenated")
    plain = ld_logps(tok_c, mask_c, tok_r, mask_r, alpha=None)
    assert_close_report(plain[0], (tok_c * mask_c).sum(1), atol=1e-12, rtol=0, name="alpha=None chosen")
    assert_close_report(plain[1], (tok_r * mask_r).sum(1), atol=1e-12, rtol=0, name="alpha=None rejected")
    with pytest.raises(ValueError, match="ld_alpha must be in"):
        ld_logps(tok_c, mask_c, tok_r, mask_r, alpha=-0.1)


def test_ld_logps_gradient_flows_only_through_kept_tokens():
    tok_c, mask_c, tok_r, mask_r = _ld_inputs()
    tok_c.requires_grad_()
    c, _ = ld_logps(tok_c, mask_c, tok_r, mask_r, alpha=0.25)
    c.sum().backward()
    assert torch.isfinite(tok_c.grad).all()
    assert (tok_c.grad[~mask_c] == 0).all()
    assert set(tok_c.grad[mask_c].tolist()) <= {1.0, 0.25}


# --------------------------------------------------------------------------------------------------------------
# Cross-check against TRL 1.16 itself
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_dpo_trainer():
    return pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer


@pytest.fixture(scope="module")
def trl_cpo_trainer():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer


class _FakeLM:
    """Stands in for the policy in DPOTrainer._compute_loss: returns the given per-token log-probs."""

    training = False

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        n, t = self.per_token_logps.shape
        zeros = torch.zeros(n, t)
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def trl_compute_loss(DPOTrainer, per_token_logps, completion_mask, refs, loss_types, **config):
    """Run TRL's own DPOTrainer._compute_loss (precomputed reference) on given per-token log-probs.
    config: loss_weights, beta, label_smoothing, discopop_tau, ld_alpha."""
    cfg = {"loss_weights": None, "beta": 0.1, "label_smoothing": 0.0, "discopop_tau": 0.05, "ld_alpha": None, **config}
    trainer = object.__new__(DPOTrainer)
    model = _FakeLM(per_token_logps)
    attrs = {
        "model": model,
        "accelerator": SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        "args": SimpleNamespace(discopop_tau=cfg["discopop_tau"], gradient_checkpointing_kwargs=None),
        "aux_loss_enabled": False,
        "ld_alpha": cfg["ld_alpha"],
        "precompute_ref_logps": True,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "loss_types": list(loss_types),
        "loss_weights": list(cfg["loss_weights"] or [1.0] * len(loss_types)),
        "beta": cfg["beta"],
        "label_smoothing": cfg["label_smoothing"],
        "use_weighting": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for k, v in attrs.items():
        object.__setattr__(trainer, k, v)
    n, t = completion_mask.shape
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": refs[0],
        "ref_rejected_logps": refs[1],
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, trainer._metrics["eval"]


def _completion_mask(len_c, len_r):
    """[chosen; rejected] rows: one prompt token, then the completion, then padding."""
    lengths = torch.cat([len_c, len_r]).long()
    t = int(lengths.max()) + 2
    pos = torch.arange(t)[None, :]
    return ((pos >= 1) & (pos <= lengths[:, None])).long()


def _trl_vs_ours(DPOTrainer, names, weights, pc, pr, rc, rr, len_c, len_r, beta, eps, tau=0.05):
    completion_mask = _completion_mask(len_c, len_r)
    seq = torch.cat([pc, pr]).detach().clone().requires_grad_()
    first = torch.zeros(completion_mask.shape[0], completion_mask.shape[1] - 1)
    first[:, 0] = 1.0  # the whole sequence log-prob sits on the first completion token; the rest are 0
    cfg = {"loss_weights": weights, "beta": beta, "label_smoothing": eps, "discopop_tau": tau}
    trl_loss, metrics = trl_compute_loss(DPOTrainer, first * seq[:, None], completion_mask, (rc, rr), names, **cfg)
    B = len(pc)
    ours, g_c, g_r, cr, rr_ = run(",".join(names), pc, pr, rc, rr, len_c, len_r, **cfg)
    ours_mean, g_c, g_r = ours.mean(), g_c / B, g_r / B  # TRL returns the batch mean
    if not torch.isfinite(trl_loss):  # TRL's literal formula overflows at some extremes; nothing to compare
        assert torch.isfinite(ours_mean)
        return False
    trl_loss.backward()
    trl_gc, trl_gr = seq.grad.chunk(2)
    finite = torch.isfinite(trl_gc) & torch.isfinite(trl_gr)
    label = ",".join(names)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    assert_close_report(ours_mean, trl_loss, **tol, name=f"{label} loss vs TRL")
    assert_close_report(g_c[finite], trl_gc[finite], atol=1e-7, rtol=1e-4, name=f"{label} grad chosen vs TRL")
    assert_close_report(g_r[finite], trl_gr[finite], atol=1e-7, rtol=1e-4, name=f"{label} grad rejected vs TRL")
    assert_close_report(cr.mean(), metrics["rewards/chosen"][0], **tol, name=f"{label} chosen reward vs TRL")
    assert_close_report(rr_.mean(), metrics["rewards/rejected"][0], **tol, name=f"{label} rejected reward vs TRL")
    return True


def _moderate_batch(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rc = -10 - 40 * torch.rand(B, generator=g)
    rr = -10 - 40 * torch.rand(B, generator=g)
    pc = rc + 6 * torch.randn(B, generator=g)
    pr = rr + 6 * torch.randn(B, generator=g)
    len_c = torch.randint(1, 30, (B,), generator=g).float()
    len_r = torch.randint(1, 30, (B,), generator=g).float()
    return pc, pr, rc, rr, len_c, len_r


TRL_DPO_NAMES = [n for n in LOSS_TYPES if n != "simpo"]


@pytest.mark.parametrize("name", TRL_DPO_NAMES)
def test_matches_trl_dpo_trainer(trl_dpo_trainer, name):
    # TRL's sigmoid ignores label_smoothing, so compare it at eps = 0 only
    eps = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(name, 0.0)
    for beta in (0.1, 0.5):
        assert _trl_vs_ours(trl_dpo_trainer, [name], None, *_moderate_batch(), beta=beta, eps=eps)
    # extremes: compared wherever TRL itself is finite
    pc, pr, rc, rr, len_c, len_r = _extreme_batch()
    compared = _trl_vs_ours(trl_dpo_trainer, [name], None, pc, pr, rc, rr, len_c, len_r, beta=0.1, eps=eps)
    assert compared or name == "discopop"


@pytest.mark.parametrize(
    "names, weights", [(["sigmoid", "sft"], [1.0, 0.2]), (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])]
)
def test_mixtures_match_trl_dpo_trainer(trl_dpo_trainer, names, weights):
    assert _trl_vs_ours(trl_dpo_trainer, names, weights, *_moderate_batch(seed=1), beta=0.1, eps=0.0)


def test_sigmoid_label_smoothing_is_our_documented_difference_from_trl(trl_dpo_trainer):
    pc, pr, rc, rr, len_c, len_r = _moderate_batch()
    seq = torch.cat([pc, pr])
    first = torch.zeros(16, int(torch.cat([len_c, len_r]).max()) + 1)
    first[:, 0] = 1.0
    mask = _completion_mask(len_c, len_r)
    trl_loss, _ = trl_compute_loss(
        trl_dpo_trainer, first * seq[:, None], mask, (rc, rr), ["sigmoid"], label_smoothing=0.2
    )
    ours_0, *_ = preference_loss(pc, pr, rc, rr, label_smoothing=0.0)
    ours_smoothed, *_ = preference_loss(pc, pr, rc, rr, label_smoothing=0.2)
    assert_close_report(ours_0.mean(), trl_loss, atol=1e-6, rtol=1e-6, name="TRL sigmoid ignores eps")
    assert abs(ours_smoothed.mean().item() - trl_loss.item()) > 1e-3


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_ld_logps_matches_trl(trl_dpo_trainer, alpha):
    g = torch.Generator().manual_seed(7)
    len_c, len_r = torch.tensor([3.0, 9.0, 5.0]), torch.tensor([7.0, 2.0, 5.0])
    for i in range(3):  # TRL exposes only batch means, so run pairs one at a time
        completion_mask = _completion_mask(len_c[i : i + 1], len_r[i : i + 1])
        shift = completion_mask[:, 1:].bool()
        tok = torch.where(shift, -torch.rand(shift.shape, generator=g), 0.0)  # TRL: log-probs are 0 off-completion
        refs = (torch.zeros(1), torch.zeros(1))
        _, metrics = trl_compute_loss(trl_dpo_trainer, tok, completion_mask, refs, ["sigmoid"], ld_alpha=alpha)
        c, r = ld_logps(tok[:1], shift[:1], tok[1:], shift[1:], alpha=alpha)
        assert_close_report(c, metrics["logps/chosen"], atol=1e-6, rtol=1e-6, name=f"ld chosen vs TRL, pair {i}")
        assert_close_report(r, metrics["logps/rejected"], atol=1e-6, rtol=1e-6, name=f"ld rejected vs TRL, pair {i}")


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(trl_cpo_trainer, eps):
    pc, pr, rc, rr, len_c, len_r = _moderate_batch(seed=2)
    cpo = object.__new__(trl_cpo_trainer)
    cfg = {"simpo_gamma": 0.7, "beta": 2.0, "label_smoothing": eps}
    for k, v in {"alpha": 0.0, "loss_type": "simpo", "accelerator": SimpleNamespace(device="cpu"), **cfg}.items():
        object.__setattr__(cpo, k, v)
    leaf_c, leaf_r = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    # CPOTrainer averages log-probs over completion tokens for simpo before calling cpo_loss
    trl_losses, trl_cr, trl_rr = cpo.cpo_loss(leaf_c / len_c, leaf_r / len_r)
    trl_losses.sum().backward()
    ours, g_c, g_r, cr, rr_ = run("simpo", pc, pr, None, None, len_c, len_r, **cfg)
    assert_close_report(ours, trl_losses, atol=1e-6, rtol=1e-6, name="simpo vs TRL CPO")
    assert_close_report(g_c, leaf_c.grad, atol=1e-7, rtol=1e-5, name="simpo grad chosen vs TRL CPO")
    assert_close_report(g_r, leaf_r.grad, atol=1e-7, rtol=1e-5, name="simpo grad rejected vs TRL CPO")
    assert_close_report(cr, trl_cr, atol=1e-6, rtol=1e-6, name="simpo chosen rewards vs TRL CPO")
    assert_close_report(rr_, trl_rr, atol=1e-6, rtol=1e-6, name="simpo rejected rewards vs TRL CPO")
