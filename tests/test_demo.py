"""`fastdpo demo` end to end (reduced recipe), and the bundled data against its generator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from fastdpo import demo_task


@pytest.mark.slow
def test_demo_end_to_end_shows_improvement(tmp_path):
    out = tmp_path / "demo"
    code, err = run_cli("demo", "--output", out, "--reduced", "--no-progress")
    assert code == 0, err[-3000:]
    report = json.loads((out / "demo_report.json").read_text())
    before, after = report["before"], report["after"]
    for side in (before, after):
        assert {"preference_accuracy", "generation_accuracy"} <= set(side)
    assert before["preference_accuracy"] == 0.5  # the SFT model is its own reference: every pair ties
    assert before["generation_accuracy"] < 0.2  # the noisy SFT data taught the slip
    assert after["preference_accuracy"] > 0.9
    assert after["generation_accuracy"] > before["generation_accuracy"] + 0.5
    assert "before (SFT)" in err and "after (DPO)" in err  # the printed table
    lines = err.strip().splitlines()
    assert len(lines) < 40 and sum(ln.startswith("demo ") for ln in lines) == 6, err  # a line per stage
    assert "%|" not in err and "Traceback" not in err  # no progress bars, ours or the libraries'
    assert "sft: 400 steps" in (out / "demo.log").read_text() or "steps in" in (out / "demo.log").read_text()
    pngs = [p for p in report["plots"]]
    assert any(p.endswith("before_after.png") for p in pngs) and any(p.endswith("curves.png") for p in pngs)
    for p in pngs:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # the pieces a user can reuse: models load, caches verify
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "dpo")


def test_judge():
    assert demo_task.judge("upper: qrva\n", "QRVA")
    assert demo_task.judge("upper: qrva\n", " QRVA\nmore")
    assert not demo_task.judge("upper: qrva\n", "QRVa")


def test_bundled_data_matches_its_generator():
    proc = subprocess.run([sys.executable, "tools/make_demo_data.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    size = sum(demo_task.data_file(s).stat().st_size for s in ("sft", "train", "eval"))
    assert size < 2 * 2**20
