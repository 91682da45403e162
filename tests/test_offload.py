"""Activation offloading (`fastdpo.offload`): the gradients are bit-identical with and without it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pairs

from fastdpo.offload import OffloadActivations


def policy_and_rows(tiny_model, checkpointing: bool, device="cpu"):
    """The tiny policy as fastdpo trains it (dropout off, scorer wrapped, packed and prefix-shared rows) and 6
    pairs of varied lengths as token ids."""
    from fastdpo import modeling
    from fastdpo.scoring import prepare

    args = modeling.ModelSpec(model=tiny_model)
    setup = prepare(args, torch.device(device), torch.float32)
    causal_lm = setup.load(device=device)
    causal_lm.config.use_cache = False
    if checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    causal_lm.train()
    tok = setup.tokenizer
    rows = [
        (
            tok(p["prompt"])["input_ids"],
            tok(p["chosen"], add_special_tokens=False)["input_ids"],
            tok(p["rejected"], add_special_tokens=False)["input_ids"],
        )
        for p in make_pairs(6, seed=3)
    ]
    return setup, setup.scorer(causal_lm), [list(x) for x in zip(*rows)]


def grads(setup, scorer, rows, offload: OffloadActivations | None):
    from fastdpo.scoring import score_pairs

    scorer.zero_grad(set_to_none=True)
    device = next(scorer.parameters()).device
    with offload if offload is not None else torch.enable_grad():
        scores = score_pairs(scorer, *rows, setup.layout, setup.tokenizer.pad_token_id, device)
        chosen, rejected = scores.sums()
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).sum()
    if device.type == "cuda":  # what the forward left for backward, once the side stream's copies are done
        torch.cuda.synchronize()
        grads.held = torch.cuda.memory_allocated()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_bit_identical(tiny_model, checkpointing):
    setup, scorer, rows = policy_and_rows(tiny_model, checkpointing)
    loss0, g0 = grads(setup, scorer, rows, None)
    offload = OffloadActivations(min_bytes=256)
    loss1, g1 = grads(setup, scorer, rows, offload)
    assert offload.offloaded > 0 and offload.offloaded_bytes > 10_000, (offload.offloaded, offload.offloaded_bytes)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(scorer.parameters()))
    different = [n for n in g0 if not torch.equal(g0[n], g1[n])]
    assert not different, different
    if checkpointing:  # only the checkpointed layers' inputs (and what runs outside the layers) were saved
        full = OffloadActivations(min_bytes=256)
        setup2, scorer2, _ = policy_and_rows(tiny_model, False)
        grads(setup2, scorer2, rows, full)
        assert offload.offloaded_bytes < full.offloaded_bytes / 2, (offload.offloaded_bytes, full.offloaded_bytes)


def test_weights_and_repeats_stay(tiny_model):
    """A linear layer saves its weight's transpose: not copied. A tensor saved twice is copied once."""
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)

    def x_grad(offload):
        x.grad = None
        with offload:
            y = torch.nn.functional.linear(x, w)  # saves x and w.t()
            z = (x * x.exp()).sum()  # saves x and exp(x)
        (y.sum() + z).backward()
        return x.grad

    offload = OffloadActivations(min_bytes=0)
    assert torch.equal(x_grad(offload), x_grad(torch.enable_grad()))
    assert offload.offloaded == 2 and offload.offloaded_bytes == 2 * x.numel() * 4  # x once, exp(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream path needs CUDA")
def test_cuda_offload_saves_memory_and_keeps_gradients(tiny_model):
    """On CUDA (GPU check): the same gradients, and less memory held between forward and backward."""
    setup, scorer, rows = policy_and_rows(tiny_model, True, device="cuda")
    _, g0 = grads(setup, scorer, rows, None)
    held0 = grads.held
    offload = OffloadActivations()
    _, g1 = grads(setup, scorer, rows, offload)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert offload.offloaded > 0 and grads.held < held0, (grads.held, held0, offload.offloaded_bytes)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_bit_identical_qlora(tiny_model, tmp_path, checkpointing):
    """A 4-bit base with a LoRA adapter (the bitsandbytes layers save what they need through the same hooks)."""
    pytest.importorskip("bitsandbytes")
    from fastdpo import modeling
    from fastdpo.loop import prepare_policy
    from fastdpo.recipes.train import TrainConfig
    from fastdpo.scoring import prepare

    setup = prepare(modeling.ModelSpec(model=tiny_model, load_in_4bit=True), torch.device("cpu"), torch.float32)
    cfg = TrainConfig(model=tiny_model, ref_cache="unused", output=str(tmp_path), load_in_4bit=True, lora_r=4,
                      gradient_checkpointing=checkpointing)  # fmt: skip
    policy = prepare_policy(setup.load(), cfg, None).train()
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # B starts at 0: A's gradients would all be 0
            torch.nn.init.normal_(p, std=0.01, generator=torch.Generator().manual_seed(0))
    _, _, rows = policy_and_rows(tiny_model, False)
    scorer = setup.scorer(policy)
    loss0, g0 = grads(setup, scorer, rows, None)
    offload = OffloadActivations(min_bytes=256)
    loss1, g1 = grads(setup, scorer, rows, offload)
    assert offload.offloaded > 0 and len(g0) == 4 * 7 and torch.equal(loss0, loss1)  # A and B of 7 linears x 2 layers
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_train_with_activation_offload_is_the_same_run(tiny_model, small_cache, tmp_path, monkeypatch):
    """`fastdpo train --activation-offload` (with gradient checkpointing too) trains exactly the run without it
    (metrics equal bit for bit), and the flag reaches the loop: activations did go to the host."""
    import json

    from fastdpo.recipes.train import train

    moved = []
    real_pack = OffloadActivations.__init__

    def spy(self, *a, **k):
        real_pack(self, *a, **k)
        moved.append(self)

    monkeypatch.setattr(OffloadActivations, "__init__", spy)

    kw = dict(model=tiny_model, ref_cache=small_cache, max_steps=3, batch_size=2, lr=1e-3, progress=False,
              gradient_checkpointing=True)
    train(output=str(tmp_path / "plain"), **kw)
    train(output=str(tmp_path / "offload"), activation_offload=True, **kw)
    a, b = ([json.loads(x) for x in open(tmp_path / r / "metrics.jsonl")] for r in ("plain", "offload"))
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["grad_norm"], x["rewards/margins"]) == (y["loss"], y["grad_norm"], y["rewards/margins"])
    assert a[-1]["rewards/margins"] != 0
    assert len(moved) == 1 and moved[0].offloaded_bytes > 0  # one per run, and it moved the layers' inputs
