"""The training loop of `fastdpo train` and `fastdpo sft`: one optimizer step reads

    fetch -> forward -> loss -> backward -> clip -> step -> log

(`Trainer.fit`). What differs between the two commands is an `Objective`: what it needs from a
batch (`needs_token_logps`), `step(model, batch) -> (loss, {metric: sum})` and `finish(sums)`, the
step's metrics, and `guard(metrics)`, an over-optimisation guard. How the policy is distributed
(plain/DDP, FSDP2, DeepSpeed) is one engine object (`fastdpo.engines`), so `fit` reads the same under
all three. Everything else is here: accelerate (devices, mixed precision, trackers), the policy
(dropout off, gradient checkpointing, LoRA), optimizer and schedule, the epoch plan
(`fastdpo.batching`), non-finite step guard, checkpoints and resume (`fastdpo.checkpoint`), and the
run directory's `metrics.jsonl`, `fastdpo_config.json` and `<command>_summary.json`.

Normalisation: an objective divides its micro-batch loss by the whole optimizer step's count (pairs,
or target tokens), never by its own micro-batch's, and the loop multiplies by the number of
processes because DDP averages gradients: gradient accumulation and extra processes give the
gradient of one larger batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, batching, checkpoint, engines, metrics, modeling, optim
from .config import format_config, to_dict
from .errors import Interrupted, TrainingStopped, UserError
from .io import atomic_write_bytes, atomic_write_json, writing

if TYPE_CHECKING:  # the run options are fields of each training command's own config; the loop reads them by name
    from .recipes.sft import SFTConfig
    from .recipes.train import TrainConfig

    RunArgs = TrainConfig | SFTConfig


def check_run_options(cfg) -> None:
    """The rules every training command's options share (train's and sft's `__post_init__` call it)."""
    if cfg.overwrite and cfg.resume:
        raise UserError("--resume continues the run in --output and --overwrite would delete it; give one")
    if cfg.allow_changes and not cfg.resume:
        raise UserError("--allow-changes accepts changed options on --resume; without --resume there is nothing "
                        "to change")
    check_tracker(cfg.report_to)
    if cfg.merge_lora and cfg.lora_r is None:
        raise UserError("--merge-lora needs --lora-r")
    if not cfg.fsdp:
        defaults = type(cfg).__dataclass_fields__
        changed = [f for f in ("fsdp_lm_head", "fsdp_reshard_after_forward", "fsdp_cpu_offload")
                   if getattr(cfg, f) != defaults[f].default]
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} needs --fsdp")
    if cfg.gpu_memory is not None:
        from .plan import budget_bytes

        budget_bytes(cfg.gpu_memory)
    elif cfg.ignore_memory_estimate:
        raise UserError("--ignore-memory-estimate overrides the check --gpu-memory makes; without --gpu-memory there "
                        "is no estimate to ignore")
    if cfg.dtype == "float16":
        raise UserError("--dtype float16 cannot train here (fp16 needs loss scaling); use bf16-mixed or bfloat16 "
                        "on a GPU, float32 on CPU")


TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb")}


def check_tracker(name: str) -> None:
    """--report-to X is refused, before anything loads, when X's library is not installed (accelerate would only
    warn, and the run would log nothing)."""
    import importlib.util

    if name not in TRACKERS:
        return
    modules, package = TRACKERS[name]
    if not any(importlib.util.find_spec(m) is not None for m in modules):
        raise UserError(f"--report-to {name} needs {package}, which is not installed: pip install {package}")


class StopSignals:
    """SIGTERM (a cluster preempting the job, `kill`, `scancel`) and SIGINT (Ctrl-C) ask a command to stop at its
    next safe point (training: the end of the optimizer step, then a checkpoint; precompute: the end of the
    batch) instead of at once. Ctrl-C again, a second or more later, stops at once (KeyboardInterrupt); more
    SIGTERMs change nothing (torchrun forwards its own SIGTERM to workers that have one already, as it forwards
    a terminal's Ctrl-C within milliseconds). Handlers are installed only in the main thread, and put back on
    exit."""

    def __init__(self, announce: bool = True):
        self.signum, self.at, self.announce, self.previous = None, 0.0, announce, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            if signum == signal.SIGINT and self.announce:  # someone at a terminal: say that it was heard
                os.write(2, b"\nCtrl-C: stopping at the next safe point (Ctrl-C again to stop at once)\n")
        elif signum == signal.SIGINT and time.monotonic() - self.at > 1.0:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


def run_inputs(cfg) -> dict[str, str | None]:
    """flag -> path of what a run reads, which its --output may not hold or lie in (`checkpoint.check_run_dir`)."""
    return {flag: getattr(cfg, flag[2:].replace("-", "_"), None)
            for flag in ("--model", "--ref-model", "--ref-cache", "--dataset")}


class Objective:
    """What a training command optimises: the loop's one plug-in."""

    unit = "examples"  # what a row is, in log lines
    needs_token_logps = False  # fetch the cache's per-token reference log-probs with the rows

    def step(self, model, batch: batching.Batch):
        """(loss divided by the step's normaliser, {metric: sum over the micro-batch, incl. "tokens"})."""
        raise NotImplementedError

    def finish(self, sums: dict[str, float]) -> dict:
        """The step's metrics from its sums over micro-batches and processes (`sums["examples"]` included)."""
        raise NotImplementedError

    def guard(self, m: dict, total_steps: int) -> tuple[list[str], str | None]:
        """(warning lines, a reason to stop or None) after each step."""
        return [], None


# ----------------------------------------------------------------------------------------------
# Setup


def disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def apply_lora(model, cfg: RunArgs, resume_dir: Path | None):
    try:
        import peft
    except ImportError:
        raise UserError("--lora-r needs peft: pip install 'fastdpo[peft]'") from None
    if resume_dir is not None:
        return peft.PeftModel.from_pretrained(model, str(resume_dir), is_trainable=True)
    targets = cfg.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=targets, task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f"--lora-target-modules {cfg.lora_target_modules!r}: {e}") from None


def prepare_policy(policy, cfg: RunArgs, resume_dir: Path | None):
    """Dropout off, KV cache off, gradient checkpointing and LoRA as asked."""
    if cfg.disable_dropout:
        disable_dropout(policy)
    policy.config.use_cache = False
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.lora_r is not None:
        if cfg.gradient_checkpointing:
            policy.enable_input_require_grads()
        policy = apply_lora(policy, cfg, resume_dir)
    return policy


def build_scheduler(optimizer, cfg: RunArgs, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class Plan:
    """Which rows form each optimizer step (`batching.epoch_plan`), and this process's share of them."""

    def __init__(self, source: batching.Source, cfg: RunArgs, num_processes: int):
        self.source, self.cfg, self.world = source, cfg, num_processes
        self.step_size = cfg.batch_size * cfg.grad_accum * num_processes  # examples per optimizer step
        self.plans: dict[int, list] = {}
        self.steps_per_epoch = len(self.epoch(0))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

    def epoch(self, epoch: int) -> list:
        if epoch not in self.plans:
            c = self.cfg
            self.plans = {epoch: batching.epoch_plan(self.source.lengths, self.source.shard_bounds, self.step_size,
                                                     seed=c.seed, epoch=epoch, shuffle=c.shuffle,
                                                     group_by_length=c.group_by_length)}
        return self.plans[epoch]

    def micro_batches(self, step: int, rank: int, needs_token_logps: bool):
        """[(Batch, weight)] of process `rank` at `step` (0-based). A process without rows gets the first
        micro-batch with weight 0, so that every process takes part in the collectives."""
        step_rows = self.epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]
        micro = batching.micro_batches(step_rows, self.cfg.batch_size)
        mine, weight = micro[rank::self.world], 1.0
        if not mine:
            mine, weight = micro[:1], 0.0
        chosen_tokens = int(self.source.chosen_lengths[step_rows].sum())
        return [(batching.Batch(self.source.fetch(mb, with_token_logps=needs_token_logps), self.source.has_ref,
                                len(step_rows), chosen_tokens), weight) for mb in mine]


# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """A run: accelerate, the run directory, and (after `load_policy`) the policy and its optimizer."""

    def __init__(self, cfg: RunArgs, command: str):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        self.cfg, self.command, self.out = cfg, command, Path(cfg.output)
        self.resume_dir = checkpoint.resolve_resume(cfg.resume, cfg.output)
        if modeling.adapter_base(cfg.model) is not None:
            raise UserError(f"--model {cfg.model} holds a LoRA adapter, which eval and compare load over its base; to "
                            "train on, --resume its run, or train from a model with the adapter merged in")
        device = modeling.process_state().device
        if cfg.attn_implementation == "flex_attention" and device.type == "cpu":
            raise UserError("--attn-implementation flex_attention cannot train on CPU: PyTorch's FlexAttention has no "
                            "CPU backward (precompute and eval can use it); use sdpa, the CPU default, or a GPU")
        if cfg.fsdp_cpu_offload and device.type == "cpu":
            raise UserError("--fsdp-cpu-offload moves a GPU run's weights and optimizer state to CPU memory; this run "
                            "is on CPU already")
        deepspeed = modeling.deepspeed_launched()  # `accelerate launch` with a DeepSpeed config
        if deepspeed and cfg.fsdp:
            raise UserError("--fsdp shards with PyTorch FSDP2, and the accelerate config asks for DeepSpeed; use one")
        AcceleratorState._reset_state()  # a second run in one process may want other mixed precision
        self.tracker = None if cfg.report_to == "none" else cfg.report_to
        self.precision = optim.train_precision(cfg, device)
        # under DeepSpeed, accelerate's bf16 would be DeepSpeed's bf16 weights: bf16-mixed is its torch_autocast
        # instead (`sharding.configure_deepspeed`)
        mixed = "bf16" if self.precision == "bf16-mixed" and not deepspeed else "no"
        self.accelerator = Accelerator(cpu=modeling.use_cpu(), mixed_precision=mixed, log_with=self.tracker,
                                       project_dir=str(self.out))
        if self.accelerator.distributed_type == "FSDP":  # (a str enum)
            raise UserError("accelerate's FSDP plugin (an FSDP `accelerate launch` config) is not how fastdpo shards: "
                            "launch with a plain multi-GPU config (or torchrun) and pass --fsdp")
        self.is_main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.engine = engines.engine_for(cfg, self.accelerator)  # plain, FSDP2 or DeepSpeed
        from .offload import offloading  # torch: not needed to build the CLI

        self.offload = offloading(cfg.activation_offload)  # one per run: its CUDA side stream is reused
        modeling.set_library_progress(cfg.progress and self.is_main)
        self.bar = None  # the progress bar, while `fit` runs
        self.inputs = run_inputs(cfg)
        checkpoint.check_run_dir(cfg.output, self.inputs, cfg.resume, cfg.overwrite)
        if self.resume_dir is not None:
            checkpoint.check_resume(self.resume_dir, cfg, self.accelerator.num_processes)
        if self.is_main:
            print(f"fastdpo {__version__} {command}\n{format_config(cfg)}\n  precision: {self.precision}\n"
                  f"  engine: {self.engine.name} ({self.accelerator.num_processes} process(es))", file=sys.stderr)
            bf16_weights = optim.OPTIMIZERS[cfg.optimizer].weights == "bf16"
            # (LoRA: the adapter peft trains is fp32 whatever --dtype, as under a quantized base)
            if self.precision == "bfloat16" and not bf16_weights and cfg.lora_r is None:
                print(f"warning: --dtype bfloat16 updates bf16 weights with --optimizer {cfg.optimizer}: an update "
                      "smaller than half a weight's bf16 spacing (most of them at DPO learning rates) rounds away; "
                      "--dtype bf16-mixed keeps fp32 weights (the default on GPU), --optimizer adamw-kahan "
                      "compensates", file=sys.stderr)
        set_seed(cfg.seed)
        from .scoring import prepare  # torch: not needed to build the CLI or its --help

        self.setup = prepare(cfg, self.device, modeling.resolve_dtype(self.precision, self.device))
        self.setup.precision = self.precision
        self.tokenizer = self.setup.tokenizer

    def log(self, line: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def check_memory(self, source: batching.Source) -> None:
        """--gpu-memory: refuse, before any weights load, a run whose estimated peak (`fastdpo.plan`) exceeds it."""
        if self.cfg.gpu_memory is None:
            return
        from . import plan

        line = plan.check_run(self.cfg, source, device=self.device.type, precision=self.precision,
                              prefix_sharing=self.setup.layout.prefix_sharing, one_completion=self.command == "sft")
        if self.is_main:
            print(line, file=sys.stderr)

    def load_policy(self) -> None:
        """The policy (from the checkpoint when resuming, except LoRA's base), wrapped to score, and its optimizer."""
        cfg = self.cfg
        # a sharded checkpoint holds no loadable model: its weights are read into the sharded policy (`_start`)
        has_model = self.resume_dir is not None and self.engine.checkpoint_has_model
        weights_from = str(self.resume_dir) if has_model and cfg.lora_r is None else None
        # under --fsdp a fresh adapter too: the sharded checkpoint's weights overwrite it (`_start`)
        policy = prepare_policy(self.setup.load(weights_from), cfg, self.resume_dir if has_model else None)
        self.model = self.engine.wrap(self.setup.scorer(policy), cfg, self.device, self.precision)
        self.model.train()
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3: numel 0
        self.setup.print_notes(self.is_main)

    def fit(self, source: batching.Source, objective: Objective) -> dict:
        """Train until --max-steps (or --epochs); save the model; return the last step's metrics. SIGTERM or Ctrl-C:
        a checkpoint at the end of the step, then `Interrupted` (every process stops at the same step)."""
        import torch

        cfg, acc, engine = self.cfg, self.accelerator, self.engine
        with self._running() as stop:
            plan = Plan(source, cfg, acc.num_processes)
            step = self._start(plan, source, objective)
            state = self.state  # bad-step counts, last checkpoint, timing
            m: dict = {}
            while step < plan.total_steps:
                t0 = time.perf_counter()
                micro = plan.micro_batches(step, acc.process_index, objective.needs_token_logps)  # fetch
                sums: dict = {}
                for j, (batch, weight) in enumerate(micro):
                    # gradients are reduced over processes only at the last micro-batch of the step
                    with engine.grad_sync(self.model, j == len(micro) - 1), acc.autocast(), self.offload:
                        loss, stats = objective.step(self.model, batch)  # forward + loss
                        # x processes: DDP averages gradients over processes, each holds a share of the step
                        engine.backward(self.model, loss * (weight * acc.num_processes))  # backward
                    stats["examples"] = len(batch.rows["prompt_ids"])
                    for k, v in stats.items():  # on the device: one sync per step, in _reduce
                        v = torch.as_tensor(v, dtype=torch.float64, device=self.device)
                        sums[k] = sums.get(k, 0.0) + v * weight
                # a stop request travels with the step's sums, so that every process stops after the same step
                sums["stop"] = torch.tensor(float(stop.signum is not None), dtype=torch.float64, device=self.device)
                sums = self._reduce(sums)
                stopping = sums.pop("stop") > 0 or (acc.num_processes == 1 and stop.signum is not None)
                finite = all(math.isfinite(v) for v in sums.values())
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = engine.clip_and_step(self.model, self.optimizer, max_norm, finite)  # clip + step
                finite = finite and math.isfinite(grad_norm)
                lr = self._schedule_step(finite, state)
                step += 1
                m = self._metrics(step, plan, objective, sums, grad_norm, lr, time.perf_counter() - t0, state)
                if self._log_step(m, plan, objective, finite):  # log; True: stop early
                    break
                if state["consecutive_bad_steps"] >= cfg.max_bad_steps:
                    self._stop_on_bad_steps(step, state)
                saved = cfg.save_steps and step % cfg.save_steps == 0 and step < plan.total_steps
                if saved:
                    self._save(step, plan, state, m)
                if stopping and step < plan.total_steps:  # (after the last step: the run finishes, as it would)
                    self._stop_on_signal(step, plan, state, m, stop, saved)
            return self._finish(step, source, objective, m, state)

    @contextlib.contextmanager
    def _running(self):
        """SIGTERM and Ctrl-C handled (`StopSignals`) while the run lasts, and OUT's lock released after it."""
        self.lock = None  # claimed in `_start`
        try:
            with StopSignals(announce=self.is_main) as stop:
                yield stop
        finally:
            checkpoint.release_run_dir(self.lock)

    # -- the pieces of a step ------------------------------------------------------------------

    def _reduce(self, sums: dict) -> dict:
        """Sum the step's statistics over processes (same keys everywhere, in sorted order)."""
        import torch

        keys = sorted(sums)
        return dict(zip(keys, self.accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum").tolist()))

    def _schedule_step(self, finite: bool, state: dict) -> float:
        """Count a skipped (non-finite) step; advance the schedule either way; returns the step's learning rate."""
        if finite:
            state["consecutive_bad_steps"] = 0
        else:
            state["bad_steps"] += 1
            state["consecutive_bad_steps"] += 1
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _metrics(self, step, plan, objective, sums, grad_norm, lr, dt, state) -> dict:
        m = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), **objective.finish(dict(sums)),
             "grad_norm": grad_norm, "lr": lr, "step_s": dt, "samples_per_s": sums["examples"] / dt,
             "tokens_per_s": sums["tokens"] / dt,
             "elapsed_s": round(state["elapsed_before"] + time.perf_counter() - state["t_start"], 3),
             "peak_memory_gb": metrics.peak_memory_gb(self.device), "bad_steps": state["bad_steps"]}
        mfu = metrics.mfu(self.n_params, m["tokens_per_s"] / self.accelerator.num_processes,
                          metrics.peak_flops(self.device))
        if mfu is not None:
            m["mfu"] = mfu
        return m

    def _log_step(self, m: dict, plan: Plan, objective: Objective, finite: bool) -> bool:
        """metrics.jsonl, the console line, the tracker and the objective's guard; True to stop the run."""
        step = m["step"]
        if self.is_main:
            record = {**m, "changed": self.changed} if self.changed else m
            self.changed = None  # the options --allow-changes accepted: in the resumed run's first record
            with writing(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if not finite:
                self.log(f"warning: step {step}: non-finite loss or gradient; step skipped "
                         f"({self.state['consecutive_bad_steps']} in a row, {m['bad_steps']} in all)")
            if step % self.cfg.log_every == 0 or step == plan.total_steps or not finite:
                self.log(metrics.format_line(m, plan.total_steps, objective.unit))
            if self.bar is not None:
                self.bar.update(1)
        if self.tracker:
            self.accelerator.log({k: v for k, v in m.items() if k != "step"}, step=step)
        warnings, stop = objective.guard(m, plan.total_steps)
        for line in warnings + ([stop] if stop else []):
            self.log(line)
        return stop is not None

    def _stop_on_bad_steps(self, step: int, state: dict):
        if self.bar is not None:
            self.bar.close()
        last = state["last_checkpoint"]
        where = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
        raise TrainingStopped(f"stopped at step {step}: {state['consecutive_bad_steps']} consecutive steps with a "
                              f"non-finite loss or gradient (--max-bad-steps {self.cfg.max_bad_steps}); {where}")

    def _stop_on_signal(self, step: int, plan: Plan, state: dict, m: dict, stop: StopSignals, saved: bool):
        if not saved:
            self._save(step, plan, state, m, quiet=True)
        if self.bar is not None:
            self.bar.close()
        raise Interrupted(f"stopped by {stop.name} at step {step} of {plan.total_steps}: saved "
                          f"{state['last_checkpoint']}; continue with --resume latest",
                          stop.signum or signal.SIGTERM)

    def data_fingerprint(self, source) -> str | None:
        """What the run trains on, by content (a checkpoint records it: a resume onto other data is refused): the
        cache's fingerprint, or the hash of local data files (computed once); None for Hub data."""
        if not hasattr(self, "_data_fingerprint"):
            manifest = getattr(source, "manifest", None)
            dataset = getattr(self.cfg, "dataset", None)
            if manifest is not None:
                self._data_fingerprint = manifest.fingerprint or None
            elif dataset and Path(dataset).exists():
                from .recipes.precompute import dataset_fingerprint

                self._data_fingerprint = dataset_fingerprint(None, self.cfg)
            else:
                self._data_fingerprint = None
        return self._data_fingerprint

    def _save(self, step: int, plan: Plan, state: dict, m: dict, quiet: bool = False) -> None:
        progress = {"step": step, "epoch": (step - 1) // plan.steps_per_epoch,
                    "steps_into_epoch": (step - 1) % plan.steps_per_epoch + 1, "bad_steps": state["bad_steps"],
                    "consecutive_bad_steps": state["consecutive_bad_steps"], "elapsed_s": m["elapsed_s"],
                    "total_steps": plan.total_steps, "data_fingerprint": self.data_fingerprint(plan.source)}
        state["last_checkpoint"] = checkpoint.save_checkpoint(self.engine, self.model, self.optimizer,
                                                              self.scheduler, self.tokenizer, self.out, progress,
                                                              self.cfg, keep=self.cfg.save_total_limit)
        if not quiet:
            self.log(f"saved {state['last_checkpoint']}")

    # -- start and finish ----------------------------------------------------------------------

    def _start(self, plan: Plan, source, objective: Objective) -> int:
        """Optimizer, schedule, run directory (locked), resume state (`self.state`) and progress bar; returns the
        step."""
        cfg, acc = self.cfg, self.accelerator
        self.optimizer = optim.build_optimizer(self.model.parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, plan.total_steps)
        self.model, self.optimizer = self.engine.prepare(self.model, self.optimizer, cfg, self.precision, self.log)
        if self.resume_dir is not None:  # the run's length and data are known now: refused before anything is written
            checkpoint.check_resume(self.resume_dir, cfg, acc.num_processes, plan.total_steps,
                                    self.data_fingerprint(source))
        # one writer: from here to the end of the run, this command holds OUT
        self.lock = checkpoint.claim_run_dir(acc, cfg.output, self.command, self.inputs, cfg.resume, cfg.overwrite)
        if self.is_main:
            if cfg.overwrite:
                checkpoint.clear_run_dir(self.out)
            checkpoint.sweep_temporaries(self.out)
            atomic_write_json(self.out / "fastdpo_config.json", {"command": self.command, "fastdpo_version":
                                                                 __version__, **to_dict(cfg)})
        state = {"bad_steps": 0, "consecutive_bad_steps": 0, "elapsed_before": 0.0,
                 "last_checkpoint": (checkpoint.list_checkpoints(self.out) or [None])[-1]}
        step, self.changed = 0, None
        if self.resume_dir is not None:
            saved = checkpoint.load_checkpoint(self.engine, self.resume_dir, cfg, self.model, self.optimizer,
                                               self.scheduler, plan.total_steps, self.data_fingerprint(source))
            step, self.changed = saved["step"], saved["changed"] or None
            state.update(bad_steps=saved.get("bad_steps", 0), consecutive_bad_steps=saved.get(
                "consecutive_bad_steps", 0), elapsed_before=saved.get("elapsed_s", 0.0))
            changes = f"; from here with {checkpoint.describe_changes(self.changed)}" if self.changed else ""
            self.log(f"resumed from {self.resume_dir} at step {step}{changes}")
        if self.is_main:
            _truncate_metrics(self.out / "metrics.jsonl", step)  # a fresh run into an old directory starts over
        if self.tracker:
            acc.init_trackers("fastdpo", config={k: str(v) if isinstance(v, list | type(None)) else v
                                                 for k, v in to_dict(cfg).items()})
        self.log(f"{self.command}: {len(source)} {objective.unit}, {plan.step_size} per step ({cfg.batch_size} x "
                 f"{cfg.grad_accum} accumulation x {acc.num_processes} process(es)), {plan.steps_per_epoch} "
                 f"steps/epoch, {plan.total_steps} steps")
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=plan.total_steps, initial=step, unit="step", desc=self.command, dynamic_ncols=True)
        metrics.reset_peak_memory(self.device)
        state["t_start"] = time.perf_counter()
        self.state = state
        return step

    def _finish(self, step: int, source, objective: Objective, m: dict, state: dict) -> dict:
        if self.bar is not None:
            self.bar.close()
        checkpoint.save_pretrained_atomic(self.engine, self.model, self.tokenizer, self.out,
                                          merge_lora=self.cfg.merge_lora)
        if self.is_main:
            atomic_write_json(self.out / f"{self.command}_summary.json", {
                "steps": step, "final": m, "bad_steps": state["bad_steps"], objective.unit: len(source),
                "num_processes": self.accelerator.num_processes})
            self.log(f"{self.command}: {step} steps in {time.perf_counter() - state['t_start']:.1f}s -> {self.out}")
        self._close_trackers()
        self.accelerator.wait_for_everyone()
        return m

    def _close_trackers(self) -> None:
        """Flush and close the trackers (the main process's). Not accelerator.end_training: it also destroys the
        process group, which the last barrier and a sweep's next run still need (the CLI tears it down at exit)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep metrics.jsonl's records of steps <= `step` (a resumed run rewrites what follows)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
