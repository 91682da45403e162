"""Optimizers for `fastdpo train` and `fastdpo sft`, and what each costs per trained parameter.

    --optimizer    weights    bytes/param (weights + grad + state)
    adamw          fp32       16  (or bf16 weights with --dtype bfloat16: small updates round away)
    sgd            fp32        8 / 12 with momentum

The low-precision choices come from libraries made for them (see OPTIMIZERS).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    help: str  # one line for --help
    bytes_per_param: float  # weights + gradient + optimizer state, as the README's table says (measured in tests)
    weights: str  # "any" | "bf16" (the optimizer exists to update bf16 weights)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", "torch AdamW", 16, "any"),
    "sgd": OptimizerSpec("sgd", "torch SGD", 8, "any"),
}


def train_precision(cfg, device) -> str:
    """The run's precision (`modeling.train_precision`), as the optimizer needs it."""
    from .modeling import train_precision as default

    return default(cfg.dtype, device)


def build_optimizer(params, cfg):
    import torch

    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
