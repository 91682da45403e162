"""Shared test helpers: compare arrays and, on failure, say how far off and where; the kernels' error rule."""

from __future__ import annotations

import torch


def assert_close_report(actual, expected, atol: float = 1e-6, rtol: float = 1e-5, name: str = "value") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise (numpy/torch/list/scalar inputs).

    nan matches nan and an infinity matches the same infinity. On failure the message gives the shapes, the
    max and mean absolute difference, the max relative difference, the number of mismatches and the first
    few of them (index, actual, expected, difference).
    """
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape mismatch, actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    same_special = (a.isnan() & e.isnan()) | (a.isinf() & e.isinf() & (a.sign() == e.sign()))
    diff = (a - e).abs()
    diff = torch.where(same_special, torch.zeros_like(diff), diff)
    diff = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)  # nan vs number is a mismatch
    bad = diff > atol + rtol * e.abs().nan_to_num(posinf=0.0, neginf=0.0)
    if not bool(bad.any()):
        return
    finite = diff[diff.isfinite()]
    mean_diff = finite.mean().item() if finite.numel() else float("nan")
    rel = diff / e.abs().clamp_min(1e-300)
    idx = bad.nonzero()
    lines = [
        f"{name}: {int(bad.sum())} of {a.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
        f"max abs diff {diff.max().item():.6g}, mean abs diff {mean_diff:.6g}, "
        f"max rel diff {rel[bad].max().item():.6g}"
    ]
    for row in idx[:10].tolist():
        i = tuple(row)
        lines.append(f"  at {i}: actual {a[i].item()!r}, expected {e[i].item()!r}, diff {diff[i].item():.6g}")
    if len(idx) > 10:
        lines.append(f"  ... and {len(idx) - 10} more")
    raise AssertionError("\n".join(lines))


def _as_float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double()
    return torch.as_tensor(x, dtype=torch.float64)  # Python floats keep their full precision


def check_vs_eager(name, kernel, eager, oracle, rel_atol=4e-7):
    """|kernel - oracle| <= 2 * max|eager - oracle| + atol, with the shared reporter on failure."""
    oracle = oracle.detach().double()
    eager_err = (eager.detach().double() - oracle).abs().max().item() if oracle.numel() else 0.0
    atol = 2 * eager_err + rel_atol * (1.0 + (oracle.abs().max().item() if oracle.numel() else 0.0))
    assert_close_report(kernel, oracle, atol=atol, rtol=0.0, name=f"{name} (eager err {eager_err:.3g})")


def run_token(fn, logits, labels, mask, upstream, **kw):
    """Forward + backward through `fn` with logits as an intermediate (as in a model); returns (out, grad)."""
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1  # intermediate, so the in-place backward writes into a buffer we own
    out = fn(x, labels, mask, **kw)
    (out * upstream).sum().backward()
    return out.detach(), leaf.grad
