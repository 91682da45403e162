"""Benchmark DPO log-prob computation: fastdpo kernels vs eager, torch.compile, chunked torch, TRL, Liger and CCE.

Two workloads, named in the `workload` column:
  logits  logits (N, V) -> per-sequence sums of log p(label): fastdpo-triton, chunked-torch (fastdpo's torch
          backend), eager (`log_softmax(logits.float()).gather()`, masked sum), compile (torch.compile of eager),
          liger-ce (Liger's cross-entropy, reduction="sum": it writes its gradient during the forward).
  head    hidden (N, H) and the LM head (V, H) -> the same sums, the LM-head GEMMs included: fastdpo-linear
          (fused head), eager-head (F.linear + eager), compile-head (torch.compile of eager-head), triton-head
          (F.linear + fastdpo-triton), trl-head (TRL's chunked fused head, completion positions only), and the
          fused linear cross-entropies made for this: liger-linear (Liger-Kernel's, reduction="none", so per-row
          weights reach its backward) and cce-linear (Apple's Cut Cross-Entropy, reduction="none", its default
          gradient filter); *-frozen: the head needs no gradient (LoRA).
Modes: forward (training forward, grad enabled), backward (backward only; the forward is untimed), full (both).
Each row: median / p20 / p80 time, peak memory above the inputs with the forward included in every mode
(torch.cuda.max_memory_allocated on GPU; on CPU the peak-RSS delta via /proc/self/clear_refs, approximate because
the allocator reuses freed memory, or "n/a"), effective GB/s for the logits workload (minimal traffic: read N x V
in forward, read + write in backward) and its fraction of the device's datasheet bandwidth (GPU only), and TFLOP/s
of the useful GEMMs for the head workload.

GPU run (the numbers the goals refer to; not run yet in this repository):
    python benchmarks/bench_logps.py --vocab 128256 151936 --tokens 8192 16384 32768 --hidden 2048 --dtype bf16 \
        --out benchmarks/results/gpu_bf16

Tiny CPU run (torch providers; what benchmarks/results/cpu_tiny.* holds; CPU timings say nothing about the GPU):
    python benchmarks/bench_logps.py --vocab 4096 --tokens 1024 --hidden 128 --seq-len 256 --dtype fp32 \
        --providers eager compile chunked-torch fastdpo-linear fastdpo-linear-frozen eager-head trl-head \
        trl-head-frozen --reps 5 --warmup 2 --out benchmarks/results/cpu_tiny

Triton on the CPU interpreter (tiny shapes only, slow; timings meaningless, checks that it runs):
    TRITON_INTERPRET=1 python benchmarks/bench_logps.py --vocab 500 --tokens 64 --hidden 32 \
        --providers fastdpo-triton fastdpo-linear --reps 2 --out /tmp/bench_interp
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from fastdpo.kernels import (
    HAS_TRITON,
    linear_token_logps,
    linear_token_loss,
    loss_chunk_tokens,
    sequence_logps,
    sequence_logps_ref,
)
from fastdpo.kernels._utils import interpreter_enabled

from fastdpo.modeling import machine_name

# Datasheet HBM bandwidth, bytes/s, keyed by a substring of torch.cuda.get_device_name()
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "A100-SXM4-80GB": 2.039e12}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("forward", "backward", "full")
# The Triton interpreter runs a few hundred thousand logits per second: refuse anything bigger
INTERPRETER_MAX_LOGITS = 1 << 21
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
    "tflops",
]


# ----------------------------------------------------------------------------------------------------------------
# providers: each builds inputs (untimed) and returns the (B,) per-sequence log-prob sums
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    vocab: int
    tokens: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    seq_len: int

    @property
    def shape(self) -> tuple[int, int]:
        b = max(1, self.tokens // self.seq_len)
        return b, self.tokens // b


class Provider:
    name = ""
    workload = "logits"
    frozen = False  # head workload: an LM head without gradient (LoRA), only hidden gets one

    def available(self, case: Case) -> str | None:
        """None when runnable, else the reason it is skipped."""
        return None

    def prepare(self, case: Case):
        """Untimed: build the data once per case."""
        g = torch.Generator(device="cpu").manual_seed(0)
        b, t = case.shape
        labels = torch.randint(0, case.vocab, (b, t), generator=g).to(case.device)
        mask = torch.ones(b, t, dtype=torch.bool, device=case.device)
        upstream = torch.randn(b, generator=g).to(case.device)  # per-sequence weights, as DPO gives
        if self.workload == "logits":
            logits = (torch.randn(b, t, case.vocab, generator=g) * 3).to(case.dtype).to(case.device)
            return {"logits": logits, "labels": labels, "mask": mask, "upstream": upstream}
        hidden = torch.randn(b, t, case.hidden, generator=g).to(case.dtype).to(case.device)
        weight = (torch.randn(case.vocab, case.hidden, generator=g) / case.hidden**0.5).to(case.dtype).to(case.device)
        return {"hidden": hidden, "weight": weight, "labels": labels, "mask": mask, "upstream": upstream}

    def inputs(self, data):
        """Untimed, per repetition: fresh leaves (the fastdpo backward consumes its logits buffer)."""
        if self.workload == "logits":
            return [data["logits"].clone().requires_grad_()]
        hidden = data["hidden"].detach().requires_grad_()
        return [hidden] if self.frozen else [hidden, data["weight"].detach().requires_grad_()]

    def head(self, data, leaves):
        """(hidden, weight) for the head workload; the weight is a leaf unless the head is frozen."""
        return leaves[0], data["weight"] if self.frozen else leaves[1]

    def forward(self, data, leaves) -> torch.Tensor:
        raise NotImplementedError


class Eager(Provider):
    name = "eager"

    def forward(self, data, leaves):
        return sequence_logps_ref(leaves[0], data["labels"], data["mask"])


class Compiled(Provider):
    name = "compile"

    def __init__(self):
        self.fn = None

    def forward(self, data, leaves):
        if self.fn is None:
            self.fn = torch.compile(sequence_logps_ref, dynamic=False)
        return self.fn(leaves[0], data["labels"], data["mask"])


def _triton_reason(case: Case, logits: int) -> str | None:
    if not HAS_TRITON:
        return "triton not installed"
    if case.device.type == "cuda":
        return None
    if not interpreter_enabled():
        return "needs CUDA or TRITON_INTERPRET=1"
    if logits > INTERPRETER_MAX_LOGITS:
        return f"too big for the Triton interpreter (> {INTERPRETER_MAX_LOGITS} logits)"
    return None


class FastdpoTriton(Provider):
    name = "fastdpo-triton"

    def available(self, case):
        return _triton_reason(case, case.tokens * case.vocab)

    def forward(self, data, leaves):
        # the fresh leaf is the logits buffer the backward overwrites (inputs() clones it every repetition)
        return sequence_logps(leaves[0], data["labels"], data["mask"], "triton")


class ChunkedTorch(Provider):
    name = "chunked-torch"

    def forward(self, data, leaves):
        return sequence_logps(leaves[0], data["labels"], data["mask"], "torch")


class LigerCE(Provider):
    name = "liger-ce"

    def available(self, case):
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception:  # noqa: BLE001 - any import failure means "not installed" here
            return "liger-kernel not installed"
        return None if case.device.type == "cuda" else "Liger needs CUDA"

    def forward(self, data, leaves):
        from liger_kernel.transformers import LigerCrossEntropyLoss

        logits, labels, mask = leaves[0], data["labels"], data["mask"]
        targets = labels.masked_fill(~mask, -100).reshape(-1)
        # Total log-prob (reduction="sum"): Liger precomputes its gradient for a scalar loss, so no per-row weights
        loss = LigerCrossEntropyLoss(ignore_index=-100, reduction="sum")(logits.reshape(-1, logits.shape[-1]), targets)
        return -loss.reshape(1)


class FastdpoLinear(Provider):
    name = "fastdpo-linear"
    workload = "head"  # backend "auto": Triton on CUDA, the torch backend on CPU

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        return linear_token_logps(h, w, data["labels"], data["mask"]).sum(-1)


class EagerHead(Provider):
    name = "eager-head"
    workload = "head"

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        return sequence_logps_ref(F.linear(h, w), data["labels"], data["mask"])


class CompiledHead(Provider):
    name = "compile-head"
    workload = "head"

    def __init__(self):
        self.fn = None

    def forward(self, data, leaves):
        if self.fn is None:
            self.fn = torch.compile(lambda h, w, labels, mask: sequence_logps_ref(F.linear(h, w), labels, mask),
                                    dynamic=False)
        h, w = self.head(data, leaves)
        return self.fn(h, w, data["labels"], data["mask"])


def _peer_reason(case: Case, module: str, package: str) -> str | None:
    """A fused cross-entropy made for this (Triton kernels): skipped when not installed or without CUDA (the
    interpreter, on tiny shapes, lets a CPU run check the call)."""
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return f"{package} not installed"
    return _triton_reason(case, case.tokens * case.vocab)


class LigerLinear(Provider):
    name = "liger-linear"
    workload = "head"

    def available(self, case):
        return _peer_reason(case, "liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel")

    def forward(self, data, leaves):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        h, w = self.head(data, leaves)
        labels, mask = data["labels"], data["mask"]
        targets = labels.masked_fill(~mask, -100).reshape(-1)
        # per-token losses (Liger then computes its gradient in the backward, with the per-row weights)
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="none")(
            w, h.reshape(-1, h.shape[-1]), targets)
        return -loss.reshape(labels.shape).sum(-1)


class CceLinear(Provider):
    name = "cce-linear"
    workload = "head"

    def available(self, case):
        reason = _peer_reason(case, "cut_cross_entropy", "cut-cross-entropy")
        if reason is None and case.device.type != "cuda":
            return "CCE needs CUDA (its kernels fail on Triton's interpreter)"
        return reason

    def forward(self, data, leaves):
        from cut_cross_entropy import linear_cross_entropy

        h, w = self.head(data, leaves)
        labels, mask = data["labels"], data["mask"]
        loss = linear_cross_entropy(h, w, labels.masked_fill(~mask, -100), reduction="none")
        return -loss.reshape(labels.shape).sum(-1)


class TritonHead(Provider):
    name = "triton-head"
    workload = "head"

    def available(self, case):
        return _triton_reason(case, case.tokens * case.vocab)

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        return sequence_logps(F.linear(h, w), data["labels"], data["mask"], "triton")


class TrlHead(Provider):
    name = "trl-head"
    workload = "head"

    def available(self, case):
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: F401
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"trl fused head unavailable ({type(e).__name__})"
        return None

    def forward(self, data, leaves):
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        h, w = self.head(data, leaves)
        labels, mask = data["labels"], data["mask"]
        # As TRL's add_fused_lm_head does on Triton devices: score the completion positions only
        logps, *_ = ChunkedLogProbFunction.apply(
            h[mask], w, None, labels[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
        )
        return logps.new_zeros(mask.shape).masked_scatter(mask, logps).sum(-1)


class FastdpoLinearLoss(Provider):
    """The loss formed inside the head (`linear_token_loss`): a chunk's gradient is known while its logits are in
    memory, so forward + backward cost 3 GEMMs (all in the forward) instead of 4. Times are meaningful in `full`
    mode only. The loss is sum_b upstream_b * logp_b, returned divided by upstream_0 so that the harness's
    weighting (out * upstream[:1]) gives it back: the same gradient as every other provider."""

    name = "fastdpo-linear-loss"
    workload = "head"

    def forward(self, data, leaves):
        h, w = self.head(data, leaves)
        b, t = data["labels"].shape
        up = data["upstream"]
        seq = torch.arange(b, device=h.device).repeat_interleave(t)
        chunk = max(1, loss_chunk_tokens(w.shape[0], w.element_size()) // t) * t  # whole sequences per chunk
        bounds = list(range(0, b * t, chunk)) + [b * t]

        def token_loss(start, end, lp):
            g = up[seq[start:end]].float()
            return (g * lp).sum(), g

        loss, _ = linear_token_loss(h.reshape(b * t, -1), w, data["labels"].reshape(-1), bounds, token_loss)
        return (loss / up[0]).reshape(1)


class FastdpoLinearFrozen(FastdpoLinear):
    name = "fastdpo-linear-frozen"
    frozen = True  # the hidden gradient is computed in the forward: no recomputation in backward


class TrlHeadFrozen(TrlHead):
    name = "trl-head-frozen"
    frozen = True


PROVIDERS = {
    p.name: p
    for p in (
        FastdpoTriton,
        FastdpoLinear,
        FastdpoLinearLoss,
        Eager,
        Compiled,
        ChunkedTorch,
        TrlHead,
        LigerCE,
        EagerHead,
        CompiledHead,
        TritonHead,
        FastdpoLinearFrozen,
        TrlHeadFrozen,
        LigerLinear,
        CceLinear,
    )
}


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


def measure(provider: Provider, case: Case, mode: str, reps: int, warmup: int) -> dict:
    data = provider.prepare(case)
    times, peaks = [], []
    cpu_peak = _CpuPeak()
    cuda = case.device.type == "cuda"
    gc.collect()  # once: the repetitions free their tensors by refcount (del below)
    for i in range(warmup + reps):
        leaves = provider.inputs(data)
        _sync(case.device)
        if cuda:
            base = torch.cuda.memory_allocated(case.device)
            torch.cuda.reset_peak_memory_stats(case.device)
        else:
            cpu_peak.start()
        if mode == "backward":
            out = provider.forward(data, leaves)
            _sync(case.device)
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
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


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def device_peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def row_for(provider: Provider, case: Case, mode: str, reps: int, warmup: int, dtype_name: str) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(
        provider=provider.name,
        workload=provider.workload,
        mode=mode,
        vocab=case.vocab,
        tokens=case.shape[0] * case.shape[1],
        hidden=case.hidden if provider.workload == "head" else "",
        dtype=dtype_name,
    )
    reason = provider.available(case)
    if reason:
        row["status"] = f"skipped: {reason}"
        return row
    try:
        res = measure(provider, case, mode, reps, warmup)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
        return row
    except Exception as e:  # noqa: BLE001 - one provider failing must not stop the table
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return row
    finally:
        gc.collect()
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    med = statistics.median(res["times"])
    row.update(
        status="ok",
        median_ms=f"{med * 1e3:.4g}",
        p20_ms=f"{_quantile(res['times'], 0.2) * 1e3:.4g}",
        p80_ms=f"{_quantile(res['times'], 0.8) * 1e3:.4g}",
    )
    if res["peak"] is None:
        row.update(peak_mem_mib="n/a", peak_mem_kind="n/a")
    else:
        kind = "cuda_max_allocated" if case.device.type == "cuda" else "cpu_peak_rss_delta"
        row.update(peak_mem_mib=f"{res['peak'] / 2**20:.1f}", peak_mem_kind=kind)
    n, v = case.shape[0] * case.shape[1], case.vocab
    if provider.workload == "logits":
        passes = {"forward": 1, "backward": 2, "full": 3}[mode]  # read; read + write; both
        gbps = passes * n * v * torch.tensor([], dtype=case.dtype).element_size() / med / 1e9
        peak_bw = device_peak_bandwidth(case.device)
        row.update(gbps=f"{gbps:.1f}" if case.device.type == "cuda" else "n/a")
        row.update(pct_peak_bw=f"{100 * gbps * 1e9 / peak_bw:.1f}" if peak_bw else "n/a")
        row.update(tflops="")
    else:
        # useful N x V x H GEMMs: logits; grad_hidden (+ grad_weight unless frozen)
        gemms = {"forward": 1, "backward": 1 if provider.frozen else 2}.get(mode, 2 if provider.frozen else 3)
        row.update(gbps="", pct_peak_bw="", tflops=f"{gemms * 2 * n * v * case.hidden / med / 1e12:.4g}")
    return row


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _markdown(rows: list[dict], device: torch.device, argv: list[str], note: str | None = None) -> str:
    kind = "GPU" if device.type == "cuda" else "CPU (not a GPU result: tiny shapes, for smoke-testing only)"
    lines = [
        "# fastdpo log-prob benchmark",
        "",
        f"- machine: {machine_name(device)} — {kind}",
        f"- torch {torch.__version__}, triton {_triton_version()}, python {platform.python_version()}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python benchmarks/bench_logps.py {shlex.join(argv)}`",
        f"- TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}",
        *([f"- note: {note}"] if note else []),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (sums are per sequence)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.csv and PREFIX.md")
    p.add_argument("--note", default=None, help="a line added to the markdown header (e.g. the machine's load)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            case = Case(vocab, tokens, args.hidden, dtype, device, args.seq_len)
            for name in args.providers:
                provider = PROVIDERS[name]()
                for mode in args.modes:
                    row = row_for(provider, case, mode, args.reps, args.warmup, args.dtype)
                    rows.append(row)
                    print(
                        f"{row['provider']:>15} {row['mode']:>8} V={vocab} N={tokens}: {row['status']:<8} "
                        f"median {row['median_ms'] or '-'} ms  peak {row['peak_mem_mib'] or '-'} MiB",
                        flush=True,
                    )
    if args.out:
        prefix = Path(args.out)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        with open(prefix.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        prefix.with_suffix(".md").write_text(_markdown(rows, device, argv, args.note))
    return rows


if __name__ == "__main__":
    main()
