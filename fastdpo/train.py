"""Stage 2: train the policy alone, streaming reference log-probs from the cache.

    fastdpo train --model Qwen/Qwen2.5-0.5B-Instruct --ref-cache cache/uf-qwen05 --output runs/dpo \\
        --beta 0.1 --lr 5e-7 --batch-size 8 --grad-accum 4 --save-steps 500
    fastdpo train --model ./sft --dataset pairs.jsonl --ref-model ./sft --output runs/live   # classic two-model
    fastdpo train --model ./sft --dataset pairs.jsonl --loss simpo --beta 2 --output runs/simpo  # reference-free
    fastdpo train --model /tmp/tiny --ref-cache /tmp/cache --output /tmp/run --max-steps 4   # tiny CPU run

The recipe: open the cache (or tokenize `--dataset`), load the policy, and hand `loop.Trainer` a
`PreferenceObjective`. Per micro-batch the objective scores chosen and rejected in one forward
(`scoring.score_pairs`: padded, packed or prefix-shared), takes the reference's log-probs from the
cache (or a live reference), forms per-pair losses with `losses.preference_loss`, and returns their
sum divided by the step's number of pairs, so accumulation equals one larger batch.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from . import batching, checkpoint, data, loop, metrics, modeling, quant
from .config import make, opt
from .errors import UserError


@dataclass
class TrainConfig(data.DataArgs, loop.RunArgs, modeling.LayoutArgs):
    """`fastdpo train`: preference optimisation of a policy."""

    GROUP_TITLES = {**loop.RunArgs.GROUP_TITLES, "data": "data (with --dataset)", "model": "policy model"}

    ref_cache: str | None = opt(None, "reference cache written by `fastdpo precompute`")
    dataset: str | None = opt(None, "preference data, for live-reference or reference-free runs (instead of a cache)",
                              group="data")
    ref_model: str | None = opt(None, "live reference model with --dataset (default: a frozen copy of --model)",
                                group="data")
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
    kl_warn: float | None = opt(1.0, "warn once when the per-token KL estimate to the reference exceeds this", ge=0,
                                group="logging and checkpoints")
    early_stop_kl: float | None = opt(None, "stop the run (the model is saved) once the per-token KL estimate "
                                            "exceeds this", gt=0, group="logging and checkpoints")
    allow_reference_mismatch: bool = opt(False, "train from a --ref-cache whose reference was quantized otherwise "
                                                "than --model loads (the step-1 margin it causes is printed)")

    def check(self):
        if self.ref_cache and self.dataset:
            raise UserError("give --ref-cache or --dataset, not both (a cache already holds its data)")
        if not self.ref_cache and not self.dataset:
            raise UserError("missing data: give --ref-cache CACHE (from fastdpo precompute) or --dataset D")
        if self.ref_model and not self.dataset:
            raise UserError("--ref-model runs a live reference and needs --dataset")
        if self.ref_cache:  # the cache holds tokenized data: the data options cannot take effect
            changed = [f.name for f in dataclasses.fields(data.DataArgs)
                       if f.name != "dataset" and getattr(self, f.name) != f.default]
            if changed:
                raise UserError(f"--{changed[0].replace('_', '-')} has no effect with --ref-cache (the cache holds "
                                "its tokenized data); set it when running fastdpo precompute, or train from --dataset")
        from . import losses  # torch: not needed to build the CLI or its --help

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
        from . import losses

        return losses.needs_reference(self.loss)


# ----------------------------------------------------------------------------------------------
# Per-pair losses


def sequence_logps(scores, ld_alpha):
    """Per-token scores -> chosen (B,), rejected (B,) sequence log-probs (LD-DPO weighted if asked)."""
    from . import losses

    if ld_alpha is None:
        return scores.sums()
    return losses.ld_logps(scores.chosen, scores.chosen_mask, scores.rejected, scores.rejected_mask, alpha=ld_alpha)


def pair_losses(cfg: TrainConfig, scores, pc, pr, rc, rr, sft_num_tokens):
    """Per-pair losses and rewards. With LD-DPO, the sft term of a mixture stays the plain token-mean NLL (TRL)."""
    from . import losses

    kw = dict(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
              discopop_tau=cfg.discopop_tau, sft_num_tokens=sft_num_tokens, chosen_lengths=scores.chosen_lens,
              rejected_lengths=scores.rejected_lens)
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


class PreferenceObjective(loop.Objective):
    """Per-pair preference losses; the step's loss is their mean over all pairs of the step."""

    unit = "pairs"

    def __init__(self, cfg: TrainConfig, setup, device, reference=None, fused: bool = False):
        """setup: the policy's `scoring.Setup`; reference(rows) -> PairScores: a live reference (None: the rows
        carry cached values, or the losses need no reference); fused: form the loss inside the fused LM head
        (`scoring.score_pairs_with_loss`, 3 GEMMs for the head instead of 4)."""
        self.cfg, self.setup, self.device, self.reference, self.fused = cfg, setup, device, reference, fused
        self.needs_token_logps = cfg.needs_reference  # per-token reference values: LD-DPO and the KL estimate
        self.recent_acc: list[float] = []  # the guard's window
        self.acc_warned = self.kl_warned = False

    def step(self, model, batch: batching.Batch):
        cfg = self.cfg
        rc = rr = ref_tokens = None
        if cfg.needs_reference:
            rc, rr, ref_tokens = self.reference_logps(batch)
        scores, per_pair, rew_c, rew_r, loss = self.scored(model, batch, rc, rr)
        pc, pr = sequence_logps(scores, cfg.ld_alpha)  # (B,), (B,)
        sides = None if ref_tokens is None else [(scores.chosen, ref_tokens[0], scores.chosen_mask),
                                                 (scores.rejected, ref_tokens[1], scores.rejected_mask)]
        sums = metrics.preference_sums(per_pair, pc, pr, rc, rr, rew_c, rew_r, sides)
        sums["tokens"] = scores.num_tokens
        return loss / batch.step_examples, sums

    def scored(self, model, batch: batching.Batch, rc, rr):
        """(PairScores, per-pair losses, chosen and rejected rewards, summed loss with its graph)."""
        import torch

        from .scoring import score_pairs, score_pairs_with_loss

        rows, cfg, setup = batch.rows, self.cfg, self.setup
        args = (rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], setup.layout,
                setup.tokenizer.pad_token_id, self.device, setup.dtype)

        def losses_of(scores, p0, p1):  # pairs p0..p1-1; the sft term's normaliser is the whole step's
            pc, pr = sequence_logps(scores, cfg.ld_alpha)
            ref_c, ref_r = (None, None) if rc is None else (rc[p0:p1], rr[p0:p1])
            return pair_losses(cfg, scores, pc, pr, ref_c, ref_r,
                               batch.step_chosen_tokens * (p1 - p0) / batch.step_examples)

        if not self.fused:
            scores = score_pairs(model, *args)
            per_pair, rew_c, rew_r = losses_of(scores, 0, scores.num_pairs)
            return scores, per_pair, rew_c, rew_r, per_pair.sum()
        parts = []  # per-pair losses and rewards, detached, chunk by chunk

        def pair_loss(p0, p1, sub):
            per_pair, rew_c, rew_r = losses_of(sub, p0, p1)
            parts.append((per_pair.detach(), rew_c, rew_r))
            return per_pair.sum()

        chunk = _loss_chunk_tokens(model, setup.dtype)
        loss, scores = score_pairs_with_loss(model, *args, pair_loss, chunk)
        per_pair, rew_c, rew_r = (torch.cat([p[i] for p in parts]) for i in range(3))
        return scores, per_pair, rew_c, rew_r, loss

    def reference_logps(self, batch: batching.Batch):
        """Reference (B,) chosen and rejected log-probs, and their per-token values (B, Tc), (B, Tr)."""
        import torch

        from . import losses
        from .scoring import padded

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

    def check(self, m: dict, total_steps: int) -> tuple[list[str], str | None]:
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


def _loss_chunk_tokens(model, dtype) -> int:
    from .kernels import loss_chunk_tokens
    from .scoring import head_rows, head_spec

    policy = getattr(model, "module", model).model  # DDP and DeepSpeed wrap LogpsModel
    return loss_chunk_tokens(head_rows(head_spec(policy)), dtype.itemsize)  # ZeRO-3: lm_head.weight has numel 0


# ----------------------------------------------------------------------------------------------
# The recipe


def open_source(cfg: TrainConfig, trainer: loop.Trainer) -> batching.Source:
    """The rows to train on: the cache's shards, or a dataset tokenized like precompute would."""
    from .cache import open_cache

    if cfg.ref_cache:
        return open_cache(cfg.ref_cache, trainer.setup, policy_weights=cfg.model, is_main=trainer.is_main)
    tokenized = data.tokenize_dataset(data.load_source(cfg), trainer.tokenizer, cfg)
    return batching.DatasetSource(data.keep_rows(tokenized, cfg, trainer.is_main))


def live_reference(cfg: TrainConfig, trainer: loop.Trainer):
    """The classic method's reference: a second model, or the LoRA policy with its adapter switched off."""
    from .scoring import LogpsModel, score_pairs

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
    trainer.load_policy()
    reference = live_reference(cfg, trainer) if cfg.needs_reference and not source.has_ref else None
    from . import losses
    from .scoring import fused_loss_applies

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
            from .plot import plot_runs

            plot_runs([r for r, _ in runs], Path(config.output) / "sweep")
        except UserError as e:  # e.g. matplotlib is not installed: the runs themselves are done
            print(f"fastdpo train: note: no sweep plot ({e})", file=sys.stderr)
    return runs
