#!/usr/bin/env python
"""Write the bundled demo data (fastdpo/demo_data/*.jsonl) deterministically.

    python tools/make_demo_data.py                 # rewrite fastdpo/demo_data/ (byte-identical every time)
    python tools/make_demo_data.py --check         # exit 1 if the shipped files differ from a fresh build
    python tools/make_demo_data.py --output /tmp/d # write elsewhere

The task is defined in fastdpo/demo_task.py (prompt format, correct answer, the slip). Words are random
4-letter lowercase strings, drawn without repetition, so the three splits never share a word:

- sft.jsonl    {"prompt", "completion"}: SFT_ROWS rows; exactly round(SLIP_RATE x SFT_ROWS) of them (chosen
               at random) have the slip as completion, the others the correct answer
- train.jsonl  {"prompt", "chosen", "rejected"}: TRAIN_ROWS pairs, chosen = correct, rejected = the slip
- eval.jsonl   the same for EVAL_ROWS held-out words

Everything comes from one random.Random(SEED); JSON is written with fixed separators and "\\n" line ends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdpo import demo_task  # noqa: E402

SEED = 20240607
SFT_ROWS = 3000
TRAIN_ROWS = 1000
EVAL_ROWS = 500


def draw_words(rng: random.Random, n: int) -> list[str]:
    seen: set[str] = set()
    words = []
    while len(words) < n:
        word = "".join(rng.choice(demo_task.ALPHABET) for _ in range(demo_task.WORD_LENGTH))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows).encode("ascii")


def build(seed: int = SEED, sft_rows: int = SFT_ROWS, train_rows: int = TRAIN_ROWS,
          eval_rows: int = EVAL_ROWS) -> dict[str, bytes]:
    """File name -> contents."""
    rng = random.Random(seed)
    words = draw_words(rng, sft_rows + train_rows + eval_rows)
    sft_words = words[:sft_rows]
    train_words = words[sft_rows:sft_rows + train_rows]
    eval_words = words[sft_rows + train_rows:]
    slipped = set(rng.sample(range(sft_rows), round(demo_task.SLIP_RATE * sft_rows)))
    sft = [{"prompt": demo_task.make_prompt(w),
            "completion": demo_task.slip_answer(w) if i in slipped else demo_task.correct_answer(w)}
           for i, w in enumerate(sft_words)]

    def pairs(ws):
        return [{"prompt": demo_task.make_prompt(w), "chosen": demo_task.correct_answer(w),
                 "rejected": demo_task.slip_answer(w)} for w in ws]

    files = demo_task.DATA_FILES
    return {files["sft"]: _jsonl(sft), files["train"]: _jsonl(pairs(train_words)),
            files["eval"]: _jsonl(pairs(eval_words))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(demo_task.DATA_DIR), help="directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --output; write nothing")
    args = parser.parse_args(argv)
    out = Path(args.output)
    files = build()
    if args.check:
        stale = [name for name, blob in files.items()
                 if not (out / name).is_file() or (out / name).read_bytes() != blob]
        for name in stale:
            print(f"{out / name}: differs from a fresh build; run tools/make_demo_data.py", file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, out / name)
        rows = blob.count(b"\n")
        print(f"wrote {out / name} ({len(blob)} bytes, {rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
