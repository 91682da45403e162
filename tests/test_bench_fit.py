"""Tests of benchmarks/bench_fit.py: the verdicts are told apart (fits, oom, error, skipped), never a false "does not
fit".

Costs (2 cores): the verdict tests run the search over a scripted run function, in process, well under a second;
test_real_worker_error starts one real training worker that fails (~8 s, integration tier).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import pytest
from conftest import REPO

from fastdpo import optim

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_fit  # noqa: E402
import common  # noqa: E402
import train_runs  # noqa: E402


def _setup(tmp_path, **kw):
    args = argparse.Namespace(fit_start_batch=2, fit_max_batch=16, fit_steps=1, fit_budget_gb=4.0, **kw)
    return train_runs.Setup(model="m", dataset="d.jsonl", n_pairs=16, tmp=tmp_path, logs=tmp_path, args=args)


def scripted(results: dict):
    """A run function: batch -> the result train_runs.run_method would return; records the batches tried."""
    tried = []

    def run(setup, method, batch, steps, tag, budget_gib=None, optimizer="adamw"):
        tried.append(batch)
        return results[batch]

    run.tried = tried
    return run


def ok(peak):
    return {"status": "ok", "peak_gib": peak}


def test_fits_until_oom(tmp_path):
    run = scripted({2: ok(1.0), 4: ok(2.0), 8: {"status": "oom", "peak_gib": 3.9}})
    res = bench_fit.fit_test(_setup(tmp_path), "fastdpo-packed", "adamw", run=run)
    assert run.tried == [2, 4, 8]
    assert (res["verdict"], res["fit_max_batch"], res["fit_peak_gib"]) == ("fits", "4", "2.000")
    assert res["attempts"] == ["2: fits 1.00 GiB", "4: fits 2.00 GiB", "8: oom 3.90 GiB"]


def test_peak_over_budget_is_oom(tmp_path):
    """CPU: a run that finishes but peaks over the budget does not fit (there is no allocator cap there)."""
    run = scripted({2: ok(4.5)})
    res = bench_fit.fit_test(_setup(tmp_path), "two-model", "adamw", run=run)
    assert (res["verdict"], res["fit_max_batch"], res["fit_peak_gib"]) == ("oom", "<2", "")


def test_reaches_the_largest_batch(tmp_path):
    run = scripted({b: ok(0.1 * b) for b in (2, 4, 8, 16)})
    res = bench_fit.fit_test(_setup(tmp_path), "fastdpo-packed", "adamw", run=run)
    assert run.tried == [2, 4, 8, 16] and (res["verdict"], res["fit_max_batch"]) == ("fits", ">=16")


@pytest.mark.parametrize("first", [True, False])
def test_injected_error_is_error_not_does_not_fit(tmp_path, first):
    """A non-OOM failure (here a RuntimeError in the worker) is `error: reason`: the search stops, and the row keeps
    what fitted before it, never "<start" or "does not fit"."""
    results = {2: ok(1.0), 4: {"status": "error: RuntimeError: injected failure"}}
    if first:
        results[2] = {"status": "error: RuntimeError: injected failure"}
    run = scripted(results)
    res = bench_fit.fit_test(_setup(tmp_path), "fastdpo-packed", "adamw", run=run)
    assert res["verdict"] == "error: RuntimeError: injected failure"
    assert res["fit_max_batch"] == ("" if first else "2") and run.tried == ([2] if first else [2, 4])
    assert "oom" not in " ".join(res["attempts"]) and "<" not in res["fit_max_batch"]


def test_missing_library_is_skipped_before_any_run(tmp_path, monkeypatch):
    spec = dataclasses.replace(optim.OPTIMIZERS["adamw-8bit"], module="no_such_library_for_fastdpo")
    monkeypatch.setitem(optim.OPTIMIZERS, "adamw-8bit", spec)
    run = scripted({})
    res = bench_fit.fit_test(_setup(tmp_path), "fastdpo-packed", "adamw-8bit", run=run)
    assert run.tried == [] and res["verdict"] == "skipped (library missing)" == bench_fit.MISSING
    assert res["attempts"] == ["no_such_library_for_fastdpo not importable"] and res["fit_max_batch"] == ""
    assert bench_fit.library_missing("adamw") is None  # torch's: always there


def test_time_limit_cuts(tmp_path):
    """The next attempt is not started when the time left is less than the last attempt took."""
    import time

    results = {2: ok(1.0), 4: ok(1.5)}

    def slow_run(setup, method, batch, steps, tag, budget_gib=None, optimizer="adamw"):
        time.sleep(0.3)
        return results[batch]

    setup = _setup(tmp_path)
    setup.deadline = common.Deadline(0.4)
    res = bench_fit.fit_test(setup, "fastdpo-packed", "adamw", run=slow_run)
    assert (res["verdict"], res["fit_max_batch"]) == ("fits", ">=2") and res["attempts"][-1] == common.CUT
    setup.deadline = common.Deadline(-1.0)  # no time at all: not one attempt
    res = bench_fit.fit_test(setup, "fastdpo-packed", "adamw", run=slow_run)
    assert (res["verdict"], res["fit_max_batch"], res["attempts"]) == (common.CUT, "", [])


def test_attempt_verdicts():
    assert bench_fit.attempt_verdict({"status": "ok", "peak_gib": 3.9}, 4.0) == "fits"
    assert bench_fit.attempt_verdict({"status": "oom"}, 4.0) == "oom"
    assert bench_fit.attempt_verdict({"status": "error: worker exited 1, see x.log"}, 4.0).startswith("error: ")
    assert bench_fit.attempt_verdict({"status": "skipped: trl not installed"}, 4.0) == "skipped: trl not installed"
    assert bench_fit.attempt_verdict({"status": common.CUT}, 4.0) == common.CUT


@pytest.mark.integration
def test_real_worker_error(tmp_path):
    """A real worker whose run fails with a non-OOM error (a model that does not exist: fastdpo exits 2) gives
    `error: ...` through the whole path (subprocess, result JSON, verdict)."""
    args = bench_fit.parse_args(["--out", str(tmp_path / "fit"), "--device", "cpu", "--fit-start-batch", "1",
                                 "--fit-max-batch", "2", "--steps", "1"])  # fmt: skip
    setup = train_runs.Setup(model=str(tmp_path / "no_model"), dataset=str(tmp_path / "none.jsonl"), n_pairs=2,
                             tmp=tmp_path, logs=tmp_path, args=args)  # fmt: skip
    res = bench_fit.fit_test(setup, "two-model", "adamw")
    assert res["verdict"].startswith("error: ") and "exited 2" in res["verdict"], res
    assert res["fit_max_batch"] == "" and res["attempts"][0].startswith(f"1: {res['verdict']}")
