"""Build a tiny Llama and a byte-level BPE tokenizer locally (nothing is downloaded).

    python tools/make_tiny_model.py --output /tmp/tiny
    python tools/make_tiny_model.py --output /tmp/tiny --texts pairs.jsonl --vocab-size 1000 --hidden-size 128

The tokenizer adds BOS, has EOS/PAD and a ChatML chat template, like a real chat model's.
"""

import argparse
import json

from fastdpo.tiny import build_tiny_model

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory to write the model and tokenizer to")
    p.add_argument("--texts", help="a .jsonl file whose string values train the tokenizer")
    p.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    texts = None
    if a.texts:
        with open(a.texts, encoding="utf-8") as f:
            texts = [v for line in f if line.strip() for v in json.loads(line).values() if isinstance(v, str)]
    path = build_tiny_model(a.output, texts=texts, vocab_size=a.vocab_size, seed=a.seed, hidden_size=a.hidden_size,
                            intermediate_size=2 * a.hidden_size, num_hidden_layers=a.layers)
    print(path)
