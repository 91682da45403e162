"""`fastdpo train`."""

from ..config import add_arguments as add_config_arguments
from ..config import from_args
from ..train import TrainConfig

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
  fastdpo train --config run.yaml --resume latest
"""

GROUPS = {}
for _group, _names in {
    "data (with --dataset)": ("dataset", "dataset_config", "split", "prompt_column", "chosen_column",
                              "rejected_column", "max_prompt_length", "max_length", "truncation",
                              "assistant_marker", "limit", "strict", "ref_model"),
    "loss": ("loss", "loss_weights", "beta", "label_smoothing", "simpo_gamma", "discopop_tau", "ld_alpha"),
    "optimisation": ("optimizer", "lr", "weight_decay", "momentum", "lr_scheduler", "warmup_steps", "warmup_ratio",
                     "batch_size", "grad_accum", "max_grad_norm", "epochs", "max_steps", "seed", "shuffle",
                     "group_by_length", "disable_dropout", "gradient_checkpointing", "max_bad_steps"),
    "logging and checkpoints": ("log_every", "report_to", "save_steps", "save_total_limit", "resume", "progress"),
    "LoRA (pip install 'fastdpo[peft]')": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                           "merge_lora"),
}.items():
    GROUPS.update(dict.fromkeys(_names, _group))


def _betas(text: str) -> list[float]:
    import argparse

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--beta expects a number or a comma-separated list, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--beta is empty")
    return values


def add_arguments(parser):
    add_config_arguments(parser, TrainConfig, groups=GROUPS)
    for action in parser._actions:  # --beta also takes a list: one run per value (a sweep from one cache)
        if action.dest == "beta":
            action.type = _betas
            action.help = ("KL strength beta (rewards = beta x (policy - reference) log-prob); a comma-separated "
                           "list runs one training per value into OUT/beta-B and plots them together (default: 0.1)")


def run(args):
    from ..train import sweep, train

    betas = getattr(args, "beta", None)
    if isinstance(betas, list):
        args.beta = betas[0]
    config = from_args(TrainConfig, args)
    if isinstance(betas, list) and len(betas) > 1:
        sweep(config, betas)
    else:
        train(config)
    return 0
