"""Tests of benchmarks/bench_train.py.

Fast: the fit estimate's arithmetic on a case computed by hand, and its measurements (bytes per parameter,
activation bytes) on the 2-layer test Llama, in process.

Slow (smoke): the tiny preset for a few steps on CPU writes the expected CSV, markdown and PNG. Three of the five
methods, to stay well under a minute and a half on a loaded 2-core machine (each method is a subprocess that imports
torch and transformers): the fastdpo cache path, the two-model baseline the ratios are taken against, and TRL's
trainer (with its precompute, so its reference-pass timing is exercised too). A second smoke run exercises the fit
test over two optimizers and the fit estimate.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import REPO, load_script

from fastdpo import optim
from fastdpo.modeling import load_model


@pytest.fixture(scope="module")
def bench():
    return load_script(REPO / "benchmarks" / "bench_train.py")


# ----------------------------------------------------------------------------------------------------------------
# the fit estimate
# ----------------------------------------------------------------------------------------------------------------


def test_estimate_bytes_by_hand(bench, monkeypatch):
    from fastdpo.kernels import linear_loss

    arch = dict(params=1_000_000_000, linear_params=800_000_000, layers=10, hidden=1000, intermediate=3000,
                vocab=1000)
    coef = dict(precision="bf16-mixed", a_hidden=10.0, a_intermediate=2.0, a_held=4.0, a_outside=8.0,
                copies_per_param=2.0)
    monkeypatch.setattr(linear_loss, "_LOSS_TILE_BYTES", 2**30)  # chunk: 2**30 // (1000 * 4) tokens > T
    est = bench.estimate_bytes(arch, coef, 16.0, 2048, False, 2**30)
    assert est["state"] == 16e9
    assert est["weight_copies"] == 2 * (800e6 + 1000 * 1000)  # the layers' matmuls and the head's, in bf16
    # T L (a_h H + a_i I) + a_out T H = 327 680 000 + 16 384 000
    assert est["activations"] == 2048 * 10 * (10 * 1000 + 2 * 3000) + 8 * 2048 * 1000 == 344_064_000
    assert est["head"] == 4 * 1000 * 1000 + 4 * 2048 * 1000 + 2048 * 1000 * 2  # grad_weight, grad_hidden, bf16 tile
    assert est["overhead"] == 2**30
    assert est["total"] == 16e9 + 1.602e9 + 344_064_000 + 16_288_000 + 2**30
    ckpt = bench.estimate_bytes(arch, coef, 16.0, 2048, True, 2**30)
    # the layers' inputs (4 B per hidden unit), one layer recomputed in backward, what is outside the layers
    assert ckpt["activations"] == 4 * 2048 * 10 * 1000 + 2048 * (10 * 1000 + 2 * 3000) + 8 * 2048 * 1000
    assert ckpt["total"] - est["total"] == 131_072_000 - 344_064_000
    monkeypatch.setattr(linear_loss, "_LOSS_TILE_BYTES", 400_000)  # 100 tokens per chunk: the tile is capped
    capped = bench.estimate_bytes(arch, dict(coef, precision="bfloat16", copies_per_param=0.0), 10.0, 2048, False, 0)
    assert capped["head"] == 4 * 1000 * 1000 + 4 * 2048 * 1000 + 200 * 1000 * 2  # bf16 weights: 200 tokens a chunk
    assert capped["weight_copies"] == 0 and capped["state"] == 10e9


@pytest.mark.parametrize("optimizer,kwargs,expected", [
    ("adamw", {}, 16.0),  # fp32 weights, gradients, two moments
    ("sgd", {}, 8.0),  # no state without momentum
    ("sgd", {"momentum": 0.9}, 12.0),  # one momentum buffer
])
def test_measure_state_bytes(bench, tiny_model, optimizer, kwargs, expected):
    m = bench.measure_state_bytes(tiny_model, optimizer, **kwargs)
    assert m["weights_per_param"] == m["gradients_per_param"] == 4.0
    # AdamW's per-tensor `step` scalars are the only other bytes: well under 0.01 per parameter here
    assert abs(m["bytes_per_param"] - expected) < 0.01, m
    assert m["params"] == sum(p.numel() for p in load_model(tiny_model).parameters())


@pytest.mark.parametrize("name", [o for o in optim.OPTIMIZERS if o not in ("adamw", "sgd")])
def test_measure_state_bytes_low_precision(bench, tiny_model, name):
    """The benchmark's measurement through a fastdpo step, for the optimizers fastdpo.optim adds: the weights it
    declares (bf16 for an optimizer made for them), and its declared bytes/param within 5% (tests/test_optimizers.py
    checks the declared numbers themselves; here the small matrices of the test Llama keep more fp32 moments)."""
    spec = optim.OPTIMIZERS[name]
    if spec.module:
        pytest.importorskip(spec.module)
    m = bench.measure_state_bytes(tiny_model, name)
    assert m["weights_per_param"] == m["gradients_per_param"] == (2.0 if spec.weights == "bf16" else 4.0), m
    assert abs(m["bytes_per_param"] - spec.bytes_per_param) <= 0.05 * spec.bytes_per_param, m


def test_measure_saved_bytes(bench, tiny_model):
    """Saved activations: positive, linear in tokens, far smaller with checkpointing (the layers' inputs stay), the
    fused head's grad_weight and grad_hidden, and bf16-mixed's bf16 copies of the matmul weights."""
    m = {ck: bench.measure_saved_bytes(tiny_model, "float32", ck, 2, 12, 20) for ck in (False, True)}
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
    longer = bench.measure_saved_bytes(tiny_model, "float32", False, 2, 12, 52)
    assert longer["tokens"] == 2 * tokens
    assert abs(longer["per_token_layer_hidden"] - off["per_token_layer_hidden"]) < 0.01 * off["per_token_layer_hidden"]
    mixed = bench.measure_saved_bytes(tiny_model, "bf16-mixed", False, 2, 12, 20)
    assert mixed["copies_per_param"] == 2.0  # a bf16 copy of every matmul weight of the layers, held to backward
    assert mixed["per_token_layer_hidden"] < off["per_token_layer_hidden"]  # matmul outputs in bf16


def test_fit_optimizer_flags(bench, tmp_path):
    """--fit-optimizers is checked against fastdpo's optimizers; a fastdpo run gets --optimizer, TRL is skipped."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--out", "x", "--fit-optimizers", "adamw,lion"])
    assert e.value.code == 2
    args = bench.parse_args(["--out", "x", "--device", "cpu", "--fit-optimizers", "sgd,adamw"])
    assert args.fit_optimizers == ["sgd", "adamw"]
    assert bench.parse_args(["--out", "x"]).fit_optimizers == list(optim.OPTIMIZERS)
    setup = bench.Setup(model="m", dataset="d.jsonl", n_pairs=4, tmp=tmp_path, logs=tmp_path, args=args)
    argv = bench.fastdpo_argv(setup, "fastdpo-packed", 2, 1, "sgd")
    assert argv[argv.index("--optimizer") + 1] == "sgd" and argv[argv.index("--dtype") + 1] == "float32"
    assert "--optimizer" not in bench.fastdpo_argv(setup, "fastdpo-packed", 2, 1)  # adamw: the command as before
    assert bench.run_method(setup, "trl-live", 2, 1, "-x", optimizer="sgd")["status"].startswith("skipped")
    for name, spec in optim.OPTIMIZERS.items():  # an optimizer made for bf16 weights trains bf16 weights
        argv = bench.fastdpo_argv(setup, "fastdpo-packed", 2, 1, name)
        assert argv[argv.index("--dtype") + 1] == ("bfloat16" if spec.weights == "bf16" else "float32")


@pytest.mark.integration
def test_bench_train_tiny_cpu_run(tmp_path):
    bench = load_script(REPO / "benchmarks" / "bench_train.py")
    methods = ["fastdpo-packed", "two-model", "trl-precompute"]
    out = tmp_path / "tiny"
    bench.main(["--preset", "tiny", "--data", "short", "--prompt-len", "12", "--completion-len", "12",
                "--steps", "2", "--warmup", "1", "--batch-size", "2", "--device", "cpu", "--methods", *methods,
                "--out", str(out)])

    with open(out.with_suffix(".csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        rows = list(reader)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        if r["method"].startswith("trl") and r["status"] == "skipped: trl not installed":
            continue
        assert r["status"] == "ok", r
        assert (r["model"], r["data"], r["device"], r["dtype"]) == ("tiny", "short", "cpu", "fp32")
        assert (r["batch_size"], r["steps"], r["measured_steps"]) == ("2", "2", "1")
        p20, med, p80 = float(r["tokens_per_s_p20"]), float(r["tokens_per_s"]), float(r["tokens_per_s_p80"])
        assert 0 < p20 <= med <= p80
        for col in ("tokens_per_s_agg", "pairs_per_s", "step_s", "peak_mem_gib", "mem_above_start_gib", "train_s",
                    "total_1run_s", "total_k_s", "throughput_vs_baseline", "memory_vs_baseline"):
            assert float(r[col]) > 0, (col, r)
        assert r["peak_mem_kind"] == "cpu_peak_rss" and r["mfu"] == "n/a"  # no FLOP-utilisation claims on CPU
        # the amortised totals: precompute once, then k training runs
        pre = float(r["precompute_s"] or 0)
        assert abs(float(r["total_k_s"]) - (pre + int(r["k"]) * float(r["train_s"]))) < 0.01 * float(r["total_k_s"])
        assert (pre > 0) == (r["method"] != "two-model")
    base = rows[methods.index("two-model")]
    assert base["throughput_vs_baseline"] == base["memory_vs_baseline"] == "1.000"

    # every method counts a step's tokens the same way: fastdpo's epoch plan agrees with what fastdpo ran (padded,
    # so no shared prompt), and TRL's padded batches hold the same tokens over the epoch (4 pairs, all of the data)
    logs = tmp_path / "tiny_logs"
    base_steps = json.loads((logs / "two-model-run0.steps.json").read_text())
    assert base_steps["step_tokens"] == base_steps["model_tokens"]
    if rows[2]["status"] == "ok":
        trl_steps = json.loads((logs / "trl-precompute-run0.steps.json").read_text())
        assert sum(trl_steps["step_tokens"]) == sum(base_steps["step_tokens"])

    md = out.with_suffix(".md").read_text()
    assert "CPU" in md and f"torch {torch.__version__}" in md and "--preset tiny" in md
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per method
    assert "- machine: CPU" in md and "fastdpo precompute --model" in md
    # the benchmark reports numbers and ratios; judging them against goals is the READMEs' job
    assert "## Goals" not in md and "met**" not in md and "missed" not in md
    ratios = md.split("## Ratios between methods", 1)[1].split("\n## ", 1)[0]
    for what in ("tokens/s", "peak memory"):
        assert f"- fastdpo-packed ÷ two-model, {what}: " in ratios
    if rows[2]["status"] == "ok":
        assert "- fastdpo-packed ÷ trl-precompute: " in ratios
    assert not hasattr(bench, "goals")
    assert out.with_suffix(".png").stat().st_size > 1000
    assert (logs / "precompute.log").is_file()


@pytest.mark.integration
def test_bench_train_fit_cpu(bench, tmp_path):
    """The fit test over two optimizers and the fit estimate: one fastdpo method, one batch size per optimizer."""
    out = tmp_path / "fit"
    bench.main(["--preset", "tiny", "--data", "short", "--prompt-len", "12", "--completion-len", "12", "--steps", "2",
                "--warmup", "1", "--batch-size", "2", "--device", "cpu", "--methods", "fastdpo-packed", "--fit-test",
                "--fit-budget-gb", "100", "--fit-start-batch", "2", "--fit-max-batch", "2", "--fit-optimizers",
                "adamw,sgd", "--fit-estimate", "--out", str(out)])

    with open(tmp_path / "fit_fit.csv", newline="") as f:
        fits = list(csv.DictReader(f))
    assert [(r["method"], r["optimizer"], r["dtype"], r["fit_max_batch"]) for r in fits] == [
        ("fastdpo-packed", "adamw", "fp32", ">=2"), ("fastdpo-packed", "sgd", "fp32", ">=2")]
    assert all(float(r["fit_peak_gib"]) > 0 for r in fits)
    with open(out.with_suffix(".csv"), newline="") as f:
        (main_row,) = list(csv.DictReader(f))
    assert (main_row["fit_optimizer"], main_row["fit_max_batch"]) == ("adamw", ">=2")
    sgd_log = (tmp_path / "fit_logs" / "fastdpo-packed-fit-sgd-2.log").read_text().splitlines()[0]
    assert "--optimizer sgd" in sgd_log

    with open(tmp_path / "fit_fit_estimate.csv", newline="") as f:
        est = list(csv.DictReader(f))
    assert len(est) == len(bench.FIT_ESTIMATE_MODELS) * 2 * 2  # models x optimizers x checkpointing off/on
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
    assert "## Fit test: the largest batch under 100 GiB, per optimizer" in md
    section = md.split("## Largest model that fits one GPU (estimate)", 1)[1].split("\n## ", 1)[0]
    assert ("**Estimate from CPU measurements (bytes/param measured on tiny, activations from saved tensors); not "
            "measured on a GPU.**") in section
    for optimizer in ("adamw", "sgd"):
        for ckpt in ("False", "True"):
            fitting = [r for r in est if r["optimizer"] == optimizer and r["gradient_checkpointing"] == ckpt
                       and r["fits_80gib"] == "True"]
            if fitting:
                best = max(fitting, key=lambda r: int(r["params"]))
                line = next(x for x in section.splitlines()
                            if x.startswith(f"| {optimizer} |") and f"| {'on' if ckpt == 'True' else 'off'} |" in x)
                assert line.endswith(f"| {best['model']} ({best['total_gib']} GiB) |"), line
