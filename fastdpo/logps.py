"""The one log-prob function. Precompute, train, eval and SFT all score sequences through it.

A pair batch holds chosen sequences then rejected ones, right-padded:

    input_ids        (2B, L)   prompt + completion, then padding
    attention_mask   (2B, L)
    completion_mask  (2B, L)   True on completion tokens

`LogpsModel(causal_lm)(input_ids, attention_mask, completion_mask)` returns per-token log-probs
(2B, L) in float32, aligned with `input_ids` (entry t scores token t given tokens < t), 0 off the
completion. For Llama/Qwen/Mistral/Gemma-style `*ForCausalLM` the backbone's hidden states go
through `fastdpo.kernels.linear_token_logps`, which projects only completion positions, chunk by
chunk, so the [tokens x vocab] logits never exist in full. Other models take the logits path.

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
    spec = head_spec(causal_lm)
    model_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
    if spec is not None:
        hidden = spec.backbone(**model_kwargs).last_hidden_state  # (N, L, H)
        out = kernels.linear_token_logps(hidden[:, :-1], spec.lm_head.weight, labels, mask,
                                         chunk_size=chunk_size, backend=backend, bias=spec.lm_head.bias,
                                         logit_scale=spec.logit_scale, softcap=spec.softcap)
    else:
        logits = causal_lm(**model_kwargs).logits  # (N, L, V)
        out = kernels.token_logps(logits[:, :-1], labels, mask, backend=backend)
    return F.pad(out, (1, 0))  # (N, L): re-align with input_ids


class LogpsModel(nn.Module):
    """Wraps a causal LM so that its forward returns per-token completion log-probs."""

    def __init__(self, causal_lm: nn.Module, backend: str = "auto"):
        super().__init__()
        self.model = causal_lm
        self.backend = backend
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)  # for FSDP auto-wrap

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None):
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
    plain_chosen_logps: torch.Tensor | None = None  # set by the trainer for an sft term under LD-DPO

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


def split_completions(per_token: torch.Tensor, batch: PairBatch) -> tuple[list, list]:
    """Per-token values (2B, L) -> lists of chosen and rejected completion slices (CPU float32)."""
    per_token = per_token.detach().float().cpu()
    b = batch.num_pairs
    chosen = [per_token[i, p:p + c] for i, (p, c) in enumerate(zip(batch.prompt_lens, batch.chosen_lens))]
    rejected = [per_token[b + i, p:p + r] for i, (p, r) in enumerate(zip(batch.prompt_lens, batch.rejected_lens))]
    return chosen, rejected
