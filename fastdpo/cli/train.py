"""`fastdpo train`."""

from ..recipes.train import TrainConfig

CONFIG = TrainConfig  # the flags and --config keys

DESCRIPTION = """Train a policy with DPO (or another preference loss) from a reference cache written by
`fastdpo precompute`: only the policy is loaded. With --dataset instead of --ref-cache, the reference
runs live every step (the classic two-model method), or not at all for reference-free losses (simpo, sft)."""

EXAMPLES = """examples:
  fastdpo train --model Qwen/Qwen2.5-0.5B-Instruct --ref-cache cache/uf-qwen05 --output runs/dpo \\
      --beta 0.1 --lr 5e-7 --batch-size 8 --grad-accum 4 --save-steps 500
  fastdpo train --model ./sft --ref-cache cache/d --output runs/ipo --loss ipo --beta 0.5
  fastdpo train --model ./sft --ref-cache cache/d --output runs/rpo --loss sigmoid,sft --loss-weights 1,0.2
  fastdpo train --model ./sft --ref-cache cache/d --output runs/lora --lora-r 16 --lr 5e-6
  fastdpo train --model ./sft --ref-cache cache/d --output runs/sweep --beta 0.05,0.1,0.3   # beta sweep + plot
  fastdpo train --model ./sft --dataset pairs.jsonl --ref-model ./sft --output runs/live   # two models
  fastdpo train --model ./sft --dataset pairs.jsonl --loss simpo --beta 2 --output runs/simpo
  fastdpo train --model ./sft --ref-cache cache/d --output runs/kahan --optimizer adamw-kahan   # 10 bytes/param
  torchrun --nproc_per_node 8 -m fastdpo train --fsdp --model ./sft --ref-cache cache/d --output runs/fsdp
  accelerate launch --config_file examples/accelerate/zero3.yaml -m fastdpo train --model ./sft --ref-cache cache/d \\
      --output runs/zero3
  fastdpo train --config run.yaml --resume latest
"""


def run(config):
    from ..recipes.train import train

    train(config)
    return 0
