"""`fastdpo compare`."""

from ..recipes.compare import CompareConfig

CONFIG = CompareConfig  # the flags and --config keys

DESCRIPTION = """Did training make the model better? Both models (A: --model, B: --baseline) answer the same
held-out prompts (a cache's or a dataset's) with the same generation settings and seed; a judge decides each
pair: a program (--judge module:function), a reward model (--reward-model) or an LLM judge (--llm-judge).
Pairwise judges see both orders; a pair is a win only if both orders agree, else a tie. Prints the win rate
of A over B with its 95% Wilson interval (ties count 1/2), how often the orders disagreed, both models'
answer lengths and a length-balanced win rate; writes OUTPUT/report.json (every pair, both judgements) and
OUTPUT/compare.png. Re-run the same command to continue an interrupted comparison."""

EXAMPLES = """examples:
  fastdpo compare --model fastdpo-demo/dpo --baseline fastdpo-demo/sft --ref-cache fastdpo-demo/cache-eval \\
      --judge fastdpo.demo_task:judge_pair --output vs-sft
  fastdpo compare --model runs/dpo --baseline runs/sft --dataset prompts.jsonl --limit 500 \\
      --reward-model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --output runs/dpo/vs-sft-rm
  fastdpo compare --model runs/dpo --baseline runs/sft --dataset prompts.jsonl \\
      --llm-judge Qwen/Qwen2.5-7B-Instruct --output runs/dpo/vs-sft-llm
"""


def run(config):
    from ..recipes.compare import compare, table

    report = compare(config)
    print(table(report))
    print(f"report: {config.output}/report.json" + (f"; plot: {report['plot']}" if report["plot"] else ""))
    return 0
