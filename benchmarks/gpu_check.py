"""Stages of benchmarks/gpu_check.sh that are not a benchmark script of their own (run gpu_check.sh, not this).

Subcommands:
  env          versions, the device, which peers (trl, liger-kernel, cut-cross-entropy) and optimizer libraries
               (bitsandbytes, torch-optimi) are importable, and unmet requirements of installed wheels -> JSON
  setup        env, then build-model, in one process
  build-model  save one random-weight model of a presets.py preset (with its tokenizer), shared by the training stages
  precision    tests/test_precision.py's measurement (AdamW steps at lr 1e-6, the fraction of weights that changed) on
               the device fastdpo trains on, for float32, bf16-mixed, bfloat16 and auto; SDPA attention (this checks
               weight updates, not attention: no FlexAttention compile); a row per dtype as it finishes
  sharded      a few DPO steps unsharded, then under FSDP2 (`--fsdp`, one process through torchrun), DeepSpeed ZeRO-3
               through `accelerate launch`, and FSDP2 with CPU offload: each run's losses against the unsharded run's,
               peak memory, tokens/s after the first step and the first step (compiles) apart; a row per variant as
               it finishes, each run with the time left as its timeout
The summary is gpu_check_summary.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Deadline, Table, exit_on_sigterm, run_child, unfinished_status

PEERS = {"trl": "trl", "liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy",
         "bitsandbytes": "bitsandbytes", "optimi": "torch-optimi", "deepspeed": "deepspeed"}  # fmt: skip
CARRIED = ("datasets", "dill", "multiprocess", "trl", "liger-kernel", "cut-cross-entropy", "bitsandbytes",
           "torch-optimi")  # fmt: skip
VERSIONS = ("torch", "triton", "transformers", "accelerate", "peft", "datasets", "pyarrow", "fsspec", "dill",
            "multiprocess", "huggingface-hub", "trl", "liger-kernel", "cut-cross-entropy", "bitsandbytes",
            "torch-optimi", "deepspeed", "pytest")  # fmt: skip


def _time_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-limit-s", type=float, default=None, help="stop starting rows after this many seconds")


# ----------------------------------------------------------------------------------------------------------------
# env, setup, build-model
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
    for module, package in PEERS.items():  # found, not imported: importing deepspeed alone takes seconds
        info["peers"][package] = None if importlib.util.find_spec(module) is not None else "not installed"
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
    from presets import build_preset, synthetic_words

    t0 = time.perf_counter()
    # as bench_train builds it: the same words (so the same tokenizer as its synthetic data) and dtype
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    build_preset(args.preset, Path(args.out), synthetic_words(400), dtype, args.device)
    print(f"build-model: {args.preset} ({args.dtype}) -> {args.out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------------------------

PRECISION_COLUMNS = ["dtype", "precision", "device", "steps", "weights_changed", "norms_changed", "expected", "status",
                     "seconds"]  # fmt: skip
DTYPES = ("float32", "bf16-mixed", "bfloat16", "auto")


def cmd_precision(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py precision")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv and PREFIX.md, row by row")
    p.add_argument("--steps", type=int, default=20, help="AdamW steps per dtype (the first already moves every weight)")
    _time_limit(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    deadline = Deadline(args.time_limit_s)
    table = Table(
        args.out, PRECISION_COLUMNS, ["# precision: the fraction of weights AdamW steps at lr 1e-6 moved", ""]
    )
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import CORPUS, make_pairs, write_jsonl  # the CPU test's model, data and measurement
    from test_precision import changed_fractions

    from fastdpo.errors import Interrupted
    from fastdpo.modeling import default_precision, process_state
    from fastdpo.recipes.precompute import PrecomputeConfig, precompute
    from fastdpo.recipes.train import train
    from fastdpo.tiny import build_tiny_model

    root, todo, last_s = Path(tempfile.mkdtemp(prefix="gpu_check_precision-")), list(DTYPES), 0.0
    try:
        model = build_tiny_model(root / "model", texts=CORPUS, vocab_size=400)
        data = write_jsonl(root / "d.jsonl", make_pairs(16, seed=9))
        precompute(PrecomputeConfig(model=model, dataset=str(data), output=str(root / "c"), progress=False))
        device = process_state().device
        while todo and deadline.left() > last_s:
            dtype, t0 = todo[0], time.perf_counter()
            try:
                train(model=model, ref_cache=str(root / "c"), output=str(root / dtype), dtype=dtype, lr=1e-6,
                      max_steps=args.steps, batch_size=4, epochs=5, progress=False, kl_warn=None,
                      attn_implementation="sdpa")  # fmt: skip
            except Interrupted as e:  # fastdpo's own SIGTERM handling stopped the run at a step: stop here too
                raise SystemExit(e.exit_code) from e
            weights, norms = changed_fractions(root / dtype, model)
            precision = default_precision(dtype, device)
            if precision == "bfloat16":  # plain AdamW on bf16 weights rounds updates of lr 1e-6 away
                expected, ok = "weights < 0.5, norms == 0", weights < 0.5 and norms == 0.0
            else:
                expected, ok = "weights >= 0.99, norms >= 0.99", weights >= 0.99 and norms >= 0.99
            last_s = time.perf_counter() - t0
            table.add(dict(dtype=dtype, precision=precision, device=str(device), steps=args.steps,
                           weights_changed=f"{weights:.4f}", norms_changed=f"{norms:.4f}", expected=expected,
                           status="ok" if ok else "failed: not as expected", seconds=f"{last_s:.1f}"))  # fmt: skip
            todo.pop(0)
            print(f"precision {dtype} ({precision} on {device}): weights {weights:.4f}, norms {norms:.4f} changed "
                  f"({table.rows[-1]['status']})", flush=True)  # fmt: skip
    finally:
        status = unfinished_status()
        for dtype in todo:
            table.add(dict(dtype=dtype, status=status, steps=args.steps))
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in table.rows) else 1


# ----------------------------------------------------------------------------------------------------------------
# sharded
# ----------------------------------------------------------------------------------------------------------------

SHARDED_COLUMNS = ["variant", "status", "device", "dtype", "steps", "max_abs_loss_diff", "tolerance",
                   "peak_memory_gb", "tokens_per_s", "first_step_s", "seconds", "command"]  # fmt: skip


def sharded_variants(model: str, cache: str, dtype: str, steps: int, gpu: bool) -> dict:
    """variant -> (argv without --output, or a reason it is skipped). The same training, launched four ways, in the
    order run (the most telling first)."""
    train = [
        "-m",
        "fastdpo",
        "train",
        "--model",
        model,
        "--ref-cache",
        cache,
        "--dtype",
        dtype,
        "--max-steps",
        str(steps),
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-5",
        "--no-progress",
        "--log-every",
        "1",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    zero3 = REPO / "examples" / "accelerate" / "zero3.yaml"
    v = {"unsharded": [sys.executable, *train],
         "fsdp2": [*torchrun, *train, "--fsdp"],
         "zero3": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(zero3),
                   "--num_processes", "1", *train],
         "fsdp2-offload": [*torchrun, *train, "--fsdp", "--fsdp-cpu-offload"] if gpu
         else "skipped: CPU offload needs a GPU"}  # fmt: skip
    if importlib.util.find_spec("deepspeed") is None:
        v["zero3"] = "skipped: deepspeed not installed (see benchmarks/README.md: the wheels to bring)"
    elif not zero3.is_file():
        v["zero3"] = f"skipped: no {zero3.relative_to(REPO)}"
    return v


def cmd_sharded(argv):
    p = argparse.ArgumentParser(prog="gpu_check.py sharded")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv and PREFIX.md, row by row")
    p.add_argument("--dtype", default="bf16-mixed")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the variants, in this order")
    _time_limit(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    deadline = Deadline(args.time_limit_s)
    table = Table(args.out, SHARDED_COLUMNS, ["# sharded training against unsharded, one process each", ""])
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from conftest import make_pairs, write_jsonl

    from fastdpo.recipes.precompute import PrecomputeConfig, precompute

    gpu = torch.cuda.is_available()
    root = Path(tempfile.mkdtemp(prefix="gpu_check_sharded-"))
    # bf16 compute: the sharded run reduces in another order, in bf16 (measured on CPU, tiny model: <= 3e-4)
    tolerance = 2e-2 if args.dtype != "float32" else 1e-4
    todo, base = [], None
    try:
        data = write_jsonl(root / "d.jsonl", make_pairs(32, seed=11))
        precompute(PrecomputeConfig(model=args.model, dataset=str(data), output=str(root / "c"), progress=False,
                                    dtype="bfloat16" if gpu and args.dtype != "float32" else "float32"))  # fmt: skip
        variants = sharded_variants(args.model, str(root / "c"), args.dtype, args.steps, gpu)
        todo = [v for v in (args.variants or variants) if v in variants]
        while todo:
            name, cmd = todo[0], variants[todo[0]]
            row = dict(variant=name, device="cuda" if gpu else "cpu", dtype=args.dtype, steps=args.steps,
                       tolerance=tolerance)  # fmt: skip
            if isinstance(cmd, str):
                table.add({**row, "status": cmd})
                todo.pop(0)
                continue
            t0, cmd = time.perf_counter(), [*cmd, "--output", str(root / name)]
            log = root / f"{name}.log"
            rc = run_child(cmd, log, deadline.timeout(reserve=2), cwd=REPO)
            row.update(seconds=f"{time.perf_counter() - t0:.1f}", command=" ".join(cmd[1:]))
            print(f"sharded {name}: exit {rc}\n" + "\n".join(log.read_text().splitlines()[-40:]), flush=True)
            out = root / name / "metrics.jsonl"
            if rc != 0 or not out.is_file():
                table.add({**row, "status": "cut (budget)" if rc == 124 else f"error: exit {rc}"})
                todo.pop(0)
                continue
            m = [json.loads(line) for line in out.read_text().splitlines()]
            row.update(
                peak_memory_gb=m[-1].get("peak_memory_gb", ""),
                tokens_per_s=f"{sum(x['tokens_per_s'] for x in m[1:]) / max(len(m) - 1, 1):.0f}",
                first_step_s=f"{m[0]['elapsed_s']:.2f}",
            )  # the compile (FlexAttention on CUDA) is here
            if base is None:
                base, row["status"] = m, "ok"
            else:
                diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(base, m))
                row.update(
                    max_abs_loss_diff=f"{diff:.2e}",
                    status="ok" if diff <= tolerance and len(m) == len(base) else "failed: losses differ",
                )
            table.add(row)
            todo.pop(0)
    finally:
        status = unfinished_status()
        for name in todo:
            table.add(dict(variant=name, status=status, dtype=args.dtype, steps=args.steps))
        shutil.rmtree(root, ignore_errors=True)
    return 0 if table.rows and all(r["status"] == "ok" or r["status"].startswith("skipped") for r in table.rows) else 1


COMMANDS = {"setup": cmd_setup, "env": cmd_env, "build-model": cmd_build_model, "precision": cmd_precision,
            "sharded": cmd_sharded}  # fmt: skip


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
