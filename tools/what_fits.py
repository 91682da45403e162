"""The README's "what fits" table: `fastdpo plan`'s estimates (not GPU measurements) for four model shapes, three
ways of training, four memory budgets.

    python tools/what_fits.py                      # the markdown table, as in README.md
    python tools/what_fits.py --prompt 1024 --completion 1024

No Hub access is needed: the models' config.json files are written here from their published hyperparameters
(hidden size, layers, heads, KV heads, MLP width, vocabulary, tied embeddings), into a temporary directory, and
`fastdpo.plan` reads only those (it builds the model on the meta device to count its parameters). Each cell is
the largest micro-batch of pairs (prompt + chosen + rejected, the prompt scored once: prefix sharing) whose
estimated peak fits the budget, or "no" when not even one pair does.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from fastdpo import plan

GIB = 2**30

# published hyperparameters (the models' own config.json on the Hub)
MODELS = {
    "Qwen2.5-0.5B": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6),
    "Qwen2.5-1.5B": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=1536,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=1e6),
    "Qwen2.5-7B": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=131072, rope_theta=1e6),
    "Llama-3.1-8B": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=5e5),
}  # fmt: skip

# how each is trained: the `fastdpo train` options the estimate is for (all with gradient checkpointing)
METHODS = {
    "full": dict(gradient_checkpointing=True),  # GPU default: bf16-mixed (fp32 weights, AdamW: 16 bytes/param)
    "LoRA r16": dict(gradient_checkpointing=True, lora_r=16, dtype="bfloat16"),  # bf16 base, fp32 adapter
    "QLoRA r16": dict(gradient_checkpointing=True, lora_r=16, load_in_4bit=True),  # 4-bit NF4 base, bf16 rest
}
FLAGS = {
    "full": "--gradient-checkpointing",
    "LoRA r16": "--lora-r 16 --dtype bfloat16 --gradient-checkpointing",
    "QLoRA r16": "--load-in-4bit --lora-r 16 --gradient-checkpointing",
}
BUDGETS_GIB = [12, 16, 24, 80]


def write_configs(root: str) -> dict[str, str]:
    paths = {}
    for name, config in MODELS.items():
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config, "hidden_act": "silu", "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}, f, indent=2)
        paths[name] = path
    return paths


def table(prompt: int, completion: int) -> str:
    with tempfile.TemporaryDirectory() as root:
        paths = write_configs(root)
        head = " | ".join(f"{b} GiB" for b in BUDGETS_GIB)
        lines = [f"| model | training | peak at batch 1 | {head} |", "|" + " --- |" * (3 + len(BUDGETS_GIB))]
        for name, path in paths.items():
            shape = None
            for method, options in METHODS.items():
                cfg = plan.PlanConfig(model=path, device="cuda", batch_size=1, prompt_length=prompt,
                                      completion_length=completion, **options)  # fmt: skip
                shape = shape or plan.shape(cfg)
                one = plan.estimate(cfg, shape, runtime=plan.RUNTIME_CUDA_GIB * GIB)["total"]
                cells = []
                for budget in BUDGETS_GIB:
                    fit = plan.largest_fit(cfg, shape, budget * GIB, plan.RUNTIME_CUDA_GIB * GIB)["batch_size"]
                    cells.append(str(fit) if fit else "no")
                lines.append(
                    f"| {name} ({shape['params'] / 1e9:.2f}B) | {method} | {one / GIB:.1f} GiB | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per pair")
    p.add_argument("--completion", type=int, default=512, help="tokens per completion (chosen and rejected each)")
    a = p.parse_args()
    print(table(a.prompt, a.completion))
    print()
    for method, flags in FLAGS.items():
        print(
            f"- {method}: `fastdpo plan --model M {flags} --prompt-length {a.prompt} --completion-length "
            f"{a.completion} --gpu-memory 24GiB`"
        )


if __name__ == "__main__":
    main()
