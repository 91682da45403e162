"""Fit test: the largest batch each method trains under a memory budget, by doubling, per optimizer.

Each attempt is one training run (train_runs.py: its own subprocess, `--fit-steps` steps) at a batch size, from
`--fit-start-batch` doubling to `--fit-max-batch`. GPU: the allocator is capped at `--fit-budget-gb`
(torch.cuda.set_per_process_memory_fraction), so a run that needs more raises the CUDA OOM error; CPU: a run fits
when its peak RSS (the whole process) is within the budget. Each attempt's verdict:

  fits                       the run finished within the budget
  oom                        the CUDA OOM exception, or a peak over the budget
  error: REASON              anything else (the one-line reason; the log has the traceback): the search stops there,
                             and the row says so, never "does not fit"
  skipped (library missing)  the optimizer's library (fastdpo.optim's OptimizerSpec.module) is not importable: checked
                             before any run
  cut (budget)               `--time-limit-s` (or SIGTERM) came first

The first method is tried with every `--fit-optimizers` entry, the others with AdamW (TRL rows: AdamW only). One row
per (method, optimizer) is appended to PREFIX.csv and PREFIX.md as soon as its search ends.

CPU run (what benchmarks/results/cpu_tiny_fit.* holds):
    python benchmarks/bench_fit.py --preset tiny --data short --steps 2 --batch-size 4 --fit-budget-gb 2.5 \
        --fit-max-batch 64 --fit-optimizers adamw --out benchmarks/results/cpu_tiny_fit
GPU run (any CUDA machine; what gpu_check.sh's fit stage runs, on the Qwen2.5-0.5B shape):
    python benchmarks/bench_fit.py --preset qwen2.5-0.5b --data long --device cuda --dtype bf16-mixed \
        --fit-budget-gb 20 --fit-start-batch 4 --fit-max-batch 64 --fit-optimizers adamw,adamw-kahan,adamw-8bit \
        --methods fastdpo-packed two-model trl-precompute --out /tmp/fit
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time

from common import CUT, Deadline, Table, exit_on_sigterm, fmt, header, unfinished_status
from train_runs import add_run_args, cleanup, finish_args, is_fastdpo, model_name, precompute, prepare, run_method

from fastdpo import optim

COLUMNS = ["method", "optimizer", "verdict", "fit_max_batch", "fit_peak_gib", "attempts", "weights", "model", "data",
           "device", "dtype", "fit_budget_gib", "fit_start_batch", "seconds"]  # fmt: skip
MISSING = "skipped (library missing)"


def library_missing(optimizer: str) -> str | None:
    """The library `optimizer` needs when it is not importable (checked without importing it), else None."""
    module = optim.OPTIMIZERS[optimizer].module
    if module and importlib.util.find_spec(module.split(".")[0]) is None:
        return module
    return None


def attempt_verdict(res: dict, budget_gib: float) -> str:
    """fits, oom, cut (budget), skipped: ..., or error: REASON, from one run's result."""
    status = res["status"]
    if status == "ok":
        return "fits" if res["peak_gib"] <= budget_gib else "oom"
    if status == "oom" or status.startswith(("skipped", "cut")):
        return status
    return status if status.startswith("error") else f"error: {status}"


def fit_test(setup, method: str, optimizer: str, run=run_method) -> dict:
    """Double the batch from --fit-start-batch while runs fit: the verdict, the largest batch that fitted and its
    peak, and each attempt (batch: verdict peak). `run` is train_runs.run_method (a test may pass its own)."""
    a = setup.args
    out = dict(verdict="", fit_max_batch="", fit_peak_gib="", attempts=[])
    lib = library_missing(optimizer)
    if lib is not None:
        return {**out, "verdict": MISSING, "attempts": [f"{lib} not importable"]}
    best, best_peak, batch, last_s = None, None, a.fit_start_batch, 0.0
    while batch <= a.fit_max_batch:
        if setup.deadline.left() < last_s:  # the next attempt (at least as long as the last) would not finish
            verdict = CUT
            break
        t0 = time.perf_counter()
        res = run(setup, method, batch, a.fit_steps, f"-fit-{optimizer}-{batch}", budget_gib=a.fit_budget_gb,
                  optimizer=optimizer)  # fmt: skip
        last_s = time.perf_counter() - t0
        verdict = attempt_verdict(res, a.fit_budget_gb)
        out["attempts"].append(f"{batch}: {verdict}" + (f" {res['peak_gib']:.2f} GiB" if res.get("peak_gib") else ""))
        print(f"  fit {method} {optimizer} batch {batch}: {verdict}", flush=True)
        if verdict != "fits":
            break
        best, best_peak, batch = batch, res["peak_gib"], batch * 2
    else:
        verdict = "fits"
    if verdict == "oom" and best is None:
        out.update(verdict="oom", fit_max_batch=f"<{a.fit_start_batch}")
    elif verdict in ("fits", "oom", CUT) and best is not None:
        # the largest batch that fitted; ">=" when the search stopped before a batch that did not
        out.update(verdict="fits", fit_max_batch=str(best) if verdict == "oom" else f">={best}")
        if verdict == CUT:
            out["attempts"].append(CUT)
    else:
        out.update(verdict=verdict, fit_max_batch=str(best) if best else "")  # error, skipped, or cut before any
    out["fit_peak_gib"] = fmt(best_peak, ".3f")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--fit-budget-gb", type=float, default=4.0, help="memory budget of the fit test, GiB")
    p.add_argument("--fit-max-batch", type=int, default=64, help="largest batch tried")
    p.add_argument("--fit-start-batch", type=int, default=1, help="first batch tried (doubling from it)")
    p.add_argument("--fit-steps", type=int, default=2, help="steps per attempt")
    p.add_argument("--fit-optimizers", type=lambda x: [o.strip() for o in x.split(",") if o.strip()],
                   default=["adamw"], help="comma-separated `fastdpo train --optimizer` choices, tried with the first "
                   f"method (now {','.join(optim.OPTIMIZERS)})")  # fmt: skip
    args = finish_args(p, p.parse_args(argv))
    unknown = [o for o in args.fit_optimizers if o not in optim.OPTIMIZERS]
    if unknown or not args.fit_optimizers:
        p.error(f"--fit-optimizers: {unknown[0] if unknown else 'none given'!r} is not a fastdpo optimizer; choose "
                f"from {','.join(optim.OPTIMIZERS)}")  # fmt: skip
    if not 1 <= args.fit_start_batch <= args.fit_max_batch:
        p.error(f"--fit-start-batch ({args.fit_start_batch}) must be between 1 and --fit-max-batch")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    exit_on_sigterm()
    deadline = Deadline(args.time_limit_s)
    runs = [(args.methods[0], o) for o in args.fit_optimizers] + [(m, "adamw") for m in args.methods[1:]]
    model = model_name(args)
    common = dict(model=model, data=args.dataset or args.data, device=args.device, dtype=args.dtype,
                  fit_budget_gib=fmt(args.fit_budget_gb), fit_start_batch=args.fit_start_batch)  # fmt: skip
    head = header(f"fastdpo fit test: the largest batch under {args.fit_budget_gb:g} GiB", args.device,
                  [shlex.quote(a) for a in argv], "bench_fit.py", args.note)  # fmt: skip
    table = Table(args.out, COLUMNS, head, append=args.append)
    table.set_footer(["Verdicts: `fits` (the largest batch that fitted; `>=` when the search stopped first), `oom` "
                      "(even the first batch did not fit), `error: reason`, `skipped (library missing)`, "
                      "`cut (budget)`. See bench_fit.py's docstring."])  # fmt: skip
    setup = None
    try:
        n_pairs = max(args.steps * args.batch_size * args.grad_accum, args.fit_max_batch)  # one full batch at least
        setup = prepare(args, n_pairs, deadline)
        if any(is_fastdpo(m) for m in args.methods):
            pre = precompute(setup)
            if pre["status"] != "ok":
                raise SystemExit(f"bench_fit: precompute failed ({pre['status']}); see {setup.logs}/precompute.log")
            setup.lengths, setup.shard_bounds = pre["lengths"], pre["shard_bounds"]
        while runs:
            method, optimizer = runs[0]
            t0 = time.perf_counter()
            res = fit_test(setup, method, optimizer)
            weights = "bf16" if optim.OPTIMIZERS[optimizer].weights == "bf16" else args.dtype
            res["attempts"] = "; ".join(res["attempts"])
            table.add(dict(method=method, optimizer=optimizer, **res, weights=weights, **common,
                           seconds=f"{time.perf_counter() - t0:.0f}"))  # fmt: skip
            runs.pop(0)
            print(
                f"fit {method} {optimizer}: {res['verdict']} (largest batch {res['fit_max_batch'] or '-'})", flush=True
            )
        return table.rows
    finally:
        status = unfinished_status()
        for method, optimizer in runs:
            table.add(dict(method=method, optimizer=optimizer, verdict=status, **common))
        cleanup(setup, args)


if __name__ == "__main__":
    main()
