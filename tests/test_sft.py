"""`fastdpo sft`: every data format, the loss it reports, accumulation, and that it learns."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_pairs, run_cli, write_jsonl

from fastdpo.recipes.sft import sft


def metrics(run_dir):
    return [json.loads(x) for x in open(run_dir / "metrics.jsonl")]


def _sft(tiny_model, data_file, out, **kw):
    kw.setdefault("progress", False)
    return sft(model=tiny_model, dataset=str(data_file), output=str(out), **kw)


def test_first_step_loss_is_token_mean_nll(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": "Hello", "completion": " world"},
            {"prompt": "The capital", "completion": " of France is Paris."}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    _sft(tiny_model, f, tmp_path / "r", batch_size=2, max_steps=1, shuffle=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = tiny_tokenizer
    nll, n = 0.0, 0
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        full = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits.double().log_softmax(-1)[0]
        for t in range(len(p), len(full)):
            nll -= logp[t - 1, full[t]].item()
            n += 1
    assert abs(metrics(tmp_path / "r")[0]["loss"] - nll / n) < 1e-4


@pytest.mark.parametrize("fmt", ["preference", "completion", "messages", "text"])
def test_formats_train(tiny_model, tiny_tokenizer, tmp_path, fmt):
    """Every format trains, and the first step's loss is the token-mean NLL of its targets under the initial
    model (computed here from full logits in fp64, on the tokens fastdpo's data pipeline produced)."""
    from transformers import AutoModelForCausalLM

    from fastdpo import data
    from fastdpo.recipes.sft import SFTConfig

    pairs = make_pairs(8)
    rows = {
        "preference": pairs,
        "completion": [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs],
        "messages": [{"messages": [{"role": "user", "content": p["prompt"]},
                                   {"role": "assistant", "content": p["chosen"]}]} for p in pairs],
        "text": [{"text": p["prompt"] + p["chosen"]} for p in pairs],
    }[fmt]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    code, err = run_cli("sft", "--model", tiny_model, "--dataset", f, "--output", tmp_path / "r", "--max-steps", "2",
                        "--batch-size", "8", "--no-progress")
    assert code == 0, err
    m = metrics(tmp_path / "r")
    cfg = SFTConfig(model=tiny_model, dataset=str(f), output=str(tmp_path / "x"))
    kept, _, _ = data.tokenize_sft_dataset(data.load_source(cfg), tiny_tokenizer, cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    nll, n = 0.0, 0
    for p, c in zip(kept["prompt_ids"], kept["chosen_ids"]):
        with torch.no_grad():
            logp = model(torch.tensor([p + c])).logits.double().log_softmax(-1)[0]
        nll -= sum(logp[len(p) + j - 1, tok].item() for j, tok in enumerate(c))
        n += len(c)
    assert len(m) == 2 and len(kept) == 8 and m[0]["num_completion_tokens"] == n
    assert abs(m[0]["loss"] - nll / n) < 1e-4, (m[0]["loss"], nll / n)


def test_grad_accum_equals_larger_batch(tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(16))
    _sft(tiny_model, f, tmp_path / "a", batch_size=8, max_steps=2, lr=1e-3)
    _sft(tiny_model, f, tmp_path / "b", batch_size=2, grad_accum=4, max_steps=2, lr=1e-3)
    for x, y in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5


def test_learns(tiny_model, tmp_path):
    rows = [{"prompt": p["prompt"], "completion": " capital Paris."} for p in make_pairs(32)]
    _sft(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "r", batch_size=8, max_steps=24, lr=1e-2,
         epochs=6)
    m = metrics(tmp_path / "r")
    assert m[-1]["loss"] < 0.5 * m[0]["loss"]


def test_unknown_columns_error(tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    code, err = run_cli("sft", "--model", tiny_model, "--dataset", f, "--output", tmp_path / "r")
    assert code == 2 and "columns found: question, answer" in err


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_a_checkpoint_and_resume_equals_the_straight_run(tiny_model, tmp_path, monkeypatch, sig, code):
    """SIGTERM (preemption) or one Ctrl-C during step 2: the step finishes, checkpoint-2 is saved, one line, exit
    128 + the signal; --resume latest then gives the uninterrupted run's numbers exactly."""
    import os
    import signal

    from fastdpo.recipes.sft import SFTObjective

    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(16))
    args = ["sft", "--model", tiny_model, "--dataset", f, "--output", tmp_path / "r", "--batch-size", "4",
            "--max-steps", "4", "--lr", "1e-3", "--no-progress"]
    _sft(tiny_model, f, tmp_path / "straight", batch_size=4, max_steps=4, lr=1e-3)
    real, calls = SFTObjective.step, []

    def step(self, model, batch):
        calls.append(1)
        if len(calls) == 2:  # mid-step 2, as a scheduler's SIGTERM would land
            os.kill(os.getpid(), getattr(signal, sig))
        return real(self, model, batch)

    monkeypatch.setattr(SFTObjective, "step", step)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    got, err = run_cli(*args)
    assert got == code, err
    lines = [ln for ln in err.splitlines() if f"stopped by {sig}" in ln]
    assert lines == [f"fastdpo sft: stopped by {sig} at step 2 of 4: saved {tmp_path / 'r' / 'checkpoint-2'}; "
                     "continue with --resume latest"], err
    assert not (tmp_path / "r" / "model.safetensors").exists() and len(metrics(tmp_path / "r")) == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the handlers are put back
    monkeypatch.setattr(SFTObjective, "step", real)
    got, err = run_cli(*args, "--resume", "latest")
    assert got == 0, err
    keys = ("loss", "grad_norm", "lr", "logps/chosen")
    assert [[m[k] for k in keys] for m in metrics(tmp_path / "r")] == [[m[k] for k in keys]
                                                                       for m in metrics(tmp_path / "straight")]
