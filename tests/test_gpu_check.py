"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check on CPU with tiny shapes, the same summary layout.

What a GPU session gets from the script is only as good as this run says: each stage has its section, every stage
finished ok or was skipped with a reason (a missing peer, never a failure), and the outputs fit the device tool's
limits (at most 8 files in one folder).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO

STAGES = ["setup", "cuda-tests", "precision", "logps", "train-short", "train-long", "fit", "sharded"]


@pytest.mark.integration
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = sys.executable  # the interpreter running the tests, whatever is on PATH
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    logs = (out / "gpu_check_logs.txt").read_text() if (out / "gpu_check_logs.txt").is_file() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-6000:]

    summary = (out / "gpu_check.md").read_text()
    assert summary.startswith("# fastdpo GPU check") and "dry run" in summary
    table = summary.split("## Stages", 1)[1].split("\n## ", 1)[0]
    statuses = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in STAGES:
            statuses[cells[0]] = cells[1]
    assert list(statuses) == STAGES, table
    for stage, status in statuses.items():
        assert status == "ok" or re.fullmatch(r"skipped: \S.*", status), (stage, status, logs[-6000:])
        assert re.search(rf"^## {re.escape(stage)}: ", summary, re.M), stage  # a section per stage
    assert wall < 300, wall  # about 2 minutes on a 2-core CPU; the stages' own limits add up to 5.5

    # the outputs: within the device tool's limits, the CSVs one per kind
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8, files
    assert {"gpu_check.md", "gpu_check_logs.txt", "logps.csv", "train.csv", "fit.csv", "precision.csv",
            "sharded.csv"} <= set(files)
    with open(out / "precision.csv", newline="") as f:
        prec = {r["dtype"]: r for r in csv.DictReader(f)}
    assert set(prec) == {"float32", "bf16-mixed", "bfloat16", "auto"}
    assert float(prec["bf16-mixed"]["weights_changed"]) >= 0.99 and float(prec["bfloat16"]["norms_changed"]) == 0
    with open(out / "logps.csv", newline="") as f:
        logps = list(csv.DictReader(f))
    providers = {r["provider"] for r in logps}
    assert {"fastdpo-triton", "eager", "compile", "fastdpo-linear", "eager-head", "compile-head", "liger-linear",
            "cce-linear"} <= providers
    for r in logps:  # peers missing on this machine are skipped with their reason
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
    with open(out / "train.csv", newline="") as f:
        train = list(csv.DictReader(f))
    assert {r["stage"] for r in train} == {"train_short", "train_long"}
    methods = {r["method"] for r in train}
    assert methods == {"fastdpo-packed", "fastdpo-padded", "two-model", "trl-live", "trl-precompute"}
    for r in train:
        assert r["status"] == "ok" or r["status"] == "skipped: trl not installed", r
    with open(out / "fit.csv", newline="") as f:
        fit = list(csv.DictReader(f))
    assert [r["method"] for r in fit] == ["fastdpo-packed", "two-model"] and all(r["fit_max_batch"] for r in fit)
    with open(out / "sharded.csv", newline="") as f:
        sharded = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(sharded) == ["unsharded", "fsdp2", "fsdp2-offload", "zero3"]
    assert sharded["fsdp2"]["status"] == "ok" and float(sharded["fsdp2"]["max_abs_loss_diff"]) <= 1e-4
    assert sharded["fsdp2-offload"]["status"].startswith("skipped: ")  # GPU only
    if importlib.util.find_spec("deepspeed") is not None:  # DeepSpeed runs on CPU too (the README installs it)
        assert sharded["zero3"]["status"] == "ok" and float(sharded["zero3"]["max_abs_loss_diff"]) <= 1e-4
    assert "/tmp/gpu_check." not in summary  # the work directory is not in what comes back
