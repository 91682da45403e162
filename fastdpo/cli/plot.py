"""`fastdpo plot`."""

from ..plot import PlotConfig

CONFIG = PlotConfig  # the flags and --config keys

DESCRIPTION = """Plot the training curves of one or more runs (their metrics.jsonl), overlaid: loss, chosen and
rejected rewards, reward margin, reward accuracy, and chosen/rejected log-probs. Runs are labelled from
their fastdpo_config.json (e.g. "sigmoid β=0.1"), else by directory name. Writes curves.png (all panels)
and curves-<panel>.png (one per panel) into --output (default: the first run directory); a file of
those names that fastdpo plot did not write is refused (--overwrite replaces it).
Needs matplotlib: pip install 'fastdpo[plot]'."""

EXAMPLES = """examples:
  fastdpo plot runs/dpo
  fastdpo plot runs/dpo-b0.05 runs/dpo-b0.1 runs/dpo-b0.5 --output plots/beta-sweep
  fastdpo plot runs/dpo runs/ipo --output plots/dpo-vs-ipo --metrics loss,rewards/margins,logps/rejected
  fastdpo plot runs/dpo --metrics loss,grad_norm,lr --smooth 0.6
"""


def run(config):
    from ..plot import plot_runs

    for path in plot_runs(config.runs, config.output, metrics=config.metrics, smooth=config.smooth,
                          overwrite=config.overwrite):
        print(path)
    return 0
