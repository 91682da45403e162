"""The one log-prob function. Precompute, train, eval and SFT all score sequences through it.

A pair batch holds chosen sequences then rejected ones, right-padded:

    input_ids        (2B, L)   prompt + completion, then padding
    attention_mask   (2B, L)
    completion_mask  (2B, L)   True on completion tokens

`LogpsModel(causal_lm)(input_ids, attention_mask, completion_mask)` returns per-token log-probs
(2B, L) in float32, aligned with `input_ids` (entry t scores token t given tokens < t), 0 off the
completion. For Llama/Qwen/Mistral/Gemma-style `*ForCausalLM` the backbone's hidden states go
through `fastdpo.kernels.linear_token_logps`, which projects only completion positions, chunk by
chunk, so the [tokens x vocab] logits never exist in full. Other models take the logits path
(`fastdpo.kernels.token_logps`). Backend `eager` is the classic computation, full logits and
`log_softmax(logits.float()).gather(...)`, kept as the benchmarks' baseline.

It is an `nn.Module` so that accelerate's DDP/FSDP wrappers see the whole computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# Models whose `*ForCausalLM.forward` is `lm_head(backbone(...))`, optionally scaled or soft-capped.
FUSED_HEAD_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi3", "olmo", "olmo2", "olmo3", "cohere", "cohere2", "granite", "granitemoe", "starcoder2",
    "smollm3", "glm", "glm4", "helium", "stablelm",
}


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
    if backbone is None or type(lm_head) is not nn.Linear:  # e.g. a LoRA-wrapped head
        return None
    scale = 1.0
    if getattr(config, "logit_scale", None):  # Cohere: logits * logit_scale
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale = 1.0 / float(config.logits_scaling)
    return HeadSpec(backbone, lm_head, scale, getattr(config, "final_logit_softcapping", None))


def fused_head_note(causal_lm: nn.Module) -> str | None:
    """A one-line note when a model falls back to the logits path, else None."""
    if head_spec(causal_lm) is not None:
        return None
    mt = getattr(getattr(causal_lm, "config", None), "model_type", type(causal_lm).__name__)
    return (f"note: model type {mt!r} is not known to have a plain LM head; scoring through its full logits "
            "(more memory than the fused head)")


def token_logps(causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probs (N, L) float32 of `input_ids` under `causal_lm`, 0 outside `completion_mask`."""
    labels = input_ids[:, 1:]  # (N, L-1): position t predicts token t+1
    mask = completion_mask[:, 1:].bool()
    spec = None if backend == "eager" else head_spec(causal_lm)
    model_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
    if spec is not None:
        hidden = spec.backbone(**model_kwargs).last_hidden_state  # (N, L, H)
        out = kernels.linear_token_logps(hidden[:, :-1], spec.lm_head.weight, labels, mask,
                                         chunk_size=chunk_size, backend=backend, bias=spec.lm_head.bias,
                                         logit_scale=spec.logit_scale, softcap=spec.softcap)
    else:
        logits = causal_lm(**model_kwargs).logits  # (N, L, V)
        out = _logits_to_logps(logits[:, :-1], labels, mask, backend)
    return F.pad(out, (1, 0))  # (N, L): re-align with input_ids


def _logits_to_logps(logits, labels, mask, backend):
    if backend == "eager":  # the classic way, an fp32 copy of the logits: the benchmarks' baseline
        return kernels.token_logps_ref(logits, labels, mask, upcast=True)
    return kernels.token_logps(logits, labels, mask, backend=backend)


def selected_token_logps(causal_lm: nn.Module, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor,
                         rows: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, *,
                         backend: str = "auto", chunk_size: int | None = None) -> torch.Tensor:
    """Log-probs (S,) float32 of `labels[s]` given the hidden state at (`rows[s]`, `positions[s]`).

    For packed and prefix-shared rows (see `fastdpo.packing`), where the token that predicts a label
    is not always the one just before it in the row.
    """
    spec = None if backend == "eager" else head_spec(causal_lm)
    model_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
    ones = torch.ones((1, labels.numel()), dtype=torch.bool, device=labels.device)
    if spec is not None:
        hidden = spec.backbone(**model_kwargs).last_hidden_state  # (N, L, H)
        out = kernels.linear_token_logps(hidden[rows, positions][None], spec.lm_head.weight, labels[None], ones,
                                         chunk_size=chunk_size, backend=backend, bias=spec.lm_head.bias,
                                         logit_scale=spec.logit_scale, softcap=spec.softcap)
    else:
        logits = causal_lm(**model_kwargs).logits  # (N, L, V)
        out = _logits_to_logps(logits[rows, positions][None], labels[None], ones, backend)
    return out[0]


class LogpsModel(nn.Module):
    """Wraps a causal LM so that its forward returns completion log-probs.

    forward(input_ids, attention_mask, completion_mask) -> (N, L) per-token log-probs (padded rows);
    forward(..., position_ids=, score_rows=, score_pos=, score_labels=) -> (S,) for packed rows.
    """

    def __init__(self, causal_lm: nn.Module, backend: str = "auto"):
        super().__init__()
        self.model = causal_lm
        self.backend = backend
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)  # for FSDP auto-wrap

    def forward(self, input_ids, attention_mask, completion_mask=None, position_ids=None, score_rows=None,
                score_pos=None, score_labels=None):
        if score_rows is not None:
            return selected_token_logps(self.model, input_ids, attention_mask, position_ids, score_rows, score_pos,
                                        score_labels, backend=self.backend)
        return token_logps(self.model, input_ids, attention_mask, completion_mask, position_ids=position_ids,
                           backend=self.backend)


# ----------------------------------------------------------------------------------------------
# Batches


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (2B, L) chosen rows, then rejected rows
    attention_mask: torch.Tensor  # (2B, L)
    completion_mask: torch.Tensor  # (2B, L)
    prompt_lens: list[int]
    chosen_lens: list[int]
    rejected_lens: list[int]

    @property
    def num_pairs(self) -> int:
        return len(self.prompt_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device):
        for name in ("input_ids", "attention_mask", "completion_mask"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def pad_sequences(prompts, completions, pad_id: int):
    """Right-padded (N, L) input_ids, attention_mask, completion_mask for prompt+completion rows."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    completion_mask = torch.zeros((n, length), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        lp, lc = len(p), len(c)
        input_ids[i, :lp] = torch.as_tensor(p, dtype=torch.long)
        input_ids[i, lp:lp + lc] = torch.as_tensor(c, dtype=torch.long)
        attention_mask[i, :lp + lc] = 1
        completion_mask[i, lp:lp + lc] = True
    return input_ids, attention_mask, completion_mask


def pad_pairs(prompts, chosens, rejecteds, pad_id: int) -> PairBatch:
    """Right-padded (2B, L) batch of prompt+chosen rows followed by prompt+rejected rows."""
    tensors = pad_sequences(list(prompts) * 2, list(chosens) + list(rejecteds), pad_id)
    return PairBatch(*tensors, [len(p) for p in prompts], [len(c) for c in chosens], [len(r) for r in rejecteds])


@dataclass
class PairScores:
    """Per-token log-probs of a micro-batch's completions, whatever the layout."""

    chosen: torch.Tensor  # (B, Tc) float32, 0 past each completion's end
    chosen_mask: torch.Tensor  # (B, Tc) bool
    rejected: torch.Tensor  # (B, Tr)
    rejected_mask: torch.Tensor  # (B, Tr)
    chosen_lens: list[int]
    rejected_lens: list[int]
    num_tokens: int  # tokens through the model (padding excluded)

    @property
    def num_pairs(self) -> int:
        return len(self.chosen_lens)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen.sum(-1), self.rejected.sum(-1)

    def numpy_rows(self) -> tuple[list, list]:
        """Lists of per-token float32 arrays, one per completion (for the cache)."""
        c, r = self.chosen.detach().float().cpu(), self.rejected.detach().float().cpu()
        return ([c[i, :n].numpy() for i, n in enumerate(self.chosen_lens)],
                [r[i, :n].numpy() for i, n in enumerate(self.rejected_lens)])


def _completion_grid(per_token, starts, lens):
    """(N, L) per-token values -> (N, T) completion values starting at `starts`, and the mask."""
    width = max(lens) if lens else 0
    offsets = torch.arange(width, device=per_token.device)[None]
    mask = offsets < torch.as_tensor(lens, device=per_token.device)[:, None]
    index = (torch.as_tensor(starts, device=per_token.device)[:, None] + offsets).clamp(max=per_token.shape[1] - 1)
    return per_token.gather(1, index) * mask, mask


def score_pairs(model, prompts, chosens, rejecteds, layout, pad_id: int, device, dtype=torch.float32) -> PairScores:
    """Run a `LogpsModel` (or its DDP/FSDP wrapper) on a micro-batch of pairs in the given layout.

    This is the one scoring entry point of precompute, train and eval, so all three see the same
    numbers for the same rows and layout.
    """
    from . import packing

    chosen_lens, rejected_lens = [len(c) for c in chosens], [len(r) for r in rejecteds]
    if layout.padded:
        batch = pad_pairs(prompts, chosens, rejecteds, pad_id).to(device)
        per_token = model(batch.input_ids, batch.attention_mask, batch.completion_mask)  # (2B, L)
        b = batch.num_pairs
        tok_c, mask_c = _completion_grid(per_token[:b], batch.prompt_lens, chosen_lens)
        tok_r, mask_r = _completion_grid(per_token[b:], batch.prompt_lens, rejected_lens)
        return PairScores(tok_c, mask_c, tok_r, mask_r, chosen_lens, rejected_lens, batch.num_tokens)
    rows = packing.pack_pairs(prompts, chosens, rejecteds, layout, pad_id).to(device)
    mask = packing.attention_mask(rows, layout, dtype)
    values = model(rows.input_ids, mask, None, rows.position_ids, rows.src_row, rows.src_pos, rows.labels)  # (S,)
    tok_c, mask_c, tok_r, mask_r = packing.unpack_scores(values, rows, chosen_lens, rejected_lens)
    return PairScores(tok_c, mask_c, tok_r, mask_r, chosen_lens, rejected_lens, rows.num_tokens)


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def score_rows(model, prompts, chosens, rejecteds, batch_size: int, layout, pad_id: int, device,
               on_batch=None) -> tuple[list, list]:
    """Per-token log-probs (lists of float32 arrays) of every pair's completions, without gradients.

    Pairs are scored in length-bucketed batches through `score_pairs`; results come back in input
    order. `on_batch(pairs, tokens)` is called after each batch (progress bars).
    """
    n = len(prompts)
    lengths = [len(prompts[i]) + max(len(chosens[i]), len(rejecteds[i])) for i in range(n)]
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


def split_completions(per_token: torch.Tensor, batch: PairBatch) -> tuple[list, list]:
    """Per-token values (2B, L) -> lists of chosen and rejected completion slices (CPU float32)."""
    per_token = per_token.detach().float().cpu()
    b = batch.num_pairs
    chosen = [per_token[i, p:p + c] for i, (p, c) in enumerate(zip(batch.prompt_lens, batch.chosen_lens))]
    rejected = [per_token[b + i, p:p + r] for i, (p, r) in enumerate(zip(batch.prompt_lens, batch.rejected_lens))]
    return chosen, rejected
