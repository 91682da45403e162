"""Quantized base weights (QLoRA): the flags, transformers' `BitsAndBytesConfig`, and the record a cache keeps.

    fastdpo precompute --model M --dataset D --output cache/q4 --load-in-4bit            # the reference, 4-bit
    fastdpo train --model M --ref-cache cache/q4 --output runs/qlora --load-in-4bit --lora-r 16

`--load-in-4bit` quantizes every linear layer of the decoder to 4 bits at load (bitsandbytes' NF4 or FP4,
blockwise absmax scales, optionally themselves quantized: `--bnb-4bit-double-quant`); `--load-in-8bit` to
LLM.int8. transformers keeps the LM head unquantized, and fastdpo keeps it, the embeddings and the norms in
their load dtype (`--dtype`): nothing is cast to fp32 behind the user's back, as peft's
`prepare_model_for_kbit_training` does (it upcasts every non-quantized weight: GBs at 128k-152k
vocabularies). The quantized weights are frozen, so a 4-bit `train`/`sft` trains a LoRA adapter, whose
weights peft keeps in fp32.

A reference must be scored with the same weights as the policy it is compared with, or a fresh policy does
not start at margin 0: `spec(args)` is what precompute records in the manifest (settings.quantization) and
`check_reference` what `train` compares it with.
"""

from __future__ import annotations

import logging

from .errors import UserError

COMPUTE_DTYPES = ["bfloat16", "float16", "float32"]
_DEFAULTS = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_double_quant": False, "bnb_4bit_compute_dtype": "bfloat16"}


# The options (--load-in-4bit, --load-in-8bit, --bnb-4bit-*) are fields of each command's config that loads a model
# (train, sft, precompute, eval, compare), copies kept equal by tests/test_config.py; _DEFAULTS are their defaults.


def check_quant_options(cfg) -> None:
    """The rules of the quantization options, for every command's config (called from its `__post_init__`)."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise UserError("--load-in-4bit and --load-in-8bit both given; choose one")
    if not cfg.load_in_4bit:
        changed = [k for k, v in _DEFAULTS.items() if getattr(cfg, k) != v]
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} sets up 4-bit loading; add --load-in-4bit")
    if getattr(cfg, "allow_reference_mismatch", False) and not getattr(cfg, "ref_cache", None):  # train's
        raise UserError(
            "--allow-reference-mismatch accepts a --ref-cache quantized otherwise than the policy; "
            "without --ref-cache there is no cache to accept"
        )
    if not quantized(cfg):
        return
    flag = "--load-in-4bit" if cfg.load_in_4bit else "--load-in-8bit"
    if hasattr(cfg, "lora_r") and cfg.lora_r is None:  # train and sft
        raise UserError(
            f"{flag} freezes the quantized weights; train a LoRA adapter over them with --lora-r (e.g. --lora-r 16)"
        )
    if getattr(cfg, "merge_lora", False):
        raise UserError(
            f"--merge-lora would merge the adapter into {flag}'s rounded weights; save the adapter and "
            "merge it into the unquantized model (peft's merge_and_unload)"
        )
    if getattr(cfg, "fsdp", False):
        raise UserError(f"{flag} cannot be sharded with --fsdp here; drop one (one GPU holds an 8B 4-bit model)")
    if cfg.dtype == "bf16-mixed":
        raise UserError(
            f"--dtype bf16-mixed keeps fp32 weights; with {flag} the unquantized weights stay in "
            "--dtype: give bfloat16 or float32 (auto: bfloat16 on GPU, float32 on CPU)"
        )
    from .modeling import deepspeed_launched

    if deepspeed_launched():
        raise UserError(f"{flag} does not run under DeepSpeed here; launch without a DeepSpeed config")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{flag} needs bitsandbytes, which is not installed: pip install bitsandbytes")


def quantized(args) -> bool:
    return bool(getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False))


# bitsandbytes' CPU backend logs a warning when it is imported (by peft, or here) without the optional `kernels`
# package (a faster 4-bit GEMM), and falls back to its own kernels: nothing a fastdpo user has to act on
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bnb_config(args):
    """transformers' `BitsAndBytesConfig` for `args`, or None (not quantized)."""
    if not quantized(args):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, args.bnb_4bit_compute_dtype),
    )


def after_load(model):
    """One computation for scoring and training. On a CPU with AVX512-BF16, bitsandbytes runs a 4-bit layer in
    eval mode without gradients through a packed-weight kernel that computes in bf16 whatever the compute dtype
    (and repacks the weights in place), and in training through dequantize + matmul: precompute's reference
    would then not be the fresh policy's. Off, both run the second."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _record(get) -> dict | None:
    """The quantization the option values `get(name)` ask for, as a manifest records it (without the library's
    version), None when unquantized: the one place that maps options to a record (`spec`, `adapter_note`)."""
    if get("load_in_8bit"):
        return {"bits": 8}
    if not get("load_in_4bit"):
        return None
    return {"bits": 4, "quant_type": get("bnb_4bit_quant_type"), "double_quant": get("bnb_4bit_double_quant"),
            "compute_dtype": get("bnb_4bit_compute_dtype")}


def spec(args) -> dict | None:
    """The quantization as a cache manifest records it (settings.quantization), None when not quantized."""
    if not quantized(args):
        return None
    import importlib.metadata

    return {**_record(lambda k: getattr(args, k)), "bitsandbytes": importlib.metadata.version("bitsandbytes")}


def adapter_note(run_dir: str, args) -> str | None:
    """A note when the LoRA run in `run_dir` trained over a base quantized otherwise than `args` loads it (its
    fastdpo_config.json records the run's flags): the adapter then scores over other weights than it learned on."""
    import json
    import os

    try:
        with open(os.path.join(run_dir, "fastdpo_config.json"), encoding="utf-8") as f:
            trained = json.load(f)
    except (OSError, ValueError):
        return None
    keys = ("load_in_4bit", "load_in_8bit", *_DEFAULTS)
    if not isinstance(trained, dict) or not all(k in trained for k in keys):
        return None
    theirs, ours = (describe(_record(get)) for get in (trained.get, lambda k: getattr(args, k)))
    if theirs == ours:
        return None
    return (
        f"note: the LoRA adapter in {run_dir} was trained over a base loaded {theirs}, and is loaded here over "
        f"one {ours}; pass the run's quantization flags to score the policy it trained"
    )


def options(recorded: dict | None) -> dict:
    """The quantization options that load a model the way `recorded` (a manifest's `spec`) says."""
    if not recorded:
        return {}
    if recorded.get("bits") == 8:
        return {"load_in_8bit": True}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": recorded.get("quant_type", _DEFAULTS["bnb_4bit_quant_type"]),
        "bnb_4bit_double_quant": bool(recorded.get("double_quant", _DEFAULTS["bnb_4bit_double_quant"])),
        "bnb_4bit_compute_dtype": recorded.get("compute_dtype", _DEFAULTS["bnb_4bit_compute_dtype"]),
    }


def describe(recorded: dict | None) -> str:
    """'4-bit nf4 (double quant, compute bfloat16)', '8-bit', or 'unquantized'."""
    if not recorded:
        return "unquantized"
    if recorded.get("bits") == 8:
        return "8-bit (LLM.int8)"
    double = "double quant, " if recorded.get("double_quant") else ""
    return f"4-bit {recorded.get('quant_type')} ({double}compute {recorded.get('compute_dtype')})"


def check_reference(cache_dir: str, recorded: dict | None, ours: dict | None, allow: bool) -> str | None:
    """Refuse a cache whose reference was quantized otherwise than the policy loads (a fresh policy would not start
    at margin 0), unless `allow`; returns the line to print (a mismatch allowed, or another bitsandbytes version),
    or None."""
    same = {k: v for k, v in (recorded or {}).items() if k != "bitsandbytes"} == {
        k: v for k, v in (ours or {}).items() if k != "bitsandbytes"
    }
    theirs_text, ours_text = describe(recorded), describe(ours)
    if not same and not allow:
        raise UserError(
            f"reference mismatch: the cache {cache_dir} was computed {theirs_text} and the policy loads "
            f"{ours_text}; precompute the cache with the policy's quantization flags, or pass "
            "--allow-reference-mismatch (a fresh policy will not start at margin 0)"
        )
    if not same:
        return (
            f"warning: --allow-reference-mismatch: the cache was computed {theirs_text} and the policy loads "
            f"{ours_text}; the step-1 margin is printed after step 1"
        )
    if recorded and ours and recorded.get("bitsandbytes") != ours.get("bitsandbytes"):
        return (
            f"note: the cache was quantized with bitsandbytes {recorded.get('bitsandbytes')} and the policy with "
            f"{ours.get('bitsandbytes')}; if their rounding differs, a fresh policy's margin will not be exactly 0"
        )
    return None


def step_one_report(cfg, m: dict) -> list[str]:
    """With --allow-reference-mismatch, the line reporting step 1's margin (the mismatch's offset; 0 when the
    reference matches the policy). `m`: the step's metrics."""
    if not getattr(cfg, "allow_reference_mismatch", False) or m.get("step") != 1 or "rewards/margins" not in m:
        return []
    return [
        f"note: --allow-reference-mismatch: the step-1 reward margin is {m['rewards/margins']:.4g} (beta "
        f"{cfg.beta}); a reference that matches the policy gives 0"
    ]
