"""FSDP2: the policy sharded over processes with PyTorch's `fully_shard` (`fastdpo train --fsdp`).

    torchrun --nproc_per_node 8 -m fastdpo train --fsdp --model M --ref-cache C --output OUT
    torchrun --nproc_per_node 2 -m fastdpo train --fsdp --model /tmp/tiny --ref-cache /tmp/cache \\
        --output /tmp/run --max-steps 4          # CPU, gloo: the tests' setting
    fastdpo train --fsdp --fsdp-cpu-offload ...  # one GPU: parameters, gradients and optimizer in CPU memory

Each decoder layer is a unit (its parameters are gathered for its forward and backward, then freed),
the LM head is a unit of its own (`--fsdp-lm-head own`, the default; grouped with the input
embedding when the two are tied) or part of the root, and the root (`LogpsModel`) holds the rest.
Gradients are reduce-scattered and averaged over processes as under DDP, so the loop's
normalisation holds unchanged and a sharded run equals the 1-process run at equal global batch.

The fused head reads `lm_head.weight` itself, outside `lm_head.forward`, where a unit's weight is
only this process's shard; `shard` registers `fused_forward` on the head as an FSDP forward method,
so the fused call gathers the weight (and reduce-scatters its gradient) as `lm_head(x)` would
(`scoring.through_head`).

Checkpoints are `torch.distributed.checkpoint` (DCP) directories: each process writes its own
shards of the weights and the optimizer state, and reads them back on resume; nothing gathers
the full model on one process except the final `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def init_process_group(device) -> None:
    """A 1-process group when no launcher made one: FSDP2 needs a device mesh even on one process
    (e.g. a single GPU offloading to CPU memory)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model) -> list:
    """The blocks transformers names as never to be split (`_no_split_modules`): the decoder layers."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model, cfg, device, precision: str):
    """`model` (a `scoring.LogpsModel`) sharded in place with `fully_shard`: decoder layers, the LM head (own unit
    or root), the root. cfg: `loop.RunArgs` (fsdp_lm_head, fsdp_reshard_after_forward, fsdp_cpu_offload)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed import fsdp
    from torch.distributed.device_mesh import init_device_mesh

    init_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16-mixed: compute in bf16, keep fp32 weights, reduce gradients in fp32 (as DDP under autocast does)
    mp = (fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16-mixed"
          else fsdp.MixedPrecisionPolicy())
    offload = fsdp.CPUOffloadPolicy() if cfg.fsdp_cpu_offload else fsdp.OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"--fsdp: no decoder layers found in {type(model.model).__name__} (its _no_split_modules "
                        "names none); train it without --fsdp")
    for layer in layers:
        fsdp.fully_shard(layer, **kw)
    causal_lm = model.model
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if cfg.fsdp_lm_head == "own" and isinstance(head, nn.Linear):
        embed = causal_lm.get_input_embeddings()
        tied = embed is not None and embed.weight is head.weight
        # tied: one parameter in two modules, so the two are one unit (gathered for either's forward)
        fsdp.fully_shard([embed, head] if tied else head, **kw)
        head.fused_forward = lambda hidden, fn: fn(hidden, head.weight, head.bias)
        fsdp.register_fsdp_forward_method(head, "fused_forward")
    fsdp.fully_shard(model, **kw)
    return model


def set_gradient_sync(model, sync: bool) -> None:
    """Reduce-scatter gradients at this backward (the step's last micro-batch), or keep accumulating locally."""
    model.set_requires_gradient_sync(sync)


def clip_grad_norm_(model, max_norm: float) -> float:
    """Clip over DTensor gradients: the total norm is over the full model, all processes' shards."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model) -> dict:
    """The full (unsharded) weights on process 0, in CPU memory; {} elsewhere. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(model, optimizer, path: Path) -> None:
    """Each process writes its shards of the weights and the optimizer state to the DCP directory `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))


def load(model, optimizer, path: Path) -> None:
    """Read this process's shards of the weights and optimizer state back from `path` (see `save`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
