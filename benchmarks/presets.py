"""Model presets (shapes of real models, random weights) and synthetic preference data for the training benchmarks
(train_runs.py, bench_train.py, bench_fit.py, fit_estimate.py, gpu_check.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

# Model shapes from the models' config.json (random weights: only the shapes matter for speed and memory)
# fmt: off
PRESETS = {
    # the dry run's model: plumbing, not numbers (a CPU step is milliseconds, a worker's start dominates)
    "micro": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, vocab_size=4608, tie_word_embeddings=False,
                  rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=1024),
    # fastdpo.tiny's test Llama (hidden 64, 2 layers) scaled up until a CPU step is not pure overhead, with the LM
    # head's share of the matmul parameters of the real presets (tiny 25%; Qwen2.5-0.5B 28%, Llama-3.2-1B 21%):
    # a 32k vocabulary on this body would make the head 72% of the work and flatter a fused head
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False,
                 rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096),
    # the tiny body with Qwen2.5's 152k vocabulary (tied, as Qwen2.5-0.5B): the peak-memory goal is stated for
    # large vocabularies, where logits dominate; on CPU this is the shape that measures it (the head is then most of
    # the FLOPs, so its throughput ratios say more about the LM head than about a whole model)
    "tiny-152k": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                      rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=131072),
    # The larger shapes of the fit estimate (FIT_ESTIMATE_MODELS), from the config.json of Qwen/Qwen2.5-3B, -7B and
    # -14B and meta-llama/Llama-3.2-3B and Llama-3.1-8B on the Hub; the model cards' parameter counts (3.09B, 7.61B,
    # 14.7B, 3.21B, 8.03B) are what these configs instantiate to
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=131072),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                        rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
}
# The real architectures of the "largest model that fits" estimate (smallest first)
# fmt: on
# Synthetic data: (prompt, completion) mean lengths in tokens; prompts vary +-25%, completions +-50%
DATA = {"short": (64, 128), "long": (512, 64)}


def synthetic_words(n: int, seed: int = 0) -> list[str]:
    """n distinct pronounceable pseudo-words (a BPE tokenizer trained on them makes each one token)."""
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))))
    return sorted(words)


def write_pairs(path: Path, n: int, prompt_len: int, completion_len: int, words: list[str], seed: int = 0) -> None:
    """n standard-format pairs; lengths in words (about tokens), each prompt distinct (its own prefix)."""
    rng = random.Random(seed)

    def text(mean, spread):
        return " ".join(rng.choices(words, k=max(1, round(mean * rng.uniform(1 - spread, 1 + spread)))))

    with open(path, "w") as f:
        for _ in range(n):
            row = {
                "prompt": text(prompt_len, 0.25),
                "chosen": " " + text(completion_len, 0.5),
                "rejected": " " + text(completion_len, 0.5),
            }
            f.write(json.dumps(row) + "\n")


def build_preset(name: str, out: Path, words: list[str], dtype: torch.dtype, device: str) -> str:
    """Save a random-weight model of preset `name` and a tokenizer for `words` into `out`."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdpo.tiny import build_tokenizer

    rng = random.Random(1)
    tokenizer = build_tokenizer([" ".join(rng.choices(words, k=200)) for _ in range(200)], vocab_size=4096)
    kw = dict(PRESETS[name])
    config = AutoConfig.for_model(
        kw.pop("model_type"),
        **kw,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert config.vocab_size > len(tokenizer)  # the preset's vocabulary, not the tokenizer's
    torch.manual_seed(0)
    new_name = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    with torch.device(device):  # on a GPU, initialising a 1.5B model there takes seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, **{"dtype" if new_name else "torch_dtype": dtype})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the workers measure their own memory, but share the device with this process
    return str(out)


def param_counts(model: str) -> tuple[int, int]:
    """(all parameters, those in a matmul per token: all but the input embedding, the LM head counted)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    total = sum(p.numel() for p in m.parameters())  # unique parameters: a tied head is counted once, as embedding
    embed = m.get_input_embeddings().weight.numel()
    return total, total - embed + (m.get_output_embeddings().weight.numel() if m.config.tie_word_embeddings else 0)
