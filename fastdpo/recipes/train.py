"""Stage 2: train the policy alone, streaming reference log-probs from the cache.

    fastdpo train --model Qwen/Qwen2.5-0.5B-Instruct --ref-cache cache/uf-qwen05 --output runs/dpo \\
        --beta 0.1 --lr 5e-7 --batch-size 8 --grad-accum 4 --save-steps 500
    fastdpo train --model ./sft --dataset pairs.jsonl --ref-model ./sft --output runs/live   # classic two-model
    fastdpo train --model ./sft --dataset pairs.jsonl --loss simpo --beta 2 --output runs/simpo  # reference-free
    fastdpo train --model /tmp/tiny --ref-cache /tmp/cache --output /tmp/run --max-steps 4   # tiny CPU run

The recipe: open the cache (or tokenize `--dataset`), load the policy, and hand `loop.Trainer` a
`PreferenceObjective`. Per micro-batch the objective takes the reference's log-probs from the cache
(or a live reference), lays chosen and rejected out in rows (padded, packed or prefix-shared), runs
the backbone once, and forms the loss (`pair_loss`, over `losses.preference_loss`) inside the fused
LM head (`kernels.linear_pair_loss`; or from the log-probs, for a frozen head); it returns the sum
divided by the step's number of pairs, so accumulation equals one larger batch.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import batching, checkpoint, data, loop, metrics, modeling, optim, quant
from ..config import check_fields, make, opt
from ..errors import UserError


@dataclass
class TrainConfig:
    """`fastdpo train`: preference optimisation of a policy. Every option of the command is declared here, with its
    default and help; the flags are generated from these fields. The model, run and data fields are copies of sft's
    and precompute's (tests/test_config.py keeps the copies equal); their order is the saved config's."""

    GROUP_TITLES = {"lora": "LoRA (pip install 'fastdpo[peft]')", "data": "data (with --dataset)",
                    "model": "policy model"}

    # -- layout --
    packing: bool | None = opt(None, "pack sequences into rows without padding (default: on where exact)",
                               group="layout")
    prefix_sharing: bool | None = opt(None, "score chosen and rejected after one shared prompt (default: on where "
                                            "exact)", group="layout")
    max_tokens_per_batch: int | None = opt(None, "cap on a packed row's tokens (default: a whole micro-batch per row "
                                                 "with FlexAttention, the longest sequence's length with "
                                                 "SDPA/eager's dense masks)", ge=2, group="layout")

    # -- model --
    model: str | None = opt(None, "model: a local directory or a Hugging Face Hub id", required=True, group="model")
    revision: str | None = opt(None, "model revision (branch, tag or commit) on the Hub", group="model")
    dtype: str = opt("auto", "float32; bfloat16 weights; float16 (scoring only); bf16-mixed (fp32 weights, bf16 "
                     "autocast; training only); auto: on GPU bf16-mixed to train, bfloat16 to score; float32 on CPU",
                     choices=["auto", "float32", "bfloat16", "float16", "bf16-mixed"], group="model")
    trust_remote_code: bool = opt(False, "allow custom model code from the Hub (off: never runs remote code)",
                                  group="model")
    attn_implementation: str | None = opt(None, "transformers attention implementation (e.g. sdpa, eager, "
                                                "flex_attention; default: flex_attention on CUDA where packing "
                                                "or prefix sharing may be used, else transformers' choice)",
                                          group="model")
    logps_backend: str = opt("auto", "log-prob backend: auto (triton on CUDA, torch elsewhere), triton, torch, or "
                             "eager (full logits, the classic way)", choices=modeling.LOGPS_BACKENDS, group="model")

    # -- quantization --
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

    # -- options --
    output: str | None = opt(None, "run directory: metrics.jsonl, checkpoints, final model", required=True)
    gpu_memory: str | None = opt(None, "memory budget, e.g. 16GiB, 24GB, 80 (GiB): before any weights load, refuse a "
                                 "run whose estimated peak (fastdpo plan; on CPU, peak RSS) exceeds it by over 10%")
    ignore_memory_estimate: bool = opt(False, "train even when the estimate exceeds --gpu-memory (a warning)")

    # -- optimisation --
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory", group="optimisation")
    activation_offload: bool = opt(False, "saved activations wait in (pinned) CPU memory between forward and "
                                          "backward (fastdpo.offload; with --gradient-checkpointing only the "
                                          "layers' inputs)", group="optimisation")
    optimizer: str = opt("adamw", "optimizer (bytes per trained parameter: README, Precision)",
                         choices=list(optim.OPTIMIZERS), group="optimisation")
    lr: float = opt(1e-6, "peak learning rate", gt=0, group="optimisation")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW) or L2 (SGD)", ge=0, group="optimisation")
    momentum: float = opt(0.0, "SGD momentum", ge=0, lt=1, group="optimisation")
    lr_scheduler: str = opt("linear", "learning-rate schedule after warm-up", choices=["constant", "linear", "cosine"],
                            group="optimisation")
    warmup_steps: int = opt(0, "linear warm-up steps", ge=0, group="optimisation")
    warmup_ratio: float = opt(0.0, "warm-up as a fraction of all steps (used when --warmup-steps is 0)", ge=0, lt=1,
                              group="optimisation")
    batch_size: int = opt(4, "examples per micro-batch per process (pairs for preference losses)", ge=1,
                          group="optimisation")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x processes x accum)", ge=1,
                          group="optimisation")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables clipping)", ge=0, group="optimisation")
    epochs: int = opt(1, "passes over the data", ge=1, group="optimisation")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --epochs)", ge=1,
                                group="optimisation")
    seed: int = opt(42, "seed for data order and initialisation", ge=0, le=2**32 - 1, group="optimisation")
    shuffle: bool = opt(True, "shuffle shards and rows each epoch (deterministic from --seed and the epoch)",
                        group="optimisation")
    group_by_length: bool = opt(True, "batch examples of similar length together to cut padding",
                                group="optimisation")
    disable_dropout: bool = opt(True, "turn dropout off in the policy, as TRL does", group="optimisation")
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a non-finite loss or gradient", ge=1,
                             group="optimisation")

    # -- logging and checkpoints --
    log_every: int = opt(10, "print a metrics line every N steps (metrics.jsonl gets every step)", ge=1,
                         group="logging and checkpoints")
    report_to: str = opt("none", "experiment tracker, through accelerate", choices=["none", "tensorboard", "wandb"],
                         group="logging and checkpoints")
    save_steps: int | None = opt(None, "write OUT/checkpoint-STEP every N steps", ge=1, group="logging and checkpoints")
    save_total_limit: int | None = opt(None, "keep only the newest N checkpoints", ge=1,
                                       group="logging and checkpoints")
    resume: str | None = opt(None, "continue from OUT/checkpoint-STEP, or 'latest' for the newest complete one",
                             group="logging and checkpoints")
    allow_changes: bool = opt(False, "with --resume: train on with options that differ from the checkpoint's (loss, "
                                     "beta, lr, schedule, ...; README: Reliability), from the next step; "
                                     "metrics.jsonl records the change", group="logging and checkpoints")
    progress: bool = opt(True, "show a progress bar with ETA", group="logging and checkpoints")
    overwrite: bool = opt(False, "start over in an --output that holds a run (its checkpoints, logs and model are "
                                 "removed)", group="logging and checkpoints")

    # -- distributed --
    fsdp: bool = opt(False, "shard weights, gradients and optimizer state over processes with PyTorch FSDP2 "
                            "(fully_shard per decoder layer)", group="distributed")
    fsdp_lm_head: str = opt("own", "the LM head as its own FSDP unit (gathered only around the head) or in the root "
                                   "unit", choices=["own", "root"], group="distributed")
    fsdp_reshard_after_forward: bool = opt(True, "free each unit's gathered weights after its forward and gather "
                                                 "again for backward (less memory, more communication)",
                                           group="distributed")
    fsdp_cpu_offload: bool = opt(False, "keep weights, gradients and optimizer state in CPU memory (GPU only; the "
                                        "optimizer step runs on CPU)", group="distributed")

    # -- lora --
    lora_r: int | None = opt(None, "LoRA rank; enables LoRA through peft", ge=1, group="lora")
    lora_alpha: float = opt(16.0, "LoRA alpha", gt=0, group="lora")
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1, group="lora")
    lora_target_modules: str = opt("all-linear", "comma-separated module names, or all-linear", group="lora")
    merge_lora: bool = opt(False, "save the merged model instead of the adapter", group="lora")

    # -- data --
    dataset: str | None = opt(None, "preference data, for live-reference or reference-free runs (instead of a cache)",
                              group="data")
    dataset_config: str | None = opt(None, "Hub dataset configuration name", group="data")
    split: str = opt("train", "dataset split to read", group="data")
    prompt_column: str = opt("prompt", "column holding the prompt (absent: extracted from chosen/rejected)",
                             group="data")
    chosen_column: str = opt("chosen", "column holding the preferred completion", group="data")
    rejected_column: str = opt("rejected", "column holding the dispreferred completion", group="data")
    max_prompt_length: int | None = opt(512, "cap on prompt tokens (none: no cap)", ge=1, group="data")
    max_length: int | None = opt(1024, "cap on prompt+completion tokens; the completion is cut (none: no cap)", ge=2,
                                 group="data")
    truncation: str = opt("keep_end", "which end of a long prompt to keep", choices=["keep_end", "keep_start"],
                          group="data")
    chat_bos: str = opt("template", "conversational rows: 'template' keeps the BOS the chat template renders (as "
                        "apply_chat_template(tokenize=True) does); 'tokenizer' also adds the tokenizer's BOS where "
                        "the template renders none", choices=["template", "tokenizer"], group="data")
    assistant_marker: str = opt("\n\nAssistant:", "implicit-prompt string data: the prompt ends after the last one",
                                group="data")
    limit: int | None = opt(None, "process only the first N rows of the split", ge=1, group="data")
    strict: bool = opt(False, "stop at the first row that would be skipped, naming it", group="data")

    # -- options --
    ref_cache: str | None = opt(None, "reference cache written by `fastdpo precompute`")

    # -- data --
    ref_model: str | None = opt(None, "live reference model with --dataset (default: a frozen copy of --model)",
                                group="data")

    # -- loss --
    loss: list[str] = opt(None, "loss type(s), comma-separated for a mixture (e.g. sigmoid,sft)",
                          default_factory=lambda: ["sigmoid"], group="loss")
    loss_weights: list[float] | None = opt(None, "mixture weights, one per --loss (default: all 1)", ge=0,
                                           group="loss")
    beta: float | list[float] = opt(0.1, "KL strength beta (rewards = beta x (policy - reference) log-prob); a "
                                    "comma-separated list runs one training per value into OUT/beta-B and plots "
                                    "them together", gt=0, group="loss")
    label_smoothing: float = opt(0.0, "label smoothing eps (conservative DPO, robust, exo_pair, aot, simpo)", ge=0,
                                 lt=1, group="loss")
    simpo_gamma: float = opt(0.5, "SimPO target margin gamma", group="loss")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau", gt=0, group="loss")
    ld_alpha: float | None = opt(None, "LD-DPO: weight of completion tokens beyond the shorter completion's length",
                                 ge=0, le=1, group="loss")

    # -- logging and checkpoints --
    kl_warn: float | None = opt(1.0, "warn once when the per-token KL estimate to the reference exceeds this", ge=0,
                                group="logging and checkpoints")
    early_stop_kl: float | None = opt(None, "stop the run (the model is saved) once the per-token KL estimate "
                                            "exceeds this", gt=0, group="logging and checkpoints")
    allow_reference_mismatch: bool = opt(False, "train from a --ref-cache whose reference was quantized otherwise "
                                                "than --model loads (the step-1 margin it causes is printed)")

    def __post_init__(self):
        check_fields(self)
        quant.check_quant_options(self)
        loop.check_run_options(self)
        if self.ref_cache and self.dataset:
            raise UserError("give --ref-cache or --dataset, not both (a cache already holds its data)")
        if not self.ref_cache and not self.dataset:
            raise UserError("missing data: give --ref-cache CACHE (from fastdpo precompute) or --dataset D")
        if self.ref_model and not self.dataset:
            raise UserError("--ref-model runs a live reference and needs --dataset")
        if self.ref_cache:  # the cache holds tokenized data: the data options cannot take effect
            defaults = type(self).__dataclass_fields__
            changed = [n for n in data.DATA_OPTIONS if n != "dataset" and getattr(self, n) != defaults[n].default]
            if changed:
                raise UserError(f"--{changed[0].replace('_', '-')} has no effect with --ref-cache (the cache holds "
                                "its tokenized data); set it when running fastdpo precompute, or train from --dataset")
        from .. import losses  # torch: not needed to build the CLI or its --help

        names = losses.parse_loss_types(self.loss)
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice:  # preference_loss would add the term twice
            raise UserError(f"--loss names {twice} twice; a mixture names each loss once (--loss-weights say how "
                            "much of each)")
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        runs = [sweep_dir(".", b).name for b in betas]
        twice = next((b for b, r in zip(betas, runs) if runs.count(r) > 1), None)
        if twice is not None:  # before anything trains: the second run would find the first's directory
            raise UserError(f"--beta lists {twice:g} twice; a sweep trains each value once (into OUT/beta-{twice:g})")
        for beta in betas:
            try:
                losses.validate_loss_config(self.loss, self.loss_weights, beta, self.label_smoothing,
                                            has_reference=True, batch_size=self.batch_size,
                                            simpo_gamma=self.simpo_gamma, discopop_tau=self.discopop_tau,
                                            ld_alpha=self.ld_alpha)
            except ValueError as e:
                raise UserError(str(e)) from None

    @property
    def needs_reference(self) -> bool:
        from .. import losses

        return losses.needs_reference(self.loss)


# ----------------------------------------------------------------------------------------------
# The loss of a set of pairs


def sequence_logps(scores, ld_alpha):
    """Per-token scores -> chosen (B,), rejected (B,) sequence log-probs (LD-DPO weighted if asked)."""
    from .. import losses

    if ld_alpha is None:
        return scores.sums()
    return losses.ld_logps(scores.chosen, scores.chosen_mask, scores.rejected, scores.rejected_mask, alpha=ld_alpha)


def pair_loss(cfg: TrainConfig, chosen, chosen_mask, rejected, rejected_mask, ref_chosen, ref_rejected, sft_tokens):
    """The summed preference loss of some pairs, and per pair its loss and the chosen and rejected rewards.

    chosen, rejected: (b, T) per-token policy log-probs (0 where the masks are False); ref_chosen, ref_rejected:
    (b,) reference log-probs (None for reference-free losses); sft_tokens: (b,) each pair's share of the step's
    chosen-token count, the sft term's normaliser (TRL's token mean over the whole step). The one loss function
    of training: called on the whole micro-batch, or by the fused head on each chunk of whole pairs
    (`kernels.linear_pair_loss`). With LD-DPO, `ld_pair_loss`.
    """
    from .. import losses

    if cfg.ld_alpha is not None:
        return ld_pair_loss(cfg, chosen, chosen_mask, rejected, rejected_mask, ref_chosen, ref_rejected, sft_tokens)
    names = losses.parse_loss_types(cfg.loss)
    per_pair, rew_c, rew_r = losses.preference_loss(
        chosen.sum(-1), rejected.sum(-1), ref_chosen, ref_rejected, loss_type=names,
        loss_weights=list(cfg.loss_weights or [1.0] * len(names)), beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma, discopop_tau=cfg.discopop_tau,
        sft_num_tokens=sft_tokens.sum(), chosen_lengths=chosen_mask.sum(-1).float(),
        rejected_lengths=rejected_mask.sum(-1).float())
    return per_pair.sum(), per_pair, rew_c, rew_r


def ld_pair_loss(cfg: TrainConfig, chosen, chosen_mask, rejected, rejected_mask, ref_chosen, ref_rejected,
                 sft_tokens):
    """`pair_loss` with LD-DPO's length-desensitised log-probs; the sft term of a mixture stays the plain
    token-mean NLL, as in TRL."""
    from .. import losses

    pc, pr = losses.ld_logps(chosen, chosen_mask, rejected, rejected_mask, alpha=cfg.ld_alpha)
    kw = dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
              discopop_tau=cfg.discopop_tau, sft_num_tokens=sft_tokens.sum(),
              chosen_lengths=chosen_mask.sum(-1).float(), rejected_lengths=rejected_mask.sum(-1).float())
    names = losses.parse_loss_types(cfg.loss)
    weights = list(cfg.loss_weights or [1.0] * len(names))
    rest = [(n, w) for n, w in zip(names, weights) if n != "sft"]
    if rest:
        per_pair, rew_c, rew_r = losses.preference_loss(pc, pr, ref_chosen, ref_rejected,
                                                        loss_type=[n for n, _ in rest],
                                                        loss_weights=[w for _, w in rest], **kw)
    else:  # sft alone: its rewards as preference_loss reports them
        per_pair = 0
        _, rew_c, rew_r = losses.preference_loss(pc, pr, ref_chosen, ref_rejected, loss_type="sft", **kw)
    if "sft" in names:
        w_sft = sum(w for n, w in zip(names, weights) if n == "sft")
        sft, _, _ = losses.preference_loss(chosen.sum(-1), pr, ref_chosen, ref_rejected, loss_type="sft",
                                           loss_weights=[w_sft], **kw)
        per_pair = per_pair + sft
    return per_pair.sum(), per_pair, rew_c, rew_r


class PreferenceObjective(loop.Objective):
    """Per-pair preference losses; the step's loss is their mean over all pairs of the step."""

    unit = "pairs"

    def __init__(self, cfg: TrainConfig, setup, device, reference=None, fused: bool = False):
        """setup: the policy's `scoring.Setup`; reference(rows) -> PairScores: a live reference (None: the rows
        carry cached values, or the losses need no reference); fused: form the loss inside the fused LM head
        (`kernels.linear_pair_loss`, 3 GEMMs for the head instead of 4)."""
        self.cfg, self.setup, self.device, self.reference, self.fused = cfg, setup, device, reference, fused
        self.loss_fn = functools.partial(pair_loss, cfg)  # loss_fn(chosen, mask, rejected, mask, rc, rr, sft)
        self.needs_token_logps = cfg.needs_reference  # per-token reference values: LD-DPO and the KL estimate
        self.recent_acc: list[float] = []  # the guard's window
        self.acc_warned = self.kl_warned = False

    def step(self, model, batch: batching.Batch):
        """One micro-batch: lay out -> backbone -> (fused) head + loss -> metrics. Returns (the loss over the
        step's pair count, per-pair metric sums)."""
        import torch

        from .. import kernels, scoring

        cfg, rows, setup = self.cfg, batch.rows, self.setup
        rc = rr = ref_tokens = None
        if cfg.needs_reference:
            rc, rr, ref_tokens = self.reference_logps(batch)  # (B,), (B,), per-token (B, Tc), (B, Tr)
        n = len(rows["prompt_ids"])
        # (B,) each pair's share of the step's chosen tokens: the sft term's normaliser, whatever the chunking
        sft_tokens = torch.full((n,), batch.step_chosen_tokens / batch.step_examples, device=self.device)
        packed, mask, lengths = scoring.lay_out_pairs(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"],
                                                      setup.layout, setup.tokenizer.pad_token_id, self.device,
                                                      setup.dtype)
        inputs = (packed.input_ids, mask, packed.position_ids, packed.src_row, packed.src_pos)
        if self.fused:  # the hidden states of the scored tokens, then the loss formed inside the LM head
            hidden = model(*inputs)  # (S, H), pair order
            spec = scoring.head_spec(scoring.policy_of(model))
            head = spec.lm_head
            loss, logps, per_pair, rew_c, rew_r = scoring.head_call_after_forward(head, kernels.linear_pair_loss)(
                hidden, head.weight, packed.labels, lengths, self.loss_fn, (rc, rr, sft_tokens), bias=head.bias,
                logit_scale=spec.logit_scale, softcap=spec.softcap, chunk_tokens=self.chunk_tokens(spec),
                backend=cfg.logps_backend)
        else:  # log-probs (a frozen or unfused head, or a loss that couples the pairs), then the loss
            logps = model(*inputs, packed.labels)  # (S,), pair order
            loss, per_pair, rew_c, rew_r = self.loss_fn(*kernels.pair_grids(logps, lengths), rc, rr, sft_tokens)
        scores = scoring.PairScores(*kernels.pair_grids(logps.detach(), lengths), packed.num_tokens)
        pc, pr = sequence_logps(scores, cfg.ld_alpha)  # (B,), (B,)
        sides = None if ref_tokens is None else [(scores.chosen, ref_tokens[0], scores.chosen_mask),
                                                 (scores.rejected, ref_tokens[1], scores.rejected_mask)]
        sums = metrics.preference_sums(per_pair.detach(), pc, pr, rc, rr, rew_c.detach(), rew_r.detach(), sides)
        sums["tokens"] = scores.num_tokens
        return loss / batch.step_examples, sums

    def chunk_tokens(self, spec) -> int:
        """Tokens per fused-loss chunk: a memory budget for the (C, V) logit tile (`kernels.loss_chunk_tokens`)."""
        from ..kernels import loss_chunk_tokens
        from ..scoring import head_rows

        return loss_chunk_tokens(head_rows(spec), self.setup.dtype.itemsize)  # ZeRO-3: lm_head.weight has numel 0

    def reference_logps(self, batch: batching.Batch):
        """Reference (B,) chosen and rejected log-probs, and their per-token values (B, Tc), (B, Tr)."""
        import torch

        from .. import losses
        from ..scoring import padded

        device, rows = self.device, batch.rows
        if not batch.has_ref:  # live reference: the same scoring function, no grad
            with torch.no_grad():
                ref = self.reference(rows)
            return (*sequence_logps(ref, self.cfg.ld_alpha), (ref.chosen, ref.rejected))
        (tc, mc), (tr, mr) = padded(rows["ref_chosen_token_logps"], device), padded(rows["ref_rejected_token_logps"],
                                                                                      device)
        if self.cfg.ld_alpha is not None:
            return (*losses.ld_logps(tc, mc, tr, mr, alpha=self.cfg.ld_alpha), (tc, tr))
        as_tensor = lambda x: torch.tensor(x, dtype=torch.float32, device=device)  # noqa: E731
        return as_tensor(rows["ref_chosen_logps"]), as_tensor(rows["ref_rejected_logps"]), (tc, tr)

    def finish(self, sums: dict[str, float]) -> dict:
        return metrics.preference_means(sums, sums.pop("examples"))

    def guard(self, m: dict, total_steps: int) -> tuple[list[str], str | None]:
        """The over-optimisation guard: (warning lines, reason to stop or None), from one step's metrics.

        Signs practitioners watch: reward accuracy near 1 early in training (the pairs are separated
        too easily: artefacts, or beta too small) and a policy drifting far from the reference.
        """
        warnings, stop = quant.step_one_report(self.cfg, m), None
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


# ----------------------------------------------------------------------------------------------
# The recipe


def open_source(cfg: TrainConfig, trainer: loop.Trainer) -> batching.Source:
    """The rows to train on: the cache's shards, or a dataset tokenized like precompute would."""
    from ..cache import open_cache

    if cfg.ref_cache:
        return open_cache(cfg.ref_cache, trainer.setup, policy_weights=cfg.model, is_main=trainer.is_main)
    tokenized = data.tokenize_dataset(data.load_source(cfg), trainer.tokenizer, cfg)
    return batching.DatasetSource(data.keep_rows(tokenized, cfg, trainer.is_main))


def live_reference(cfg: TrainConfig, trainer: loop.Trainer):
    """The classic method's reference: a second model, or the LoRA policy with its adapter switched off."""
    from ..scoring import LogpsModel, score_pairs

    setup, device = trainer.setup, trainer.device

    def score(logps_model, rows):
        return score_pairs(logps_model, rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], setup.layout,
                           trainer.tokenizer.pad_token_id, device, setup.dtype)

    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:  # it would load partitioned, and no engine would gather it
        raise UserError("a live reference cannot run under DeepSpeed ZeRO-3; write a reference cache first "
                        "(fastdpo precompute) and pass --ref-cache, or use ZeRO-2")
    if cfg.ref_model or cfg.lora_r is None:  # default: a frozen copy of the initial policy
        ref_model = setup.load(cfg.ref_model if cfg.ref_model and cfg.ref_model != cfg.model else None)
        ref_model = LogpsModel(ref_model.eval().requires_grad_(False).to(device), cfg.logps_backend)
        return lambda rows: score(ref_model, rows)
    # LoRA: the base model is the reference, scored through the policy's own scorer (not yet wrapped for DDP;
    # under --fsdp the root unit, whose forward gathers the sharded weights)
    scorer = trainer.model

    def without_adapter(rows):
        with scorer.model.disable_adapter():
            return score(scorer, rows)

    return without_adapter


def train(config: TrainConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo train`. `fastdpo.train(model=..., ref_cache=..., output=...)` works like the CLI.

    Returns the last step's metrics (a beta sweep: the last run's).
    """
    cfg = make(TrainConfig, config, **kwargs)
    if isinstance(cfg.beta, list):
        return sweep(cfg)[-1][1]
    trainer = loop.Trainer(cfg, "train")
    source = open_source(cfg, trainer)
    trainer.check_memory(source)  # before any weights load
    trainer.load_policy()
    reference = live_reference(cfg, trainer) if cfg.needs_reference and not source.has_ref else None
    from .. import losses
    from ..scoring import fused_loss_applies

    # the loss inside the fused head needs per-pair losses; aot's sort couples the pairs of a micro-batch
    fused = fused_loss_applies(trainer.model.model, cfg.logps_backend) and not (
        set(losses.parse_loss_types(cfg.loss)) & losses.BATCH_COUPLED)
    return trainer.fit(source, PreferenceObjective(cfg, trainer.setup, trainer.device, reference, fused))


def sweep_dir(output: str, beta: float) -> Path:
    """Where a sweep trains `beta`: OUT/beta-B."""
    return Path(output) / f"beta-{beta:g}"


def sweep(config: TrainConfig, plot: bool = True) -> list[tuple[Path, dict]]:
    """Train once per beta of `config.beta` from one cache, into OUT/beta-B; then overlay their curves in
    OUT/sweep/*.png. The cache is computed once and each run is policy-only, so k betas cost k trainings."""
    for beta in config.beta:  # every run's directory is checked before the first trains
        checkpoint.check_run_dir(str(sweep_dir(config.output, beta)), loop.run_inputs(config), config.resume,
                                 config.overwrite)
    runs = []
    for beta in config.beta:
        run_dir = sweep_dir(config.output, beta)
        runs.append((run_dir, train(dataclasses.replace(config, beta=beta, output=str(run_dir)))))
    if plot:
        try:
            from ..plot import plot_runs

            plot_runs([r for r, _ in runs], Path(config.output) / "sweep")
        except UserError as e:  # e.g. matplotlib is not installed: the runs themselves are done
            print(f"fastdpo train: note: no sweep plot ({e})", file=sys.stderr)
    return runs
