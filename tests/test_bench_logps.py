"""Tests of benchmarks/bench_logps.py: inputs made once per workload and shared, the copy bandwidth row, the rows
written as they are measured, the rows a time limit cuts.

Costs (2 cores, in process): the input tests well under a second; the tiny CPU run ~3 s (integration tier).
"""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_logps as bench  # noqa: E402
import logps_providers  # noqa: E402


def _case(**kw):
    return logps_providers.Case(**{**dict(vocab=50, tokens=64, hidden=8, dtype=torch.float32,
                                          device=torch.device("cpu"), seq_len=32), **kw})  # fmt: skip


def test_inputs_are_seeded_and_shared():
    """The same seed gives the same tensors (made on the case's device); a provider gets views of them, except one
    whose backward overwrites its logits, which gets a fresh copy."""
    a, b = logps_providers.make_inputs(_case(), "logits"), logps_providers.make_inputs(_case(), "logits")
    assert a["logits"].shape == (2, 32, 50) and a["logits"].device.type == "cpu"
    for key in ("logits", "labels", "upstream"):
        assert torch.equal(a[key], b[key]), key
    assert 2.5 < a["logits"].std().item() < 3.5  # std-3 logits
    eager, triton = bench.PROVIDERS["eager"](), bench.PROVIDERS["fastdpo-triton"]()
    assert eager.inputs(a)[0].data_ptr() == a["logits"].data_ptr()  # shared, no copy
    assert triton.mutates and triton.inputs(a)[0].data_ptr() != a["logits"].data_ptr()
    head = logps_providers.make_inputs(_case(), "head")
    assert set(head) == {"hidden", "weight", "labels", "mask", "upstream"} and head["weight"].shape == (50, 8)
    leaves = bench.PROVIDERS["fastdpo-linear"]().inputs(head)
    assert [t.data_ptr() for t in leaves] == [head["hidden"].data_ptr(), head["weight"].data_ptr()]


def test_plan_puts_the_copy_first():
    args = bench.parse_args(["--vocab", "50", "--tokens", "64", "--providers", "eager", "fastdpo-linear", "copy",
                             "--modes", "full", "forward"])  # fmt: skip
    plan = bench.plan(args, torch.device("cpu"))
    assert [(name, mode) for _, name, mode in plan] == [
        ("copy", "copy"), ("eager", "full"), ("eager", "forward"), ("fastdpo-linear", "full"),
        ("fastdpo-linear", "forward")]  # fmt: skip


@pytest.mark.integration
def test_bench_logps_tiny_cpu_run(tmp_path):
    providers = ["copy", "eager", "chunked-torch", "fastdpo-linear", "fastdpo-linear-loss", "eager-head"]
    out = tmp_path / "tiny"
    argv = ["--vocab", "300", "--tokens", "64", "--hidden", "16", "--seq-len", "32", "--dtype", "fp32"]
    argv += ["--providers", *providers, "--modes", "forward", "full", "--reps", "3", "--warmup", "1"]
    bench.main([*argv, "--device", "cpu", "--out", str(out)])

    with open(out.with_suffix(".csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        rows = list(reader)
    expected = [("copy", "copy")] + [(p, m) for p in providers[1:] for m in ("forward", "full")]
    assert [(r["provider"], r["mode"]) for r in rows] == expected
    copy = rows[0]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["vocab"] == "300" and r["tokens"] == "64" and r["dtype"] == "fp32"
        p20, med, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80
        assert r["pct_peak_bw"] in ("", "n/a")  # no datasheet on CPU
        if r["workload"] in ("logits", "copy"):
            # read + write of 64 x 300 fp32 values for the copy; read, or read + write + read, for a provider
            passes = {"copy": 2, "forward": 1, "full": 3}[r["mode"]]
            gbps = passes * 64 * 300 * 4 / (float(r["median_ms"]) / 1e3) / 1e9
            assert abs(float(r["gbps"]) - gbps) <= 0.06 * gbps + 0.06, (r, gbps)
            # both GB/s are written to 0.1 (tiny on CPU: 0.1-1 GB/s), the percentage from the unrounded ones
            g, c = float(r["gbps"]), float(copy["gbps"])
            low, high = 100 * max(g - 0.05, 0) / (c + 0.05), 100 * (g + 0.05) / max(c - 0.05, 1e-9)
            assert low - 0.05 <= float(r["pct_copy_bw"]) <= high + 0.05, (r, copy)
        else:
            assert float(r["tflops"]) > 0 and r["gbps"] == ""
    md = out.with_suffix(".md").read_text()
    assert "CPU" in md and f"torch {torch.__version__}" in md and "| provider |" in md
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per row
    assert f"- device-to-device copy measured in this run (V=300, N=64, fp32): {float(copy['gbps']) / 1e3:.2f}" in md

    # no time: every row is written, as cut (budget)
    cut = bench.main([*argv, "--device", "cpu", "--time-limit-s", "0.000001", "--out", str(tmp_path / "cut")])
    assert [(r["provider"], r["mode"]) for r in cut] == expected
    assert [r["status"] for r in cut] == ["cut (budget)"] * len(expected)
