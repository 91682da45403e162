"""`fastdpo train` on tiny local models: exactness against the classic method, resume, refusal, LoRA."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FRESH_TOL, REPO, load_script, make_pairs, run_cli, write_jsonl

from fastdpo.recipes.precompute import PrecomputeConfig, precompute
from fastdpo.recipes.train import train

VALUE_FIELDS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", make_pairs(32, seed=1))


@pytest.fixture(scope="module")
def ref_cache(tiny_model, pairs, tmp_path_factory):
    """Default shard size, as a live-reference run groups rows: the two plan identical epochs."""
    out = tmp_path_factory.mktemp("cache") / "c"
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(pairs), output=str(out), batch_size=5, progress=False))
    return str(out)


@pytest.fixture(scope="module")
def sharded_cache(tiny_model, pairs, tmp_path_factory):
    """Four shards, so that shard order and rows within shards are shuffled."""
    out = tmp_path_factory.mktemp("cache") / "c"
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(pairs), output=str(out), shard_rows=10,
                                batch_size=5, progress=False))
    return str(out)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def assert_same_trajectory(a: list[dict], b: list[dict], atol: float, fields=VALUE_FIELDS):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for f in fields:
            margin = max(abs(ma["rewards/margins"]), abs(mb["rewards/margins"]))
            if f == "rewards/accuracies" and atol and margin < 1e-4:
                # While the policy still equals the reference every margin is rounding noise, and
                # `chosen > rejected` is a coin toss that differs between batch layouts and CPUs.
                continue
            assert math.isclose(ma[f], mb[f], rel_tol=0, abs_tol=atol), (ma["step"], f, ma[f], mb[f])


def _train(tiny_model, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("lr", 1e-3)
    return train(model=tiny_model, output=str(out), **kw)


def test_first_step_is_ln2_with_zero_margin(tiny_model, ref_cache, tmp_path):
    _train(tiny_model, tmp_path / "r", ref_cache=ref_cache, max_steps=2, batch_size=8)
    first = metrics(tmp_path / "r")[0]
    assert abs(first["loss"] - math.log(2)) < FRESH_TOL
    assert abs(first["rewards/margins"]) < FRESH_TOL and abs(first["rewards/chosen"]) < FRESH_TOL
    assert set(first) >= {"step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                          "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "lr", "samples_per_s",
                          "tokens_per_s", "elapsed_s", "peak_memory_gb"}


def test_cache_mode_equals_live_reference(tiny_model, ref_cache, pairs, tmp_path):
    """The whole point: training from the cache gives the numbers of classic two-model DPO."""
    _train(tiny_model, tmp_path / "cached", ref_cache=ref_cache, max_steps=5, batch_size=4)
    _train(tiny_model, tmp_path / "live", dataset=str(pairs), ref_model=tiny_model, max_steps=5, batch_size=4)
    a, b = metrics(tmp_path / "cached"), metrics(tmp_path / "live")
    assert a[-1]["rewards/margins"] != 0  # the policy moved
    assert_same_trajectory(a, b, atol=1e-5)


def test_grad_accum_equals_larger_batch(tiny_model, ref_cache, tmp_path):
    _train(tiny_model, tmp_path / "a", ref_cache=ref_cache, max_steps=3, batch_size=8, grad_accum=1)
    _train(tiny_model, tmp_path / "b", ref_cache=ref_cache, max_steps=3, batch_size=4, grad_accum=2)
    assert_same_trajectory(metrics(tmp_path / "a"), metrics(tmp_path / "b"), atol=1e-5)


def test_resume_reproduces_straight_run(tiny_model, sharded_cache, tmp_path):
    kw = dict(ref_cache=sharded_cache, max_steps=8, batch_size=4, epochs=3)
    _train(tiny_model, tmp_path / "straight", **kw)
    _train(tiny_model, tmp_path / "split", save_steps=4, **kw)
    ckpt = tmp_path / "split" / "checkpoint-4"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"} <= set(
        os.listdir(ckpt))
    # pretend the run died after step 6: drop what came after the checkpoint, then resume
    rows = metrics(tmp_path / "split")[:6]
    (tmp_path / "split" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _train(tiny_model, tmp_path / "split", resume=str(ckpt), **kw)
    resumed = metrics(tmp_path / "split")
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert_same_trajectory(metrics(tmp_path / "straight"), resumed, atol=0)


KILL_ARGS = ["--max-steps", "40", "--batch-size", "2", "--epochs", "10", "--lr", "1e-3", "--save-steps", "3",
             "--no-progress"]


@pytest.fixture(scope="module")
def straight_40(tiny_model, sharded_cache, tmp_path_factory):
    """The uninterrupted run the killed and stopped runs must equal."""
    out = tmp_path_factory.mktemp("straight") / "r"
    _train(tiny_model, out, ref_cache=sharded_cache, max_steps=40, batch_size=2, epochs=10)
    return out


def _start_then_signal(tiny_model, sharded_cache, out, sig):
    """`fastdpo train` as a process, sent `sig` once checkpoint-6 exists; (exit code, stderr)."""
    args = ["train", "--model", tiny_model, "--ref-cache", sharded_cache, "--output", str(out), *KILL_ARGS]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastdpo", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint-6").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert not (out / "model.safetensors").exists(), "signalled too late to test anything"
    return proc.returncode, err, args


@pytest.mark.integration
def test_sigkill_then_resume_latest(tiny_model, sharded_cache, straight_40, tmp_path):
    out = tmp_path / "run"
    _, _, args = _start_then_signal(tiny_model, sharded_cache, out, signal.SIGKILL)
    code, err = run_cli(*args, "--resume", "latest")  # its lock was left behind: the holder is gone, taken over
    assert code == 0, err
    assert "resumed from" in err
    assert_same_trajectory(metrics(straight_40), metrics(out), atol=0)


@pytest.mark.integration
def test_sigterm_saves_then_resume_latest(tiny_model, sharded_cache, straight_40, tmp_path):
    """SIGTERM (a cluster preempting the job): a checkpoint at the end of the step, one line, exit 143; resuming
    from it equals the uninterrupted run."""
    out = tmp_path / "run"
    code, err, args = _start_then_signal(tiny_model, sharded_cache, out, signal.SIGTERM)
    assert code == 143, err
    lines = [ln for ln in err.splitlines() if "stopped by SIGTERM" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    step = int(lines[0].split("at step ")[1].split()[0])
    assert step >= 6 and f"saved {out / f'checkpoint-{step}'}; continue with --resume latest" in lines[0]
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 1))
    assert not (out / ".fastdpo.lock").exists() and not list(out.glob(".*.tmp*"))
    code, err = run_cli(*args, "--resume", "latest")
    assert code == 0, err
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in err
    assert_same_trajectory(metrics(straight_40), metrics(out), atol=0)


def test_learns_a_synthetic_preference(tiny_model, tmp_path):
    """Chosen answers end in 'Paris.', rejected ones in 'world!': accuracy must climb above 0.9."""
    rows = [{"prompt": p["prompt"], "chosen": " capital Paris.", "rejected": " hello world!"}
            for p in make_pairs(48, seed=3)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data_file), output=str(tmp_path / "c"),
                                progress=False))
    _train(tiny_model, tmp_path / "r", ref_cache=str(tmp_path / "c"), max_steps=12, batch_size=8, lr=3e-3,
           epochs=3)
    m = metrics(tmp_path / "r")
    assert m[0]["rewards/accuracies"] < 0.9
    assert m[-1]["rewards/accuracies"] > 0.9 and m[-1]["rewards/margins"] > m[0]["rewards/margins"]
    assert m[-1]["loss"] < math.log(2)


def test_output_loads_with_transformers(tiny_model, ref_cache, tmp_path):
    """The saved model loads with transformers and holds the trained weights: AdamW (no weight decay) moves an
    element with a gradient by about lr at its first step and by at most lr per step, so after 2 steps of a
    linear schedule (lr, then lr/2) no element moved more than 1.5 lr and most moved at least lr/2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lr = 1e-4
    _train(tiny_model, tmp_path / "r", ref_cache=ref_cache, max_steps=2, lr=lr)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    AutoTokenizer.from_pretrained(tmp_path / "r")
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(trained.parameters(), base.parameters())])
    assert diff.max().item() <= 1.5 * lr * 1.001
    assert (diff >= 0.5 * lr).float().mean().item() > 0.5, "most weights should have taken both steps"
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert json.loads((tmp_path / "r" / "fastdpo_config.json").read_text())["ref_cache"] == ref_cache


def test_damaged_shard_refused_by_name(tiny_model, sharded_cache, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(sharded_cache, damaged)
    shard = damaged / "shard-00001.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", damaged, "--output", tmp_path / "o")
    assert code == 2 and "shard-00001.arrow is damaged" in err and "Traceback" not in err
    shard.write_bytes(bytes(raw[:100]))
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", damaged, "--output", tmp_path / "o")
    assert code == 2 and "shard-00001.arrow is truncated" in err
    shard.unlink()
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", damaged, "--output", tmp_path / "o")
    assert code == 2 and "shard-00001.arrow is missing" in err


def test_tokenizer_mismatch_refused(ref_cache, tmp_path):
    from conftest import CORPUS

    from fastdpo.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", texts=CORPUS[:5], vocab_size=300)
    code, err = run_cli("train", "--model", other, "--ref-cache", ref_cache, "--output", tmp_path / "o")
    assert code == 2 and "tokenizer mismatch" in err and str(other) in err and "Traceback" not in err


def test_weights_mismatch_warns(tiny_model, ref_cache, tmp_path):
    from fastdpo.modeling import load_tokenizer
    from fastdpo.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=7, tokenizer=load_tokenizer(tiny_model))
    code, err = run_cli("train", "--model", other, "--ref-cache", ref_cache, "--output", tmp_path / "o",
                        "--max-steps", "1", "--no-progress")
    assert code == 0 and "weights differ from the cache's reference" in err


@pytest.mark.parametrize("loss,extra", [
    ("ipo", {}),
    ("sigmoid,sft", {"loss_weights": [1.0, 0.2]}),
    ("sigmoid", {"ld_alpha": 0.5}),
    ("sigmoid,sft", {"ld_alpha": 0.5}),
    ("hinge", {"label_smoothing": 0.0}),
])
def test_other_losses_match_live_reference(tiny_model, ref_cache, pairs, tmp_path, loss, extra):
    kw = dict(max_steps=3, batch_size=4, loss=loss.split(","), **extra)
    _train(tiny_model, tmp_path / "a", ref_cache=ref_cache, **kw)
    _train(tiny_model, tmp_path / "b", dataset=str(pairs), **kw)  # live reference: a frozen copy of --model
    assert_same_trajectory(metrics(tmp_path / "a"), metrics(tmp_path / "b"), atol=1e-5)


def test_simpo_needs_no_reference(tiny_model, pairs, ref_cache, tmp_path):
    """SimPO from --dataset loads no reference; its first step equals the formula on the initial model's
    log-probs (the cache's reference values: the same model, scored the same way)."""
    import numpy as np

    from fastdpo.cache import CacheSource

    code, err = run_cli("train", "--model", tiny_model, "--dataset", pairs, "--loss", "simpo", "--beta", "2",
                        "--output", tmp_path / "r", "--max-steps", "2", "--batch-size", "32", "--no-progress")
    assert code == 0, err
    m = metrics(tmp_path / "r")
    rows = CacheSource(ref_cache).fetch(np.arange(32))  # step 1 holds all 32 pairs
    pc, pr = (np.array(rows[k], dtype=np.float64) for k in ("ref_chosen_logps", "ref_rejected_logps"))
    lc, lr = (np.array([len(x) for x in rows[k]], dtype=np.float64) for k in ("chosen_ids", "rejected_ids"))
    beta, gamma = 2.0, 0.5  # --beta, and simpo_gamma's default
    expected = np.mean(np.logaddexp(0.0, -(beta * (pc / lc - pr / lr) - gamma)))  # -logsigmoid
    assert len(m) == 2 and abs(m[0]["loss"] - expected) < 1e-5, (m[0]["loss"], expected)
    assert abs(m[0]["rewards/chosen"] - np.mean(beta * pc / lc)) < 1e-5  # SimPO's reward: beta x mean log-prob
    assert "kl" not in m[0]  # no reference, no KL estimate


def test_lora_adapter_loads_with_peft(tiny_model, ref_cache, tmp_path):
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    _train(tiny_model, tmp_path / "r", ref_cache=ref_cache, max_steps=2, lora_r=4, lr=1e-2)
    assert (tmp_path / "r" / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "r"))
    assert any("lora_" in n for n, _ in model.named_parameters())
    _train(tiny_model, tmp_path / "merged", ref_cache=ref_cache, max_steps=2, lora_r=4, lr=1e-2, merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # the same run, merged by peft from its adapter: the same weights
    by_peft, ours = model.merge_and_unload().state_dict(), merged.state_dict()
    assert by_peft.keys() == ours.keys() and all(torch.equal(by_peft[k], ours[k]) for k in ours)


def test_lora_live_reference_uses_base(tiny_model, ref_cache, pairs, tmp_path):
    """With LoRA and no --ref-model, the reference is the base with the adapter off: equal to the cache."""
    pytest.importorskip("peft")
    kw = dict(max_steps=3, batch_size=4, lora_r=4, lr=1e-2)
    _train(tiny_model, tmp_path / "a", ref_cache=ref_cache, **kw)
    _train(tiny_model, tmp_path / "b", dataset=str(pairs), **kw)
    assert_same_trajectory(metrics(tmp_path / "a"), metrics(tmp_path / "b"), atol=1e-5)


def test_bad_train_flags(tiny_model, ref_cache, pairs, tmp_path):
    cases = [
        (["--ref-cache", ref_cache, "--dataset", pairs], "not both"),
        ([], "missing data"),
        (["--ref-cache", ref_cache, "--loss", "dpo"], "unknown loss type 'dpo'"),
        (["--ref-cache", ref_cache, "--loss", "sigmoid,sft", "--loss-weights", "1"], "one weight per loss type"),
        (["--ref-cache", tmp_path / "nocache"], "reference cache not found"),
        (["--ref-cache", ref_cache, "--resume", tmp_path / "nockpt"], "not a complete fastdpo checkpoint"),
        (["--ref-cache", ref_cache, "--beta", "0"], "beta must be"),
    ]
    for extra, needle in cases:
        code, err = run_cli("train", "--model", tiny_model, "--output", tmp_path / "o", *extra)
        assert code == 2 and needle in err and "Traceback" not in err, (extra, err)


def test_kl_metric_and_early_stop(tiny_model, ref_cache, tmp_path):
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", ref_cache, "--output", tmp_path / "r",
                        "--max-steps", "40", "--epochs", "10", "--lr", "1e-2", "--batch-size", "8",
                        "--early-stop-kl", "0.05", "--kl-warn", "0.01", "--no-progress")
    assert code == 0, err
    m = metrics(tmp_path / "r")
    assert abs(m[0]["kl"]) < FRESH_TOL  # the policy starts as the reference
    assert m[-1]["kl"] > 0.05 and all(x["kl"] <= 0.05 for x in m[:-1]) and len(m) < 40
    assert "early stop at step" in err and "warning: per-token KL" in err
    assert (tmp_path / "r" / "model.safetensors").exists()  # an early stop still saves the model


def test_early_accuracy_warning(tiny_model, tmp_path):
    rows = [{"prompt": p["prompt"], "chosen": " capital Paris.", "rejected": " hello world!"}
            for p in make_pairs(40, seed=3)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    code, err = run_cli("train", "--model", tiny_model, "--dataset", f, "--output", tmp_path / "r", "--max-steps",
                        "60", "--epochs", "20", "--lr", "1e-2", "--batch-size", "4", "--no-progress")
    assert code == 0, err
    assert "warning: reward accuracy >= 0.95 for 5 steps" in err


def test_beta_sweep_from_one_cache(tiny_model, ref_cache, tmp_path):
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", ref_cache, "--output", tmp_path / "s",
                        "--beta", "0.1,0.5", "--max-steps", "2", "--no-progress")
    assert code == 0, err
    for b in ("0.1", "0.5"):
        cfg = json.loads((tmp_path / "s" / f"beta-{b}" / "fastdpo_config.json").read_text())
        assert cfg["beta"] == float(b) and len(metrics(tmp_path / "s" / f"beta-{b}")) == 2
    png = (tmp_path / "s" / "sweep" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_to_tensorboard(tiny_model, ref_cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tiny_model, tmp_path / "r", ref_cache=ref_cache, max_steps=3, report_to="tensorboard")
    events = list((tmp_path / "r").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert abs(acc.Scalars("loss")[0].value - math.log(2)) < 1e-5


def test_gradient_checkpointing_same_trajectory(tiny_model, ref_cache, tmp_path):
    _train(tiny_model, tmp_path / "a", ref_cache=ref_cache, max_steps=3)
    _train(tiny_model, tmp_path / "b", ref_cache=ref_cache, max_steps=3, gradient_checkpointing=True)
    assert_same_trajectory(metrics(tmp_path / "a"), metrics(tmp_path / "b"), atol=1e-5)


def test_bfloat16_runs(tiny_model, ref_cache, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _train(tiny_model, tmp_path / "r", ref_cache=ref_cache, max_steps=2, dtype="bfloat16")
    m = metrics(tmp_path / "r")
    assert all(math.isfinite(x["loss"]) for x in m)
    assert abs(m[0]["loss"] - math.log(2)) < 0.05  # the cache is fp32, the policy bf16: close, not equal
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert next(saved.parameters()).dtype == torch.bfloat16


def test_model_without_fused_head_falls_back_with_a_note(tiny_tokenizer, tmp_path):
    """A GPT-2 (not in the fused-head list): logits path, padded batches, each said once; numbers still exact."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(8))
    code, err = run_cli("precompute", "--model", tmp_path / "gpt2", "--dataset", f, "--output", tmp_path / "c",
                        "--no-progress")
    assert code == 0, err
    assert "not known to have a plain LM head" in err and "packing off by default" in err
    code, err = run_cli("train", "--model", tmp_path / "gpt2", "--ref-cache", tmp_path / "c", "--output",
                        tmp_path / "r", "--max-steps", "2", "--no-progress")
    assert code == 0, err
    m = metrics(tmp_path / "r")
    assert abs(m[0]["loss"] - math.log(2)) < FRESH_TOL and abs(m[0]["rewards/margins"]) < FRESH_TOL


@pytest.mark.integration
def test_compare_losses_dpo_pushes_rejected_down_ipo_stops(tiny_model, tmp_path, capsys):
    """tools/compare_losses.py: DPO and IPO from one cache. DPO keeps lowering the rejected answer's
    log-probability; IPO's squared loss settles at a finite margin, so its rejected log-prob stays higher."""
    tool = load_script(REPO / "tools" / "compare_losses.py")
    rows = [{"prompt": p["prompt"], "chosen": " capital Paris.", "rejected": " hello world!"}
            for p in make_pairs(32, seed=4)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data_file), output=str(tmp_path / "c"),
                                progress=False))
    code = tool.run(["--model", tiny_model, "--ref-cache", str(tmp_path / "c"), "--output", str(tmp_path / "cmp"),
                     "--losses", "sigmoid", "ipo", "--", "--beta", "0.5", "--lr", "3e-3", "--batch-size", "8",
                     "--epochs", "10", "--max-steps", "40", "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "loss-sigmoid" in table and "loss-ipo" in table
    dpo, ipo = metrics(tmp_path / "cmp" / "loss-sigmoid"), metrics(tmp_path / "cmp" / "loss-ipo")
    assert json.loads((tmp_path / "cmp" / "loss-ipo" / "fastdpo_config.json").read_text())["loss"] == ["ipo"]
    assert dpo[0]["logps/rejected"] == ipo[0]["logps/rejected"]  # same cache, same start
    assert dpo[-1]["logps/rejected"] < ipo[-1]["logps/rejected"]
    assert dpo[-1]["logps/rejected"] < dpo[29]["logps/rejected"]  # DPO's gradient never vanishes: still falling
    settled = [m["logps/rejected"] for m in ipo[20:]]
    assert max(settled) - min(settled) < 1.0  # IPO has stopped moving it
    assert (tmp_path / "cmp" / "compare" / "curves.png").stat().st_size > 5000


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for CPU runs")
def test_flex_attention_training_on_cpu_is_refused(tiny_model, ref_cache, tmp_path):
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", ref_cache, "--output", tmp_path / "r",
                        "--attn-implementation", "flex_attention", "--no-progress")
    assert code == 2 and "FlexAttention has no CPU backward" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("ipo", {}), ("sigmoid,sft", {"ld_alpha": 0.5}),
                                        ("simpo", {"beta": 2.0}), ("aot", {})])
def test_loss_inside_the_fused_head_equals_the_log_prob_path(tiny_model, ref_cache, tmp_path, monkeypatch, loss,
                                                             extra):
    """The 3-GEMM path (loss and its gradient formed in the head's chunk loop, chunks of 1-2 pairs here) trains
    the same trajectory as the 4-GEMM log-prob path; aot couples the pairs of a micro-batch, so it keeps the latter."""
    import importlib

    import fastdpo.kernels.linear_loss as head

    import fastdpo.scoring as scoring

    train_mod = importlib.import_module("fastdpo.recipes.train")
    used = []
    real = train_mod.PreferenceObjective.step

    def spy(self, *a):
        used.append(self.fused)
        return real(self, *a)

    monkeypatch.setattr(train_mod.PreferenceObjective, "step", spy)
    monkeypatch.setattr(head, "_LOSS_TILE_BYTES", 400 * 4 * 40)  # 40 tokens of V = 400 fp32 logits per chunk
    kw = dict(max_steps=3, batch_size=6, loss=loss.split(","), **extra)
    _train(tiny_model, tmp_path / "fused", ref_cache=ref_cache, **kw)
    fused_used = set(used)
    monkeypatch.setattr(scoring, "fused_loss_applies", lambda *a: False)
    used.clear()
    _train(tiny_model, tmp_path / "plain", ref_cache=ref_cache, **kw)
    assert fused_used == {loss != "aot"} and set(used) == {False}
    assert_same_trajectory(metrics(tmp_path / "fused"), metrics(tmp_path / "plain"), atol=1e-5)


def test_the_loss_formula_is_at_most_8_frames_below_fit(tiny_model, ref_cache, tmp_path, monkeypatch):
    """Readability as a number: on the default path (full fine-tune, the loss fused into the LM head) a traceback
    raised inside the DPO formula (`losses._sigmoid`) is at most 8 Python frames deep counted from `Trainer.fit`:
    fit -> objective.step -> kernels.linear_pair_loss -> Function.apply -> forward -> train.pair_loss ->
    losses.preference_loss -> the formula; and the loss function is `train.pair_loss`, an explicit argument."""
    import traceback

    import fastdpo.losses as losses

    class Formula(Exception):
        pass

    def formula(b):
        raise Formula

    monkeypatch.setitem(losses._LOSS_FNS, "sigmoid", formula)
    with pytest.raises(Formula) as e:
        _train(tiny_model, tmp_path / "r", ref_cache=ref_cache, max_steps=1)
    frames = traceback.extract_tb(e.value.__traceback__)
    names = [f.name for f in frames]
    below = [f"{Path(f.filename).name}:{f.name}" for f in frames[names.index("fit"):]]
    assert below[0] == "loop.py:fit" and below[-1] == "test_train.py:formula", below
    assert len(below) <= 8, below
    assert "linear_loss.py:forward" in below and below.index("train.py:pair_loss") > below.index(
        "linear_loss.py:forward"), below
