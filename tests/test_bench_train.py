"""Smoke test for benchmarks/bench_train.py: the tiny preset for a few steps on CPU writes the expected CSV,
markdown and PNG.

Three of the five methods, to stay well under a minute and a half on a loaded 2-core machine (each method is a
subprocess that imports torch and transformers): the fastdpo cache path, the two-model baseline the ratios are
taken against, and TRL's trainer (with its precompute, so its reference-pass timing is exercised too).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import REPO, load_script


@pytest.mark.slow
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
