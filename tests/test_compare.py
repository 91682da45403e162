"""`fastdpo compare`: the win-rate statistics against hand-computed values, the three judges against direct
computations on tiny local models, position bias, bad judges, and interrupted comparisons."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import one_line_error, run_cli, write_jsonl

from fastdpo.recipes.compare import compare, summarise, table, wilson_interval

JUDGES = '''
def longer(prompt, answer_a, answer_b):
    return "a" if len(answer_a) > len(answer_b) else "b" if len(answer_b) > len(answer_a) else "tie"

def always_a(prompt, answer_a, answer_b):
    return "a"

def soft(prompt, answer_a, answer_b):
    return 0.5 + 0.4 * ((len(answer_a) > len(answer_b)) - (len(answer_b) > len(answer_a)))

def says_yes(prompt, answer_a, answer_b):
    return "yes"

def pointwise(prompt, completion):
    return True

SEEN = []

def recording(prompt, answer_a, answer_b):
    SEEN.append(prompt)
    return "tie"
'''


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    d = tmp_path_factory.mktemp("judges")
    (d / "cmp_judges.py").write_text(JUDGES)
    sys.path.insert(0, str(d))
    sys.modules.pop("cmp_judges", None)
    yield "cmp_judges"
    sys.path.remove(str(d))


@pytest.fixture(scope="module")
def other_model(tiny_model, tmp_path_factory):
    """Another random tiny Llama with the same tokenizer: it answers differently."""
    from fastdpo.modeling import load_tokenizer
    from fastdpo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "m", tokenizer=load_tokenizer(tiny_model), seed=1)


@pytest.fixture(scope="module")
def reward_models(tiny_model, tmp_path_factory):
    """(a one-output reward model, a three-output one, a backbone without a reward head), random weights, the tiny
    tokenizer."""
    from transformers import AutoModelForSequenceClassification, LlamaModel

    from fastdpo.modeling import load_tokenizer
    from fastdpo.tiny import build_tiny_reward_model

    root, tok = tmp_path_factory.mktemp("rm"), load_tokenizer(tiny_model)
    rm = build_tiny_reward_model(root / "rm", tok, seed=3)
    rm3 = build_tiny_reward_model(root / "rm3", tok, num_labels=3)
    LlamaModel(AutoModelForSequenceClassification.from_pretrained(rm).config).save_pretrained(root / "headless")
    tok.save_pretrained(root / "headless")
    return rm, rm3, str(root / "headless")


def _run(tiny_model, baseline, cache, out, *extra, limit=6):
    return compare(model=tiny_model, baseline=baseline, ref_cache=cache, output=str(out), max_new_tokens=6,
                   batch_size=4, limit=limit, progress=False, **dict(extra))


def _same_report(a: dict, b: dict) -> bool:
    """Equal but for the time taken and where they were written."""
    def strip(r):
        return {**{k: v for k, v in r.items() if k not in ("elapsed_s", "plot")},
                "config": {k: v for k, v in r["config"].items() if k != "output"}}

    diff = [k for k in set(a) | set(b) if strip(a).get(k) != strip(b).get(k)]
    assert not diff, diff
    return True


# ----------------------------------------------------------------------------------------------
# Statistics


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(50, 100)  # the textbook case: [0.4038, 0.5962]
    assert math.isclose(lo, 0.40383, abs_tol=1e-5) and math.isclose(hi, 0.59617, abs_tol=1e-5)
    lo, hi = wilson_interval(0, 10)  # Wilson never leaves [0, 1], and is not empty at 0 successes
    assert lo == 0.0 and math.isclose(hi, 0.27753, abs_tol=1e-5)
    lo, hi = wilson_interval(9.5, 10)  # a half success (a tie) is allowed
    assert lo < 0.95 < hi <= 1.0


def _pair(p_ab, p_ba, la, lb):
    return {"model": {"tokens": la}, "baseline": {"tokens": lb},
            "judgement": {"model_first": {"p_first": p_ab}, "baseline_first": {"p_first": p_ba}}}


def test_summary_rules_both_orders_ties_and_lengths():
    pairs = [_pair(1.0, 0.0, 10, 10),   # both orders prefer A: a win
             _pair(0.9, 0.2, 12, 10),   # a win (p within [0, 1], not only 0/1)
             _pair(0.0, 1.0, 5, 10),    # both prefer B: a loss
             _pair(1.0, 1.0, 10, 10),   # first-shown always wins: the orders disagree, a tie
             _pair(0.5004, 0.0, 10, 30),  # one order within the tie epsilon: a tie, and the orders disagree
             _pair(0.5, 0.5, 10, 10)]   # both ties
    s = summarise(pairs, eps=1e-3, tol=0.2)
    assert [p["winner"] for p in pairs] == ["model", "model", "baseline", "tie", "tie", "tie"]
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (2, 3, 1, 6)
    assert s["win_rate"] == pytest.approx(3.5 / 6)
    assert s["ci95"] == pytest.approx(list(wilson_interval(3.5, 6)))
    assert s["orders"]["disagree"] == pytest.approx(2 / 6)
    # of the 12 single-order judgements: first shown preferred in pairs 1, 2 (A first), 4 (both) ...
    assert s["orders"]["first_shown_preferred"] == pytest.approx(5 / 12)
    assert s["orders"]["second_shown_preferred"] == pytest.approx(4 / 12)
    assert s["lengths"]["model"] == {"mean": pytest.approx(57 / 6), "median": 10.0, "max": 12, "at_cap": None}
    assert summarise(pairs, eps=1e-3, tol=0.2, cap=10)["lengths"]["baseline"]["at_cap"] == 1.0  # 10 or more
    assert s["lengths"]["baseline"]["median"] == 10.0
    # within 20% of the longer: pairs 1, 2 (12 vs 10), 4, 6; not 3 (5 vs 10) or 5 (10 vs 30)
    lb = s["length_balanced"]
    assert (lb["n"], lb["wins"], lb["ties"], lb["losses"]) == (4, 2, 2, 0) and lb["win_rate"] == 0.75
    # decided pairs of different lengths: 2 (A longer, A won) and 3 (B longer, B won)
    assert s["longer_won"] == {"n": 2, "fraction": 1.0}
    # a reward model: one judgement per pair, no order
    rm = summarise([{"model": {"tokens": 3}, "baseline": {"tokens": 3}, "judgement": {"rewards": {}, "p_model": p}}
                    for p in (0.9, 0.1, 0.5002)], eps=1e-3, tol=0.2)
    assert (rm["wins"], rm["ties"], rm["losses"]) == (1, 1, 1) and rm["orders"] is None


# ----------------------------------------------------------------------------------------------
# The judges on tiny models


@pytest.mark.integration
def test_program_judge_self_comparison_and_position_bias(tiny_model, other_model, small_cache, judges, tmp_path):
    code, err = run_cli("compare", "--model", tiny_model, "--baseline", tiny_model, "--ref-cache", small_cache,
                        "--judge", f"{judges}:longer", "--output", tmp_path / "self", "--max-new-tokens", "6",
                        "--limit", "8", "--batch-size", "4", "--no-progress")
    assert code == 0, err
    r = json.loads((tmp_path / "self" / "report.json").read_text())
    assert r["n"] == 8 and r["ties"] == 8 and r["win_rate"] == 0.5  # the same answers: every pair ties
    assert r["ci95"][0] < 0.5 < r["ci95"][1] and r["orders"]["disagree"] == 0
    assert all(p["model"] == p["baseline"] for p in r["pairs"])
    assert (tmp_path / "self" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a judge that always picks the first-shown answer: its every "win" is cancelled by the swapped order
    r = _run(tiny_model, other_model, small_cache, tmp_path / "biased", ("judge", f"{judges}:always_a"))
    assert r["ties"] == r["n"] == 6 and r["wins"] == r["losses"] == 0 and r["win_rate"] == 0.5
    assert r["orders"] == {"disagree": 1.0, "first_shown_preferred": 1.0, "second_shown_preferred": 0.0}
    assert any(p["model"]["text"] != p["baseline"]["text"] for p in r["pairs"])  # the models do answer differently
    for p in r["pairs"]:
        assert p["judgement"]["model_first"]["raw"] == p["judgement"]["baseline_first"]["raw"] == "a"

    # a consistent judge (longer text wins, as a float in [0, 1]): the verdicts follow the texts
    r = _run(tiny_model, other_model, small_cache, tmp_path / "soft", ("judge", f"{judges}:soft"))
    for p in r["pairs"]:
        a, b = len(p["model"]["text"]), len(p["baseline"]["text"])
        assert p["winner"] == ("model" if a > b else "baseline" if b > a else "tie")
        assert p["judgement"]["model_first"]["p_first"] == pytest.approx(0.9 if a > b else 0.1 if b > a else 0.5)
    assert r["orders"]["disagree"] == 0 and "win rate of A over B" in table(r)


@pytest.mark.integration
def test_reward_model_judge_against_direct_rewards(tiny_model, other_model, small_cache, reward_models, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = reward_models[0]
    r = _run(tiny_model, tiny_model, small_cache, tmp_path / "self", ("reward_model", rm))
    assert r["ties"] == r["n"] == 6 and r["win_rate"] == 0.5 and r["ci95"][0] < 0.5 < r["ci95"][1]
    assert r["orders"] is None

    r = _run(tiny_model, other_model, small_cache, tmp_path / "other", ("reward_model", rm))
    model, tok = AutoModelForSequenceClassification.from_pretrained(rm), AutoTokenizer.from_pretrained(rm)
    for p in r["pairs"]:  # each answer scored alone (no padding), in the reward model's chat template
        rewards = {}
        for side in ("model", "baseline"):
            msgs = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]["text"]}]
            ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                rewards[side] = model(**ids).logits[0, 0].item()
        assert p["judgement"]["rewards"] == pytest.approx(rewards, abs=1e-4)
        d = rewards["model"] - rewards["baseline"]
        assert p["winner"] == ("tie" if abs(1 / (1 + math.exp(-d)) - 0.5) <= 1e-3 else "model" if d > 0 else
                               "baseline")
    assert r["wins"] + r["losses"] > 0  # random rewards do decide


@pytest.mark.integration
def test_llm_judge_reads_label_logprobs(tiny_model, other_model, small_cache, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from fastdpo.judges import LLM_JUDGE_TEMPLATE
    from fastdpo.modeling import load_tokenizer

    r = _run(tiny_model, other_model, small_cache, tmp_path / "llm", ("llm_judge", tiny_model), limit=3)
    judge, tok = AutoModelForCausalLM.from_pretrained(tiny_model), load_tokenizer(tiny_model)
    for p in r["pairs"]:
        for order, (first, second) in (("model_first", ("model", "baseline")), ("baseline_first", ("baseline",
                                                                                                   "model"))):
            text = LLM_JUDGE_TEMPLATE.format(prompt=p["prompt"], answer_a=p[first]["text"],
                                             answer_b=p[second]["text"])
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]  # a chat text: the template's BOS, none here
            with torch.no_grad():
                logp = judge(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            la, lb = (logp[tok(x, add_special_tokens=False)["input_ids"][0]].item() for x in ("A", "B"))
            got = p["judgement"][order]
            assert got["raw"]["logp_a"] == pytest.approx(la, abs=1e-4), (order, got, la)
            assert got["raw"]["logp_b"] == pytest.approx(lb, abs=1e-4)
            assert got["p_first"] == pytest.approx(1 / (1 + math.exp(lb - la)), abs=1e-5)


@pytest.mark.integration
def test_bad_judges_are_one_line(tiny_model, small_cache, reward_models, judges, tmp_path):
    def cli(*judge, out="o"):
        return run_cli("compare", "--model", tiny_model, "--baseline", tiny_model, "--ref-cache", small_cache,
                       "--output", tmp_path / out, "--limit", "2", "--max-new-tokens", "2", "--no-progress", *judge)

    one_line_error(*cli("--judge", "no_such_module:fn"), "--judge no_such_module:fn", "cannot import")
    one_line_error(*cli("--judge", f"{judges}:missing"), f"{judges} has no function missing")
    one_line_error(*cli("--judge", f"{judges}:pointwise"), "must take (prompt, answer_a, answer_b)")
    one_line_error(*cli("--judge", f"{judges}:says_yes", out="yes"), f"--judge {judges}:says_yes returned 'yes'",
                   "prompt id")
    # the answers were written; the fixed judge continues from them (the failed one left no judgement to replace)
    code, err = cli("--judge", f"{judges}:longer", out="yes")
    assert code == 0 and (tmp_path / "yes" / "report.json").exists(), err
    one_line_error(*cli("--reward-model", reward_models[1]), "has 3 output labels", "--reward-index")
    one_line_error(*cli("--reward-model", reward_models[1], "--reward-index", "3"), "--reward-index 3", "(0 to 2)")
    one_line_error(*cli("--reward-model", tiny_model), "LlamaForCausalLM", "--llm-judge")
    one_line_error(*cli("--reward-model", reward_models[2], out="headless"), "no trained reward head", "score.weight")
    one_line_error(*cli(), "exactly one judge")
    one_line_error(*cli("--judge", f"{judges}:longer", "--llm-judge", tiny_model), "exactly one judge")
    one_line_error(*cli("--judge", f"{judges}:longer", "--split", "test"), "--split", "apply to --dataset")
    # nothing was written for the mistakes caught before the models answered
    assert not (tmp_path / "o").exists()
    # a multi-label reward model with its index runs
    r = _run(tiny_model, tiny_model, small_cache, tmp_path / "rm3", ("reward_model", reward_models[1]),
             ("reward_index", 2), limit=2)
    assert r["n"] == 2 and r["judge"]["reward_index"] == 2


# ----------------------------------------------------------------------------------------------
# Resume and the output directory


@pytest.mark.integration
def test_interrupted_comparison_resumes_to_the_same_report(tiny_model, other_model, small_cache, judges, tmp_path,
                                                           monkeypatch):
    import fastdpo.recipes.eval

    kw = (("judge", f"{judges}:soft"), ("temperature", 1.0))  # sampled: the resumed batches must draw the same
    full = _run(tiny_model, other_model, small_cache, tmp_path / "full", *kw, limit=10)

    real, calls = fastdpo.recipes.eval.generate_tokens, []

    def flaky(model, tok, prompts, cfg, device):
        calls.append(len(prompts))
        if len(calls) == 5:  # A's 3 batches done, B's first written, killed in B's second
            raise KeyboardInterrupt
        return real(model, tok, prompts, cfg, device)

    monkeypatch.setattr(fastdpo.recipes.eval, "generate_tokens", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, other_model, small_cache, tmp_path / "cut", *kw, limit=10)
    assert not (tmp_path / "cut" / "report.json").exists()
    assert len(list((tmp_path / "cut" / "answers").glob("*.json"))) == 4
    litter = tmp_path / "cut" / "answers" / ".baseline-00000004.json.x1y2.tmp"  # what a kill -9 mid-write leaves
    litter.write_text('{"ids": [')
    calls.clear()
    resumed = _run(tiny_model, other_model, small_cache, tmp_path / "cut", *kw, limit=10)
    assert calls == [4, 2]  # only B's last two batches were generated again
    assert not litter.exists()
    assert _same_report(resumed, full)
    assert len({p["model"]["text"] for p in full["pairs"]}) > 1  # sampling did vary the answers


@pytest.mark.integration
def test_output_directory_rules(tiny_model, other_model, small_cache, judges, tmp_path, monkeypatch):
    import fastdpo.recipes.eval

    out = tmp_path / "out"
    first = _run(tiny_model, other_model, small_cache, out, ("judge", f"{judges}:longer"), limit=4)
    calls = []
    monkeypatch.setattr(fastdpo.recipes.eval, "generate_tokens", lambda *a: calls.append(1) or [])

    # the same command again: nothing regenerated, the same report; --tie-epsilon is applied when reporting
    again = _run(tiny_model, other_model, small_cache, out, ("judge", f"{judges}:longer"), limit=4)
    assert calls == [] and _same_report(again, first)
    # another judge: refused, or with --overwrite the answers are kept and judged again
    one_line_error(*run_cli("compare", "--model", tiny_model, "--baseline", other_model, "--ref-cache", small_cache,
                            "--output", out, "--max-new-tokens", "6", "--batch-size", "4", "--limit", "4",
                            "--judge", f"{judges}:always_a", "--no-progress"), "another judge", "--overwrite")
    rejudged = _run(tiny_model, other_model, small_cache, out, ("judge", f"{judges}:always_a"), ("overwrite", True),
                    limit=4)
    assert calls == [] and rejudged["ties"] == 4 and [p["model"] for p in rejudged["pairs"]] == [
        p["model"] for p in first["pairs"]]
    # other answers (here: more tokens): refused naming the setting
    one_line_error(*run_cli("compare", "--model", tiny_model, "--baseline", other_model, "--ref-cache", small_cache,
                            "--output", out, "--max-new-tokens", "9", "--batch-size", "4", "--limit", "4",
                            "--judge", f"{judges}:always_a", "--no-progress"), "other answers", "max_new_tokens")
    # a directory of someone else's files: refused, even with --overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line_error(*run_cli("compare", "--model", tiny_model, "--baseline", other_model, "--ref-cache", small_cache,
                            "--output", tmp_path / "mine", "--judge", f"{judges}:longer", "--overwrite",
                            "--no-progress"), "holds no fastdpo comparison")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.integration
def test_prompts_from_a_dataset(tiny_model, judges, tmp_path, monkeypatch):
    import cmp_judges

    import fastdpo.recipes.eval
    from fastdpo.modeling import load_tokenizer

    real, seen_ids = fastdpo.recipes.eval.generate_tokens, []
    monkeypatch.setattr(fastdpo.recipes.eval, "generate_tokens", lambda m, t, prompts, *a: seen_ids.append(prompts) or
                        real(m, t, prompts, *a))
    rows = [{"prompt": "Q: hello world?"}, {"prompt": None},
            {"prompt": [{"role": "user", "content": "What is the capital of France?"}]}, {"prompt": ""}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cmp_judges.SEEN.clear()
    r = compare(model=tiny_model, baseline=tiny_model, dataset=str(data), judge=f"{judges}:recording",
                output=str(tmp_path / "o"), max_new_tokens=4, progress=False)
    assert r["prompts"]["num"] == 2 and r["prompts"]["skipped"] == {"missing_value": 1, "empty_text": 1}
    assert [p["id"] for p in r["pairs"]] == [0, 2]
    # the judge sees the dataset's own prompts, a string and a list of messages, in both orders
    assert cmp_judges.SEEN == [rows[0]["prompt"], rows[2]["prompt"]] * 2
    # both models saw them as precompute renders prompts: BOS + text, and the chat template (with its own BOS, none
    # here: what apply_chat_template(tokenize=True) gives) for messages
    tok = load_tokenizer(tiny_model)
    chat = tok.apply_chat_template(rows[2]["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
    expect = [[tok.bos_token_id] + tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"], list(chat)]
    assert seen_ids == [expect, expect]
