"""`fastdpo train --fsdp`: FSDP2 (`fully_shard`) against the unsharded 1-process run, on CPU over gloo.

One process (a 1-rank group made in-process) runs in the fast tier; two processes (torchrun, once
accelerate launch), the kill -9 and the resume from sharded checkpoints are slow. Equal means equal
at equal global batch, within fp32 rounding: the sharded run sums the same gradients in another order
(reduce-scatter), nothing else differs.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, make_pairs, one_line_error, run_cli, write_jsonl
from safetensors.torch import load_file
from test_distributed import FIELDS, _free_port
from test_train import metrics

from fastdpo import kernels
from fastdpo.recipes.precompute import PrecomputeConfig, precompute
from fastdpo.recipes.train import train

ATOL = 2e-5  # fp32 sums in another order over 4-16 steps at lr 1e-3 (measured: <= 3e-6)


def assert_same_run(a, b, atol=ATOL):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    assert ma[-1]["rewards/margins"] != 0  # it trained
    for x, y in zip(ma, mb):
        for f in FIELDS:
            assert abs(x[f] - y[f]) <= atol, (x["step"], f, x[f], y[f])
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst
    worst_metric = max(abs(x[f] - y[f]) for x, y in zip(ma, mb) for f in FIELDS)
    print(f"max |diff|: metrics {worst_metric:.2e}, weights {worst:.2e}")  # -s shows it: the numbers in the README


def final_weights(out) -> dict:
    """The saved model, loaded back with transformers."""
    from transformers import AutoModelForCausalLM

    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(out).state_dict().items()}


@pytest.fixture(scope="module")
def caches(tiny_model, tmp_path_factory):
    """A cache for the tiny Llama and one for a tiny Qwen2 with tied embeddings (same tokenizer)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(root / "pairs.jsonl", make_pairs(16, seed=4))
    os.makedirs(root / "qwen")
    for f in os.listdir(tiny_model):  # the same tokenizer files
        if "token" in f or f.endswith(".jinja"):
            shutil.copy(os.path.join(tiny_model, f), root / "qwen" / f)
    tok = AutoTokenizer.from_pretrained(root / "qwen")
    torch.manual_seed(0)
    # read as a Qwen2Tokenizer next to its config, it has one more token: a padded vocabulary, as Qwen's are
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + 16, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    assert qwen.lm_head.weight is qwen.model.embed_tokens.weight
    qwen.save_pretrained(root / "qwen")
    out = {}
    for name, model in (("llama", tiny_model), ("qwen", str(root / "qwen"))):
        precompute(PrecomputeConfig(model=model, dataset=str(data), output=str(root / f"c-{name}"), shard_rows=4,
                                    batch_size=3, progress=False))
        out[name] = (model, str(root / f"c-{name}"))
    return out


def common(model, cache, **kw):
    return dict(model=model, ref_cache=cache, max_steps=4, lr=1e-3, progress=False, **kw)


@pytest.fixture
def fused_calls(monkeypatch):
    """Record the LM-head weight each fused-loss call gets: under FSDP it must be the full (V, H) weight."""
    seen = []
    real = kernels.linear_pair_loss

    def spy(hidden, weight, *a, **k):
        seen.append((type(weight).__name__, tuple(weight.shape)))
        return real(hidden, weight, *a, **k)

    monkeypatch.setattr(kernels, "linear_pair_loss", spy)
    return seen


@pytest.mark.parametrize("lm_head", ["own", "root"])
def test_one_process_fsdp_equals_unsharded(caches, tmp_path, fused_calls, lm_head):
    model, cache = caches["llama"]
    train(output=str(tmp_path / "plain"), batch_size=2, grad_accum=2, **common(model, cache))
    n_plain = len(fused_calls)
    train(output=str(tmp_path / "fsdp"), batch_size=2, grad_accum=2, fsdp=True, fsdp_lm_head=lm_head,
          **common(model, cache))
    assert len(fused_calls) == 2 * n_plain > 0  # the fused head ran under FSDP too
    assert all(w == fused_calls[0] for w in fused_calls)  # ... on the gathered weight, not a shard
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp")


@pytest.mark.integration  # six runs that tokenize their data
def test_sft_and_live_reference_under_fsdp(caches, tmp_path):
    """`fastdpo sft --fsdp`, and `train --fsdp` with a live reference: a frozen copy (not sharded), or LoRA's base
    model, the sharded policy with its adapter off."""
    from fastdpo.recipes.sft import sft

    model, _ = caches["llama"]
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(12, seed=5))
    for run, name, extra in ((sft, "sft", {}), (train, "live", {}), (train, "lora-live", {"lora_r": 4})):
        if extra:
            pytest.importorskip("peft")
        kw = dict(model=model, dataset=str(data), max_steps=3, lr=1e-3, batch_size=2, progress=False, **extra)
        run(output=str(tmp_path / f"{name}-plain"), **kw)
        run(output=str(tmp_path / f"{name}-fsdp"), fsdp=True, **kw)
        for x, y in zip(metrics(tmp_path / f"{name}-plain"), metrics(tmp_path / f"{name}-fsdp")):
            assert abs(x["loss"] - y["loss"]) <= ATOL and abs(x["grad_norm"] - y["grad_norm"]) <= ATOL, (name, x, y)


@pytest.mark.integration  # bf16 on CPU: seconds per step
def test_bf16_mixed_under_fsdp_tracks_unsharded(caches, tmp_path):
    """MixedPrecisionPolicy (bf16 compute, fp32 weights and gradient reduction) against accelerate's bf16 autocast
    on the unsharded model: equal up to bf16 rounding; the saved weights stay fp32."""
    model, cache = caches["llama"]
    kw = dict(batch_size=2, grad_accum=2, dtype="bf16-mixed", **{**common(model, cache), "max_steps": 3})
    train(output=str(tmp_path / "plain"), **kw)
    train(output=str(tmp_path / "fsdp"), fsdp=True, **kw)
    for x, y in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "fsdp")):
        assert abs(x["loss"] - y["loss"]) < 1e-3  # bf16: 8 bits of mantissa (measured: <= 2.3e-4)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-2 * x["grad_norm"]  # (measured: <= 0.2%)
    assert {v.dtype for v in final_weights(tmp_path / "fsdp").values()} == {torch.float32}


def test_kahan_optimizer_under_fsdp_equals_unsharded(caches, tmp_path):
    """torch-optimi's Kahan AdamW steps FSDP2's sharded bf16 weights (and its compensation buffers) as it steps the
    whole ones."""
    model, cache = caches["llama"]
    kw = dict(batch_size=2, optimizer="adamw-kahan", **{**common(model, cache), "max_steps": 3})
    train(output=str(tmp_path / "plain"), **kw)
    train(output=str(tmp_path / "fsdp"), fsdp=True, **kw)
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp", atol=0)  # one process: the same sums in the same order


def test_non_finite_step_under_fsdp_is_skipped_as_unsharded(caches, tmp_path, monkeypatch):
    """A NaN loss at step 3: FSDP2 reduce-scatters the NaN gradients; the step is skipped and the shards' gradients
    cleared, so the run continues exactly as the unsharded run with the same NaN step."""
    from test_faults import _nan_from

    T = importlib.import_module("fastdpo.recipes.train")
    model, cache = caches["llama"]
    for name, fsdp in (("plain", False), ("fsdp", True)):
        monkeypatch.setattr(T, "pair_loss", _nan_from(3, 3))  # one micro-batch a step
        train(output=str(tmp_path / name), batch_size=2, fsdp=fsdp, **{**common(model, cache), "max_steps": 5})
    assert [m["bad_steps"] for m in metrics(tmp_path / "fsdp")] == [0, 0, 1, 1, 1]
    ma, mb = metrics(tmp_path / "plain"), metrics(tmp_path / "fsdp")
    for x, y in zip(ma[3:], mb[3:]):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]  # one process: bit for bit


@pytest.mark.parametrize("lm_head", ["own", "root"])
def test_lora_under_fsdp_equals_unsharded(caches, tmp_path, lm_head):
    """LoRA under FSDP2 (frozen base weights and trained adapter weights in the same units; the frozen head scored
    inside the root's forward, its own unit or the root's): the adapter it saves loads with transformers + peft and
    equals the unsharded run's."""
    pytest.importorskip("peft")
    model, cache = caches["llama"]
    kw = dict(batch_size=2, grad_accum=2, lora_r=4, **common(model, cache))
    train(output=str(tmp_path / "plain"), **kw)
    train(output=str(tmp_path / "fsdp"), fsdp=True, fsdp_lm_head=lm_head, **kw)
    assert (tmp_path / "fsdp" / "adapter_config.json").is_file() and not (tmp_path / "fsdp" / "config.json").exists()
    assert any("lora_B" in k for k in final_weights(tmp_path / "fsdp"))  # base + adapter, loaded by transformers
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp", atol=0)  # one process: the same sums in the same order


@pytest.mark.parametrize("fsdp", [[], ["--fsdp"]])
def test_resume_with_other_lora_settings_refused(caches, tmp_path, fsdp):
    """The adapter in a checkpoint has its rank and scale: resuming with others would ignore them (unsharded: peft
    reads them from the checkpoint) or fail deep in the load (sharded)."""
    pytest.importorskip("peft")
    model, cache = caches["llama"]
    out = tmp_path / "run"
    argv = ["train", "--model", model, "--ref-cache", cache, "--output", str(out), "--batch-size", "2", "--max-steps",
            "4", "--save-steps", "2", "--no-progress", *fsdp]
    assert run_cli(*argv, "--lora-r", "4")[0] == 0
    for lora, was in ((["--lora-r", "8"], "--lora-r 4"), (["--lora-r", "4", "--lora-alpha", "8"], "--lora-alpha 16.0")):
        code, err = run_cli(*argv, *lora, "--resume", str(out / "checkpoint-2"))
        one_line_error(code, err, f"trains a LoRA adapter with {was}; resume with the same")


@pytest.mark.integration  # a process of its own
def test_distributed_command_runs_exit_handlers(caches, tmp_path):
    """After a distributed command (here `--fsdp` in one process: a process group all the same) the CLI leaves
    without interpreter finalization (see `cli.entry`), but exit handlers, which trackers such as wandb use, still
    run."""
    model, cache = caches["llama"]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "atexit.register(lambda: open(os.environ['EXIT_MARK'], 'w').write('ran'))\n")
    env = {**os.environ, "EXIT_MARK": str(tmp_path / "mark"), "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-m", "fastdpo", "train", "--fsdp", "--model", model, "--ref-cache", cache,
                           "--max-steps", "1", "--no-progress", "--output", tmp_path / "run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: 1 steps" in proc.stderr  # the last line, flushed
    assert (tmp_path / "mark").read_text() == "ran" and (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--fsdp-lm-head", "root"], "--fsdp-lm-head needs --fsdp"),
    (["--no-fsdp-reshard-after-forward"], "--fsdp-reshard-after-forward needs --fsdp"),
    (["--fsdp", "--fsdp-cpu-offload"], "this run is on CPU already"),
])
def test_fsdp_options_refused(caches, tmp_path, argv, needle):
    model, cache = caches["llama"]
    code, err = run_cli("train", "--model", model, "--ref-cache", cache, "--output", str(tmp_path / "o"), *argv)
    one_line_error(code, err, needle)


def test_sharded_checkpoint_resumes_only_sharded(caches, tmp_path):
    model, cache = caches["llama"]
    out = tmp_path / "run"
    train(output=str(out), batch_size=2, save_steps=2, fsdp=True, **common(model, cache))
    assert {"sharded", "trainer_state.json", "scheduler.pt", "tokenizer.json"} <= set(os.listdir(out / "checkpoint-2"))
    assert not (out / "checkpoint-2" / "optimizer.pt").exists()  # the optimizer state is in the shards
    code, err = run_cli("train", "--model", model, "--ref-cache", cache, "--output", str(out), "--batch-size", "2",
                        "--max-steps", "4", "--lr", "1e-3", "--resume", "latest")
    one_line_error(code, err, "written with --fsdp; resume with it")


# ----------------------------------------------------------------------------------------------
# Two processes under torchrun


def torchrun_cmd(*args, launcher: str = "torchrun") -> list[str]:
    launch = {"torchrun": ["torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
              "accelerate": ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port"]}[launcher]
    return [sys.executable, "-m", *launch, str(_free_port()), "-m", "fastdpo", "train", *map(str, args)]


def torchrun(*args, launcher: str = "torchrun"):
    proc = subprocess.run(torchrun_cmd(*args, launcher=launcher), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# name: (model, flags, launcher); each against the unsharded 1-process run at equal global batch (4 pairs). The fused
# head as its own unit with accumulation: tests/test_engines.py (the same trajectory under every engine)
CASES = {
    "eager head, root unit, checkpointing": ("llama", ["--batch-size", "2", "--fsdp-lm-head", "root",
                                                       "--logps-backend", "eager", "--gradient-checkpointing"],
                                             "torchrun"),
    "tied embeddings, own unit, no reshard": ("qwen", ["--batch-size", "2", "--no-fsdp-reshard-after-forward"],
                                              "torchrun"),
    "fused head, root unit, accelerate launch": ("llama", ["--batch-size", "2", "--fsdp-lm-head", "root"],
                                                 "accelerate"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(CASES))
def test_two_process_fsdp_equals_one_process(caches, tmp_path, case):
    name, flags, launcher = CASES[case]
    model, cache = caches[name]
    backend = "eager" if "eager" in flags else "auto"
    train(output=str(tmp_path / "one"), batch_size=2, grad_accum=2, logps_backend=backend, **common(model, cache))
    torchrun("--fsdp", "--model", model, "--ref-cache", cache, "--output", tmp_path / "two", "--max-steps", "4",
             "--lr", "1e-3", "--no-progress", *flags, launcher=launcher)
    assert metrics(tmp_path / "two")[0]["step"] == 1
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["num_processes"] == 2
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.integration
def test_two_process_lora_fsdp_equals_one_process_and_resumes(caches, tmp_path):
    """LoRA on the tied-embedding Qwen2 under 2-process FSDP2, saved merged: equal to the unsharded 1-process run;
    its sharded checkpoints hold the adapter and its optimizer state only (the frozen base is --model), and a
    resume from one continues the run exactly."""
    pytest.importorskip("peft")
    import torch.distributed.checkpoint as dcp

    model, cache = caches["qwen"]
    lora = ["--lora-r", "4", "--merge-lora"]
    train(output=str(tmp_path / "one"), batch_size=2, grad_accum=2, lora_r=4, merge_lora=True, **common(model, cache))
    args = ["--fsdp", "--model", model, "--ref-cache", cache, "--max-steps", "4", "--lr", "1e-3", "--batch-size", "2",
            "--save-steps", "2", "--no-progress", *lora]
    torchrun(*args, "--output", tmp_path / "two")
    assert_same_run(tmp_path / "one", tmp_path / "two")  # the merged models, loaded with transformers
    for run in ("one", "two"):  # still tied, as trained (merging untied copies would untie them in the config)
        assert json.loads((tmp_path / run / "config.json").read_text())["tie_word_embeddings"] is True
        assert not any("lm_head" in k for k in load_file(tmp_path / run / "model.safetensors"))
    saved = dcp.FileSystemReader(str(tmp_path / "two" / "checkpoint-2" / "sharded")).read_metadata()
    weights = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights
    torchrun(*args, "--output", tmp_path / "resumed", "--resume", tmp_path / "two" / "checkpoint-2")
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == [3, 4]
    for x, y in zip(metrics(tmp_path / "two")[2:], metrics(tmp_path / "resumed")):
        assert all(abs(x[f] - y[f]) <= ATOL for f in FIELDS), (x, y)
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "resumed")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= ATOL


@pytest.mark.integration
def test_two_process_kill9_then_resume_equals_uninterrupted(caches, tmp_path):
    model, cache = caches["llama"]
    out = tmp_path / "run"
    args = ["--fsdp", "--model", model, "--ref-cache", cache, "--output", out, "--batch-size", "1", "--grad-accum",
            "2", "--max-steps", "16", "--epochs", "4", "--lr", "1e-3", "--save-steps", "3", "--no-progress"]
    proc = subprocess.Popen(torchrun_cmd(*args), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-6").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
    proc.wait()
    assert not (out / "model.safetensors").exists(), "killed too late to test anything"
    proc = torchrun(*args, "--resume", "latest")
    assert "resumed from" in proc.stderr
    train(output=str(tmp_path / "straight"), batch_size=2, grad_accum=2, epochs=4,
          **{**common(model, cache), "max_steps": 16})
    assert_same_run(tmp_path / "straight", out, atol=1e-4)  # 16 steps (measured: 1.9e-6 metrics, 1.5e-6 weights)
