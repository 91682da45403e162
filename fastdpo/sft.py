"""`fastdpo sft`: supervised fine-tuning, the stage before preference optimisation.

    fastdpo sft --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --output runs/sft --lr 2e-5
    fastdpo sft --model ./base --dataset pairs.jsonl --output runs/sft     # the chosen answers of a preference set
    fastdpo sft --model /tmp/tiny --dataset sft.jsonl --output /tmp/sft --max-steps 20   # tiny CPU run

Data: a preference set (trains on `chosen`), `prompt`/`completion` columns, a `messages`
conversation (trains on the last, assistant message) or a `text` column (plain language
modelling). The loss is the token-mean negative log-likelihood of the completions over each
optimizer step. Same streaming, checkpoints, metrics and log-prob path as `fastdpo train`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from . import batching, data
from .config import opt
from .errors import UserError
from .train import RunArgs, run


@dataclass
class SFTConfig(data.DataArgs, RunArgs):
    """`fastdpo sft`: supervised fine-tuning on completions."""

    lr: float = opt(2e-5, "peak learning rate")
    completion_column: str = opt("completion", "column holding the target completion (prompt/completion data)")
    messages_column: str = opt("messages", "column holding a conversation whose last message is the target")
    text_column: str = opt("text", "column holding plain text (language modelling on all of it)")

    def __post_init__(self):
        data.DataArgs.__post_init__(self)
        self.check_run_args()


class SFTObjective:
    """Token-mean negative log-likelihood of the completion tokens of the whole step."""

    sums = ("nll", "logps", "completion_tokens")
    unit = "examples"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def micro_step(self, model, rows, step_batch, source, device):
        import torch

        from .logps import pad_sequences

        step_tokens = int(source.chosen_lengths[step_batch].sum())
        input_ids, attention_mask, completion_mask = (
            t.to(device) for t in pad_sequences(rows["prompt_ids"], rows["chosen_ids"], self.pad_id))
        per_token = model(input_ids, attention_mask, completion_mask)  # (N, L) float32, 0 off the completion
        logps = per_token.sum(-1)  # (N,)
        n_tokens = int(completion_mask.sum())
        sums = torch.stack([-logps.detach().sum(), logps.detach().sum(),
                            torch.tensor(float(n_tokens), device=device)])
        return -logps.sum() / step_tokens, sums, len(rows["chosen_ids"]), int(attention_mask.sum())

    def finish(self, sums: list[float], count: float) -> dict:
        nll, logps, tokens = sums
        return {"loss": nll / max(tokens, 1.0), "logps/chosen": logps / max(count, 1.0),
                "num_completion_tokens": tokens}


def open_sft_source(cfg: SFTConfig, tokenizer, is_main: bool, dtype=None):
    ds = data.load_source(cfg)
    rows, skips, stats = data.tokenize_sft_dataset(ds, tokenizer, cfg, cfg.completion_column, cfg.messages_column,
                                                   cfg.text_column)
    if is_main and skips:
        print(data.summarise_skips(skips, stats["rows_read"]), file=sys.stderr)
    if len(rows) == 0:
        raise UserError(f"no usable rows in {cfg.dataset}")
    return batching.DatasetSource(rows)


def sft(config: SFTConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo sft`; `fastdpo.sft(model=..., dataset=..., output=...)` works like the CLI."""
    if config is None:
        config = SFTConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    return run(config, "sft", open_sft_source,
               lambda cfg, model, accelerator, tokenizer, source, load: SFTObjective(tokenizer.pad_token_id))
