"""Optimizers for `fastdpo train` and `fastdpo sft`, and what each costs per trained parameter.

    --optimizer    library        weights  bytes/param (weights + grad + state)
    adamw          torch          fp32     16     4 + 4 + two fp32 moments 8
                                  bf16      8     with --dtype bfloat16, but small updates round away (below)
    sgd            torch          fp32      8     12 with --momentum
    adamw-kahan    torch-optimi   bf16     10     2 + 2 + two bf16 moments 4 + a bf16 Kahan compensation 2
    adamw-8bit     bitsandbytes   fp32     10.03  4 + 4 + two 8-bit moments 2 + an fp32 scale per 256 values
                                  bf16      6.03  with --dtype bfloat16, but small updates round away (below)

    pip install 'fastdpo[lowmem]'      # torch-optimi and bitsandbytes (CPU and GPU)

Why bf16 weights need a special optimizer: a bf16 weight near 0.02 has a spacing of 1.2e-4, and AdamW at a
DPO learning rate moves it by about the learning rate (1e-6 to 1e-5) a step, so rounding the updated weight
to bf16 gives back the old one: most updates vanish. bf16-mixed (the GPU default) keeps fp32 weights and
avoids this for 16 bytes/param. adamw-kahan keeps the bf16 weights and stores each weight's rounding error
in a bf16 compensation buffer that is added back at the next step (Kahan summation, as in torchdistX's
AnyPrecisionAdamW), so small updates accumulate until they move the weight. Stochastic rounding (torchao)
would save the buffer (8 bytes/param) but makes each weight a random walk around the fp32 path: in the setup of
tests/test_optimizers.py (tiny model, 50 DPO steps at lr 1e-5) its total update was 58% off fp32's, Kahan's 12%.

adamw-8bit (bitsandbytes' blockwise 8-bit AdamW; tensors under 4096 values keep fp32 moments) updates the
weights as they are: fp32 weights (float32, bf16-mixed) take every update; bf16 weights round them away as
with plain AdamW. Its update op takes no FSDP2 (DTensor) weights, so --fsdp refuses it; adamw-kahan steps them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import UserError, first_line


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    help: str  # one line for --help
    bytes_per_param: float  # weights + gradient + optimizer state, for `weights` (fp32 for "any"); measured in tests
    weights: str  # "any" | "bf16" (the optimizer exists to update bf16 weights)
    module: str | None = None  # the library it comes from, imported when it is used
    pip: str | None = None  # what to pip install for it
    fsdp: bool = True  # steps FSDP2's sharded (DTensor) weights


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", "torch AdamW: 16 bytes/param with fp32 weights, 8 with --dtype bfloat16 (where "
                           "small updates round away)", 16, "any"),
    "sgd": OptimizerSpec("sgd", "torch SGD: 8 bytes/param with fp32 weights, 12 with --momentum", 8, "any"),
    "adamw-kahan": OptimizerSpec("adamw-kahan", "AdamW for bf16 weights, Kahan-compensated so that small updates "
                                 "land (torch-optimi): 10 bytes/param; trains bf16 weights", 10, "bf16",
                                 "optimi", "torch-optimi"),
    "adamw-8bit": OptimizerSpec("adamw-8bit", "AdamW with 8-bit moments (bitsandbytes): 10 bytes/param with fp32 "
                                "weights, 6 with --dtype bfloat16 (where small updates round away)",
                                4 + 4 + 2 * (1 + 4 / 256), "any", "bitsandbytes", "bitsandbytes", fsdp=False),
}


def train_precision(cfg, device) -> str:
    """The run's precision: `modeling.default_precision`, except that an optimizer made for bf16 weights trains bf16
    weights (auto -> bfloat16, on CPU and GPU). Refuses, before anything loads, a --dtype or --fsdp the optimizer
    cannot train and an optimizer whose library is not installed."""
    from .modeling import default_precision
    from .quant import quantized

    spec = OPTIMIZERS[cfg.optimizer]
    if spec.weights == "bf16" and cfg.dtype not in ("auto", "bfloat16"):
        kept = "fp16 ones" if cfg.dtype == "float16" else "fp32 ones (plain adamw updates those exactly)"
        raise UserError(f"--optimizer {spec.name} exists to update bf16 weights, and --dtype {cfg.dtype} keeps {kept}; "
                        "pass --dtype bfloat16 (or auto), or --optimizer adamw")
    if cfg.fsdp and not spec.fsdp:
        raise UserError(f"--optimizer {spec.name} cannot step --fsdp's sharded weights ({spec.pip} takes no DTensor); "
                        "drop --fsdp, or use --optimizer adamw or adamw-kahan")
    _library(spec)
    if cfg.dtype == "auto" and quantized(cfg):
        # a quantized base is frozen: its unquantized weights (embeddings, head, norms) stay 16-bit on a GPU, not
        # fp32 as bf16-mixed would make them; the LoRA weights peft keeps in fp32 take every update
        return "bfloat16" if getattr(device, "type", str(device)) == "cuda" else "float32"
    return "bfloat16" if spec.weights == "bf16" else default_precision(cfg.dtype, device)


def build_optimizer(params, cfg):
    import torch

    spec = OPTIMIZERS[cfg.optimizer]
    lib = _library(spec)
    params = [p for p in params if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # torch's AdamW defaults, spelled out: the libraries' own differ (optimi: betas (0.9, 0.99), eps 1e-6)
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if spec.name == "adamw-kahan":
        return lib.AdamW(params, kahan_sum=True, **adam)  # optimi uses its Triton kernels on a GPU
    if spec.name == "adamw-8bit":
        return lib.optim.AdamW8bit(params, **adam)
    return torch.optim.AdamW(params, **adam)


def _library(spec: OptimizerSpec):
    """The optimizer's library, imported; a one-line UserError naming the pip install when it is missing."""
    if spec.module is None:
        return None
    try:
        return importlib.import_module(spec.module)
    except ImportError as e:
        raise UserError(f"--optimizer {spec.name} needs {spec.pip} ({first_line(e)}): pip install {spec.pip}, or "
                        "pip install 'fastdpo[lowmem]'") from None


def held_bytes(params, optimizer) -> dict[str, int]:
    """Bytes held by the weights, their gradients and the optimizer's state (every tensor in `optimizer.state`,
    however nested: moments, Kahan buffers, quantization scales and maps), each storage counted once, in that
    order: over the trained parameters, what `OptimizerSpec.bytes_per_param` states (tests/test_optimizers.py,
    benchmarks/fit_estimate.py)."""
    import torch

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict | list | tuple):
            for v in x.values() if isinstance(x, dict) else x:
                yield from tensors(v)

    params = list(params)
    parts = {"weights": params, "gradients": [p.grad for p in params if p.grad is not None],
             "state": list(tensors(list(optimizer.state.values())))}
    seen, out = set(), {}
    for part, ts in parts.items():
        out[part] = 0
        for t in ts:
            for key, nbytes, _ in storages(t):
                if key not in seen:
                    seen.add(key)
                    out[part] += nbytes
    return out


def storages(t):
    """(key, bytes, storage) of the storages behind tensor `t`; a tensor subclass (a quantized optimizer state)
    through the plain tensors it is made of."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from storages(getattr(t, name))
        return
    s = t.untyped_storage()
    yield s.data_ptr(), s.nbytes(), s
