"""The markdown summary of benchmarks/gpu_check.sh: one file, GPU_CHECK.md, rewritten (atomically) from what the
stages have written so far. gpu_check.sh runs it every ~20 s while the stages run, on SIGTERM and at the end, so the
output folder always holds every finished row. Standard library only (plus common.py), so it runs whatever else is
broken.

    python benchmarks/gpu_check_summary.py --work WORK --out OUT --mode gpu|dry-run --command "..." [--final]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import subprocess
import time
from pathlib import Path

from common import REPO, read_csv, table_lines, write_atomic

# stage -> (title, the CSV in the output folder its rows are in)
STAGES = {
    "setup": ("environment", None),
    "cuda-tests": ("the kernel tests (compiled on a GPU, Triton's interpreter on CPU)", None),
    "precision": ("the bf16 weight-change check (tests/test_precision.py's measurement, SDPA)", "precision.csv"),
    "logps": ("log-prob kernels and heads (bench_logps.py)", "logps.csv"),
    "train-short": ("end-to-end DPO training, short prompts (bench_train.py)", "train.csv"),
    "train-long": ("end-to-end DPO training, long prompts (bench_train.py)", "train.csv"),
    "fit": ("largest batch per method under a memory budget (bench_fit.py)", "fit.csv"),
    "sharded": ("FSDP2, DeepSpeed ZeRO-3 and FSDP2 with CPU offload against unsharded", "sharded.csv"),
}
OWN = ("fastdpo-", "eager", "compile", "chunked-torch", "triton-head", "copy")  # not peers: an error fails the stage
BAD = ("error", "failed", "oom", "not run")


def tail(path: Path, n: int) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else []


def ratio(a, b) -> str:
    try:
        return f"{float(a) / float(b):.2f}×"
    except (TypeError, ValueError, ZeroDivisionError):
        return ""


def stage_rows(name: str, out: Path) -> list[dict]:
    csv = STAGES[name][1]
    rows = read_csv(out / csv) if csv else []
    if name.startswith("train-"):
        rows = [r for r in rows if r.get("data") == name.split("-")[1]]
    return rows


def verdict(name: str, status: str, rows: list[dict], work: Path) -> tuple[str, list[str]]:
    """(status, notes) of a finished stage from its exit and its rows: a row of fastdpo's own that errored fails it;
    peers that are missing or error are notes."""
    notes = []
    if name == "setup":
        env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
        missing = [k for k, v in env.get("peers", {}).items() if v]
        notes += [f"not installed: {', '.join(missing)}"] if missing else []
        notes += [f"unmet: {u}" for u in env.get("unmet", [])]
    elif name == "cuda-tests":
        last = [ln for ln in tail(work / "logs" / "cuda-tests.log", 40) if re.search(r"\d+ (passed|failed)", ln)]
        notes += [last[-1].strip("= ")] if last else []
    key = {"logps": "provider", "fit": "method", "precision": "dtype", "sharded": "variant"}.get(name, "method")
    col = "verdict" if name == "fit" else "status"
    bad = [r for r in rows if r.get(col, "").startswith(BAD)]
    own_bad = [r for r in bad if name != "logps" or r[key].startswith(OWN)]
    own_bad = [r for r in own_bad if not (name.startswith("train") and r[key].startswith("trl"))]
    if status == "ok" and own_bad:
        status = f"failed: {', '.join(sorted({r[key] for r in own_bad}))} not ok"
    cut = [r for r in rows if r.get(col, "").startswith("cut")]
    notes += [f"{len(cut)} rows cut (budget)"] if cut else []
    notes += sorted({f"{r[key]}: {r[col]}" for r in bad})[:8]
    return status, notes


def logps_lines(rows: list[dict], out: Path) -> list[str]:
    lines = []
    for workload, base_name in (("logits", "eager"), ("head", "eager-head")):
        mine = [r for r in rows if r["workload"] in ((workload, "copy") if workload == "logits" else (workload,))]
        if not mine:
            continue
        for r in mine:
            base = next((b for b in mine if b["provider"] == base_name and b["mode"] == r["mode"]
                         and b["status"] == "ok"), None)  # fmt: skip
            ok = base is not None and r["status"] == "ok"
            r["time_vs_eager"] = ratio(r["median_ms"], base["median_ms"]) if ok else ""
            r["mem_vs_eager"] = ratio(r["peak_mem_mib"], base["peak_mem_mib"]) if ok else ""
        extra = ["gbps", "pct_peak_bw", "pct_copy_bw"] if workload == "logits" else ["tflops"]
        lines += [f"{workload} workload (× {base_name}, same mode):", ""]
        lines += table_lines(mine, ["provider", "mode", "status", "vocab", "tokens", "dtype", "median_ms",
                                    "time_vs_eager", "peak_mem_mib", "mem_vs_eager", *extra]) + [""]  # fmt: skip
    text = (out / "logps.md").read_text() if (out / "logps.md").is_file() else ""
    if "## Bandwidth reference" in text:
        lines += ["### Bandwidth reference", *text.split("## Bandwidth reference", 1)[1].splitlines()]
    return lines


COLUMNS = {
    "precision": ["dtype", "precision", "device", "steps", "weights_changed", "norms_changed", "expected", "status"],
    "train": ["method", "status", "tokens_per_s", "tokens_per_s_p20", "tokens_per_s_p80", "throughput_vs_baseline",
              "peak_mem_gib", "memory_vs_baseline", "first_step_s", "startup_s", "precompute_s", "mfu"],
    "fit": ["method", "optimizer", "verdict", "fit_max_batch", "fit_peak_gib", "attempts", "seconds"],
    "sharded": ["variant", "status", "device", "dtype", "steps", "max_abs_loss_diff", "tolerance", "peak_memory_gb",
                "tokens_per_s", "first_step_s", "seconds"],
}  # fmt: skip


def summary(work: Path, out: Path, mode: str, command: str, final: bool) -> tuple[str, bool]:
    """The summary's text, and whether a stage failed."""
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    stages = []  # name, status, seconds, allowed
    for line in tail(work / "stages.tsv", 100):
        stages.append(dict(zip(("stage", "status", "seconds", "allowed"), (line.split("\t") + [""] * 4)[:4])))
    current = tail(work / "current", 1)
    if current and not final:
        name, start, allowed = current[0].split("\t")
        stages.append(dict(stage=name, status="running", seconds=f"{time.time() - float(start):.0f}", allowed=allowed))
    for s in stages:
        s["notes"] = ""
        if s["status"] == "ok" or s["status"].startswith(("failed", "running")):
            status, notes = verdict(s["stage"], s["status"], stage_rows(s["stage"], out), work)
            s["status"] = status if s["status"] != "running" else "running"
            s["notes"] = "; ".join(notes)
    started = tail(work / "started", 1)
    wall = f"{time.time() - float(started[0]):.0f} s" if started else "?"
    lines = [
        "# fastdpo GPU check",
        "",
        "- mode: " + ("GPU" if mode == "gpu" else "dry run (CPU, tiny shapes: plumbing, no numbers)"),
        f"- device: {env.get('device', '?')}"
        + (f", {env['device_memory_gib']} GiB, CUDA {env.get('cuda_version')}" if env.get("device_memory_gib") else ""),
        f"- updated: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}"
        + (" (final)" if final else " (the run is going on: this file is rewritten every ~20 s)"),
        f"- commit: {git_head()}; command: `{command}`; wall time so far: {wall}",
        "- versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in env.get("versions", {}).items()),
        "",
        "## Stages",
        "",
        *table_lines(stages, ["stage", "status", "seconds", "allowed", "notes"]),
        "",
        "Status: `ok`, `skipped: reason`, `failed: reason` or `running`; a failed stage does not stop the others. A "
        "row its stage had no time for says `cut (budget)`. Log tails: at the end of this file.",
        "",
    ]  # fmt: skip
    for s in stages:
        name = s["stage"]
        rows = stage_rows(name, out)
        lines += [f"## {name}: {STAGES[name][0]}", "", f"Status: {s['status']} ({s['seconds'] or '?'} s)", ""]
        if name == "setup" and env:
            lines += [f"- python {env.get('python')}, fastdpo from {env.get('fastdpo')}",
                      "- libraries: " + ", ".join(f"{k} {v or 'ok'}" for k, v in env.get("peers", {}).items()),
                      *[f"- unmet requirement: {u}" for u in env.get("unmet", [])], ""]  # fmt: skip
        elif name == "cuda-tests":
            log = tail(work / "logs" / "cuda-tests.log", 60)
            found = [ln for ln in log if ln.startswith(("FAILED", "ERROR")) or re.search(r"\d+ (passed|failed)", ln)]
            lines += ["```", *found[-25:], "```", ""] if found else []
        elif name == "logps" and rows:
            lines += logps_lines(rows, out)
        elif rows:
            lines += table_lines(rows, COLUMNS["train" if name.startswith("train") else name]) + [""]
    csvs = sorted({c for _, c in STAGES.values() if c and (out / c).is_file()})
    lines += [f"Every column: the CSVs beside this file ({', '.join(csvs) or 'none yet'}).",
              "", "## Log tails", ""]  # fmt: skip
    for s in stages:
        log = work / "logs" / f"{s['stage']}.log"
        if log.is_file():
            lines += [f"### {s['stage']} (last 40 lines)", "", "```", *tail(log, 40), "```", ""]
    for log in sorted(work.glob("**/*_logs/*.log")):  # the benchmark scripts' per-run logs
        if any(w in log.read_text(errors="replace") for w in ("Traceback", "Error")):
            lines += [f"### {log.parent.name}/{log.name} (last 20 lines)", "", "```", *tail(log, 20), "```", ""]
    text = "\n".join(lines).replace(str(work) + "/", "").replace(str(work), "$WORK")
    return text, any(s["status"].startswith("failed") for s in stages)


def git_head() -> str:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)  # fmt: skip
        return proc.stdout.strip() or "?"
    except Exception:  # noqa: BLE001 - no git on the machine, or not a checkout
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="gpu_check.md", help="the summary's file name in --out")
    p.add_argument("--mode", required=True, choices=["gpu", "dry-run"])
    p.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    p.add_argument("--final", action="store_true", help="the run has ended: judge every stage")
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    text, failed = summary(work, out, args.mode, args.command, args.final)
    write_atomic(out / args.name, text)
    return 1 if args.final and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
