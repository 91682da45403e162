"""Benchmark DPO training end to end: fastdpo (reference cache) vs the classic two-model method vs TRL.

The methods and how each runs are train_runs.py's (its docstring lists them): one subprocess per run, the same
model, pairs, batch, lengths, dtype and optimizer. The two-model baseline runs first (every other row's ratio is
taken against it), then the others in the order given; each method's row is appended to PREFIX.csv and PREFIX.md
as soon as its runs finish, and `--time-limit-s` (or SIGTERM) turns the rows not reached into `cut (budget)`.
Columns are defined in benchmarks/README.md; in short: the median over the steps after `--warmup` of each step's
tokens / time (a pair counts 2P + C + R tokens for every method), pairs/s, peak memory (max_memory_allocated on GPU,
peak RSS on CPU), the first step's time (FlexAttention's and torch.compile's compiles land there) and the process
start (imports, model load) apart from the steady state, precompute time and the amortised time of 1 and of
`--sweep-k` runs on one cache, MFU on GPU. The fit test is bench_fit.py; the fit estimate is fit_estimate.py.

Tiny CPU run (what benchmarks/results/cpu_tiny_train*.{csv,md,png} hold; CPU timings say nothing about a GPU):
    python benchmarks/bench_train.py --preset tiny --data short --steps 24 --warmup 4 --batch-size 4 --repeats 2 \
        --out benchmarks/results/cpu_tiny_train
    python benchmarks/bench_train.py --preset tiny --data long --steps 16 --warmup 3 --batch-size 4 --repeats 2 \
        --out benchmarks/results/cpu_tiny_train_long
    python benchmarks/bench_train.py --preset tiny-152k --data short --steps 8 --warmup 2 --batch-size 4 \
        --out benchmarks/results/cpu_tiny152k_train

Smoke run (seconds; what tests/test_bench_train.py does):
    python benchmarks/bench_train.py --preset micro --data short --prompt-len 12 --completion-len 12 --steps 2 \
        --warmup 1 --batch-size 2 --methods fastdpo-packed two-model --out /tmp/bench_train_smoke

GPU runs (any CUDA machine; bf16, the shapes README.md's Performance goals are stated for):
    python benchmarks/bench_train.py --preset qwen2.5-0.5b --data long --device cuda --dtype bf16-mixed --steps 40 \
        --batch-size 8 --out benchmarks/results/h200_qwen05_train_long
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from common import Deadline, Table, exit_on_sigterm, fmt, header, quantile, unfinished_status
from presets import param_counts
from train_runs import (
    BASELINE,
    Setup,
    add_run_args,
    cleanup,
    fastdpo_argv,
    finish_args,
    is_fastdpo,
    model_name,
    precompute,
    prepare,
    run_method,
)

from fastdpo import metrics
from fastdpo.modeling import machine_name

COLUMNS = [
    "method", "status", "model", "data", "device", "dtype", "batch_size", "grad_accum", "steps", "measured_steps",
    "tokens_per_s", "tokens_per_s_p20", "tokens_per_s_p80", "tokens_per_s_agg", "pairs_per_s", "step_s",
    "first_step_s", "startup_s", "throughput_vs_baseline", "peak_mem_gib", "peak_mem_kind", "mem_above_start_gib",
    "memory_vs_baseline", "precompute_s", "precompute_peak_gib", "train_s", "total_1run_s", "k", "total_k_s",
    "total_k_vs_baseline", "mfu", "mfu_with_ref",
]  # fmt: skip
MD_COLUMNS = ["method", "status", "tokens_per_s", "tokens_per_s_p20", "tokens_per_s_p80", "throughput_vs_baseline",
              "peak_mem_gib", "memory_vs_baseline", "first_step_s", "startup_s", "precompute_s", "total_k_s",
              "total_k_vs_baseline", "mfu"]  # fmt: skip


def peak_flops(device: str) -> float | None:
    return metrics.peak_flops(torch.device(device))  # the trainer's table, so both report the same MFU


def summarise(method: str, runs: list[dict], pre: dict, setup: Setup, tokens_per_pair: float, n_matmul: int) -> dict:
    """One CSV row from a method's repeated runs (step times pooled over repeats)."""
    a = setup.args
    row = {c: "" for c in COLUMNS}
    row.update(
        method=method,
        model=model_name(a),
        data=a.dataset or a.data,
        device=a.device,
        dtype=a.dtype,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        steps=a.steps,
        k=a.sweep_k,
    )
    bad = [r["status"] for r in runs if r["status"] != "ok"]
    if bad:
        row["status"] = bad[0]
        return row
    # Per step: tokens (2P + C + R of its pairs) / time. Not pairs / time: fastdpo batches pairs of similar length
    # together (TRL does not), so its per-step pairs/s swings several-fold with the batch's length
    rates, step_s, train_s, tokens, time_s = [], [], [], 0, 0.0
    first = statistics.median(r["step_end_s"][0] for r in runs)  # compile (FlexAttention, torch.compile) included
    startup = statistics.median(r["wall_s"] - r["step_end_s"][-1] for r in runs)  # start, imports, load
    for r in runs:
        ends = r["step_end_s"]
        dts = [t1 - t0 for t0, t1 in zip([0.0] + ends[:-1], ends)]
        for dt, n in list(zip(dts, r["step_tokens"]))[a.warmup :]:
            rates.append(n / dt)
            step_s.append(dt)
            tokens, time_s = tokens + n, time_s + dt
        train_s.append(ends[-1])
    tokens_per_s = statistics.median(rates)
    pre_s = None
    if is_fastdpo(method):
        pre_s = pre["precompute_s"]
    elif method == "trl-precompute":
        pre_s = statistics.median(r["precompute_s"] or 0.0 for r in runs)  # None: a reused datasets cache
    train = statistics.median(train_s)
    cpu = runs[0]["peak_kind"] == "cpu_peak_rss"
    row.update(
        status="ok",
        measured_steps=len(rates),
        first_step_s=fmt(first),
        startup_s=fmt(startup),
        tokens_per_s=fmt(tokens_per_s, ".5g"),
        tokens_per_s_p20=fmt(quantile(rates, 0.2), ".5g"),
        tokens_per_s_p80=fmt(quantile(rates, 0.8), ".5g"),
        tokens_per_s_agg=fmt(tokens / time_s, ".5g"),
        pairs_per_s=fmt(tokens_per_s / tokens_per_pair),
        step_s=fmt(statistics.median(step_s)),
        peak_mem_gib=fmt(max(r["peak_gib"] for r in runs), ".3f"),
        peak_mem_kind=runs[0]["peak_kind"],
        mem_above_start_gib=fmt(max(r["peak_gib"] - r["rss_start_gib"] for r in runs), ".3f") if cpu else "n/a",
        precompute_s=fmt(pre_s),
        train_s=fmt(train),
        total_1run_s=fmt((pre_s or 0) + train),
        total_k_s=fmt((pre_s or 0) + a.sweep_k * train),
    )
    if is_fastdpo(method):
        row["precompute_peak_gib"] = fmt(pre["peak_gib"], ".3f")
    peak = peak_flops(a.device)
    if peak and a.dtype != "fp32":
        # 6 N T per step (forward 2NT + backward 4NT); a live reference adds a forward, 2NT, that is not useful work
        row["mfu"] = fmt(6 * n_matmul * tokens_per_s / peak, ".3f")
        live = method in (BASELINE, "trl-live")
        row["mfu_with_ref"] = fmt((8 if live else 6) * n_matmul * tokens_per_s / peak, ".3f")
    else:
        row["mfu"] = row["mfu_with_ref"] = "n/a"
    return row


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["method"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        if base is None or r["status"] != "ok":
            continue
        r["throughput_vs_baseline"] = fmt(float(r["tokens_per_s"]) / float(base["tokens_per_s"]), ".3f")
        r["memory_vs_baseline"] = fmt(float(r["peak_mem_gib"]) / float(base["peak_mem_gib"]), ".3f")
        r["total_k_vs_baseline"] = fmt(float(r["total_k_s"]) / float(base["total_k_s"]), ".3f")


def _ratio(rows, num, den, col="tokens_per_s"):
    r = {x["method"]: x for x in rows if x["status"] == "ok"}
    if num not in r or den not in r:
        return None
    return float(r[num][col]) / float(r[den][col])


def ratios(rows: list[dict], setup: Setup, stats: dict) -> list[str]:
    """Ratios between methods that the table (all against the baseline) does not show, with the measured numbers
    behind them and what they are made of. Numbers only: judging them against targets is left to the READMEs."""
    a, ok = setup.args, {r["method"]: r for r in rows if r["status"] == "ok"}
    gpu = a.device.startswith("cuda")
    out = []
    packed = "fastdpo-packed"

    speed = _ratio(rows, packed, BASELINE)
    if speed is not None:
        out.append(
            f"- {packed} ÷ {BASELINE}, tokens/s: {speed:.2f}× (median step: {BASELINE} "
            f"{fmt(float(ok[BASELINE]['step_s']), '.3g')} s, {packed} {fmt(float(ok[packed]['step_s']), '.3g')} s). "
            "A cache removes the reference forward (2 of the baseline's 8 N·T FLOPs per step: 8/6 = 1.33× on its "
            "own) and the eager full-vocabulary log-softmax; the optimizer step and per-step overheads stay."
        )
    mem = _ratio(rows, packed, BASELINE, "peak_mem_gib")
    if mem is not None:
        state = stats["model_state_gib"]
        line = (
            f"- {packed} ÷ {BASELINE}, peak memory: {mem:.2f}×. Policy weights, gradients and AdamW state are "
            f"{state:.2f} GiB for every method, a floor no log-prob saving goes below; the baseline adds the "
            f"reference's weights ({state / 4:.2f} GiB) and full logits, which grow with the vocabulary"
        )
        if not gpu:
            start = float(ok[BASELINE]["peak_mem_gib"]) - float(ok[BASELINE]["mem_above_start_gib"])
            above = float(ok[packed]["mem_above_start_gib"]) / float(ok[BASELINE]["mem_above_start_gib"])
            line += (
                f". Peak RSS is the whole process: the Python/torch runtime alone is {start:.2f} GiB of the "
                f"baseline's {float(ok[BASELINE]['peak_mem_gib']):.2f} GiB; above that start the ratio is "
                f"{above:.2f}"
            )
        out.append(line + ".")
    for trl in ("trl-live", "trl-precompute"):
        s = _ratio(rows, packed, trl)
        if s is not None:
            out.append(
                f"- {packed} ÷ {trl}: {s:.2f}× tokens/s, {_ratio(rows, packed, trl, 'peak_mem_gib'):.2f}× peak memory."
            )
    pack = _ratio(rows, packed, "fastdpo-padded")
    if pack is not None:
        p20, p80 = float(ok[packed]["tokens_per_s_p20"]), float(ok["fastdpo-padded"]["tokens_per_s_p80"])
        spread = (
            f"{packed}'s p20 ({fmt(p20)}) is above fastdpo-padded's p80 ({fmt(p80)})"
            if p20 > p80
            else f"their p20–p80 ranges overlap ({packed}'s p20 {fmt(p20)}, fastdpo-padded's p80 {fmt(p80)})"
        )
        saved = stats["prompt"] / stats["tokens_per_pair"]
        out.append(
            f"- {packed} ÷ fastdpo-padded, tokens/s ({a.dataset or a.data} data): {pack:.2f}×; {spread}. Prefix "
            f"sharing saves the prompt once per pair, {100 * saved:.0f}% of 2P+C+R on this data, and packing the "
            "padding"
            + (
                ". With SDPA's dense mask (CPU) a row costs its length squared, so packed rows stay within the padded "
                "width and the attention saved is less than the tokens saved."
                if not gpu
                else "."
            )
        )
    return out


def plot(rows: list[dict], path: Path, title: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    names = [r["method"] for r in ok]
    colors = ["0.55" if n == BASELINE else ("tab:blue" if is_fastdpo(n) else "tab:orange") for n in names]
    panels = [
        ("tokens/s (median step, p20–p80)", "tokens_per_s"),
        (f"peak memory, GiB ({ok[0]['peak_mem_kind']})", "peak_mem_gib"),
        (f"time for {k} runs on one cache, s", "total_k_s"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (label, col) in zip(axes, panels):
        vals = [float(r[col]) for r in ok]
        err = None
        if col == "tokens_per_s":
            err = [
                [v - float(r["tokens_per_s_p20"]) for v, r in zip(vals, ok)],
                [float(r["tokens_per_s_p80"]) - v for v, r in zip(vals, ok)],
            ]
        bars = ax.bar(names, vals, color=colors, yerr=err, capsize=3)
        ratio = {
            "tokens_per_s": "throughput_vs_baseline",
            "peak_mem_gib": "memory_vs_baseline",
            "total_k_s": "total_k_vs_baseline",
        }[col]
        for i, (bar, r) in enumerate(zip(bars, ok)):
            top = bar.get_height() + (err[1][i] if err else 0)
            if r[ratio]:
                ax.annotate(
                    f"{float(r[ratio]):.2f}×",
                    (bar.get_x() + bar.get_width() / 2, top),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        ax.margins(y=0.12)
        ax.set_title(label + " (× two-model)", fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def footer(rows: list[dict], setup: Setup, stats: dict, commands: dict) -> list[str]:
    a = setup.args
    return [
        "## Ratios between methods",
        "",
        *(ratios(rows, setup, stats) or ["- (fewer than two of the methods compared here ran)"]),
        "",
        "## How to read it",
        "",
        "- tokens/s: per step, the tokens of its pairs (2P+C+R each, whatever a method runs: padding, or a shared "
        "prompt once) over the step's time (one step's end to the next: data, forward, backward, optimizer, "
        "logging); the median and p20–p80 over the steps after warm-up, pooled over runs. × baseline: the ratio of "
        "median tokens/s to two-model's.",
        "- first_step_s: the first step alone (FlexAttention's and torch.compile's compiles happen there; never in "
        "the medians); startup_s: the run's process start, imports and model load, before its first step.",
        f"- peak: {rows[0]['peak_mem_kind'] or 'n/a'} of the method's own process"
        + ("" if a.device.startswith("cuda") else " (peak RSS includes the Python/torch runtime)")
        + ".",
        f"- precompute s: fastdpo's reference pass, shared by both fastdpo rows; total {a.sweep_k} runs = precompute "
        f"once + {a.sweep_k} training runs (a β sweep on one cache).",
        "- MFU (GPU, bf16 only): 6 · N · tokens/s over the device's dense bf16 peak, N the matmul parameters.",
        "",
        "## Commands (per method)",
        "",
        *[f"- {m}: `{c}`" for m, c in commands.items()],
        "",
    ]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--warmup", type=int, default=4, help="first steps of each run left out of the medians")
    p.add_argument("--repeats", type=int, default=1, help="runs per method, interleaved; steps pooled")
    p.add_argument("--sweep-k", type=int, default=4, help="runs sharing one cache in the amortised total")
    p.add_argument("--no-plot", action="store_true", help="no PREFIX.png (matplotlib not imported)")
    args = finish_args(p, p.parse_args(argv))
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be less than --steps ({args.steps})")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    exit_on_sigterm()
    deadline, t_start = Deadline(args.time_limit_s), time.perf_counter()
    out, setup, table = Path(args.out), None, None
    # the baseline first: every other row's ratios are taken against it
    order = sorted(args.methods, key=lambda m: m != BASELINE)
    done, mine = [], []
    try:
        setup = prepare(args, args.steps * args.batch_size * args.grad_accum, deadline)
        n_params, n_matmul = param_counts(setup.model)
        head = header(
            "fastdpo training benchmark", args.device, [shlex.quote(a) for a in argv], "bench_train.py", args.note
        )
        head.insert(
            -1,
            f"- model: {args.model or 'preset ' + args.preset} ({n_params / 1e6:.1f}M parameters, "
            f"{n_matmul / 1e6:.1f}M in per-token matmuls), dtype {args.dtype}, batch {args.batch_size} × "
            f"{args.grad_accum}, {args.steps} steps (medians over the last {args.steps - args.warmup}), "
            f"{args.repeats} run(s) per method",
        )
        table = Table(out, COLUMNS, head, MD_COLUMNS, append=args.append)
        print(
            f"bench_train: {args.model or args.preset} ({n_matmul / 1e6:.1f}M matmul params), {setup.n_pairs} "
            f"pairs, {args.device} {args.dtype}, methods {' '.join(order)}",
            flush=True,
        )
        pre = precompute(setup)  # also defines the token counts every method is measured on
        if pre["status"] != "ok":
            raise SystemExit(f"bench_train: precompute failed ({pre['status']}); see {setup.logs / 'precompute.log'}")
        setup.lengths, setup.shard_bounds = pre["lengths"], pre["shard_bounds"]
        stats = {k: statistics.mean(v) for k, v in setup.lengths.items()}
        stats["tokens_per_pair"] = 2 * stats["prompt"] + stats["chosen"] + stats["rejected"]
        stats["model_state_gib"] = 4 * n_params * (2 if args.dtype == "bf16" else 4) / 2**30
        commands = {"precompute": "fastdpo " + shlex.join(pre["argv"])}
        print(
            f"precompute: {pre['precompute_s']:.1f}s; tokens per pair P {stats['prompt']:.0f} C "
            f"{stats['chosen']:.0f} R {stats['rejected']:.0f}",
            flush=True,
        )
        for method in order:
            runs = []
            for rep in range(args.repeats):
                res = run_method(setup, method, args.batch_size, args.steps, f"-run{rep}")
                runs.append(res)
                print(
                    f"{method:>15} run {rep}: {res['status']}, {res.get('wall_s', 0):.0f}s wall, "
                    f"peak {fmt(res.get('peak_gib'), '.3f')} GiB",
                    flush=True,
                )
                if res["status"] != "ok":
                    break
            row = summarise(method, runs, pre, setup, stats["tokens_per_pair"], n_matmul)
            mine.append(row)
            add_ratios(mine)  # against this run's baseline (--append: the CSV may hold another run's rows)
            commands[method] = (
                f"DPOTrainer, DPOConfig(precompute_ref_log_probs={method == 'trl-precompute'}, ...) (see trl_worker.py)"
                if method.startswith("trl")
                else "fastdpo " + shlex.join(fastdpo_argv(setup, method, args.batch_size, args.steps))
            )
            table.add(row)
            done.append(method)
            lines = footer(mine, setup, stats, commands)  # this run's rows (--append: not the earlier ones)
            table.set_footer([line.replace(str(setup.tmp), "$TMP") for line in lines])
        title = (
            f"{args.model or args.preset}, {args.dataset or args.data} data, batch {args.batch_size}, "
            f"{args.dtype}, {machine_name(args.device)}"
        )
        if not args.no_plot:
            plot(mine, out.with_suffix(".png"), title, args.sweep_k)
        print(f"bench_train: {time.perf_counter() - t_start:.0f}s -> {out}.{{csv,md}}", flush=True)
        return mine
    finally:
        status = unfinished_status()
        if table is not None:
            for method in order[len(done) :]:
                table.add(
                    dict(
                        method=method,
                        status=status,
                        model=model_name(args),
                        data=args.dataset or args.data,
                        device=args.device,
                        dtype=args.dtype,
                    )
                )
        cleanup(setup, args)


if __name__ == "__main__":
    main()
