"""`fastdpo sft`."""

from ..config import add_arguments as add_config_arguments
from ..config import from_args
from ..sft import SFTConfig
from .train import GROUPS as TRAIN_GROUPS

DESCRIPTION = """Supervised fine-tuning on the chosen answers of a preference set, on prompt/completion
pairs, on conversations (the last assistant message is the target) or on plain text. The loss is the
token-mean negative log-likelihood of the completions. Same streaming, checkpoints, metrics and
log-prob path as `fastdpo train`."""

EXAMPLES = """examples:
  fastdpo sft --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --output runs/sft --lr 2e-5 --epochs 1
  fastdpo sft --model ./base --dataset pairs.jsonl --output runs/sft          # chosen answers of a preference set
  fastdpo sft --model ./base --dataset chat.jsonl --messages-column messages --output runs/sft --lora-r 16
"""

GROUPS = {k: v for k, v in TRAIN_GROUPS.items() if v != "loss"}
GROUPS.update({name: "data" for name in ("dataset", "dataset_config", "split", "prompt_column", "chosen_column",
                                          "rejected_column", "completion_column", "messages_column", "text_column",
                                          "max_prompt_length", "max_length", "truncation", "assistant_marker",
                                          "limit", "strict")})


def add_arguments(parser):
    add_config_arguments(parser, SFTConfig, groups=GROUPS)


def run(args):
    from ..sft import sft

    sft(from_args(SFTConfig, args))
    return 0
