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

from fastdpo.precompute import PrecomputeConfig, precompute


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
