"""`fastdpo plot`."""

from ..errors import UserError

DESCRIPTION = """Plot the training curves of one or more runs (their metrics.jsonl), overlaid: loss, chosen and
rejected rewards, reward margin, reward accuracy, and chosen/rejected log-probs. Runs are labelled from
their fastdpo_config.json (e.g. "sigmoid β=0.1"), else by directory name. Writes curves.png (all panels)
and curves-<panel>.png (one per panel) into --output (default: the first run directory).
Needs matplotlib: pip install 'fastdpo[plot]'."""

EXAMPLES = """examples:
  fastdpo plot runs/dpo
  fastdpo plot runs/dpo-b0.05 runs/dpo-b0.1 runs/dpo-b0.5 --output plots/beta-sweep
  fastdpo plot runs/dpo runs/ipo --output plots/dpo-vs-ipo --metrics loss,rewards/margins,logps/rejected
  fastdpo plot runs/dpo --metrics loss,grad_norm,lr --smooth 0.6
"""

CONFIG_KEYS = ("runs", "output", "metrics", "smooth")


def add_arguments(parser):
    from ..plot import DEFAULT_METRICS, GROUPS

    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help="directory for the PNGs (default: the first run directory)")
    parser.add_argument("--metrics", metavar="M1,M2,...", default=None,
                        help=f"panels, comma-separated: metrics.jsonl fields or the pairs {', '.join(GROUPS)} "
                             f"(default: {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--smooth", type=float, default=None, metavar="W",
                        help="exponential moving average weight in [0, 1), drawn over the faint raw curves "
                             "(default: 0, raw curves only)")


def _from_config_file(args) -> dict:
    from ..config import load_config_file

    path = getattr(args, "config", None)
    if not path:
        return {}
    values = load_config_file(path)
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)} (fastdpo plot takes "
                        f"{', '.join(CONFIG_KEYS)})")
    return values


def run(args):
    from ..plot import plot_runs

    file_values = _from_config_file(args)
    runs = args.runs or file_values.get("runs") or []
    runs = [runs] if isinstance(runs, str) else list(runs)
    if not runs:
        raise UserError("give at least one run directory (fastdpo plot RUN_DIR [RUN_DIR ...])")
    output = args.output if args.output is not None else file_values.get("output")
    metrics = args.metrics if args.metrics is not None else file_values.get("metrics")
    smooth = args.smooth if args.smooth is not None else file_values.get("smooth", 0.0)
    try:
        smooth = float(smooth)
    except (TypeError, ValueError):
        raise UserError(f"--smooth must be a number, got {smooth!r}") from None
    written = plot_runs(runs, output, metrics=metrics, smooth=smooth)
    for path in written:
        print(path)
    return 0
