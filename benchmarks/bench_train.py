"""Benchmark DPO training end to end: fastdpo (reference cache) vs the classic two-model method vs TRL.

Every method trains the same model on the same pairs with the same batch size, lengths, dtype and optimizer
(AdamW, linear schedule, lr 1e-6, beta 0.1, grad clip 1.0), one after the other in ONE invocation, each in its
own subprocess (so a CPU peak RSS is that method's own; stderr goes to OUT_logs/METHOD*.log):

  fastdpo-packed    `fastdpo precompute` once, then `fastdpo train --ref-cache` (policy only, fused log-probs),
                    packing + prefix sharing on
  fastdpo-padded    the same cache and trainer, --no-packing --no-prefix-sharing
  two-model         the baseline: `fastdpo train --dataset D --ref-model R --logps-backend eager --no-packing
                    --no-prefix-sharing` (reference loaded and run every step, log-softmax over full logits)
  trl-live          TRL DPOTrainer with its reference model run every step
  trl-precompute    TRL DPOTrainer with precompute_ref_log_probs=True (a reference pass inside the trainer)

The data is one epoch: steps x batch x accumulation pairs (synthetic, `--data short|long`, or `--dataset PATH`),
so a precompute covers exactly the pairs one training run uses. Models are presets built from configs with
random weights (PRESETS; the tiny one is fastdpo.tiny's Llama architecture, scaled up so a step is not pure
overhead), saved with a tokenizer trained on the synthetic words (about one token per word), or `--model PATH`.
Columns are defined in benchmarks/README.md; in short: the median over the steps after `--warmup` of each step's
tokens / time (a pair counts 2P + C + R tokens for every method, P prompt and C, R completion tokens), pairs/s,
peak memory (torch.cuda.max_memory_allocated on GPU, peak RSS on CPU), precompute time and the amortised time of
1 and of `--sweep-k` runs on one cache, MFU on GPU, and an optional fit test under `--fit-budget-gb`.

Tiny CPU run (what benchmarks/results/cpu_tiny_train*.{csv,md,png} hold; CPU timings say nothing about a GPU):
    python benchmarks/bench_train.py --preset tiny --data short --steps 24 --warmup 4 --batch-size 4 --repeats 2 \
        --out benchmarks/results/cpu_tiny_train
    python benchmarks/bench_train.py --preset tiny --data long --steps 16 --warmup 3 --batch-size 4 --repeats 2 \
        --out benchmarks/results/cpu_tiny_train_long
    python benchmarks/bench_train.py --preset tiny-152k --data short --steps 8 --warmup 2 --batch-size 4 \
        --out benchmarks/results/cpu_tiny152k_train
    python benchmarks/bench_train.py --preset tiny --data short --steps 2 --warmup 1 --batch-size 4 --fit-test \
        --fit-budget-gb 2.5 --fit-max-batch 64 --fit-time-s 300 --out benchmarks/results/cpu_tiny_fit

Smoke run (seconds; what tests/test_bench_train.py does):
    python benchmarks/bench_train.py --preset tiny --data short --prompt-len 16 --completion-len 16 --steps 3 \
        --warmup 1 --batch-size 2 --out /tmp/bench_train_smoke

GPU runs (bf16, the shapes README.md's Performance goals are stated for; not run yet in this repository, see
benchmarks/README.md):
    python benchmarks/bench_train.py --preset qwen2.5-0.5b --data long --device cuda --dtype bf16 --steps 40 \
        --batch-size 8 --fit-test --fit-budget-gb 40 --out benchmarks/results/h100_qwen05_train_long
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdpo import metrics
from fastdpo.modeling import machine_name

# ----------------------------------------------------------------------------------------------------------------
# presets, data shapes, methods
# ----------------------------------------------------------------------------------------------------------------

# Model shapes from the models' config.json (random weights: only the shapes matter for speed and memory)
PRESETS = {
    # fastdpo.tiny's test Llama (hidden 64, 2 layers) scaled up until a CPU step is not pure overhead, with the LM
    # head's share of the matmul parameters of the real presets (tiny 25%; Qwen2.5-0.5B 28%, Llama-3.2-1B 21%):
    # a 32k vocabulary on this body would make the head 72% of the work and flatter a fused head
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False,
                 rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096),
    # the tiny body with Qwen2.5's 152k vocabulary (tied, as Qwen2.5-0.5B): the peak-memory goal is stated for
    # large vocabularies, where logits dominate; on CPU this is the shape that measures it (the head is then most of
    # the FLOPs, so its throughput ratios say more about the LM head than about a whole model)
    "tiny-152k": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                      rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=131072),
}
# Synthetic data: (prompt, completion) mean lengths in tokens; prompts vary +-25%, completions +-50%
DATA = {"short": (64, 128), "long": (512, 64)}
METHODS = ("fastdpo-packed", "fastdpo-padded", "two-model", "trl-live", "trl-precompute")
BASELINE = "two-model"
SEED = 42  # data order and initialisation, every method
# Dense bf16 peak FLOP/s, first substring of torch.cuda.get_device_name() that matches
DTYPES = ("fp32", "bf16", "bf16-mixed")
COLUMNS = [
    "method", "status", "model", "data", "device", "dtype", "batch_size", "grad_accum", "steps", "measured_steps",
    "tokens_per_s", "tokens_per_s_p20", "tokens_per_s_p80", "tokens_per_s_agg", "pairs_per_s", "step_s",
    "throughput_vs_baseline",
    "peak_mem_gib", "peak_mem_kind", "mem_above_start_gib", "memory_vs_baseline", "precompute_s",
    "precompute_peak_gib", "train_s", "total_1run_s", "k", "total_k_s", "total_k_vs_baseline", "mfu",
    "mfu_with_ref", "fit_budget_gib", "fit_max_batch", "fit_peak_gib",
]


def is_fastdpo(method: str) -> bool:
    return method.startswith("fastdpo")


# ----------------------------------------------------------------------------------------------------------------
# setup (in the driver, untimed): model directory, tokenizer, synthetic pairs
# ----------------------------------------------------------------------------------------------------------------


def synthetic_words(n: int, seed: int = 0) -> list[str]:
    """n distinct pronounceable pseudo-words (a BPE tokenizer trained on them makes each one token)."""
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))))
    return sorted(words)


def write_pairs(path: Path, n: int, prompt_len: int, completion_len: int, words: list[str], seed: int = 0) -> None:
    """n standard-format pairs; lengths in words (about tokens), each prompt distinct (its own prefix)."""
    rng = random.Random(seed)

    def text(mean, spread):
        return " ".join(rng.choices(words, k=max(1, round(mean * rng.uniform(1 - spread, 1 + spread)))))

    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": text(prompt_len, 0.25), "chosen": " " + text(completion_len, 0.5),
                   "rejected": " " + text(completion_len, 0.5)}
            f.write(json.dumps(row) + "\n")


def build_preset(name: str, out: Path, words: list[str], dtype: torch.dtype, device: str) -> str:
    """Save a random-weight model of preset `name` and a tokenizer for `words` into `out`."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastdpo.tiny import build_tokenizer

    rng = random.Random(1)
    tokenizer = build_tokenizer([" ".join(rng.choices(words, k=200)) for _ in range(200)], vocab_size=4096)
    kw = dict(PRESETS[name])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert config.vocab_size > len(tokenizer)  # the preset's vocabulary, not the tokenizer's
    torch.manual_seed(0)
    new_name = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    with torch.device(device):  # on a GPU, initialising a 1.5B model there takes seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, **{"dtype" if new_name else "torch_dtype": dtype})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the workers measure their own memory, but share the device with this process
    return str(out)


def param_counts(model: str) -> tuple[int, int]:
    """(all parameters, those in a matmul per token: all but the input embedding, the LM head counted)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    total = sum(p.numel() for p in m.parameters())  # unique parameters: a tied head is counted once, as embedding
    embed = m.get_input_embeddings().weight.numel()
    return total, total - embed + (m.get_output_embeddings().weight.numel() if m.config.tie_word_embeddings else 0)


# ----------------------------------------------------------------------------------------------------------------
# workers: each job runs in its own subprocess (`bench_train.py --worker JOB.json`) and writes a result JSON
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_peak_rss"  # KiB on Linux


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


def worker_trl(job: dict) -> dict:
    """TRL's DPOTrainer with settings matched to fastdpo's; per step: end time (step end to step end: data,
    forward, backward, optimizer and logging, as fastdpo's elapsed_s) and the tokens its pairs hold."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fastdpo import data as fdata

    steps = {"ends": [], "tokens": [], "precompute_s": 0.0, "step_tokens": 0}

    def now():
        if job["device"].startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):  # runs inside __init__
            t0 = now()
            out = super()._precompute_ref_logps(*args, **kwargs)
            steps["precompute_s"] += now() - t0
            return out

        def training_step(self, model, inputs, *args, **kwargs):  # one micro-batch: chosen rows, then rejected
            steps["step_tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = now()

        def on_step_end(self, args, state, control, **kwargs):
            steps["ends"].append(now() - self.start)
            steps["tokens"].append(steps["step_tokens"])
            steps["step_tokens"] = 0

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}[job["dtype"]]
    ds = fdata.load_source(fdata.DataArgs(dataset=job["dataset"], max_prompt_length=None))
    ds = ds.select(range(min(job["n_pairs"], len(ds)))).select_columns(["prompt", "chosen", "rejected"])
    config = DPOConfig(
        output_dir=job["output"], per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"], max_steps=job["steps"], learning_rate=job["lr"],
        beta=job["beta"], loss_type=["sigmoid"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", seed=SEED, bf16=job["dtype"] != "fp32", fp16=False,
        gradient_checkpointing=job["gradient_checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=job["max_length"], truncation_mode="keep_start", padding_free=False,
        precompute_ref_log_probs=job["precompute"], precompute_ref_batch_size=job["precompute_batch_size"],
        model_init_kwargs={"dtype": dtype}, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_drop_last=True,
        use_cpu=not job["device"].startswith("cuda"),
    )
    trainer = TimedDPOTrainer(model=job["model"], args=config, train_dataset=ds, callbacks=[StepTimer()])
    trainer.train()
    return {"status": "ok", "step_end_s": steps["ends"], "step_tokens": steps["tokens"],
            "precompute_s": steps["precompute_s"] or None}


def worker_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    rss_start = _rss_gib()  # after importing torch: the runtime, before any model is loaded
    _limit_cuda_memory(job)
    try:
        result = (worker_fastdpo if job["kind"] == "fastdpo" else worker_trl)(job)
    except torch.cuda.OutOfMemoryError:
        result = {"status": "oom"}
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
    env = {**os.environ, "HF_DATASETS_CACHE": str(job_dir / "hf_datasets"),  # no datasets cache shared by runs
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    if os.path.exists(setup.model) and os.path.exists(setup.dataset):  # all local: never wait on the network
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if setup.args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_dir / "job.json")]
    t0 = time.perf_counter()
    with open(setup.logs / f"{name}.log", "w") as log:
        log.write(f"# {shlex.join(job.get('argv', [])) if job['kind'] == 'fastdpo' else json.dumps(job)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=log, env=env, cwd=str(setup.tmp))
    result = {"status": f"error: worker exited {proc.returncode}, see {setup.logs / (name + '.log')}"}
    if (job_dir / "result.json").is_file():
        result = json.loads((job_dir / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    result["output"] = job["output"]
    return result


def dtype_flags(args) -> tuple[str, str]:
    """(fastdpo train --dtype, fastdpo precompute --dtype)."""
    return ({"fp32": "float32", "bf16": "bfloat16", "bf16-mixed": "bf16-mixed"}[args.dtype],
            "float32" if args.dtype == "fp32" else "bfloat16")


def fastdpo_argv(setup: Setup, method: str, batch_size: int, steps: int) -> list[str]:
    """The `fastdpo train` command line of a fastdpo method (or of the two-model baseline)."""
    a = setup.args
    argv = ["train", "--model", setup.model, "--batch-size", str(batch_size), "--grad-accum", str(a.grad_accum),
            "--max-steps", str(steps), "--lr", str(a.lr), "--beta", str(a.beta), "--dtype", dtype_flags(a)[0],
            "--seed", str(SEED),
            "--log-every", "1000000", "--no-progress"]
    argv += ["--gradient-checkpointing"] if a.gradient_checkpointing else []
    if method == BASELINE:
        return argv + ["--dataset", setup.dataset, "--ref-model", setup.model, "--logps-backend", "eager",
                       "--no-packing", "--no-prefix-sharing", "--max-length", str(a.max_length),
                       "--max-prompt-length", "none", "--limit", str(setup.n_pairs)]
    if method == "fastdpo-padded":
        return argv + ["--ref-cache", str(setup.cache), "--no-packing", "--no-prefix-sharing"]
    rows = ["--max-tokens-per-batch", str(a.max_tokens_per_batch)] if a.max_tokens_per_batch else []
    return argv + ["--ref-cache", str(setup.cache), "--packing", "--prefix-sharing", *rows]


def run_method(setup: Setup, method: str, batch_size: int, steps: int, tag: str, budget_gib=None) -> dict:
    a = setup.args
    if method.startswith("trl"):
        try:
            import trl  # noqa: F401
        except ImportError:
            return {"status": "skipped: trl not installed"}
        job = dict(kind="trl", model=setup.model, dataset=setup.dataset, n_pairs=setup.n_pairs,
                   batch_size=batch_size, grad_accum=a.grad_accum, steps=steps, lr=a.lr, beta=a.beta, dtype=a.dtype,
                   gradient_checkpointing=a.gradient_checkpointing, max_length=a.max_length,
                   precompute=method == "trl-precompute", precompute_batch_size=batch_size)
    else:
        job = dict(kind="fastdpo", argv=fastdpo_argv(setup, method, batch_size, steps))
    res = run_job(setup, f"{method}{tag}", {**job, "budget_gib": budget_gib})
    if res["status"] == "ok" and job["kind"] == "fastdpo":
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
        return batching.epoch_plan(batching.pair_lengths(p, c, r), setup.shard_bounds,
                                   batch_size * setup.args.grad_accum, seed=SEED, epoch=epoch)

    plans, out = {}, []
    for step in range(n_steps):
        epoch, k = divmod(step, len(plan(0)))
        plans.setdefault(epoch, plan(epoch))
        out.append(int(tokens[plans[epoch][k]].sum()))
    return out


def precompute(setup: Setup) -> dict:
    a = setup.args
    argv = ["precompute", "--model", setup.model, "--dataset", setup.dataset, "--output", str(setup.cache),
            "--batch-size", str(a.batch_size), "--dtype", dtype_flags(a)[1], "--device", a.device,
            "--max-length", str(a.max_length), "--max-prompt-length", "none", "--limit", str(setup.n_pairs),
            "--no-progress"]
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
# summary: medians, ratios, MFU, amortised totals
# ----------------------------------------------------------------------------------------------------------------


def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def peak_flops(device: str) -> float | None:
    return metrics.peak_flops(torch.device(device))  # the trainer's table, so both report the same MFU


def _fmt(x, spec=".4g"):
    return "" if x is None else ("n/a" if x == "n/a" else format(x, spec))


def summarise(method: str, runs: list[dict], pre: dict, setup: Setup, tokens_per_pair: float, n_matmul: int) -> dict:
    """One CSV row from a method's repeated runs (step times pooled over repeats)."""
    a = setup.args
    row = {c: "" for c in COLUMNS}
    row.update(method=method, model=a.model or a.preset, data=a.dataset or a.data, device=a.device, dtype=a.dtype,
               batch_size=a.batch_size, grad_accum=a.grad_accum, steps=a.steps, k=a.sweep_k)
    bad = [r["status"] for r in runs if r["status"] != "ok"]
    if bad:
        row["status"] = bad[0]
        return row
    # Per step: tokens (2P + C + R of its pairs) / time. Not pairs / time: fastdpo batches pairs of similar length
    # together (TRL does not), so its per-step pairs/s swings several-fold with the batch's length
    rates, step_s, train_s, tokens, time_s = [], [], [], 0, 0.0
    for r in runs:
        ends = r["step_end_s"]
        dts = [t1 - t0 for t0, t1 in zip([0.0] + ends[:-1], ends)]
        for dt, n in list(zip(dts, r["step_tokens"]))[a.warmup:]:
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
    row.update(status="ok", measured_steps=len(rates), tokens_per_s=_fmt(tokens_per_s, ".5g"),
               tokens_per_s_p20=_fmt(_quantile(rates, 0.2), ".5g"), tokens_per_s_p80=_fmt(_quantile(rates, 0.8), ".5g"),
               tokens_per_s_agg=_fmt(tokens / time_s, ".5g"), pairs_per_s=_fmt(tokens_per_s / tokens_per_pair),
               step_s=_fmt(statistics.median(step_s)),
               peak_mem_gib=_fmt(max(r["peak_gib"] for r in runs), ".3f"), peak_mem_kind=runs[0]["peak_kind"],
               mem_above_start_gib=_fmt(max(r["peak_gib"] - r["rss_start_gib"] for r in runs), ".3f") if cpu else "n/a",
               precompute_s=_fmt(pre_s), train_s=_fmt(train), total_1run_s=_fmt((pre_s or 0) + train),
               total_k_s=_fmt((pre_s or 0) + a.sweep_k * train))
    if is_fastdpo(method):
        row["precompute_peak_gib"] = _fmt(pre["peak_gib"], ".3f")
    peak = peak_flops(a.device)
    if peak and a.dtype != "fp32":
        # 6 N T per step (forward 2NT + backward 4NT); a live reference adds a forward, 2NT, that is not useful work
        row["mfu"] = _fmt(6 * n_matmul * tokens_per_s / peak, ".3f")
        live = method in (BASELINE, "trl-live")
        row["mfu_with_ref"] = _fmt((8 if live else 6) * n_matmul * tokens_per_s / peak, ".3f")
    else:
        row["mfu"] = row["mfu_with_ref"] = "n/a"
    return row


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["method"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        if base is None or r["status"] != "ok":
            continue
        r["throughput_vs_baseline"] = _fmt(float(r["tokens_per_s"]) / float(base["tokens_per_s"]), ".3f")
        r["memory_vs_baseline"] = _fmt(float(r["peak_mem_gib"]) / float(base["peak_mem_gib"]), ".3f")
        r["total_k_vs_baseline"] = _fmt(float(r["total_k_s"]) / float(base["total_k_s"]), ".3f")


# ----------------------------------------------------------------------------------------------------------------
# fit test: the largest batch under a memory budget, by doubling
# ----------------------------------------------------------------------------------------------------------------


def fit_test(setup: Setup, method: str) -> tuple[str, str]:
    """(largest batch that fits, its peak). GPU: the allocator is capped at the budget, a run that OOMs does not
    fit. CPU: a run fits when its peak RSS (the whole process) is within the budget. Doubling from
    --fit-start-batch (1) stops at the first batch that does not fit, at --fit-max-batch, or when --fit-time-s has
    been spent."""
    a = setup.args
    best, best_peak, batch, t0 = None, None, a.fit_start_batch, time.perf_counter()
    while batch <= a.fit_max_batch:
        if time.perf_counter() - t0 > a.fit_time_s:
            return f">={best} (time limit)" if best else "? (time limit)", _fmt(best_peak, ".3f")
        res = run_method(setup, method, batch, a.fit_steps, f"-fit{batch}", budget_gib=a.fit_budget_gb)
        print(f"  fit {method} batch {batch}: {res['status']} peak {_fmt(res.get('peak_gib'), '.3f')} GiB",
              flush=True)
        if res["status"].startswith("skipped"):
            return "n/a", ""
        if res["status"] != "ok" or res["peak_gib"] > a.fit_budget_gb:
            return (str(best) if best else f"<{a.fit_start_batch}"), _fmt(best_peak, ".3f")
        best, best_peak, batch = batch, res["peak_gib"], batch * 2
    return f">={best}", _fmt(best_peak, ".3f")


# ----------------------------------------------------------------------------------------------------------------
# output: CSV, markdown, PNG
# ----------------------------------------------------------------------------------------------------------------


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


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
            f"{_fmt(float(ok[BASELINE]['step_s']), '.3g')} s, {packed} {_fmt(float(ok[packed]['step_s']), '.3g')} s). "
            "A cache removes the reference forward (2 of the baseline's 8 N·T FLOPs per step: 8/6 = 1.33× on its "
            "own) and the eager full-vocabulary log-softmax; the optimizer step and per-step overheads stay.")
    mem = _ratio(rows, packed, BASELINE, "peak_mem_gib")
    if mem is not None:
        state = stats["model_state_gib"]
        line = (f"- {packed} ÷ {BASELINE}, peak memory: {mem:.2f}×. Policy weights, gradients and AdamW state are "
                f"{state:.2f} GiB for every method, a floor no log-prob saving goes below; the baseline adds the "
                f"reference's weights ({state / 4:.2f} GiB) and full logits, which grow with the vocabulary")
        if not gpu:
            start = float(ok[BASELINE]["peak_mem_gib"]) - float(ok[BASELINE]["mem_above_start_gib"])
            above = float(ok[packed]["mem_above_start_gib"]) / float(ok[BASELINE]["mem_above_start_gib"])
            line += (f". Peak RSS is the whole process: the Python/torch runtime alone is {start:.2f} GiB of the "
                     f"baseline's {float(ok[BASELINE]['peak_mem_gib']):.2f} GiB; above that start the ratio is "
                     f"{above:.2f}")
        out.append(line + ".")
    for trl in ("trl-live", "trl-precompute"):
        s = _ratio(rows, packed, trl)
        if s is not None:
            out.append(f"- {packed} ÷ {trl}: {s:.2f}× tokens/s, "
                       f"{_ratio(rows, packed, trl, 'peak_mem_gib'):.2f}× peak memory.")
    pack = _ratio(rows, packed, "fastdpo-padded")
    if pack is not None:
        p20, p80 = float(ok[packed]["tokens_per_s_p20"]), float(ok["fastdpo-padded"]["tokens_per_s_p80"])
        spread = (f"{packed}'s p20 ({_fmt(p20)}) is above fastdpo-padded's p80 ({_fmt(p80)})" if p20 > p80 else
                  f"their p20–p80 ranges overlap ({packed}'s p20 {_fmt(p20)}, fastdpo-padded's p80 {_fmt(p80)})")
        saved = stats["prompt"] / stats["tokens_per_pair"]
        out.append(
            f"- {packed} ÷ fastdpo-padded, tokens/s ({a.dataset or a.data} data): {pack:.2f}×; {spread}. Prefix "
            f"sharing saves the prompt once per pair, {100 * saved:.0f}% of 2P+C+R on this data, and packing the "
            "padding"
            + (". With SDPA's dense mask (CPU) a row costs its length squared, so packed rows stay within the padded "
               "width and the attention saved is less than the tokens saved." if not gpu else "."))
    return out


def markdown(rows: list[dict], setup: Setup, stats: dict, n_matmul: int, argv: list[str], commands: dict,
             load: tuple[float, float]) -> str:
    a = setup.args
    kind = "GPU" if a.device.startswith("cuda") else "CPU (tiny shapes; says nothing about GPU speed)"
    data = (f"`{a.dataset}`" if a.dataset else f"synthetic `{a.data}`: prompts ~{a.prompt_len} tokens (±25%), "
            f"completions ~{a.completion_len} (±50%), each prompt distinct")
    lines = [
        "# fastdpo training benchmark",
        "",
        f"- machine: {machine_name(a.device)} — {kind}",
        f"- torch {torch.__version__}, transformers {_version('transformers')}, trl {_version('trl')}, "
        f"fastdpo {_version('fastdpo')}, python {platform.python_version()}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; load average (1 min) "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end ({os.cpu_count()} cores; other jobs count too)",
        f"- command: `python benchmarks/bench_train.py {shlex.join(argv)}`",
        f"- model: {a.model or 'preset ' + a.preset} ({stats['n_params'] / 1e6:.1f}M parameters, "
        f"{n_matmul / 1e6:.1f}M of them in per-token matmuls), dtype {a.dtype}, "
        f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}",
        f"- data: {data}; {setup.n_pairs} pairs (one epoch), mean tokens per pair P {stats['prompt']:.0f}, "
        f"C {stats['chosen']:.0f}, R {stats['rejected']:.0f} (2P+C+R = {stats['tokens_per_pair']:.0f})",
        f"- batch {a.batch_size} pairs x {a.grad_accum} accumulation, {a.steps} steps, medians over the last "
        f"{a.steps - a.warmup} of each run, {a.repeats} run(s) per method",
        *([f"- note: {a.note}"] if a.note else []),
        "",
        "| method | status | tokens/s median (p20–p80) | tokens/s all steps | pairs/s | × baseline | peak GiB "
        f"| mem × baseline | precompute s | total 1 run s | total {a.sweep_k} runs s | × baseline ({a.sweep_k} runs) "
        "| MFU | fit (batch ≤ budget) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{r['tokens_per_s']} ({r['tokens_per_s_p20']}–{r['tokens_per_s_p80']})" if r["status"] == "ok" else ""
        mem = r["peak_mem_gib"] + (f" ({r['mem_above_start_gib']} above start)" if r["mem_above_start_gib"] not in
                                   ("", "n/a") else "")
        fit = f"{r['fit_max_batch']} @ {r['fit_budget_gib']} GiB" if r["fit_max_batch"] else ""
        mfu = r["mfu"] + (f" ({r['mfu_with_ref']} with ref)" if r["mfu_with_ref"] not in ("", "n/a", r["mfu"]) else "")
        lines.append(f"| {r['method']} | {r['status']} | {rate} | {r['tokens_per_s_agg']} | {r['pairs_per_s']} "
                     f"| {r['throughput_vs_baseline']} "
                     f"| {mem} | {r['memory_vs_baseline']} | {r['precompute_s'] or '—'} | {r['total_1run_s']} "
                     f"| {r['total_k_s']} | {r['total_k_vs_baseline']} | {mfu} | {fit} |")
    lines += [
        "",
        "## Ratios between methods",
        "",
        *(ratios(rows, setup, stats) or ["- (fewer than two of the methods compared here ran)"]),
        "",
        "## How to read it",
        "",
        "- tokens/s: per step, the tokens of its pairs (2P+C+R each: the same count for every method, whatever it "
        "runs: padding, or a shared prompt once) over the step's time (one step's end to the next: data, forward, "
        "backward, optimizer, logging); the median and p20–p80 over the steps after warm-up, pooled over runs. "
        "'all steps': their total tokens over their total time. pairs/s = median tokens/s ÷ mean(2P+C+R). Tokens, "
        "not pairs, per step: fastdpo batches pairs of similar length together and TRL does not, so per-step pairs/s "
        "swings with the batch's length. × baseline: the ratio of median tokens/s.",
        f"- peak: {rows[0]['peak_mem_kind'] or 'n/a'} of the method's own process"
        + (" (peak RSS includes the Python/torch runtime; 'above start' subtracts the RSS after imports, before "
           "any model is loaded)" if not a.device.startswith("cuda") else "") + ".",
        "- precompute s: fastdpo: `fastdpo precompute`'s reference pass (load the reference, run it, write the "
        "shards; tokenization excluded as it is for every method), run once and shared by both fastdpo rows; "
        "trl-precompute: the trainer's own reference pass. total 1 run = precompute + the run's training time; "
        f"total {a.sweep_k} runs = precompute once + {a.sweep_k} training runs (a β sweep on one cache; TRL reuses "
        "its precompute only while its datasets cache survives).",
        "- MFU (GPU, bf16 only): 6 · N · tokens/s over the device's dense bf16 peak, N the matmul parameters "
        "(input embedding excluded, LM head included) and tokens as above; attention FLOPs and gradient-"
        "checkpointing recompute are not counted. 'with ref' adds the live reference forward, 2 · N per token, "
        "which the two live methods run but which is not useful work.",
        f"- fit: the largest batch (doubling from {a.fit_start_batch}) whose run stays within the budget: on GPU the "
        "allocator is capped at the budget and an OOM fails; on CPU the peak RSS of the whole process is compared to "
        "it.",
        "",
        "## Commands (per method)",
        "",
        *[f"- {m}: `{c}`" for m, c in commands.items()],
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    names = [r["method"] for r in ok]
    colors = ["0.55" if n == BASELINE else ("tab:blue" if is_fastdpo(n) else "tab:orange") for n in names]
    panels = [("tokens/s (median step, p20–p80)", "tokens_per_s"),
              (f"peak memory, GiB ({ok[0]['peak_mem_kind']})", "peak_mem_gib"),
              (f"time for {k} runs on one cache, s", "total_k_s")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (label, col) in zip(axes, panels):
        vals = [float(r[col]) for r in ok]
        err = None
        if col == "tokens_per_s":
            err = [[v - float(r["tokens_per_s_p20"]) for v, r in zip(vals, ok)],
                   [float(r["tokens_per_s_p80"]) - v for v, r in zip(vals, ok)]]
        bars = ax.bar(names, vals, color=colors, yerr=err, capsize=3)
        ratio = {"tokens_per_s": "throughput_vs_baseline", "peak_mem_gib": "memory_vs_baseline",
                 "total_k_s": "total_k_vs_baseline"}[col]
        for i, (bar, r) in enumerate(zip(bars, ok)):
            top = bar.get_height() + (err[1][i] if err else 0)
            if r[ratio]:
                ax.annotate(f"{float(r[ratio]):.2f}×", (bar.get_x() + bar.get_width() / 2, top), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.margins(y=0.12)
        ax.set_title(label + " (× two-model)", fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
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
    p.add_argument("--warmup", type=int, default=4, help="first steps of each run left out of the medians")
    p.add_argument("--repeats", type=int, default=1, help="runs per method, interleaved; steps pooled")
    p.add_argument("--max-length", type=int, default=1024, help="cap on prompt+completion tokens, every method")
    p.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="fastdpo-packed: cap on a packed row's tokens (default: fastdpo's, a micro-batch per row)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--gradient-checkpointing", action="store_true", help="for every method")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--sweep-k", type=int, default=4, help="runs sharing one cache in the amortised total")
    p.add_argument("--fit-test", action="store_true", help="find each method's largest batch under --fit-budget-gb")
    p.add_argument("--fit-budget-gb", type=float, default=4.0, help="memory budget of the fit test, GiB")
    p.add_argument("--fit-max-batch", type=int, default=64, help="largest batch the fit test tries")
    p.add_argument("--fit-start-batch", type=int, default=1,
                   help="first batch the fit test tries (doubling from it: fewer runs when roughly known)")
    p.add_argument("--fit-steps", type=int, default=2, help="steps per fit-test run")
    p.add_argument("--fit-time-s", type=float, default=900, help="time limit of one method's fit test, seconds")
    p.add_argument("--out", required=False, default=None, help="output prefix: writes PREFIX.csv, .md, .png, _logs/")
    p.add_argument("--note", default=None, help="a line for the markdown header (e.g. the machine's load)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary model, data and runs")
    args = p.parse_args(argv)
    if args.worker is None and args.out is None:
        p.error("--out is required")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    prompt_len, completion_len = DATA[args.data]
    args.prompt_len = args.prompt_len or prompt_len
    args.completion_len = args.completion_len or completion_len
    if args.warmup >= args.steps:
        p.error("--warmup must be less than --steps")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        sys.exit(worker_main(args.worker))
    # a kill runs the cleanup below (and subprocess.run kills the running worker)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / f"{out.name}_logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    try:
        n_pairs = args.steps * args.batch_size * args.grad_accum
        if args.fit_test:
            n_pairs = max(n_pairs, args.fit_max_batch)  # a fit-test run needs at least one full batch
        words = synthetic_words(400)
        dataset = args.dataset
        if dataset is None:
            dataset = str(tmp / "pairs.jsonl")
            write_pairs(Path(dataset), n_pairs, args.prompt_len, args.completion_len, words)
        model = args.model
        if model is None:
            dtype = torch.float32 if args.dtype != "bf16" else torch.bfloat16
            model = build_preset(args.preset, tmp / "model", words, dtype, args.device)
        setup = Setup(model=model, dataset=dataset, n_pairs=n_pairs, tmp=tmp, logs=logs, args=args)
        n_params, n_matmul = param_counts(model)
        print(f"bench_train: {args.model or args.preset} ({n_matmul / 1e6:.1f}M matmul params), {n_pairs} pairs, "
              f"{args.device} {args.dtype}, methods {' '.join(args.methods)}", flush=True)

        pre = precompute(setup)  # also defines the token counts every method is measured on
        if pre["status"] != "ok":
            raise SystemExit(f"bench_train: precompute failed ({pre['status']}); see {logs / 'precompute.log'}")
        lens = setup.lengths = pre["lengths"]
        setup.shard_bounds = pre["shard_bounds"]
        stats = {k: statistics.mean(v) for k, v in lens.items()}
        stats["tokens_per_pair"] = 2 * stats["prompt"] + stats["chosen"] + stats["rejected"]
        # weights + gradients + two AdamW moments, in the weights' dtype
        stats["n_params"] = n_params
        stats["model_state_gib"] = 4 * n_params * (2 if args.dtype == "bf16" else 4) / 2**30
        print(f"precompute: {pre['precompute_s']:.1f}s; tokens per pair P {stats['prompt']:.0f} C "
              f"{stats['chosen']:.0f} R {stats['rejected']:.0f}", flush=True)

        runs = {m: [] for m in args.methods}
        for rep in range(args.repeats):
            order = args.methods[rep % len(args.methods):] + args.methods[:rep % len(args.methods)]
            for method in order:
                res = run_method(setup, method, args.batch_size, args.steps, f"-run{rep}")
                runs[method].append(res)
                print(f"{method:>15} run {rep}: {res['status']}, {res.get('wall_s', 0):.0f}s wall, "
                      f"peak {_fmt(res.get('peak_gib'), '.3f')} GiB", flush=True)
        rows = [summarise(m, runs[m], pre, setup, stats["tokens_per_pair"], n_matmul) for m in args.methods]
        add_ratios(rows)
        if args.fit_test:
            for r in rows:
                r["fit_budget_gib"] = _fmt(args.fit_budget_gb)
                r["fit_max_batch"], r["fit_peak_gib"] = fit_test(setup, r["method"])

        commands = {"precompute": "fastdpo " + shlex.join(pre["argv"])}
        for m in args.methods:
            if m.startswith("trl"):
                commands[m] = (f"DPOTrainer, DPOConfig(precompute_ref_log_probs={m == 'trl-precompute'}, ...) "
                               "(see worker_trl in bench_train.py)")
            else:
                commands[m] = "fastdpo " + shlex.join(fastdpo_argv(setup, m, args.batch_size, args.steps))
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        md = markdown(rows, setup, stats, n_matmul, argv, commands, (load_start, os.getloadavg()[0]))
        md = md.replace(str(tmp), "$TMP")
        out.with_suffix(".md").write_text(md)
        title = (f"{args.model or args.preset}, {args.dataset or args.data} data, batch {args.batch_size}, "
                 f"{args.dtype}, {machine_name(args.device)}")
        plot(rows, out.with_suffix(".png"), title, args.sweep_k)
        for r in rows:
            print(f"{r['method']:>15}: {r['status']:<6} {r['tokens_per_s'] or '-':>8} tokens/s "
                  f"x{r['throughput_vs_baseline'] or '-'}  peak {r['peak_mem_gib'] or '-'} GiB "
                  f"x{r['memory_vs_baseline'] or '-'}", flush=True)
        print(f"bench_train: {time.perf_counter() - t_start:.0f}s -> {out}.{{csv,md,png}}", flush=True)
        return rows
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
