"""Packing and prefix sharing: the same per-token log-probs and loss trajectories as padded batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_pairs, write_jsonl

from fastdpo import packing
from fastdpo.packing import Layout
from fastdpo.recipes.precompute import PrecomputeConfig, precompute
from fastdpo.recipes.train import train
from fastdpo.scoring import LogpsModel, score_pairs

LAYOUTS = {
    "packed": Layout(packing=True),
    "shared": Layout(prefix_sharing=True),
    "packed+shared": Layout(packing=True, prefix_sharing=True),
    "packed+shared, 40-token rows": Layout(packing=True, prefix_sharing=True, max_tokens=40),
    "packed, 25-token rows": Layout(packing=True, max_tokens=25),
    "packed+shared, eager": Layout(packing=True, prefix_sharing=True, attention="eager"),
}


@pytest.fixture(scope="module")
def scorer(tiny_model):
    from transformers import AutoModelForCausalLM

    return LogpsModel(AutoModelForCausalLM.from_pretrained(tiny_model).eval())


def _pairs(tok, rows, max_prompt=None):
    """Token ids as fastdpo's pipeline would produce them."""
    import datasets

    from fastdpo import data

    args = data.DataOptions(dataset="mem", max_prompt_length=max_prompt)
    kept, _, _ = data.tokenize_dataset(datasets.Dataset.from_list(rows), tok, args)
    return list(kept["prompt_ids"]), list(kept["chosen_ids"]), list(kept["rejected_ids"])


def _assert_same(a, b, atol=1e-5):
    for x, y in ((a.chosen, b.chosen), (a.rejected, b.rejected)):
        assert x.shape == y.shape
        diff = (x - y).abs().max().item()
        assert diff <= atol, diff
    assert torch.equal(a.chosen_mask, b.chosen_mask) and torch.equal(a.rejected_mask, b.rejected_mask)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_equal_padded(scorer, tiny_tokenizer, name):
    rows = make_pairs(9, seed=7) + [
        {"prompt": "Hello", "chosen": "", "rejected": " x"},  # skipped: empty
        {"prompt": "hello world hello", "chosen": " a", "rejected": " b"},  # single-token completions (+EOS)
    ]
    prompts, chosens, rejecteds = _pairs(tiny_tokenizer, rows)
    chosens[-1], rejecteds[-1] = chosens[-1][:1], rejecteds[-1][:1]  # exactly one completion token
    layout = LAYOUTS[name]
    if layout.attention == "eager":
        scorer.model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            padded = score_pairs(scorer, prompts, chosens, rejecteds, Layout(), 2, "cpu")
            other = score_pairs(scorer, prompts, chosens, rejecteds, layout, 2, "cpu")
    finally:
        scorer.model.config._attn_implementation = "sdpa"
    _assert_same(padded, other)
    if layout.prefix_sharing:  # the prompt is processed once
        assert other.num_tokens == sum(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosens, rejecteds))
        assert other.num_tokens < padded.num_tokens


def test_truncated_prompts_and_one_pair_filling_the_budget(scorer, tiny_tokenizer):
    long = " ".join(["hello world Paris"] * 30)
    rows = [{"prompt": long, "chosen": " capital", "rejected": " France"}] + make_pairs(5, seed=2)
    prompts, chosens, rejecteds = _pairs(tiny_tokenizer, rows, max_prompt=24)
    assert len(prompts[0]) == 24  # truncated at the limit (BOS kept)
    budget = len(prompts[0]) + len(chosens[0]) + len(rejecteds[0])  # the long pair alone fills a row
    layout = Layout(packing=True, prefix_sharing=True, max_tokens=budget)
    rows_ = packing.lay_out(prompts, chosens, rejecteds, layout, 2)
    assert any((rows_.seg[r] >= 0).sum() == budget and rows_.seg[r].max() == 0 for r in range(len(rows_.seg)))
    with torch.no_grad():
        _assert_same(score_pairs(scorer, prompts, chosens, rejecteds, Layout(), 2, "cpu"),
                     score_pairs(scorer, prompts, chosens, rejecteds, layout, 2, "cpu"))


def test_gradients_equal_padded(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    prompts, chosens, rejecteds = _pairs(tiny_tokenizer, make_pairs(6, seed=3))
    grads = []
    for layout in (Layout(), Layout(packing=True, prefix_sharing=True)):
        torch.manual_seed(0)
        model = LogpsModel(AutoModelForCausalLM.from_pretrained(tiny_model))
        s = score_pairs(model, prompts, chosens, rejecteds, layout, 2, "cpu")
        w = torch.linspace(-1, 1, s.num_pairs)
        (w * (s.chosen.sum(-1) - 2 * s.rejected.sum(-1))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-5


def test_mask_rule():
    """Rejected sees its prompt but not chosen; segments never see each other; padding sees itself."""
    rows = packing.lay_out([[5, 6]], [[7, 8]], [[9]], Layout(packing=True, prefix_sharing=True), pad_id=0)
    ok = packing.allowed(rows.seg, rows.position_ids, rows.branch)[0].int()
    # tokens: P0 P1 C0 C1 R0
    expect = torch.tensor([[1, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0],
                           [1, 1, 1, 0, 0],
                           [1, 1, 1, 1, 0],
                           [1, 1, 0, 0, 1]])
    assert torch.equal(ok, expect)
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 2]
    assert rows.src_pos.tolist() == [1, 2, 1]  # C0 and R0 are both predicted by the last prompt token
    two = packing.lay_out([[1], [2, 3]], [[4], [5]], [[6], [7]], Layout(packing=True, attention="flex_attention"),
                             pad_id=0)
    assert two.seg.shape == (1, packing.FLEX_BLOCK) and two.num_tokens == 10  # flex rows: a multiple of 128
    ok2 = packing.allowed(two.seg, two.position_ids, two.branch)[0]
    seg = two.seg[0]
    assert not ok2[seg[:, None] != seg[None, :]].any()


def test_default_row_length_follows_the_attention():
    """A dense mask costs a row its length squared: SDPA/eager rows stay within the padded width, filling
    what padding would waste; FlexAttention skips masked blocks and takes the whole micro-batch in one row,
    padded to a multiple of its block size so that compiled shapes recur."""
    prompts, chosens, rejecteds = [[1] * 6, [2], [3], [4]], [[5] * 4, [6], [7], [8]], [[9] * 2, [10], [11], [12]]
    lengths = [10, 8, 2, 2, 2, 2, 2, 2]  # [P C] and [P R] per pair
    dense = packing.lay_out(prompts, chosens, rejecteds, Layout(packing=True), 0)
    assert dense.seg.shape == (3, 10) and dense.num_tokens == sum(lengths)  # rows: 10 | 8 2 | 2 2 2 2 2
    flex = packing.lay_out(prompts, chosens, rejecteds, Layout(packing=True, attention="flex_attention"), 0)
    assert flex.seg.shape == (1, packing.FLEX_BLOCK) and flex.num_tokens == sum(lengths)
    assert (flex.seg[0, sum(lengths):] == -1).all() and flex.src_pos.max() < sum(lengths)  # padding is never scored
    capped = packing.lay_out(prompts, chosens, rejecteds, Layout(packing=True, max_tokens=4), 0)
    assert capped.seg.shape == (5, 10)  # a sequence longer than the cap keeps a row of its own
    padded = packing.lay_out(prompts, chosens, rejecteds, Layout(), 0)
    assert padded.seg.shape == (8, 10)


def test_flex_block_mask_matches_dense_rule(tiny_tokenizer):
    pytest.importorskip("torch.nn.attention.flex_attention")
    prompts, chosens, rejecteds = _pairs(tiny_tokenizer, make_pairs(4, seed=9))
    rows = packing.lay_out(prompts, chosens, rejecteds,
                              Layout(packing=True, prefix_sharing=True, attention="flex_attention"), 2)
    assert rows.seg.shape[0] == 1
    bm = packing.block_mask(rows)
    dense = packing.allowed(rows.seg, rows.position_ids, rows.branch)
    n, length = rows.seg.shape
    q, k = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    got = bm.mask_mod(torch.zeros_like(q), torch.zeros_like(q), q, k)
    assert torch.equal(got, dense[0])


def test_layout_resolution_notes(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    layout, notes = packing.resolve_layout(config, None, None, None, None)
    assert layout.packing and layout.prefix_sharing and not notes
    layout, notes = packing.resolve_layout(config, "flash_attention_2", None, None, None)
    assert layout.packing and not layout.prefix_sharing and "prefix sharing off by default" in notes[0]
    config.sliding_window = 16
    layout, notes = packing.resolve_layout(config, None, True, None, None)
    assert not layout.packing and "sliding-window" in notes[0]


def test_loss_trajectory_with_features_on_equals_off(tiny_model, tmp_path):
    rows = [{"prompt": " ".join(["hello world the capital of France"] * 4) + f" {i}?", "chosen": p["chosen"],
             "rejected": p["rejected"]} for i, p in enumerate(make_pairs(16, seed=8))]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    on = dict(packing=True, prefix_sharing=True)
    off = dict(packing=False, prefix_sharing=False)
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(f), output=str(tmp_path / "c_on"), progress=False, **on))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(f), output=str(tmp_path / "c_off"), progress=False,
                                **off))
    a = json.loads((tmp_path / "c_on" / "manifest.json").read_text())
    assert a["settings"]["resolved_layout"]["prefix_sharing"]
    import datasets

    on_rows = datasets.Dataset.from_file(str(tmp_path / "c_on" / "shard-00000.arrow"))
    off_rows = datasets.Dataset.from_file(str(tmp_path / "c_off" / "shard-00000.arrow"))
    for x, y in zip(on_rows, off_rows):
        assert x["chosen_ids"] == y["chosen_ids"]
        assert max(abs(u - v) for u, v in zip(x["ref_chosen_token_logps"], y["ref_chosen_token_logps"])) < 1e-5
        assert max(abs(u - v) for u, v in zip(x["ref_rejected_token_logps"], y["ref_rejected_token_logps"])) < 1e-5

    kw = dict(max_steps=4, batch_size=4, lr=1e-3, progress=False)
    train(model=tiny_model, ref_cache=str(tmp_path / "c_on"), output=str(tmp_path / "r_on"), **on, **kw)
    train(model=tiny_model, ref_cache=str(tmp_path / "c_off"), output=str(tmp_path / "r_off"), **off, **kw)
    m_on = [json.loads(x) for x in open(tmp_path / "r_on" / "metrics.jsonl")]
    m_off = [json.loads(x) for x in open(tmp_path / "r_off" / "metrics.jsonl")]
    assert m_on[-1]["rewards/margins"] != 0
    for x, y in zip(m_on, m_off):
        for k in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected", "grad_norm"):
            assert math.isclose(x[k], y[k], abs_tol=1e-5), (x["step"], k, x[k], y[k])
    assert m_on[0]["tokens_per_s"] / m_on[0]["samples_per_s"] < m_off[0]["tokens_per_s"] / m_off[0]["samples_per_s"]


@pytest.mark.integration
def test_flex_attention_precompute_equals_padded(tiny_model, tmp_path):
    """FlexAttention, the default on CUDA, through transformers with fastdpo's block mask: its forward runs on
    CPU too (its backward does not), so the whole precompute path is checked here against a padded SDPA cache."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from fastdpo import cache

    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(12, seed=5))
    flex, padded = tmp_path / "flex", tmp_path / "padded"
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(f), output=str(flex), batch_size=6,
                                attn_implementation="flex_attention", progress=False))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(f), output=str(padded), batch_size=6, packing=False,
                                prefix_sharing=False, progress=False))
    layout = json.loads((flex / "manifest.json").read_text())["settings"]["resolved_layout"]
    assert (layout["attention"], layout["packing"], layout["prefix_sharing"]) == ("flex_attention", True, True)
    a, b = cache.read_shard(flex / "shard-00000.arrow"), cache.read_shard(padded / "shard-00000.arrow")
    assert a["chosen_ids"].to_pylist() == b["chosen_ids"].to_pylist()
    for col in ("ref_chosen_token_logps", "ref_rejected_token_logps"):
        for x, y in zip(a[col].to_pylist(), b[col].to_pylist()):
            assert len(x) == len(y) and max(abs(u - v) for u, v in zip(x, y)) <= 1e-5, col
