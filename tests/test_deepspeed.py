"""DeepSpeed ZeRO-2/3 through `accelerate launch`, on CPU over gloo, against the plain 1-process run.

DeepSpeed runs on a CPU (its CPU accelerator, gloo). PyPI ships it as a source package only, built against the
installed torch, so it is not a dev extra: the README's test command installs it (CI runs that), and these tests
skip where it is missing:

    DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8
    pytest tests/test_deepspeed.py        # the first launch JIT-builds a small CPU op: needs g++

ZeRO-3 here partitions every parameter (persistence threshold 0): under DeepSpeed's default of 1e5 elements the
tiny model's LM head would stay whole, and the fused head's gathering would go untested.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, make_pairs, write_jsonl
from test_distributed import FIELDS, _free_port
from test_fsdp import assert_same_run, metrics

from fastdpo.recipes.precompute import PrecomputeConfig, precompute
from fastdpo.recipes.train import train

pytest.importorskip("deepspeed", reason="deepspeed is not installed (a source package: see this file's docstring)")
pytestmark = pytest.mark.integration  # accelerate launch: processes, DeepSpeed's start-up


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    data = write_jsonl(root / "pairs.jsonl", make_pairs(16, seed=4))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data), output=str(root / "c"), shard_rows=4,
                                batch_size=3, progress=False))
    write_zero3_config(root)
    return root


def write_zero3_config(root) -> None:
    """root/zero3.yaml, an accelerate config for ZeRO-3 with every parameter partitioned (root/zero3.json)."""
    (root / "zero3.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto"}))
    (root / "zero3.yaml").write_text(
        f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        f"  deepspeed_config_file: {root / 'zero3.json'}\n  zero3_init_flag: true\nmachine_rank: 0\n"
        "main_training_function: main\nnum_machines: 1\nnum_processes: 1\nrdzv_backend: static\n"
        "same_network: true\nuse_cpu: false\n")


def launch(config, nproc: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
           str(nproc), "--main_process_port", str(_free_port()), "-m", "fastdpo", "train", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("stage, nproc", [(3, 2), (2, 1)])
def test_zero_equals_plain_run_and_resumes(tiny_model, setup, tmp_path, stage, nproc):
    """ZeRO-3 with every parameter partitioned (the fused head reads a partitioned LM head) over 2 processes, and
    ZeRO-2 in one, equal the plain run at equal global batch (4 pairs), with gradient accumulation; ZeRO-3 resumed
    from its step-2 checkpoint (each process reads back its own partition) repeats steps 3-4 bit for bit."""
    config = setup / "zero3.yaml" if stage == 3 else REPO / "examples" / "accelerate" / "zero2.yaml"
    train(model=tiny_model, ref_cache=str(setup / "c"), output=str(tmp_path / "plain"), batch_size=1, grad_accum=4,
          max_steps=4, lr=1e-3, progress=False)
    args = ["--model", tiny_model, "--ref-cache", setup / "c", "--output", tmp_path / "ds", "--batch-size", "1",
            "--grad-accum", str(4 // nproc), "--max-steps", "4", "--lr", "1e-3", "--no-progress", "--save-steps", "2"]
    proc = launch(config, nproc, *args)
    assert f"DeepSpeed ZeRO-{stage}" in proc.stderr  # it engaged (a CPU run without it would be a plain run)
    if stage == 3:
        assert "fused head gathered by the engine" in proc.stderr
    assert_same_run(tmp_path / "plain", tmp_path / "ds")  # (measured: losses 3e-8, weights 7.5e-6)
    if stage != 3:
        return
    assert (tmp_path / "ds" / "checkpoint-2" / "deepspeed").is_dir()
    straight = metrics(tmp_path / "ds")
    (tmp_path / "ds" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in straight[:2]))
    proc = launch(config, nproc, *args, "--resume", "latest")
    assert "resumed from" in proc.stderr
    resumed = metrics(tmp_path / "ds")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for f in FIELDS:
            assert a[f] == b[f], (a["step"], f, a[f], b[f])


def test_zero3_lora_equals_plain_lora(tiny_model, setup, tmp_path):
    """LoRA under ZeRO-3 with every parameter partitioned, 2 processes, saved merged: the merged model (built from
    the weights the engine gathers) equals the plain run's."""
    pytest.importorskip("peft")
    train(model=tiny_model, ref_cache=str(setup / "c"), output=str(tmp_path / "plain"), batch_size=1, grad_accum=4,
          max_steps=4, lr=1e-3, progress=False, lora_r=4, merge_lora=True)
    launch(setup / "zero3.yaml", 2, "--model", tiny_model, "--ref-cache", setup / "c", "--output", tmp_path / "ds",
           "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4", "--lr", "1e-3", "--no-progress",
           "--lora-r", "4", "--merge-lora")
    assert_same_run(tmp_path / "plain", tmp_path / "ds")  # (measured: metrics 9.5e-7, merged weights 7.5e-9)


NAN_HOOK = '''
import os

if os.environ.get("FASTDPO_TEST_NAN_CALLS"):  # NaN losses on micro-batches lo..hi of each process
    import importlib

    import torch

    T = importlib.import_module("fastdpo.recipes.train")
    lo, hi = map(int, os.environ["FASTDPO_TEST_NAN_CALLS"].split(","))
    real, calls = T.pair_loss, {"n": 0}

    def patched(cfg, *args):
        calls["n"] += 1
        loss, per_pair, rew_c, rew_r = real(cfg, *args)
        if lo <= calls["n"] <= hi:
            loss, per_pair = loss * torch.tensor(float("nan")), per_pair * torch.tensor(float("nan"))
        return loss, per_pair, rew_c, rew_r

    T.pair_loss = patched
'''


def test_zero3_skips_a_non_finite_step_as_the_plain_loop_does(tiny_model, setup, tmp_path, monkeypatch):
    """A NaN loss at step 3: the engine must not apply the step (DeepSpeed steps inside its own `step`, where the
    loop's guard cannot stop it); the run goes on as the plain run with the same NaN step does."""
    from test_faults import _nan_from

    T = importlib.import_module("fastdpo.recipes.train")
    monkeypatch.setattr(T, "pair_loss", _nan_from(5, 6))  # plain: 2 micro-batches a step, step 3
    train(model=tiny_model, ref_cache=str(setup / "c"), output=str(tmp_path / "plain"), batch_size=2, grad_accum=2,
          max_steps=5, lr=1e-3, progress=False)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NAN_HOOK)  # each launched process patches itself at start-up
    monkeypatch.setenv("FASTDPO_TEST_NAN_CALLS", "3,3")  # ZeRO-3: 1 micro-batch a step per process, step 3
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    launch(setup / "zero3.yaml", 2, "--model", tiny_model, "--ref-cache", setup / "c", "--output", tmp_path / "ds",
           "--batch-size", "2", "--max-steps", "5", "--lr", "1e-3", "--no-progress")
    assert [m["bad_steps"] for m in metrics(tmp_path / "ds")] == [0, 0, 1, 1, 1]
    plain, ds = metrics(tmp_path / "plain"), metrics(tmp_path / "ds")
    for a, b in zip(plain[3:], ds[3:]):  # after the skipped step: the same run
        assert abs(a["loss"] - b["loss"]) <= 2e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 2e-5, (a, b)
