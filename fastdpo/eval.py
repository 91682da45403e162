"""`fastdpo eval`: score a policy on a held-out reference cache.

    fastdpo eval --model runs/dpo --ref-cache cache/heldout --beta 0.1 --output runs/dpo/eval.json
    fastdpo eval --model runs/dpo --ref-cache cache/heldout --generate --judge mypkg.judges:exact_match

From the cache's reference log-probs and the policy's, over every held-out pair:

    rewards/chosen, rewards/rejected   beta * (policy - reference) log-prob of each completion, mean
    rewards/accuracies                 fraction of pairs with chosen reward > rejected reward (TRL's)
    rewards/ties                       fraction with equal rewards (all of them when policy = reference)
    logps/accuracies                   fraction with policy log-prob of chosen > rejected
    rewards/margins                    mean chosen - rejected reward
    kl                                 per-token estimate of KL(policy || reference) on the completions,
                                       which stand in for reference samples: the importance-weighted mean
                                       of (p/q) log(p/q) (as the trainer's `kl` metric)
    kl/k1, kl/k3                       the unweighted per-token estimators (Schulman 2020: k1 = log(p/q),
                                       k3 = q/p - 1 + log(p/q)); on off-policy completions they are dominated
                                       by tokens the policy pushed down, so read them as drift indicators
    kl/sequence                        mean summed log-ratio per completion

With `--generate`, the policy answers each held-out prompt (greedy unless --temperature > 0) and a
judge `module:function(prompt, completion) -> bool | float` scores the answers.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
from dataclasses import dataclass

from . import __version__, cache, modeling
from .config import PACKED_ROW_HELP, format_config, opt, to_dict
from .errors import UserError
from .io import atomic_write_json


@dataclass
class EvalConfig:
    """`fastdpo eval`: preference and generation metrics on a held-out cache."""

    model: str | None = opt(None, "policy to evaluate: a local directory or a Hub id", required=True)
    ref_cache: str | None = opt(None, "held-out reference cache from `fastdpo precompute`", required=True)
    output: str | None = opt(None, "write the results to this JSON file (default: print only)")
    beta: float = opt(0.1, "beta for the implicit rewards (use the training run's)")
    batch_size: int = opt(8, "pairs per forward")
    limit: int | None = opt(None, "evaluate only the first N pairs")
    revision: str | None = opt(None, "model revision on the Hub")
    dtype: str = opt("auto", "model dtype (auto: as the cache was computed)",
                     choices=["auto", "float32", "bfloat16", "float16"])
    device: str = opt("auto", "device to run on")
    trust_remote_code: bool = opt(False, "allow custom model code from the Hub")
    logps_backend: str = opt("auto", "log-prob kernel backend", choices=["auto", "triton", "torch", "eager"])
    packing: bool | None = opt(None, "pack sequences into rows without padding (default: on where exact)")
    prefix_sharing: bool | None = opt(None, "score chosen and rejected after one shared prompt (default: on where "
                                            "exact)")
    max_tokens_per_batch: int | None = opt(None, PACKED_ROW_HELP)
    generate: bool = opt(False, "also generate an answer per prompt and judge it")
    judge: str | None = opt(None, "judge for --generate, as module:function(prompt, completion) -> bool|float "
                                  "(e.g. fastdpo.demo_task:judge)")
    max_new_tokens: int = opt(64, "generation length cap")
    temperature: float = opt(0.0, "sampling temperature (0: greedy)")
    generate_limit: int | None = opt(None, "generate for only the first N prompts")
    keep_samples: int = opt(20, "how many generated samples to store in the JSON")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError("--beta must be a positive number")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if self.judge and not self.generate:
            raise ValueError("--judge scores generated answers; add --generate")


def load_judge(spec: str):
    """`module:function` -> the callable. Imports the user's module, as asked for by the flag."""
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
    return fn


def preference_metrics(policy_c, policy_r, ref_c, ref_r, tok_c, tok_r, beta: float) -> dict:
    """Metrics from per-pair log-probs (numpy arrays) and per-token log-ratios (lists of arrays)."""
    import numpy as np

    rc, rr = beta * (policy_c - ref_c), beta * (policy_r - ref_r)
    log_ratio = np.concatenate([np.concatenate(tok_c), np.concatenate(tok_r)]).astype(np.float64)
    return {
        "rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
        "rewards/accuracies": float((rc > rr).mean()), "rewards/ties": float((rc == rr).mean()),
        "rewards/margins": float((rc - rr).mean()),
        "logps/chosen": float(policy_c.mean()), "logps/rejected": float(policy_r.mean()),
        "logps/accuracies": float((policy_c > policy_r).mean()),
        "kl": float((np.exp(np.clip(log_ratio, -20, 20)) * np.clip(log_ratio, -20, 20)).mean()),
        "kl/k1": float(log_ratio.mean()),
        "kl/k3": float((np.expm1(-log_ratio) + log_ratio).mean()),
        "kl/sequence": float(np.concatenate([policy_c - ref_c, policy_r - ref_r]).mean()),
    }


def generate_answers(model, tokenizer, prompts: list[list[int]], cfg: EvalConfig, device) -> list[str]:
    """Left-padded batched generation from the exact prompt tokens; returns the decoded answers."""
    import torch

    answers = []
    pad = tokenizer.pad_token_id
    for lo in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[lo:lo + cfg.batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.as_tensor(p)
            mask[i, width - len(p):] = 1
        kw = dict(do_sample=cfg.temperature > 0, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                  eos_token_id=tokenizer.eos_token_id)
        if cfg.temperature > 0:
            kw.update(temperature=cfg.temperature, top_k=0, top_p=1.0)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        answers.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu())
    return answers


def evaluate(config: EvalConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo eval`; `fastdpo.evaluate(model=..., ref_cache=...)` works like the CLI. Returns the results."""
    if config is None:
        config = EvalConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    cfg = config
    import numpy as np

    t0 = time.perf_counter()
    if cfg.progress:
        print(f"fastdpo {__version__} eval\n{format_config(cfg)}", file=sys.stderr)
    judge = load_judge(cfg.judge) if cfg.judge else None
    tokenizer = modeling.load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    manifest = cache.load_manifest(cfg.ref_cache)
    if manifest["tokenizer"]["sha256"] != modeling.tokenizer_hash(tokenizer):
        raise UserError(f"tokenizer mismatch: {cfg.model}'s tokenizer differs from the one the cache "
                        f"{cfg.ref_cache} was made with ({manifest['model']['name_or_path']})")
    source = cache.CacheSource(cfg.ref_cache, manifest)
    n = min(len(source), cfg.limit or len(source))
    rows = source.fetch(np.arange(n), with_token_logps=True)

    device = modeling.resolve_device(cfg.device)
    dtype_name = cfg.dtype if cfg.dtype != "auto" else manifest["settings"].get("resolved_dtype", "auto")
    dtype = modeling.resolve_dtype(dtype_name, device)
    from .packing import attention_for, resolve_layout

    attention = attention_for(device, None, cfg.packing, cfg.prefix_sharing)
    model = modeling.load_model(cfg.model, revision=cfg.revision, dtype=dtype, device=device,
                                trust_remote_code=cfg.trust_remote_code, attn_implementation=attention).eval()
    layout, notes = resolve_layout(model.config, attention, cfg.packing, cfg.prefix_sharing, cfg.max_tokens_per_batch)
    for note in notes:
        print(note, file=sys.stderr)

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="pair", desc="eval", dynamic_ncols=True)
    from .logps import LogpsModel, score_rows

    tok_c, tok_r = score_rows(LogpsModel(model, cfg.logps_backend), rows["prompt_ids"], rows["chosen_ids"],
                              rows["rejected_ids"], cfg.batch_size, layout, device=device,
                              pad_id=tokenizer.pad_token_id,
                              on_batch=(lambda pairs, _tokens: bar.update(pairs)) if bar is not None else None)
    if bar is not None:
        bar.close()
    ref_tok_c = [np.asarray(x, dtype=np.float32) for x in rows["ref_chosen_token_logps"]]
    ref_tok_r = [np.asarray(x, dtype=np.float32) for x in rows["ref_rejected_token_logps"]]
    policy_c = np.array([t.sum(dtype=np.float32) for t in tok_c], dtype=np.float64)
    policy_r = np.array([t.sum(dtype=np.float32) for t in tok_r], dtype=np.float64)
    results = {
        "model": cfg.model, "ref_cache": cfg.ref_cache, "num_pairs": n, "beta": cfg.beta,
        **preference_metrics(policy_c, policy_r, np.asarray(rows["ref_chosen_logps"], dtype=np.float64),
                             np.asarray(rows["ref_rejected_logps"], dtype=np.float64),
                             [a - b for a, b in zip(tok_c, ref_tok_c)], [a - b for a, b in zip(tok_r, ref_tok_r)],
                             cfg.beta),
    }
    if cfg.generate:
        m = min(n, cfg.generate_limit or n)
        prompts = rows["prompt_ids"][:m]
        answers = generate_answers(model, tokenizer, prompts, cfg, device)
        prompt_texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        samples = [{"id": rows["id"][i], "prompt": prompt_texts[i], "completion": answers[i]} for i in range(m)]
        if judge is not None:
            scores = [float(judge(p, a)) for p, a in zip(prompt_texts, answers)]
            for s, score in zip(samples, scores):
                s["score"] = score
            results["generation_accuracy"] = float(np.mean(scores)) if scores else float("nan")
            results["judge"] = cfg.judge
        results["num_generated"] = m
        results["samples"] = samples[:cfg.keep_samples]
    results["config"] = to_dict(cfg)
    results["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if cfg.output:
        atomic_write_json(cfg.output, results)
    return results


def summary(results: dict) -> str:
    """The results without the samples and config, as printed by the CLI."""
    return json.dumps({k: v for k, v in results.items() if k not in ("samples", "config")}, indent=2)
