"""`fastdpo cache info` and `fastdpo cache verify`."""

import json
import types
from dataclasses import dataclass

from ..config import check_fields, opt
from ..quant import describe as describe_quantization

DESCRIPTION = """Inspect a reference cache written by `fastdpo precompute` (or by fastdpo.cache.write), or check
it: every shard against the manifest's sha256 and, with --model, a sample of rows recomputed through
the reference model with the dtype and layout the cache records."""

EXAMPLES = """examples:
  fastdpo cache info cache/uf-qwen05
  fastdpo cache verify cache/uf-qwen05 --model Qwen/Qwen2.5-0.5B-Instruct --sample 64
"""


@dataclass
class InfoConfig:
    cache: str = opt(None, "the cache directory", positional=True, metavar="CACHE_DIR", required=True)
    json: bool = opt(False, "print the report as JSON (for scripts)")

    def __post_init__(self):
        check_fields(self)


@dataclass
class VerifyConfig:
    cache: str = opt(None, "the cache directory", positional=True, metavar="CACHE_DIR", required=True)
    model: str | None = opt(None, "the reference model: recompute a sample of rows and compare (default: only "
                                  "the files are checked)")
    sample: int = opt(64, "rows to recompute with --model, drawn at random", ge=1)
    seed: int = opt(0, "seed for the sample", ge=0)
    device: str = opt("auto", "device to recompute on")
    batch_size: int = opt(8, "pairs per forward", ge=1)
    json: bool = opt(False, "print the report as JSON (for scripts)")

    def __post_init__(self):
        check_fields(self)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def format_info(info: dict) -> str:
    """One screen: what the cache holds, how it was made, and anything wrong with it (one line per problem)."""
    if "rows" not in info:  # the manifest itself is damaged: what is wrong with it, field by field
        return "\n".join(f"{info['cache']}: damaged: {p}" for p in info["problems"])
    model, tok, data, st = info["model"], info["tokenizer"], info["dataset"], info["settings"]
    ref = f"external ({model['name_or_path']})" if model.get("external") else model["name_or_path"]
    weights = (model.get("weights_sha256") or "not hashed")[:12]
    skipped = data.get("rows_skipped") or {}
    lines = [f"{info['cache']}: {info['rows']:,} pairs in {info['shards']} shard(s), {_size(info['bytes'])} "
             f"(format {info['format_version']}, fastdpo {info['fastdpo_version']})",
             f"reference  {ref}  weights {weights}",
             f"tokenizer  {tok.get('name_or_path')}  sha256 {tok['sha256'][:12]}",
             f"data       {data.get('name')} ({data.get('split', '-')})  read {data.get('rows_read', '?'):,}, "
             f"skipped {sum(skipped.values()):,}" + (": " + ", ".join(f"{k}={v}" for k, v in skipped.items())
                                                    if skipped else "")]
    layout = st.get("resolved_layout") or {}
    shape = "+".join(n for n in ("packing", "prefix_sharing") if layout.get(n)) or "padded"
    lines.append(f"settings   dtype {st.get('resolved_dtype', '-')} on {st.get('resolved_device', '-')}, layout "
                 f"{shape} ({layout.get('attention', '-')}), max_prompt_length {st.get('max_prompt_length', '-')}, "
                 f"max_length {st.get('max_length', '-')}")
    if st.get("quantization"):
        lines.append(f"quantized  {describe_quantization(st['quantization'])}, bitsandbytes "
                     f"{st['quantization'].get('bitsandbytes', '?')}")
    lines.append(f"{'tokens':<10} {'min':>6} {'median':>8} {'p95':>8} {'max':>6} {'at cap':>7}")
    for k, q in info["lengths"].items():
        cap = f"{100 * q['at_cap']:.1f}%" if "at_cap" in q else "-"
        lines.append(f"  {k:<8} {q['min']:>6} {q['median']:>8.0f} {q['p95']:>8.0f} {q['max']:>6} {cap:>7}")
    t = info.get("timings") or {}
    if t:
        lines.append("timings    " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items()))
    found = info["problems"] or ["none found (sizes checked; fastdpo cache verify checks contents)"]
    lines += [f"problem    {p}" for p in found] if info["problems"] else [f"problems   {found[0]}"]
    return "\n".join(lines)


def run_info(config: InfoConfig) -> int:
    from ..cache import describe

    info = describe(config.cache)
    print(json.dumps(info, indent=2) if config.json else format_info(info))
    return 1 if info["problems"] else 0


def run_verify(config: VerifyConfig) -> int:
    import sys

    from ..cache import verify

    r = verify(config.cache, config.model, sample=config.sample, seed=config.seed, device=config.device,
               batch_size=config.batch_size)
    if config.json:
        print(json.dumps(r, indent=2))
    elif "problem" in r:
        print(f"fastdpo cache verify: FAILED: {r['problem']}", file=sys.stderr)
    elif "max_diff" in r:
        verdict = "OK" if r["ok"] else "FAILED"
        line = (f"{config.cache}: {r['rows']} rows, {r['shards']} shard(s) sha256 ok; {r['rows_checked']} rows "
                f"recomputed with {config.model} ({r['dtype']}): max per-token difference {r['max_diff']:.3g} "
                f"(row {r['worst_row']}), mean {r['mean_diff']:.3g}, tolerance {r['tolerance']:.3g}: {verdict}")
        print(line, file=sys.stderr if not r["ok"] else sys.stdout)
    else:
        print(f"{config.cache}: {r['rows']} rows, {r['shards']} shard(s), manifest and sha256 ok (add --model REF to "
              "recompute a sample)")
    return 0 if r["ok"] else 1


COMMANDS = {
    "info": types.SimpleNamespace(
        HELP="rows, shards, size, token lengths, skips, fingerprints, settings, timings", CONFIG=InfoConfig,
        run=run_info, CONFIG_FILE=False, EXAMPLES="examples:\n  fastdpo cache info cache/uf-qwen05\n"
        "  fastdpo cache info cache/uf-qwen05 --json\n",
        DESCRIPTION="One screen on a cache: rows, shards and size; token lengths of prompts, chosen and rejected "
                    "(min/median/p95/max, share at the length caps); rows skipped by reason; model, tokenizer and "
                    "data fingerprints; settings; timings. A damaged cache is reported (exit 1), not crashed on."),
    "verify": types.SimpleNamespace(
        HELP="check every shard's sha256; with --model, recompute a sample of rows and compare", CONFIG=VerifyConfig,
        run=run_verify, CONFIG_FILE=False,
        EXAMPLES="examples:\n  fastdpo cache verify cache/uf-qwen05\n"
                 "  fastdpo cache verify cache/uf-qwen05 --model Qwen/Qwen2.5-0.5B-Instruct --sample 64 --seed 1\n",
        DESCRIPTION="Check a cache: the manifest and every shard's sha256; with --model, recompute --sample random "
                    "rows through the scorer, dtype and layout the cache records and compare per token (tolerance: "
                    "1e-4 in fp32; in 16 bits twice the computation's own rounding against fp32, at least 1e-4). "
                    "Exit 0 when the cache holds, 1 with one line naming the worst row when it does not."),
}
