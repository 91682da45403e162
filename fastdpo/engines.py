"""How the policy is distributed: one engine object per way, with the few verbs the training loop needs.

    Plain       one process, or DDP over processes (accelerate)
    FSDP2       PyTorch FSDP2 (`--fsdp`): weights, gradients and optimizer state sharded (`fastdpo.sharding`)
    DeepSpeed   ZeRO-2/3 through an `accelerate launch` DeepSpeed config; the engine steps itself

The loop (`loop.Trainer.fit`) reads the same under all three:

    with engine.grad_sync(model, last_micro_batch):    # DDP's no_sync, FSDP2's reduce-scatter switch, ...
        loss = objective.step(model, batch)
        engine.backward(model, loss)
    grad_norm = engine.clip_and_step(model, optimizer, max_norm, finite)

and checkpoints (`fastdpo.checkpoint`) ask the engine for the full weights (`full_state_dict`), to write its own
state (`save`: the optimizer's, or DCP shards, or DeepSpeed's partitions) and to read it back (`load`). A new way
of distributing is one new class here.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from . import modeling, sharding

SHARDED = "sharded"  # a checkpoint's DCP directory under --fsdp
DEEPSPEED = "deepspeed"  # a checkpoint's DeepSpeed directory (engine.save_checkpoint's tag)


class Plain:
    """One process, or DDP through accelerate."""

    name = "plain"
    checkpoint_has_model = True  # a checkpoint is a loadable model (resume loads the policy from it)

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def wrap(self, model, cfg, device, precision):
        """The scorer (`LogpsModel`) as this engine trains it, before the optimizer exists."""
        return model

    def prepare(self, model, optimizer, cfg, precision, log):
        """(model, optimizer) ready to train: accelerate's DDP wrapper and device placement."""
        return self.accelerator.prepare(model, optimizer)

    def grad_sync(self, model, last: bool):
        """Context for one micro-batch's forward and backward: gradients are reduced over processes only at the
        step's last micro-batch."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model, loss) -> None:
        self.accelerator.backward(loss)

    def clip_norm(self, model, max_norm: float) -> float:
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return float(norm) if norm is not None else float("nan")

    def clip_and_step(self, model, optimizer, max_norm: float, finite: bool) -> float:
        """Clip the gradient to `max_norm` and step the optimizer, unless the gradient or the step's loss
        (`finite` False) is non-finite; returns the total gradient norm before clipping, over all processes."""
        norm = self.clip_norm(model, max_norm)
        if finite and math.isfinite(norm):
            optimizer.step()
        return norm

    def full_state_dict(self, model) -> dict:
        """The full weights, keys as in the `LogpsModel` ("model.*"), on the main process."""
        return self.accelerator.get_state_dict(model)

    gathers_copy = False  # full_state_dict shares the live weights (merging LoRA into them needs a copy)

    def save(self, model, optimizer, path: Path) -> dict:
        """Write this engine's state into the checkpoint directory `path` (a collective); returns the files the
        main process writes, {name: object for torch.save}."""
        return {"optimizer.pt": optimizer.state_dict()}

    def load(self, model, optimizer, path: Path, load_state) -> None:
        """Read back what `save` wrote; `load_state(file)` reads fastdpo's own files safely."""
        optimizer.load_state_dict(load_state(path / "optimizer.pt"))


class FSDP2(Plain):
    """PyTorch FSDP2 (`--fsdp`): every process holds a shard of the weights, gradients and optimizer state."""

    name = "fsdp2"
    checkpoint_has_model = False  # its checkpoints are DCP shards, read into the sharded policy
    gathers_copy = True

    def wrap(self, model, cfg, device, precision):
        return sharding.shard(model, cfg, device, precision)

    def prepare(self, model, optimizer, cfg, precision, log):
        # sharded already (`wrap`); accelerate would wrap the model in DDP
        return model, self.accelerator.prepare(optimizer)

    def grad_sync(self, model, last: bool):
        model.set_requires_gradient_sync(last)  # reduce-scatter at this backward, or accumulate locally
        return contextlib.nullcontext()

    def clip_norm(self, model, max_norm: float) -> float:
        return sharding.clip_grad_norm_(model, max_norm)

    def full_state_dict(self, model) -> dict:
        return sharding.full_state_dict(model)  # gathered onto the main process, in CPU memory

    def save(self, model, optimizer, path: Path) -> dict:
        sharding.save(model, optimizer, path / SHARDED)  # every process writes its own shards; nothing is gathered
        return {}

    def load(self, model, optimizer, path: Path, load_state) -> None:
        sharding.load(model, optimizer, path / SHARDED)


class DeepSpeed(Plain):
    """DeepSpeed ZeRO through accelerate: the engine partitions, clips and steps itself."""

    name = "deepspeed"

    def prepare(self, model, optimizer, cfg, precision, log):
        # the config from fastdpo's flags, before prepare builds the engine from it
        log(sharding.configure_deepspeed(self.accelerator.state.deepspeed_plugin, cfg, precision, model))
        return self.accelerator.prepare(model, optimizer)

    def grad_sync(self, model, last: bool):
        model.set_gradient_accumulation_boundary(last)  # its ZeRO-2/3 reduce-scatter is its own business
        return contextlib.nullcontext()

    def backward(self, model, loss) -> None:
        # not accelerator.backward: it steps the engine after every micro-batch (fastdpo never enters
        # accelerator.accumulate, so accelerate takes each one for the last)
        model.backward(loss)  # its config's gradient_accumulation_steps is 1: no division

    def clip_and_step(self, model, optimizer, max_norm: float, finite: bool) -> float:
        # DeepSpeed clips inside its step (gradient_clipping = --max-grad-norm) and skips a step whose gradient
        # norm is inf or NaN (it then reports a stale norm); accelerate's wrapped optimizer.step is a no-op
        model.step()
        return float(model.get_global_grad_norm()) if model.was_step_applied() else float("nan")

    def save(self, model, optimizer, path: Path) -> dict:
        model.save_checkpoint(str(path), tag=DEEPSPEED, save_latest=False)  # every process its partition
        return {}

    def load(self, model, optimizer, path: Path, load_state) -> None:
        # the fp32 weights and optimizer state of this process's partition; DeepSpeed's files hold pickled objects,
        # which it loads itself (torch.load with weights_only=False: a checkpoint of one's own run only)
        model.load_checkpoint(str(path), tag=DEEPSPEED, load_optimizer_states=True, load_lr_scheduler_states=False)


def engine_for(cfg, accelerator) -> Plain:
    """The engine a run's options and launch ask for: --fsdp, a DeepSpeed accelerate config, or plain."""
    if getattr(cfg, "fsdp", False):
        return FSDP2(accelerator)
    if modeling.deepspeed_launched():
        return DeepSpeed(accelerator)
    return Plain(accelerator)
