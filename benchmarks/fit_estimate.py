"""Fit estimate: the largest real model that fits one GPU, from bytes per parameter and activation bytes measured on
a small model through a real fastdpo step, labelled as an estimate (only a GPU fit run, bench_fit.py, measures it).

It measures, on the `--preset` model (or `--model`), in this process: the bytes weights, gradients and every
optimizer-state tensor hold after one step, per `--fit-optimizers` entry (`measure_state_bytes`), and the bytes
autograd saves for backward during fastdpo's forward and loss, per token x layer x hidden unit, without and with
gradient checkpointing (`measure_saved_bytes`). Then it sums them for the FIT_ESTIMATE_MODELS architectures at a
micro-batch of `--fit-estimate-pairs` pairs x 2 x `--fit-estimate-seq-len` tokens (`estimate_bytes`), and writes
PREFIX.csv (one row per model x optimizer x checkpointing) and PREFIX.md. Only public fastdpo functions are used.

CPU run (what README.md's estimate table quotes):
    python benchmarks/fit_estimate.py --preset tiny --batch-size 4 --prompt-len 64 --completion-len 128 \
        --fit-optimizers adamw,adamw-8bit,adamw-kahan,sgd --out benchmarks/results/cpu_tiny_fit_estimate
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from common import Table, exit_on_sigterm, fmt, header, one_line
from presets import PRESETS, build_preset, synthetic_words

from fastdpo import optim
from fastdpo.modeling import machine_name

# The real architectures of the "largest model that fits" estimate (smallest first)
FIT_ESTIMATE_MODELS = ("qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-3b", "llama-3.2-3b", "qwen2.5-7b",
                       "llama-3.1-8b", "qwen2.5-14b")  # fmt: skip
SEED = 42

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

    cfg = make(
        TrainConfig,
        model=model,
        output="unused",
        dataset="unused.jsonl",
        packing=False,
        prefix_sharing=False,
        progress=False,
        **train_kwargs,
    )
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

    rows = {
        "prompt_ids": ids(prompt_len),
        "chosen_ids": ids(completion_len),
        "rejected_ids": ids(completion_len),
        "ref_chosen_logps": [-1.0 * completion_len] * pairs,
        "ref_rejected_logps": [-1.0 * completion_len] * pairs,
        "ref_chosen_token_logps": [[-1.0] * completion_len] * pairs,
        "ref_rejected_token_logps": [[-1.0] * completion_len] * pairs,
    }
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
    cfg, policy, scorer, objective = _measurement_policy(
        model, device, dtype=precision, optimizer=optimizer, **train_kwargs
    )
    opt = optim.build_optimizer(scorer.parameters(), cfg)
    loss, _ = objective.step(scorer, _measurement_batch(policy.config.vocab_size, 1, 8, 8))
    loss.backward()
    opt.step()

    params = [p for p in scorer.parameters() if p.requires_grad]
    out = optim.held_bytes(scorer.parameters(), opt)  # frozen weights count, and have no gradient
    n = sum(p.numel() for p in params)
    return {
        "optimizer": optimizer,
        "precision": precision,
        "params": n,
        "bytes_per_param": sum(out.values()) / n,
        **{f"{k}_per_param": v / n for k, v in out.items()},
    }


def measure_saved_bytes(
    model: str,
    precision: str,
    gradient_checkpointing: bool,
    pairs: int,
    prompt_len: int,
    completion_len: int,
    device="cpu",
    logps_backend: str = "auto",
) -> dict:
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
        model, device, dtype=precision, gradient_checkpointing=gradient_checkpointing, logps_backend=logps_backend
    )
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
        hooks += [
            layer.register_forward_pre_hook(hold_inputs, with_kwargs=True),
            layer.register_forward_pre_hook(enter("layer")),
            layer.register_forward_hook(enter("outside")),
            layer.mlp.register_forward_pre_hook(enter("mlp")),
            layer.mlp.register_forward_hook(enter("layer")),
        ]
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
    linear = sum(
        p.numel()
        for layer in backbone.layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
        for p in m.parameters()
    )
    return {
        "precision": precision,
        "gradient_checkpointing": gradient_checkpointing,
        "tokens": tokens,
        "scored_tokens": scored,
        "layers": layers,
        "hidden": hidden,
        "intermediate": inter,
        "vocab": c.vocab_size,
        "fused_head": objective.fused,
        **{f"{k}_bytes": v for k, v in parts.items()},
        # per token and layer: bytes per hidden unit (attention, norms, residual) and per MLP unit; with
        # checkpointing, the layers' inputs per hidden unit
        "a_hidden": parts["layer"] / (tokens * layers * hidden),
        "a_intermediate": parts["mlp"] / (tokens * layers * inter),
        "a_held": parts["held"] / (tokens * layers * hidden),
        "a_outside": parts["outside"] / (tokens * hidden),  # per token and hidden unit, once per model
        # all the backbone holds, per token, layer and hidden unit
        "per_token_layer_hidden": sum(parts[k] for k in ("outside", "layer", "mlp", "held"))
        / (tokens * layers * hidden),
        "copies_per_param": parts["copies"] / linear,
    }


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
    linear = sum(
        p.numel()
        for layer in layers
        for mod in layer.modules()
        if isinstance(mod, torch.nn.Linear)
        for p in mod.parameters()
    )
    c = m.config
    return {
        "params": sum(p.numel() for p in m.parameters()),
        "linear_params": linear,
        "layers": len(layers),
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
    }


PRECISION_BYTES = {"bf16-mixed": (4, 2), "bfloat16": (2, 2), "float32": (4, 4)}  # (weights, compute) bytes


def estimate_bytes(
    arch: dict, coef: dict, bytes_per_param: float, tokens: int, gradient_checkpointing: bool, overhead_bytes: float
) -> dict:
    """A training step's peak bytes for `arch` (see the formula above this section), part by part.

    coef: a_hidden, a_intermediate (bytes per token, layer and hidden / MLP unit, no checkpointing), a_held (the
    layers' inputs with checkpointing, per token, layer and hidden unit), a_outside (per token and hidden unit,
    outside the layers), copies_per_param, precision. Every token is counted as scored."""
    from fastdpo.kernels import loss_chunk_tokens

    t, n_layers, h, i, v = tokens, arch["layers"], arch["hidden"], arch["intermediate"], arch["vocab"]
    weight_bytes, compute_bytes = PRECISION_BYTES[coef["precision"]]
    one_layer = t * (coef["a_hidden"] * h + coef["a_intermediate"] * i)
    activations = coef["a_outside"] * t * h + (
        coef["a_held"] * t * n_layers * h + one_layer if gradient_checkpointing else one_layer * n_layers
    )
    tile = min(t, loss_chunk_tokens(v, weight_bytes)) * v * compute_bytes  # the chunk sizing train.py uses
    parts = {
        "state": bytes_per_param * arch["params"],
        "weight_copies": coef["copies_per_param"] * (arch["linear_params"] + v * h),
        "activations": activations,
        "head": 4 * v * h + 4 * t * h + tile,
        "overhead": overhead_bytes,
    }
    return {**parts, "total": sum(parts.values())}


def measure(model: str, optimizers: list[str], pairs: int, prompt_len: int, completion_len: int, device) -> dict:
    """The estimate's measurements on `model`: bytes per parameter of each optimizer (an error is reported and the
    optimizer's declared bytes used), and the activation bytes of the precisions they train in, without and with
    gradient checkpointing."""
    out = {"status": "ok", "optimizers": {}, "activations": {}}
    for name in optimizers:
        try:
            out["optimizers"][name] = measure_state_bytes(model, name, device)
        except Exception as e:  # e.g. an optimizer that needs CUDA: reported, the others still measured
            traceback.print_exc()
            out["optimizers"][name] = {"error": one_line(e)}
    for precision in sorted({estimate_precision(name) for name in optimizers}):
        out["activations"][precision] = {
            ckpt: measure_saved_bytes(model, precision, ckpt == "on", pairs, prompt_len, completion_len, device)
            for ckpt in ("off", "on")
        }
    return out


# fmt: off
def fit_estimate(a, measured: dict) -> list[dict]:
    """Every FIT_ESTIMATE_MODELS shape for each --fit-optimizers entry, without and with gradient checkpointing,
    from the measurements: the CSV rows."""
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
                           precision=precision, bytes_per_param=fmt(bpp, ".3f"),
                           bytes_per_param_source="measured" if "error" not in state else
                           f"declared by fastdpo.optim ({state['error']})",
                           gradient_checkpointing=ckpt, tokens=tokens,
                           **{f"{k}_gib": fmt(v / 2**30, ".2f") for k, v in est.items()})
                for budget in a.fit_estimate_budgets_gb:
                    row[f"fits_{budget:g}gib"] = est["total"] <= budget * 2**30
                rows.append(row)
    return rows


def estimate_markdown(measured: dict, rows: list[dict], a) -> list[str]:
    """The estimate's section: its label, the measured numbers, the largest model per budget, every total."""
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
        "that peak at different moments are summed, so the estimate leans high. The fit test (`bench_fit.py` on a "
        "GPU: the allocator capped at the budget) is the measurement; run at these sizes (e.g. `bench_fit.py "
        "--preset qwen2.5-7b --prompt-len 512 --completion-len 512 --fit-start-batch 8 --fit-max-batch 8`), it "
        "replaces a cell of this table.",
        ""]
    return lines
# fmt: on


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="the model measured (random weights)")
    p.add_argument("--model", default=None, help="a local model directory instead of a preset")
    p.add_argument("--batch-size", type=int, default=4, help="pairs of the measured micro-batch")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of the measured micro-batch")
    p.add_argument("--completion-len", type=int, default=128, help="completion tokens of the measured micro-batch")
    p.add_argument("--device", default="cpu", help="where to measure (cpu or cuda)")
    p.add_argument(
        "--fit-optimizers",
        type=lambda x: [o.strip() for o in x.split(",") if o.strip()],
        default=list(optim.OPTIMIZERS),
        help=f"comma-separated, of {','.join(optim.OPTIMIZERS)}",
    )
    p.add_argument(
        "--fit-estimate-budgets-gb",
        type=lambda x: [float(b) for b in x.split(",")],
        default=[24.0, 80.0],
        help="comma-separated GPU memory budgets, GiB",
    )
    p.add_argument("--fit-estimate-pairs", type=int, default=8, help="the estimate's micro-batch, pairs")
    p.add_argument("--fit-estimate-seq-len", type=int, default=1024, help="the estimate's tokens per sequence")
    p.add_argument("--fit-overhead-gb", type=float, default=1.0, help="fixed overhead (CUDA context, allocator), GiB")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv and PREFIX.md")
    args = p.parse_args(argv)
    unknown = [o for o in args.fit_optimizers if o not in optim.OPTIMIZERS]
    if unknown or not args.fit_optimizers:
        p.error(f"--fit-optimizers: {unknown[0] if unknown else 'none given'!r} is not a fastdpo optimizer; choose "
                f"from {','.join(optim.OPTIMIZERS)}")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="fit_estimate-") as tmp:
        model = a.model or build_preset(a.preset, Path(tmp) / "model", synthetic_words(400), torch.float32, a.device)
        measured = measure(model, a.fit_optimizers, a.batch_size, a.prompt_len, a.completion_len, a.device)
    rows = fit_estimate(a, measured)
    head = header("fastdpo fit estimate", a.device, [shlex.quote(x) for x in argv], "fit_estimate.py")
    table = Table(a.out, list(rows[0]), head, write_md=False)
    for row in rows:
        table.add(row)
    md = "\n".join([*head, *estimate_markdown(measured, rows, a)])
    Path(a.out).with_suffix(".md").write_text(md)
    print(md, flush=True)
    return rows


if __name__ == "__main__":
    main()
