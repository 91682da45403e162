"""Precision: at DPO learning rates, fp32 and bf16-mixed training move the weights; pure bf16 with plain AdamW
rounds most updates away (which is why `--dtype auto` trains bf16-mixed on a GPU)."""

from __future__ import annotations

import pytest
import torch

from fastdpo.modeling import default_precision
from fastdpo.recipes.train import train


def changed_fractions(run_dir, base_dir) -> tuple[float, float]:
    """(fraction of weight elements that changed, the same over the RMSNorm scales), against the initial weights
    in the trained model's dtype. The input embedding is left out: rows of tokens the data never uses get no
    gradient, so AdamW leaves them alone in every precision."""
    from transformers import AutoModelForCausalLM

    trained = dict(AutoModelForCausalLM.from_pretrained(run_dir).named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    moved = total = norm_moved = norm_total = 0
    for name, p in trained.items():
        if "embed_tokens" in name:
            continue
        diff = p.detach() != base[name].detach().to(p.dtype)
        moved, total = moved + int(diff.sum()), total + diff.numel()
        if "norm" in name:
            norm_moved, norm_total = norm_moved + int(diff.sum()), norm_total + diff.numel()
    return moved / total, norm_moved / norm_total


def test_auto_trains_bf16_mixed_on_gpu_and_float32_on_cpu():
    assert default_precision("auto", torch.device("cuda:0")) == "bf16-mixed"
    assert default_precision("auto", torch.device("cpu")) == "float32"
    assert default_precision("bfloat16", torch.device("cuda:0")) == "bfloat16"


@pytest.mark.integration
def test_small_updates_land_in_fp32_and_bf16_mixed_not_pure_bf16(tiny_model, small_cache, tmp_path, capsys):
    """20 AdamW steps at lr 1e-6 from one initialisation (N(0, 0.02) weights, norm scales at 1.0)."""
    fractions = {}
    for dtype in ("float32", "bf16-mixed", "bfloat16"):
        out = tmp_path / dtype
        train(model=tiny_model, ref_cache=small_cache, output=str(out), dtype=dtype, lr=1e-6, max_steps=20,
              batch_size=4, epochs=5, progress=False, kl_warn=None)
        fractions[dtype] = changed_fractions(out, tiny_model)
    err = capsys.readouterr().err
    for dtype in ("float32", "bf16-mixed"):
        weights, norms = fractions[dtype]
        assert weights >= 0.99 and norms >= 0.99, (dtype, fractions)
    weights, norms = fractions["bfloat16"]
    assert weights < 0.5 and norms == 0.0, fractions  # the updates rounded away: the check can fail
    assert err.count("rounds away") == 1  # pure bf16 training is warned about, once
