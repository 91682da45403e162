"""Faults: kills at random points, damaged shards, full disks, non-finite steps, hostile rows, pickles."""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, make_pairs, one_line_error, run_cli, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdpo import cache, data
from fastdpo.errors import TrainingStopped, UserError
from fastdpo.recipes.precompute import PrecomputeConfig, precompute
from fastdpo.recipes.train import train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "pairs.jsonl", make_pairs(40, seed=11))


@pytest.fixture(scope="module")
def clean_cache(tiny_model, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "c"
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data_file), output=str(out), shard_rows=4,
                                batch_size=2, progress=False))
    return out


def _looks_complete(out) -> list[str]:
    """Files under their final names, which a reader would take for complete."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("shard-") or p.name == "manifest.json")


@pytest.mark.integration
def test_precompute_sigkill_and_sigterm_at_random_points(tiny_model, data_file, clean_cache, tmp_path):
    """SIGKILL: whatever is on disk is whole, and the re-run gives the clean cache. SIGTERM (a cluster preempting the
    job): the same, and the process stops at the end of its batch with one line and exit 143."""
    rng = random.Random(1234)
    args = ["precompute", "--model", tiny_model, "--dataset", str(data_file), "--shard-rows", "4",
            "--batch-size", "2", "--no-progress"]
    n_shards = len(list(clean_cache.glob("shard-*.arrow")))
    for trial, sig in enumerate((signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)):
        out = tmp_path / f"run{trial}"
        kill_after = rng.randint(1, n_shards - 1)  # shards on disk before the kill: somewhere in the middle
        proc = subprocess.Popen([sys.executable, "-m", "fastdpo", *args, "--output", str(out)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while (len(list(out.glob("shard-*.arrow"))) < kill_after and proc.poll() is None
               and time.time() < deadline):
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig == signal.SIGTERM and proc.returncode != 0:  # (0: it had finished before the signal landed)
            assert proc.returncode == 143, err
            lines = [ln for ln in err.splitlines() if "stopped by SIGTERM" in ln]
            assert len(lines) == 1 and "Traceback" not in err, err
            assert f"of {n_shards} shards complete in {out}; run the same command again to resume" in lines[0]
            assert not (out / "manifest.json").exists() and not (out / ".fastdpo.lock").exists()
        if (out / "manifest.json").exists():  # the run got to its end before the kill landed: it must be whole
            for entry in json.loads((out / "manifest.json").read_text())["shards"]:
                cache.verify_shard(out, entry)
        for name in _looks_complete(out):  # a file under its final name is always a whole, valid shard
            if name != "manifest.json":
                cache.read_shard(out / name)
        code, err = run_cli(*args, "--output", out)  # a SIGKILL leaves its lock: the holder is gone, taken over
        assert code == 0, err
        for name in _looks_complete(clean_cache):
            if name.startswith("shard-"):
                assert (out / name).read_bytes() == (clean_cache / name).read_bytes(), (trial, name)
        assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads(
            (clean_cache / "manifest.json").read_text())["shards"]


def test_damaged_finished_shard_is_recomputed_on_resume(tiny_model, data_file, clean_cache, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(clean_cache, out)
    (out / "manifest.json").unlink()  # as if the run died before the end
    shard = out / "shard-00002.arrow"
    raw = bytearray(shard.read_bytes())
    raw[-40] ^= 0x01  # a flipped bit in the values: the file still parses
    shard.write_bytes(bytes(raw))
    cache.read_shard(shard)
    written = []
    real = cache.write_shard
    monkeypatch.setattr(cache, "write_shard", lambda p, t: written.append(p.name) or real(p, t))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data_file), output=str(out), shard_rows=4,
                                batch_size=2, progress=False))
    assert written == ["shard-00002.arrow"]
    assert shard.read_bytes() == (clean_cache / "shard-00002.arrow").read_bytes()


@pytest.mark.parametrize("err,text", [(errno.ENOSPC, "no space left on device"),
                                      (errno.EACCES, "permission denied")])
def test_precompute_write_failure_is_one_line(tiny_model, data_file, tmp_path, monkeypatch, err, text):
    import fastdpo.io as fio

    calls = []
    real_fsync = fio.os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the second shard
            raise OSError(err, os.strerror(err))
        return real_fsync(fd)

    monkeypatch.setattr(fio.os, "fsync", failing_fsync)
    out = tmp_path / "c"
    code, msg = run_cli("precompute", "--model", tiny_model, "--dataset", data_file, "--output", out,
                        "--shard-rows", "4", "--no-progress")
    assert code == 2 and "Traceback" not in msg
    line = [x for x in msg.splitlines() if ": error:" in x]
    assert len(line) == 1 and text in line[0] and "cannot write" in line[0]
    assert not (out / "manifest.json").exists()
    if not out.exists():  # failed before its first shard was done: the claim is released, nothing is left
        return
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the temporary file is gone
    for name in _looks_complete(out):
        cache.read_shard(out / name)  # what is there is whole


def test_full_disk_in_a_checkpoint_write_keeps_the_previous_one(tiny_model, clean_cache, tmp_path, monkeypatch):
    """torch.save into /dev/full: the kernel's own ENOSPC, through torch's zip writer (which reports it as
    "unexpected pos"). One line naming the checkpoint; nothing of it left; the previous checkpoint, which
    --save-total-limit 1 would have deleted after a good save, intact and resumable."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastdpo import checkpoint

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    real = torch.save

    def to_full_disk(obj, f, *a, **k):
        if ".checkpoint-4.tmp" in str(f):
            os.symlink("/dev/full", f)
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", to_full_disk)
    out = tmp_path / "r"
    args = ["train", "--model", tiny_model, "--ref-cache", clean_cache, "--output", out, "--max-steps", "6",
            "--save-steps", "2", "--save-total-limit", "1", "--no-progress"]
    code, msg = run_cli(*args)
    line = one_line_error(code, msg, f"cannot write {out / 'checkpoint-4'}: torch's writer failed", "free there")
    assert "it needs about" in line
    assert checkpoint.list_checkpoints(out) == [out / "checkpoint-2"] and not list(out.glob(".checkpoint-*"))
    assert not (out / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    monkeypatch.setattr(torch, "save", real)
    code, msg = run_cli(*args, "--resume", "latest")
    assert code == 0 and f"resumed from {out / 'checkpoint-2'} at step 2" in msg, msg


def _can_mount_tmpfs(where) -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (`unshare -rm`)."""
    where.mkdir()
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.integration
def test_a_really_full_disk_keeps_the_previous_checkpoint(tiny_model, clean_cache, tmp_path):
    """`fastdpo train` on a tmpfs with room for one checkpoint (a private mount namespace): the second checkpoint
    fails with one line saying the disk is full, and the first is left whole."""
    import shlex

    from transformers import AutoModelForCausalLM

    from fastdpo import checkpoint

    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("no tmpfs can be mounted here (unshare -rm)")
    one = 3 * os.path.getsize(os.path.join(tiny_model, "model.safetensors")) + 64_000  # weights + AdamW state
    train_cmd = shlex.join([sys.executable, "-m", "fastdpo", "train", "--model", tiny_model, "--ref-cache",
                            str(clean_cache), "--output", str(disk / "r"), "--max-steps", "6", "--save-steps", "2",
                            "--no-progress"])
    copy = tmp_path / "copy"
    script = (f"mount -t tmpfs -o size={int(1.5 * one)} tmpfs {disk} && {{ {train_cmd}; echo $? > {tmp_path / 'rc'}; "
              f"cp -a {disk / 'r'} {copy}; }}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    code = int((tmp_path / "rc").read_text())
    one_line_error(code, proc.stderr, f"cannot write {disk / 'r' / 'checkpoint-4'}: no space left on device",
                   "free there, it needs about")
    assert checkpoint.list_checkpoints(copy) == [copy / "checkpoint-2"] and not list(copy.glob(".*.tmp*"))
    assert not (copy / "model.safetensors").exists() and not (copy / ".fastdpo.lock").exists()
    AutoModelForCausalLM.from_pretrained(copy / "checkpoint-2")


def _nan_from(step_from, step_to=10**9):
    """Make pair_loss return NaN on optimizer steps [step_from, step_to]."""
    import torch

    T = importlib.import_module("fastdpo.recipes.train")

    real = T.pair_loss
    calls = {"n": 0}

    def patched(cfg, *args):
        calls["n"] += 1
        loss, per_pair, rew_c, rew_r = real(cfg, *args)
        if step_from <= calls["n"] <= step_to:  # one micro-batch (one fused chunk) per step in these tests
            loss, per_pair = loss * torch.tensor(float("nan")), per_pair * torch.tensor(float("nan"))
        return loss, per_pair, rew_c, rew_r

    return patched


def test_transient_non_finite_step_is_skipped(tiny_model, clean_cache, tmp_path, monkeypatch):
    T = importlib.import_module("fastdpo.recipes.train")

    monkeypatch.setattr(T, "pair_loss", _nan_from(3, 3))
    train(model=tiny_model, ref_cache=str(clean_cache), output=str(tmp_path / "r"), max_steps=6, batch_size=4,
          lr=1e-3, progress=False)
    m = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert [x["bad_steps"] for x in m] == [0, 0, 1, 1, 1, 1]
    assert (tmp_path / "r" / "model.safetensors").exists()


def test_persistent_non_finite_steps_stop_the_run(tiny_model, clean_cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    T = importlib.import_module("fastdpo.recipes.train")

    monkeypatch.setattr(T, "pair_loss", _nan_from(5))
    with pytest.raises(TrainingStopped, match=r"stopped at step 7: 3 consecutive .*checkpoint-4 is intact"):
        train(model=tiny_model, ref_cache=str(clean_cache), output=str(tmp_path / "r"), max_steps=20, batch_size=4,
              lr=1e-3, save_steps=4, max_bad_steps=3, progress=False)
    m = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert len(m) == 7 and m[-1]["bad_steps"] == 3
    assert not (tmp_path / "r" / "model.safetensors").exists()  # no final model from a broken run
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "checkpoint-4")  # the good one is intact
    import torch

    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stop_via_cli_is_one_line_exit_1(tiny_model, clean_cache, tmp_path, monkeypatch):
    T = importlib.import_module("fastdpo.recipes.train")

    monkeypatch.setattr(T, "pair_loss", _nan_from(1))
    code, msg = run_cli("train", "--model", tiny_model, "--ref-cache", clean_cache, "--output", tmp_path / "r",
                        "--max-bad-steps", "2", "--no-progress")
    assert code == 1 and "Traceback" not in msg and "no checkpoint was written" in msg


# ---------------------------------------------------------------- hostile input

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=30), st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=5000),
                    st.binary(max_size=10))
message = st.dictionaries(st.sampled_from(["role", "content", "name", "weird"]),
                          st.one_of(scalars, st.lists(scalars, max_size=2)), max_size=4)
field = st.one_of(scalars, st.lists(message, max_size=4), st.lists(scalars, max_size=3),
                  st.dictionaries(st.text(max_size=5), scalars, max_size=3),
                  st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                  "content": st.text(max_size=50)}), min_size=1, max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({"prompt": field, "chosen": field, "rejected": field}), min_size=1,
                     max_size=6),
       has_prompt=st.booleans())
def test_hostile_rows_are_processed_or_skipped(tiny_tokenizer, rows, has_prompt):
    """Whatever a row holds, the pipeline keeps it or skips it with a counted reason; it never crashes."""
    args = data.DataOptions(dataset="mem", max_length=64, max_prompt_length=32)
    fn = data.PairTokenizer(tiny_tokenizer, args, has_prompt)
    batch = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
    out = fn(batch, list(range(len(rows))))
    for i in range(len(rows)):
        reason = out["skip"][i]
        if reason:
            assert reason in data.SKIP_REASONS
        else:
            assert out["prompt_ids"][i] and out["chosen_ids"][i] and out["rejected_ids"][i]
            assert len(out["prompt_ids"][i]) + len(out["chosen_ids"][i]) <= 64
            assert out["chosen_ids"][i] != out["rejected_ids"][i]


def test_hostile_jsonl_file(tiny_model, tmp_path):
    lines = [json.dumps({"prompt": "Hello", "chosen": " world", "rejected": " Paris"}),
             json.dumps({"prompt": 5, "chosen": [1, 2], "rejected": {"a": None}}),
             json.dumps({"prompt": "\u0000\ud7ff\U0001F600" * 1000, "chosen": " x" * 5000, "rejected": " y"}),
             json.dumps({"prompt": None, "chosen": None, "rejected": None}),
             json.dumps({"prompt": [{"role": "user"}], "chosen": [{"content": 3}], "rejected": []}),
             json.dumps({"chosen": "only chosen"})]
    f = tmp_path / "hostile.jsonl"
    f.write_text("\n".join(lines) + "\n")
    m = precompute(PrecomputeConfig(model=tiny_model, dataset=str(f), output=str(tmp_path / "c"), progress=False,
                                    max_length=128, max_prompt_length=64))
    assert m["dataset"]["rows_read"] == 6
    assert m["dataset"]["rows_written"] + sum(m["dataset"]["rows_skipped"].values()) == 6
    assert m["dataset"]["rows_written"] == 2


# ---------------------------------------------------------------- security


def test_pickled_checkpoint_is_not_executed(tiny_model, clean_cache, tmp_path):
    import pickle

    train(model=tiny_model, ref_cache=str(clean_cache), output=str(tmp_path / "r"), max_steps=3, save_steps=2,
          progress=False)
    ckpt = tmp_path / "r" / "checkpoint-2"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump(Evil(), f)
    code, msg = run_cli("train", "--model", tiny_model, "--ref-cache", clean_cache, "--output", tmp_path / "r",
                        "--max-steps", "3", "--resume", ckpt, "--no-progress")
    assert code == 2 and "nothing else is unpickled" in msg and "Traceback" not in msg
    assert not marker.exists()


def test_yaml_config_is_data_only(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, msg = run_cli("train", "--config", cfg)
    assert code == 2 and "cannot parse config file" in msg
    assert not marker.exists()


def test_remote_code_off_by_default(tiny_model, clean_cache, tmp_path, monkeypatch):
    import transformers

    seen = []
    real_model = transformers.AutoModelForCausalLM.from_pretrained.__func__
    real_tok = transformers.AutoTokenizer.from_pretrained.__func__

    def spy_model(cls, *a, **k):
        seen.append(k.get("trust_remote_code"))
        return real_model(cls, *a, **k)

    def spy_tok(cls, *a, **k):
        seen.append(k.get("trust_remote_code"))
        return real_tok(cls, *a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(spy_tok))
    train(model=tiny_model, ref_cache=str(clean_cache), output=str(tmp_path / "r"), max_steps=1, progress=False)
    assert seen and all(v is False for v in seen)
    with pytest.raises(UserError):
        cache.load_manifest(tmp_path / "r")  # a run directory is not a cache: refused, nothing evaluated
