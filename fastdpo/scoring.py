"""The one scoring path: from a command's model options to a scorer (`prepare`), and per-token log-probs of completions.

`prepare(args, device, dtype)` turns a config's model (and layout) options into a `Setup`:
tokenizer, model config, attention implementation, layout and notes for the user, the same way for
precompute, train, eval and sft; `Setup.load()` loads the weights and `Setup.scorer()` wraps them.

Precompute, train, eval and SFT all score through `LogpsModel` (`score_pairs`, or the training step
with the loss fused into the head), so a fresh policy scores exactly what the reference cache holds
(a margin of 0 up to float rounding). A micro-batch is laid out in rows by `fastdpo.packing`
(padded, packed or prefix-shared; `lay_out_pairs`); every layout names, per completion token s, in
pair order, the row and position of the hidden state that predicts it and its label:

    input_ids, position_ids   (N, L)   the rows
    src_row, src_pos, labels  (S,)     where completion token s is predicted from, and what it is

`LogpsModel(causal_lm)(input_ids, attention_mask, position_ids, src_row, src_pos, labels)` returns
the (S,) float32 log-probs. For Llama/Qwen/Mistral/Gemma-style `*ForCausalLM` the backbone's hidden
states at those positions go through `fastdpo.kernels.linear_token_logps`, chunk by chunk, so the
[tokens x vocab] logits never exist in full; without `labels` it returns those (S, H) hidden states,
and the training step forms its loss inside the head (`kernels.linear_pair_loss`, through
`head_call`). Other models take their logits (`fastdpo.kernels.token_logps` on the selected rows).
Backend `eager` is the classic computation, the model's full logits and
`log_softmax(logits.float()).gather(...)`, kept as the benchmarks' baseline. `LogpsModel` is an
`nn.Module` so that accelerate's DDP wrapper sees the whole computation.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from . import kernels, modeling, packing, quant
from .errors import UserError
from .modeling import LLAMA_LIKE_MODEL_TYPES

# Models whose `*ForCausalLM.forward` is `lm_head(backbone(...))`, optionally scaled or soft-capped
FUSED_HEAD_MODEL_TYPES = LLAMA_LIKE_MODEL_TYPES


@dataclass
class HeadSpec:
    backbone: nn.Module
    lm_head: nn.Linear
    logit_scale: float = 1.0
    softcap: float | None = None


def head_spec(causal_lm: nn.Module) -> HeadSpec | None:
    """How to split a causal LM into backbone and LM head, or None to use its logits."""
    inner = causal_lm.get_base_model() if hasattr(causal_lm, "peft_config") else causal_lm
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES:
        return None
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    lm_head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or not _plain_linear(lm_head):  # e.g. a LoRA-wrapped or quantized head
        return None
    scale = 1.0
    if getattr(config, "logit_scale", None):  # Cohere: logits * logit_scale
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale = 1.0 / float(config.logits_scaling)
    return HeadSpec(backbone, lm_head, scale, getattr(config, "final_logit_softcapping", None))


def _plain_linear(module) -> bool:
    """An `nn.Linear` itself, or as FSDP2 makes it (`FSDPLinear(FSDPModule, nn.Linear)`), not a subclass that
    stores its weight otherwise (a quantized linear)."""
    cls = type(module)
    return cls is nn.Linear or (cls.__bases__ == (FSDPModule, nn.Linear))


def head_call(lm_head: nn.Linear, fn):
    """`fn(hidden, weight, *args, bias=..., **kw)`, a fused-head kernel, as the LM head runs it. A plain head: `fn`
    itself (the caller passes the weight and bias). Where the head is its own FSDP2 unit (or the root's) its weight
    is a shard until that unit's hooks gather it, and under DeepSpeed ZeRO-3 a partition; `sharding` then
    registers `lm_head.fused_forward(hidden, fn)`, which runs `fn(hidden, weight, bias=bias)` through those hooks
    with the gathered weight and bias (and reduce-scatters their gradients as `lm_head(x)` would)."""
    run = getattr(lm_head, "fused_forward", None)
    return fn if run is None else functools.partial(_through_hooks, run, fn)


def head_call_after_forward(lm_head: nn.Linear, fn):
    """`head_call` for a call after the model's forward (the training step's fused loss): where the head belongs
    to the FSDP2 root unit, gathered only inside the root's hooks, through those (`lm_head.fused_forward_after`)."""
    run = getattr(lm_head, "fused_forward_after", None)
    return head_call(lm_head, fn) if run is None else functools.partial(_through_hooks, run, fn)


def _through_hooks(run, fn, hidden, _weight, *args, bias=None, **kw):
    # the caller's weight and bias are shards (or partitions): `run` passes the gathered ones. The other arguments
    # are bound here, not handed to the hooks, which cast every floating input to the compute dtype (FSDP2's
    # mixed precision would round the reference log-probs to bf16)
    return run(hidden, functools.partial(_with_args, fn, args, kw))


def _with_args(fn, args, kw, hidden, weight, bias=None):
    return fn(hidden, weight, *args, bias=bias, **kw)


def head_rows(spec: HeadSpec) -> int:
    """V, the LM head's rows, also while ZeRO-3 holds its weight partitioned (numel 0, the real shape in ds_shape)."""
    w = spec.lm_head.weight
    return getattr(w, "ds_shape", w.shape)[0]


def fused_head_note(causal_lm: nn.Module) -> str | None:
    """A one-line note when a model falls back to the logits path, else None."""
    if head_spec(causal_lm) is not None:
        return None
    mt = getattr(getattr(causal_lm, "config", None), "model_type", type(causal_lm).__name__)
    return (f"note: model type {mt!r} is not known to have a plain LM head; scoring through its full logits "
            "(more memory than the fused head)")


def completion_logps(causal_lm: nn.Module, input_ids, attention_mask, position_ids, src_row, src_pos, labels=None,
                     *, backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """(S,) float32 log-probs of `labels[s]` given the hidden state at (`src_row[s]`, `src_pos[s]`); without
    `labels`, those (S, H) hidden states, for a loss formed inside the fused head (`kernels.linear_pair_loss`)."""
    spec = None if backend == "eager" else head_spec(causal_lm)
    model_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
    if spec is not None:
        hidden = spec.backbone(**model_kwargs).last_hidden_state[src_row, src_pos]  # (N, L, H) -> (S, H)
        if labels is None:
            return hidden
        ones = torch.ones((1, labels.numel()), dtype=torch.bool, device=labels.device)
        head = spec.lm_head
        return head_call(head, kernels.linear_token_logps)(
            hidden[None], head.weight, labels[None], ones, chunk_size, backend, bias=head.bias,
            logit_scale=spec.logit_scale, softcap=spec.softcap)[0]
    if labels is None:
        raise ValueError("hidden states for the fused loss need a model with a plain LM head (`head_spec`)")
    ones = torch.ones((1, labels.numel()), dtype=torch.bool, device=labels.device)
    logits = causal_lm(**model_kwargs).logits  # (N, L, V), in full
    picked = logits[src_row, src_pos][None]  # (1, S, V)
    if backend == "eager":  # the classic way, an fp32 copy of the logits: the benchmarks' baseline
        return kernels.token_logps_ref(picked, labels[None], ones, upcast=True)[0]
    return kernels.token_logps(picked, labels[None], ones, backend=backend)[0]


def fused_loss_applies(causal_lm: nn.Module, backend: str) -> bool:
    """Whether a loss can be formed inside the fused head's chunk loop (`kernels.linear_pair_loss`): a plain
    LM head that trains (a frozen head already costs 2 GEMMs on the log-prob path)."""
    spec = None if backend == "eager" else head_spec(causal_lm)
    return spec is not None and spec.lm_head.weight.requires_grad


class LogpsModel(nn.Module):
    """Wraps a causal LM so that its forward returns completion log-probs, or without `labels` the hidden states
    that predict them (see the module docstring and `completion_logps`)."""

    def __init__(self, causal_lm: nn.Module, backend: str = "auto"):
        super().__init__()
        self.model = causal_lm
        self.backend = backend
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)  # for FSDP auto-wrap

    def forward(self, input_ids, attention_mask, position_ids, src_row, src_pos, labels=None):
        return completion_logps(self.model, input_ids, attention_mask, position_ids, src_row, src_pos, labels,
                                backend=self.backend)


def policy_of(model) -> nn.Module:
    """The causal LM inside a `LogpsModel`, itself perhaps inside a DDP or DeepSpeed wrapper (`.module`)."""
    return getattr(model, "module", model).model


# ----------------------------------------------------------------------------------------------
# Setup: the one path from the model (and layout) options to a scorer, for every command


@dataclass
class Setup:
    """What a command needs before the weights: tokenizer, model config, attention, layout, dtype, notes."""

    args: object  # the command's config (or a modeling.ModelSpec): model, revision, logps_backend, ...
    tokenizer: object
    config: object
    attention: str | None
    layout: packing.Layout
    dtype: object  # torch.dtype of the weights
    notes: list[str] = field(default_factory=list)
    precision: str | None = None  # training: float32, bfloat16 or bf16-mixed (fp32 weights under bf16 autocast)

    def load(self, weights_from: str | None = None, device=None):
        """The causal LM (from `weights_from`, e.g. a checkpoint, else `--model`), on `device` if given."""
        a = self.args
        return modeling.load_model(weights_from or a.model, revision=None if weights_from else a.revision,
                                   dtype=self.dtype, device=device, trust_remote_code=a.trust_remote_code,
                                   attn_implementation=self.attention, quantization=quant.bnb_config(a))

    def scorer(self, causal_lm):
        """`causal_lm` wrapped so that its forward returns completion log-probs (the one scoring path)."""
        note = fused_head_note(causal_lm)
        if note and note not in self.notes:
            self.notes.append(note)
        return LogpsModel(causal_lm, self.args.logps_backend)

    def print_notes(self, is_main: bool = True) -> None:
        if is_main:
            for note in self.notes:
                print(note, file=sys.stderr)
        self.notes.clear()


def prepare(args, device, dtype) -> Setup:
    """Tokenizer, config, attention implementation and layout for `args`, a command's config or a
    `modeling.ModelSpec` (layout: padded for a config without the layout options, sft's and compare's)."""
    tokenizer = modeling.load_tokenizer(args.model, args.revision, args.trust_remote_code)
    config = modeling.load_config(args.model, args.revision, args.trust_remote_code)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"model {args.model} has a vocabulary of {vocab} but its tokenizer has {len(tokenizer)} "
                        "tokens; ids beyond the vocabulary cannot be scored (resize the model's embeddings or use "
                        "the matching tokenizer)")
    if hasattr(args, "packing"):  # the layout options: --packing, --prefix-sharing, --max-tokens-per-batch
        attention = packing.attention_for(device, args.attn_implementation, args.packing, args.prefix_sharing)
        layout, notes = packing.resolve_layout(config, attention, args.packing, args.prefix_sharing,
                                               args.max_tokens_per_batch)
    else:
        attention, notes = args.attn_implementation, []
        layout = packing.Layout(attention=attention or "sdpa")
    if modeling.adapter_base(args.model) is not None:
        notes += [n for n in [quant.adapter_note(args.model, args)] if n]
    return Setup(args, tokenizer, config, attention, layout, dtype, notes)


# ----------------------------------------------------------------------------------------------
# Scoring micro-batches


@dataclass
class PairScores:
    """Per-token log-probs of a micro-batch's completions, whatever the layout."""

    chosen: torch.Tensor  # (B, Tc) float32, 0 past each completion's end
    chosen_mask: torch.Tensor  # (B, Tc) bool
    rejected: torch.Tensor  # (B, Tr); (B, 0) when only one completion per prompt was scored (SFT)
    rejected_mask: torch.Tensor  # (B, Tr)
    num_tokens: int  # tokens through the model (padding excluded)

    @property
    def num_pairs(self) -> int:
        return self.chosen.shape[0]

    @property
    def chosen_lens(self) -> torch.Tensor:  # (B,) float32
        return self.chosen_mask.sum(-1).float()

    @property
    def rejected_lens(self) -> torch.Tensor:
        return self.rejected_mask.sum(-1).float()

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen.sum(-1), self.rejected.sum(-1)

    def numpy_rows(self) -> tuple[list, list]:
        """Lists of per-token float32 arrays, one per completion (for the cache)."""
        out = []
        for values, mask in ((self.chosen, self.chosen_mask), (self.rejected, self.rejected_mask)):
            v, n = values.detach().float().cpu(), mask.sum(-1).tolist()
            out.append([v[i, :k].numpy() for i, k in enumerate(n)])
        return out[0], out[1]


def lay_out_pairs(prompts, chosens, rejecteds, layout, pad_id: int, device, dtype):
    """A micro-batch laid out as `layout` says, on `device`: (PackedRows, its attention mask, per pair (chosen,
    rejected) token counts). `rejecteds=None`: one completion per prompt (SFT); `dtype` is the model's, for
    additive masks."""
    rows = packing.lay_out(prompts, chosens, rejecteds, layout, pad_id).to(device)
    rejected_lens = [len(r) for r in rejecteds] if rejecteds is not None else [0] * len(chosens)
    return rows, packing.attention_mask(rows, layout, dtype), list(zip([len(c) for c in chosens], rejected_lens))


def score_pairs(model, prompts, chosens, rejecteds, layout, pad_id: int, device, dtype=torch.float32) -> PairScores:
    """Run a `LogpsModel` (or its DDP wrapper) on a micro-batch of pairs laid out as `layout` says."""
    rows, mask, lengths = lay_out_pairs(prompts, chosens, rejecteds, layout, pad_id, device, dtype)
    values = model(rows.input_ids, mask, rows.position_ids, rows.src_row, rows.src_pos, rows.labels)  # (S,)
    return PairScores(*kernels.pair_grids(values, lengths), rows.num_tokens)


def score_rows(model, prompts, chosens, rejecteds, batch_size: int, layout, pad_id: int, device,
               on_batch=None) -> tuple[list, list]:
    """Per-token log-probs (lists of float32 arrays) of every pair's completions, without gradients.

    Pairs are scored in length-bucketed batches (`batching.length_buckets`); results come back in
    input order. `on_batch(pairs, tokens)` is called after each batch (progress bars).
    """
    from .batching import length_buckets

    n = len(prompts)
    lengths = np.array([len(prompts[i]) + max(len(chosens[i]), len(rejecteds[i])) for i in range(n)])
    tok_c, tok_r = [None] * n, [None] * n
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for idx in length_buckets(lengths, batch_size):
            scores = score_pairs(model, [prompts[i] for i in idx], [chosens[i] for i in idx],
                                 [rejecteds[i] for i in idx], layout, pad_id, device, dtype)
            c, r = scores.numpy_rows()
            for j, i in enumerate(idx):
                tok_c[i], tok_r[i] = c[j], r[j]
            if on_batch:
                on_batch(len(idx), scores.num_tokens)
    return tok_c, tok_r


def padded(lists, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of per-token floats -> (N, T) float32 tensor, right-padded with 0, and its (N, T) bool mask."""
    width = max((len(x) for x in lists), default=0)
    values = torch.zeros((len(lists), width), dtype=torch.float32)
    mask = torch.zeros((len(lists), width), dtype=torch.bool)
    for i, x in enumerate(lists):
        values[i, :len(x)] = torch.as_tensor(np.asarray(x, dtype=np.float32))
        mask[i, :len(x)] = True
    return values.to(device), mask.to(device)
