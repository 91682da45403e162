"""Nothing lost, nothing silently wrong: run directories, inputs, manifests, checkpoints and options.

Every user mistake here is exit code 2, one line naming the thing, no traceback; where data could be
lost, the files are byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_pairs, one_line_error, run_cli, write_jsonl

from fastdpo.recipes.precompute import PrecomputeConfig, precompute


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "pairs.jsonl", make_pairs(16, seed=5))


@pytest.fixture(scope="module")
def cache_dir(tiny_model, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data_file), output=str(out), shard_rows=8,
                                progress=False))
    return out


@pytest.fixture(scope="module")
def finished_run(tiny_model, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", cache_dir, "--output", out, "--max-steps", "2",
                        "--save-steps", "1", "--no-progress")
    assert code == 0, err
    return out


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file below `path`, by relative name."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def train_cli(model, cache, out, *extra):
    return run_cli("train", "--model", model, "--ref-cache", cache, "--output", out, "--max-steps", "1",
                   "--no-progress", *extra)


# ---------------------------------------------------------------- run directories


def test_finished_run_is_not_overwritten(tiny_model, cache_dir, finished_run):
    before = snapshot(finished_run)
    one_line_error(*train_cli(tiny_model, cache_dir, finished_run), "holds a finished run", "--resume", "--overwrite")
    one_line_error(*run_cli("sft", "--model", tiny_model, "--dataset", cache_dir.parent / "nothing.jsonl", "--output",
                      finished_run), "holds a finished run")
    assert snapshot(finished_run) == before


def test_overwrite_removes_the_old_run(tiny_model, cache_dir, finished_run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    (out / "notes.txt").write_text("mine")  # not ours: stays
    assert (out / "checkpoint-1").is_dir()
    code, err = train_cli(tiny_model, cache_dir, out, "--overwrite")
    assert code == 0, err
    assert not list(out.glob("checkpoint-*")), "a stale checkpoint would be picked by --resume latest"
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1]
    assert (out / "notes.txt").read_text() == "mine"
    one_line_error(*train_cli(tiny_model, cache_dir, out, "--resume", "latest"), "no complete checkpoint")


def test_output_may_not_be_or_lie_in_an_input(tiny_model, cache_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before, cache_before = snapshot(model), snapshot(cache_dir)
    one_line_error(*train_cli(model, cache_dir, model), "--output", "same directory as --model")
    one_line_error(*train_cli(model, cache_dir, model, "--overwrite"), "same directory as --model")
    one_line_error(*train_cli(model, cache_dir, cache_dir / "run"), "inside --ref-cache")
    one_line_error(*train_cli(model / "sub" / ".." / "sub2", cache_dir, model / "x"), "not found")
    one_line_error(*run_cli("precompute", "--model", model, "--dataset", tmp_path / "d.jsonl", "--output", model,
                      "--overwrite"), "same directory as --model")
    assert snapshot(model) == before and snapshot(cache_dir) == cache_before


def test_overwrite_never_deletes_an_input(tiny_model, cache_dir, finished_run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    one_line_error(*train_cli(out / "checkpoint-1", cache_dir, out, "--overwrite"), "--overwrite would delete --model")
    assert snapshot(out) == before


def test_foreign_directory_is_refused(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "config.json.bak").write_text("x")
    one_line_error(*train_cli(tiny_model, cache_dir, out), "holds no fastdpo run")
    assert sorted(p.name for p in out.iterdir()) == ["config.json.bak"]


def test_refused_command_writes_nothing(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "r"
    one_line_error(*train_cli(tiny_model, cache_dir, out, "--lora-dropout", "2"), "--lora-dropout")
    one_line_error(*train_cli(tiny_model, cache_dir, out, "--loss", "sigmod"), "did you mean sigmoid")
    one_line_error(*train_cli(tmp_path / "no-model", cache_dir, out), "model not found")
    one_line_error(*train_cli(tiny_model, tmp_path / "no-cache", out), "reference cache not found")
    assert not out.exists()


def test_resume_with_another_model_is_refused(tiny_model, cache_dir, finished_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    before = snapshot(finished_run)
    one_line_error(*train_cli(other, cache_dir, finished_run, "--resume", str(finished_run / "checkpoint-1")),
             "continues a run of --model", "resume with the same --model")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("state,needle", [
    ("[1, 2]", "not a JSON object"),
    ('{"epoch": 0}', "field 'step'"),
    ('{"step": "3"}', "field 'step'"),
    ("{not json", "unreadable"),
])
def test_damaged_trainer_state_is_one_line_error(tiny_model, cache_dir, finished_run, tmp_path, state, needle):
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    (out / "checkpoint-1" / "trainer_state.json").write_text(state)
    one_line_error(*train_cli(tiny_model, cache_dir, out, "--resume", str(out / "checkpoint-1")), "trainer_state.json",
             needle)


def test_interrupted_checkpoint_leaves_no_temporary(tiny_model, cache_dir, tmp_path, monkeypatch):
    import torch

    from fastdpo import checkpoint

    real_save = torch.save

    def interrupted(obj, path, *a, **k):
        if str(path).endswith("scheduler.pt"):
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", interrupted)
    out = tmp_path / "r"
    code, err = train_cli(tiny_model, cache_dir, out, "--max-steps", "3", "--save-steps", "1")
    assert code == 130 and "interrupted" in err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "a hidden copy of the weights stayed"
    assert not checkpoint.list_checkpoints(out)
    monkeypatch.setattr(torch, "save", real_save)
    stale = out / ".checkpoint-7.tmp"  # what a SIGKILL mid-write leaves: swept at the next start
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    code, err = train_cli(tiny_model, cache_dir, out, "--overwrite")
    assert code == 0, err
    assert not stale.exists()


# ---------------------------------------------------------------- one writer per directory


@pytest.mark.integration
def test_two_concurrent_trains_one_is_refused(tiny_model, cache_dir, tmp_path):
    """Started together into one --output (beta 0.1 and 0.5): one is refused, naming the other; the other's run is
    whole and its own (every step once, its config)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "r"
    procs = {beta: subprocess.Popen([sys.executable, "-m", "fastdpo", "train", "--model", tiny_model, "--ref-cache",
                                     cache_dir, "--output", out, "--max-steps", "12", "--beta", beta, "--no-progress"],
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
             for beta in ("0.1", "0.5")}
    results = {beta: (p.wait(timeout=300), p.stderr.read()) for beta, p in procs.items()}
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    (won, _), (lost, (_, err)) = sorted(results.items(), key=lambda kv: kv[1][0])
    one_line_error(2, err, f"--output {out}")
    assert "in use by fastdpo train (pid" in err or "holds a" in err, err  # refused at its claim, or after the run
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == list(range(1, 13))
    assert json.loads((out / "fastdpo_config.json").read_text())["beta"] == float(won)
    assert not (out / ".fastdpo.lock").exists()  # released at the end


def _lock_file(out: Path, **fields) -> Path:
    """OUT/.fastdpo.lock as a command running on this machine writes it (its host, boot and pid namespace)."""
    import os
    import socket

    out.mkdir(parents=True, exist_ok=True)
    boot = Path("/proc/sys/kernel/random/boot_id")
    machine = {"host": socket.gethostname(), "boot_id": boot.read_text().strip() if boot.exists() else None,
               "pid_ns": os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None}
    (out / ".fastdpo.lock").write_text(json.dumps({**machine, "command": "train", "since": "2026-12-01 10:00:00",
                                                   "token": "x", **fields}))
    return out / ".fastdpo.lock"


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tiny_model, cache_dir, tmp_path):
    import os
    import subprocess

    out = tmp_path / "r"
    lock = _lock_file(out, pid=os.getppid())  # alive: the process that started these tests
    one_line_error(*train_cli(tiny_model, cache_dir, out), f"--output {out} is in use by fastdpo train (pid "
                   f"{os.getppid()} since 2026-12-01 10:00:00)", alone=True)
    assert sorted(p.name for p in out.iterdir()) == [".fastdpo.lock"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lock_file(out, pid=dead.pid)  # a run killed with SIGKILL leaves its lock: its pid is gone
    code, err = train_cli(tiny_model, cache_dir, out)
    assert code == 0, err
    assert not lock.exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["sft", "precompute", "demo"])
def test_every_writing_command_respects_a_live_lock(tiny_model, data_file, tmp_path, command):
    import os

    out = tmp_path / "r"
    _lock_file(out, pid=os.getppid())
    args = {"sft": ["sft", "--model", tiny_model, "--dataset", data_file, "--max-steps", "1"],
            "precompute": ["precompute", "--model", tiny_model, "--dataset", data_file], "demo": ["demo"]}[command]
    one_line_error(*run_cli(*args, "--output", out, "--no-progress"),
                   f"--output {out} is in use by fastdpo train (pid {os.getppid()}")
    assert sorted(p.name for p in out.iterdir()) == [".fastdpo.lock"]


def test_a_lock_held_on_another_host_is_never_broken(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "r"
    lock = _lock_file(out, pid=1, host="node-17")
    one_line_error(*train_cli(tiny_model, cache_dir, out), "in use by fastdpo train (pid 1 on host node-17",
                   f"if it has ended, remove {lock}")
    assert lock.exists()


def test_lock_file_and_python_api(tmp_path):
    from fastdpo.errors import UserError
    from fastdpo.io import LOCK, DirLock

    with DirLock(tmp_path, "precompute") as held:
        content = json.loads((tmp_path / LOCK).read_text())
        assert content["pid"] == held.content["pid"] and content["command"] == "precompute"
        with pytest.raises(UserError, match="in use by fastdpo precompute"):
            DirLock(tmp_path, "train").acquire()
    assert list(tmp_path.iterdir()) == []


def test_report_to_without_its_library_is_refused(tiny_model, cache_dir, tmp_path, monkeypatch):
    import sys

    for module in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    one_line_error(*train_cli(tiny_model, cache_dir, tmp_path / "r", "--report-to", "tensorboard"),
                   "--report-to tensorboard needs tensorboard", "pip install tensorboard", alone=True)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- resume: honoured or refused


@pytest.fixture
def stopped_run(finished_run, tmp_path) -> Path:
    """The finished 2-step run (checkpoint-1, lr 1e-6 decaying linearly) as if it had died after step 1."""
    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(metrics[0] + "\n")
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_another_lr_is_refused_or_honoured(tiny_model, cache_dir, stopped_run):
    ckpt = stopped_run / "checkpoint-1"
    before = snapshot(stopped_run)
    one_line_error(*train_cli(tiny_model, cache_dir, stopped_run, "--max-steps", "2", "--resume", ckpt, "--lr",
                              "1e-3"), "options differ from the checkpoint's: --lr 1e-06 -> 0.001",
                   "--allow-changes", "from step 2")
    assert snapshot(stopped_run) == before
    code, err = train_cli(tiny_model, cache_dir, stopped_run, "--max-steps", "2", "--resume", ckpt, "--lr", "1e-3",
                          "--allow-changes")
    assert code == 0, err
    assert "resumed from" in err and "from here with --lr 1e-06 -> 0.001" in err
    first, second = _records(stopped_run)
    assert first["lr"] == 1e-6 and "changed" not in first
    assert second["lr"] == pytest.approx(5e-4, rel=1e-12)  # the new peak on the linear schedule's step 2 of 2
    assert second["changed"] == {"lr": {"from": 1e-6, "to": 1e-3}}


def test_resume_with_another_loss_is_refused_or_honoured(tiny_model, cache_dir, stopped_run):
    ckpt = stopped_run / "checkpoint-1"
    one_line_error(*train_cli(tiny_model, cache_dir, stopped_run, "--max-steps", "2", "--resume", ckpt, "--loss",
                              "ipo"), "--loss sigmoid -> ipo", "--allow-changes")
    code, err = train_cli(tiny_model, cache_dir, stopped_run, "--max-steps", "2", "--resume", ckpt, "--loss", "ipo",
                          "--allow-changes")
    assert code == 0, err
    first, second = _records(stopped_run)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # sigmoid at a zero margin: ln 2
    assert second["loss"] == pytest.approx(25.0, rel=1e-2)  # ipo at a near-zero margin: (1 / (2 beta))^2
    assert second["changed"] == {"loss": {"from": ["sigmoid"], "to": ["ipo"]}}
    assert json.loads((stopped_run / "fastdpo_config.json").read_text())["loss"] == ["ipo"]


def test_resume_refuses_other_data_under_the_same_path(tiny_model, cache_dir, tiny_tokenizer, tmp_path):
    """--ref-cache names the same directory, which now holds another cache: not the data the checkpoint was on."""
    from fastdpo import cache

    c = tmp_path / "c"
    shutil.copytree(cache_dir, c)
    out = tmp_path / "r"
    code, err = train_cli(tiny_model, c, out, "--max-steps", "2", "--save-steps", "1")
    assert code == 0, err
    rows = [r for shard in sorted(c.glob("shard-*.arrow")) for r in cache.read_shard(shard).to_pylist()]
    shutil.rmtree(c)
    cache.write(rows, c, tokenizer=tiny_tokenizer, reference="elsewhere", shard_rows=8)  # the same rows, remade
    one_line_error(*train_cli(tiny_model, c, out, "--max-steps", "2", "--resume", out / "checkpoint-1"),
                   f"--ref-cache {c} holds other data than the checkpoint was trained on")


def test_resume_refuses_a_run_that_ends_before_the_checkpoint(tiny_model, cache_dir, stopped_run):
    ckpt = stopped_run / "checkpoint-5"  # a checkpoint of step 5
    shutil.copytree(stopped_run / "checkpoint-1", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "step": 5}))
    before = snapshot(stopped_run)
    for extra in ((), ("--allow-changes",)):
        one_line_error(*train_cli(tiny_model, cache_dir, stopped_run, "--max-steps", "3", "--resume", ckpt, *extra),
                       "ends at step 3", "before the checkpoint's step 5", alone=True)
    assert snapshot(stopped_run) == before


def test_resume_refuses_what_cannot_change_and_allows_what_is_free(tiny_model, cache_dir, stopped_run):
    ckpt = stopped_run / "checkpoint-1"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    edited = stopped_run / "checkpoint-edited"
    shutil.copytree(ckpt, edited)
    (edited / "trainer_state.json").write_text(json.dumps({**state, "config": {**state["config"], "max_length": 64}}))
    for extra in ((), ("--allow-changes",)):
        one_line_error(*train_cli(tiny_model, cache_dir, stopped_run, "--max-steps", "2", "--resume", edited, *extra),
                       "--max-length 64, which cannot change on resume")
    code, err = train_cli(tiny_model, cache_dir, stopped_run, "--max-steps", "2", "--resume", ckpt, "--log-every",
                          "7", "--save-steps", "5", "--save-total-limit", "2")
    assert code == 0, err
    assert "changed" not in _records(stopped_run)[1]
    one_line_error(*train_cli(tiny_model, cache_dir, stopped_run, "--allow-changes"), "--allow-changes",
                   "without --resume", alone=True)


# ---------------------------------------------------------------- inputs


def test_dataset_directory_with_two_formats_is_refused(tiny_model, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", make_pairs(4))
    (d / "b.csv").write_text("prompt,chosen,rejected\nx,y,z\n")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", d, "--output", tmp_path / "c"),
             "mixes file formats", "a.jsonl", "b.csv")
    assert not (tmp_path / "c").exists()


def test_dataset_errors_name_the_cause(tiny_model, tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("prompt,chosen,rejected\nx,y,z\na,b,c,d\n")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", ragged, "--output", tmp_path / "c"),
             "ragged.csv", "line 3")
    cols = tmp_path / "cols"
    cols.mkdir()
    write_jsonl(cols / "a.jsonl", make_pairs(2))
    write_jsonl(cols / "b.jsonl", [{**r, "extra": 1} for r in make_pairs(2)])
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", cols, "--output", tmp_path / "c"),
             "different columns", "extra")


def test_hub_only_options_on_local_data_are_refused(tiny_model, data_file, tmp_path):
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", data_file, "--output", tmp_path / "c",
                      "--split", "test"), "--split 'test'", "single split")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", data_file, "--output", tmp_path / "c",
                      "--dataset-config", "en"), "--dataset-config")


def test_model_vocabulary_smaller_than_tokenizer(tiny_model, data_file, tmp_path):
    model = tmp_path / "small"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 50
    (model / "config.json").write_text(json.dumps(config))
    one_line_error(*run_cli("precompute", "--model", model, "--dataset", data_file, "--output", tmp_path / "c"),
             "vocabulary of 50", "tokenizer has")


def test_failed_precompute_does_not_block_its_retry(tiny_model, data_file, tmp_path):
    """Weights that fail to load after the output is claimed: once fixed, the same command runs."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    out = tmp_path / "c"
    args = ("precompute", "--model", model, "--dataset", data_file, "--output", out, "--no-progress")
    one_line_error(*run_cli(*args), "cannot load model")
    weights.write_bytes(good)
    code, err = run_cli(*args)
    assert code == 0, err
    assert (out / "manifest.json").is_file()


# ---------------------------------------------------------------- manifests


def _damaged(cache_dir, tmp_path, edit) -> Path:
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit,needle", [
    (lambda m, d: m.update(shards=m["shards"][:1]), "does not list (shard-00001.arrow)"),
    (lambda m, d: m["shards"][0].update(file="../x.arrow"), "inside the cache directory"),
    (lambda m, d: m.update(shards=[]), "'shards' must be a non-empty list"),
    (lambda m, d: m["shards"][0].pop("file"), "shards[0] needs file"),
    (lambda m, d: m.pop("tokenizer"), "field 'tokenizer'"),
    (lambda m, d: m.update(format_version=99), "format version 99"),
    (lambda m, d: (d / "shard-00001.arrow").unlink(), "shard-00001.arrow is missing"),
])
def test_manifest_must_match_the_directory(tiny_model, cache_dir, tmp_path, edit, needle):
    cache = _damaged(cache_dir, tmp_path, edit)
    one_line_error(*train_cli(tiny_model, cache, tmp_path / "r"), needle)
    one_line_error(*run_cli("eval", "--model", tiny_model, "--ref-cache", cache, "--no-progress"), needle)
    assert not (tmp_path / "r").exists()


def test_manifest_not_json_object(tiny_model, cache_dir, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    (copy / "manifest.json").write_text("[]")
    one_line_error(*train_cli(tiny_model, copy, tmp_path / "r"), "manifest.json", "not a JSON object")


# ---------------------------------------------------------------- eval options


def test_eval_output_never_replaces_a_user_file(tiny_model, cache_dir, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    one_line_error(*run_cli("eval", "--model", tiny_model, "--ref-cache", cache_dir, "--output", notes),
                   "not a fastdpo eval result")
    assert notes.read_text() == '{"mine": 1}'
    result = tmp_path / "eval.json"
    for _ in range(2):  # a previous result is replaced
        code, err = run_cli("eval", "--model", tiny_model, "--ref-cache", cache_dir, "--output", result,
                            "--no-progress")
        assert code == 0, err


def test_eval_options(tiny_model, cache_dir, tmp_path):
    for limit in ("0", "-3"):
        one_line_error(*run_cli("eval", "--model", tiny_model, "--ref-cache", cache_dir, "--limit", limit), "--limit",
                 "at least 1")
    judges = tmp_path / "myjudges.py"
    judges.write_text("def one(text):\n    return 1.0\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        one_line_error(*run_cli("eval", "--model", tiny_model, "--ref-cache", cache_dir, "--generate", "--judge",
                          "myjudges:one", "--no-progress"), "must take (prompt, completion)")
    finally:
        sys.path.remove(str(tmp_path))
