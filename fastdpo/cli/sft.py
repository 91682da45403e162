"""`fastdpo sft`."""

from ..recipes.sft import SFTConfig

CONFIG = SFTConfig  # the flags and --config keys

DESCRIPTION = """Supervised fine-tuning on the chosen answers of a preference set, on prompt/completion
pairs, on conversations (the last assistant message is the target) or on plain text. The loss is the
token-mean negative log-likelihood of the completions. Same streaming, checkpoints, metrics and
log-prob path as `fastdpo train`."""

EXAMPLES = """examples:
  fastdpo sft --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --output runs/sft --lr 2e-5 --epochs 1
  fastdpo sft --model ./base --dataset pairs.jsonl --output runs/sft          # chosen answers of a preference set
  fastdpo sft --model ./base --dataset chat.jsonl --messages-column messages --output runs/sft --lora-r 16
"""


def run(config):
    from ..recipes.sft import sft

    sft(config)
    return 0
