"""`fastdpo eval`: score a policy on a held-out reference cache.

    fastdpo eval --model runs/dpo --ref-cache cache/heldout --beta 0.1 --output runs/dpo/eval.json
    fastdpo eval --model runs/dpo --ref-cache cache/heldout --generate --judge mypkg.judges:exact_match

Every held-out pair is scored through the path precompute used (`scoring.score_rows`), and the
statistics are the trainer's (`fastdpo.metrics`): rewards, accuracies and ties, margins, log-probs,
and the KL estimates (`kl`, `kl/k1`, `kl/k3`, `kl/sequence`; see that module for their definitions).

With `--generate`, the policy answers each held-out prompt (greedy unless --temperature > 0) and a
judge `module:function(prompt, completion) -> bool | float` scores the answers.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass

from .. import __version__, cache, metrics, modeling, quant
from ..config import check_fields, format_config, make, opt, to_dict
from ..errors import UserError, first_line
from ..io import atomic_write_json


@dataclass
class EvalConfig:
    """`fastdpo eval`: preference and generation metrics on a held-out cache. Every option of the command is declared
    here, with its default and help; the flags are generated from these fields. The model and layout fields are
    copies of precompute's (tests/test_config.py keeps the copies equal)."""

    GROUP_TITLES = {"model": "policy model"}

    # -- layout --
    packing: bool | None = opt(None, "pack sequences into rows without padding (default: on where exact)",
                               group="layout")
    prefix_sharing: bool | None = opt(None, "score chosen and rejected after one shared prompt (default: on where "
                                            "exact)", group="layout")
    max_tokens_per_batch: int | None = opt(None, "cap on a packed row's tokens (default: a whole micro-batch per row "
                                                 "with FlexAttention, the longest sequence's length with "
                                                 "SDPA/eager's dense masks)", ge=2, group="layout")

    # -- model --
    model: str | None = opt(None, "model: a local directory or a Hugging Face Hub id", required=True, group="model")
    revision: str | None = opt(None, "model revision (branch, tag or commit) on the Hub", group="model")
    dtype: str = opt("auto", "float32; bfloat16 weights; float16 (scoring only); bf16-mixed (fp32 weights, bf16 "
                     "autocast; training only); auto: on GPU bf16-mixed to train, bfloat16 to score; float32 on CPU",
                     choices=["auto", "float32", "bfloat16", "float16", "bf16-mixed"], group="model")
    trust_remote_code: bool = opt(False, "allow custom model code from the Hub (off: never runs remote code)",
                                  group="model")
    attn_implementation: str | None = opt(None, "transformers attention implementation (e.g. sdpa, eager, "
                                                "flex_attention; default: flex_attention on CUDA where packing "
                                                "or prefix sharing may be used, else transformers' choice)",
                                          group="model")
    logps_backend: str = opt("auto", "log-prob backend: auto (triton on CUDA, torch elsewhere), triton, torch, or "
                             "eager (full logits, the classic way)", choices=modeling.LOGPS_BACKENDS, group="model")

    # -- quantization --
    load_in_4bit: bool = opt(False, "quantize the base model's linear layers to 4 bits at load (bitsandbytes; QLoRA "
                                    "with --lora-r); embeddings, norms and LM head stay in --dtype",
                             group="quantization")
    load_in_8bit: bool = opt(False, "quantize the base model's linear layers to 8 bits at load (bitsandbytes "
                                    "LLM.int8; with --lora-r to train)", group="quantization")
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type: nf4 (normal float, the QLoRA paper's) or fp4",
                                   choices=["nf4", "fp4"], group="quantization")
    bnb_4bit_double_quant: bool = opt(False, "quantize the 4-bit blocks' scales too (about 0.4 bits/param less)",
                                      group="quantization")
    bnb_4bit_compute_dtype: str = opt("bfloat16", "dtype 4-bit layers dequantize to and multiply in",
                                      choices=quant.COMPUTE_DTYPES, group="quantization")
    device: str = opt("auto", "device to run on (auto: the accelerate process's device)", group="model")

    # -- options --
    batch_size: int = opt(8, "pairs per forward (chosen and rejected of each pair run together)", ge=1)
    progress: bool = opt(True, "show a progress bar")
    ref_cache: str | None = opt(None, "held-out reference cache from `fastdpo precompute`", required=True)
    output: str | None = opt(None, "write the results to this JSON file (default: print only)")
    beta: float = opt(0.1, "beta for the implicit rewards (use the training run's)", gt=0)
    limit: int | None = opt(None, "evaluate only the first N pairs", ge=1)

    # -- generation --
    generate: bool = opt(False, "also generate an answer per prompt and judge it", group="generation")
    judge: str | None = opt(None, "judge for --generate, as module:function(prompt, completion) -> bool|float "
                                  "(e.g. fastdpo.demo_task:judge)", group="generation")
    max_new_tokens: int = opt(64, "generation length cap", ge=1, group="generation")
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", ge=0, group="generation")
    generate_limit: int | None = opt(None, "generate for only the first N prompts", ge=1, group="generation")
    keep_samples: int = opt(20, "how many generated samples to store in the JSON", ge=0, group="generation")

    def __post_init__(self):
        check_fields(self)
        quant.check_quant_options(self)
        modeling.check_scoring_options(self)
        if self.judge and not self.generate:
            raise UserError("--judge scores generated answers; add --generate")
        if self.output and os.path.exists(self.output) and not _is_eval_result(self.output):
            raise UserError(f"--output {self.output} exists and is not a fastdpo eval result; choose another file "
                            "(a previous result is replaced)")


def _is_eval_result(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"ref_cache", "num_pairs", "config"} <= set(data)


def load_judge(spec: str, params: tuple[str, ...] = ("prompt", "completion")):
    """`module:function` -> the callable, which must take `params` (eval's pointwise judge by default; `fastdpo
    compare` asks for a pairwise one). Imports the user's module, as asked for by the flag."""
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise UserError(f"--judge {spec!r} must look like module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--judge {spec}: cannot import {module_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"--judge {spec}: {module_name} has no function {fn_name}")
    try:
        inspect.signature(fn).bind(*params)
    except TypeError:
        raise UserError(f"--judge {spec}: the judge must take ({', '.join(params)})") from None
    except ValueError:
        pass  # builtins without a signature: called as asked
    return fn


def judge_score(judge, spec: str, index: int, prompt: str, completion: str) -> float:
    """The judge's score of one answer as a float; a judge that raises, or returns anything but a bool or a finite
    number, is a UserError naming the judge, the prompt and what it returned."""
    import numbers

    try:
        score = judge(prompt, completion)
    except Exception as e:  # the user's code
        raise UserError(f"--judge {spec} raised {type(e).__name__} on prompt {index}: {first_line(e)}") from None
    if isinstance(score, numbers.Real) and math.isfinite(float(score)):  # bool, int, float, numpy scalars
        return float(score)
    shown = repr(score) if len(repr(score)) <= 60 else repr(score)[:60] + "..."
    raise UserError(f"--judge {spec} returned {shown} ({type(score).__name__}) on prompt {index}; a judge returns a "
                    "bool or a finite number")


def preference_results(tok_c, tok_r, rows, beta: float) -> dict:
    """The trainer's statistics over all held-out pairs, from the policy's per-token log-probs (lists of
    float32 arrays, as `score_rows` returns them) and the cache's rows."""
    import numpy as np
    import torch

    from ..scoring import padded

    def summed(arrays):  # as precompute sums the cache's values: a fresh policy ties exactly
        return torch.tensor([t.sum(dtype=np.float32) for t in arrays], dtype=torch.float64)

    pc, pr = summed(tok_c), summed(tok_r)
    rc, rr = (torch.tensor(rows[k], dtype=torch.float64) for k in ("ref_chosen_logps", "ref_rejected_logps"))
    sides = []
    for policy, ref in ((tok_c, rows["ref_chosen_token_logps"]), (tok_r, rows["ref_rejected_token_logps"])):
        (p, mask), (q, _) = padded(policy, "cpu"), padded(ref, "cpu")
        sides.append((p, q, mask))
    sums = metrics.preference_sums(None, pc, pr, rc, rr, beta * (pc - rc), beta * (pr - rr), sides)
    return metrics.preference_means({k: float(v) for k, v in sums.items()}, len(pc))


def generate_answers(model, tokenizer, prompts: list[list[int]], cfg: EvalConfig, device) -> list[str]:
    """Left-padded batched generation from the exact prompt tokens; returns the decoded answers."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generate_tokens(model, tokenizer, prompts,
                                                                                       cfg, device)]


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation_config EOS ids (a chat model
    lists its end-of-turn token there, e.g. Llama 3's <|eot_id|>; a conversation is trained to end with it)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys([tokenizer.eos_token_id] + ids))


def generate_tokens(model, tokenizer, prompts: list[list[int]], cfg, device) -> list[list[int]]:
    """Left-padded batched generation from the exact prompt tokens (`cfg`: batch_size, max_new_tokens,
    temperature); returns each answer's new token ids, cut at its first stop id (`stop_ids`; that id and padding
    excluded)."""
    import torch

    answers = []
    pad, stop = tokenizer.pad_token_id, stop_ids(model, tokenizer)
    for lo in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[lo:lo + cfg.batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.as_tensor(p)
            mask[i, width - len(p):] = 1
        kw = dict(do_sample=cfg.temperature > 0, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                  eos_token_id=stop)
        if cfg.temperature > 0:
            kw.update(temperature=cfg.temperature, top_k=0, top_p=1.0)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        for row in out[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in stop), None)  # generate pads a finished answer
            row = row if end is None else row[:end]
            answers.append(row)
    return answers


def judged_samples(model, tokenizer, rows, cfg: EvalConfig, device, judge) -> dict:
    """Generated answers for the first prompts, judged if a judge is given."""
    import numpy as np

    m = min(len(rows["prompt_ids"]), cfg.generate_limit or len(rows["prompt_ids"]))
    prompts = rows["prompt_ids"][:m]
    answers = generate_answers(model, tokenizer, prompts, cfg, device)
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    samples = [{"id": rows["id"][i], "prompt": prompt_texts[i], "completion": answers[i]} for i in range(m)]
    out = {}
    if judge is not None:
        scores = [judge_score(judge, cfg.judge, i, p, a) for i, (p, a) in enumerate(zip(prompt_texts, answers))]
        for s, score in zip(samples, scores):
            s["score"] = score
        out = {"generation_accuracy": float(np.mean(scores)) if scores else float("nan"), "judge": cfg.judge}
    return {**out, "num_generated": m, "samples": samples[:cfg.keep_samples]}


def evaluate(config: EvalConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo eval`; `fastdpo.evaluate(model=..., ref_cache=...)` works like the CLI. Returns the results."""
    import numpy as np

    from ..scoring import prepare, score_rows

    cfg = make(EvalConfig, config, **kwargs)
    t0 = time.perf_counter()
    modeling.set_library_progress(cfg.progress)
    if cfg.progress:
        print(f"fastdpo {__version__} eval\n{format_config(cfg)}", file=sys.stderr)
    judge = load_judge(cfg.judge) if cfg.judge else None
    device = modeling.resolve_device(cfg.device)
    cached = cache.load_manifest(cfg.ref_cache).settings.get("resolved_dtype", "auto")
    setup = prepare(cfg, device, modeling.resolve_dtype(cfg.dtype if cfg.dtype != "auto" else cached, device))
    source = cache.open_cache(cfg.ref_cache, setup)
    n = min(len(source), cfg.limit or len(source))
    rows = source.fetch(np.arange(n), with_token_logps=True)
    model = setup.load(device=device).eval()
    scorer = setup.scorer(model)
    setup.print_notes()

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="pair", desc="eval", dynamic_ncols=True)
    tok_c, tok_r = score_rows(scorer, rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], cfg.batch_size,
                              setup.layout, setup.tokenizer.pad_token_id, device,
                              on_batch=(lambda pairs, _tokens: bar.update(pairs)) if bar is not None else None)
    if bar is not None:
        bar.close()
    results = {"model": cfg.model, "ref_cache": cfg.ref_cache, "num_pairs": n, "beta": cfg.beta,
               **preference_results(tok_c, tok_r, rows, cfg.beta)}
    if cfg.generate:
        if setup.attention == "flex_attention" and hasattr(model, "set_attn_implementation"):
            # FlexAttention serves packed scoring; decoding one token at a time wants the usual kernel
            model.set_attn_implementation("sdpa")
        results.update(judged_samples(model, setup.tokenizer, rows, cfg, device, judge))
    results["config"] = to_dict(cfg)
    results["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if cfg.output:
        atomic_write_json(cfg.output, results)
    return results


def summary(results: dict) -> str:
    """The results without the samples and config, as printed by the CLI."""
    return json.dumps({k: v for k, v in results.items() if k not in ("samples", "config")}, indent=2)
