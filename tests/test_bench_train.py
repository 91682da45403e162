"""Tests of benchmarks/bench_train.py and train_runs.py.

Fast: the command lines the runs get (optimizer, dtype). Slow (~35 s on 2 cores: a precompute and three method
subprocesses, each importing torch and transformers): the micro preset for two steps on CPU writes the expected CSV
and markdown, the baseline first, every method counting a step's tokens the same way, the first step and the start
apart from the steady state.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from conftest import REPO

from fastdpo import optim

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_fit  # noqa: E402
import bench_train as bench  # noqa: E402
import train_runs  # noqa: E402


def test_fit_optimizer_flags(tmp_path):
    """--fit-optimizers is checked against fastdpo's optimizers; a fastdpo run gets --optimizer, TRL is skipped."""
    with pytest.raises(SystemExit) as e:
        bench_fit.parse_args(["--out", "x", "--fit-optimizers", "adamw,lion"])
    assert e.value.code == 2
    args = bench_fit.parse_args(["--out", "x", "--device", "cpu", "--fit-optimizers", "sgd,adamw"])
    assert args.fit_optimizers == ["sgd", "adamw"]
    assert bench_fit.parse_args(["--out", "x"]).fit_optimizers == ["adamw"]
    setup = train_runs.Setup(model="m", dataset="d.jsonl", n_pairs=4, tmp=tmp_path, logs=tmp_path, args=args)
    argv = train_runs.fastdpo_argv(setup, "fastdpo-packed", 2, 1, "sgd")
    assert argv[argv.index("--optimizer") + 1] == "sgd" and argv[argv.index("--dtype") + 1] == "float32"
    assert "--optimizer" not in train_runs.fastdpo_argv(setup, "fastdpo-packed", 2, 1)  # adamw: as before
    assert train_runs.run_method(setup, "trl-live", 2, 1, "-x", optimizer="sgd")["status"].startswith("skipped")
    for name, spec in optim.OPTIMIZERS.items():  # an optimizer made for bf16 weights trains bf16 weights
        argv = train_runs.fastdpo_argv(setup, "fastdpo-packed", 2, 1, name)
        assert argv[argv.index("--dtype") + 1] == ("bfloat16" if spec.weights == "bf16" else "float32")


def test_bench_train_flags():
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--out", "x", "--steps", "2", "--warmup", "2"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--out", "x", "--time-limit-s", "0"])
    assert e.value.code == 2
    args = bench.parse_args(["--out", "x", "--preset", "micro", "--time-limit-s", "30", "--device", "cpu"])
    assert (args.time_limit_s, args.dtype, args.prompt_len) == (30.0, "fp32", 64)
    assert train_runs.model_name(args) == "micro"


@pytest.mark.integration
def test_bench_train_tiny_cpu_run(tmp_path):
    methods = ["fastdpo-packed", "two-model", "trl-precompute"]
    out = tmp_path / "tiny"
    bench.main(
        [
            "--preset",
            "micro",
            "--data",
            "short",
            "--prompt-len",
            "12",
            "--completion-len",
            "12",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--methods",
            *methods,
            "--out",
            str(out),
        ]
    )
    measured = ["two-model", "fastdpo-packed", "trl-precompute"]  # the baseline first: the ratios need it

    with open(out.with_suffix(".csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        rows = list(reader)
    assert [r["method"] for r in rows] == measured
    for r in rows:
        if r["method"].startswith("trl") and r["status"] == "skipped: trl not installed":
            continue
        assert r["status"] == "ok", r
        assert (r["model"], r["data"], r["device"], r["dtype"]) == ("micro", "short", "cpu", "fp32")
        assert (r["batch_size"], r["steps"], r["measured_steps"]) == ("2", "2", "1")
        p20, med, p80 = float(r["tokens_per_s_p20"]), float(r["tokens_per_s"]), float(r["tokens_per_s_p80"])
        assert 0 < p20 <= med <= p80
        for col in (
            "tokens_per_s_agg",
            "pairs_per_s",
            "step_s",
            "peak_mem_gib",
            "mem_above_start_gib",
            "train_s",
            "total_1run_s",
            "total_k_s",
            "throughput_vs_baseline",
            "memory_vs_baseline",
            "first_step_s",
            "startup_s",
        ):
            assert float(r[col]) > 0, (col, r)
        assert r["peak_mem_kind"] == "cpu_peak_rss" and r["mfu"] == "n/a"  # no FLOP-utilisation claims on CPU
        # the amortised totals: precompute once, then k training runs
        pre = float(r["precompute_s"] or 0)
        assert abs(float(r["total_k_s"]) - (pre + int(r["k"]) * float(r["train_s"]))) < 0.01 * float(r["total_k_s"])
        assert (pre > 0) == (r["method"] != "two-model")
    base = rows[measured.index("two-model")]
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
    assert "CPU" in md and f"torch {torch.__version__}" in md and "--preset micro" in md
    assert "- machine: CPU" in md and "fastdpo precompute --model" in md
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per method
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
