"""Helpers of benchmarks/gpu_check.sh (run that, not this): the parts of the GPU check that are not already a
benchmark script. Orchestration only; the measurements are bench_logps.py's, bench_train.py's and
tests/test_precision.py's.

Subcommands:
  setup        env, then build-model, in one process
  env          versions, the device, which peers (trl, liger-kernel, cut-cross-entropy) are importable, and
               requirements of the carried wheels that the installed packages do not meet -> JSON
  build-model  save one random-weight model of a bench_train preset (with its tokenizer), shared by the
               bench_train stages instead of each building its own
  fit          bench_train's fit test without its throughput runs: one precompute, then bench_train.fit_test per
               method, in the order given, each with the time left (`--deadline-s`); the CSV is rewritten after
               every method, so a stage killed at its limit keeps what it measured
  precision    tests/test_precision.py's measurement (20 AdamW steps at lr 1e-6, the fraction of weights that
               changed) on whatever device fastdpo trains on, for float32, bf16-mixed, bfloat16 and auto
  sharded      a few DPO steps unsharded, then under FSDP2 (`--fsdp`, one process through torchrun), FSDP2 with
               CPU offload, and DeepSpeed ZeRO-3 through `accelerate launch` (examples/accelerate/zero3.yaml):
               each run's losses against the unsharded run's, peak memory and tokens/s; a variant whose library
               or device is missing is a skipped row
  summary      one markdown summary and the CSVs (at most 8 files, for the device tool's $OUT) from the stages'
               outputs; standard library only, so it runs whatever else is broken
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = {"trl": "trl", "liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
CARRIED = ("datasets", "dill", "multiprocess", "trl", "liger-kernel", "cut-cross-entropy")
VERSIONS = ("torch", "triton", "transformers", "accelerate", "peft", "datasets", "pyarrow", "fsspec", "dill",
            "multiprocess", "huggingface-hub", "trl", "liger-kernel", "cut-cross-entropy", "pytest")
# the output files (the device tool brings back at most 8 files from $OUT)
SUMMARY, LOGS = "gpu_check.md", "gpu_check_logs.txt"
CSVS = {"logps": "logps.csv", "train": "train.csv", "fit": "fit.csv", "precision": "precision.csv",
        "sharded": "sharded.csv"}
LOGPS_RUNS = ("logps_logits", "logps_head", "logps_compile")  # gpu_check.sh's three bench_logps.py runs
OWN_PROVIDERS = ("fastdpo-", "eager", "compile", "chunked-torch", "triton-head")  # not peers: an error fails the stage


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# env
# ----------------------------------------------------------------------------------------------------------------


def cmd_env(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py env")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return 0 if environment(Path(args.out)).get("fastdpo") else 1


def environment(out: Path) -> dict:
    from importlib import metadata

    info = {"python": sys.version.split()[0], "versions": {}, "peers": {}, "unmet": []}
    for name in VERSIONS:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["versions"][name] = None
    for module, package in PEERS.items():
        try:
            __import__(module)
            info["peers"][package] = None
        except Exception as e:  # noqa: BLE001 - any failure to import means the peer is skipped
            info["peers"][package] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    try:  # what the carried wheels ask for that the image does not have (pip install --no-deps checks nothing)
        from packaging.requirements import Requirement

        for name in CARRIED:
            try:
                reqs = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            for text in reqs:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                try:
                    have = metadata.version(req.name)
                except metadata.PackageNotFoundError:
                    info["unmet"].append(f"{name} needs {req}: not installed")
                    continue
                if req.specifier and not req.specifier.contains(have, prereleases=True):
                    info["unmet"].append(f"{name} needs {req}: {have} installed")
    except ImportError:
        info["unmet"].append("(packaging not installed: requirements not checked)")
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if info["cuda"] else "cpu"
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["cuda_version"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001
        info["cuda"], info["device"] = False, f"torch failed to import: {e}"
    try:
        import fastdpo  # noqa: F401
        from fastdpo import kernels  # noqa: F401

        info["fastdpo"] = str(Path(fastdpo.__file__).parent)
    except Exception as e:  # noqa: BLE001
        info["fastdpo"] = None
        info["fastdpo_error"] = f"{type(e).__name__}: {e}"
    out.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1), flush=True)
    return info


# ----------------------------------------------------------------------------------------------------------------
# build-model
# ----------------------------------------------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dtype", required=True, help="bench_train's --dtype of the runs that use the model")


def cmd_build_model(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py build-model")
    _model_args(p)
    p.add_argument("--out", required=True)
    return build_model(p.parse_args(argv))


def cmd_setup(argv):
    """env, then build-model, in one process (one start of Python and torch fewer)."""
    p = argparse.ArgumentParser(prog="gpu_check.py setup")
    _model_args(p)
    p.add_argument("--env-out", required=True)
    p.add_argument("--out", required=True, help="the model's directory")
    args = p.parse_args(argv)
    info = environment(Path(args.env_out))
    if not info.get("fastdpo"):
        return 1
    if args.device.startswith("cuda") and not info.get("cuda"):
        print("setup: no CUDA device (run with --dry-run on a CPU)", flush=True)
        return 1
    return build_model(args)


def build_model(args) -> int:
    import torch

    bench = _load_bench_train()
    t0 = time.perf_counter()
    # as bench_train.main builds it: the same words (so the same tokenizer as its synthetic data) and dtype
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    bench.build_preset(args.preset, Path(args.out), bench.synthetic_words(400), dtype, args.device)
    print(f"build-model: {args.preset} ({args.dtype}) -> {args.out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------------

FIT_COLUMNS = ["method", "optimizer", "status", "model", "data", "device", "dtype", "fit_budget_gib", "fit_start_batch",
               "fit_max_batch", "fit_peak_gib", "attempts", "seconds"]


def cmd_fit(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py fit", description="bench_train's fit test alone; other "
                                "arguments are bench_train.py's")
    p.add_argument("--deadline-s", type=float, default=None, help="seconds this command may take in all")
    known, rest = p.parse_known_args(argv)
    t_start = time.perf_counter()
    t_end = t_start + known.deadline_s if known.deadline_s is not None else float("inf")
    bench = _load_bench_train()
    args = bench.parse_args(rest + ["--fit-test"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.name}_logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_fit-"))
    attempts: list[dict] = []
    run_method = bench.run_method

    def recording_run_method(setup, method, batch_size, steps, tag, budget_gib=None, optimizer="adamw"):
        res = run_method(setup, method, batch_size, steps, tag, budget_gib, optimizer)
        attempts.append({"method": method, "batch": batch_size, "status": res["status"],
                         "peak_gib": res.get("peak_gib"), "wall_s": res.get("wall_s", 0.0)})
        return res

    bench.run_method = recording_run_method  # fit_test calls it through the module's globals
    rows = []

    def write():
        _write_csv(out.with_suffix(".csv"), FIT_COLUMNS, rows)

    try:
        n_pairs = max(args.steps * args.batch_size * args.grad_accum, args.fit_max_batch)  # as bench_train.main
        dataset = args.dataset
        if dataset is None:
            dataset = str(tmp / "pairs.jsonl")
            bench.write_pairs(Path(dataset), n_pairs, args.prompt_len, args.completion_len,
                              bench.synthetic_words(400))
        model = args.model
        if model is None:
            import torch

            model = bench.build_preset(args.preset, tmp / "model", bench.synthetic_words(400),
                                       torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.device)
        setup = bench.Setup(model=model, dataset=dataset, n_pairs=n_pairs, tmp=tmp, logs=logs, args=args)
        t0 = time.perf_counter()
        pre = bench.precompute(setup)
        if pre["status"] != "ok":
            raise SystemExit(f"fit: precompute failed ({pre['status']}); see {logs / 'precompute.log'}")
        setup.lengths, setup.shard_bounds = pre["lengths"], pre["shard_bounds"]
        estimate = time.perf_counter() - t0  # one run's cost until an attempt has been timed
        print(f"fit: precompute {estimate:.0f}s, {n_pairs} pairs, budget {args.fit_budget_gb} GiB", flush=True)
        # the first method with every --fit-optimizers entry (the low-precision optimizers' fit, measured), then
        # the others with AdamW
        runs = [(args.methods[0], o) for o in args.fit_optimizers] + [(m, "adamw") for m in args.methods[1:]]
        for method, optimizer in runs:
            row = {c: "" for c in FIT_COLUMNS}
            row.update(method=method, optimizer=optimizer, model=Path(args.model).name if args.model else args.preset,
                       data=args.dataset or args.data, device=args.device, dtype=args.dtype,
                       fit_budget_gib=args.fit_budget_gb, fit_start_batch=args.fit_start_batch)
            if attempts:
                estimate = max(a["wall_s"] for a in attempts)
            # in the order given, each method gets the time left: fit_test checks its limit before each run
            args.fit_time_s = t_end - time.perf_counter() - 1.5 * estimate
            if args.fit_time_s <= 0:
                row["status"] = f"skipped: no time left (one run takes ~{estimate:.0f}s)"
                rows.append(row)
                write()
                print(f"fit {method} {optimizer}: {row['status']}", flush=True)
                continue
            t_method, first = time.perf_counter(), len(attempts)
            best, peak = bench.fit_test(setup, method, optimizer)
            mine = attempts[first:]
            row.update(fit_max_batch=best, fit_peak_gib=peak, seconds=f"{time.perf_counter() - t_method:.0f}",
                       attempts="; ".join(f"{a['batch']}: {a['status'].split(',')[0]}"
                                          + (f" {a['peak_gib']:.2f} GiB" if a["peak_gib"] is not None else "")
                                          for a in mine))
            skipped = next((a["status"] for a in mine if a["status"].startswith("skipped")), None)
            row["status"] = skipped or "ok"
            rows.append(row)
            write()
            print(f"fit {method} {optimizer}: largest batch {best} (peak {peak} GiB) in {row['seconds']}s", flush=True)
        write()
        return 0
    finally:
        bench.run_method = run_method
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------------------------

PRECISION_COLUMNS = ["dtype", "precision", "device", "weights_changed", "norms_changed", "expected", "status",
                     "seconds"]


def cmd_precision(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py precision")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import CORPUS, make_pairs, write_jsonl  # the CPU test's model, data and measurement
    from test_precision import changed_fractions

    from fastdpo.modeling import default_precision, process_state
    from fastdpo.recipes.precompute import PrecomputeConfig, precompute
    from fastdpo.recipes.train import train
    from fastdpo.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="gpu_check_precision-"))
    try:
        model = build_tiny_model(root / "model", texts=CORPUS, vocab_size=400)
        data = write_jsonl(root / "d.jsonl", make_pairs(16, seed=9))
        precompute(PrecomputeConfig(model=model, dataset=str(data), output=str(root / "c"), progress=False))
        device = process_state().device
        rows = []
        for dtype in ("float32", "bf16-mixed", "bfloat16", "auto"):
            t0 = time.perf_counter()
            train(model=model, ref_cache=str(root / "c"), output=str(root / dtype), dtype=dtype, lr=1e-6,
                  max_steps=args.steps, batch_size=4, epochs=5, progress=False, kl_warn=None)
            weights, norms = changed_fractions(root / dtype, model)
            precision = default_precision(dtype, device)
            if precision == "bfloat16":  # plain AdamW on bf16 weights rounds updates of lr 1e-6 away
                expected, ok = "weights < 0.5, norms == 0", weights < 0.5 and norms == 0.0
            else:
                expected, ok = "weights >= 0.99, norms >= 0.99", weights >= 0.99 and norms >= 0.99
            rows.append(dict(dtype=dtype, precision=precision, device=str(device), weights_changed=f"{weights:.4f}",
                             norms_changed=f"{norms:.4f}", expected=expected,
                             status="ok" if ok else "failed: not as expected",
                             seconds=f"{time.perf_counter() - t0:.1f}"))
            print(f"precision {dtype} ({precision} on {device}): weights {weights:.4f}, norms {norms:.4f} "
                  f"changed ({rows[-1]['status']})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _write_csv(Path(args.out).with_suffix(".csv"), PRECISION_COLUMNS, rows)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


# ----------------------------------------------------------------------------------------------------------------
# sharded
# ----------------------------------------------------------------------------------------------------------------

SHARDED_COLUMNS = ["variant", "status", "device", "dtype", "steps", "max_abs_loss_diff", "tolerance",
                   "peak_memory_gb", "tokens_per_s", "seconds", "command"]


def sharded_variants(model: str, cache: str, dtype: str, steps: int, gpu: bool) -> dict:
    """variant -> (argv without --output, or a reason it is skipped). The same training, launched four ways."""
    train = ["-m", "fastdpo", "train", "--model", model, "--ref-cache", cache, "--dtype", dtype, "--max-steps",
             str(steps), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-5", "--no-progress", "--log-every", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    zero3 = REPO / "examples" / "accelerate" / "zero3.yaml"
    v = {"unsharded": [sys.executable, *train],
         "fsdp2": [*torchrun, *train, "--fsdp"],
         "fsdp2-offload": [*torchrun, *train, "--fsdp", "--fsdp-cpu-offload"] if gpu
         else "skipped: CPU offload needs a GPU",
         "zero3": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(zero3),
                   "--num_processes", "1", *train]}
    if importlib.util.find_spec("deepspeed") is None:
        v["zero3"] = "skipped: deepspeed not installed (carry its wheel; see gpu_check.sh's header)"
    elif not zero3.is_file():
        v["zero3"] = f"skipped: no {zero3.relative_to(REPO)}"
    return v


def cmd_sharded(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py sharded")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv")
    p.add_argument("--dtype", default="bf16-mixed")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--deadline-s", type=float, default=300, help="stop starting variants after this many seconds")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from conftest import make_pairs, write_jsonl

    from fastdpo.recipes.precompute import PrecomputeConfig, precompute

    t_start, gpu = time.perf_counter(), torch.cuda.is_available()
    root = Path(tempfile.mkdtemp(prefix="gpu_check_sharded-"))
    # bf16 compute: the sharded run reduces in another order, in bf16 (measured on CPU, tiny model: <= 3e-4)
    tolerance = 2e-2 if args.dtype != "float32" else 1e-4
    rows = []
    try:
        data = write_jsonl(root / "d.jsonl", make_pairs(32, seed=11))
        precompute(PrecomputeConfig(model=args.model, dataset=str(data), output=str(root / "c"), progress=False,
                                    dtype="bfloat16" if gpu and args.dtype != "float32" else "float32"))
        base = None
        for name, cmd in sharded_variants(args.model, str(root / "c"), args.dtype, args.steps, gpu).items():
            row = dict(variant=name, device="cuda" if gpu else "cpu", dtype=args.dtype, steps=args.steps,
                       tolerance=tolerance)
            if isinstance(cmd, str) or time.perf_counter() - t_start > args.deadline_s:
                rows.append({**row, "status": cmd if isinstance(cmd, str) else "skipped: no time left"})
                continue
            t0, cmd = time.perf_counter(), [*cmd, "--output", str(root / name)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            row.update(seconds=f"{time.perf_counter() - t0:.1f}", command=" ".join(cmd[1:]))
            print(f"sharded {name}: exit {proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
            out = root / name / "metrics.jsonl"
            if proc.returncode != 0 or not out.is_file():
                rows.append({**row, "status": f"error: exit {proc.returncode}"})
                continue
            m = [json.loads(line) for line in out.read_text().splitlines()]
            row.update(peak_memory_gb=m[-1].get("peak_memory_gb", ""),
                       tokens_per_s=f"{sum(x['tokens_per_s'] for x in m[1:]) / max(len(m) - 1, 1):.0f}")
            if base is None:
                base, row["status"] = m, "ok"
            else:
                diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(base, m))
                row.update(max_abs_loss_diff=f"{diff:.2e}",
                           status="ok" if diff <= tolerance and len(m) == len(base) else "failed: losses differ")
            rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        _write_csv(Path(args.out).with_suffix(".csv"), SHARDED_COLUMNS, rows)
    return 0 if rows and all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


# ----------------------------------------------------------------------------------------------------------------
# summary (standard library only)
# ----------------------------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _concat_csv(sources: list[Path], dest: Path, tag: str | None = None) -> list[dict]:
    """Rows of every source that exists, into one CSV (columns in first-seen order; `tag` column: the source)."""
    rows, columns = [], ([tag] if tag else [])
    for src in sources:
        for r in _read_csv(src):
            if tag:
                r = {tag: src.stem, **r}
            rows.append(r)
            columns += [c for c in r if c not in columns]
    if rows:
        _write_csv(dest, columns, rows)
    return rows


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in columns) + " |" for r in rows]
    return out


def _demote(md: str, levels: int = 2) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", md, flags=re.M)


def _tail(path: Path, n: int) -> list[str]:
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-n:]


def _ratio(a, b):
    try:
        return f"{float(a) / float(b):.2f}×"
    except (TypeError, ValueError, ZeroDivisionError):
        return ""


def _verdict(stage: str, rc_status: str, work: Path) -> tuple[str, list[str]]:
    """(status, notes) of a stage from its exit and its outputs: rows of fastdpo's own methods that errored fail
    it; peers (TRL, Liger, CCE) that are missing or error are notes."""
    status, notes = rc_status, []
    if stage == "setup":
        env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
        missing = [f"{k} ({v})" for k, v in env.get("peers", {}).items() if v]
        if missing:
            notes.append("peers skipped: " + ", ".join(missing))
        notes += [f"unmet: {u}" for u in env.get("unmet", [])]
    elif stage == "cuda-tests":
        last = [ln for ln in _tail(work / "logs" / "cuda-tests.log", 40) if re.search(r"\d+ (passed|failed)", ln)]
        if last:
            notes.append(last[-1].strip("= "))
    elif stage == "logps":
        rows = [r for name in LOGPS_RUNS for r in _read_csv(work / f"{name}.csv")]
        own_bad = [r for r in rows if r["provider"].startswith(OWN_PROVIDERS) and r["status"] != "ok"
                   and not r["status"].startswith("skipped")]
        peer_bad = [r for r in rows if not r["provider"].startswith(OWN_PROVIDERS) and r["status"] != "ok"]
        if status == "ok" and own_bad:
            status = f"failed: {len(own_bad)} fastdpo/torch rows not ok"
        notes += sorted({f"{r['provider']}: {r['status']}" for r in own_bad + peer_bad})
    elif stage in ("train-short", "train-long"):
        rows = _read_csv(work / f"{stage.replace('-', '_')}.csv")
        own_bad = [r for r in rows if not r["method"].startswith("trl") and r["status"] != "ok"]
        if status == "ok" and own_bad:
            status = f"failed: {', '.join(r['method'] for r in own_bad)} not ok"
        notes += [f"{r['method']}: {r['status']}" for r in rows if r["status"] != "ok"]
    elif stage == "fit":
        rows = _read_csv(work / "fit.csv")
        notes += [f"{r['method']}: {r['status']}" for r in rows if r["status"] != "ok"]
        if status == "ok" and any(r["status"].startswith("error") for r in rows):
            status = "failed: a method errored"
    elif stage == "precision":
        rows = _read_csv(work / "precision.csv")
        notes += [f"{r['dtype']}: {r['status']}" for r in rows if r["status"] != "ok"]
    elif stage == "sharded":
        rows = _read_csv(work / "sharded.csv")
        notes += [f"{r['variant']}: {r['status']}" for r in rows if r["status"] != "ok"]
    return status, notes


def cmd_summary(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py summary")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True, choices=["gpu", "dry-run"])
    p.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    p.add_argument("--wall-s", type=float, default=None)
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    stages = []
    for line in (work / "stages.tsv").read_text().splitlines() if (work / "stages.tsv").is_file() else []:
        name, rc_status, seconds, allowed, note = (line.split("\t") + [""] * 5)[:5]
        status, notes = _verdict(name, rc_status, work) if rc_status == "ok" or rc_status.startswith("failed") \
            else (rc_status, [])
        if note:
            notes.insert(0, note)
        stages.append(dict(stage=name, status=status, seconds=seconds, allowed=allowed, notes="; ".join(notes)))

    def strip(text: str) -> str:  # the temporary work directory means nothing to a reader
        return text.replace(str(work) + "/", "").replace(str(work), "$WORK")

    # CSVs: the device tool brings back at most 8 files, so one per kind
    logps = _concat_csv([work / f"{name}.csv" for name in LOGPS_RUNS], out / CSVS["logps"])
    train = _concat_csv([work / "train_short.csv", work / "train_long.csv"], out / CSVS["train"], tag="stage")
    for name in ("fit", "precision", "sharded"):
        _concat_csv([work / f"{name}.csv"], out / CSVS[name])
    for name in CSVS.values():  # the model column holds a path under the work directory
        if (out / name).is_file():
            (out / name).write_text(strip((out / name).read_text()))

    gpu = args.mode == "gpu"
    lines = [
        "# fastdpo GPU check",
        "",
        f"- mode: {'GPU' if gpu else 'dry run (CPU, tiny shapes: checks that every stage runs; not a measurement)'}",
        f"- device: {env.get('device', '?')}" + (f", {env['device_memory_gib']} GiB, CUDA {env.get('cuda_version')}"
                                                  if env.get("device_memory_gib") else ""),
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: {_git_head()}",
        f"- command: `{args.command}`",
        f"- wall time: {args.wall_s:.0f} s" if args.wall_s is not None else "- wall time: ?",
        "- versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in env.get("versions", {}).items()),
        "",
        "## Stages",
        "",
        *_table(stages, ["stage", "status", "seconds", "allowed", "notes"]),
        "",
        "Status: `ok`, `skipped: reason` (a missing peer, no time left, not selected) or `failed: reason`; a failed "
        "stage does not stop the others. Logs: the tail of each stage's log is in " + LOGS + ".",
        "",
    ]
    by_name = {s["stage"]: s for s in stages}

    def section(name, title):
        s = by_name.get(name, {"status": "not run", "seconds": "", "notes": ""})
        lines.extend([f"## {name}: {title}", "", f"Status: {s['status']} ({s['seconds'] or '?'} s)"
                      + (f". Notes: {s['notes']}" if s["notes"] else ""), ""])

    section("setup", "environment")
    if env:
        lines += [f"- python {env.get('python')}, fastdpo from {env.get('fastdpo')}",
                  "- peers: " + ", ".join(f"{k} {'ok' if not v else 'missing (' + v + ')'}"
                                          for k, v in env.get("peers", {}).items())]
        lines += [f"- unmet requirement of a carried wheel: {u}" for u in env.get("unmet", [])]
        lines.append("")

    section("cuda-tests", "the kernel tests (compiled on a GPU, Triton's interpreter on CPU)")
    tail = [ln for ln in _tail(work / "logs" / "cuda-tests.log", 60) if ln.startswith(("FAILED", "ERROR"))
            or re.search(r"\d+ (passed|failed|skipped)", ln)]
    if tail:
        lines += ["```", *tail[-25:], "```", ""]

    section("precision", "the bf16 weight-change check (tests/test_precision.py's measurement)")
    prec = _read_csv(work / "precision.csv")
    if prec:
        lines += _table(prec, PRECISION_COLUMNS) + ["", "Fractions of weight elements (input embedding left out) "
                                                    "that changed after 20 AdamW steps at lr 1e-6; `auto` is "
                                                    "bf16-mixed on a GPU, float32 on CPU.", ""]

    section("logps", "log-prob kernels (bench_logps.py)")
    row_kernel = [r for r in logps if r["provider"] == "fastdpo-triton" and r["status"] == "ok"]
    if row_kernel:
        lines += ["Row kernel (fastdpo-triton, logits in HBM): achieved bandwidth, minimal traffic", ""]
        lines += _table(row_kernel, ["mode", "vocab", "tokens", "dtype", "median_ms", "gbps", "pct_peak_bw"]) + [""]
    order = ["fastdpo-triton", "eager", "compile", "liger-ce", "fastdpo-linear", "eager-head", "compile-head",
             "trl-head", "liger-linear", "cce-linear"]
    for workload, eager, title in (
        ("logits", "eager", "Logits workload, forward + backward (mode full): time and peak memory against eager"),
        ("head", "eager-head", "Fused head, forward + backward (mode full): time and peak memory against eager"),
    ):
        rows = sorted((r for r in logps if r["workload"] == workload and r["mode"] == "full"),
                      key=lambda r: order.index(r["provider"]) if r["provider"] in order else len(order))
        base = next((r for r in rows if r["provider"] == eager and r["status"] == "ok"), None)
        if not rows:
            continue
        for r in rows:
            ok = base is not None and r["status"] == "ok"
            r["time_vs_eager"] = _ratio(r["median_ms"], base["median_ms"]) if ok else ""
            r["mem_vs_eager"] = _ratio(r["peak_mem_mib"], base["peak_mem_mib"]) if ok else ""
        extra = ["gbps", "pct_peak_bw"] if workload == "logits" else ["hidden", "tflops"]
        lines += [title, ""]
        lines += _table(rows, ["provider", "status", "vocab", "tokens", "dtype", "median_ms", "time_vs_eager",
                               "peak_mem_mib", "mem_vs_eager", *extra]) + [""]
    for name in LOGPS_RUNS:
        if (work / f"{name}.md").is_file():
            lines += [_demote(strip((work / f"{name}.md").read_text())), ""]

    for name, data in (("train-short", "short"), ("train-long", "long")):
        section(name, f"end-to-end DPO training, {data} prompts (bench_train.py)")
        md = work / f"{name.replace('-', '_')}.md"
        if md.is_file():
            lines += [_demote(strip(md.read_text())), ""]
    if train:
        lines += ["(`train.csv` holds both runs' rows, its `stage` column saying which.)", ""]

    section("fit", "largest batch per method under a memory budget (bench_train.py's fit test)")
    fit = _read_csv(work / "fit.csv")
    if fit:
        lines += _table([{k: strip(str(v)) for k, v in r.items()} for r in fit], FIT_COLUMNS) + [""]

    section("sharded", "sharded training: FSDP2, FSDP2 with CPU offload, DeepSpeed ZeRO-3 against unsharded")
    sharded = _read_csv(work / "sharded.csv")
    if sharded:
        lines += _table(sharded, [c for c in SHARDED_COLUMNS if c != "command"]) + [
            "", "One process each (a single GPU): the sharding code paths (hooks, the fused head through the LM "
            "head's unit, mixed precision, offload), not multi-GPU scaling. Commands: in the log.", ""]

    lines += ["## Files", "", f"- {SUMMARY} (this), {', '.join(n for n in CSVS.values() if (out / n).is_file())}, "
              f"{LOGS}", ""]
    (out / SUMMARY).write_text(strip("\n".join(lines)))

    log_lines = []
    for s in stages:
        log = work / "logs" / f"{s['stage']}.log"
        if not log.is_file():  # skipped: never ran
            continue
        log_lines += [f"===== {s['stage']}: {s['status']} ({s['seconds']} s) — last 80 lines of its log =====",
                      *_tail(log, 80), ""]
    for sub in sorted(work.glob("*_logs")):  # bench_train's per-method logs: the end of each
        for log in sorted(sub.glob("*.log")):
            log_lines += [f"===== {sub.name}/{log.name} — last 30 lines =====", *_tail(log, 30), ""]
    (out / LOGS).write_text(strip("\n".join(log_lines)))
    print(f"summary: {out / SUMMARY}")
    for s in stages:
        print(f"  {s['stage']:<12} {s['status']:<40.40} {s['seconds']:>5}s  {s['notes'][:100]}")
    return 1 if any(s["status"].startswith("failed") for s in stages) else 0


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except Exception:  # noqa: BLE001 - no git on the machine, or not a checkout
        return "?"


COMMANDS = {"setup": cmd_setup, "env": cmd_env, "build-model": cmd_build_model, "fit": cmd_fit,
            "precision": cmd_precision, "sharded": cmd_sharded, "summary": cmd_summary}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
