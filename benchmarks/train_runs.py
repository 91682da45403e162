"""What the training benchmarks share (bench_train.py, bench_fit.py, fit_estimate.py, gpu_check.py): model presets,
synthetic data, and one training run per subprocess (`python benchmarks/train_runs.py --worker JOB.json`).

Every method trains the same model on the same pairs with the same batch size, lengths, dtype and optimizer (AdamW,
linear schedule, lr 1e-6, beta 0.1, grad clip 1.0), each in its own subprocess (so a CPU peak RSS is that method's
own; stdout and stderr go to LOGS/NAME.log), with the time left as its timeout:

  fastdpo-packed    `fastdpo precompute` once, then `fastdpo train --ref-cache` (policy only, fused log-probs),
                    packing + prefix sharing on
  fastdpo-padded    the same cache and trainer, --no-packing --no-prefix-sharing
  two-model         the baseline: `fastdpo train --dataset D --ref-model R --logps-backend eager --no-packing
                    --no-prefix-sharing` (reference loaded and run every step, log-softmax over full logits)
  trl-live          TRL DPOTrainer with its reference model run every step
  trl-precompute    TRL DPOTrainer with precompute_ref_log_probs=True (a reference pass inside the trainer)

The data is one epoch: steps x batch x accumulation pairs (synthetic, `--data short|long`, or `--dataset PATH`).
Models are presets built from configs with random weights (PRESETS), saved with a tokenizer trained on the synthetic
words (about one token per word), or `--model PATH`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import Deadline, one_line, run_child
from presets import DATA, PRESETS, build_preset, synthetic_words, write_pairs

from fastdpo import optim

METHODS = ("fastdpo-packed", "fastdpo-padded", "two-model", "trl-live", "trl-precompute")
BASELINE = "two-model"
SEED = 42  # data order and initialisation, every method
DTYPES = ("fp32", "bf16", "bf16-mixed")


def is_fastdpo(method: str) -> bool:
    return method.startswith("fastdpo")


# ----------------------------------------------------------------------------------------------------------------
# workers: each job runs in its own subprocess and writes a result JSON
# ----------------------------------------------------------------------------------------------------------------


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _peak_gib(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    from fastdpo.metrics import peak_rss_gb

    return peak_rss_gb(), "cpu_peak_rss"  # VmHWM: not the parent's size, as ru_maxrss can be


def _limit_cuda_memory(job: dict) -> None:
    """Fit test on GPU: the allocator refuses (OOM) past the budget."""
    if job["device"].startswith("cuda") and job.get("budget_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job["budget_gib"] * 2**30 / total))


def worker_fastdpo(job: dict) -> dict:
    """`fastdpo precompute|train ARGV`, in this process (the CLI's code path, plus a memory reading)."""
    from fastdpo.cli import main as fastdpo_main

    rc = fastdpo_main(job["argv"])
    return {"status": "ok" if rc == 0 else f"error: fastdpo exited {rc}"}


def worker_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    rss_start = _rss_gib()  # after importing torch: the runtime, before any model is loaded
    _limit_cuda_memory(job)
    try:
        if job["kind"] == "trl":
            from trl_worker import worker_trl

            result = worker_trl(job)
        else:
            result = worker_fastdpo(job)
    except torch.cuda.OutOfMemoryError as e:  # the fit test's "does not fit", told apart from any other error
        result = {"status": "oom", "error": one_line(e)}
    except Exception as e:  # noqa: BLE001 - reported as the run's status, with its reason; the traceback is logged
        import traceback

        traceback.print_exc()
        result = {"status": f"error: {one_line(e)}"}
    peak, kind = _peak_gib(job["device"])
    result.update(rss_start_gib=rss_start, peak_gib=peak, peak_kind=kind)
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# driver: one subprocess per run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What every method shares in one invocation."""

    model: str
    dataset: str
    n_pairs: int
    tmp: Path
    logs: Path
    args: argparse.Namespace
    deadline: Deadline = field(default_factory=lambda: Deadline(None))  # each run's timeout: the time left
    lengths: dict | None = None  # prompt, chosen, rejected token counts per pair (from the cache)
    shard_bounds: list[int] | None = None

    @property
    def cache(self) -> Path:
        return self.tmp / "cache"


def run_job(setup: Setup, name: str, job: dict) -> dict:
    """Run one job in a subprocess; stderr and stdout go to LOGS/NAME.log. Returns the worker's result."""
    job_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=setup.tmp))
    job = {**job, "device": setup.args.device, "result": str(job_dir / "result.json")}
    job.setdefault("output", str(job_dir / "run"))
    if job["kind"] == "fastdpo" and "--output" not in job["argv"]:
        job["argv"] = job["argv"] + ["--output", job["output"]]
    (job_dir / "job.json").write_text(json.dumps(job))
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(job_dir / "hf_datasets"),  # no datasets cache shared by runs
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }
    if os.path.exists(setup.model) and os.path.exists(setup.dataset):  # all local: never wait on the network
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if setup.args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_dir / "job.json")]
    t0 = time.perf_counter()
    log = setup.logs / f"{name}.log"
    log.write_text(f"# {shlex.join(job.get('argv', [])) if job['kind'] == 'fastdpo' else json.dumps(job)}\n")
    rc = run_child(cmd, log, setup.deadline.timeout(reserve=2), env=env, cwd=str(setup.tmp))
    result = {"status": f"error: worker exited {rc}, see {log}"}
    if rc == 124:
        result = {"status": "cut (budget)"}
    elif (job_dir / "result.json").is_file():
        result = json.loads((job_dir / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    result["output"] = job["output"]
    return result


def dtype_flags(args) -> tuple[str, str]:
    """(fastdpo train --dtype, fastdpo precompute --dtype)."""
    return (
        {"fp32": "float32", "bf16": "bfloat16", "bf16-mixed": "bf16-mixed"}[args.dtype],
        "float32" if args.dtype == "fp32" else "bfloat16",
    )


def fastdpo_argv(setup: Setup, method: str, batch_size: int, steps: int, optimizer: str = "adamw") -> list[str]:
    """The `fastdpo train` command line of a fastdpo method (or of the two-model baseline)."""
    a = setup.args
    # an optimizer made for bf16 weights trains them (its reason to exist), whatever --dtype says
    dtype = "bfloat16" if optim.OPTIMIZERS[optimizer].weights == "bf16" else dtype_flags(a)[0]
    argv = [
        "train",
        "--model",
        setup.model,
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        str(a.grad_accum),
        "--max-steps",
        str(steps),
        "--lr",
        str(a.lr),
        "--beta",
        str(a.beta),
        "--dtype",
        dtype,
        "--seed",
        str(SEED),
        "--log-every",
        "1000000",
        "--no-progress",
    ]
    argv += ["--optimizer", optimizer] if optimizer != "adamw" else []
    argv += ["--gradient-checkpointing"] if a.gradient_checkpointing else []
    if method == BASELINE:
        return argv + [
            "--dataset",
            setup.dataset,
            "--ref-model",
            setup.model,
            "--logps-backend",
            "eager",
            "--no-packing",
            "--no-prefix-sharing",
            "--max-length",
            str(a.max_length),
            "--max-prompt-length",
            "none",
            "--limit",
            str(setup.n_pairs),
        ]
    if method == "fastdpo-padded":
        return argv + ["--ref-cache", str(setup.cache), "--no-packing", "--no-prefix-sharing"]
    rows = ["--max-tokens-per-batch", str(a.max_tokens_per_batch)] if a.max_tokens_per_batch else []
    return argv + ["--ref-cache", str(setup.cache), "--packing", "--prefix-sharing", *rows]


def run_method(
    setup: Setup, method: str, batch_size: int, steps: int, tag: str, budget_gib=None, optimizer: str = "adamw"
) -> dict:
    a = setup.args
    if method.startswith("trl"):
        if optimizer != "adamw":
            return {"status": "skipped: TRL runs AdamW only here"}
        try:
            import trl  # noqa: F401
        except ImportError:
            return {"status": "skipped: trl not installed"}
        job = dict(
            kind="trl",
            model=setup.model,
            dataset=setup.dataset,
            n_pairs=setup.n_pairs,
            batch_size=batch_size,
            grad_accum=a.grad_accum,
            steps=steps,
            lr=a.lr,
            beta=a.beta,
            dtype=a.dtype,
            gradient_checkpointing=a.gradient_checkpointing,
            max_length=a.max_length,
            precompute=method == "trl-precompute",
            seed=SEED,
            precompute_batch_size=batch_size,
        )
    else:
        job = dict(kind="fastdpo", argv=fastdpo_argv(setup, method, batch_size, steps, optimizer))
    res = run_job(setup, f"{method}{tag}", {**job, "budget_gib": budget_gib})
    if res["status"] == "ok" and job["kind"] == "fastdpo" and setup.lengths is not None:  # None: no precompute ran
        metrics = [json.loads(line) for line in (Path(res["output"]) / "metrics.jsonl").read_text().splitlines()]
        res["step_end_s"] = [m["elapsed_s"] for m in metrics]
        res["step_tokens"] = fastdpo_step_tokens(setup, batch_size, len(metrics))
        # what fastdpo ran through the model (padding excluded; a shared prompt once)
        pairs = batch_size * a.grad_accum
        res["model_tokens"] = [round(m["tokens_per_s"] / m["samples_per_s"] * pairs) for m in metrics]
        if "padded" in method or method == BASELINE:  # then the two counts are the same tokens
            if any(abs(x - y) > 0.01 * y for x, y in zip(res["model_tokens"], res["step_tokens"])):
                print(f"warning: {method}: fastdpo's token counts differ from the epoch plan's", flush=True)
    if res["status"] == "ok":
        steps = {k: res[k] for k in ("step_end_s", "step_tokens", "model_tokens") if k in res}
        (setup.logs / f"{method}{tag}.steps.json").write_text(json.dumps(steps))
    shutil.rmtree(Path(res["output"]), ignore_errors=True)  # checkpoints of large models fill a disk fast
    return res


def fastdpo_step_tokens(setup: Setup, batch_size: int, n_steps: int) -> list[int]:
    """Tokens (2P + C + R) of each step's pairs, from fastdpo's deterministic epoch plan (seed, lengths)."""
    import numpy as np

    from fastdpo import batching

    p, c, r = (np.array(setup.lengths[k], dtype=np.int64) for k in ("prompt", "chosen", "rejected"))
    tokens = 2 * p + c + r

    def plan(epoch):
        return batching.epoch_plan(
            batching.pair_lengths(p, c, r),
            setup.shard_bounds,
            batch_size * setup.args.grad_accum,
            seed=SEED,
            epoch=epoch,
        )

    plans, out = {}, []
    for step in range(n_steps):
        epoch, k = divmod(step, len(plan(0)))
        plans.setdefault(epoch, plan(epoch))
        out.append(int(tokens[plans[epoch][k]].sum()))
    return out


def precompute(setup: Setup) -> dict:
    a = setup.args
    argv = [
        "precompute",
        "--model",
        setup.model,
        "--dataset",
        setup.dataset,
        "--output",
        str(setup.cache),
        "--batch-size",
        str(a.batch_size),
        "--dtype",
        dtype_flags(a)[1],
        "--device",
        a.device,
        "--max-length",
        str(a.max_length),
        "--max-prompt-length",
        "none",
        "--limit",
        str(setup.n_pairs),
        "--no-progress",
    ]
    res = run_job(setup, "precompute", dict(kind="fastdpo", argv=argv, output=str(setup.cache)))
    if res["status"] == "ok":
        manifest = json.loads((setup.cache / "manifest.json").read_text())
        res["precompute_s"] = manifest["timings"]["forward_s"]  # load the reference, run it, write the shards
        res["lengths"] = pair_lengths(setup.cache, manifest)
        res["shard_bounds"] = [0]
        for entry in manifest["shards"]:
            res["shard_bounds"].append(res["shard_bounds"][-1] + entry["rows"])
        res["argv"] = argv
    return res


def pair_lengths(cache_dir: Path, manifest: dict) -> dict:
    """Prompt, chosen and rejected token counts of every pair, as fastdpo tokenized them."""
    from fastdpo import cache

    lens = {"prompt": [], "chosen": [], "rejected": []}
    for entry in manifest["shards"]:
        table = cache.read_shard(cache_dir / entry["file"])
        for key in lens:
            lens[key] += [len(x) for x in table.column(f"{key}_ids").to_pylist()]
    return lens


# ----------------------------------------------------------------------------------------------------------------
# the arguments and the setup every training benchmark shares
# ----------------------------------------------------------------------------------------------------------------


def model_name(args) -> str:
    """The model as a row names it: the preset, a local directory's name, or the Hub id."""
    if args.model is None:
        return args.preset
    return Path(args.model).name if os.path.isdir(args.model) else args.model


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Model, data, batch and training flags of bench_train.py and bench_fit.py."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape, random weights")
    p.add_argument("--model", default=None, help="a local model directory or Hub id instead of a preset")
    p.add_argument("--data", choices=sorted(DATA), default="short", help="synthetic data shape (prompt, completion)")
    p.add_argument("--prompt-len", type=int, default=None, help="override the mean prompt length (tokens)")
    p.add_argument("--completion-len", type=int, default=None, help="override the mean completion length (tokens)")
    p.add_argument("--dataset", default=None, help="a preference dataset (prompt/chosen/rejected) instead of --data")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch, every method")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run (the data is exactly one epoch)")
    p.add_argument("--max-length", type=int, default=1024, help="cap on prompt+completion tokens, every method")
    p.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        help="fastdpo-packed: cap on a packed row's tokens (default: fastdpo's, a micro-batch per row)",
    )
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--gradient-checkpointing", action="store_true", help="for every method")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="seconds the whole run may take: each run gets the time left as its timeout, the rows not "
        "reached are written as `cut (budget)`",
    )
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv, PREFIX.md (row by row), _logs/")
    p.add_argument("--append", action="store_true", help="add to an existing PREFIX.csv instead of replacing it")
    p.add_argument("--note", default=None, help="a line for the markdown header (e.g. the machine's load)")
    p.add_argument("--logs", default=None, help="the runs' logs folder (default: PREFIX_logs beside the outputs)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary model, data and runs")


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    prompt_len, completion_len = DATA[args.data]
    args.prompt_len = args.prompt_len or prompt_len
    args.completion_len = args.completion_len or completion_len
    if args.time_limit_s is not None and args.time_limit_s <= 0:
        p.error(f"--time-limit-s must be positive, not {args.time_limit_s:g}")
    return args


def prepare(args, n_pairs: int, deadline: Deadline) -> Setup:
    """The data, the model and the logs folder of one invocation (untimed), in a fresh temporary directory."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs) if args.logs else out.parent / f"{out.name}_logs"
    if not args.logs:
        shutil.rmtree(logs, ignore_errors=True)  # the previous run's, of this prefix
    logs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}-"))
    words = synthetic_words(400)
    dataset = args.dataset
    if dataset is None:
        dataset = str(tmp / "pairs.jsonl")
        write_pairs(Path(dataset), n_pairs, args.prompt_len, args.completion_len, words)
    model = args.model
    if model is None:
        dtype = torch.float32 if args.dtype != "bf16" else torch.bfloat16
        model = build_preset(args.preset, tmp / "model", words, dtype, args.device)
    return Setup(model=model, dataset=dataset, n_pairs=n_pairs, tmp=tmp, logs=logs, args=args, deadline=deadline)


def cleanup(setup: Setup | None, args) -> None:
    if setup is None:
        return
    if args.keep_tmp:
        print(f"kept {setup.tmp}", flush=True)
    else:
        shutil.rmtree(setup.tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        sys.exit("usage: train_runs.py --worker JOB.json (run by bench_train.py and bench_fit.py)")
    sys.exit(worker_main(sys.argv[2]))
