"""4-bit and 8-bit base weights (QLoRA, `fastdpo.quant`): loading, the flags' refusals, and a reference cache whose
quantization matches the policy's (bitsandbytes runs 4-bit layers forward and backward on CPU)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import FRESH_TOL, make_pairs, one_line_error, run_cli, write_jsonl

bnb = pytest.importorskip("bitsandbytes")


def load_quantized(model_dir: str, dtype=torch.float32, **flags):
    from fastdpo import modeling, quant

    args = modeling.ModelSpec(model=model_dir, **flags)
    return modeling.load_model(model_dir, dtype=dtype, quantization=quant.bnb_config(args))


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes held by the 4-bit layers' weights and scales, parameters they stand for); without double quant's
    256-entry fp32 code, 1 KiB per layer (0.19 bytes/param on the tiny model, nothing at 8B)."""
    nbytes = params = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            parts = [m.weight, qs.absmax] + ([qs.state2.absmax] if qs.nested else [])
            nbytes += sum(t.numel() * t.element_size() for t in parts)
            params += math.prod(qs.shape)
    return nbytes, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_layers_head_embeddings_lora(tiny_model, tmp_path, dtype):
    """Every decoder linear is a Linear4bit; the LM head, embeddings and norms stay in the load dtype (no fp32
    upcast); the LoRA weights are fp32 and alone get gradients, through gradient checkpointing; training moves
    the loss."""
    from fastdpo.loop import prepare_policy
    from fastdpo.recipes.train import TrainConfig

    model = load_quantized(tiny_model, dtype, load_in_4bit=True, bnb_4bit_double_quant=True)
    layers = [m for n, m in model.named_modules() if n.endswith(("_proj",))]
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    assert all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == dtype
    assert model.get_input_embeddings().weight.dtype == dtype and model.model.norm.weight.dtype == dtype

    cfg = TrainConfig(
        model=tiny_model,
        ref_cache="unused",
        output=str(tmp_path),
        load_in_4bit=True,
        lora_r=4,
        gradient_checkpointing=True,
        dtype="float32" if dtype == torch.float32 else "bfloat16",
    )
    policy = prepare_policy(model, cfg, None)
    assert policy.base_model.model.model.gradient_checkpointing
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    assert policy.base_model.model.lm_head.weight.dtype == dtype  # still: peft did not upcast it either

    policy.train()
    opt = torch.optim.AdamW(trained.values(), lr=1e-2)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = policy(input_ids=ids, labels=ids).loss
        loss.backward()
        # B starts at 0, so A's first gradient is 0: B's is not
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_4bit_bytes_per_param(tiny_model):
    """4 bits a weight plus an fp32 absmax per block of 64 (0.5625 bytes/param); double quant stores the absmax in
    8 bits with an fp32 scale per 256 blocks (0.5 + 1/64 + 4/(64*256) = 0.5159 for whole groups of 256 blocks)."""
    nbytes, params = quantized_bytes(load_quantized(tiny_model, load_in_4bit=True))
    assert nbytes / params == pytest.approx(0.5 + 4 / 64)
    nbytes, params = quantized_bytes(load_quantized(tiny_model, load_in_4bit=True, bnb_4bit_double_quant=True))
    # the tiny layers have under 256 blocks each: their one fp32 scale is a larger share than at 8B
    assert nbytes / params == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=2e-3)


def test_8bit_loads_int8_layers(tiny_model):
    model = load_quantized(tiny_model, load_in_8bit=True)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32


def test_refusals(tiny_model, small_cache, tmp_path):
    base = ["train", "--model", tiny_model, "--ref-cache", small_cache, "--output", tmp_path / "r"]
    one_line_error(*run_cli(*base, "--load-in-4bit"), "--load-in-4bit", "--lora-r", alone=True)
    one_line_error(*run_cli(*base, "--load-in-8bit"), "--load-in-8bit", "--lora-r", alone=True)
    one_line_error(*run_cli(*base, "--lora-r", "4", "--bnb-4bit-quant-type", "fp4"), "--load-in-4bit", alone=True)
    one_line_error(*run_cli(*base, "--lora-r", "4", "--load-in-4bit", "--load-in-8bit"), "choose one", alone=True)
    one_line_error(*run_cli(*base, "--lora-r", "4", "--load-in-4bit", "--merge-lora"), "--merge-lora", alone=True)
    one_line_error(
        *run_cli(*base, "--lora-r", "4", "--load-in-4bit", "--dtype", "bf16-mixed"), "bf16-mixed", alone=True
    )
    one_line_error(
        *run_cli("sft", "--model", tiny_model, "--dataset", small_cache, "--output", tmp_path / "s", "--load-in-4bit"),
        "--lora-r",
        alone=True,
    )
    live = ["train", "--model", tiny_model, "--dataset", "d.jsonl", "--output", tmp_path / "r"]
    one_line_error(*run_cli(*live, "--allow-reference-mismatch"), "--allow-reference-mismatch", alone=True)


# ----------------------------------------------------------------------------------------------
# A 4-bit reference cache


@pytest.fixture(scope="module")
def q4_cache(tiny_model, tmp_path_factory) -> str:
    """The 16 pairs of conftest's small_cache (seed 9), precomputed with the model loaded in 4-bit NF4."""
    root = tmp_path_factory.mktemp("q4")
    data = write_jsonl(root / "d.jsonl", make_pairs(16, seed=9))
    code, err = run_cli(
        "precompute",
        "--model",
        tiny_model,
        "--dataset",
        data,
        "--output",
        root / "c",
        "--load-in-4bit",
        "--no-progress",
    )
    assert code == 0, err
    return str(root / "c")


def first_step(run_dir) -> dict:
    with open(f"{run_dir}/metrics.jsonl") as f:
        return json.loads(f.readline())


@pytest.mark.integration
def test_manifest_records_quantization(q4_cache, small_cache, capsys):
    manifest = json.loads(open(f"{q4_cache}/manifest.json").read())
    assert manifest["settings"]["quantization"] == {
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": False,
        "compute_dtype": "bfloat16",
        "bitsandbytes": bnb.__version__,
    }
    assert json.loads(open(f"{small_cache}/manifest.json").read())["settings"]["quantization"] is None
    capsys.readouterr()
    code, err = run_cli("cache", "info", q4_cache)
    assert code == 0, err
    assert f"quantized  4-bit nf4 (compute bfloat16), bitsandbytes {bnb.__version__}" in capsys.readouterr().out


@pytest.mark.integration
def test_same_quantization_starts_at_ln2(tiny_model, q4_cache, tmp_path):
    """Precompute and train run the same 4-bit computation (`quant.after_load`: without it, bitsandbytes' CPU
    eval-mode kernel computes the reference in bf16 and the step-1 loss is off by ~1e-5). FRESH_TOL (1e-6 on CPU):
    the rows sit in other batches in precompute (8 pairs) and training (4), and an fp32 row's numbers do not depend
    on its batch; the 4-bit layers' bf16 compute rounds the same fp32 inputs the same way."""
    code, err = run_cli(
        "train",
        "--model",
        tiny_model,
        "--ref-cache",
        q4_cache,
        "--output",
        tmp_path / "r",
        "--load-in-4bit",
        "--lora-r",
        "4",
        "--max-steps",
        "2",
        "--no-progress",
    )
    assert code == 0, err
    m = first_step(tmp_path / "r")
    assert abs(m["loss"] - math.log(2)) < FRESH_TOL, m["loss"] - math.log(2)
    assert abs(m["rewards/margins"]) < FRESH_TOL and abs(m["kl"]) < FRESH_TOL
    assert "reference mismatch" not in err and "step-1" not in err


@pytest.mark.integration
@pytest.mark.parametrize(
    "policy, cache, theirs, ours",
    [
        (["--load-in-4bit"], "fp32", "unquantized", "4-bit nf4"),
        ([], "q4", "4-bit nf4", "unquantized"),
        (["--load-in-4bit", "--bnb-4bit-quant-type", "fp4"], "q4", "4-bit nf4", "4-bit fp4"),
    ],
)
def test_mismatch_refused(tiny_model, small_cache, q4_cache, tmp_path, policy, cache, theirs, ours):
    code, err = run_cli(
        "train",
        "--model",
        tiny_model,
        "--ref-cache",
        small_cache if cache == "fp32" else q4_cache,
        "--output",
        tmp_path / "r",
        "--lora-r",
        "4",
        "--no-progress",
        *policy,
    )
    line = one_line_error(code, err, "reference mismatch", theirs, ours, "--allow-reference-mismatch")
    assert line.index(theirs) < line.index(ours)  # the cache's first, then the policy's


@pytest.mark.integration
def test_mismatch_allowed_reports_step1_margin(tiny_model, small_cache, tmp_path):
    """An fp32 cache and a 4-bit policy: the run proceeds, and prints step 1's margin, which is the quantization
    error's offset (measured on this tiny model: see notes)."""
    code, err = run_cli(
        "train",
        "--model",
        tiny_model,
        "--ref-cache",
        small_cache,
        "--output",
        tmp_path / "r",
        "--load-in-4bit",
        "--lora-r",
        "4",
        "--max-steps",
        "1",
        "--no-progress",
        "--allow-reference-mismatch",
    )
    assert code == 0, err
    assert "warning: --allow-reference-mismatch: the cache was computed unquantized" in err
    reported = float(re.search(r"step-1 reward margin is (\S+) ", err).group(1))
    m = first_step(tmp_path / "r")
    assert reported == pytest.approx(m["rewards/margins"], rel=1e-3, abs=1e-7)
    assert abs(m["rewards/chosen"]) > 100 * FRESH_TOL  # 4-bit rounding moves every log-prob, unlike a fresh policy
    print(
        f"step-1 margin {m['rewards/margins']:.4g}, chosen reward {m['rewards/chosen']:.4g}, loss - ln2 "
        f"{m['loss'] - math.log(2):.3g}"
    )


@pytest.mark.integration
def test_cache_verify_and_eval_reproduce_the_quantization(tiny_model, q4_cache):
    code, err = run_cli("cache", "verify", q4_cache, "--model", tiny_model, "--json")
    assert code == 0, err
    from fastdpo.cache import verify

    r = verify(q4_cache, tiny_model, sample=16)
    assert r["ok"] and r["max_diff"] <= 1e-6, r  # the same computation: the stored values, to fp32 rounding
    from fastdpo.recipes.eval import evaluate

    res = evaluate(model=tiny_model, ref_cache=q4_cache, load_in_4bit=True, progress=False)
    assert abs(res["rewards/margins"]) < FRESH_TOL, res


@pytest.mark.integration
def test_fused_head_equals_eager_on_4bit(tiny_model, tmp_path):
    """The LM head is not quantized, so the fused log-prob head (the loss formed inside it) applies unchanged: 3 steps
    of QLoRA give the eager full-logits path's losses and gradient norms. With fp32 compute in the 4-bit layers they
    agree to 1e-7 (measured: 9e-8; tolerance 1e-6 relative: fp32, the vocabulary summed in another order). With the
    default bf16 compute the backward through the 4-bit layers rounds that 1e-7 difference to bf16: measured 2e-5
    (step 1 grad norm) to 2e-4 (step 3)."""
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(16, seed=9))
    quant = ["--load-in-4bit", "--bnb-4bit-compute-dtype", "float32"]
    code, err = run_cli("precompute", "--model", tiny_model, "--dataset", data, "--output", tmp_path / "c", *quant,
                        "--no-progress")  # fmt: skip
    assert code == 0, err
    runs = {}
    for backend in ("torch", "eager"):
        out = tmp_path / backend
        argv = ["train", "--model", tiny_model, "--ref-cache", tmp_path / "c", "--output", out, *quant, "--lora-r", "4"]
        argv += ["--lr", "1e-2", "--max-steps", "3", "--no-progress", "--logps-backend", backend]
        code, err = run_cli(*argv)
        assert code == 0, err
        with open(out / "metrics.jsonl") as f:
            runs[backend] = [json.loads(line) for line in f]
    for fused, eager in zip(runs["torch"], runs["eager"], strict=True):
        for key in ("loss", "grad_norm", "logps/chosen"):
            assert fused[key] == pytest.approx(eager[key], rel=1e-6, abs=1e-8), (fused["step"], key)
        # a margin is beta x a difference of log-probs near -40, whose fp32 spacing is 4e-6
        assert fused["rewards/margins"] == pytest.approx(eager["rewards/margins"], abs=1e-6), fused["step"]
    assert runs["torch"][2]["loss"] < runs["torch"][0]["loss"]  # lr 1e-2: the adapter learns, so steps 2-3 test it


@pytest.mark.integration
def test_qlora_learns_the_demo_preference(tiny_model, tmp_path):
    """QLoRA from a 4-bit cache on the demo's pairs (capitalise a word; the slip is a lowercase last letter): the
    reward accuracy and margin rise over 40 steps. Measured: accuracy 0.75 -> 0.95 and margin 0.019 -> 0.065 (means
    of the first and last 10 steps; held out: `fastdpo eval --model RUN --load-in-4bit`, below)."""
    from fastdpo import demo_task

    quant = ["--load-in-4bit"]
    code, err = run_cli("precompute", "--model", tiny_model, "--dataset", demo_task.data_file("train"), "--output",
                        tmp_path / "c", "--limit", "256", "--no-progress", *quant)  # fmt: skip
    assert code == 0, err
    code, err = run_cli("train", "--model", tiny_model, "--ref-cache", tmp_path / "c", "--output", tmp_path / "r",
                        "--lora-r", "8", "--lr", "2e-3", "--max-steps", "40", "--batch-size", "8", "--no-progress",
                        *quant)  # fmt: skip
    assert code == 0, err
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        m = [json.loads(line) for line in f]
    assert abs(m[0]["loss"] - math.log(2)) < FRESH_TOL
    first, last = m[:10], m[-10:]

    def mean(rows, k):
        return sum(r[k] for r in rows) / len(rows)

    assert mean(last, "rewards/accuracies") > max(0.8, mean(first, "rewards/accuracies"))
    assert mean(last, "rewards/margins") > 2 * mean(first, "rewards/margins") > 0


# ----------------------------------------------------------------------------------------------
# A QLoRA run's output (a LoRA adapter) evaluated held-out: its base loaded in 4-bit, the adapter over it


@pytest.fixture(scope="module")
def qlora_runs(tiny_model, q4_cache, tmp_path_factory) -> dict:
    """Two QLoRA runs from q4_cache, each step a batch of all 16 pairs: one of 1 step (its saved adapter is the
    policy after one update) and one of 2 steps (its step-2 metrics are that same policy's, on those 16 pairs)."""
    root = tmp_path_factory.mktemp("qlora")
    runs = {}
    for steps in (1, 2):
        out = root / f"r{steps}"
        code, err = run_cli("train", "--model", tiny_model, "--ref-cache", q4_cache, "--output", out, "--load-in-4bit",
                            "--lora-r", "4", "--lr", "1e-2", "--batch-size", "16", "--max-steps", steps,
                            "--no-progress")  # fmt: skip
        assert code == 0, err
        runs[steps] = out
    assert json.loads((runs[1] / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    assert not (runs[1] / "config.json").exists()  # an adapter directory, not a model
    return runs


@pytest.mark.integration
def test_eval_loads_a_qlora_run_over_its_4bit_base(qlora_runs, q4_cache, capsys):
    """`fastdpo eval --model RUN --load-in-4bit` scores the policy the run saved: the 2-step run's step-2 metrics,
    which were measured on that policy (after one update) and the same 16 pairs. Measured: equal to 1.3e-7 (margin
    0.1714). Tolerance 1e-5: fp32 sums over the same pairs in another order, through the same bf16 4-bit compute."""
    from fastdpo.recipes.eval import evaluate

    with open(qlora_runs[2] / "metrics.jsonl") as f:
        step2 = [json.loads(line) for line in f][1]
    res = evaluate(model=str(qlora_runs[1]), ref_cache=q4_cache, load_in_4bit=True, batch_size=16, progress=False)
    assert res["rewards/margins"] > 0.05  # the adapter moved the policy away from the reference (a base gives 0)
    for key in ("rewards/margins", "rewards/chosen", "rewards/accuracies", "kl", "kl/k1", "logps/chosen"):
        assert res[key] == pytest.approx(step2[key], abs=1e-5), (key, res[key], step2[key])
    assert "note: the LoRA adapter" not in capsys.readouterr().err

    # over an unquantized base: another policy, said in a note naming both loadings
    plain = evaluate(model=str(qlora_runs[1]), ref_cache=q4_cache, batch_size=16, progress=False)
    err = capsys.readouterr().err
    assert "trained over a base loaded 4-bit nf4" in err and "over one unquantized" in err, err
    assert abs(plain["rewards/margins"] - res["rewards/margins"]) > 1e-4


@pytest.mark.integration
def test_an_adapter_whose_base_is_gone_is_one_line(qlora_runs, q4_cache, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(qlora_runs[1], run)
    config = run / "adapter_config.json"
    settings = json.loads(config.read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "gone")
    config.write_text(json.dumps(settings))
    for command in (
        ["eval", "--ref-cache", q4_cache],
        [
            "compare",
            "--baseline",
            run,
            "--ref-cache",
            q4_cache,
            "--judge",
            "fastdpo.demo_task:judge_pair",
            "--output",
            tmp_path / "cmp",
        ],
    ):
        one_line_error(
            *run_cli(*command, "--model", run, "--load-in-4bit", "--no-progress"),
            str(run),
            str(tmp_path / "gone"),
            "base_model_name_or_path",
        )
    # an adapter is evaluated, not trained on as a base
    one_line_error(
        *run_cli(
            "train",
            "--model",
            qlora_runs[1],
            "--ref-cache",
            q4_cache,
            "--output",
            tmp_path / "t",
            "--lora-r",
            "4",
            "--load-in-4bit",
            "--no-progress",
        ),
        "holds a LoRA adapter",
        "--resume",
    )


@pytest.mark.integration
def test_compare_generates_from_a_qlora_run(qlora_runs, tiny_model, q4_cache, tmp_path, monkeypatch):
    """`fastdpo compare --model RUN --load-in-4bit` answers with the adapter on: the 2-step run's greedy answers
    differ from its 4-bit base's (measured: all 4 of 4), where a model compared with itself ties every pair."""
    (tmp_path / "q4_judges.py").write_text("def tie(prompt, answer_a, answer_b):\n    return 'tie'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run_cli("compare", "--model", qlora_runs[2], "--baseline", tiny_model, "--ref-cache", q4_cache,
                        "--judge", "q4_judges:tie", "--output", tmp_path / "cmp", "--max-new-tokens", "6",
                        "--limit", "4", "--batch-size", "4", "--load-in-4bit", "--no-progress")  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert r["n"] == 4 and sum(p["model"]["text"] != p["baseline"]["text"] for p in r["pairs"]) >= 2, r["pairs"]
