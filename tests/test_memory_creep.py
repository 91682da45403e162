"""Memory that does not creep: 300 training steps on pairs of varied lengths hold the process's peak memory.

A run that keeps something per step (TRL #1087: memory growing until an OOM at step ~300) shows it as a
peak that keeps rising after the first steps have met every batch shape. On CPU the peak is the process's
peak RSS (`metrics.peak_memory_gb`, in metrics.jsonl at every step); each run is its own process, so that
nothing else the test session did counts.

Measured on the 2-core CPU (tiny Llama, batch 2, 300 steps), from step 30 to step 300: peak RSS +0.3 to +1.1
MiB (589 MiB; +0.04% to +0.19%) in three runs; with the test-only leak below (every step's loss kept in a
list, graph and all) +28 to +29 MiB (+4.8%, +4.9%). MARGIN = 1.5% of step 30's peak (about 9 MiB) sits
between the two.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from conftest import REPO, WORDS, write_jsonl

MARGIN = 0.015  # of step 30's peak RSS
STEPS = 300

# Test-only: a per-step list that grows, as a gradient-norm history kept as tensors would: each step's LM-head
# gradient (V x H fp32) stays alive after zero_grad drops it. (Each step's loss alone no longer keeps anything
# large: the fused head's backward frees what it saved.)
LEAK = """
import fastdpo.engines as E
kept = []
backward = E.Plain.backward
def leaky(self, model, loss):
    backward(self, model, loss)
    kept.append(model.model.get_output_embeddings().weight.grad)
E.Plain.backward = leaky
"""


@pytest.fixture(scope="module")
def varied_cache(tiny_model, tmp_path_factory) -> str:
    """24 pairs with prompts of 1-40 words and completions of 1-30: about 10 to 180 tokens a row."""
    from fastdpo.recipes.precompute import precompute

    rng = random.Random(0)

    def words(hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, hi)))

    root = tmp_path_factory.mktemp("creep")
    rows = [
        {"prompt": f"Q{i}: {words(40)}?", "chosen": f" {words(30)}.", "rejected": f" {words(30)}!"} for i in range(24)
    ]
    precompute(
        model=tiny_model, dataset=str(write_jsonl(root / "d.jsonl", rows)), output=str(root / "c"), progress=False
    )
    return str(root / "c")


def peak_rss_by_step(tiny_model, cache, out, leak: bool) -> dict[int, float]:
    """Train STEPS steps in a fresh process; {step: peak RSS in MiB} from its metrics.jsonl."""
    argv = ["train", "--model", tiny_model, "--ref-cache", cache, "--output", str(out), "--max-steps", str(STEPS),
            "--batch-size", "2", "--log-every", "100", "--no-progress"]  # fmt: skip
    code = "import sys\nfrom fastdpo.cli import main\n" + (LEAK if leak else "") + f"sys.exit(main({argv!r}))"
    # one thread: on a shared 2-core machine torch's intra-op threads wait on each other for tiny matrices (300 steps
    # in 5 s instead of 40 s)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / "metrics.jsonl") as f:
        return {m["step"]: m["peak_memory_gb"] * 1024 for m in map(json.loads, f)}


def creep(peaks: dict[int, float]) -> float:
    """Growth of the peak from step 30 to step STEPS, as a fraction of step 30's."""
    return peaks[STEPS] / peaks[30] - 1


@pytest.mark.integration
def test_peak_memory_flat_over_300_steps(tiny_model, varied_cache, tmp_path):
    peaks = peak_rss_by_step(tiny_model, varied_cache, tmp_path / "r", leak=False)
    assert len(peaks) == STEPS
    print(f"peak RSS {peaks[30]:.1f} MiB at step 30, {peaks[STEPS]:.1f} at {STEPS}: {100 * creep(peaks):+.2f}%")
    assert creep(peaks) <= MARGIN, f"peak RSS {peaks[30]:.1f} MiB at step 30, {peaks[STEPS]:.1f} at {STEPS}"


@pytest.mark.integration
def test_a_growing_per_step_list_fails_it(tiny_model, varied_cache, tmp_path):
    """The check can fail: the same run keeping a tensor per step (the head's gradient) creeps past the margin."""
    peaks = peak_rss_by_step(tiny_model, varied_cache, tmp_path / "r", leak=True)
    print(f"leak: peak RSS {peaks[30]:.1f} MiB at step 30, {peaks[STEPS]:.1f} at {STEPS}: {100 * creep(peaks):+.2f}%")
    assert creep(peaks) > MARGIN, f"peak RSS {peaks[30]:.1f} MiB at step 30, {peaks[STEPS]:.1f} at {STEPS}"
