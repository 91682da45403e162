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
1 and of `--sweep-k` runs on one cache, MFU on GPU, and an optional fit test under `--fit-budget-gb`: each method's
largest batch for each `--fit-optimizers` entry (fastdpo's `--optimizer` choices; TRL rows AdamW only), to
OUT_fit.csv. `--fit-estimate` measures bytes per parameter (each optimizer, after one step) and the bytes autograd
saves for backward on the model, and from them estimates the largest real architecture (FIT_ESTIMATE_MODELS) that
fits 24 and 80 GiB, to OUT_fit_estimate.csv and the markdown, labelled as an estimate: only a GPU fit run measures it.

Tiny CPU run (what benchmarks/results/cpu_tiny_train*.{csv,md,png} hold; CPU timings say nothing about a GPU):
    python benchmarks/bench_train.py --preset tiny --data short --steps 24 --warmup 4 --batch-size 4 --repeats 2 \
        --out benchmarks/results/cpu_tiny_train
    python benchmarks/bench_train.py --preset tiny --data long --steps 16 --warmup 3 --batch-size 4 --repeats 2 \
        --out benchmarks/results/cpu_tiny_train_long
    python benchmarks/bench_train.py --preset tiny-152k --data short --steps 8 --warmup 2 --batch-size 4 \
        --out benchmarks/results/cpu_tiny152k_train
    python benchmarks/bench_train.py --preset tiny --data short --steps 2 --warmup 1 --batch-size 4 --fit-test \
        --fit-budget-gb 2.5 --fit-max-batch 64 --fit-time-s 300 --fit-optimizers adamw \
        --out benchmarks/results/cpu_tiny_fit
    python benchmarks/bench_train.py --preset tiny --data short --steps 2 --warmup 1 --batch-size 4 \
        --methods fastdpo-packed --fit-estimate --out benchmarks/results/cpu_tiny_fit_estimate

Smoke run (seconds; what tests/test_bench_train.py does):
    python benchmarks/bench_train.py --preset tiny --data short --prompt-len 16 --completion-len 16 --steps 3 \
        --warmup 1 --batch-size 2 --out /tmp/bench_train_smoke

GPU runs (bf16, the shapes README.md's Performance goals are stated for; not run yet in this repository, see
benchmarks/README.md):
    python benchmarks/bench_train.py --preset qwen2.5-0.5b --data long --device cuda --dtype bf16 --steps 40 \
        --batch-size 8 --fit-test --fit-budget-gb 40 --out benchmarks/results/h100_qwen05_train_long
    # the estimate's cells for a 7B on 80 GiB, measured: batch 8 of ~1024-token sequences (prefix sharing makes
    # it ~1536 tokens a pair, not the estimate's 2048); the main runs' AdamW step is expected to OOM here
    python benchmarks/bench_train.py --preset qwen2.5-7b --device cuda --dtype bf16-mixed --prompt-len 512 \
        --completion-len 512 --batch-size 8 --steps 2 --warmup 1 --methods fastdpo-packed --gradient-checkpointing \
        --fit-test --fit-budget-gb 80 --fit-start-batch 8 --fit-max-batch 8 --fit-optimizers adamw-kahan,adamw-8bit \
        --fit-estimate --out benchmarks/results/h100_qwen7b_fit
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

from fastdpo import metrics, optim
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
    # The larger shapes of the fit estimate (FIT_ESTIMATE_MODELS), from the config.json of Qwen/Qwen2.5-3B, -7B and
    # -14B and meta-llama/Llama-3.2-3B and Llama-3.1-8B on the Hub; the model cards' parameter counts (3.09B, 7.61B,
    # 14.7B, 3.21B, 8.03B) are what these configs instantiate to
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=131072),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                        rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
}
# The real architectures of the "largest model that fits" estimate (smallest first)
FIT_ESTIMATE_MODELS = ("qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-3b", "llama-3.2-3b", "qwen2.5-7b",
                       "llama-3.1-8b", "qwen2.5-14b")
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
    "mfu_with_ref", "fit_budget_gib", "fit_max_batch", "fit_peak_gib", "fit_optimizer",
]
FIT_COLUMNS = ["method", "optimizer", "dtype", "fit_budget_gib", "fit_max_batch", "fit_peak_gib"]


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


def worker_measure(job: dict) -> dict:
    """The fit estimate's measurements on the benchmark's model: bytes per parameter of each optimizer, and the
    activation bytes of the precisions they train in, without and with gradient checkpointing."""
    import traceback

    out = {"status": "ok", "optimizers": {}, "activations": {}}
    for name in job["optimizers"]:
        try:
            out["optimizers"][name] = measure_state_bytes(job["model"], name, job["device"])
        except Exception as e:  # e.g. an optimizer that needs CUDA: reported, the others still measured
            traceback.print_exc()
            out["optimizers"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    for precision in sorted({estimate_precision(name) for name in job["optimizers"]}):
        out["activations"][precision] = {
            ckpt: measure_saved_bytes(job["model"], precision, ckpt == "on", job["pairs"], job["prompt_len"],
                                      job["completion_len"], job["device"]) for ckpt in ("off", "on")}
    return out


def worker_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    rss_start = _rss_gib()  # after importing torch: the runtime, before any model is loaded
    _limit_cuda_memory(job)
    try:
        result = {"fastdpo": worker_fastdpo, "trl": worker_trl, "measure": worker_measure}[job["kind"]](job)
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


def fastdpo_argv(setup: Setup, method: str, batch_size: int, steps: int, optimizer: str = "adamw") -> list[str]:
    """The `fastdpo train` command line of a fastdpo method (or of the two-model baseline)."""
    a = setup.args
    # an optimizer made for bf16 weights trains them (its reason to exist), whatever --dtype says
    dtype = "bfloat16" if optim.OPTIMIZERS[optimizer].weights == "bf16" else dtype_flags(a)[0]
    argv = ["train", "--model", setup.model, "--batch-size", str(batch_size), "--grad-accum", str(a.grad_accum),
            "--max-steps", str(steps), "--lr", str(a.lr), "--beta", str(a.beta), "--dtype", dtype,
            "--seed", str(SEED),
            "--log-every", "1000000", "--no-progress"]
    argv += ["--optimizer", optimizer] if optimizer != "adamw" else []
    argv += ["--gradient-checkpointing"] if a.gradient_checkpointing else []
    if method == BASELINE:
        return argv + ["--dataset", setup.dataset, "--ref-model", setup.model, "--logps-backend", "eager",
                       "--no-packing", "--no-prefix-sharing", "--max-length", str(a.max_length),
                       "--max-prompt-length", "none", "--limit", str(setup.n_pairs)]
    if method == "fastdpo-padded":
        return argv + ["--ref-cache", str(setup.cache), "--no-packing", "--no-prefix-sharing"]
    rows = ["--max-tokens-per-batch", str(a.max_tokens_per_batch)] if a.max_tokens_per_batch else []
    return argv + ["--ref-cache", str(setup.cache), "--packing", "--prefix-sharing", *rows]


def run_method(setup: Setup, method: str, batch_size: int, steps: int, tag: str, budget_gib=None,
               optimizer: str = "adamw") -> dict:
    a = setup.args
    if method.startswith("trl"):
        if optimizer != "adamw":
            return {"status": "skipped: TRL runs AdamW only here"}
        try:
            import trl  # noqa: F401
        except ImportError:
            return {"status": "skipped: trl not installed"}
        job = dict(kind="trl", model=setup.model, dataset=setup.dataset, n_pairs=setup.n_pairs,
                   batch_size=batch_size, grad_accum=a.grad_accum, steps=steps, lr=a.lr, beta=a.beta, dtype=a.dtype,
                   gradient_checkpointing=a.gradient_checkpointing, max_length=a.max_length,
                   precompute=method == "trl-precompute", precompute_batch_size=batch_size)
    else:
        job = dict(kind="fastdpo", argv=fastdpo_argv(setup, method, batch_size, steps, optimizer))
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


def fit_test(setup: Setup, method: str, optimizer: str = "adamw") -> tuple[str, str]:
    """(largest batch that fits, its peak) of `method` training with `optimizer`. GPU: the allocator is capped at
    the budget, a run that OOMs does not fit. CPU: a run fits when its peak RSS (the whole process) is within the
    budget. Doubling from --fit-start-batch (1) stops at the first batch that does not fit, at --fit-max-batch, or
    when --fit-time-s has been spent."""
    a = setup.args
    best, best_peak, batch, t0 = None, None, a.fit_start_batch, time.perf_counter()
    while batch <= a.fit_max_batch:
        if time.perf_counter() - t0 > a.fit_time_s:
            return f">={best} (time limit)" if best else "? (time limit)", _fmt(best_peak, ".3f")
        res = run_method(setup, method, batch, a.fit_steps, f"-fit-{optimizer}-{batch}", budget_gib=a.fit_budget_gb,
                         optimizer=optimizer)
        print(f"  fit {method} {optimizer} batch {batch}: {res['status']} peak {_fmt(res.get('peak_gib'), '.3f')} GiB",
              flush=True)
        if res["status"].startswith("skipped"):
            return "n/a", ""
        if res["status"] != "ok" or res["peak_gib"] > a.fit_budget_gb:
            return (str(best) if best else f"<{a.fit_start_batch}"), _fmt(best_peak, ".3f")
        best, best_peak, batch = batch, res["peak_gib"], batch * 2
    return f">={best}", _fmt(best_peak, ".3f")


# ----------------------------------------------------------------------------------------------------------------
# fit estimate: the largest real model under a budget, from measured bytes per parameter and activation bytes
# ----------------------------------------------------------------------------------------------------------------
#
# A training step's peak, per part (T tokens per micro-batch, P parameters, L layers, H hidden, I MLP, V vocab):
#
#   bytes/param x P                          weights + gradients + optimizer state (measure_state_bytes)
#   copies/param x (P_linear + V H)          bf16-mixed: autocast's bf16 copies of the matmul weights, held from
#                                            forward to backward (0 when the weights are bf16 already)
#   T L (a_h H + a_i I) + a_out T H          what autograd saves for backward (measure_saved_bytes), per token and
#                                            layer: a_h bytes per hidden unit, a_i per MLP unit; a_out outside the
#                                            layers (embedding, final norm)
#     checkpointing: a_held T L H            only each layer's inputs stay, plus one layer recomputed in backward
#                    + T (a_h H + a_i I) + a_out T H
#   4 V H + 4 T H + tile + copies V H        the fused LM head: its fp32 grad_weight and grad_hidden (held from
#                                            forward to backward), one chunk's (C, V) logit tile
#   overhead                                 CUDA context and allocator slack (--fit-overhead-gb)
#
# The coefficients are measured on one model (the --preset) and applied to the other shapes; the sum adds parts that
# peak at different moments (gradients fill in as activations are freed), so it leans high.


def _weight_copy(t) -> bool:
    """Whether `t` is a cast of a parameter (autocast's bf16 copy of a weight), through view ops."""
    fn = t.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        name = type(fn).__name__.rstrip("0123456789")
        if name == "ToCopyBackward":
            return any(type(f).__name__ == "AccumulateGrad" for f, _ in fn.next_functions if f is not None)
        if name not in ("TBackward", "ViewBackward", "TransposeBackward", "PermuteBackward", "ExpandBackward"):
            return False
        fn = fn.next_functions[0][0]
    return False


def _measurement_policy(model: str, device, **train_kwargs):
    """(TrainConfig, causal LM, its scoring wrapper, PreferenceObjective), built as `fastdpo train` builds them
    (padded layout: with equal lengths there is no padding, and no dense mask whose size grows as T^2)."""
    from fastdpo import loop, modeling, scoring
    from fastdpo.config import make
    from fastdpo.recipes.train import PreferenceObjective, TrainConfig

    cfg = make(TrainConfig, model=model, output="unused", dataset="unused.jsonl", packing=False,
               prefix_sharing=False, progress=False, **train_kwargs)
    setup = scoring.prepare(cfg, device, modeling.resolve_dtype(cfg.dtype, device))
    policy = loop.prepare_policy(setup.load(device=device), cfg, None)
    scorer = setup.scorer(policy).train()
    fused = scoring.fused_loss_applies(policy, cfg.logps_backend)
    return cfg, policy, scorer, PreferenceObjective(cfg, setup, device, None, fused)


def _measurement_batch(vocab: int, pairs: int, prompt_len: int, completion_len: int):
    """A micro-batch of `pairs` random pairs, every sequence prompt_len + completion_len tokens (no padding)."""
    from fastdpo import batching

    g = torch.Generator().manual_seed(SEED)

    def ids(n):
        return [torch.randint(3, vocab, (n,), generator=g).tolist() for _ in range(pairs)]

    rows = {"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len), "rejected_ids": ids(completion_len),
            "ref_chosen_logps": [-1.0 * completion_len] * pairs, "ref_rejected_logps": [-1.0 * completion_len] * pairs,
            "ref_chosen_token_logps": [[-1.0] * completion_len] * pairs,
            "ref_rejected_token_logps": [[-1.0] * completion_len] * pairs}
    return batching.Batch(rows, has_ref=True, step_examples=pairs, step_chosen_tokens=pairs * completion_len)


def _autocast(precision: str, device):
    import contextlib

    if precision == "bf16-mixed":  # what accelerate's autocast does in `fastdpo train`
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_state_bytes(model: str, optimizer: str, device="cpu", **train_kwargs) -> dict:
    """Bytes per trained parameter held by weights, gradients and optimizer state after one fastdpo step.

    The weights are fp32 (what bf16-mixed, the GPU default, keeps), or bf16 for an optimizer made for bf16 weights
    (`OptimizerSpec.weights`). Each storage counts once (tied weights, shared quantization tables)."""
    device = torch.device(device)
    precision = "bfloat16" if optim.OPTIMIZERS[optimizer].weights == "bf16" else "float32"
    cfg, policy, scorer, objective = _measurement_policy(model, device, dtype=precision, optimizer=optimizer,
                                                         **train_kwargs)
    opt = optim.build_optimizer(scorer.parameters(), cfg)
    loss, _ = objective.step(scorer, _measurement_batch(policy.config.vocab_size, 1, 8, 8))
    loss.backward()
    opt.step()

    params = [p for p in scorer.parameters() if p.requires_grad]
    out = optim.held_bytes(scorer.parameters(), opt)  # frozen weights count, and have no gradient
    n = sum(p.numel() for p in params)
    return {"optimizer": optimizer, "precision": precision, "params": n,
            "bytes_per_param": sum(out.values()) / n, **{f"{k}_per_param": v / n for k, v in out.items()}}


def measure_saved_bytes(model: str, precision: str, gradient_checkpointing: bool, pairs: int, prompt_len: int,
                        completion_len: int, device="cpu", logps_backend: str = "auto") -> dict:
    """Bytes autograd holds for backward during fastdpo's policy forward and loss on one micro-batch.

    Counted with `torch.autograd.graph.saved_tensors_hooks` (unique storages; parameters excluded, their bytes are
    the state's), split by where they were saved: the decoder layers' MLPs, the rest of the layers, outside the
    layers (embedding, final norm) and the LM head. With gradient checkpointing a layer's saved tensors are its
    checkpoint's and are dropped; what stays is its inputs, held by the checkpoint (counted from a pre-hook on each
    layer). Autocast's bf16 copies of weights are counted apart (`copies`). Peaks inside one op, the allocator and
    the fused head's transient tile are not seen here (the estimate adds the tile)."""
    from fastdpo.scoring import head_spec

    device = torch.device(device)
    cfg, policy, scorer, objective = _measurement_policy(
        model, device, dtype=precision, gradient_checkpointing=gradient_checkpointing, logps_backend=logps_backend)
    params = {key for p in scorer.parameters() for key, _, _ in optim.storages(p)}
    where = {}
    found = {}  # storage key -> (part, bytes, storage): holding the storage keeps its address from being reused

    def add(t, part):
        for key, nbytes, storage in optim.storages(t):
            if key not in params and key not in found:
                found[key] = (part, nbytes, storage)

    def pack(t):
        add(t, "copies" if _weight_copy(t) else where["part"])
        return t

    def hold_inputs(module, args, kwargs):
        if gradient_checkpointing:
            for x in [*args, *kwargs.values()]:
                for t in x if isinstance(x, tuple | list) else [x]:
                    if isinstance(t, torch.Tensor):
                        add(t, "held")

    def enter(part):
        def hook(*_):
            where["part"] = part
        return hook

    backbone = head_spec(policy).backbone if head_spec(policy) is not None else policy.model
    where["part"] = "outside"  # the embedding, then the final norm: once per model, not per layer
    hooks = [backbone.register_forward_hook(enter("head"))]
    for layer in backbone.layers:
        hooks += [layer.register_forward_pre_hook(hold_inputs, with_kwargs=True),
                  layer.register_forward_pre_hook(enter("layer")), layer.register_forward_hook(enter("outside")),
                  layer.mlp.register_forward_pre_hook(enter("mlp")), layer.mlp.register_forward_hook(enter("layer"))]
    batch = _measurement_batch(policy.config.vocab_size, pairs, prompt_len, completion_len)
    try:
        with _autocast(precision, device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = objective.step(scorer, batch)
    finally:
        for h in hooks:
            h.remove()
    loss.backward()  # the graph is a real one
    parts = {k: 0 for k in ("outside", "layer", "mlp", "held", "head", "copies")}
    for part, nbytes, _ in found.values():
        parts[part] += nbytes
    c = policy.config
    tokens, scored, layers = 2 * pairs * (prompt_len + completion_len), 2 * pairs * completion_len, len(backbone.layers)
    hidden, inter = c.hidden_size, c.intermediate_size
    linear = sum(p.numel() for layer in backbone.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
                 for p in m.parameters())
    return {"precision": precision, "gradient_checkpointing": gradient_checkpointing, "tokens": tokens,
            "scored_tokens": scored, "layers": layers, "hidden": hidden, "intermediate": inter,
            "vocab": c.vocab_size, "fused_head": objective.fused, **{f"{k}_bytes": v for k, v in parts.items()},
            # per token and layer: bytes per hidden unit (attention, norms, residual) and per MLP unit; with
            # checkpointing, the layers' inputs per hidden unit
            "a_hidden": parts["layer"] / (tokens * layers * hidden), "a_intermediate": parts["mlp"] / (tokens * layers
                                                                                                        * inter),
            "a_held": parts["held"] / (tokens * layers * hidden),
            "a_outside": parts["outside"] / (tokens * hidden),  # per token and hidden unit, once per model
            # all the backbone holds, per token, layer and hidden unit
            "per_token_layer_hidden": sum(parts[k] for k in ("outside", "layer", "mlp", "held")) / (tokens * layers
                                                                                                    * hidden),
            "copies_per_param": parts["copies"] / linear}


def estimate_precision(optimizer: str) -> str:
    """The precision a GPU run trains in with `optimizer`: bf16 weights for an optimizer made for them, else
    bf16-mixed (the GPU default: fp32 weights, bf16 autocast)."""
    return "bfloat16" if optim.OPTIMIZERS[optimizer].weights == "bf16" else "bf16-mixed"


def architecture(preset: str) -> dict:
    """A preset's shape for the estimate: parameters, the decoder layers' matmul parameters, L, H, I, V."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(PRESETS[preset])
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
    layers = m.get_decoder().layers
    linear = sum(p.numel() for layer in layers for mod in layer.modules() if isinstance(mod, torch.nn.Linear)
                 for p in mod.parameters())
    c = m.config
    return {"params": sum(p.numel() for p in m.parameters()), "linear_params": linear, "layers": len(layers),
            "hidden": c.hidden_size, "intermediate": c.intermediate_size, "vocab": c.vocab_size}


PRECISION_BYTES = {"bf16-mixed": (4, 2), "bfloat16": (2, 2), "float32": (4, 4)}  # (weights, compute) bytes


def estimate_bytes(arch: dict, coef: dict, bytes_per_param: float, tokens: int, gradient_checkpointing: bool,
                   overhead_bytes: float) -> dict:
    """A training step's peak bytes for `arch` (see the formula above this section), part by part.

    coef: a_hidden, a_intermediate (bytes per token, layer and hidden / MLP unit, no checkpointing), a_held (the
    layers' inputs with checkpointing, per token, layer and hidden unit), a_outside (per token and hidden unit,
    outside the layers), copies_per_param, precision. Every token is counted as scored."""
    from fastdpo.kernels import loss_chunk_tokens

    t, n_layers, h, i, v = tokens, arch["layers"], arch["hidden"], arch["intermediate"], arch["vocab"]
    weight_bytes, compute_bytes = PRECISION_BYTES[coef["precision"]]
    one_layer = t * (coef["a_hidden"] * h + coef["a_intermediate"] * i)
    activations = coef["a_outside"] * t * h + (coef["a_held"] * t * n_layers * h + one_layer if gradient_checkpointing
                                               else one_layer * n_layers)
    tile = min(t, loss_chunk_tokens(v, weight_bytes)) * v * compute_bytes  # the chunk sizing train.py uses
    parts = {"state": bytes_per_param * arch["params"],
             "weight_copies": coef["copies_per_param"] * (arch["linear_params"] + v * h),
             "activations": activations, "head": 4 * v * h + 4 * t * h + tile, "overhead": overhead_bytes}
    return {**parts, "total": sum(parts.values())}


def fit_estimate(setup: Setup) -> tuple[dict, list[dict]]:
    """Measure on the benchmark's model (one worker), then estimate every FIT_ESTIMATE_MODELS shape for each
    --fit-optimizers entry, without and with gradient checkpointing. Returns (the measurements, CSV rows)."""
    a = setup.args
    job = dict(kind="measure", model=setup.model, optimizers=a.fit_optimizers, pairs=a.batch_size,
               prompt_len=a.prompt_len, completion_len=a.completion_len)
    measured = run_job(setup, "fit-measure", job)
    if measured["status"] != "ok":
        raise SystemExit(f"bench_train: the fit estimate's measurements failed ({measured['status']}); see "
                         f"{setup.logs / 'fit-measure.log'}")
    tokens = a.fit_estimate_pairs * 2 * a.fit_estimate_seq_len
    rows = []
    for name in FIT_ESTIMATE_MODELS:
        arch = architecture(name)
        for optimizer in a.fit_optimizers:
            state = measured["optimizers"][optimizer]
            bpp = state.get("bytes_per_param", optim.OPTIMIZERS[optimizer].bytes_per_param)
            precision = estimate_precision(optimizer)
            act = measured["activations"][precision]
            # autocast's weight copies are cached to backward either way; inside a checkpoint the hooks miss them
            coef = dict(precision=precision, a_hidden=act["off"]["a_hidden"],
                        a_intermediate=act["off"]["a_intermediate"], a_held=act["on"]["a_held"],
                        copies_per_param=act["off"]["copies_per_param"])
            for ckpt in (False, True):
                coef["a_outside"] = act["on" if ckpt else "off"]["a_outside"]
                est = estimate_bytes(arch, coef, bpp, tokens, ckpt, a.fit_overhead_gb * 2**30)
                row = dict(model=name, params=arch["params"], layers=arch["layers"], hidden=arch["hidden"],
                           intermediate=arch["intermediate"], vocab=arch["vocab"], optimizer=optimizer,
                           precision=precision, bytes_per_param=_fmt(bpp, ".3f"),
                           bytes_per_param_source="measured" if "error" not in state else
                           f"declared by fastdpo.optim ({state['error']})",
                           gradient_checkpointing=ckpt, tokens=tokens,
                           **{f"{k}_gib": _fmt(v / 2**30, ".2f") for k, v in est.items()})
                for budget in a.fit_estimate_budgets_gb:
                    row[f"fits_{budget:g}gib"] = est["total"] <= budget * 2**30
                rows.append(row)
    return measured, rows


def estimate_markdown(measured: dict, rows: list[dict], setup: Setup) -> list[str]:
    """The estimate's section: its label, the measured numbers, the largest model per budget, every total."""
    a = setup.args
    where = (f"measurements on {machine_name(a.device)}" if a.device.startswith("cuda") else "CPU measurements")
    model = a.model or a.preset
    tokens = a.fit_estimate_pairs * 2 * a.fit_estimate_seq_len
    lines = ["## Largest model that fits one GPU (estimate)", "",
             f"**Estimate from {where} (bytes/param measured on {model}, activations from saved tensors); not "
             f"measured on a GPU.**", "",
             f"- micro-batch: {a.fit_estimate_pairs} pairs × 2 sequences × {a.fit_estimate_seq_len} tokens = "
             f"{tokens} tokens, packed (no padding), every token counted as scored; one micro-batch per step "
             "(accumulation adds no memory)",
             "- precision as a GPU trains: bf16-mixed (fp32 weights, bf16 autocast), or bf16 weights for an optimizer "
             "made for them (" + (", ".join(o for o in a.fit_optimizers if estimate_precision(o) == "bfloat16")
                                  or "none here") + f"); + {a.fit_overhead_gb:g} GiB overhead (CUDA context, "
             "allocator)"]
    for name in a.fit_optimizers:
        st = measured["optimizers"][name]
        if "error" in st:
            lines.append(f"- {name}: not measured here ({st['error']}); the estimate uses fastdpo.optim's declared "
                         f"{optim.OPTIMIZERS[name].bytes_per_param:g} bytes/param")
        else:
            lines.append(f"- {name}: {st['bytes_per_param']:.2f} bytes/param measured ({st['precision']} weights: "
                         f"weights {st['weights_per_param']:.2f} + gradients {st['gradients_per_param']:.2f} + "
                         f"state {st['state_per_param']:.2f}, after one step on {st['params'] / 1e6:.1f}M params)")
    for precision, act in measured["activations"].items():
        off, on = act["off"], act["on"]
        formula = 4 * off["vocab"] * off["hidden"] + 4 * off["scored_tokens"] * off["hidden"]
        lines.append(
            f"- activations, {precision}, measured on {off['tokens']} tokens ({a.batch_size} pairs, prompt "
            f"{a.prompt_len} + completion {a.completion_len}): {off['per_token_layer_hidden']:.1f} bytes per token, "
            f"layer and hidden unit without gradient checkpointing ({off['a_hidden']:.1f} per hidden unit + "
            f"{off['a_intermediate']:.2f} per MLP unit in a layer, {off['a_outside']:.1f} per token and hidden unit "
            f"outside the layers), {on['per_token_layer_hidden']:.2f} with it ({on['a_held']:.2f} the layers' "
            f"inputs, {on['a_outside']:.1f} outside); weight copies {off['copies_per_param']:.2f} bytes per matmul "
            "parameter; fused head "
            f"{off['head_bytes'] / 2**20:.2f} MiB saved vs 4VH + 4SH = {formula / 2**20:.2f} MiB")
    budgets = a.fit_estimate_budgets_gb
    lines += ["", "| optimizer | bytes/param | gradient checkpointing | " + " | ".join(f"≤ {b:g} GiB" for b in budgets)
              + " |", "|---" * (3 + len(budgets)) + "|"]
    for name in a.fit_optimizers:
        for ckpt in (False, True):
            mine = [r for r in rows if r["optimizer"] == name and r["gradient_checkpointing"] == ckpt]
            cells = []
            for b in budgets:
                fits = [r for r in mine if r[f"fits_{b:g}gib"]]
                best = max(fits, key=lambda r: r["params"]) if fits else None
                cells.append(f"{best['model']} ({best['total_gib']} GiB)" if best else
                             f"none ({mine[0]['model']} needs {mine[0]['total_gib']} GiB)")
            lines.append(f"| {name} | {mine[0]['bytes_per_param']} | {'on' if ckpt else 'off'} | "
                         + " | ".join(cells) + " |")
    lines += ["", "Every estimated total, GiB (gradient checkpointing off / on):", "",
              "| model | params | layers × hidden (MLP) | vocab | " + " | ".join(a.fit_optimizers) + " |",
              "|---" * (4 + len(a.fit_optimizers)) + "|"]
    for name in FIT_ESTIMATE_MODELS:
        mine = {(r["optimizer"], r["gradient_checkpointing"]): r for r in rows if r["model"] == name}
        r0 = mine[(a.fit_optimizers[0], False)]
        totals = [f"{mine[(o, False)]['total_gib']} / {mine[(o, True)]['total_gib']}" for o in a.fit_optimizers]
        lines.append(f"| {name} | {r0['params'] / 1e9:.2f}B | {r0['layers']} × {r0['hidden']} ({r0['intermediate']}) "
                     f"| {r0['vocab']} | " + " | ".join(totals) + " |")
    lines += [
        "",
        "How: weights + gradients + optimizer state at the measured bytes/param; autocast's bf16 weight copies; "
        "T·L·(a_h·H + a_i·I) + a_out·T·H saved activations (with checkpointing: the layers' inputs plus one layer "
        "recomputed); "
        "the fused head's fp32 grad_weight (4·V·H) and grad_hidden (4·T·H) and one chunk's logit tile; the overhead. "
        "Not in it: allocator fragmentation, temporaries inside an op (attention and MLP workspaces, torch's "
        "foreach AdamW's copy of the second moments during the step), the two-model baseline's reference. The "
        "coefficients come from one model and are applied to shapes with other head counts and MLP ratios; parts "
        "that peak at different moments are summed, so the estimate leans high. The fit test (`--fit-test` on a "
        "GPU: the allocator capped at the budget) is the measurement; run at these sizes (e.g. `--preset qwen2.5-7b "
        "--prompt-len 512 --completion-len 512 --fit-test --fit-start-batch 8 --fit-max-batch 8`), it replaces a "
        "cell of this table.",
        ""]
    return lines


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


def fit_markdown(fit_rows: list[dict], setup: Setup) -> list[str]:
    a = setup.args
    lines = [f"## Fit test: the largest batch under {a.fit_budget_gb:g} GiB, per optimizer", "",
             "| method | optimizer | weights | largest batch | its peak GiB |", "|---|---|---|---|---|"]
    for f in fit_rows:
        lines.append(f"| {f['method']} | {f['optimizer']} | {f['dtype']} | {f['fit_max_batch']} | "
                     f"{f['fit_peak_gib'] or '—'} |")
    bf16 = [o for o in a.fit_optimizers if optim.OPTIMIZERS[o].weights == "bf16"]
    lines += ["", "- fastdpo rows (and the two-model baseline, fastdpo's trainer too) run `fastdpo train --optimizer "
              "X`" + (f"; {', '.join(bf16)} train bf16 weights (`--dtype bfloat16`), what they are made for"
                      if bf16 else "") + ". TRL rows run TRL's AdamW only; for other optimizers they are n/a.", ""]
    return lines


def markdown(rows: list[dict], setup: Setup, stats: dict, n_matmul: int, argv: list[str], commands: dict,
             load: tuple[float, float], fit_rows: list[dict] | None = None, estimate=None) -> str:
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
        fit = (f"{r['fit_max_batch']} @ {r['fit_budget_gib']} GiB ({r['fit_optimizer']})" if r["fit_max_batch"]
               else "")
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
        *(fit_markdown(fit_rows, setup) if fit_rows else []),
        *(estimate_markdown(*estimate, setup) if estimate else []),
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
        "it. The main table shows the first --fit-optimizers entry's; the fit section, every optimizer's.",
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
    p.add_argument("--fit-optimizers", type=lambda x: [o.strip() for o in x.split(",") if o.strip()],
                   default=list(optim.OPTIMIZERS),
                   help="comma-separated `fastdpo train --optimizer` choices for the fit test and the estimate "
                        f"(default: all of fastdpo's, now {','.join(optim.OPTIMIZERS)})")
    p.add_argument("--fit-estimate", action="store_true",
                   help="measure bytes/param and activation bytes on the model, and estimate the largest real model "
                        "under each --fit-estimate-budgets-gb (writes PREFIX_fit_estimate.csv)")
    p.add_argument("--fit-estimate-budgets-gb", type=lambda x: [float(b) for b in x.split(",")], default=[24.0, 80.0],
                   help="comma-separated GPU memory budgets of the estimate, GiB")
    p.add_argument("--fit-estimate-pairs", type=int, default=8, help="the estimate's micro-batch, pairs")
    p.add_argument("--fit-estimate-seq-len", type=int, default=1024, help="the estimate's tokens per sequence")
    p.add_argument("--fit-overhead-gb", type=float, default=1.0,
                   help="the estimate's fixed overhead (CUDA context, allocator), GiB")
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
    unknown = [o for o in args.fit_optimizers if o not in optim.OPTIMIZERS]
    if unknown or not args.fit_optimizers:
        p.error(f"--fit-optimizers: {unknown[0] if unknown else 'none given'!r} is not a fastdpo optimizer; choose "
                f"from {','.join(optim.OPTIMIZERS)}")
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
        fit_rows = []
        if args.fit_test:
            for r in rows:
                for optimizer in args.fit_optimizers:
                    batch, peak = fit_test(setup, r["method"], optimizer)
                    dtype = "bf16" if optim.OPTIMIZERS[optimizer].weights == "bf16" else args.dtype
                    fit_rows.append(dict(method=r["method"], optimizer=optimizer, dtype=dtype,
                                         fit_budget_gib=_fmt(args.fit_budget_gb), fit_max_batch=batch,
                                         fit_peak_gib=peak))
                first = next(f for f in fit_rows if f["method"] == r["method"])
                r.update(fit_budget_gib=first["fit_budget_gib"], fit_max_batch=first["fit_max_batch"],
                         fit_peak_gib=first["fit_peak_gib"], fit_optimizer=first["optimizer"])
            with open(out.parent / f"{out.name}_fit.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIT_COLUMNS)
                writer.writeheader()
                writer.writerows(fit_rows)
        estimate = None
        if args.fit_estimate:
            estimate = fit_estimate(setup)
            with open(out.parent / f"{out.name}_fit_estimate.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(estimate[1][0]))
                writer.writeheader()
                writer.writerows(estimate[1])

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
        md = markdown(rows, setup, stats, n_matmul, argv, commands, (load_start, os.getloadavg()[0]), fit_rows,
                      estimate)
        md = md.replace(str(tmp), "$TMP")
        out.with_suffix(".md").write_text(md)
        title = (f"{args.model or args.preset}, {args.dataset or args.data} data, batch {args.batch_size}, "
                 f"{args.dtype}, {machine_name(args.device)}")
        plot(rows, out.with_suffix(".png"), title, args.sweep_k)
        for r in rows:
            print(f"{r['method']:>15}: {r['status']:<6} {r['tokens_per_s'] or '-':>8} tokens/s "
                  f"x{r['throughput_vs_baseline'] or '-'}  peak {r['peak_mem_gib'] or '-'} GiB "
                  f"x{r['memory_vs_baseline'] or '-'}", flush=True)
        if estimate is not None:
            print("\n".join(estimate_markdown(*estimate, setup)), flush=True)
        print(f"bench_train: {time.perf_counter() - t_start:.0f}s -> {out}.{{csv,md,png}}", flush=True)
        return rows
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
