"""Two CPU processes (gloo, launched with torchrun as accelerate does) against one process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, make_pairs, write_jsonl

from fastdpo.recipes.precompute import PrecomputeConfig, precompute
from fastdpo.recipes.train import train

pytestmark = pytest.mark.integration  # real multi-process runs under torchrun

FIELDS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected", "grad_norm", "lr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "-m", "fastdpo", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data_file = write_jsonl(root / "pairs.jsonl", make_pairs(22, seed=4))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data_file), output=str(root / "c1"), shard_rows=4,
                                batch_size=3, progress=False))
    return root, data_file


def test_two_process_cache_equals_one_process(tiny_model, setup):
    root, data_file = setup
    proc = torchrun("precompute", "--model", tiny_model, "--dataset", data_file, "--output", root / "c2",
                    "--shard-rows", "4", "--batch-size", "3", "--no-progress")
    assert "over 2 process(es)" in proc.stderr
    m1 = json.loads((root / "c1" / "manifest.json").read_text())
    m2 = json.loads((root / "c2" / "manifest.json").read_text())
    assert m2["num_processes"] == 2 and len(m2["shards"]) == 6
    assert m1["shards"] == m2["shards"]  # same rows, same bytes (fp32 on CPU is deterministic)
    for s in m1["shards"]:
        assert (root / "c1" / s["file"]).read_bytes() == (root / "c2" / s["file"]).read_bytes()


def test_two_process_training_matches_one_process(tiny_model, setup, tmp_path):
    root, _ = setup
    common = ["--model", tiny_model, "--ref-cache", root / "c1", "--batch-size", "2", "--max-steps", "4",
              "--lr", "1e-3", "--no-progress", "--save-steps", "2"]
    train(model=tiny_model, ref_cache=str(root / "c1"), output=str(tmp_path / "one"), batch_size=2, grad_accum=2,
          max_steps=4, lr=1e-3, progress=False)
    torchrun("train", *common, "--output", tmp_path / "two", "--report-to", "tensorboard")
    one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]  # only the main process writes
    assert len(two) == 4 and one[-1]["rewards/margins"] != 0
    for a, b in zip(one, two):
        for f in FIELDS:
            assert math.isclose(a[f], b[f], abs_tol=1e-5), (a["step"], f, a[f], b[f])
    # the tracker, closed at the end while the other process still waits at the last barrier
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "two").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(m["step"], pytest.approx(m["loss"])) for m in two]
    assert (tmp_path / "two" / "checkpoint-2" / "trainer_state.json").exists()

    # a resume with the same world size: test_two_process_sigterm_saves_then_resume_equals_one_process


def two_nodes(tiny_model, data_file, outputs) -> tuple[list[int], list[str]]:
    """`fastdpo precompute` on two "nodes" of one process each (torchrun --nnodes 2, static rendezvous on this
    machine), node i writing to outputs[i] (the same path: a shared filesystem); their exit codes and stderr."""
    port, procs = _free_port(), []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "fastdpo",
               "precompute", "--model", tiny_model, "--dataset", str(data_file), "--output", str(outputs[node]),
               "--shard-rows", "4", "--batch-size", "3", "--no-progress"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    errs = [p.communicate(timeout=600)[1] for p in procs]
    return [p.returncode for p in procs], errs


def test_two_node_cache_equals_one_process(tiny_model, setup):
    """Two nodes: the shards are strided over global ranks, as over local ones."""
    root, data_file = setup
    codes, errs = two_nodes(tiny_model, data_file, [root / "nodes"] * 2)
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert "over 2 process(es)" in errs[0]
    m1 = json.loads((root / "c1" / "manifest.json").read_text())
    m2 = json.loads((root / "nodes" / "manifest.json").read_text())
    assert m2["num_processes"] == 2 and m1["shards"] == m2["shards"]
    for s in m1["shards"]:
        assert (root / "c1" / s["file"]).read_bytes() == (root / "nodes" / s["file"]).read_bytes()


def test_two_nodes_without_a_shared_output_stop_alike(tiny_model, setup, tmp_path):
    """--output on each node's own filesystem (here: two directories): the second node cannot see the main
    process's claim; both processes stop with the same line (not one line and a peer's connection error), and the
    main process's claim is released."""
    _, data_file = setup
    codes, errs = two_nodes(tiny_model, data_file, [tmp_path / "a", tmp_path / "b"])
    assert codes == [1, 1]  # torchrun's own exit code for a failed worker
    for node, err in enumerate(errs):
        line = f"fastdpo precompute: error: --output {tmp_path / 'ab'[node]}: 1 of 2 processes cannot see the main "
        assert line in err and "Connection" not in err, err[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_two_process_sigterm_saves_then_resume_equals_one_process(tiny_model, setup, tmp_path):
    """SIGTERM to torchrun and its workers (what `scancel` or a preempting cluster sends): every rank stops after
    the same step, the checkpoint is written and each says so in one line (torchrun forwards its own SIGTERM too:
    harmless); `--resume latest` then continues to the 1-process run's numbers."""
    import signal
    import time

    root, _ = setup
    out = tmp_path / "two"
    args = ["train", "--model", tiny_model, "--ref-cache", root / "c1", "--batch-size", "2", "--max-steps", "8",
            "--epochs", "2", "--lr", "1e-3", "--save-steps", "3", "--no-progress", "--output", out]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "fastdpo", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-3").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert not (out / "model.safetensors").exists(), "signalled too late to test anything"
    import re

    # one line from each rank (torchrun may join the two ranks' lines: they are counted, not split)
    steps = re.findall(r"fastdpo train: stopped by SIGTERM at step (\d+) of 8: saved \S+; continue with --resume "
                       r"latest", err)
    assert len(steps) == 2 and len(set(steps)) == 1 and "Traceback" not in err.split("Received 15")[0], err[-3000:]
    step = int(steps[0])
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file() and not (out / ".fastdpo.lock").exists()
    assert proc.returncode != 0  # torchrun's own report of a signal
    proc = torchrun(*args, "--resume", "latest")
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in proc.stderr
    train(model=tiny_model, ref_cache=str(root / "c1"), output=str(tmp_path / "one"), batch_size=2, grad_accum=2,
          max_steps=8, epochs=2, lr=1e-3, progress=False)
    one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in two] == list(range(1, 9))
    for a, b in zip(one, two):
        for f in FIELDS:
            assert math.isclose(a[f], b[f], abs_tol=1e-5), (a["step"], f, a[f], b[f])
