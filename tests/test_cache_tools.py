"""`fastdpo cache info`, `fastdpo cache verify`, caches built from reference log-probs computed elsewhere, and a
console that shows the signal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_pairs, run_cli, write_jsonl

from fastdpo import cache
from fastdpo.errors import UserError
from fastdpo.recipes.precompute import PrecomputeConfig, precompute


@pytest.fixture(scope="module")
def cache_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    data = write_jsonl(root / "d.jsonl", make_pairs(20, seed=3) + [{"prompt": "x", "chosen": " a", "rejected": " a"}])
    out = root / "c"
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data), output=str(out), shard_rows=8,
                                max_length=24, progress=False))
    return out


def shard_lengths(cache_dir, column):
    return np.concatenate([[len(x) for x in cache.read_shard(p).column(column).to_pylist()]
                           for p in sorted(cache_dir.glob("shard-*.arrow"))])


def test_info_reports_the_cache(cache_dir, capsys):
    code, _ = run_cli("cache", "info", cache_dir)
    text = capsys.readouterr().out
    assert code == 0
    prompt = shard_lengths(cache_dir, "prompt_ids")
    assert f"{len(prompt)} pairs in 3 shard(s)" in text and "skipped 1: chosen_equals_rejected=1" in text
    assert "max_length 24" in text and "problems   none found" in text
    code, _ = run_cli("cache", "info", cache_dir, "--json")
    info = json.loads(capsys.readouterr().out)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert info["rows"] == len(prompt) == sum(s["rows"] for s in manifest["shards"])
    assert info["bytes"] == sum((cache_dir / s["file"]).stat().st_size for s in manifest["shards"])
    assert info["lengths"]["prompt"]["min"] == prompt.min() and info["lengths"]["prompt"]["max"] == prompt.max()
    assert info["lengths"]["prompt"]["median"] == np.median(prompt)
    chosen = shard_lengths(cache_dir, "chosen_ids")
    assert info["lengths"]["chosen"]["at_cap"] == pytest.approx(np.mean(prompt + chosen >= 24))
    assert 0 < info["lengths"]["chosen"]["at_cap"] < 1  # some completions were cut at --max-length 24


def test_info_reports_a_damaged_cache(cache_dir, tmp_path, capsys):
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    (copy / "shard-00001.arrow").unlink()
    shutil.copy(copy / "shard-00000.arrow", copy / "shard-00007.arrow")
    code, err = run_cli("cache", "info", copy)
    text = capsys.readouterr().out
    assert code == 1 and "Traceback" not in err
    assert "shard-00001.arrow: missing" in text and "not in the manifest: shard-00007.arrow" in text
    (copy / "manifest.json").write_text("{")
    code, _ = run_cli("cache", "info", copy)
    assert code == 1 and "is damaged" in capsys.readouterr().out


def test_verify_against_its_own_model(cache_dir, tiny_model, capsys):
    code, err = run_cli("cache", "verify", cache_dir)
    assert code == 0 and "sha256 ok" in capsys.readouterr().out, err
    code, err = run_cli("cache", "verify", cache_dir, "--model", tiny_model, "--sample", "8", "--seed", "1")
    out = capsys.readouterr().out
    assert code == 0 and ": OK" in out and "8 rows recomputed" in out, err


def test_verify_fails_on_perturbed_weights(cache_dir, tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "perturbed"
    shutil.copytree(tiny_model, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if "mlp.down_proj" in k)
    weights[name] = weights[name] + 0.01 * torch.randn_like(weights[name])  # same architecture, other weights
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli("cache", "verify", cache_dir, "--model", other, "--sample", "8")
    lines = [ln for ln in err.strip().splitlines() if "FAILED" in ln]
    assert code == 1 and len(lines) == 1 and "(row " in lines[0] and "tolerance 0.0001" in lines[0], err


def test_verify_fails_on_a_flipped_byte(cache_dir, tmp_path, capsys):
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    shard = copy / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, err = run_cli("cache", "verify", copy)
    assert code == 1 and "FAILED" in err and "shard-00002.arrow is damaged" in err and "Traceback" not in err


def _swap_in(copy, index: int, shard_path):
    """Put another shard file in place of shard `index`, with the manifest's sha256, bytes and rows edited to match
    (what the bytes-only check cannot tell apart)."""
    from fastdpo.io import sha256_file

    target = copy / cache.shard_name(index)
    shutil.copy(shard_path, target)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][index].update(sha256=sha256_file(target), bytes=target.stat().st_size,
                                     rows=cache.read_shard(target).num_rows)
    (copy / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("source,needle", [
    ("other", "belongs to another cache: its metadata names fingerprint"),
    ("shard-00000.arrow", "is shard 0 of its cache but listed as shard 1"),
])
def test_verify_and_train_read_each_shards_own_metadata(cache_dir, tiny_model, tiny_tokenizer, tmp_path, source,
                                                        needle, capsys):
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    if source == "other":  # shard 1's rows, in a cache of their own (another fingerprint)
        rows = cache.read_shard(cache_dir / "shard-00001.arrow").to_pylist()
        cache.write(rows, tmp_path / "other", tokenizer=tiny_tokenizer, reference="elsewhere", shard_rows=len(rows))
        _swap_in(copy, 1, tmp_path / "other" / "shard-00000.arrow")
    else:
        _swap_in(copy, 1, cache_dir / source)
    code, err = run_cli("cache", "verify", copy)
    assert code == 1 and "FAILED" in err and "shard-00001.arrow" in err and needle in err, err
    assert "Traceback" not in err
    from conftest import one_line_error

    one_line_error(*run_cli("train", "--model", tiny_model, "--ref-cache", copy, "--output", tmp_path / "r",
                            "--no-progress"), needle)
    run_cli("cache", "info", copy)
    assert needle in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_info_reports_hand_edited_fields_one_line_each(cache_dir, tiny_model, tmp_path, capsys):
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["dataset"]["rows_read"]
    manifest["timings"] = {"total_s": "fast"}
    manifest["shards"][0]["bytes"] = 10**400  # a 10^400-byte shard
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli("cache", "info", copy)
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert len(lines) == 3 and all(ln.startswith(f"{copy}: damaged: manifest.json: ") for ln in lines), lines
    assert "dataset.rows_read is missing" in lines[0] and "'timings'" in lines[1]
    assert "shards[0].bytes 1000000000" in lines[2] and "(401 characters) is not a file size" in lines[2]
    code, _ = run_cli("cache", "info", copy, "--json")
    assert code == 1 and len(json.loads(capsys.readouterr().out)["problems"]) == 3
    code, err = run_cli("cache", "verify", copy)
    assert code == 1 and "dataset.rows_read is missing (and 2 more: fastdpo cache info lists them)" in err
    (copy / "manifest.json").write_text('{"format_version": 1, "shards": [{"bytes": 1' + "0" * 5000 + "}]}")
    code, err = run_cli("cache", "info", copy)  # past Python's digit limit for int()
    assert code == 1 and "is damaged" in capsys.readouterr().out and "Traceback" not in err


# ---------------------------------------------------------------- bring your own reference log-probs


def independent_reference_rows(model_dir, cache_dir):
    """What another framework would produce: the cache's token ids, scored with plain transformers in fp64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    rows = []
    for path in sorted(cache_dir.glob("shard-*.arrow")):
        for r in cache.read_shard(path).to_pylist():
            out = {"id": r["id"], "prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"],
                   "rejected_ids": r["rejected_ids"]}
            for side in ("chosen", "rejected"):
                ids = r["prompt_ids"] + r[f"{side}_ids"]
                with torch.no_grad():
                    logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
                p = len(r["prompt_ids"])
                out[f"ref_{side}_token_logps"] = [logp[p + j - 1, t].item() for j, t in enumerate(r[f"{side}_ids"])]
            rows.append(out)
    return rows


def test_external_reference_trains_like_a_computed_cache(cache_dir, tiny_model, tiny_tokenizer, tmp_path):
    from fastdpo.recipes.train import train

    rows = independent_reference_rows(tiny_model, cache_dir)
    manifest = cache.write(rows, tmp_path / "ext", tokenizer=tiny_tokenizer, reference="plain transformers, fp64",
                           shard_rows=8)  # the same shards: the same epoch plan
    assert manifest.model["external"] and manifest.num_rows == len(rows)
    kw = dict(model=tiny_model, max_steps=3, batch_size=4, progress=False)
    train(ref_cache=str(cache_dir), output=str(tmp_path / "a"), **kw)
    train(ref_cache=str(tmp_path / "ext"), output=str(tmp_path / "b"), **kw)
    a, b = ([json.loads(x) for x in open(tmp_path / r / "metrics.jsonl")] for r in ("a", "b"))
    for x, y in zip(a, b):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert abs(x[k] - y[k]) < 1e-5, (k, x[k], y[k])
    code, err = run_cli("cache", "verify", tmp_path / "ext", "--model", tiny_model, "--sample", "6")
    assert code == 0, err


@pytest.mark.parametrize("edit,needle", [
    (lambda r: r.update(ref_chosen_token_logps=r["ref_chosen_token_logps"][:-1]), "values for"),
    (lambda r: r.update(ref_rejected_token_logps=[0.5] * len(r["rejected_ids"])), "<= 0"),
    (lambda r: r.update(ref_chosen_token_logps=[float("nan")] * len(r["chosen_ids"])), "finite"),
    (lambda r: r.update(chosen_ids=[10**6] * len(r["chosen_ids"])), "outside the tokenizer"),
    (lambda r: r.update(ref_chosen_logps=sum(r["ref_chosen_token_logps"]) - 1.0), "not the sum"),
    (lambda r: r.pop("rejected_ids"), "missing rejected_ids"),
])
def test_external_rows_are_checked(tiny_tokenizer, tmp_path, edit, needle):
    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9],
             "ref_chosen_token_logps": [-1.0, -2.0], "ref_rejected_token_logps": [-0.5]} for _ in range(3)]
    edit(rows[2])
    with pytest.raises(UserError, match=f"row 2: .*{needle}"):
        cache.write(rows, tmp_path / "ext", tokenizer=tiny_tokenizer, reference="x")
    assert not (tmp_path / "ext" / "manifest.json").exists()


def _rows(n: int) -> list[dict]:
    return [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9], "ref_chosen_token_logps": [-1.0, -2.0],
             "ref_rejected_token_logps": [-0.5]} for _ in range(n)]


@pytest.mark.parametrize("edit,needle", [
    (lambda r: r.update(prompt_ids=[5, 7.9]), "prompt_ids holds 7.9: token ids are integers"),
    (lambda r: r.update(chosen_ids=[7.0, 8.0]), "chosen_ids holds 7.0: token ids are integers"),
    (lambda r: r.update(rejected_ids=[True]), "rejected_ids holds True"),
    (lambda r: r.update(chosen_ids=["7", "8"]), "chosen_ids holds '7'"),
    (lambda r: r.update(id=2.5), "id 2.5 is not an integer"),
    (lambda r: r.update(id=0), "id 0 is also row 0's"),
])
def test_external_ids_must_be_integers(tiny_tokenizer, tmp_path, edit, needle):
    rows = _rows(3)
    edit(rows[2])
    with pytest.raises(UserError, match=f"row 2: {needle}"):
        cache.write(rows, tmp_path / "ext", tokenizer=tiny_tokenizer, reference="x")
    assert not (tmp_path / "ext").exists()


def test_write_refuses_bad_shard_rows_and_a_failed_write_blocks_no_retry(tiny_tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "ext"
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(UserError, match=f"shard_rows must be an integer >= 1, got {bad!r}"):
            cache.write(_rows(3), out, tokenizer=tiny_tokenizer, reference="x", shard_rows=bad)
        assert not out.exists()
    real = cache.write_shard

    def full_disk(path, table):  # the second shard: the disk is full
        if path.name == cache.shard_name(1):
            raise UserError(f"cannot write {path}: no space left on device")
        return real(path, table)

    monkeypatch.setattr(cache, "write_shard", full_disk)
    with pytest.raises(UserError, match="no space left"):
        cache.write(_rows(3), out, tokenizer=tiny_tokenizer, reference="x", shard_rows=2)
    assert not out.exists()  # nothing of it is left
    monkeypatch.setattr(cache, "write_shard", real)
    manifest = cache.write(_rows(5), out, tokenizer=tiny_tokenizer, reference="x", shard_rows=2)  # other rows
    assert manifest.num_rows == 5 and [s.rows for s in manifest.shards] == [2, 2, 1]
    assert cache.verify(out)["ok"] and sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]


# ---------------------------------------------------------------- console


def test_no_progress_is_quiet_and_the_config_is_a_diff(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(6))
    code, err = run_cli("precompute", "--model", tiny_model, "--dataset", data, "--output", tmp_path / "c",
                        "--no-progress", "--batch-size", "3")
    assert code == 0, err
    assert "%|" not in err, err  # no bar: ours, datasets' (tokenizing) or transformers' (loading weights)
    printed = {ln.split("=")[0].strip(): ln.split("=", 1)[1].strip() for ln in err.splitlines() if " = " in ln}
    assert printed == {"model": repr(tiny_model), "dataset": repr(str(data)), "output": repr(str(tmp_path / "c")),
                       "batch_size": "3", "progress": "False"}  # what differs from the defaults ...
    saved = json.loads((tmp_path / "c" / "manifest.json").read_text())["config"]
    assert saved["shard_rows"] == 4096 and saved["truncation"] == "keep_end"  # ... but saved
    assert len(err.strip().splitlines()) <= 10, err
