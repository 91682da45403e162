"""`fastdpo sft`: supervised fine-tuning, the stage before preference optimisation.

    fastdpo sft --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --output runs/sft --lr 2e-5
    fastdpo sft --model ./base --dataset pairs.jsonl --output runs/sft     # the chosen answers of a preference set
    fastdpo sft --model /tmp/tiny --dataset sft.jsonl --output /tmp/sft --max-steps 20   # tiny CPU run

Data: a preference set (trains on `chosen`), `prompt`/`completion` columns, a `messages`
conversation (trains on the last, assistant message) or a `text` column (plain language
modelling). The loss is the token-mean negative log-likelihood of the completions over each
optimizer step. The recipe is `train`'s with an `SFTObjective`: same loop, checkpoints, metrics and
scoring path.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import batching, data, loop
from ..config import make, opt


@dataclass
class SFTConfig(data.DataArgs, loop.RunArgs):
    """`fastdpo sft`: supervised fine-tuning on completions."""

    GROUP_TITLES = loop.RunArgs.GROUP_TITLES

    lr: float = opt(2e-5, "peak learning rate", gt=0, group="optimisation")
    completion_column: str = opt("completion", "column holding the target completion (prompt/completion data)",
                                 group="data")
    messages_column: str = opt("messages", "column holding a conversation whose last message is the target",
                               group="data")
    text_column: str = opt("text", "column holding plain text (language modelling on all of it)", group="data")


class SFTObjective(loop.Objective):
    """Token-mean negative log-likelihood of the completion tokens of the whole step."""

    def __init__(self, setup, device):
        self.setup, self.device = setup, device

    def step(self, model, batch: batching.Batch):
        from ..scoring import score_pairs

        rows = batch.rows
        scores = score_pairs(model, rows["prompt_ids"], rows["chosen_ids"], None, self.setup.layout,
                             self.setup.tokenizer.pad_token_id, self.device, self.setup.dtype)
        logps = scores.chosen.sum(-1)  # (N,) summed over each completion
        sums = {"nll": -logps.detach().sum(), "logps": logps.detach().sum(),
                "completion_tokens": scores.chosen_mask.sum(), "tokens": scores.num_tokens}
        return -logps.sum() / batch.step_chosen_tokens, sums

    def finish(self, sums: dict[str, float]) -> dict:
        tokens = sums["completion_tokens"]
        return {"loss": sums["nll"] / max(tokens, 1.0), "logps/chosen": sums["logps"] / max(sums["examples"], 1.0),
                "num_completion_tokens": tokens}


def sft(config: SFTConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo sft`; `fastdpo.sft(model=..., dataset=..., output=...)` works like the CLI."""
    cfg = make(SFTConfig, config, **kwargs)
    trainer = loop.Trainer(cfg, "sft")
    tokenized = data.tokenize_sft_dataset(data.load_source(cfg), trainer.tokenizer, cfg, cfg.completion_column,
                                          cfg.messages_column, cfg.text_column)
    source = batching.DatasetSource(data.keep_rows(tokenized, cfg, trainer.is_main))
    trainer.load_policy()
    return trainer.fit(source, SFTObjective(trainer.setup, trainer.device))
