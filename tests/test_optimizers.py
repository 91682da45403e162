"""--optimizer's low-precision choices (fastdpo.optim): the bytes per parameter each holds, measured; fp32 AdamW's
trajectory tracked by adamw-kahan and adamw-8bit and not by plain bf16 AdamW; one-line refusals; exact resume."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from conftest import one_line_error, run_cli

import fastdpo
from fastdpo import optim
from fastdpo.errors import UserError
from fastdpo.tiny import tiny_llama_config

pytest.importorskip("optimi")  # both come with pip install -e '.[dev]'
pytest.importorskip("bitsandbytes")
LOWMEM = [name for name, spec in optim.OPTIMIZERS.items() if spec.module]


# (optimizer, weights, bytes/param as fastdpo.optim's table gives them)
BYTES = [
    ("adamw", torch.float32, optim.OPTIMIZERS["adamw"].bytes_per_param),  # 16
    ("adamw", torch.bfloat16, 8),  # torch keeps the moments in the weights' dtype
    ("sgd", torch.float32, optim.OPTIMIZERS["sgd"].bytes_per_param),  # 8
    ("adamw-kahan", torch.bfloat16, optim.OPTIMIZERS["adamw-kahan"].bytes_per_param),  # 10
    ("adamw-8bit", torch.float32, optim.OPTIMIZERS["adamw-8bit"].bytes_per_param),  # 10.03
    ("adamw-8bit", torch.bfloat16, 6 + 8 / 256),
]


@pytest.mark.parametrize("name,dtype,declared", BYTES, ids=[f"{n}-{d}".replace("torch.", "") for n, d, _ in BYTES])
def test_bytes_per_param_measured(name, dtype, declared):
    """Weights + gradients + every tensor in optimizer.state after one step (quantization scales and maps too),
    each storage counted once, on a 1.4M-parameter Llama: hidden 256, so that every matrix has the 4096+ values
    bitsandbytes needs to quantize a tensor."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(512, hidden_size=256, intermediate_size=512)).to(dtype)
    params = list(model.parameters())
    opt = optim.build_optimizer(params, types.SimpleNamespace(optimizer=name, lr=1e-5, weight_decay=0.0,
                                                              momentum=0.0))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    held = optim.held_bytes(params, opt)
    assert held["state"] or name == "sgd"
    measured = sum(held.values()) / sum(p.numel() for p in params)
    # Beyond the table: AdamW's per-tensor step counters (1e-4 here); for 8-bit, the two 256-entry quantization
    # maps all tensors share and the fp32 moments of the RMSNorm scales (under 4096 values): 0.007 here
    assert abs(measured - declared) < 0.02, (name, dtype, measured, declared)


# ----------------------------------------------------------------------------------------------
# The trajectory: 50 DPO steps at lr 1e-5, against fp32 AdamW's

RUNS = {  # name: (--optimizer, --dtype)
    "fp32": ("adamw", "float32"),
    "bf16": ("adamw", "bfloat16"),
    "kahan": ("adamw-kahan", "auto"),
    "8bit": ("adamw-8bit", "float32"),
    "8bit-bf16": ("adamw-8bit", "bfloat16"),
}
# A weight near 0.02 has a bf16 spacing of 1.2e-4; 50 steps of about lr = 1e-5 move it up to 5e-4. Kahan's
# bf16 weights hold the exact sum rounded to that spacing (RMS error spacing / sqrt(12) = 3.5e-5, against an RMS
# update of 2.6e-4: ~0.13) and run a bf16 forward (measured: 0.12 of the update, 2.6e-3 in loss). In fp32 the
# 8-bit moments' blockwise quantization is the only difference (measured: 0.05 of the update, 5e-5 in loss).
# Plain bf16 AdamW rounds most updates away (measured: 12% of the weights move, against 81% in fp32; 0.94 of
# the update, 3.8e-2 in loss).
TOL = {"kahan": (0.25, 1e-2), "8bit": (0.1, 1e-3)}  # (relative error of the total update, max |loss difference|)


def _update(run_dir, base_dir) -> torch.Tensor:
    """w_final - w_init over all weights, in fp64 (w_init in the run's dtype)."""
    from safetensors.torch import load_file

    final, init = load_file(f"{run_dir}/model.safetensors"), load_file(f"{base_dir}/model.safetensors")
    return torch.cat([(final[k].double() - init[k].to(final[k].dtype).double()).flatten() for k in sorted(final)])


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(f"{run_dir}/metrics.jsonl")]


def test_trajectory_tracks_fp32_adamw_and_plain_bf16_does_not(tiny_model, small_cache, tmp_path):
    updates, losses = {}, {}
    for name, (optimizer, dtype) in RUNS.items():
        fastdpo.train(model=tiny_model, ref_cache=small_cache, output=str(tmp_path / name), optimizer=optimizer,
                      dtype=dtype, lr=1e-5, lr_scheduler="constant", max_grad_norm=0.0, max_steps=50, batch_size=4,
                      progress=False, kl_warn=None)
        updates[name], losses[name] = _update(tmp_path / name, tiny_model), _losses(tmp_path / name)
    ref = updates["fp32"]
    assert len(losses["fp32"]) == 50 and (ref != 0).double().mean() > 0.5  # fp32 moves most weights
    err = {name: float((u - ref).norm() / ref.norm()) for name, u in updates.items()}
    loss_err = {name: max(abs(a - b) for a, b in zip(run, losses["fp32"])) for name, run in losses.items()}
    report = f"relative update error {err}, max loss difference {loss_err}"
    for name, (update_tol, loss_tol) in TOL.items():
        assert err[name] < update_tol and loss_err[name] < loss_tol, (name, report)
    # bf16 weights updated without compensation, by torch or by bitsandbytes: outside the tolerance
    for name in ("bf16", "8bit-bf16"):
        assert err[name] > TOL["kahan"][0] and loss_err[name] > TOL["kahan"][1], (name, report)


# ----------------------------------------------------------------------------------------------
# Precision rules and one-line errors


def test_precision_rules():
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    cfg = lambda optimizer, dtype: types.SimpleNamespace(optimizer=optimizer, dtype=dtype, fsdp=False)
    for device in (cpu, gpu):  # an optimizer for bf16 weights trains bf16 weights on both
        assert optim.train_precision(cfg("adamw-kahan", "auto"), device) == "bfloat16"
        assert optim.train_precision(cfg("adamw-kahan", "bfloat16"), device) == "bfloat16"
    # the others keep modeling.default_precision's rule: bf16-mixed on a GPU, float32 on CPU, any dtype as given
    assert optim.train_precision(cfg("adamw-8bit", "auto"), gpu) == "bf16-mixed"
    assert optim.train_precision(cfg("adamw-8bit", "auto"), cpu) == "float32"
    assert optim.train_precision(cfg("adamw-8bit", "bfloat16"), cpu) == "bfloat16"
    assert optim.train_precision(cfg("adamw", "auto"), gpu) == "bf16-mixed"


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_kahan_refuses_fp32_weights(tiny_model, small_cache, tmp_path, dtype):
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", small_cache, "--output", tmp_path / "r",
                        "--optimizer", "adamw-kahan", "--dtype", dtype)
    line = one_line_error(code, err, "--optimizer adamw-kahan", f"--dtype {dtype}", "--dtype bfloat16", alone=True)
    assert "fp32" in line
    assert not (tmp_path / "r").exists()


def test_8bit_refuses_fsdp(tiny_model, small_cache, tmp_path):
    """bitsandbytes' update op takes plain tensors, not FSDP2's DTensors (measured: a RuntimeError at the first
    step); adamw-kahan steps them (a 1-process --fsdp run equals the plain one, and resumes exactly)."""
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", small_cache, "--output", tmp_path / "r",
                        "--optimizer", "adamw-8bit", "--fsdp")
    one_line_error(code, err, "--optimizer adamw-8bit", "--fsdp", alone=True)


@pytest.mark.parametrize("name", LOWMEM)
def test_missing_library_is_one_line(tiny_model, small_cache, tmp_path, monkeypatch, name):
    spec = optim.OPTIMIZERS[name]
    monkeypatch.setitem(sys.modules, spec.module, None)  # `import` now raises ImportError, as when not installed
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", small_cache, "--output", tmp_path / "r",
                        "--optimizer", name)
    one_line_error(code, err, f"--optimizer {name}", f"pip install {spec.pip}", "fastdpo[lowmem]", alone=True)
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match=f"pip install {spec.pip}"):  # the Python API's builder, too
        optim.build_optimizer([], types.SimpleNamespace(optimizer=name, lr=1e-5, weight_decay=0.0))


# ----------------------------------------------------------------------------------------------
# Resume: the optimizer state (Kahan compensation, 8-bit moments and scales) goes through checkpoint.py


@pytest.mark.parametrize("name,dtype", [("adamw-kahan", "auto"), ("adamw-8bit", "float32")])
def test_resume_reproduces_straight_run(tiny_model, small_cache, tmp_path, name, dtype):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    kw = dict(model=tiny_model, ref_cache=small_cache, output=str(out), optimizer=name, dtype=dtype, lr=1e-3,
              max_steps=6, batch_size=4, save_steps=3, progress=False, kl_warn=None)
    fastdpo.train(**kw)
    straight, straight_losses = load_file(out / "model.safetensors"), _losses(out)
    saved = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)  # as checkpoint.py loads it
    held = set()  # state keys, however nested (bitsandbytes keeps its quantization state in a dict of its own)
    for per_param in saved["state"].values():
        held |= set(per_param) | {k for v in per_param.values() if isinstance(v, dict) for k in v}
    assert held >= ({"kahan_comp"} if name == "adamw-kahan" else {"state1", "state2", "absmax1", "absmax2"}), held
    fastdpo.train(**kw, resume=str(out / "checkpoint-3"))  # steps 4-6 again, from the checkpoint
    resumed = load_file(out / "model.safetensors")
    assert _losses(out) == straight_losses
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert any(not torch.equal(straight[k], load_file(out / "checkpoint-3" / "model.safetensors")[k])
               for k in straight)  # steps 4-6 moved the weights: the comparison means something
    # another optimizer's state cannot continue this one: one line, before anything loads
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", small_cache, "--output", str(out), "--lr",
                        "1e-3", "--max-steps", "6", "--batch-size", "4", "--resume", str(out / "checkpoint-3"))
    one_line_error(code, err, f"holds --optimizer {name}'s state, not adamw's")
