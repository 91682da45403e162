"""Run directories: who may write one, model saves and checkpoints (atomic), RNG state, resume.

    OUT/fastdpo_config.json    the run's config, written once the inputs are validated and loaded
    OUT/metrics.jsonl          one JSON object per optimizer step
    OUT/checkpoint-STEP/       model (safetensors) + tokenizer, optimizer.pt, scheduler.pt, rng_state.pt,
                               trainer_state.json (written last: its presence marks a complete checkpoint)
                               under --fsdp: sharded/ (trained weights, with LoRA the adapter only, and
                               optimizer state, each process its own shards, `torch.distributed.checkpoint`)
                               + tokenizer instead of the model and optimizer.pt; under DeepSpeed:
                               deepspeed/ (its own files, every process its ZeRO partition of the fp32
                               weights and optimizer state) instead of optimizer.pt
    OUT/                       the final model, saved the same way (config.json last), <command>_summary.json

A run directory is guarded like a cache (`check_run_dir`): a run goes only into an empty directory,
continues its own (`--resume`), or replaces one with `--overwrite`, which removes the old run's files
so that nothing stale (an old checkpoint a later `--resume latest` would pick) survives; it never
lies inside its model, reference or cache directories. One command at a time writes it: the main
process holds `OUT/.fastdpo.lock` (`io.DirLock`) from its first write to its end (`claim_run_dir`).

A resume continues the checkpoint's run (`check_resume`): options that change the trajectory are
compared with the checkpoint's config; those the checkpoint's state is built for (model, optimizer,
data and plan, LoRA adapter, sharding, processes) cannot change, the others (`CHANGEABLE_KEYS`) only with
`--allow-changes`, and only logging, saving and how the same numbers are computed (`FREE_KEYS`)
change freely.

Every save goes to a hidden temporary directory first (`.checkpoint-STEP.tmp`, `.NAME.tmp-PID`) and
is renamed into place, so a crash never leaves a directory that looks complete; temporaries a crash
or an interrupt left behind are removed at the next start (`sweep_temporaries`). Resuming restores
the optimizer, scheduler, every RNG and the data position, so a resumed run equals an uninterrupted
one step for step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from . import __version__, engines, modeling
from .config import to_dict
from .errors import UserError, first_line
from .io import (
    DirLock,
    atomic_write_json,
    check_output_apart,
    describe_holder,
    ensure_dir,
    fsync_dir,
    is_lock_file,
    lock_holder,
    writing,
)

# Settings that decide which pairs form each step: a resume must keep them.
PLAN_KEYS = ("batch_size", "grad_accum", "seed", "shuffle", "group_by_length", "ref_cache", "dataset")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")  # the adapter a checkpoint holds
# Options a resume may change freely: what is logged, saved or shown, when the run stops early, and how the same
# numbers are computed (layout, kernels, attention, sharding details), never which numbers
FREE_KEYS = frozenset({
    "output", "resume", "overwrite", "allow_changes", "progress", "log_every", "report_to", "save_steps",
    "save_total_limit", "kl_warn", "early_stop_kl", "max_bad_steps", "merge_lora", "gradient_checkpointing",
    "attn_implementation", "logps_backend", "packing", "prefix_sharing", "max_tokens_per_batch", "fsdp_lm_head",
    "fsdp_reshard_after_forward", "fsdp_cpu_offload", "trust_remote_code", "strict", "activation_offload",
    "allow_reference_mismatch", "gpu_memory", "ignore_memory_estimate",
    "max_steps", "epochs"})  # the run's length: compared as the schedule's length (`check_resume`)
# Options that change the trajectory from the step where they change: refused on resume unless --allow-changes,
# then honoured from the next step (the optimizer's hyperparameters and the schedule are rebuilt from them)
CHANGEABLE_KEYS = ("loss", "loss_weights", "beta", "label_smoothing", "simpo_gamma", "discopop_tau", "ld_alpha",
                   "lr", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay", "momentum", "max_grad_norm",
                   "disable_dropout", "ref_model", "dtype")  # dtype: weights and optimizer state are cast on load
# Every other option (model, revision, data settings, ...) cannot change: the checkpoint's state is built
# for it


# What a run writes into OUT (besides checkpoint-*/ and hidden temporaries): removed by --overwrite
RUN_FILES = ("fastdpo_config.json", "metrics.jsonl", "train_summary.json", "sft_summary.json", "config.json",
             "generation_config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
             "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "tokenizer.model", "README.md")
RUN_DIRS = ("fastdpo",)  # accelerate's tracker logs (project_dir/OUT/fastdpo)


def _is_run_file(p: Path) -> bool:
    name = p.name
    if is_lock_file(name):
        return False
    if p.is_dir():
        return name in RUN_DIRS or name.startswith("checkpoint-") or (name.startswith(".") and ".tmp" in name)
    return name in RUN_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def check_run_dir(out: str, inputs: dict[str, str | None], resume: str | None, overwrite: bool,
                  locked: bool = False) -> None:
    """Refuse, before anything is written, an output directory that would lose or mix data, or that another
    command writes now (`locked`: this process holds its lock).

    inputs: flag -> local path the run reads (--model, --ref-cache, ...); OUT may not be or lie inside one,
    and with --overwrite none of them may lie inside OUT.
    """
    path = Path(out).resolve()
    check_output_apart(out, inputs)
    for flag, other in inputs.items():
        if overwrite and other and Path(other).exists() and path in Path(other).resolve().parents:
            raise UserError(f"--overwrite would delete {flag} {other}, which lies inside --output {out}")
    if not path.is_dir():
        return
    holder, gone = (None, True) if locked else lock_holder(path)
    if holder is not None and not gone:
        raise UserError(describe_holder(out, "--output", holder))
    if resume:
        return
    entries = [p for p in path.iterdir() if not is_lock_file(p.name)]
    ours = [p for p in entries if _is_run_file(p)]
    if not entries or overwrite:
        return
    if not ours:
        raise UserError(f"--output {out} is not empty and holds no fastdpo run; choose an empty directory or pass "
                        "--overwrite")
    what = "a finished run" if (path / "config.json").exists() or (path / "adapter_config.json").exists() else (
        "a run with checkpoints" if list_checkpoints(path) else "a run")
    raise UserError(f"--output {out} holds {what}; pass --resume latest to continue it, --overwrite to start over, "
                    "or choose another directory")


def on_main(state, fn):
    """`fn()` on the main process only; a UserError it raises is raised on every process, with the same line, so
    that all stop alike (none waits at a barrier for a peer that has left). state: accelerate's (Partial)State or
    Accelerator. Returns fn's result on the main process, None elsewhere."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise UserError(error)
    return result


def claim_run_dir(state, out: str, command: str, inputs: dict[str, str | None], resume: str | None,
                  overwrite: bool) -> DirLock | None:
    """Lock OUT for this command (the main process holds the lock), then check it again under the lock: between
    the first check and now another run may have written there. Every process raises the same refusal."""
    def claim():
        path = Path(out)
        created = not path.exists()
        ensure_dir(path)
        lock = DirLock(path, command).acquire()
        try:
            check_run_dir(out, inputs, resume, overwrite, locked=True)
        except BaseException:
            release_run_dir(lock, created)
            raise
        lock.created = created
        return lock

    return on_main(state, claim)


def release_run_dir(lock: DirLock | None, created: bool | None = None) -> None:
    """Release the lock; a directory this command created and left empty is removed."""
    if lock is None:
        return
    lock.release()
    created = getattr(lock, "created", False) if created is None else created
    if created and lock.dir.is_dir() and not any(lock.dir.iterdir()):
        lock.dir.rmdir()


def clear_run_dir(out: Path) -> None:
    """--overwrite: remove the old run's files (checkpoints, logs, model, config); anything else stays."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if _is_run_file(p):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def save_pretrained_atomic(engine, model, tokenizer, target: Path, merge_lora: bool = False) -> None:
    """save_pretrained into a temporary directory, then move the files in; config.json goes last. A failed write
    (a full disk) is one line on every process, and nothing of it is left. `engine`: `fastdpo.engines`."""
    accelerator = engine.accelerator
    policy = accelerator.unwrap_model(model).model  # the causal LM inside the wrapper and our `LogpsModel`
    state_dict = engine.full_state_dict(model)  # on the main process; keys carry the LogpsModel's "model."

    def write():
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(target, cleanup=tmp, need=lambda: state_bytes(state_dict)), _removed_on_interrupt(tmp):
            tmp.mkdir(parents=True)
            sd = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
            if merge_lora and hasattr(policy, "peft_config"):
                # the unsharded state dict shares the live weights, which merging would change: a copy in CPU memory
                # (a second copy on a full GPU would not fit at the very end of a run)
                owned = sd if engine.gathers_copy else {k: v.to("cpu", copy=True) for k, v in sd.items()}
                merged_lora(policy, owned).save_pretrained(tmp, safe_serialization=True)
            else:  # a PeftModel keeps the adapter's entries of it
                policy.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for name in os.listdir(tmp):
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            target.mkdir(parents=True, exist_ok=True)
            # config.json last: until it is in place, the directory does not load as a model
            for name in sorted(os.listdir(tmp), key=lambda n: n in ("config.json", "adapter_config.json")):
                os.replace(tmp / name, target / name)
            fsync_dir(target)
            tmp.rmdir()

    on_main(accelerator, write)


def state_bytes(obj) -> int:
    """The bytes of the tensors in a (nested) state dict: about what saving it writes."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


def merged_lora(policy, state_dict: dict):
    """The LoRA `policy` (a PeftModel) with its adapter merged into the base weights, built anew from `state_dict`,
    its full weights (gathered when sharded): a model of the same classes on the meta device takes the tensors
    (`assign`), so nothing but `state_dict` holds weights, and the training model is left as it is."""
    import peft
    import torch

    base = policy.get_base_model()
    with torch.device("meta"):
        fresh = peft.get_peft_model(type(base)(base.config), policy.peft_config[policy.active_adapter])
    fresh.load_state_dict(state_dict, assign=True)
    fresh.get_base_model().tie_weights()  # `assign` gave a tied head its own (equal) tensor: one again
    return fresh.merge_and_unload()


class _removed_on_interrupt:
    """Remove a temporary directory when Ctrl-C (or any exception) leaves the block early."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def sweep_temporaries(out: Path) -> None:
    """Remove temporaries of our own naming that a killed save left in a run directory."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    state = {"python": json.dumps(random.getstate()), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(engine, model, optimizer, scheduler, tokenizer, out: Path, progress: dict, cfg,
                    keep: int | None = None) -> Path:
    """OUT/checkpoint-STEP: weights, optimizer, scheduler, RNG, data position (`progress`). Atomic: a failed write
    (a full disk) is one line on every process, leaves nothing of this checkpoint, and the previous ones intact.

    `engine` (`fastdpo.engines`) writes the weights and optimizer state its own way; `keep`: afterwards keep only
    the newest `keep` complete checkpoints.
    """
    import torch

    accelerator = engine.accelerator
    step = progress["step"]
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    files = {"scheduler.pt": scheduler.state_dict(), "rng_state.pt": _rng_state()}

    def need() -> int:  # the weights and optimizer state, counted on failure only
        return state_bytes(model.state_dict()) + state_bytes(optimizer.state_dict())

    if engine.checkpoint_has_model:  # a loadable model, which resume loads the policy from
        save_pretrained_atomic(engine, model, tokenizer, tmp, merge_lora=False)
    elif accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(tmp)
    with writing(final, cleanup=tmp, need=need):  # a collective: a failed write raises on every process
        files.update(engine.save(model, optimizer, tmp))
    accelerator.wait_for_everyone()

    def finish():
        with writing(final, cleanup=tmp, need=need), _removed_on_interrupt(tmp):
            for name, obj in files.items():
                torch.save(obj, tmp / name)
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            # trainer_state.json marks a complete checkpoint; it is written last
            atomic_write_json(tmp / "trainer_state.json", {**progress, "fastdpo_version": __version__,
                                                           "config": to_dict(cfg),
                                                           "num_processes": accelerator.num_processes})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(out)
        if keep:  # only once this one is complete
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    on_main(accelerator, finish)  # every process learns whether it worked
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so trainer_state.json exists), oldest first."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        if p.is_dir() and (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(resume: str | None, out: str) -> Path | None:
    """`--resume` as a checkpoint directory: None, the newest complete one ('latest'), or the one named."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(Path(out))
        if not ckpts:
            raise UserError(f"--resume latest: no complete checkpoint in {out}")
        return ckpts[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {path}: not a complete fastdpo checkpoint (no trainer_state.json)")
    return path


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json, checked: an object with an integer `step` >= 1."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable: {first_line(e)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{file} is not a fastdpo trainer state (not a JSON object)")
    if not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 1:
        raise UserError(f"{file}: field 'step' must be an integer >= 1, got {state.get('step')!r}")
    if not isinstance(state.get("config", {}), dict):
        raise UserError(f"{file}: field 'config' must be an object")
    return state


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def describe_changes(changes: dict) -> str:
    """"--lr 1e-06 -> 0.001, --loss sigmoid -> ipo" from `check_resume`'s `changed`."""
    return ", ".join(f"{_flag(k) if k != 'total_steps' else 'the schedule length (--max-steps/--epochs)'} "
                     f"{_shown(c['from'])} -> {_shown(c['to'])}" for k, c in changes.items())


def schedule_uses_length(cfg) -> bool:
    """Whether the learning rate at a step depends on the run's length (decay to its end, warm-up as a ratio)."""
    return cfg.lr_scheduler != "constant" or (cfg.warmup_ratio > 0 and not cfg.warmup_steps)


def check_resume(path: Path, cfg, num_processes: int, total_steps: int | None = None,
                 data_fingerprint: str | None = None) -> dict:
    """The checkpoint's trainer state, if `cfg` may continue it, with `changed`: {option: {"from", "to"}}, the
    options --allow-changes accepted (empty without changes). total_steps: this run's length, and
    data_fingerprint: what it trains on, by content (`loop.Trainer.data_fingerprint`), when known."""
    state = read_trainer_state(path)
    saved = state.get("config", {})
    if "model" in saved and saved["model"] != cfg.model:
        raise UserError(f"--resume {path}: the checkpoint continues a run of --model {saved['model']}, not "
                        f"{cfg.model}; resume with the same --model")
    if saved.get("optimizer", cfg.optimizer) != cfg.optimizer:
        raise UserError(f"--resume {path}: the checkpoint holds --optimizer {saved['optimizer']}'s state, not "
                        f"{cfg.optimizer}'s; resume with --optimizer {saved['optimizer']}")
    lora = [k for k in LORA_KEYS if k in saved and saved[k] != getattr(cfg, k, None)]
    if lora:  # the adapter in the checkpoint has its own shape and scale: other settings would be ignored or fail
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in lora)
        raise UserError(f"--resume {path}: the checkpoint trains a LoRA adapter with {was}; resume with the same")
    changed = [k for k in PLAN_KEYS if saved.get(k) != getattr(cfg, k, None)]
    sharded = (path / engines.SHARDED).is_dir()
    if sharded != bool(getattr(cfg, "fsdp", False)):
        raise UserError(f"--resume {path}: the checkpoint was written {'with' if sharded else 'without'} --fsdp; "
                        f"resume {'with' if sharded else 'without'} it")
    deepspeed = (path / engines.DEEPSPEED).is_dir()
    if deepspeed != modeling.deepspeed_launched():
        raise UserError(f"--resume {path}: the checkpoint was written {'under' if deepspeed else 'without'} "
                        f"DeepSpeed; resume {'under' if deepspeed else 'without'} it (the same accelerate config)")
    if state.get("num_processes") != num_processes:
        changed.append(f"number of processes ({state.get('num_processes')} -> {num_processes})")
    if changed:
        raise UserError(f"--resume {path}: the checkpoint was made with other data settings ({', '.join(changed)}); "
                        "resume with the same settings")
    theirs = state.get("data_fingerprint")
    if data_fingerprint and theirs and theirs != data_fingerprint:  # the same path, other contents
        where = f"--ref-cache {cfg.ref_cache}" if getattr(cfg, "ref_cache", None) else f"--dataset {cfg.dataset}"
        raise UserError(f"--resume {path}: {where} holds other data than the checkpoint was trained on (fingerprint "
                        f"{str(theirs)[:12]} then, {data_fingerprint[:12]} now); resume on the same data")
    ours = to_dict(cfg)
    differs = [k for k in ours if k in saved and saved[k] != ours[k] and k not in FREE_KEYS]
    fixed = [k for k in differs if k not in CHANGEABLE_KEYS]
    if fixed:
        was = ", ".join(f"{_flag(k)} {_shown(saved[k])}" for k in fixed)
        raise UserError(f"--resume {path}: the checkpoint's run has {was}, which cannot change on resume; resume "
                        "with the same")
    step = state["step"]
    length = total_steps if total_steps is not None else cfg.max_steps
    if length is not None and length < step:
        raise UserError(f"--resume {path}: this run ends at step {length} (--max-steps/--epochs), before the "
                        f"checkpoint's step {step}; give a --max-steps of at least {step}")
    changes = {k: {"from": saved[k], "to": ours[k]} for k in differs}
    before = state.get("total_steps")
    if total_steps is not None and before is not None and before != total_steps and schedule_uses_length(cfg):
        changes["total_steps"] = {"from": before, "to": total_steps}
    if changes and not getattr(cfg, "allow_changes", False):
        raise UserError(f"--resume {path}: options differ from the checkpoint's: {describe_changes(changes)}; resume "
                        f"with the checkpoint's values, or pass --allow-changes to train with the new ones from step "
                        f"{step + 1}")
    return {**state, "changed": changes}


def load_checkpoint(engine, path: Path, cfg, model, optimizer, scheduler, total_steps: int | None = None,
                    data_fingerprint: str | None = None) -> dict:
    """Restore optimizer, scheduler and RNG from `path` (and a sharded model's weights: the others were loaded from
    the checkpoint with the model); returns its trainer state (see `check_resume`). Options --allow-changes
    accepted take effect: the optimizer's hyperparameters are this run's, and so is the schedule from here on."""
    state = check_resume(path, cfg, engine.accelerator.num_processes, total_steps, data_fingerprint)
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    engine.load(model, optimizer, path, _load_state)
    scheduler.load_state_dict(_load_state(path / "scheduler.pt"))
    _set_rng_state(_load_state(path / "rng_state.pt"))
    if state["changed"]:
        _rebuild_schedule(optimizer, scheduler, fresh)
    return state


def _rebuild_schedule(optimizer, scheduler, fresh: list[dict]) -> None:
    """After loading a checkpoint's optimizer and scheduler, which carry its hyperparameters and base learning
    rates: this run's (`fresh`, the groups as built from its config), and the learning rate of this run's
    schedule (its lambdas, built from this run's config) at the checkpoint's step."""
    for group, ours in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in ours.items() if k != "lr"})  # initial_lr: the schedule's base
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _load_state(path: Path):
    """fastdpo's own optimizer/scheduler/RNG state: tensors and plain data only (weights_only=True)."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a fastdpo checkpoint file (only tensors and plain data are loaded, "
                        f"nothing else is unpickled): {first_line(e)}") from None
