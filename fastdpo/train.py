"""Stage 2: train the policy alone, streaming reference log-probs from the cache.

    fastdpo train --model Qwen/Qwen2.5-0.5B-Instruct --ref-cache cache/uf-qwen05 --output runs/dpo \\
        --beta 0.1 --lr 5e-7 --batch-size 8 --grad-accum 4 --save-steps 500
    fastdpo train --model ./sft --dataset pairs.jsonl --ref-model ./sft --output runs/live   # classic two-model
    fastdpo train --model ./sft --dataset pairs.jsonl --loss simpo --beta 2 --output runs/simpo  # reference-free
    fastdpo train --model /tmp/tiny --ref-cache /tmp/cache --output /tmp/run --max-steps 4   # tiny CPU run

Per optimizer step: the epoch plan (`batching.epoch_plan`) gives the step's pairs (batch x
accumulation x processes); each process takes its micro-batches, scores chosen and rejected in one
forward through `LogpsModel` (padded, packed or prefix-shared: `fastdpo.packing`), forms per-pair
losses with `losses.preference_loss`, and back-propagates their sum divided by the step's number of
pairs, so accumulation equals one larger batch. Metrics are reduced across processes; only the main
process logs and saves. `run` is the loop, shared with `fastdpo sft` through an objective object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, batching, cache, data, modeling
from .config import PACKED_ROW_HELP, format_config, opt, to_dict
from .errors import TrainingStopped, UserError
from .io import atomic_write_bytes, atomic_write_json, ensure_dir, fsync_dir, writing


@dataclass
class RunArgs:
    """What every training command shares: the model, optimisation, logging, checkpoints, LoRA."""

    model: str | None = opt(None, "policy to train: a local directory or a Hugging Face Hub id", required=True)
    output: str | None = opt(None, "run directory: metrics.jsonl, checkpoints, final model", required=True)
    revision: str | None = opt(None, "model revision on the Hub")
    dtype: str = opt("auto", "float32; bfloat16 weights; or bf16-mixed (fp32 weights, bf16 autocast); "
                     "auto: bfloat16 on GPU, float32 on CPU", choices=["auto", "float32", "bfloat16", "bf16-mixed"])
    trust_remote_code: bool = opt(False, "allow custom model code from the Hub (off: never runs remote code)")
    attn_implementation: str | None = opt(None, "transformers attention implementation (e.g. sdpa, eager)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    # optimisation
    optimizer: str = opt("adamw", "optimizer", choices=["adamw", "sgd"])
    lr: float = opt(1e-6, "peak learning rate")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (SGD)")
    momentum: float = opt(0.0, "SGD momentum")
    lr_scheduler: str = opt("linear", "learning-rate schedule after warm-up", choices=["constant", "linear", "cosine"])
    warmup_steps: int = opt(0, "linear warm-up steps")
    warmup_ratio: float = opt(0.0, "warm-up as a fraction of all steps (used when --warmup-steps is 0)")
    batch_size: int = opt(4, "examples per micro-batch per process (pairs for preference losses)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x processes x accum)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables clipping)")
    epochs: int = opt(1, "passes over the data")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --epochs)")
    seed: int = opt(42, "seed for data order and initialisation")
    shuffle: bool = opt(True, "shuffle shards and rows each epoch (deterministic from --seed and the epoch)")
    group_by_length: bool = opt(True, "batch examples of similar length together to cut padding")
    disable_dropout: bool = opt(True, "turn dropout off in the policy, as TRL does")
    logps_backend: str = opt("auto", "log-prob backend: auto (triton on CUDA, torch elsewhere), triton, torch, "
                             "or eager (full logits, the classic way)",
                             choices=["auto", "triton", "torch", "eager"])
    # logging and checkpoints
    log_every: int = opt(10, "print a metrics line every N steps (metrics.jsonl gets every step)")
    report_to: str = opt("none", "experiment tracker, through accelerate", choices=["none", "tensorboard", "wandb"])
    save_steps: int | None = opt(None, "write OUT/checkpoint-STEP every N steps")
    save_total_limit: int | None = opt(None, "keep only the newest N checkpoints")
    resume: str | None = opt(None, "continue from OUT/checkpoint-STEP, or 'latest' for the newest complete one")
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    progress: bool = opt(True, "show a progress bar with ETA")
    # LoRA (needs the peft extra)
    lora_r: int | None = opt(None, "LoRA rank; enables LoRA through peft")
    lora_alpha: float = opt(16.0, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "comma-separated module names, or all-linear")
    merge_lora: bool = opt(False, "save the merged model instead of the adapter")

    def check_run_args(self):
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{'--' + name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "save_steps", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{'--' + name.replace('_', '-')} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError("--lr must be a positive number")
        if self.max_grad_norm < 0 or self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("--max-grad-norm and --warmup-steps must be >= 0, --warmup-ratio in [0, 1)")
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError("--lora-r must be at least 1")
        if self.merge_lora and self.lora_r is None:
            raise ValueError("--merge-lora needs --lora-r")


@dataclass
class TrainConfig(data.DataArgs, RunArgs):
    """`fastdpo train`: preference optimisation of a policy."""

    ref_cache: str | None = opt(None, "reference cache written by `fastdpo precompute`")
    dataset: str | None = opt(None, "preference data, for live-reference or reference-free runs (instead of a cache)")
    ref_model: str | None = opt(None, "live reference model with --dataset (default: a frozen copy of --model)")
    loss: list[str] = opt(None, "loss type(s), comma-separated for a mixture (e.g. sigmoid,sft)",
                          default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = opt(None, "mixture weights, one per --loss (default: all 1)")
    beta: float = opt(0.1, "KL strength beta (rewards = beta x (policy - reference) log-prob)")
    label_smoothing: float = opt(0.0, "label smoothing eps (conservative DPO, robust, exo_pair, aot, simpo)")
    simpo_gamma: float = opt(0.5, "SimPO target margin gamma")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau")
    ld_alpha: float | None = opt(None, "LD-DPO: weight of completion tokens beyond the shorter completion's length")
    packing: bool | None = opt(None, "pack sequences into rows without padding (default: on where exact)")
    prefix_sharing: bool | None = opt(None, "score chosen and rejected after one shared prompt (default: on where "
                                            "exact)")
    max_tokens_per_batch: int | None = opt(None, PACKED_ROW_HELP)
    kl_warn: float | None = opt(1.0, "warn once when the per-token KL estimate to the reference exceeds this")
    early_stop_kl: float | None = opt(None, "stop the run (the model is saved) once the per-token KL estimate "
                                            "exceeds this")

    def __post_init__(self):
        data.DataArgs.__post_init__(self)
        self.check_run_args()
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 2:
            raise ValueError("--max-tokens-per-batch must be at least 2")
        if self.ref_cache and self.dataset:
            raise ValueError("give --ref-cache or --dataset, not both (a cache already holds its data)")
        if not self.ref_cache and not self.dataset:
            raise ValueError("missing data: give --ref-cache CACHE (from fastdpo precompute) or --dataset D")
        if self.ref_model and not self.dataset:
            raise ValueError("--ref-model runs a live reference and needs --dataset")
        from . import losses  # torch: not needed to build the CLI or its --help

        losses.validate_loss_config(self.loss, self.loss_weights, self.beta, self.label_smoothing,
                                    has_reference=True, batch_size=self.batch_size, simpo_gamma=self.simpo_gamma,
                                    discopop_tau=self.discopop_tau, ld_alpha=self.ld_alpha)

    @property
    def needs_reference(self) -> bool:
        from . import losses

        return losses.needs_reference(self.loss)


# ----------------------------------------------------------------------------------------------
# Setup: data source, models, optimizer


def open_source(cfg: TrainConfig, tokenizer, is_main: bool, dtype=None):
    """The rows to train on: the cache's shards, or a dataset tokenized like precompute would."""
    if cfg.ref_cache:
        manifest = cache.load_manifest(cfg.ref_cache)
        theirs, ours = manifest["tokenizer"]["sha256"], modeling.tokenizer_hash(tokenizer)
        if theirs != ours:
            raise UserError(f"tokenizer mismatch: {cfg.model} has tokenizer {ours[:12]} but the cache "
                            f"{cfg.ref_cache} was made with {manifest['model']['name_or_path']}'s tokenizer "
                            f"{theirs[:12]}; precompute the cache with this model's tokenizer")
        weights = modeling.weights_hash(cfg.model, cfg.revision)
        if is_main and weights and manifest["model"].get("weights_sha256") not in (None, weights):
            print(f"warning: {cfg.model}'s weights differ from the cache's reference "
                  f"{manifest['model']['name_or_path']} (fine for a policy that starts elsewhere, but usually a "
                  "mistake)", file=sys.stderr)
        ref_dtype = manifest["settings"].get("resolved_dtype")
        if is_main and dtype is not None and ref_dtype and ref_dtype != str(dtype).replace("torch.", ""):
            print(f"note: the cache was computed in {ref_dtype} and the policy runs in "
                  f"{str(dtype).replace('torch.', '')}; a fresh policy's margin will not start at exactly 0",
                  file=sys.stderr)
        return cache.CacheSource(cfg.ref_cache, manifest)
    ds = data.load_source(cfg)
    rows, skips, stats = data.tokenize_dataset(ds, tokenizer, cfg)
    if is_main and skips:
        print(data.summarise_skips(skips, stats["rows_read"]), file=sys.stderr)
    if len(rows) == 0:
        raise UserError(f"no usable rows in {cfg.dataset}")
    return batching.DatasetSource(rows)


def resolve_train_dtype(cfg: TrainConfig, device):
    """(weights dtype, accelerate mixed_precision)."""
    import torch

    if cfg.dtype == "bf16-mixed":
        return torch.float32, "bf16"
    if cfg.dtype == "auto":
        return modeling.resolve_dtype("auto", device), "no"
    return modeling.resolve_dtype(cfg.dtype, device), "no"


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


def apply_lora(model, cfg: TrainConfig, resume_dir: Path | None):
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


def build_optimizer(params, cfg: TrainConfig):
    import torch

    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------
# One micro-batch


def _padded(lists, device):
    """List of float lists -> (N, T) float32 tensor and its (N, T) mask."""
    import torch

    width = max((len(x) for x in lists), default=0)
    values = torch.zeros((len(lists), width), dtype=torch.float32)
    mask = torch.zeros((len(lists), width), dtype=torch.bool)
    for i, x in enumerate(lists):
        values[i, :len(x)] = torch.as_tensor(x, dtype=torch.float32)
        mask[i, :len(x)] = True
    return values.to(device), mask.to(device)


def sequence_logps(scores, ld_alpha):
    """Per-token scores -> chosen (B,), rejected (B,) sequence log-probs (LD-DPO weighted if asked)."""
    from . import losses

    if ld_alpha is None:
        return scores.sums()
    return losses.ld_logps(scores.chosen, scores.chosen_mask, scores.rejected, scores.rejected_mask, alpha=ld_alpha)


def pair_logps(model, reference, rows, cfg: TrainConfig, layout, pad_id: int, device, dtype):
    """Policy (with grad) and reference log-probs of one micro-batch of pairs.

    `reference(rows) -> PairScores` scores a live reference; cached values are used when the rows
    carry them. Also returns the reference's per-token log-probs (chosen, rejected), aligned with
    the policy's `PairScores`, for the KL estimate (None for reference-free losses).
    """
    import torch

    from . import losses
    from .logps import score_pairs

    scores = score_pairs(model, rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], layout, pad_id, device,
                         dtype)
    policy_c, policy_r = sequence_logps(scores, cfg.ld_alpha)
    ref_c = ref_r = ref_tokens = None
    if cfg.needs_reference:
        if "ref_chosen_logps" in rows:  # from the cache
            tc, mc = _padded(rows["ref_chosen_token_logps"], device)
            tr, mr = _padded(rows["ref_rejected_token_logps"], device)
            ref_tokens = (tc, tr)
            if cfg.ld_alpha is None:
                ref_c = torch.tensor(rows["ref_chosen_logps"], dtype=torch.float32, device=device)
                ref_r = torch.tensor(rows["ref_rejected_logps"], dtype=torch.float32, device=device)
            else:
                ref_c, ref_r = losses.ld_logps(tc, mc, tr, mr, alpha=cfg.ld_alpha)
        else:  # live reference: the same scoring function, no grad
            with torch.no_grad():
                ref_scores = reference(rows)
            ref_c, ref_r = sequence_logps(ref_scores, cfg.ld_alpha)
            ref_tokens = (ref_scores.chosen, ref_scores.rejected)
    return scores, policy_c, policy_r, ref_c, ref_r, ref_tokens


def kl_estimate(scores, ref_tokens):
    """Sum over completion tokens of an estimate of KL(policy || reference), and the token count.

    The dataset's completions stand in for samples of the reference, so the importance-weighted
    E_ref[(p/q) log(p/q)] = KL(p || q) applies per token: w r with r = log p - log q, w = exp(r)
    (r clamped to +-20). Tokens the policy pushed down (the rejected answers) weigh little, as they
    do in the policy's own samples; an unweighted estimate (k1, k3) would be dominated by them.
    """
    total, count = 0.0, 0
    for tok, ref, mask in ((scores.chosen, ref_tokens[0], scores.chosen_mask),
                           (scores.rejected, ref_tokens[1], scores.rejected_mask)):
        r = (tok.detach() - ref).clamp(-20, 20)
        total = total + (r.exp() * r * mask).sum()
        count += int(mask.sum())
    return total, count


def live_reference(ref_model, model, accelerator, cfg: TrainConfig, layout, pad_id: int, dtype):
    """The classic method's reference: a second model, or the LoRA policy with its adapter switched off."""
    from .logps import LogpsModel, score_pairs

    def score(causal_lm, rows):
        return score_pairs(LogpsModel(causal_lm, cfg.logps_backend), rows["prompt_ids"], rows["chosen_ids"],
                           rows["rejected_ids"], layout, pad_id, accelerator.device, dtype)

    if ref_model is not None:
        return lambda rows: score(ref_model, rows)
    policy = _unwrapped_policy(accelerator, model)  # LoRA: the base model is the reference

    def without_adapter(rows):
        with policy.disable_adapter():
            return score(policy, rows)

    return without_adapter


def pair_losses(cfg: TrainConfig, scores, pc, pr, rc, rr, sft_num_tokens):
    """Per-pair losses and rewards. With LD-DPO, the sft term of a mixture stays the plain token-mean NLL (TRL)."""
    import torch

    from . import losses

    kw = dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
              discopop_tau=cfg.discopop_tau, sft_num_tokens=sft_num_tokens,
              chosen_lengths=torch.tensor(scores.chosen_lens, device=pc.device, dtype=torch.float32),
              rejected_lengths=torch.tensor(scores.rejected_lens, device=pc.device, dtype=torch.float32))
    names = losses.parse_loss_types(cfg.loss)
    weights = list(cfg.loss_weights or [1.0] * len(names))
    if cfg.ld_alpha is None or "sft" not in names:
        return losses.preference_loss(pc, pr, rc, rr, loss_type=names, loss_weights=weights, **kw)
    w_sft = sum(w for n, w in zip(names, weights) if n == "sft")
    sft, _, _ = losses.preference_loss(scores.chosen.sum(-1), pr, rc, rr, loss_type="sft", loss_weights=[w_sft],
                                       **kw)
    rest = [(n, w) for n, w in zip(names, weights) if n != "sft"]
    if not rest:
        _, rew_c, rew_r = losses.preference_loss(pc, pr, rc, rr, loss_type="sft", **kw)
        return sft, rew_c, rew_r
    per_pair, rew_c, rew_r = losses.preference_loss(pc, pr, rc, rr, loss_type=[n for n, _ in rest],
                                                    loss_weights=[w for _, w in rest], **kw)
    return per_pair + sft, rew_c, rew_r


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _unwrapped_policy(accelerator, model):
    return accelerator.unwrap_model(model).model


def save_pretrained_atomic(accelerator, model, tokenizer, target: Path, merge_lora: bool = False) -> None:
    """save_pretrained into a temporary directory, then move the files in; config.json goes last."""
    policy = _unwrapped_policy(accelerator, model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; keys carry the wrapper's prefix
    if not accelerator.is_main_process:
        return
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(target, cleanup=tmp):
        tmp.mkdir(parents=True)
        if merge_lora and hasattr(policy, "merge_and_unload"):
            import copy

            copy.deepcopy(policy).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        elif hasattr(policy, "peft_config"):
            policy.save_pretrained(tmp, safe_serialization=True)
        else:
            sd = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
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


def save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, out: Path, progress: dict,
                    cfg: TrainConfig) -> Path:
    """OUT/checkpoint-STEP: weights (safetensors), optimizer, scheduler, RNG, data position. Atomic."""
    import torch

    step = progress["step"]
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    save_pretrained_atomic(accelerator, model, tokenizer, tmp, merge_lora=False)
    optim_state = optimizer.state_dict()
    if accelerator.is_main_process:
        with writing(final, cleanup=tmp):
            for name, obj in (("optimizer.pt", optim_state), ("scheduler.pt", scheduler.state_dict()),
                              ("rng_state.pt", _rng_state())):
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
        if cfg.save_total_limit:
            for old in list_checkpoints(out)[:-cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so trainer_state.json exists), oldest first."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        if p.is_dir() and (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        ckpts = list_checkpoints(Path(cfg.output))
        if not ckpts:
            raise UserError(f"--resume latest: no complete checkpoint in {cfg.output}")
        return ckpts[-1]
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {path}: not a complete fastdpo checkpoint (no trainer_state.json)")
    return path


PLAN_KEYS = ("batch_size", "grad_accum", "seed", "shuffle", "group_by_length", "ref_cache", "dataset")


def load_checkpoint(path: Path, cfg: TrainConfig, accelerator, optimizer, scheduler) -> dict:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'trainer_state.json'} is unreadable: {e}") from None
    saved = state.get("config", {})
    changed = [k for k in PLAN_KEYS if saved.get(k) != getattr(cfg, k, None)]
    if state.get("num_processes") != accelerator.num_processes:
        changed.append(f"number of processes ({state.get('num_processes')} -> {accelerator.num_processes})")
    if changed:
        raise UserError(f"--resume {path}: the checkpoint was made with other data settings ({', '.join(changed)}); "
                        "resume with the same settings")
    optimizer.load_state_dict(_load_state(path / "optimizer.pt"))
    scheduler.load_state_dict(_load_state(path / "scheduler.pt"))
    _set_rng_state(_load_state(path / "rng_state.pt"))
    return state


def _load_state(path: Path):
    """fastdpo's own optimizer/scheduler/RNG state: tensors and plain data only (weights_only=True)."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not a fastdpo checkpoint file (only tensors and plain data are loaded, "
                        f"nothing else is unpickled): {first}") from None


# ----------------------------------------------------------------------------------------------
# Metrics


def peak_memory_gb(device) -> float:
    import torch

    if getattr(device, "type", "") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_line(m: dict, total_steps: int, unit: str = "pairs") -> str:
    """One console line per logged step, nanoGPT style."""
    parts = [f"step {m['step']}/{total_steps}", f"loss {m['loss']:.4f}"]
    if "rewards/accuracies" in m:
        parts += [f"acc {m['rewards/accuracies']:.3f}", f"margin {m['rewards/margins']:.4f}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    parts += [f"grad {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}", f"{m['samples_per_s']:.1f} {unit}/s",
              f"{m['tokens_per_s']:.0f} tok/s", f"{m['peak_memory_gb']:.2f} GB"]
    return " | ".join(parts)


def _truncate_metrics(path: Path, step: int) -> None:
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


# ----------------------------------------------------------------------------------------------
# Objectives: what one micro-batch contributes to the loss and to the metrics


class PreferenceObjective:
    """Per-pair preference losses; the step's loss is their mean over all pairs of the step."""

    sums = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "kl_sum", "kl_tokens")
    unit = "pairs"

    def __init__(self, cfg: TrainConfig, reference, layout, pad_id: int, dtype):
        self.cfg, self.reference, self.layout, self.pad_id, self.dtype = cfg, reference, layout, pad_id, dtype
        self.recent_acc: list[float] = []  # the guard's window
        self.acc_warned = self.kl_warned = False

    def micro_step(self, model, rows, step_batch, source, device):
        """(loss summed over this micro-batch's pairs, divided by the step's count; metric sums; count; tokens)."""
        import torch

        n_pairs = len(step_batch)
        chosen_tokens = int(source.chosen_lengths[step_batch].sum())
        scores, pc, pr, rc, rr, ref_tokens = pair_logps(model, self.reference, rows, self.cfg, self.layout,
                                                        self.pad_id, device, self.dtype)
        b = scores.num_pairs
        per_pair, rew_c, rew_r = pair_losses(self.cfg, scores, pc, pr, rc, rr, chosen_tokens * b / n_pairs)
        with torch.no_grad():
            kl, kl_tokens = kl_estimate(scores, ref_tokens) if ref_tokens is not None else (0.0, 0)
            sums = torch.stack([per_pair.sum(), rew_c.sum(), rew_r.sum(), (rew_c > rew_r).float().sum(),
                                (rew_c - rew_r).sum(), pc.sum(), pr.sum(), torch.as_tensor(kl, device=device),
                                torch.tensor(float(kl_tokens), device=device)])
        return per_pair.sum() / n_pairs, sums.detach(), b, scores.num_tokens

    def check(self, m: dict, total_steps: int) -> tuple[list[str], str | None]:
        """The over-optimisation guard: (warning lines, reason to stop or None), from one step's metrics.

        Signs practitioners watch: reward accuracy near 1 early in training (the pairs are separated
        too easily: artefacts, or beta too small) and a policy drifting far from the reference.
        """
        warnings, stop = [], None
        self.recent_acc = (self.recent_acc + [m["rewards/accuracies"]])[-5:]
        early = m["step"] <= max(1, total_steps // 10)
        if early and len(self.recent_acc) == 5 and min(self.recent_acc) >= 0.95 and not self.acc_warned:
            self.acc_warned = True
            warnings.append(f"warning: reward accuracy >= 0.95 for 5 steps by step {m['step']} of {total_steps}: "
                            "the pairs separate very early (look for length or format artefacts; consider a larger "
                            "--beta)")
        kl = m.get("kl")
        if kl is not None and self.cfg.kl_warn is not None and kl > self.cfg.kl_warn and not self.kl_warned:
            self.kl_warned = True
            warnings.append(f"warning: per-token KL to the reference is {kl:.3f} at step {m['step']} (> --kl-warn "
                            f"{self.cfg.kl_warn}): the policy is drifting far; consider a larger --beta or "
                            "--early-stop-kl")
        if kl is not None and self.cfg.early_stop_kl is not None and kl > self.cfg.early_stop_kl:
            stop = f"early stop at step {m['step']}: per-token KL {kl:.3f} > --early-stop-kl {self.cfg.early_stop_kl}"
        return warnings, stop

    def finish(self, sums: list[float], count: float) -> dict:
        *means, kl_sum, kl_tokens = sums
        out = {name: v / max(count, 1.0) for name, v in zip(self.sums, means)}
        if self.cfg.needs_reference:
            out["kl"] = kl_sum / max(kl_tokens, 1.0)  # per token, see kl_estimate
        return out


def make_preference_objective(cfg: TrainConfig, model, accelerator, tokenizer, source, load_kwargs):
    from .packing import resolve_layout

    policy = _unwrapped_policy(accelerator, model)
    layout, notes = resolve_layout(policy.config, load_kwargs["attn_implementation"], cfg.packing,
                                   cfg.prefix_sharing, cfg.max_tokens_per_batch)
    if accelerator.is_main_process:
        for note in notes:
            print(note, file=sys.stderr)
    pad_id = tokenizer.pad_token_id
    reference = None
    if cfg.needs_reference and not source.has_ref:
        ref_model = None
        if cfg.ref_model:
            ref_model = modeling.load_model(cfg.ref_model, **load_kwargs)
        elif cfg.lora_r is None:
            ref_model = modeling.load_model(cfg.model, **load_kwargs)  # a frozen copy of the initial policy
        if ref_model is not None:
            ref_model.eval().requires_grad_(False).to(accelerator.device)
        reference = live_reference(ref_model, model, accelerator, cfg, layout, pad_id, load_kwargs["dtype"])
    return PreferenceObjective(cfg, reference, layout, pad_id, load_kwargs["dtype"])


# ----------------------------------------------------------------------------------------------
# The run


def prepare_policy(policy, cfg: RunArgs, resume_dir: Path | None):
    """Dropout off, cache off, gradient checkpointing and LoRA as asked."""
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


def run(cfg: RunArgs, command: str, open_data, make_objective) -> dict:
    """The training loop shared by `train` and `sft`. Returns the last step's metrics.

    open_data(cfg, tokenizer, is_main, dtype) -> source (`batching.DatasetSource` or `cache.CacheSource`)
    make_objective(cfg, model, accelerator, tokenizer, source, load_kwargs) -> objective
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from .logps import LogpsModel, fused_head_note
    from .packing import attention_for

    out = Path(cfg.output)
    resume_dir = resolve_resume(cfg)
    process_device = modeling.process_state().device
    dtype, mixed = resolve_train_dtype(cfg, process_device)
    if cfg.attn_implementation == "flex_attention" and process_device.type == "cpu":
        raise UserError("--attn-implementation flex_attention cannot train on CPU: PyTorch's FlexAttention has no "
                        "CPU backward (precompute and eval can use it); use sdpa, the CPU default, or a GPU")
    AcceleratorState._reset_state()  # a second run in one process may want other mixed precision
    tracker = None if cfg.report_to == "none" else cfg.report_to
    accelerator = Accelerator(cpu=modeling.use_cpu(), mixed_precision=mixed, log_with=tracker,
                              project_dir=str(out))
    is_main = accelerator.is_main_process
    device = accelerator.device
    if is_main:
        ensure_dir(out)
        print(f"fastdpo {__version__} {command}\n{format_config(cfg)}", file=sys.stderr)
        atomic_write_json(out / "fastdpo_config.json", {"command": command, "fastdpo_version": __version__,
                                                        **to_dict(cfg)})
    set_seed(cfg.seed)

    tokenizer = modeling.load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    source = open_data(cfg, tokenizer, is_main, dtype)
    attention = attention_for(device, cfg.attn_implementation, getattr(cfg, "packing", False),
                              getattr(cfg, "prefix_sharing", False))
    load_kwargs = dict(revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                       attn_implementation=attention)
    weights_from = str(resume_dir) if resume_dir is not None and cfg.lora_r is None else cfg.model
    policy = prepare_policy(modeling.load_model(weights_from, **load_kwargs), cfg, resume_dir)
    note = fused_head_note(policy)
    if note and is_main:
        print(note, file=sys.stderr)
    model = LogpsModel(policy, cfg.logps_backend)
    model.train()

    world = accelerator.num_processes
    step_size = cfg.batch_size * cfg.grad_accum * world  # examples per optimizer step

    def plan(epoch):
        return batching.epoch_plan(source.lengths, source.shard_bounds, step_size, seed=cfg.seed, epoch=epoch,
                                   shuffle=cfg.shuffle, group_by_length=cfg.group_by_length)

    steps_per_epoch = len(plan(0))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective = make_objective(cfg, model, accelerator, tokenizer, source, load_kwargs)

    step, bad_total, bad_run, elapsed_before = 0, 0, 0, 0.0
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, cfg, accelerator, optimizer, scheduler)
        step, bad_total, bad_run = state["step"], state.get("bad_steps", 0), state.get("consecutive_bad_steps", 0)
        elapsed_before = state.get("elapsed_s", 0.0)
        if is_main:
            _truncate_metrics(out / "metrics.jsonl", step)
            print(f"resumed from {resume_dir} at step {step}", file=sys.stderr)
    elif is_main:
        _truncate_metrics(out / "metrics.jsonl", 0)  # a fresh run into an old directory starts its log over
    if tracker:
        accelerator.init_trackers("fastdpo", config={k: str(v) if isinstance(v, list | type(None)) else v
                                                     for k, v in to_dict(cfg).items()})

    if is_main:
        print(f"{command}: {len(source)} {objective.unit}, {step_size} per step ({cfg.batch_size} x {cfg.grad_accum} "
              f"accumulation x {world} process(es)), {steps_per_epoch} steps/epoch, {total_steps} steps",
              file=sys.stderr)
    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc=command, dynamic_ncols=True)
    log = (lambda s: bar.write(s, file=sys.stderr)) if bar is not None else (lambda s: print(s, file=sys.stderr))

    with_token_logps = isinstance(objective, PreferenceObjective)  # per-token reference values: LD-DPO, KL
    plans: dict[int, list] = {}
    metrics = {}
    last_ckpt = (list_checkpoints(out) or [None])[-1]
    n_sums = len(objective.sums)
    t_loop = time.perf_counter()
    while step < total_steps:
        t_step = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan(epoch)}
        step_batch = plans[epoch][k]
        micro = batching.micro_batches(step_batch, cfg.batch_size)
        mine = micro[accelerator.process_index::world]
        weights = [1.0] * len(mine)
        if not mine:  # keep collectives aligned: run a micro-batch with zero weight
            mine, weights = micro[:1], [0.0]
        sums = torch.zeros(n_sums + 2, dtype=torch.float64, device=device)  # objective sums, count, tokens
        for j, (mb, weight) in enumerate(zip(mine, weights)):
            rows = source.fetch(mb, with_token_logps=with_token_logps)
            ctx = accelerator.no_sync(model) if j < len(mine) - 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                loss, micro_sums, count, tokens = objective.micro_step(model, rows, step_batch, source, device)
                # x world: DDP averages gradients over processes, and each holds a share of the step
                accelerator.backward(loss * (weight * world))
            sums[:n_sums] += micro_sums.double() * weight
            sums[n_sums] += count * weight
            sums[n_sums + 1] += tokens * weight
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        sums = accelerator.reduce(sums, reduction="sum")
        finite = math.isfinite(grad_norm) and bool(torch.isfinite(sums).all())
        if finite:
            optimizer.step()
            bad_run = 0
        else:
            bad_total += 1
            bad_run += 1
            if is_main:
                log(f"warning: step {step + 1}: non-finite loss or gradient; step skipped "
                    f"({bad_run} in a row, {bad_total} in all)")
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        s = sums.tolist()
        dt = time.perf_counter() - t_step
        metrics = {"step": step, "epoch": round(step / steps_per_epoch, 4), **objective.finish(s[:n_sums], s[n_sums]),
                   "grad_norm": grad_norm, "lr": lr, "samples_per_s": s[n_sums] / dt,
                   "tokens_per_s": s[n_sums + 1] / dt,
                   "elapsed_s": round(elapsed_before + time.perf_counter() - t_loop, 3),
                   "peak_memory_gb": peak_memory_gb(device), "bad_steps": bad_total}
        if is_main:
            with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if step % cfg.log_every == 0 or step == total_steps or not finite:
                log(format_line(metrics, total_steps, objective.unit))
            if bar is not None:
                bar.update(1)
        if tracker:
            accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        warnings, stop = objective.check(metrics, total_steps) if hasattr(objective, "check") else ([], None)
        if is_main:
            for line in warnings + ([stop] if stop else []):
                log(line)
        if stop:
            break
        if bad_run >= cfg.max_bad_steps:
            if bar is not None:
                bar.close()
            where = f"the last good checkpoint {last_ckpt} is intact" if last_ckpt else "no checkpoint was written"
            raise TrainingStopped(f"stopped at step {step}: {bad_run} consecutive steps with a non-finite loss or "
                                  f"gradient (--max-bad-steps {cfg.max_bad_steps}); {where}")
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            progress_state = {"step": step, "epoch": epoch, "steps_into_epoch": k + 1, "bad_steps": bad_total,
                              "consecutive_bad_steps": bad_run, "elapsed_s": metrics["elapsed_s"]}
            last_ckpt = save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, out, progress_state, cfg)
            if is_main:
                log(f"saved {last_ckpt}")
    if bar is not None:
        bar.close()

    save_pretrained_atomic(accelerator, model, tokenizer, out, merge_lora=cfg.merge_lora)
    if is_main:
        atomic_write_json(out / f"{command}_summary.json", {"steps": step, "final": metrics, "bad_steps": bad_total,
                                                            objective.unit: len(source), "num_processes": world})
        print(f"{command}: {step} steps in {time.perf_counter() - t_loop:.1f}s -> {out}", file=sys.stderr)
    if tracker:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return metrics


def train(config: TrainConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo train`. `fastdpo.train(model=..., ref_cache=..., output=...)` works like the CLI.

    Returns the last step's metrics.
    """
    if config is None:
        config = TrainConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    return run(config, "train", open_source, make_preference_objective)


def sweep(config: TrainConfig, betas: list[float], plot: bool = True) -> list[Path]:
    """Train once per beta from one cache, into OUT/beta-B; then overlay their curves in OUT/sweep/*.png.

    The cache is computed once and each run is policy-only, so a k-point sweep costs k trainings.
    """
    runs = []
    for beta in betas:
        run_dir = Path(config.output) / f"beta-{beta:g}"
        train(dataclasses.replace(config, beta=beta, output=str(run_dir)))
        runs.append(run_dir)
    if plot:
        try:
            from .plot import plot_runs

            plot_runs(runs, Path(config.output) / "sweep")
        except UserError as e:  # e.g. matplotlib is not installed: the runs themselves are done
            print(f"fastdpo train: note: no sweep plot ({e})", file=sys.stderr)
    return runs
