"""A beta sweep from one reference cache: one policy-only training per beta, then overlaid curves.

    python tools/beta_sweep.py --model ./sft --ref-cache cache/d --output runs/sweep --betas 0.05 0.1 0.3 \\
        -- --lr 5e-7 --max-steps 500
    python tools/beta_sweep.py --model /tmp/tiny --ref-cache /tmp/cache --output /tmp/sweep --betas 0.1 0.5 \\
        -- --max-steps 5          # tiny CPU run

Equivalent to `fastdpo train ... --beta 0.05,0.1,0.3`; arguments after `--` go to every run. Writes
OUT/beta-B/ for each run and OUT/sweep/*.png comparing them.
"""

import argparse
import sys

from fastdpo.cli import main


def run(argv: list[str]) -> int:
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ref-cache", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--betas", type=float, nargs="+", required=True)
    args = p.parse_args(own)
    return main(["train", "--model", args.model, "--ref-cache", args.ref_cache, "--output", args.output,
                 "--beta", ",".join(f"{b:g}" for b in args.betas), *rest])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
