"""Smoke test for benchmarks/bench_logps.py: a tiny CPU run with torch providers writes the expected CSV/markdown."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import REPO, load_script


@pytest.mark.integration
def test_bench_logps_tiny_cpu_run(tmp_path):
    bench = load_script(REPO / "benchmarks" / "bench_logps.py")
    providers = ["eager", "chunked-torch", "fastdpo-linear", "eager-head"]
    modes = ["forward", "backward", "full"]
    out = tmp_path / "tiny"
    argv = ["--vocab", "300", "--tokens", "64", "--hidden", "16", "--seq-len", "32", "--dtype", "fp32"]
    argv += ["--providers", *providers, "--modes", *modes, "--reps", "3", "--warmup", "1"]
    argv += ["--device", "cpu", "--out", str(out)]
    bench.main(argv)

    with open(out.with_suffix(".csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        rows = list(reader)
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in providers for m in modes]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["vocab"] == "300" and r["tokens"] == "64" and r["dtype"] == "fp32"
        p20, med, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80
        assert r["workload"] == ("head" if "head" in r["provider"] or "linear" in r["provider"] else "logits")
        if r["workload"] == "logits":
            assert r["gbps"] == "n/a" and r["pct_peak_bw"] == "n/a"  # no bandwidth claims on CPU
        else:
            assert float(r["tflops"]) > 0
        assert r["peak_mem_kind"] in ("cpu_peak_rss_delta", "n/a")

    md = out.with_suffix(".md").read_text()
    assert "CPU" in md and f"torch {torch.__version__}" in md and "| provider |" in md
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per row
