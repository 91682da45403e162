"""Shared fixtures: tiny local models and tokenizers (never downloaded) and a CLI runner."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "TRITON_INTERPRET" not in os.environ:  # triton.jit fixes the mode at import: decide before anything imports triton
    import torch  # Triton's CPU interpreter without CUDA; compiled kernels with it (set TRITON_INTERPRET to override)

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]

# Test tiers (pyproject.toml registers the markers; README, Development, gives their times). A test marked
# `integration` or `kernels` in its file keeps that tier; otherwise it is `kernels` in the kernel files,
# `integration` when it trains, scores or launches something (a model or cache fixture, the CLI, a subprocess), and
# `unit` (a pure function: losses, data, cache format, config) when it does none of these.
KERNEL_FILES = {"test_kernels.py", "test_kernels_cuda.py", "test_flex_mask.py"}
MODEL_FIXTURES = {"tiny_model", "small_cache", "ref_cache", "clean_cache", "caches", "setup", "cache"}
_RUNS = re.compile(r"\b(run_cli|run_subprocess|subprocess\.\w+|_?train|precompute|sft|evaluate|compare|demo|Popen)\(")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(t) for t in ("unit", "kernels", "integration")):
            continue
        if Path(str(item.fspath)).name in KERNEL_FILES:
            item.add_marker(pytest.mark.kernels)
            continue
        fn = getattr(item, "function", None)
        args = set(inspect.signature(fn).parameters) if fn is not None else set()
        try:
            runs = fn is not None and _RUNS.search(inspect.getsource(fn)) is not None
        except (OSError, TypeError):
            runs = False
        item.add_marker(pytest.mark.integration if runs or args & MODEL_FIXTURES else pytest.mark.unit)

# A fresh policy equals its reference, so its first step's margin is 0 and its loss ln 2, up to rounding. On CPU in
# fp32 a row's numbers do not depend on the batch it sits in, so precompute and training agree to float rounding;
# on a GPU cuBLAS picks kernels by row count and training runs bf16-mixed, so precompute (one batch shape) and
# training (another) differ at bf16 rounding: the tolerance says which.
FRESH_TOL = 1e-6 if __import__("fastdpo.modeling").modeling.use_cpu() else 5e-2

WORDS = ["world", "hello", "Paris", "France", "capital", "answer", "question", "number", "seven", "eight"]
CORPUS = [
    "Hello world! The capital of France is Paris.",
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "question answer number seven eight world hello",
] * 20


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama with a byte-level BPE tokenizer (BOS added, ChatML template), built locally."""
    from fastdpo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts=CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from fastdpo.modeling import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def small_cache(tiny_model, tmp_path_factory) -> str:
    """A reference cache of 16 pairs (seed 9) precomputed with the default settings, for training tests that need
    no particular cache."""
    from fastdpo.recipes.precompute import PrecomputeConfig, precompute

    root = tmp_path_factory.mktemp("small")
    data = write_jsonl(root / "d.jsonl", make_pairs(16, seed=9))
    precompute(PrecomputeConfig(model=tiny_model, dataset=str(data), output=str(root / "c"), progress=False))
    return str(root / "c")


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Standard-format pairs with varied lengths."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        c = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        r = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        rows.append({"prompt": f"Q{i}: {p}?", "chosen": f" {c}.", "rejected": f" {r}!"})
    return rows


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", make_pairs(24))


def run_cli(*argv: str) -> tuple[int, str]:
    """Run `fastdpo ARGV` in-process; returns (exit code, stderr)."""
    import contextlib
    import io

    from fastdpo.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


def one_line_error(code, err, *needles, alone: bool = False) -> str:
    """A user mistake: exit code 2, one `error:` line holding every needle, no traceback; `alone`: nothing else
    was printed either (the mistake was caught before anything ran). Returns the line."""
    assert code == 2, err
    lines = err.strip().splitlines() if alone else [ln for ln in err.strip().splitlines() if ": error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def run_subprocess(*argv: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m fastdpo ARGV` as a real process (what a user types)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastdpo", *map(str, argv)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def load_script(path: Path):
    """Import a script that is not part of the package (benchmarks/, tools/) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
