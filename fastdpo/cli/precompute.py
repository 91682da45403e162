"""`fastdpo precompute`."""

from ..recipes.precompute import PrecomputeConfig

CONFIG = PrecomputeConfig  # the flags and --config keys

DESCRIPTION = """Run the frozen reference model once over a preference dataset and write, for every pair,
the token ids and the reference log-probs (summed and per token) to Arrow shards plus a manifest.
Re-running the same command into the same --output resumes where it stopped."""

EXAMPLES = """examples:
  fastdpo precompute --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
      --output cache/uf-qwen05 --batch-size 16
  fastdpo precompute --model ./my-sft --dataset pairs.jsonl --output cache/pairs --max-length 2048
  fastdpo precompute --model ./my-sft --dataset Anthropic/hh-rlhf --output cache/hh    # implicit prompts
  accelerate launch --num_processes 8 -m fastdpo precompute --model M --dataset D --output cache/d
"""


def run(config):
    from ..recipes.precompute import precompute

    precompute(config)
    return 0
