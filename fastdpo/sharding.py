"""The policy sharded over processes: FSDP2 (`fastdpo train --fsdp`, PyTorch's `fully_shard`), and the
DeepSpeed ZeRO config and fused head under `accelerate launch --config_file examples/accelerate/zero3.yaml`.

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
only this process's shard; `shard` registers `fused_forward` as an FSDP forward method of the unit
that holds the head (the head's own, or the root), so the fused call gathers the weight (and
reduce-scatters its gradient) as `lm_head(x)` would (`scoring.head_call`).

Checkpoints are `torch.distributed.checkpoint` (DCP) directories: each process writes its own
shards of the weights and the optimizer state, and reads them back on resume; nothing gathers
the full model on one process except the final `save_pretrained`.

Under DeepSpeed the engine shards; `configure_deepspeed` fills its config from fastdpo's flags
(micro-batch, accumulation, clipping, precision) and `zero3_gather_head` gives the fused head's
read of a ZeRO-3-partitioned LM head to the engine to gather.
"""

from __future__ import annotations

import warnings
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
    or root), the root. cfg: train's or sft's config (fsdp_lm_head, fsdp_reshard_after_forward, fsdp_cpu_offload)."""
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
        # fn(hidden, weight, bias=bias) with the gathered weight (`scoring.head_call`)
        head.fused_forward = lambda hidden, fn: fn(hidden, head.weight, bias=head.bias)
        fsdp.register_fsdp_forward_method(head, "fused_forward")
        fsdp.fully_shard(model, **kw)
    else:
        fsdp.fully_shard(model, **kw)
        if isinstance(head, nn.Linear):
            # the head is the root's: gathered inside the root's forward (the log-prob path); the loss fused into
            # the head runs after that forward, so its call goes through the root's hooks
            model.fused_forward = lambda hidden, fn: fn(hidden, head.weight, bias=head.bias)
            fsdp.register_fsdp_forward_method(model, "fused_forward")
            head.fused_forward_after = lambda hidden, fn: model.fused_forward(hidden, fn)
    # FSDP2 warns once per unit whose forward returns a view (the head's log-probs, the root's loss): an in-place
    # op on one would skip its unit's gradient hook. fastdpo changes none in place (the 2-process equality tests
    # compare every gradient's effect), and the warning would only puzzle users.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def clip_grad_norm_(model, max_norm: float) -> float:
    """Clip over DTensor gradients: the total norm is over the full model, all processes' shards."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model) -> dict:
    """The full (unsharded) weights on process 0, in CPU memory; {} elsewhere. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trained_state(model, optimizer) -> dict:
    """The trained weights (DTensor shards) and the optimizer state, as DCP saves and loads them. A LoRA run's frozen
    base model is the one it starts from (--model) and is left out; get_state_dict's own ignore_frozen_params
    would keep a tied LM head's alias of the frozen embedding."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": {k: v for k, v in model_sd.items() if k not in frozen}, "optimizer": optim_sd}


def save(model, optimizer, path: Path) -> None:
    """Each process writes its shards of the trained weights and the optimizer state to the DCP directory `path`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_trained_state(model, optimizer), checkpoint_id=str(path))


def load(model, optimizer, path: Path) -> None:
    """Read this process's shards of the trained weights and optimizer state back from `path` (see `save`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _trained_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))  # fails on a trained weight the checkpoint lacks
    # not strict: the frozen weights are absent on purpose
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


# ----------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (`accelerate launch --config_file examples/accelerate/zero3.yaml -m fastdpo train ...`)


def configure_deepspeed(plugin, cfg, precision: str, model) -> str:
    """Complete accelerate's DeepSpeed config from fastdpo's flags before `prepare` builds the engine: the loop owns
    accumulation, clipping and precision, and the final save needs ZeRO-3's weights gathered. Refuses a config
    that contradicts a flag; returns a line for the log."""
    c = plugin.deepspeed_config
    c["train_micro_batch_size_per_gpu"] = cfg.batch_size  # accelerate would read it off a dataloader
    # the loop marks each step's last micro-batch and divides the loss by the whole step's count: DeepSpeed must
    # not divide it again by its own gradient_accumulation_steps
    if c.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise UserError(f"the DeepSpeed config has gradient_accumulation_steps {c['gradient_accumulation_steps']}; "
                        "set it to 1 (or auto) and pass --grad-accum")
    c["gradient_accumulation_steps"] = 1
    clip = c.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != cfg.max_grad_norm:
        raise UserError(f"the DeepSpeed config's gradient_clipping {clip} is not --max-grad-norm "
                        f"{cfg.max_grad_norm}; set it to auto (or leave it out) and pass --max-grad-norm")
    c["gradient_clipping"] = cfg.max_grad_norm  # 0 disables clipping there too
    for key in ("fp16", "bf16"):
        if str(c.get(key, {}).get("enabled", False)).lower() == "true":
            raise UserError(f"the DeepSpeed config enables {key}; leave it out: fastdpo's --dtype sets precision")
    if precision == "bf16-mixed":  # fp32 weights and optimizer, bf16 autocast around the engine's forward
        # no lower-precision modules: gradients are reduced in fp32, as under DDP
        c["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    head = ""
    if plugin.zero_stage == 3:
        # the final save_pretrained (accelerator.get_state_dict) needs the partitioned weights gathered
        c.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        head = ", fused head gathered by the engine" if zero3_gather_head(model) else ""
    return f"DeepSpeed ZeRO-{plugin.zero_stage}: {precision}, gradient clipping {cfg.max_grad_norm}{head}"


def zero3_gather_head(model) -> bool:
    """Under DeepSpeed ZeRO-3, run the fused head through `model.zero3_head`, whose external parameters are the LM
    head's weight and bias (`deepspeed.zero.register_external_parameter`: DeepSpeed's API for a parameter used
    outside its owning module's forward). The engine then gathers the partitioned head (numel 0 outside
    `lm_head.forward`) for that module's forward and again for its backward, and releases it after each; the
    gradient reaches the partitioned parameter as through `lm_head` itself. Call before `accelerator.prepare`,
    which hooks the module tree. Returns False, doing nothing, without ZeRO-3 or without a fused head."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from .scoring import head_spec

    spec = head_spec(model.model)
    if spec is None or not is_deepspeed_zero3_enabled():
        return False
    import deepspeed
    import torch

    class ExternalHead(torch.nn.Module):
        """`fn(hidden, weight, bias)` of the LM head as the forward of a module without parameters of its own;
        the head stays the causal LM's (held in a list, not as a child)."""

        def __init__(self, lm_head):
            super().__init__()
            self.lm_head = [lm_head]

        def forward(self, hidden, *, fn):  # fn by keyword: ZeRO-3's hooks look at (and wrap) positional arguments
            lm_head = self.lm_head[0]
            return fn(hidden, lm_head.weight, bias=lm_head.bias)

    model.zero3_head = ExternalHead(spec.lm_head)
    for p in (spec.lm_head.weight, spec.lm_head.bias):
        if p is not None:
            deepspeed.zero.register_external_parameter(model.zero3_head, p)
    spec.lm_head.fused_forward = lambda hidden, fn: model.zero3_head(hidden, fn=fn)  # `scoring.head_call` calls it
    return True
