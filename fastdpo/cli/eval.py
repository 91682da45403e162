"""`fastdpo eval`."""

from ..recipes.eval import EvalConfig

CONFIG = EvalConfig  # the flags and --config keys

DESCRIPTION = """Score a policy on a held-out reference cache: implicit-reward accuracy, margins, chosen and
rejected rewards, and a per-token estimate of its KL to the reference on the completions. With
--generate, the policy also answers every prompt and a judge (module:function) scores the answers.
Prints a JSON summary; --output writes the full results (with samples) to a file."""

EXAMPLES = """examples:
  fastdpo precompute --model ./sft --dataset heldout.jsonl --output cache/heldout
  fastdpo eval --model runs/dpo --ref-cache cache/heldout --beta 0.1 --output runs/dpo/eval.json
  fastdpo eval --model runs/dpo --ref-cache cache/heldout --generate --judge fastdpo.demo_task:judge
"""


def run(config):
    from ..recipes.eval import evaluate, summary

    print(summary(evaluate(config)))
    return 0
