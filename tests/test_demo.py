"""`fastdpo demo` end to end (reduced recipe), and the bundled data against its generator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from fastdpo import demo_task


@pytest.mark.integration
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
    assert "before (SFT)" in err and "after (DPO)" in err and "win_rate_vs_sft" in err  # the printed table
    lines = err.strip().splitlines()
    assert len(lines) < 40 and sum(ln.startswith("demo ") for ln in lines) == 7, err  # a line per stage
    # the win rate against the SFT model, program judge, both orders of every pair in the comparison's report
    assert before["win_rate_vs_sft"] == 0.5 and after["win_rate_vs_sft"] > 0.9
    vs = json.loads((out / "compare" / "report.json").read_text())
    assert vs["win_rate"] == after["win_rate_vs_sft"] == report["compare"]["win_rate"] and vs["n"] == 100
    assert vs["ci95"][0] > 0.9 and vs["orders"]["disagree"] == 0
    for p in vs["pairs"]:
        judged = p["judgement"]
        assert {judged["model_first"]["raw"], judged["baseline_first"]["raw"]} <= {"a", "b", "tie"}
        if p["winner"] == "model":  # the DPO answer is right and the SFT answer is not, whichever was shown first
            assert (judged["model_first"]["raw"], judged["baseline_first"]["raw"]) == ("a", "b")
            assert demo_task.judge(p["prompt"], p["model"]["text"])
            assert not demo_task.judge(p["prompt"], p["baseline"]["text"])
    assert "%|" not in err and "Traceback" not in err  # no progress bars, ours or the libraries'
    assert "sft: 400 steps" in (out / "demo.log").read_text() or "steps in" in (out / "demo.log").read_text()
    pngs = [p for p in report["plots"]]
    assert any(p.endswith("before_after.png") for p in pngs) and any(p.endswith("curves.png") for p in pngs)
    assert any(p.endswith("compare.png") for p in pngs)
    for p in pngs:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert (out / ".fastdpo-demo.json").is_file() and not (out / ".fastdpo.lock").exists()
    # the pieces a user can reuse: models load, caches verify
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "dpo")


def test_output_is_the_demos_only_by_its_marker(tmp_path, monkeypatch):
    """A directory holding a `base` of the user's is not the demo's: refused, untouched, unless --overwrite."""
    from conftest import one_line_error

    from fastdpo import demo

    out = tmp_path / "work"
    (out / "base").mkdir(parents=True)
    (out / "base" / "config.json").write_text('{"mine": true}')
    one_line_error(*run_cli("demo", "--output", out, "--no-progress"), "is not a fastdpo demo's directory",
                   "--overwrite", alone=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["base", "base/config.json"]

    def reached(*a, **k):  # past the claim: the demo would build its model now
        raise RuntimeError("the demo started")

    monkeypatch.setattr(demo.demo_task, "build_model", reached)
    for args in (["--overwrite"], []):  # --overwrite: the user asked; then the marker makes it the demo's
        with pytest.raises(RuntimeError, match="the demo started"):
            run_cli("demo", "--output", out, "--no-progress", *args)
        assert (out / ".fastdpo-demo.json").is_file() and not (out / ".fastdpo.lock").exists()


def test_judge():
    assert demo_task.judge("upper: qrva\n", "QRVA")
    assert demo_task.judge("upper: qrva\n", " QRVA\nmore")
    assert not demo_task.judge("upper: qrva\n", "QRVa")
    assert demo_task.judge_pair("upper: qrva\n", "QRVA", "QRVa") == "a"
    assert demo_task.judge_pair("upper: qrva\n", "QRVa", "QRVA\n") == "b"
    assert demo_task.judge_pair("upper: qrva\n", "QRVa", "qrva") == demo_task.judge_pair("upper: qrva\n", "QRVA",
                                                                                          "QRVA") == "tie"


def test_bundled_data_matches_its_generator():
    proc = subprocess.run([sys.executable, "tools/make_demo_data.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    size = sum(demo_task.data_file(s).stat().st_size for s in ("sft", "train", "eval"))
    assert size < 2 * 2**20
