"""`fastdpo plot`: curves of several runs from fake metrics.jsonl files, and its errors."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from fastdpo.errors import UserError
from fastdpo.plot import DEFAULT_METRICS, RECORD, SIGNATURE, panel_filename, plot_runs, read_metrics, run_labels

MIN_PNG_BYTES = 4000


def fake_run(path: Path, steps: int = 30, config: dict | None = None, seed: int = 0, truncated_tail: bool = False,
             nan_step: int | None = None) -> Path:
    """A run directory like `fastdpo train` writes: metrics.jsonl (+ fastdpo_config.json)."""
    path.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        t = step / steps
        wiggle = 0.05 * math.sin(step + seed)
        chosen, rejected = 0.2 * t + wiggle, -0.8 * t - wiggle
        lines.append(json.dumps({
            "step": step, "epoch": t, "loss": math.log(2) * (1 - 0.7 * t) + wiggle, "rewards/chosen": chosen,
            "rewards/rejected": rejected, "rewards/accuracies": min(1.0, 0.5 + t), "rewards/margins": chosen - rejected,
            "logps/chosen": -5 + chosen * 10, "logps/rejected": -6 + rejected * 10,
            "grad_norm": float("nan") if step == nan_step else 1.0 + wiggle, "lr": 1e-3 * (1 - t),
            "samples_per_s": 100.0, "tokens_per_s": 2000.0, "elapsed_s": step * 0.1, "peak_memory_gb": 0.5,
        }))
    text = "".join(line + "\n" for line in lines)
    if truncated_tail:  # a run killed while writing a line
        text += lines[-1][: len(lines[-1]) // 2]
    (path / "metrics.jsonl").write_text(text)
    if config is not None:
        (path / "fastdpo_config.json").write_text(json.dumps({"command": "train", **config}))
    return path


def assert_png(path: Path):
    assert path.is_file(), path
    blob = path.read_bytes()
    assert blob[:8] == SIGNATURE, f"{path} is not a PNG"
    assert len(blob) > MIN_PNG_BYTES, f"{path} is only {len(blob)} bytes"


@pytest.fixture
def runs(tmp_path):
    return [
        fake_run(tmp_path / "dpo", config={"loss": ["sigmoid"], "beta": 0.1, "lr": 1e-6}),
        fake_run(tmp_path / "ipo", config={"loss": ["ipo"], "beta": 0.1, "lr": 1e-6}, seed=1, truncated_tail=True),
        fake_run(tmp_path / "no-config", steps=12, seed=2, nan_step=5),
    ]


def test_plot_runs_writes_valid_pngs(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    written = plot_runs(runs, out)
    assert written[0] == out / "curves.png"
    assert [p.name for p in written[1:]] == [panel_filename(m) for m in DEFAULT_METRICS]
    assert {p.name for p in written} >= {"curves.png", "curves-loss.png", "curves-rewards.png",
                                         "curves-rewards_margins.png", "curves-rewards_accuracies.png",
                                         "curves-logps.png"}
    for p in written:
        assert_png(p)
    # no temporary files left; the record of what plot wrote there
    assert sorted(p.name for p in out.iterdir()) == sorted([RECORD] + [p.name for p in written])


def test_a_users_file_is_never_replaced(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastdpo import cli

    out = tmp_path / "mine"
    out.mkdir()
    (out / "curves.png").write_bytes(SIGNATURE + b"my own figure")
    assert cli.main(["plot", str(runs[0]), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--output {out} holds curves.png, which fastdpo plot did not write" in err[0], err
    assert (out / "curves.png").read_bytes() == SIGNATURE + b"my own figure" and len(list(out.iterdir())) == 1
    assert cli.main(["plot", str(runs[0]), "--output", str(out), "--overwrite"]) == 0
    assert_png(out / "curves.png")
    before = (out / "curves.png").read_bytes()
    assert cli.main(["plot", str(runs[1]), "--output", str(out)]) == 0  # its own files: replaced without a flag
    assert (out / "curves.png").read_bytes() != before


def test_default_output_is_first_run_and_custom_metrics(runs):
    pytest.importorskip("matplotlib")
    written = plot_runs(runs[:2], metrics="grad_norm, logps/rejected")
    assert [p.name for p in written] == ["curves.png", "curves-grad_norm.png", "curves-logps_rejected.png"]
    assert all(p.parent == runs[0] for p in written)
    for p in written:
        assert_png(p)


def test_read_metrics_tolerates_truncated_tail_and_sorts(runs, tmp_path):
    records = read_metrics(runs[1])
    assert [r["step"] for r in records] == list(range(1, 31))  # the half line is ignored
    run = tmp_path / "resumed"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": float(s)}) for s in (2, 1, 2)) + "\n")
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, 1.0), (2, 2.0)]


def test_labels_from_config_then_directory(tmp_path, runs):
    assert run_labels(runs) == ["sigmoid β=0.1", "ipo β=0.1", "no-config"]
    sweep = [fake_run(tmp_path / f"lr{i}", config={"loss": ["sigmoid", "sft"], "beta": 0.5, "lr": lr})
             for i, lr in enumerate((1e-6, 5e-7))]
    assert run_labels(sweep) == ["sigmoid+sft β=0.5 lr=1e-06", "sigmoid+sft β=0.5 lr=5e-07"]
    twins = [fake_run(tmp_path / name, config={"loss": "sigmoid", "beta": 0.1}) for name in ("a", "b")]
    assert run_labels(twins) == ["sigmoid β=0.1 (a)", "sigmoid β=0.1 (b)"]


@pytest.mark.parametrize("case", ["no_dir", "no_metrics", "empty", "only_truncated", "corrupt_middle"])
def test_bad_runs_raise_user_error_naming_the_run(tmp_path, case):
    run = tmp_path / f"run-{case}"
    if case != "no_dir":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    elif case == "only_truncated":
        (run / "metrics.jsonl").write_text('{"step": 1, "lo')
    elif case == "corrupt_middle":
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    good = fake_run(tmp_path / "good")
    with pytest.raises(UserError, match=f"run-{case}"):
        plot_runs([good, run], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_unknown_metric(runs, tmp_path):
    with pytest.raises(UserError, match="no metric bogus.*available: .*rewards/margins"):
        plot_runs(runs, tmp_path / "out", metrics="loss,bogus")


def test_missing_matplotlib_is_a_user_error(runs, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(UserError, match=r"pip install 'fastdpo\[plot\]'"):
        plot_runs(runs, tmp_path / "out")


def _cli(argv):
    from fastdpo.cli import plot as cli_plot
    from fastdpo.config import add_arguments, from_args

    parser = argparse.ArgumentParser(prog="fastdpo plot")
    add_arguments(parser, cli_plot.CONFIG)
    parser.add_argument("--config")
    return cli_plot.run(from_args(cli_plot.CONFIG, parser.parse_args(argv)))


def test_cli_module(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastdpo.cli import plot as cli_plot

    assert cli_plot.DESCRIPTION and "fastdpo plot" in cli_plot.EXAMPLES
    out = tmp_path / "cli-out"
    argv = [str(r) for r in runs[:2]] + ["--output", str(out), "--metrics", "rewards", "--smooth", "0.5"]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / n) for n in ("curves.png", "curves-rewards.png")]
    for p in printed:
        assert_png(Path(p))
    config = tmp_path / "plot.json"
    config.write_text(json.dumps({"runs": [str(runs[0])], "output": str(tmp_path / "from-config"),
                                  "metrics": ["loss"]}))
    assert _cli(["--config", str(config)]) == 0
    assert_png(tmp_path / "from-config" / "curves-loss.png")
    with pytest.raises(UserError, match="at least one run"):
        _cli([])
    with pytest.raises(UserError, match="smooth"):
        _cli([str(runs[0]), "--smooth", "1.5"])


def test_registered_command_exits_2_with_one_line(tmp_path, capsys):
    from fastdpo import cli

    if "plot" not in cli.SUBCOMMANDS:
        pytest.skip("fastdpo plot is not registered in fastdpo.cli.SUBCOMMANDS yet")
    (tmp_path / "r").mkdir()
    assert cli.main(["plot", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics.jsonl" in err[0] and str(tmp_path / "r") in err[0]
