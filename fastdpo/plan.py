"""`fastdpo plan`: what a training run will hold in memory, from the model's config.json alone.

    fastdpo plan --model Qwen/Qwen2.5-7B --load-in-4bit --lora-r 16 --gradient-checkpointing --gpu-memory 16GiB
    fastdpo plan --model /tmp/tiny --device cpu --batch-size 4              # a tiny CPU run (checked in tests)

Nothing but the config is read (a Hub id downloads config.json only): the model is built on the meta device to
count its parameters by part. A step's peak is the sum of (P parameters, L layers, H hidden, I MLP width, V vocab,
T tokens in a micro-batch, w the weights' bytes, c the compute dtype's bytes):

    weights        unquantized parameters x w; 4-bit linear layers 0.5 + 4/64 bytes/param (an fp32 absmax per
                   block of 64; double quant 0.5 + 1/64 + 4/16384); 8-bit 1 + 4/in_features
    trained        full: P x the optimizer's bytes/param (`optim.OPTIMIZERS`: weights, gradients, state, so the
                   weights above are not counted again); LoRA: r (in + out) per adapted linear, fp32, x 16 (AdamW)
    weight copies  bf16-mixed: autocast's bf16 copy of every matmul weight, held from forward to backward
    activations    T L (a_h H + a_i I + a_0) c/4: what autograd saves per token and layer, fp32 constants measured
                   on CPU (A_HIDDEN, A_MLP, A_OTHER: tests/test_plan.py measures them again); checkpointing: T L H c
                   (each layer's input) + one layer's full activations, recomputed in backward; offloading: one
                   layer's (the rest waits in host memory); plus A_OUTSIDE T H c/4 outside the layers
    logits         fused head: one (C, V) tile of the chunked head (`kernels.loss_chunk_tokens`; its gradient is
                   formed in place), S H fp32 for the hidden states' gradient (S: the completions' tokens, all
                   the head scores) and V H fp32 for the head's when it trains; eager: the full (S, V) logits in
                   fp32, three times (logits, log-softmax, their gradient)
    cache stream   the micro-batch's token ids and reference log-probs
    runtime        CPU: this process's memory after importing torch, transformers and fastdpo (measured now), plus
                   RUN_CPU_MIB (and QUANTIZED_CPU_MIB), measured; CUDA: RUNTIME_CUDA_GIB for the context and
                   allocator slack (an estimate)

The sum adds parts that peak at different moments (gradients fill in as activations are freed), so it leans
high. CPU figures are checked against measured peak RSS (tests/test_plan.py); GPU figures are estimates (the
constants scaled by c/4) until a GPU check measures them.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from . import modeling, quant
from .config import check_fields, opt
from .errors import UserError

# fp32 bytes autograd saves per token and decoder layer (Llama layer, SDPA), measured on CPU on tiny Llamas of
# several widths (H 64-128, I 128-512): per hidden unit, per MLP unit, and per token whatever the widths
A_HIDDEN, A_MLP, A_OTHER = 46.3, 16.0, 390.0
A_OUTSIDE = 13.4  # per token and hidden unit outside the layers (embedding output, final norm, head input)
RUNTIME_CUDA_GIB = 1.0  # CUDA context, cuBLAS workspaces, allocator slack
# CPU: what a training process holds beyond the imports `runtime_bytes` measures (accelerate's state, the tokenizer,
# the cache's Arrow buffers, loading), and more with a quantized model (bitsandbytes' CPU kernels, quantize-at-load
# buffers): measured on tiny Llamas (tests/test_plan.py)
RUN_CPU_MIB, QUANTIZED_CPU_MIB = 35, 40
GIB = 2**30


@dataclass
class PlanConfig:
    """`fastdpo plan`: a training run's memory, estimated from the model's config."""

    model: str | None = opt(None, "model: a local directory or a Hugging Face Hub id (only config.json is read)",
                            required=True, group="model")  # fmt: skip
    revision: str | None = opt(None, "model revision on the Hub", group="model")
    trust_remote_code: bool = opt(False, "allow custom model code from the Hub", group="model")
    device: str = opt("cuda", "where the run would train: cuda or cpu", choices=["cuda", "cpu"])
    dtype: str = opt("auto", "as for train: auto is bf16-mixed on cuda (bfloat16 with a quantized base), float32 on "
                     "cpu", choices=["auto", "float32", "bfloat16", "bf16-mixed"], group="model")  # fmt: skip
    gpu_memory: str | None = opt(None, "memory budget, e.g. 16GiB, 24GB, 80 (GiB): says whether the run fits and the "
                                 "largest batch and lengths that do")  # fmt: skip
    batch_size: int = opt(4, "pairs per micro-batch", ge=1)
    prompt_length: int = opt(512, "tokens per prompt", ge=1)
    completion_length: int = opt(512, "tokens per completion (chosen and rejected each)", ge=1)
    prefix_sharing: bool = opt(True, "chosen and rejected after one shared prompt (train's default where exact)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward")
    activation_offload: bool = opt(False, "saved activations wait in CPU memory (`fastdpo.offload`)")
    logps_backend: str = opt("auto", "auto/triton/torch: the fused head; eager: full logits",
                             choices=modeling.LOGPS_BACKENDS)  # fmt: skip
    optimizer: str = opt("adamw", "as for train", choices=["adamw", "sgd", "adamw-kahan", "adamw-8bit"])
    lora_r: int | None = opt(None, "LoRA rank (every decoder linear layer: all-linear)", ge=1, group="lora")
    json: bool = opt(False, "print the estimate as JSON")

    # -- quantization (copies of train's) --
    load_in_4bit: bool = opt(False, "quantize the base model's linear layers to 4 bits at load (bitsandbytes; QLoRA "
                                    "with --lora-r); embeddings, norms and LM head stay in --dtype",
                             group="quantization")
    load_in_8bit: bool = opt(False, "quantize the base model's linear layers to 8 bits at load (bitsandbytes "
                                    "LLM.int8; with --lora-r to train)", group="quantization")
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type: nf4 (normal float, the QLoRA paper's) or fp4",
                                   choices=["nf4", "fp4"], group="quantization")
    bnb_4bit_double_quant: bool = opt(False, "quantize the 4-bit blocks' scales too (about 0.4 bits/param less)",
                                      group="quantization")
    bnb_4bit_compute_dtype: str = opt("bfloat16", "dtype 4-bit layers dequantize to and multiply in",
                                      choices=quant.COMPUTE_DTYPES, group="quantization")

    def __post_init__(self):
        check_fields(self)
        quant.check_quant_options(self)
        if self.gpu_memory is not None:
            budget_bytes(self.gpu_memory)


def budget_bytes(text: str) -> float:
    """'16GiB', '24GB', '80' (GiB), '512MiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|G|M)?\s*", text, flags=re.IGNORECASE)
    if m is None:
        raise UserError(f"--gpu-memory {text!r} is not a size; give e.g. 16GiB, 24GB or 80 (GiB)")
    unit = (m.group(2) or "GiB").lower()
    scale = {"gib": GIB, "g": GIB, "gb": 1e9, "mib": 2**20, "m": 2**20, "mb": 1e6}[unit]
    return float(m.group(1)) * scale


def shape(cfg: PlanConfig) -> dict:
    """Parameters by part, from the config alone (the model is built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = modeling.load_config(cfg.model, cfg.revision, cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    layers = model.get_decoder().layers
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return {"params": sum(p.numel() for p in model.parameters()), "linear_params": sum(m.weight.numel() for m in
            linears), "linear_bias": sum(m.bias.numel() for m in linears if m.bias is not None),
            "lora_per_rank": sum(m.in_features + m.out_features for m in linears),
            "int8_scales": sum(m.out_features for m in linears), "layers": len(layers), "hidden": config.hidden_size,
            "intermediate": getattr(config, "intermediate_size", 4 * config.hidden_size),
            "vocab": config.vocab_size, "tied": tied, "model_type": config.model_type,
            "max_positions": getattr(config, "max_position_embeddings", None)}  # fmt: skip


def precision(cfg: PlanConfig) -> str:
    from .quant import quantized

    if cfg.dtype != "auto":
        return cfg.dtype
    if cfg.device == "cpu":
        return "float32"
    return "bfloat16" if quantized(cfg) or cfg.optimizer == "adamw-kahan" else "bf16-mixed"


def estimate(cfg: PlanConfig, arch: dict, batch_size: int | None = None, prompt: int | None = None,
             completion: int | None = None, runtime: float | None = None) -> dict:  # fmt: skip
    """Bytes by part for `cfg` on `arch` (overrides: the batch and lengths a fit search tries)."""
    from .kernels import loss_chunk_tokens
    from .optim import OPTIMIZERS

    b = batch_size or cfg.batch_size
    p, c = prompt or cfg.prompt_length, completion or cfg.completion_length
    tokens = b * (p + 2 * c) if cfg.prefix_sharing else 2 * b * (p + c)
    n_layers, h, i, v = arch["layers"], arch["hidden"], arch["intermediate"], arch["vocab"]
    prec = precision(cfg)
    w = {"float32": 4, "bf16-mixed": 4, "bfloat16": 2}[prec]
    compute = 4 if prec == "float32" else 2
    linear = arch["linear_params"]
    other = arch["params"] - linear  # embeddings, head, norms, biases
    if cfg.load_in_4bit:
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.bnb_4bit_double_quant else 4 / 64)
        base = linear * per_param + other * w
    elif cfg.load_in_8bit:
        base = linear + 4 * arch["int8_scales"] + other * w
    else:
        base = arch["params"] * w
    if cfg.lora_r is not None:
        parts = {"weights": base, "trained (LoRA, fp32)": cfg.lora_r * arch["lora_per_rank"] * 16}
    else:
        spec = OPTIMIZERS[cfg.optimizer]
        bpp = spec.bytes_per_param
        if w == 2 and spec.weights == "any":  # bf16 weights and gradients (and AdamW's moments follow the weights)
            bpp = 8 if cfg.optimizer == "adamw" else bpp - 4
        parts = {"weights + gradients + optimizer": arch["params"] * bpp}
    parts["weight copies (autocast)"] = 2 * (linear + (0 if arch["tied"] else v * h)) if prec == "bf16-mixed" else 0
    scale = compute / 4
    one_layer = tokens * (A_HIDDEN * h + A_MLP * i + A_OTHER) * scale
    if cfg.activation_offload:
        held = one_layer * (2 if not cfg.gradient_checkpointing else 1)  # in flight; the rest waits on the host
    elif cfg.gradient_checkpointing:
        held = tokens * n_layers * h * compute + one_layer
    else:
        held = one_layer * n_layers
    parts["activations"] = held + A_OUTSIDE * tokens * h * scale
    head_trains = cfg.lora_r is None
    scored = 2 * b * c  # the head runs on the completions' tokens only
    if cfg.logps_backend == "eager":
        parts["logits"] = 3 * scored * v * 4
    else:
        tile = min(scored, loss_chunk_tokens(v, compute)) * v * compute
        parts["logits"] = tile + 4 * scored * h + (4 * v * h if head_trains else 0)
    parts["cache stream"] = tokens * 8
    parts["runtime"] = runtime if runtime is not None else runtime_bytes(cfg)
    return {"precision": prec, "tokens": tokens, "parts": parts, "total": sum(parts.values())}


def runtime_bytes(cfg: PlanConfig) -> float:
    """CPU: this process's resident memory now, with torch, transformers and the libraries the run uses imported
    (what a training process holds before its model); CUDA: RUNTIME_CUDA_GIB."""
    from .quant import quantized

    if cfg.device == "cuda":
        return RUNTIME_CUDA_GIB * GIB
    if quantized(cfg):
        import bitsandbytes  # noqa: F401
    import accelerate  # noqa: F401  (what a training process imports before its model)
    import datasets  # noqa: F401
    import peft  # noqa: F401

    from . import loop, scoring, train  # noqa: F401

    with open("/proc/self/statm") as f:
        import os

        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident + (RUN_CPU_MIB + (QUANTIZED_CPU_MIB if quantized(cfg) else 0)) * 2**20


def largest_fit(cfg: PlanConfig, arch: dict, budget: float, runtime: float) -> dict:
    """The largest batch at the given lengths, and the longest completion at the given batch, within `budget`."""

    def fits(**kw):
        return estimate(cfg, arch, runtime=runtime, **kw)["total"] <= budget

    longest = (arch["max_positions"] or 1 << 24) - cfg.prompt_length  # the model's context caps a sequence
    out = {"batch_size": 0, "completion_length": 0}
    if fits(batch_size=1):
        lo, hi = 1, 2
        while fits(batch_size=hi) and hi < 1 << 20:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(batch_size=mid) else (lo, mid)
        out["batch_size"] = lo
    if fits(completion=1):
        lo, hi = 1, 2
        while fits(completion=hi) and hi < longest:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(completion=mid) else (lo, mid)
        out["completion_length"] = min(lo, longest)
    return out


def plan(config: PlanConfig | None = None, **kwargs) -> dict:
    """The estimate for `config` (or the keyword options), with the fit under --gpu-memory when given."""
    from .config import make

    cfg = make(PlanConfig, config, **kwargs)
    arch = shape(cfg)
    runtime = runtime_bytes(cfg)
    out = {"model": cfg.model, "device": cfg.device, "shape": arch, **estimate(cfg, arch, runtime=runtime)}
    if cfg.gpu_memory is not None:
        budget = budget_bytes(cfg.gpu_memory)
        out.update(budget=budget, fits=out["total"] <= budget, largest=largest_fit(cfg, arch, budget, runtime))
    return out


# train and sft (--gpu-memory) refuse a run whose estimate exceeds the budget by more than this fraction: the
# estimate leans high (its parts peak at different moments), and its CPU figures are within 3% of measured peaks
MARGIN = 0.10


def check_run(cfg, source, *, device: str, precision: str, prefix_sharing: bool, one_completion: bool) -> str:
    """Refuse (UserError) a train or sft run whose estimated peak exceeds its --gpu-memory by more than MARGIN,
    unless --ignore-memory-estimate; returns the line to print. `cfg`: the run's config (its model, batch and
    memory options); `source`: its rows (`batching.Source`), read before any weights load. The micro-batch
    estimated is --batch-size copies of the longest rows: the longest prompt and the longest completion (sft: one
    completion, counted as two halves)."""
    import math

    longest_prompt = int(source.prompt_lengths.max(initial=1))
    longest = int((source.lengths - source.prompt_lengths).max(initial=1))  # the longer completion of a row
    completion = max(1, math.ceil(longest / 2)) if one_completion else max(1, longest)
    dtype = precision if precision in ("float32", "bfloat16", "bf16-mixed") else "auto"
    pc = PlanConfig(model=cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, device=device,
                    dtype=dtype, batch_size=cfg.batch_size, prompt_length=max(1, longest_prompt),
                    completion_length=completion, prefix_sharing=prefix_sharing or one_completion,
                    gradient_checkpointing=cfg.gradient_checkpointing, activation_offload=cfg.activation_offload,
                    logps_backend=cfg.logps_backend, optimizer=cfg.optimizer, lora_r=cfg.lora_r,
                    **{k: getattr(cfg, k) for k in ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                                    "bnb_4bit_double_quant", "bnb_4bit_compute_dtype")},
                    gpu_memory=cfg.gpu_memory)  # fmt: skip
    r = plan(pc)
    where = "peak RSS on CPU" if device == "cpu" else "GPU memory, an estimate"
    said = (
        f"the estimated peak {r['total'] / GIB:.2f} GiB ({where}; fastdpo plan, at batch {cfg.batch_size} of the "
        f"longest rows: {longest_prompt} prompt + {longest} completion tokens)"
    )
    budget = f"--gpu-memory {cfg.gpu_memory} ({r['budget'] / GIB:.2f} GiB)"
    if r["total"] <= r["budget"] * (1 + MARGIN):
        return f"memory: {said} is within {budget}"
    fit = r["largest"]["batch_size"]
    advice = (f"--batch-size {fit} fits" if fit else "no batch fits at these lengths (shorten them: "
              "--max-length; or --gradient-checkpointing, --load-in-4bit with --lora-r)")  # fmt: skip
    if cfg.ignore_memory_estimate:
        return f"warning: --ignore-memory-estimate: {said} exceeds {budget}; {advice}"
    raise UserError(
        f"{said} exceeds {budget} by more than {MARGIN:.0%}; {advice}, or pass --ignore-memory-estimate to train anyway"
    )


def format_plan(r: dict, cfg: PlanConfig) -> str:
    a = r["shape"]
    what = "QLoRA" if cfg.load_in_4bit and cfg.lora_r else "LoRA" if cfg.lora_r else "full"
    lines = [
        f"{r['model']} ({a['model_type']}): {a['params'] / 1e9:.3g}B parameters, {a['layers']} layers, hidden "
        f"{a['hidden']}, vocab {a['vocab']}; {what} training in {r['precision']} on {r['device']}",
        f"micro-batch {cfg.batch_size} pairs x ({cfg.prompt_length} prompt + 2 x {cfg.completion_length} "
        f"completion tokens{'' if cfg.prefix_sharing else ', prompt twice'}) = {r['tokens']:,} tokens",
    ]
    for k, nbytes in r["parts"].items():
        lines.append(f"  {k:<32} {nbytes / GIB:>9.3f} GiB")
    label = "measured runtime + estimate" if r["device"] == "cpu" else "estimate"
    lines.append(f"  {'peak (' + label + ')':<32} {r['total'] / GIB:>9.3f} GiB")
    if "budget" in r:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lg = r["largest"]
        lines.append(f"budget {r['budget'] / GIB:.2f} GiB: {verdict}; largest batch at these lengths "
                     f"{lg['batch_size']}, longest completion at batch {cfg.batch_size}: {lg['completion_length']} "
                     "tokens")  # fmt: skip
    return "\n".join(lines)


def main(cfg: PlanConfig) -> int:
    import json

    r = plan(cfg)
    print(json.dumps(r, indent=2) if cfg.json else format_plan(r, cfg))
    if "fits" in r and not r["fits"]:
        print(
            f"fastdpo plan: the estimate {r['total'] / GIB:.2f} GiB exceeds --gpu-memory {cfg.gpu_memory}",
            file=sys.stderr,
        )
        return 1
    return 0
