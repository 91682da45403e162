"""Tiny Llama-style models and byte-level BPE tokenizers built locally, with nothing downloaded.

Tests, the demo and the CPU benchmark preset use these. The tokenizer behaves like a real one:
it adds BOS, has EOS/PAD, byte-level BPE (any unicode encodes) and a ChatML chat template.

    python tools/make_tiny_model.py --output /tmp/tiny            # from the command line
    build_tiny_model("/tmp/tiny", texts=["hello world"] * 100)     # from Python
    build_tiny_reward_model("/tmp/tiny-rm", tokenizer)             # a random-weight reward model, same tokenizer
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: What is two plus two?\n\nAssistant: Two plus two is four.",
    "Human: Name a colour.\n\nAssistant: Blue is a colour.",
    "user\nassistant\nsystem\nHello, how are you? I am fine, thank you.",
    "0 1 2 3 4 5 6 7 8 9 10 + - * / = ( ) ? ! . , ; :",
]


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) if texts is not None else []
    tok.train_from_iterator(corpus + DEFAULT_TEXTS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: BOS is prepended by the tokenizer itself.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_model(output: str | os.PathLike, texts: Iterable[str] | None = None, vocab_size: int = 512,
                     seed: int = 0, tokenizer=None, **config_overrides) -> str:
    """Train a tokenizer on `texts`, build a random tiny Llama for it, save both to `output`."""
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(texts, vocab_size=vocab_size)
    return _save_random(LlamaForCausalLM, output, tokenizer, seed, **config_overrides)


def build_tiny_reward_model(output: str | os.PathLike, tokenizer, num_labels: int = 1, seed: int = 0,
                            **config_overrides) -> str:
    """A random tiny `LlamaForSequenceClassification` (a reward model's shape: `num_labels` outputs read at the last
    token) with `tokenizer`, saved to `output`."""
    from transformers import LlamaForSequenceClassification

    return _save_random(LlamaForSequenceClassification, output, tokenizer, seed, num_labels=num_labels,
                        **config_overrides)


def _save_random(model_class, output, tokenizer, seed: int, **config_overrides) -> str:
    import torch

    config = tiny_llama_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return str(output)
