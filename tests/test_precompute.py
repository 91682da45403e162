"""`fastdpo precompute`: stored values, shard format, manifest, resume after a crash, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_pairs, one_line_error, run_cli, write_jsonl

from fastdpo import cache
from fastdpo.recipes.precompute import PrecomputeConfig, precompute


def _run(model, dataset, out, **kw):
    kw.setdefault("progress", False)
    return precompute(PrecomputeConfig(model=model, dataset=str(dataset), output=str(out), **kw))


def _independent_logps(model, prompt, completion):
    """log p(completion | prompt), token by token, in float64 from the model's full logits."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()[0]  # (L, V)
    logp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[pos, torch.tensor(completion)]


def test_stored_logps_match_independent_computation(tiny_model, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    rows = make_pairs(10)
    manifest = _run(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "c", batch_size=3, shard_rows=4)
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seen = []
    for entry in manifest["shards"]:
        ds = datasets.Dataset.from_file(str(tmp_path / "c" / entry["file"]))  # zero-copy, datasets' own reader
        assert ds.features["prompt_ids"].feature.dtype == "int32"
        assert ds.features["ref_chosen_token_logps"].feature.dtype == "float32"
        assert ds.features["ref_chosen_logps"].dtype == "float32"
        for row in ds:
            seen.append(row["id"])
            for side in ("chosen", "rejected"):
                expect = _independent_logps(model, row["prompt_ids"], row[f"{side}_ids"])
                got = torch.tensor(row[f"ref_{side}_token_logps"], dtype=torch.float64)
                assert got.shape == expect.shape
                torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)
                assert abs(row[f"ref_{side}_logps"] - expect.sum().item()) < 1e-4
    assert seen == list(range(10))


def test_conversational_cache(tiny_model, tmp_path):
    msg = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    rows = [{"prompt": msg("user", f"capital {i}?"), "chosen": msg("assistant", "Paris"),
             "rejected": msg("assistant", "hello world")} for i in range(3)]
    manifest = _run(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "c")
    assert manifest["dataset"]["rows_written"] == 3
    table = cache.read_shard(tmp_path / "c" / "shard-00000.arrow")
    assert table.column("ref_chosen_logps").to_pylist()[0] < 0


def test_manifest_contents(tiny_model, tmp_path):
    rows = make_pairs(6) + [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": None,
                                                                                  "rejected": "b"}]
    m = _run(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "c", limit=7)
    assert m["format_version"] == cache.FORMAT_VERSION and m["fastdpo_version"]
    assert m["dataset"]["rows_read"] == 7 and m["dataset"]["rows_written"] == 6
    assert m["dataset"]["rows_skipped"] == {"chosen_equals_rejected": 1}
    assert len(m["model"]["weights_sha256"]) == 64 and len(m["tokenizer"]["sha256"]) == 64
    assert m["settings"]["max_length"] == 1024 and m["settings"]["resolved_dtype"] == "float32"
    assert m["settings"]["logps_backend"] == "auto" and m["settings"]["truncation"] == "keep_end"
    for s in m["shards"]:
        cache.verify_shard(tmp_path / "c", s)
    assert set(m["timings"]) == {"tokenize_s", "forward_s", "total_s"}
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == m


def test_crash_then_resume_is_byte_identical(tiny_model, tmp_path, monkeypatch):
    data_file = write_jsonl(tmp_path / "d.jsonl", make_pairs(20))
    _run(tiny_model, data_file, tmp_path / "clean", shard_rows=4, batch_size=3)

    real_write = cache.write_shard
    calls = []

    def crashing_write(path, table):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(path)
        return real_write(path, table)

    monkeypatch.setattr(cache, "write_shard", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny_model, data_file, tmp_path / "crashed", shard_rows=4, batch_size=3)
    crashed = tmp_path / "crashed"
    assert not (crashed / "manifest.json").exists()
    assert sorted(p.name for p in crashed.glob("shard-*")) == ["shard-00000.arrow", "shard-00001.arrow"]
    assert not [p for p in crashed.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(cache, "write_shard", real_write)
    written = []
    monkeypatch.setattr(cache, "write_shard", lambda p, t: written.append(p) or real_write(p, t))
    _run(tiny_model, data_file, crashed, shard_rows=4, batch_size=3)
    assert [p.name for p in written] == ["shard-00002.arrow", "shard-00003.arrow", "shard-00004.arrow"]
    for i in range(5):
        name = cache.shard_name(i)
        assert (crashed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    clean_m = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    resumed_m = json.loads((crashed / "manifest.json").read_text())
    assert clean_m["shards"] == resumed_m["shards"]


def test_other_settings_refused_unless_overwrite(tiny_model, tmp_path, pairs_file):
    out = tmp_path / "c"
    code, err = run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file, "--output", out,
                        "--no-progress")
    assert code == 0, err
    code, err = run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file, "--output", out,
                        "--max-length", "64", "--no-progress")
    assert code == 2
    assert "differs in: max_length" in err and "--overwrite" in err
    code, err = run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file, "--output", out,
                        "--max-length", "64", "--overwrite", "--no-progress")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["settings"]["max_length"] == 64


def test_foreign_non_empty_dir_refused(tiny_model, tmp_path, pairs_file):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    code, err = run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file, "--output", tmp_path / "c")
    assert code == 2 and "not empty" in err


def test_rerun_of_finished_cache_computes_nothing(tiny_model, tmp_path, pairs_file, monkeypatch):
    _run(tiny_model, pairs_file, tmp_path / "c")
    monkeypatch.setattr(cache, "write_shard", lambda *a: pytest.fail("recomputed a finished shard"))
    m = _run(tiny_model, pairs_file, tmp_path / "c")
    assert m["dataset"]["rows_written"] == 24


def test_bad_inputs_one_line_exit_2(tiny_model, tmp_path, pairs_file):
    out = tmp_path / "o"
    one_line_error(*run_cli("precompute", "--model", tmp_path / "nomodel", "--dataset", pairs_file, "--output", out),
                    "model not found", "nomodel")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", tmp_path / "nodata.jsonl",
                             "--output", out), "dataset not found", "nodata.jsonl")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file, "--output", out,
                             "--chosen-column", "good"), "no column 'good'", "columns found: prompt, chosen, rejected")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{oops}\n')
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", bad, "--output", out),
                    f"{bad}:3: invalid JSON")
    dup = write_jsonl(tmp_path / "dup.jsonl", make_pairs(3) + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", dup, "--output", out, "--strict"),
                    "row 3", "--strict")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file), "--output")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file, "--output", out,
                             "--batch-size", "0"), "--batch-size must be at least 1")
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", pairs_file, "--output", out,
                             "--batch-size", "two"), "--batch-size expects int")
    one_line_error(*run_cli("precompute", "--config", tmp_path / "none.yaml"), "config file not found")


def test_config_file_with_flag_override(tiny_model, tmp_path, pairs_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model}\ndataset: {pairs_file}\noutput: {tmp_path / 'c'}\nmax-length: 40\n"
                   "progress: false\n")
    code, err = run_cli("precompute", "--config", cfg, "--max-length", "50")
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["settings"]["max_length"] == 50
    cfg.write_text("model: x\nbogus_option: 1\n")
    one_line_error(*run_cli("precompute", "--config", cfg), "unknown option(s) bogus_option")


def test_hub_ids_that_cannot_be_loaded(tiny_model, tmp_path, pairs_file):
    """Offline (as in CI), a Hub id fails fast with one line naming it."""
    one_line_error(*run_cli("precompute", "--model", tiny_model, "--dataset", "no-such-org/no-such-dataset",
                             "--output", tmp_path / "o"), "cannot load dataset no-such-org/no-such-dataset")
    one_line_error(*run_cli("precompute", "--model", "no-such-org/no-such-model", "--dataset", pairs_file,
                             "--output", tmp_path / "o"), "cannot load", "no-such-org/no-such-model")


def test_help_does_not_import_torch():
    """`fastdpo --help` and `fastdpo COMMAND --help` answer in a fraction of a second: no torch import."""
    code = ("import sys\nfrom fastdpo.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['precompute', '--help'], ['eval', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"
