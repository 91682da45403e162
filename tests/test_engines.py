"""One 4-step trajectory under every engine (`fastdpo.engines`): plain, FSDP2 over 2 gloo processes and DeepSpeed
ZeRO-3 over 2 processes (where deepspeed is installed) train the same run through the same loop."""

from __future__ import annotations

import pytest
from test_fsdp import assert_same_run, caches, torchrun  # noqa: F401 (caches: a fixture)

from fastdpo.recipes.train import train

pytestmark = pytest.mark.integration  # multi-process runs


def test_one_trajectory_under_every_engine(caches, tmp_path, capfd):  # noqa: F811
    model, cache = caches["llama"]
    args = ["--model", model, "--ref-cache", cache, "--max-steps", "4", "--lr", "1e-3", "--no-progress",
            "--batch-size", "1", "--grad-accum", "2"]  # 2 processes: 4 pairs a step
    train(model=model, ref_cache=cache, output=str(tmp_path / "plain"), max_steps=4, lr=1e-3, progress=False,
          batch_size=2, grad_accum=2)
    assert "engine: plain (1 process(es))" in capfd.readouterr().err
    proc = torchrun("--fsdp", *args, "--output", tmp_path / "fsdp2")
    assert "engine: fsdp2 (2 process(es))" in proc.stderr
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp2")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.skip("plain and FSDP2 agree; deepspeed is not installed, so ZeRO-3 was not run")
    from test_deepspeed import launch, write_zero3_config

    write_zero3_config(tmp_path)
    proc = launch(tmp_path / "zero3.yaml", 2, *args, "--output", tmp_path / "zero3")
    assert "engine: deepspeed (2 process(es))" in proc.stderr and "DeepSpeed ZeRO-3" in proc.stderr
    assert_same_run(tmp_path / "plain", tmp_path / "zero3")
