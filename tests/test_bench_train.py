"""Tests of benchmarks/bench_train.py and train_runs.py.

Fast: the command lines the runs get (optimizer, dtype). Slow (~35 s on 2 cores: a precompute and three method
subprocesses, each importing torch and transformers): the micro preset for two steps on CPU writes the expected CSV
and markdown, the baseline first, every method counting a step's tokens the same way, the first step and the start
apart from the steady state.
"""

from __future__ import annotations

import sys

import pytest
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
