"""`fastdpo eval`: its numbers against a direct computation, and judged generation."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import make_pairs, one_line_error, run_cli, write_jsonl

from fastdpo.recipes.eval import evaluate
from fastdpo.recipes.precompute import PrecomputeConfig, precompute
from fastdpo.recipes.train import train


def _logps(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(ids).logits.double().log_softmax(-1)[0]
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[pos, torch.tensor(completion)].numpy()


def test_eval_matches_direct_computation(tiny_model, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(12, seed=5))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(f), output=str(tmp_path / "c"), progress=False))
    train(model=tiny_model, ref_cache=str(tmp_path / "c"), output=str(tmp_path / "r"), max_steps=3, lr=1e-2,
          batch_size=4, progress=False)
    res = evaluate(model=str(tmp_path / "r"), ref_cache=str(tmp_path / "c"), beta=0.2,
                   output=str(tmp_path / "eval.json"), progress=False)
    assert json.loads((tmp_path / "eval.json").read_text())["rewards/accuracies"] == res["rewards/accuracies"]

    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    ds = datasets.Dataset.from_file(str(tmp_path / "c" / "shard-00000.arrow"))
    rc, rr, log_ratios, seq = [], [], [], []
    for row in ds:
        pc = _logps(policy, row["prompt_ids"], row["chosen_ids"])
        pr = _logps(policy, row["prompt_ids"], row["rejected_ids"])
        rc.append(0.2 * (pc.sum() - row["ref_chosen_logps"]))
        rr.append(0.2 * (pr.sum() - row["ref_rejected_logps"]))
        log_ratios += list(pc - np.array(row["ref_chosen_token_logps"])) + list(
            pr - np.array(row["ref_rejected_token_logps"]))
        seq += [pc.sum() - row["ref_chosen_logps"], pr.sum() - row["ref_rejected_logps"]]
    rc, rr, lr = np.array(rc), np.array(rr), np.array(log_ratios)
    expect = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (rc > rr).mean(),
              "rewards/margins": (rc - rr).mean(), "kl/k1": lr.mean(), "kl/k3": (np.exp(-lr) - 1 + lr).mean(),
              "kl": (np.exp(lr) * lr).mean(),
              "kl/sequence": np.mean(seq)}
    for k, v in expect.items():
        assert math.isclose(res[k], v, abs_tol=1e-4), (k, res[k], v)
    assert res["num_pairs"] == 12 and res["rewards/margins"] != 0


def test_generate_with_judge(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "myjudge.py").write_text("def judge(prompt, completion):\n    return len(completion) % 2 == 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("myjudge", None)
    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(5))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(f), output=str(tmp_path / "c"), progress=False))
    code, err = run_cli("eval", "--model", tiny_model, "--ref-cache", tmp_path / "c", "--generate", "--judge",
                        "myjudge:judge", "--max-new-tokens", "5", "--output", tmp_path / "e.json", "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["num_generated"] == 5 and len(res["samples"]) == 5
    scores = [float(len(s["completion"]) % 2 == 0) for s in res["samples"]]
    assert res["generation_accuracy"] == sum(scores) / 5
    # the reference is the model itself: no drift
    assert abs(res["rewards/margins"]) < 1e-5 and abs(res["kl/k1"]) < 1e-5


def test_bad_judge(tiny_model, tmp_path):
    code, err = run_cli("eval", "--model", tiny_model, "--ref-cache", tmp_path, "--generate", "--judge", "nojudge")
    assert code == 2 and "module:function" in err


def test_answers_stop_at_the_models_end_of_turn_too(tiny_model):
    """Generation stops at the tokenizer's EOS and at every EOS id of the model's generation config (a chat model's
    end-of-turn token, which conversations are trained to end with), and cuts the answer there."""
    import types

    from fastdpo.modeling import load_model, load_tokenizer
    from fastdpo.recipes.eval import generate_tokens, stop_ids

    tok = load_tokenizer(tiny_model)
    chat = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=[7, tok.eos_token_id, 9]))
    assert stop_ids(chat, tok) == [tok.eos_token_id, 7, 9]
    assert stop_ids(types.SimpleNamespace(), tok) == [tok.eos_token_id]
    model = load_model(tiny_model)
    cfg = types.SimpleNamespace(batch_size=2, max_new_tokens=8, temperature=0.0)
    free = generate_tokens(model, tok, [[5, 6, 7], [8]], cfg, "cpu")
    assert all(free) and all(len(a) <= 8 for a in free)
    model.generation_config.eos_token_id = [tok.eos_token_id, free[0][1]]  # its second token now ends the turn
    cut = generate_tokens(model, tok, [[5, 6, 7], [8]], cfg, "cpu")
    assert cut[0] == free[0][:1] and free[0][1] not in cut[1]


@pytest.mark.parametrize("body,needle", [
    ("    if 'Q1:' in prompt:\n        raise KeyError('answer')\n    return 1.0",
     "raised KeyError on prompt 1: 'answer'"),
    ("    return None", "returned None (NoneType) on prompt 0; a judge returns a bool or a finite number"),
    ("    return 'yes'", "returned 'yes' (str) on prompt 0"),
    ("    return float('nan')", "returned nan (float) on prompt 0"),
])
def test_a_failing_judge_is_one_line_naming_it_the_prompt_and_the_value(tiny_model, small_cache, tmp_path,
                                                                         monkeypatch, body, needle):
    (tmp_path / "badjudge.py").write_text(f"def judge(prompt, completion):\n{body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("badjudge", None)
    code, err = run_cli("eval", "--model", tiny_model, "--ref-cache", small_cache, "--generate", "--judge",
                        "badjudge:judge", "--generate-limit", "3", "--max-new-tokens", "2", "--no-progress",
                        "--output", tmp_path / "e.json")
    line = one_line_error(code, err, "--judge badjudge:judge", needle)
    assert line.startswith("fastdpo eval: error:") and not (tmp_path / "e.json").exists()
