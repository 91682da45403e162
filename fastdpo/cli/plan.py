"""`fastdpo plan`."""

from ..plan import PlanConfig

CONFIG = PlanConfig  # the flags and --config keys

DESCRIPTION = """Estimate a training run's peak memory from the model's config.json alone (nothing else is
downloaded or loaded): weights, trained parameters and optimizer state, autocast copies, activations (with or
without gradient checkpointing and offloading), logits (fused head or full), the cache stream and the runtime.
With --gpu-memory, whether it fits and the largest batch and completion length that do (exit 1 when it does not
fit). CPU figures are checked against measured peak RSS; GPU figures are estimates."""

EXAMPLES = """examples:
  fastdpo plan --model Qwen/Qwen2.5-7B --load-in-4bit --lora-r 16 --gradient-checkpointing --gpu-memory 16GiB
  fastdpo plan --model meta-llama/Llama-3.1-8B --lora-r 16 --batch-size 2 --completion-length 1024 --gpu-memory 24GiB
  fastdpo plan --model ./sft --device cpu --batch-size 4 --prompt-length 64 --completion-length 64
"""


def run(config):
    from ..plan import main

    return main(config)
