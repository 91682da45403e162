"""The bundled demo task: upper-casing 4-letter words, with a systematic slip that DPO removes.

A prompt asks for a random 4-letter lowercase word in capitals::

    upper: qrva\\n   ->   QRVA          (correct)
                         QRVa          (the slip: the last letter is left lowercase)

The data (``fastdpo/demo_data/``, written by ``tools/make_demo_data.py``) has three splits with
disjoint words:

- ``sft.jsonl`` (prompt/completion): a *noisy* SFT set in which 70% of the targets make the slip.
  A tiny model trained on it learns to copy and capitalise, and greedily makes the slip, because it
  is the majority answer for the last letter.
- ``train.jsonl`` (prompt/chosen/rejected): chosen = correct, rejected = the slip.
- ``eval.jsonl``: the same, on held-out words, for ``preference_accuracy`` and for greedy
  generation judged by :func:`judge`.

DPO only has to move probability between two answers the SFT model already gives (about 30/70 on
the last letter), so a few dozen steps turn greedy accuracy from ~0% to ~100%. chosen and rejected
share every token up to the last letter, so their log-ratio difference is all about that letter.
The task needs every letter as its own token: the tokenizer is byte-level BPE with no merges
(``VOCAB_SIZE`` = 256 bytes + 5 special tokens).

Use::

    from fastdpo import demo_task
    demo_task.build_model("/tmp/demo/base", seed=0)          # tokenizer + random tiny Llama
    demo_task.data_file("sft")                                # path of a bundled split
    demo_task.judge("upper: qrva\\n", "QRVA")                  # True
    demo_task.judge_pair("upper: qrva\\n", "QRVa", "QRVA")     # "b" (fastdpo compare's pairwise judge)
    demo_task.DEMO_RECIPE["dpo"]                              # TrainConfig keyword arguments

This module imports nothing heavy (``fastdpo eval --judge fastdpo.demo_task:judge`` and ``fastdpo compare
--judge fastdpo.demo_task:judge_pair`` load it).

Measured with ``fastdpo.demo.demo`` on a shared 2-core CPU, torch.set_num_threads(1), model/SFT/DPO
seeds 0-4 (held-out words; "before" is the SFT model, "after" the DPO model):

- DEMO_RECIPE (500 held-out pairs): generation accuracy 0-0.8% -> 97-100% (1.000, 0.970, 0.994,
  1.000, 1.000); log p(correct) > log p(slip) 0-0.8% -> 100%; reward accuracy 100% after (ties
  before); 20-25 s in all, SFT 10-13 s of it.
- REDUCED_RECIPE (100 pairs): generation 0-1% -> 99-100%; 20-26 s.
- Tried and rejected: words of 3-6 letters (copying is not learned in a few hundred steps; DPO then
  breaks the model); 150-200 SFT steps (the slip is not learned yet: the SFT model is already right
  15-90% of the time); beta=0.1 (see DEMO_RECIPE["dpo"]); hidden size 128 (with beta=0.1, one of
  two seeds broke under DPO). IPO with beta=1 was as robust as DPO with beta=2 (>= 99.6% for 2-4x the steps or lr).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TASK = "upper"
WORD_LENGTH = 4
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
PROMPT_TEMPLATE = "upper: {word}\n"
SLIP_RATE = 0.7  # fraction of SFT targets that make the slip

DATA_DIR = Path(__file__).resolve().parent / "demo_data"
DATA_FILES = {"sft": "sft.jsonl", "train": "train.jsonl", "eval": "eval.jsonl"}

# Tokenizer: the 256 byte-level tokens + 5 special tokens, no BPE merges, so every letter is one token.
VOCAB_SIZE = 261
# fastdpo.tiny.build_tiny_model(..., **MODEL_OVERRIDES): a 2-layer Llama, ~107k parameters.
MODEL_OVERRIDES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)

# Per-stage settings, named like TrainConfig / PrecomputeConfig fields (flags: lr -> --lr, max_steps -> --max-steps).
# "model_seed" seeds the random initial weights (build_model); "seed" in a stage is that stage's data-order seed.
DEMO_RECIPE = {
    # torch.set_num_threads(1) for the whole demo: the model is so small that every op is overhead; with 2 threads
    # on a 2-core machine that is busy with anything else, the OpenMP threads wait on each other and a step gets
    # 10-80x slower (measured: 60 SFT steps in 2-6 s with 1 thread, 75-168 s with 2, same machine and minute).
    "torch_threads": 1,
    "model_seed": 0,
    "vocab_size": VOCAB_SIZE,
    "model_overrides": MODEL_OVERRIDES,
    # token-mean NLL of the completions of sft.jsonl (3000 rows): 400 x 32 = 12800 samples, ~4.3 epochs
    "sft": dict(lr=3e-3, max_steps=400, batch_size=32, warmup_steps=20, lr_scheduler="linear", seed=0),
    # reference log-probs of train.jsonl under the SFT model
    "precompute": dict(batch_size=64),
    # DPO from the SFT model: 60 x 16 = 960 of the 1000 pairs of train.jsonl. beta=2 rather than the usual 0.1:
    # with beta=0.1 the loss keeps pushing the slip down long after greedy answers are fixed, and on some seeds
    # that drags other letters along (QRVA -> QMVA), so accuracy depended on stopping at the right step; with
    # beta=2 the sigmoid saturates, and 40 to 120 steps all gave 97-100% on eight SFT models.
    "dpo": dict(loss=["sigmoid"], beta=2.0, lr=2e-4, max_steps=60, batch_size=16, warmup_steps=6,
                lr_scheduler="linear", seed=0),
    # held-out eval: eval.jsonl rows scored, greedy generation judged by demo_task.judge
    "eval": dict(limit=500, max_new_tokens=WORD_LENGTH + 2, temperature=0.0),
}

# For the test suite: fewer SFT/DPO steps and eval rows. Same model and data.
REDUCED_RECIPE = {
    **DEMO_RECIPE,
    "sft": {**DEMO_RECIPE["sft"], "max_steps": 300},
    "dpo": {**DEMO_RECIPE["dpo"], "max_steps": 40, "warmup_steps": 4},
    "eval": {**DEMO_RECIPE["eval"], "limit": 100},
}

_PROMPT_RE = re.compile(r"upper: ([a-z]+)\n?")


def make_prompt(word: str) -> str:
    return PROMPT_TEMPLATE.format(word=word)


def correct_answer(word: str) -> str:
    return word.upper()


def slip_answer(word: str) -> str:
    """The systematic mistake: everything capitalised except the last letter."""
    return word[:-1].upper() + word[-1:]


def parse_prompt(prompt: str) -> str:
    """The word a prompt asks about (the last ``upper: WORD`` in it). ValueError if there is none."""
    found = _PROMPT_RE.findall(prompt)
    if not found:
        raise ValueError(f"not a demo-task prompt (expected 'upper: <lowercase word>'): {prompt[:60]!r}")
    return found[-1]


def extract_answer(completion: str) -> str:
    """The answer in a generated completion: its first line, stripped of whitespace and EOS text."""
    text = completion.replace("<s>", "").replace("</s>", "\n")
    return text.split("\n", 1)[0].strip()


def judge(prompt: str, completion: str) -> bool:
    """True when `completion` (generated text after `prompt`) is the word of `prompt` in capitals.

    Only the first line counts; surrounding whitespace is ignored, case is not. A prompt that is not
    a demo-task prompt raises ValueError rather than counting as wrong.
    """
    return extract_answer(completion) == correct_answer(parse_prompt(prompt))


def data_file(split: str) -> Path:
    """Path of a bundled split: "sft", "train" or "eval"."""
    if split not in DATA_FILES:
        raise ValueError(f"unknown demo split {split!r}; one of {', '.join(DATA_FILES)}")
    return DATA_DIR / DATA_FILES[split]


def tokenizer_texts() -> list[str]:
    """Texts to train the tokenizer on (with VOCAB_SIZE = 261 there are no merges, so only the alphabet matters)."""
    words = [ALPHABET, ALPHABET.upper()]
    return [make_prompt(w) + correct_answer(w) for w in words]


def build_model(output: str | os.PathLike, seed: int = DEMO_RECIPE["model_seed"]) -> str:
    """Write the demo's tokenizer and a randomly initialised tiny Llama to `output`; returns its path."""
    from .tiny import build_tiny_model

    return build_tiny_model(output, texts=tokenizer_texts(), vocab_size=VOCAB_SIZE, seed=seed, **MODEL_OVERRIDES)


def judge_pair(prompt: str, answer_a: str, answer_b: str) -> str:
    """The pairwise judge for `fastdpo compare`: "a" or "b" when only that answer is correct (by :func:`judge`),
    "tie" when both or neither are."""
    a, b = judge(prompt, answer_a), judge(prompt, answer_b)
    return "tie" if a == b else ("a" if a else "b")
