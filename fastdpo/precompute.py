"""Stage 1: run the frozen reference model once and write its log-probs to Arrow shards.

    fastdpo precompute --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --output cache/uf-qwen05
    fastdpo precompute --model /tmp/tiny --dataset pairs.jsonl --output /tmp/cache --batch-size 4  # tiny CPU run

Flow: tokenize every row (cached by `datasets`) -> split the kept rows into shards of `--shard-rows`
-> per shard: length-bucketed batches through the model -> one Arrow stream file, written to a
temporary name, fsynced and renamed -> `manifest.json` last. Re-running the same command resumes:
finished shards are checked and kept; a different command into a non-empty directory is refused.
Under `accelerate launch`, process r computes shards r, r+N, r+2N, ...; the main process writes the manifest.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, cache, data, modeling
from .config import PACKED_ROW_HELP, format_config, opt, to_dict
from .errors import UserError
from .io import atomic_write_json, ensure_dir, sha256_file, sha256_json


@dataclass
class PrecomputeConfig(data.DataArgs):
    """`fastdpo precompute`: reference log-probs for a preference dataset."""

    model: str | None = opt(None, "reference model: a local directory or a Hugging Face Hub id", required=True)
    output: str | None = opt(None, "directory to write shards and manifest.json into", required=True)
    revision: str | None = opt(None, "model revision (branch, tag or commit) on the Hub")
    dtype: str = opt("auto", "model dtype (auto: bfloat16 on GPU, float32 on CPU)",
                     choices=["auto", "float32", "bfloat16", "float16"])
    device: str = opt("auto", "device to run on (auto: the accelerate process's device)")
    trust_remote_code: bool = opt(False, "allow custom model code from the Hub (off: never runs remote code)")
    attn_implementation: str | None = opt(None, "transformers attention implementation (e.g. sdpa, eager)")
    batch_size: int = opt(8, "pairs per forward (chosen and rejected of each pair run together)")
    shard_rows: int = opt(4096, "rows per shard file")
    logps_backend: str = opt("auto", "log-prob backend: auto (triton on CUDA, torch elsewhere), triton, torch, "
                             "or eager (full logits, the classic way)",
                             choices=["auto", "triton", "torch", "eager"])
    packing: bool | None = opt(None, "pack sequences into rows without padding (default: on where exact)")
    prefix_sharing: bool | None = opt(None, "score chosen and rejected after one shared prompt (default: on where "
                                            "exact)")
    max_tokens_per_batch: int | None = opt(None, PACKED_ROW_HELP)
    overwrite: bool = opt(False, "replace an existing cache made with other settings")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.shard_rows < 1:
            raise ValueError("--shard-rows must be at least 1")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 2:
            raise ValueError("--max-tokens-per-batch must be at least 2")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")

    def settings(self) -> dict:
        """Everything that changes the cache's contents (a resume must match it)."""
        skip = {"output", "overwrite", "progress", "strict"}
        return {k: v for k, v in to_dict(self).items() if k not in skip}


def dataset_fingerprint(ds, args: data.DataArgs) -> str:
    """Content hash of local data files; `datasets`' own fingerprint for Hub data."""
    if os.path.isfile(args.dataset):
        return "sha256:" + sha256_file(args.dataset)
    if os.path.isdir(args.dataset):
        files = sorted(str(p) for p in Path(args.dataset).rglob("*") if p.is_file())
        return "sha256:" + sha256_json([(os.path.relpath(f, args.dataset), sha256_file(f)) for f in files])
    return "datasets:" + getattr(ds, "_fingerprint", "unknown")


# ----------------------------------------------------------------------------------------------
# Output directory: fresh, resumable, or refused


def _our_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name in (cache.MANIFEST, cache.STATE)
            or p.name.startswith(("shard-", ".shard-", ".manifest.json.", f"{cache.STATE}."))]


def prepare_output(out: Path, fingerprint: str, settings: dict, overwrite: bool, is_main: bool) -> None:
    ensure_dir(out) if is_main else None
    state_path = out / cache.STATE
    entries = list(out.iterdir()) if out.is_dir() else []
    if entries:
        previous = None
        if state_path.is_file():
            import json

            try:
                previous = json.loads(state_path.read_text())
            except (OSError, ValueError):
                previous = None
        if previous is not None and previous.get("fingerprint") == fingerprint:
            return  # resume
        if not overwrite:
            if previous is None:
                raise UserError(f"--output {out} is not empty and holds no fastdpo precompute; choose an empty "
                                "directory or pass --overwrite")
            diff = sorted(k for k in set(settings) | set(previous.get("settings", {}))
                          if settings.get(k) != previous.get("settings", {}).get(k))
            what = ", ".join(diff) if diff else "model, tokenizer or data contents"
            raise UserError(f"--output {out} holds a cache made with other settings (differs in: {what}); "
                            "pass --overwrite to replace it or choose another --output")
        if is_main:
            for p in _our_files(out):
                p.unlink()
    if is_main:
        atomic_write_json(state_path, {"fingerprint": fingerprint, "settings": settings})


def _marker(out: Path, index: int) -> Path:
    """Written (atomically) after a shard is renamed into place: its manifest entry and the run's fingerprint."""
    return out / f".{cache.shard_name(index)}.done.json"


def finished_shard(out: Path, index: int, fingerprint: str) -> dict | None:
    """The manifest entry of shard `index` if a run with these settings finished it and it is intact, else None."""
    import json

    try:
        marker = json.loads(_marker(out, index).read_text())
    except (OSError, ValueError):
        return None
    path = out / cache.shard_name(index)
    entry = marker.get("entry", {})
    if marker.get("fingerprint") != fingerprint or not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return None
    return entry if sha256_file(path) == entry.get("sha256") else None


# ----------------------------------------------------------------------------------------------
# The reference forward


def compute_shard(model, rows, cfg: PrecomputeConfig, layout, device, pad_id: int, on_batch=None) -> dict:
    """Reference log-probs for one shard's rows (a `datasets.Dataset` slice), in source order.

    `model` is a `LogpsModel`: the same scoring function the trainer uses.
    """
    import numpy as np

    from .logps import score_rows

    prompts, chosens, rejecteds = rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]
    tok_c, tok_r = score_rows(model, prompts, chosens, rejecteds, cfg.batch_size, layout, pad_id, device, on_batch)
    return {
        "id": rows["id"],
        "prompt_ids": prompts,
        "chosen_ids": chosens,
        "rejected_ids": rejecteds,
        "ref_chosen_logps": np.array([t.sum(dtype=np.float32) for t in tok_c], dtype=np.float32),
        "ref_rejected_logps": np.array([t.sum(dtype=np.float32) for t in tok_r], dtype=np.float32),
        "ref_chosen_token_logps": tok_c,
        "ref_rejected_token_logps": tok_r,
    }


class _Progress:
    """tqdm bar in pairs with tokens/s and ETA; silent when disabled or not the main process."""

    def __init__(self, total: int, enabled: bool):
        self.tokens = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="pair", desc="precompute", dynamic_ncols=True)

    def update(self, pairs: int, tokens: int):
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(pairs)
            self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.0f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _sum_over_processes(value: int) -> int:
    """Sum an integer over all processes (and wait for them all)."""
    import torch
    from accelerate.utils import reduce

    state = modeling.process_state()
    if state.num_processes == 1:
        return int(value)
    return int(reduce(torch.tensor(int(value), device=state.device), reduction="sum").item())


def precompute(config: PrecomputeConfig | None = None, **kwargs) -> dict:
    """Run stage 1; `fastdpo.precompute(model=..., dataset=..., output=...)` works like the CLI.

    Returns the manifest.
    """
    if config is None:
        config = PrecomputeConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    cfg = config
    state = modeling.process_state()
    t0 = time.perf_counter()
    out = Path(cfg.output)
    if state.is_main_process:
        print(f"fastdpo {__version__} precompute\n{format_config(cfg)}", file=sys.stderr)

    tokenizer = modeling.load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    source = data.load_source(cfg)
    tok_hash = modeling.tokenizer_hash(tokenizer)
    data_fp = dataset_fingerprint(source, cfg)
    settings = cfg.settings()
    # The tokenization code is part of the key, so a changed pipeline never reuses a stale datasets cache.
    map_fp = sha256_json([tok_hash, data_fp, cfg.data_settings(), sha256_file(data.__file__)])[:32]
    with state.main_process_first():  # the main process tokenizes; the others read datasets' cache
        rows, skips, stats = data.tokenize_dataset(source, tokenizer, cfg, fingerprint=map_fp)
    t_tok = time.perf_counter()
    if len(rows) == 0:
        raise UserError(f"no usable rows in {cfg.dataset}: " + (data.summarise_skips(skips, stats["rows_read"])
                                                                  or "the split is empty"))

    device = modeling.resolve_device(cfg.device)
    dtype = modeling.resolve_dtype(cfg.dtype, device)
    w_hash = modeling.weights_hash(cfg.model, cfg.revision)
    fingerprint = sha256_json({"settings": settings, "weights": w_hash, "tokenizer": tok_hash, "data": data_fp,
                               "resolved_dtype": str(dtype), "format": cache.FORMAT_VERSION})
    if state.is_main_process:
        prepare_output(out, fingerprint, settings, cfg.overwrite, True)
    state.wait_for_everyone()
    if not state.is_main_process:
        prepare_output(out, fingerprint, settings, False, False)

    n_shards = (len(rows) + cfg.shard_rows - 1) // cfg.shard_rows
    mine = list(range(state.process_index, n_shards, state.num_processes))
    todo = [(i, i * cfg.shard_rows, min((i + 1) * cfg.shard_rows, len(rows))) for i in mine
            if finished_shard(out, i, fingerprint) is None]
    kept = _sum_over_processes(len(mine) - len(todo))
    if kept and state.is_main_process:
        print(f"resuming: {kept} of {n_shards} shards already complete", file=sys.stderr)

    from .logps import LogpsModel, fused_head_note
    from .packing import attention_for, resolve_layout

    attention = attention_for(device, cfg.attn_implementation, cfg.packing, cfg.prefix_sharing)
    layout, notes = resolve_layout(modeling.load_config(cfg.model, cfg.revision, cfg.trust_remote_code), attention,
                                   cfg.packing, cfg.prefix_sharing, cfg.max_tokens_per_batch)
    if state.is_main_process:
        for note in notes:
            print(note, file=sys.stderr)
    model = None
    if todo:
        model = modeling.load_model(cfg.model, revision=cfg.revision, dtype=dtype, device=device,
                                    trust_remote_code=cfg.trust_remote_code, attn_implementation=attention)
        model.eval()
        note = fused_head_note(model)
        if note and state.is_main_process:
            print(note, file=sys.stderr)
        model = LogpsModel(model, cfg.logps_backend)
    progress = _Progress(sum(hi - lo for _, lo, hi in todo), cfg.progress and state.is_main_process)
    for i, lo, hi in todo:
        shard_rows = rows[lo:hi]
        columns = compute_shard(model, shard_rows, cfg, layout, device, tokenizer.pad_token_id,
                                on_batch=progress.update)
        table = cache.build_table(columns, {"fingerprint": fingerprint, "shard": i})
        entry = cache.write_shard(out / cache.shard_name(i), table)
        atomic_write_json(_marker(out, i), {"fingerprint": fingerprint, "entry": entry})
    progress.close()
    t_fwd = time.perf_counter()
    computed = _sum_over_processes(sum(hi - lo for _, lo, hi in todo))
    tokens = _sum_over_processes(progress.tokens)

    manifest = None
    if state.is_main_process:
        shards = [finished_shard(out, i, fingerprint) for i in range(n_shards)]
        if any(s is None for s in shards):  # a shard damaged between its write and now
            bad = [cache.shard_name(i) for i, s in enumerate(shards) if s is None]
            raise UserError(f"shard(s) {', '.join(bad)} in {out} failed their checksum after writing; re-run to "
                            "recompute them")
        manifest = {
            "format_version": cache.FORMAT_VERSION,
            "fastdpo_version": __version__,
            "fingerprint": fingerprint,
            "model": {"name_or_path": cfg.model, "revision": cfg.revision, "weights_sha256": w_hash},
            "tokenizer": {"sha256": tok_hash, "name_or_path": cfg.model, "pad_token_id": tokenizer.pad_token_id,
                          "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
            "dataset": {"name": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split,
                        "fingerprint": data_fp, "rows_read": stats["rows_read"], "rows_written": len(rows),
                        "rows_skipped": dict(sorted(skips.items())), "boundary_merges": stats["boundary_merges"],
                        "columns": {"prompt": cfg.prompt_column, "chosen": cfg.chosen_column,
                                    "rejected": cfg.rejected_column}},
            "settings": {**settings, "resolved_dtype": str(dtype).replace("torch.", ""),
                         "resolved_device": str(device),
                         "resolved_layout": dataclasses.asdict(layout)},
            "config": to_dict(cfg),
            "num_processes": state.num_processes,
            "shards": shards,
            "timings": {"tokenize_s": round(t_tok - t0, 3), "forward_s": round(t_fwd - t_tok, 3),
                        "total_s": round(time.perf_counter() - t0, 3)},
        }
        atomic_write_json(out / cache.MANIFEST, manifest)
        skipped = data.summarise_skips(skips, stats["rows_read"])
        if skipped:
            print(skipped, file=sys.stderr)
        elapsed = time.perf_counter() - t0
        print(f"precompute: {len(rows)} pairs in {n_shards} shard(s) -> {out} "
              f"({computed} computed, {len(rows) - computed} resumed) in {elapsed:.1f}s, "
              f"{computed / max(t_fwd - t_tok, 1e-9):.1f} pairs/s, {tokens / max(t_fwd - t_tok, 1e-9):.0f} "
              f"tokens/s over {state.num_processes} process(es)", file=sys.stderr)
    state.wait_for_everyone()
    return manifest if manifest is not None else cache.load_manifest(out)
