"""Tests of benchmarks/fit_estimate.py: its arithmetic on a case computed by hand, its measurements (bytes per
parameter, activation bytes) on the 2-layer test Llama in process, that it uses public fastdpo functions only, and
(integration tier) a whole run on the micro preset.

Costs (2 cores): the arithmetic and import tests well under a second; the measurements ~1-3 s each; the whole run
~10 s.
"""

from __future__ import annotations

import ast
import csv
import sys

import pytest
from conftest import REPO

from fastdpo import optim
from fastdpo.modeling import load_model

sys.path.insert(0, str(REPO / "benchmarks"))
import fit_estimate as fe  # noqa: E402


def test_estimate_bytes_by_hand(monkeypatch):
    from fastdpo.kernels import linear_loss

    arch = dict(params=1_000_000_000, linear_params=800_000_000, layers=10, hidden=1000, intermediate=3000, vocab=1000)
    coef = dict(
        precision="bf16-mixed", a_hidden=10.0, a_intermediate=2.0, a_held=4.0, a_outside=8.0, copies_per_param=2.0
    )
    monkeypatch.setattr(linear_loss, "_LOSS_TILE_BYTES", 2**30)  # chunk: 2**30 // (1000 * 4) tokens > T
    est = fe.estimate_bytes(arch, coef, 16.0, 2048, False, 2**30)
    assert est["state"] == 16e9
    assert est["weight_copies"] == 2 * (800e6 + 1000 * 1000)  # the layers' matmuls and the head's, in bf16
    # T L (a_h H + a_i I) + a_out T H = 327 680 000 + 16 384 000
    assert est["activations"] == 2048 * 10 * (10 * 1000 + 2 * 3000) + 8 * 2048 * 1000 == 344_064_000
    assert est["head"] == 4 * 1000 * 1000 + 4 * 2048 * 1000 + 2048 * 1000 * 2  # grad_weight, grad_hidden, bf16 tile
    assert est["overhead"] == 2**30
    assert est["total"] == 16e9 + 1.602e9 + 344_064_000 + 16_288_000 + 2**30
    ckpt = fe.estimate_bytes(arch, coef, 16.0, 2048, True, 2**30)
    # the layers' inputs (4 B per hidden unit), one layer recomputed in backward, what is outside the layers
    assert ckpt["activations"] == 4 * 2048 * 10 * 1000 + 2048 * (10 * 1000 + 2 * 3000) + 8 * 2048 * 1000
    assert ckpt["total"] - est["total"] == 131_072_000 - 344_064_000
    monkeypatch.setattr(linear_loss, "_LOSS_TILE_BYTES", 400_000)  # 100 tokens per chunk: the tile is capped
    capped = fe.estimate_bytes(arch, dict(coef, precision="bfloat16", copies_per_param=0.0), 10.0, 2048, False, 0)
    assert capped["head"] == 4 * 1000 * 1000 + 4 * 2048 * 1000 + 200 * 1000 * 2  # bf16 weights: 200 tokens a chunk
    assert capped["weight_copies"] == 0 and capped["state"] == 10e9


@pytest.mark.parametrize(
    "optimizer,kwargs,expected",
    [
        ("adamw", {}, 16.0),  # fp32 weights, gradients, two moments
        ("sgd", {}, 8.0),  # no state without momentum
        ("sgd", {"momentum": 0.9}, 12.0),  # one momentum buffer
    ],
)
def test_measure_state_bytes(tiny_model, optimizer, kwargs, expected):
    m = fe.measure_state_bytes(tiny_model, optimizer, **kwargs)
    assert m["weights_per_param"] == m["gradients_per_param"] == 4.0
    # AdamW's per-tensor `step` scalars are the only other bytes: well under 0.01 per parameter here
    assert abs(m["bytes_per_param"] - expected) < 0.01, m
    assert m["params"] == sum(p.numel() for p in load_model(tiny_model).parameters())


@pytest.mark.parametrize("name", [o for o in optim.OPTIMIZERS if o not in ("adamw", "sgd")])
def test_measure_state_bytes_low_precision(tiny_model, name):
    """The benchmark's measurement through a fastdpo step, for the optimizers fastdpo.optim adds: the weights it
    declares (bf16 for an optimizer made for them), and its declared bytes/param within 5% (tests/test_optimizers.py
    checks the declared numbers themselves; here the small matrices of the test Llama keep more fp32 moments)."""
    spec = optim.OPTIMIZERS[name]
    if spec.module:
        pytest.importorskip(spec.module)
    m = fe.measure_state_bytes(tiny_model, name)
    assert m["weights_per_param"] == m["gradients_per_param"] == (2.0 if spec.weights == "bf16" else 4.0), m
    assert abs(m["bytes_per_param"] - spec.bytes_per_param) <= 0.05 * spec.bytes_per_param, m


def test_measure_saved_bytes(tiny_model):
    """Saved activations: positive, linear in tokens, far smaller with checkpointing (the layers' inputs stay), the
    fused head's grad_weight and grad_hidden, and bf16-mixed's bf16 copies of the matmul weights."""
    m = {ck: fe.measure_saved_bytes(tiny_model, "float32", ck, 2, 12, 20) for ck in (False, True)}
    off, on = m[False], m[True]
    tokens, layers, hidden, vocab = off["tokens"], off["layers"], off["hidden"], off["vocab"]
    assert (tokens, off["scored_tokens"], layers, hidden) == (2 * 2 * 32, 2 * 2 * 20, 2, 64)
    assert off["layer_bytes"] > 0 and off["mlp_bytes"] > 0 and off["a_intermediate"] > 0
    assert off["outside_bytes"] == on["outside_bytes"] > 0  # embedding and final norm: never checkpointed
    assert on["per_token_layer_hidden"] < 0.5 * off["per_token_layer_hidden"]
    assert on["held_bytes"] >= layers * tokens * hidden * 4  # each layer's fp32 input, held by its checkpoint
    assert on["layer_bytes"] == on["mlp_bytes"] == 0 and off["held_bytes"] == 0
    for r in (off, on):
        head = 4 * vocab * hidden + 4 * r["scored_tokens"] * hidden  # fp32 grad_weight (V, H) and grad_hidden (S, H)
        # plus the per-pair loss's own small graph inside the chunk loop: a few fp32/int64 values per scored token
        assert 0 <= r["head_bytes"] - head <= 64 * r["scored_tokens"], (r["head_bytes"], head)
        assert r["copies_bytes"] == 0  # fp32: no casts of weights
    # linear in tokens: twice the completion tokens, the same bytes per token (no T^2 attention term on this path)
    longer = fe.measure_saved_bytes(tiny_model, "float32", False, 2, 12, 52)
    assert longer["tokens"] == 2 * tokens
    assert abs(longer["per_token_layer_hidden"] - off["per_token_layer_hidden"]) < 0.01 * off["per_token_layer_hidden"]
    mixed = fe.measure_saved_bytes(tiny_model, "bf16-mixed", False, 2, 12, 20)
    assert mixed["copies_per_param"] == 2.0  # a bf16 copy of every matmul weight of the layers, held to backward
    assert mixed["per_token_layer_hidden"] < off["per_token_layer_hidden"]  # matmul outputs in bf16


def test_fit_estimate_uses_public_fastdpo_functions_only():
    """Every name fit_estimate.py takes from fastdpo, and every attribute it reads off a fastdpo module, is public."""
    tree = ast.parse((REPO / "benchmarks" / "fit_estimate.py").read_text())
    modules, names = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdpo"):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            for alias in node.names:
                names.append(alias.name)
                modules.add(alias.asname or alias.name)
    assert names and not [n for n in names if n.startswith("_")], names
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
             and n.value.id in modules]  # fmt: skip
    assert attrs and not [a for a in attrs if a.startswith("_")], attrs


@pytest.mark.integration
def test_fit_estimate_run(tmp_path):
    """A whole run on the micro preset, two optimizers: the CSV's parts add up, the verdicts follow the totals, the
    markdown names the largest fitting model per budget and says it is an estimate."""
    out = tmp_path / "est"
    fe.main(["--preset", "micro", "--batch-size", "2", "--prompt-len", "12", "--completion-len", "12",
             "--fit-optimizers", "adamw,sgd", "--out", str(out)])  # fmt: skip
    with open(out.with_suffix(".csv"), newline="") as f:
        est = list(csv.DictReader(f))
    assert len(est) == len(fe.FIT_ESTIMATE_MODELS) * 2 * 2  # models x optimizers x checkpointing off/on
    parts = ("state_gib", "weight_copies_gib", "activations_gib", "head_gib", "overhead_gib")
    by = {(r["model"], r["optimizer"], r["gradient_checkpointing"]): r for r in est}
    for r in est:
        assert abs(sum(float(r[p]) for p in parts) - float(r["total_gib"])) <= 0.03  # each part rounded to 0.01
        for budget in (24, 80):
            assert r[f"fits_{budget}gib"] == str(float(r["total_gib"]) <= budget)
        assert r["bytes_per_param_source"] == "measured"
        assert r["bytes_per_param"] == {"adamw": "16.000", "sgd": "8.000"}[r["optimizer"]]
        assert r["tokens"] == str(8 * 2 * 1024) and r["precision"] == "bf16-mixed"
        same = by[(r["model"], "sgd" if r["optimizer"] == "adamw" else "adamw", r["gradient_checkpointing"])]
        assert (float(r["state_gib"]) < float(same["state_gib"])) == (r["optimizer"] == "sgd")
        if r["gradient_checkpointing"] == "True":
            assert float(r["activations_gib"]) < float(by[(r["model"], r["optimizer"], "False")]["activations_gib"])
    md = out.with_suffix(".md").read_text()
    section = md.split("## Largest model that fits one GPU (estimate)", 1)[1]
    assert "**Estimate from CPU measurements (bytes/param measured on micro, activations from saved tensors)" in section
    for optimizer in ("adamw", "sgd"):
        for ckpt in ("False", "True"):
            fitting = [r for r in est if r["optimizer"] == optimizer and r["gradient_checkpointing"] == ckpt
                       and r["fits_80gib"] == "True"]  # fmt: skip
            if fitting:
                best = max(fitting, key=lambda r: int(r["params"]))
                line = next(
                    x
                    for x in section.splitlines()
                    if x.startswith(f"| {optimizer} |") and f"| {'on' if ckpt == 'True' else 'off'} |" in x
                )
                assert line.endswith(f"| {best['model']} ({best['total_gib']} GiB) |"), line
