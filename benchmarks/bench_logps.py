"""Benchmark DPO log-prob computation: fastdpo's kernels vs eager, torch.compile, chunked torch, TRL, Liger and CCE.

Two workloads, named in the `workload` column, and a bandwidth reference:
  logits  logits (N, V) -> per-sequence sums of log p(label): fastdpo-triton, chunked-torch (fastdpo's torch
          backend), eager (`log_softmax(logits.float()).gather()`, masked sum), compile (torch.compile of eager),
          liger-ce (Liger's cross-entropy, reduction="sum": it writes its gradient during the forward).
  head    hidden (N, H) and the LM head (V, H) -> the same sums, the LM-head GEMMs included. Side by side, like for
          like: fastdpo-linear (fused log-probs, 4 GEMMs) beside liger-linear (Liger's fused linear cross-entropy,
          reduction="none", per-row weights reach its backward), cce-linear (Apple's Cut Cross-Entropy, exact:
          filter_eps=None) and cce-linear-filtered (its default gradient filter, which skips the gradient of
          probabilities under a bf16 threshold: most of the backward on random logits, so faster and not exact);
          fastdpo-linear-loss (the loss formed inside the head, 3 GEMMs, all in the forward) beside
          liger-linear-sum (reduction="sum", also 3 GEMMs with its gradient made in the forward); eager-head
          (F.linear + eager), compile-head, triton-head (F.linear + fastdpo-triton), trl-head (TRL's chunked fused
          head, completion positions only); *-frozen: the head needs no gradient (LoRA).
  copy    a device-to-device copy of the logits (read + write N x V): the bandwidth this device reaches in this run,
          which the logits rows are stated against beside the datasheet's (`pct_copy_bw`, `pct_peak_bw`).
Modes: forward (training forward, grad enabled), backward (backward only; the forward is untimed), full (both).

Inputs are made once per workload, on the device, by a seeded generator, and shared by every provider (a provider
whose backward overwrites its logits, fastdpo-triton, gets a fresh copy each repetition, untimed). Each row is
appended to PREFIX.csv and PREFIX.md the moment it is measured; `--time-limit-s` (and SIGTERM) turn the rows not
reached into `cut (budget)` rows. Each row: median / p20 / p80 time, peak memory above the inputs
(torch.cuda.max_memory_allocated on GPU; on CPU the peak-RSS delta via /proc/self/clear_refs, approximate, or "n/a"),
GB/s for the logits workload and the copy (minimal traffic: read N x V in forward, read + write in backward) and its
fraction of the datasheet's and of the measured copy's bandwidth, TFLOP/s of the useful GEMMs for the head workload.
`seconds` is the row's whole wall time, warm-up included: torch.compile's compile (the compile rows) shows there,
never in the medians.

GPU run (on any CUDA machine; the shape gpu_check.sh measures is Qwen2.5-0.5B's, H 896):
    python benchmarks/bench_logps.py --vocab 128256 151936 --tokens 8192 16384 32768 --hidden 2048 --dtype bf16 \
        --out benchmarks/results/gpu_bf16

Tiny CPU run (torch providers; what benchmarks/results/cpu_tiny.* holds; CPU timings say nothing about the GPU):
    python benchmarks/bench_logps.py --vocab 4096 --tokens 1024 --hidden 128 --seq-len 256 --dtype fp32 \
        --providers copy eager compile chunked-torch fastdpo-linear fastdpo-linear-loss fastdpo-linear-frozen \
        eager-head trl-head trl-head-frozen --reps 5 --warmup 2 --out benchmarks/results/cpu_tiny

Triton on the CPU interpreter (tiny shapes only, slow; timings meaningless, checks that it runs):
    TRITON_INTERPRET=1 python benchmarks/bench_logps.py --vocab 500 --tokens 64 --hidden 32 \
        --providers fastdpo-triton fastdpo-linear --reps 2 --out /tmp/bench_interp
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import time

import torch
from common import Deadline, Table, exit_on_sigterm, header, one_line, quantile, unfinished_status
from logps_providers import PROVIDERS, Case, Provider, make_inputs

# Datasheet HBM bandwidth, bytes/s, keyed by a substring of torch.cuda.get_device_name()
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.039e12}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("forward", "backward", "full")
COLUMNS = [
    "provider",
    "workload",
    "mode",
    "vocab",
    "tokens",
    "hidden",
    "dtype",
    "status",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mib",
    "peak_mem_kind",
    "gbps",
    "pct_peak_bw",
    "pct_copy_bw",
    "tflops",
    "seconds",
]


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


class _CpuPeak:
    """Peak RSS above the start, via /proc/self/clear_refs (Linux); None where that is unavailable."""

    def __init__(self):
        self.ok = sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS:")

    def peak(self) -> int | None:
        return self._status("VmHWM:") - self.base if self.ok else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(provider: Provider, data: dict, case: Case, mode: str, reps: int, warmup: int) -> dict:
    times, peaks = [], []
    cpu_peak = _CpuPeak()
    cuda = case.device.type == "cuda"
    copy_to = torch.empty_like(data["logits"]) if provider.workload == "copy" else None
    gc.collect()  # once: the repetitions free their tensors by refcount (del below)
    for i in range(warmup + reps):
        leaves = provider.inputs(data) if copy_to is None else []
        _sync(case.device)
        if cuda:
            base = torch.cuda.memory_allocated(case.device)
            torch.cuda.reset_peak_memory_stats(case.device)
        else:
            cpu_peak.start()
        out = None
        if mode == "backward":
            out = provider.forward(data, leaves)
            _sync(case.device)
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if copy_to is not None:
            copy_to.copy_(data["logits"])
        else:
            if mode != "backward":
                out = provider.forward(data, leaves)
            if mode != "forward":
                torch.autograd.grad((out * data["upstream"][: out.numel()]).sum(), leaves)
        if cuda:
            end.record()
            torch.cuda.synchronize(case.device)
            elapsed = start.elapsed_time(end) / 1e3
            peak = torch.cuda.max_memory_allocated(case.device) - base
        else:
            elapsed = time.perf_counter() - t0
            peak = cpu_peak.peak()
        del out, leaves
        if i >= warmup:
            times.append(elapsed)
            peaks.append(peak)
    return {"times": times, "peak": None if any(p is None for p in peaks) else max(peaks)}


def device_peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def base_row(provider: Provider, case: Case, mode: str, dtype_name: str) -> dict:
    return dict(
        provider=provider.name,
        workload=provider.workload,
        mode=mode,
        vocab=case.vocab,
        tokens=case.shape[0] * case.shape[1],
        hidden=case.hidden if provider.workload == "head" else "",
        dtype=dtype_name,
    )


def row_for(
    provider: Provider,
    data: dict,
    case: Case,
    mode: str,
    reps: int,
    warmup: int,
    dtype_name: str,
    copy_gbps: float | None = None,
) -> dict:
    row = base_row(provider, case, mode, dtype_name)
    t_row = time.perf_counter()
    reason = provider.available(case)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    try:
        res = measure(provider, data, case, mode, reps, warmup)
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "oom"}
    except Exception as e:  # noqa: BLE001 - one provider failing must not stop the table
        return {**row, "status": f"error: {one_line(e, 120)}"}
    finally:
        gc.collect()
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    med = statistics.median(res["times"])
    row.update(
        status="ok",
        median_ms=f"{med * 1e3:.4g}",
        p20_ms=f"{quantile(res['times'], 0.2) * 1e3:.4g}",
        p80_ms=f"{quantile(res['times'], 0.8) * 1e3:.4g}",
        seconds=f"{time.perf_counter() - t_row:.1f}",
    )
    if res["peak"] is None:
        row.update(peak_mem_mib="n/a", peak_mem_kind="n/a")
    else:
        kind = "cuda_max_allocated" if case.device.type == "cuda" else "cpu_peak_rss_delta"
        row.update(peak_mem_mib=f"{res['peak'] / 2**20:.1f}", peak_mem_kind=kind)
    n, v = case.shape[0] * case.shape[1], case.vocab
    if provider.workload in ("logits", "copy"):
        # read; read + write; both (a copy: read + write)
        passes = 2 if provider.workload == "copy" else {"forward": 1, "backward": 2, "full": 3}[mode]
        gbps = passes * n * v * torch.tensor([], dtype=case.dtype).element_size() / med / 1e9
        copy_gbps = gbps if provider.workload == "copy" else copy_gbps  # the copy is its own reference
        peak_bw = device_peak_bandwidth(case.device)
        row.update(
            gbps=f"{gbps:.1f}",
            pct_peak_bw=f"{100 * gbps * 1e9 / peak_bw:.1f}" if peak_bw else "n/a",
            pct_copy_bw=f"{100 * gbps / copy_gbps:.1f}" if copy_gbps else "n/a",
        )
    else:
        # useful N x V x H GEMMs: logits; grad_hidden (+ grad_weight unless frozen)
        gemms = {"forward": 1, "backward": 1 if provider.frozen else 2}.get(mode, 2 if provider.frozen else 3)
        row.update(tflops=f"{gemms * 2 * n * v * case.hidden / med / 1e12:.4g}")
    return row


def roofline_lines(rows: list[dict], device: torch.device) -> list[str]:
    """The logits rows' bandwidth stated against the datasheet and against this run's copy."""
    peak = device_peak_bandwidth(device)
    copies = [r for r in rows if r["provider"] == "copy" and r["status"] == "ok"]
    lines = ["## Bandwidth reference", ""]
    lines.append(
        f"- datasheet: {peak / 1e12:.2f} TB/s ({torch.cuda.get_device_name(device)})"
        if peak
        else "- datasheet: n/a (" + ("not in PEAK_BANDWIDTH" if device.type == "cuda" else "CPU") + ")"
    )
    for r in copies:
        lines.append(
            f"- device-to-device copy measured in this run (V={r['vocab']}, N={r['tokens']}, {r['dtype']}): "
            f"{float(r['gbps']) / 1e3:.2f} TB/s" + (f", {r['pct_peak_bw']}% of the datasheet" if peak else "")
        )
    lines += [
        "- logits rows: `pct_peak_bw` is GB/s over the datasheet's, `pct_copy_bw` over the copy's: the copy is "
        "what a kernel that reads and writes its data once can reach here.",
        "",
    ]
    if device.type != "cuda":
        lines.insert(2, "- CPU: bandwidths here say nothing about a GPU (interpreted Triton, shared cores).")
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (sums are per sequence)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--providers",
        nargs="+",
        choices=list(PROVIDERS),
        default=list(PROVIDERS),
        help="in the order measured; `copy` is the bandwidth reference of the logits rows",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="stop starting rows after this many seconds; the rest are written as `cut (budget)`",
    )
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.csv and PREFIX.md, row by row")
    p.add_argument("--append", action="store_true", help="add to an existing PREFIX.csv instead of replacing it")
    p.add_argument("--note", default=None, help="a line added to the markdown header (e.g. the machine's load)")
    return p.parse_args(argv)


def plan(args, device) -> list[tuple[Case, str, str]]:
    """(case, provider, mode) in the order measured: per case, the copy first, then the providers as given."""
    out = []
    names = sorted(args.providers, key=lambda n: n != "copy")  # stable: the given order otherwise
    for vocab in args.vocab:
        for tokens in args.tokens:
            case = Case(vocab, tokens, args.hidden, DTYPES[args.dtype], device, args.seq_len)
            for name in names:
                for mode in ("copy",) if name == "copy" else args.modes:
                    out.append((case, name, mode))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    exit_on_sigterm()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    deadline = Deadline(args.time_limit_s)
    head = header(
        "fastdpo log-prob benchmark", str(device), [shlex.quote(a) for a in argv], "bench_logps.py", args.note
    )
    head.insert(-1, f"- TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}; inputs generated on {device}")
    table = Table(args.out, COLUMNS, head, append=args.append)
    todo = plan(args, device)
    data_key, data, copy_gbps, last_s = None, None, {}, 0.0
    try:
        while todo:
            case, name, mode = todo[0]
            provider = PROVIDERS[name]()
            if deadline.left() < last_s:  # the next row would not finish in time
                break
            key = (case.vocab, case.tokens, "logits" if provider.workload == "copy" else provider.workload)
            if key != data_key:
                data = None  # free the previous workload's inputs first
                gc.collect()
                data_key, data = key, make_inputs(case, key[2])
            t0 = time.perf_counter()
            row = row_for(
                provider, data, case, mode, args.reps, args.warmup, args.dtype, copy_gbps.get((case.vocab, case.tokens))
            )
            last_s = time.perf_counter() - t0
            if name == "copy" and row["status"] == "ok":
                copy_gbps[(case.vocab, case.tokens)] = float(row["gbps"])
            row = table.add(row)
            todo.pop(0)
            print(
                f"{row['provider']:>20} {row['mode']:>8} V={case.vocab} N={case.tokens}: {row['status']:<8} "
                f"median {row['median_ms'] or '-'} ms  peak {row['peak_mem_mib'] or '-'} MiB",
                flush=True,
            )
    finally:
        status = unfinished_status()
        for case, name, mode in todo:  # not reached: the time limit, SIGTERM, or an error
            table.add({**base_row(PROVIDERS[name](), case, mode, args.dtype), "status": status})
        table.set_footer(roofline_lines(table.rows, device))
    return table.rows


if __name__ == "__main__":
    main()
