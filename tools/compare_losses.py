"""Compare preference losses from one reference cache: DPO vs IPO, DPO vs SFT, RPO, ...

    python tools/compare_losses.py --model ./sft --ref-cache cache/d --output runs/cmp --losses sigmoid ipo \\
        -- --beta 0.5 --lr 5e-7 --epochs 2
    python tools/compare_losses.py --model ./sft --ref-cache cache/d --output runs/cmp --losses sigmoid sft sigmoid,sft

One policy-only `fastdpo train` per loss (a comma-separated mixture counts as one, e.g. `sigmoid,sft`
is RPO; its weights go after `--` as `--loss-weights`), all from the same cache, into
OUT/loss-NAME/; then their curves overlaid in OUT/compare/*.png and a table of each run's last
step on stdout. Arguments after `--` go to every run.

DPO vs IPO is the classic one to look at: DPO keeps pushing the rejected answers' log-probability
down (and often the chosen ones' with it), IPO's squared loss stops at a finite margin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastdpo.cli import main
from fastdpo.errors import UserError

COLUMNS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "kl")


def run(argv: list[str]) -> int:
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ref-cache", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--losses", nargs="+", required=True, help="one run per entry; a,b is a mixture")
    args = p.parse_args(own)
    runs = []
    for loss in args.losses:
        out = Path(args.output) / f"loss-{loss.replace(',', '+')}"
        code = main(["train", "--model", args.model, "--ref-cache", args.ref_cache, "--output", str(out),
                     "--loss", loss, *rest])
        if code:
            return code
        runs.append(out)

    print(f"{'run':<20}" + "".join(f"{c:>20}" for c in ("step",) + COLUMNS))
    for out in runs:
        last = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
        cells = [f"{last.get(c, float('nan')):>20.4g}" for c in COLUMNS]
        print(f"{out.name:<20}{last['step']:>20}" + "".join(cells))
    try:
        from fastdpo.plot import plot_runs

        pngs = plot_runs(runs, Path(args.output) / "compare")
        print(f"plots: {pngs[0].parent}", file=sys.stderr)
    except UserError as e:  # e.g. matplotlib is not installed: the runs themselves are done
        print(f"compare_losses: note: no plot ({e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
