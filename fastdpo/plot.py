"""Training curves of one or more runs, overlaid, as PNG files.

    fastdpo plot runs/dpo-b0.1 runs/dpo-b0.5 runs/ipo --output plots/
    plot_runs(["runs/a", "runs/b"], "plots")      # from Python; returns the PNG paths

Reads each run directory's ``metrics.jsonl`` (one JSON object per optimizer step, written by
``fastdpo train``; a last line cut short by a killed run is ignored) and labels the run from its
``fastdpo_config.json`` (e.g. ``sigmoid β=0.1``), falling back to the directory name.

Writes into the output directory (default: the first run directory):

- ``curves.png``: all panels in one grid, with one legend for the runs;
- ``curves-<panel>.png``: each panel on its own, e.g. ``curves-loss.png``, ``curves-rewards.png``,
  ``curves-rewards_margins.png`` (``/`` in a metric name becomes ``_``).

A panel is a metric of ``metrics.jsonl`` (``loss``, ``grad_norm``, ``lr``, ``rewards/margins``, ...) or
one of the pairs ``rewards`` (``rewards/chosen`` solid, ``rewards/rejected`` dashed) and ``logps``
(``logps/chosen`` solid, ``logps/rejected`` dashed). The default panels are ``DEFAULT_METRICS``.
Runs keep one colour across panels. Files are written atomically. Matplotlib (the ``plot`` extra) is
used through its Agg canvas only, so the caller's pyplot backend and state are left alone.

A file of one of these names that ``fastdpo plot`` did not write is never replaced (without
``--overwrite``): the output directory's ``.fastdpo-plot.json`` lists the files plot wrote there.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import check_fields, opt
from .errors import UserError
from .io import atomic_write_bytes, ensure_dir

GROUPS = {
    "rewards": ("rewards/chosen", "rewards/rejected"),
    "logps": ("logps/chosen", "logps/rejected"),
}
DEFAULT_METRICS = ("loss", "rewards", "rewards/margins", "rewards/accuracies", "logps")
TITLES = {
    "loss": "loss",
    "rewards": "rewards (β × log-ratio): chosen —, rejected - -",
    "logps": "policy log-probs: chosen —, rejected - -",
    "rewards/margins": "reward margin (chosen − rejected)",
    "rewards/accuracies": "reward accuracy (chosen > rejected)",
    "logps/rejected": "log-prob of the rejected answer",
    "logps/chosen": "log-prob of the chosen answer",
    "grad_norm": "gradient norm (before clipping)",
    "lr": "learning rate",
}
# Config keys that may tell runs with the same loss and beta apart, in the order they are tried.
DISTINGUISHING_KEYS = ("loss_weights", "label_smoothing", "lr", "lr_scheduler", "optimizer", "batch_size", "grad_accum",
                       "max_steps", "epochs", "seed", "simpo_gamma", "ld_alpha", "lora_r", "model", "ref_cache",
                       "dataset")
SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD = ".fastdpo-plot.json"  # in the output directory: the files plot wrote there, which it may replace


@dataclass
class PlotConfig:
    """`fastdpo plot`: overlaid training curves of runs."""

    runs: list[str] = opt(None, "run directories holding metrics.jsonl", positional=True, metavar="RUN_DIR",
                          default_factory=list)
    output: str | None = opt(None, "directory for the PNGs (default: the first run directory)", metavar="DIR")
    metrics: list[str] | None = opt(None, f"panels, comma-separated: metrics.jsonl fields or the pairs "
                                          f"{', '.join(GROUPS)} (default: {','.join(DEFAULT_METRICS)})",
                                    metavar="M1,M2,...")
    smooth: float = opt(0.0, "exponential moving average weight, drawn over the faint raw curves (0: raw curves "
                             "only)", ge=0, lt=1, metavar="W")
    overwrite: bool = opt(False, "replace curves*.png in --output that fastdpo plot did not write")

    def __post_init__(self):
        check_fields(self)
        if not self.runs:
            raise UserError("give at least one run directory (fastdpo plot RUN_DIR [RUN_DIR ...])")


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("fastdpo plot needs matplotlib: pip install 'fastdpo[plot]'") from None
    return Figure, FigureCanvasAgg


# ----------------------------------------------------------------------------------------------
# Reading runs


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The run's per-step metrics, sorted by step (the last record of a repeated step wins).

    A truncated last line (a run killed mid-write) is skipped; any other line that is not a JSON
    object, a missing or empty file, or a file without any step raise UserError naming the run.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl (not a fastdpo train run, or it has not finished a step yet)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    by_step: dict[float, dict] = {}
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # a line cut short by a kill
                continue
            raise UserError(f"{path}: line {n} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            raise UserError(f"{path}: line {n} is not a metrics record (a JSON object with a numeric 'step')")
        by_step[record["step"]] = record
    if not by_step:
        raise UserError(f"{run}: metrics.jsonl is empty (the run has not finished a step yet)")
    return [by_step[s] for s in sorted(by_step)]


def read_config(run_dir: str | os.PathLike) -> dict:
    """The run's fastdpo_config.json, or {} if absent or unreadable."""
    try:
        config = json.loads((Path(run_dir) / "fastdpo_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(_fmt(v) for v in value)
    if isinstance(value, str) and ("/" in value or os.sep in value):
        return Path(value).name or value
    return str(value)


def run_label(config: dict, fallback: str) -> str:
    """"sigmoid β=0.1", "sigmoid+sft β=0.1", "sft" from a run's config; `fallback` without one."""
    loss = config.get("loss")
    if not loss and config.get("command") == "sft":
        return "sft"
    if not loss:
        return fallback
    names = [loss] if isinstance(loss, str) else [str(x) for x in loss]
    label = "+".join(names)
    if config.get("beta") is not None and names != ["sft"]:
        label += f" β={_fmt(config['beta'])}"
    if config.get("label_smoothing"):
        label += f" ε={_fmt(config['label_smoothing'])}"
    return label


def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """One label per run; runs with the same label get the first config value that differs, else their dir name."""
    dirs = [Path(r) for r in run_dirs]
    names = [d.resolve().name or str(d) for d in dirs]
    configs = [read_config(d) for d in dirs]
    labels = [run_label(c, n) for c, n in zip(configs, names)]
    for label in set(labels):
        same = [i for i, x in enumerate(labels) if x == label]
        if len(same) < 2:
            continue
        for key in DISTINGUISHING_KEYS:
            values = [_fmt(configs[i].get(key)) for i in same]
            if all(key in configs[i] for i in same) and len(set(values)) == len(values):
                for i, v in zip(same, values):
                    labels[i] = f"{label} {key}={v}"
                break
        else:
            for i in same:
                labels[i] = f"{label} ({names[i]})" if label != names[i] else names[i]
    # still equal (e.g. the same directory twice): number them
    for label in set(labels):
        same = [i for i, x in enumerate(labels) if x == label]
        if len(same) > 1:
            for k, i in enumerate(same, 1):
                labels[i] = f"{label} #{k}"
    return labels


# ----------------------------------------------------------------------------------------------
# Drawing


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]] | None:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return (xs, ys) if xs else None


def _ema(ys: list[float], weight: float) -> list[float]:
    out, last = [], None
    for y in ys:
        if not math.isfinite(y):
            out.append(y)
            continue
        last = y if last is None else weight * last + (1 - weight) * y
        out.append(last)
    return out


def _draw_panel(ax, panel: str, runs: list[list[dict]], labels: list[str], colors: list, smooth: float) -> bool:
    keys = GROUPS.get(panel, (panel,))
    drawn = False
    for records, label, color in zip(runs, labels, colors):
        for j, key in enumerate(keys):
            s = _series(records, key)
            if s is None:
                continue
            xs, ys = s
            style = "-" if j == 0 else "--"
            marker = "o" if len(xs) == 1 else None
            if smooth > 0 and len(xs) > 1:
                ax.plot(xs, ys, style, color=color, alpha=0.25, linewidth=1)
                ys = _ema(ys, smooth)
            ax.plot(xs, ys, style, color=color, linewidth=1.6, marker=marker, label=label if j == 0 else None)
            drawn = True
    ax.set_title(TITLES.get(panel, panel), fontsize=10)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if panel == "rewards/accuracies":
        ax.set_ylim(-0.03, 1.03)
    if panel in ("rewards", "rewards/margins"):
        ax.axhline(0.0, color="grey", linewidth=0.8, alpha=0.6)
    if panel == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if not drawn:
        ax.text(0.5, 0.5, f"no {panel} in these runs", ha="center", va="center", transform=ax.transAxes,
                color="grey")
    return drawn


def _png_bytes(fig, canvas_cls) -> bytes:
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def panel_filename(panel: str) -> str:
    return "curves-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in panel) + ".png"


def parse_metrics(metrics: str | Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(DEFAULT_METRICS)
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    panels = [str(m).strip() for m in items if str(m).strip()]
    if not panels:
        raise UserError("--metrics: give at least one metric name")
    return list(dict.fromkeys(panels))


def _ours(out: Path) -> set[str]:
    """The files a previous `fastdpo plot` wrote into `out` (its record)."""
    try:
        files = json.loads((out / RECORD).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _claim(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuse to replace a file plot did not write; record the names before writing, so that a crash between the
    two leaves them ours."""
    ours = _ours(out)
    theirs = [n for n in names if (out / n).exists() and n not in ours]
    if theirs and not overwrite:
        raise UserError(f"--output {out} holds {theirs[0]}{f' (and {len(theirs) - 1} more)' if len(theirs) > 1 else ''}"
                        ", which fastdpo plot did not write; choose another --output, or pass --overwrite to "
                        "replace it")
    atomic_write_bytes(out / RECORD, (json.dumps({"files": sorted(ours | set(names))}, indent=2) + "\n").encode())


def plot_runs(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None,
              metrics: str | Sequence[str] | None = None, smooth: float = 0.0, overwrite: bool = False) -> list[Path]:
    """Plot the runs' curves overlaid; returns the written PNGs (``curves.png`` first, then one per panel).

    `metrics`: panels to draw (names or a comma-separated string; default ``DEFAULT_METRICS``).
    `output_dir` defaults to the first run directory. `smooth` in [0, 1): exponential moving average
    weight (0: raw curves; otherwise raw curves faint, smoothed ones on top). A file there of the same name that
    plot did not write is refused, unless `overwrite`.
    """
    if not run_dirs:
        raise UserError("give at least one run directory")
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth must be in [0, 1), got {smooth}")
    panels = parse_metrics(metrics)
    runs = [read_metrics(d) for d in run_dirs]  # errors before anything is written
    available = sorted({k for records in runs for r in records for k, v in r.items()
                        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"})
    unknown = [p for p in panels if not any(k in available for k in GROUPS.get(p, (p,)))]
    if metrics is None:  # the defaults: draw those the runs have
        panels = [p for p in panels if p not in unknown] or panels
        unknown = [] if len(unknown) < len(DEFAULT_METRICS) else unknown
    if unknown:
        raise UserError(f"no metric {', '.join(unknown)} in these runs; available: {', '.join(available)}, "
                        f"and the pairs {', '.join(GROUPS)}")
    Figure, canvas_cls = _matplotlib()
    labels = run_labels(run_dirs)
    out = ensure_dir(output_dir if output_dir is not None else run_dirs[0])
    _claim(out, ["curves.png"] + [panel_filename(p) for p in panels], overwrite)  # before anything is drawn
    import matplotlib
    from matplotlib.lines import Line2D

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    colors = [cycle[i % len(cycle)] for i in range(len(runs))]

    written = []
    # the grid: one cell per panel plus one for the legend
    ncols = min(3, len(panels) + 1)
    nrows = math.ceil((len(panels) + 1) / ncols)
    width, height = 5.2 * ncols, 3.8 * nrows
    fig = Figure(figsize=(width, height))
    # fixed margins (in inches, converted to fractions): much faster than a layout engine
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.25 / width, bottom=0.55 / height, top=1 - 0.4 / height,
                        wspace=0.25, hspace=0.45)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, runs, labels, colors, smooth)
    legend_ax = axes[len(panels)]
    legend_ax.axis("off")
    for ax in axes[len(panels) + 1:]:
        ax.remove()
    handles = [Line2D([], [], color=c, linewidth=2) for c in colors]
    legend_ax.legend(handles, labels, loc="center", frameon=False, title=f"{len(runs)} run(s)",
                     fontsize=9 if len(runs) <= 8 else 7)
    target = out / "curves.png"
    atomic_write_bytes(target, _png_bytes(fig, canvas_cls))
    written.append(target)

    for panel in panels:
        fig = Figure(figsize=(6.4, 4.4))
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
        ax = fig.subplots()
        if _draw_panel(ax, panel, runs, labels, colors, smooth):
            ax.legend(fontsize=8)
        target = out / panel_filename(panel)
        atomic_write_bytes(target, _png_bytes(fig, canvas_cls))
        written.append(target)
    return written


def plot_comparison(report: dict, path: str | os.PathLike) -> Path:
    """The `fastdpo compare` figure (`report` as `fastdpo.compare` returns it): A's wins, ties and losses as
    stacked bars, for all pairs and the length-balanced ones, with the win rate and its 95% interval on each; and a
    histogram of both models' answer lengths. Written atomically to `path`."""
    Figure, canvas_cls = _matplotlib()
    fig = Figure(figsize=(11, 4))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.25, top=0.88, wspace=0.3)
    ax, hx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    rows = [(f"all pairs\n({report['n']})", report),
            (f"length-\nbalanced\n({report['length_balanced']['n']})", report["length_balanced"])]
    for y, (_, r) in enumerate(rows):
        if not r["n"]:
            continue
        w, t, lo_ = (r[k] / r["n"] for k in ("wins", "ties", "losses"))
        first = y == 0
        ax.barh(y, w, color="C2", label="A wins" if first else None)
        ax.barh(y, t, left=w, color="0.8", label="tie" if first else None)
        ax.barh(y, lo_, left=w + t, color="C3", label="B wins" if first else None)
        lo, hi = r["ci95"]
        ax.errorbar([r["win_rate"]], [y], xerr=[[r["win_rate"] - lo], [hi - r["win_rate"]]], fmt="D", color="black",
                    capsize=6, label="win rate, 95% interval" if first else None)
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_yticks([0, 1], [label for label, _ in rows])
    ax.set_ylim(1.6, -0.6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of pairs (ties count 1/2 in the win rate)")
    lo, hi = report["ci95"]
    ax.set_title(f"win rate of A over B: {report['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)

    lengths = [[p[side]["tokens"] for p in report["pairs"]] for side in ("model", "baseline")]
    top = max(max(x) for x in lengths)
    step = max(1, math.ceil((top + 1) / 40))
    bins = [i - 0.5 for i in range(0, top + step + 1, step)]
    names = [Path(str(report[side])).name or str(report[side]) for side in ("model", "baseline")]
    for values, label, color in zip(lengths, (f"A: {names[0]}", f"B: {names[1]}"), ("C0", "C1")):
        hx.hist(values, bins=bins, color=color, alpha=0.5, label=label)
    hx.set_title("answer length (tokens): mean A {:.1f}, B {:.1f}".format(
        report["lengths"]["model"]["mean"], report["lengths"]["baseline"]["mean"]), fontsize=10)
    hx.set_xlabel("tokens")
    hx.set_ylabel("answers")
    hx.legend(fontsize=8)
    path = Path(path)
    atomic_write_bytes(path, _png_bytes(fig, canvas_cls))
    return path
