"""Stage 1: run the frozen reference model once and write its log-probs to the cache (`fastdpo.cache`).

    fastdpo precompute --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --output cache/uf-qwen05
    fastdpo precompute --model /tmp/tiny --dataset pairs.jsonl --output /tmp/cache --batch-size 4  # tiny CPU run

Flow: tokenize every row (cached by `datasets`) -> claim the output directory -> split the kept
rows into shards of `--shard-rows` -> per shard: length-bucketed batches through the scorer
(`scoring.score_rows`, the function training uses) -> one shard file and its done-marker ->
`manifest.json` last. Re-running the same command resumes: finished shards are checked and kept; a
different command into a non-empty directory is refused. Under `accelerate launch`, process r
computes shards r, r+N, r+2N, ...; the main process writes the manifest.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, cache, data, modeling, quant
from ..checkpoint import on_main
from ..config import check_fields, format_config, make, opt, to_dict
from ..errors import Interrupted, UserError
from ..io import check_output_apart, sha256_file, sha256_json
from ..loop import StopSignals


@dataclass
class PrecomputeConfig:
    """`fastdpo precompute`: reference log-probs for a preference dataset. Every option of the command is declared
    here, with its default and help; the flags are generated from these fields. The model, layout and data fields
    are copies of train's and eval's (tests/test_config.py keeps the copies equal); their order is the manifest's."""

    GROUP_TITLES = {"model": "reference model"}

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

    # -- data --
    dataset: str | None = opt(None, "Hub dataset id, a .jsonl/.json/.parquet/.csv/.arrow file, or a directory of them",
                              required=True, group="data")
    dataset_config: str | None = opt(None, "Hub dataset configuration name", group="data")
    split: str = opt("train", "dataset split to read", group="data")
    prompt_column: str = opt("prompt", "column holding the prompt (absent: extracted from chosen/rejected)",
                             group="data")
    chosen_column: str = opt("chosen", "column holding the preferred completion", group="data")
    rejected_column: str = opt("rejected", "column holding the dispreferred completion", group="data")
    max_prompt_length: int | None = opt(512, "cap on prompt tokens (none: no cap)", ge=1, group="data")
    max_length: int | None = opt(1024, "cap on prompt+completion tokens; the completion is cut (none: no cap)", ge=2,
                                 group="data")
    truncation: str = opt("keep_end", "which end of a long prompt to keep", choices=["keep_end", "keep_start"],
                          group="data")
    chat_bos: str = opt("template", "conversational rows: 'template' keeps the BOS the chat template renders (as "
                        "apply_chat_template(tokenize=True) does); 'tokenizer' also adds the tokenizer's BOS where "
                        "the template renders none", choices=["template", "tokenizer"], group="data")
    assistant_marker: str = opt("\n\nAssistant:", "implicit-prompt string data: the prompt ends after the last one",
                                group="data")
    limit: int | None = opt(None, "process only the first N rows of the split", ge=1, group="data")
    strict: bool = opt(False, "stop at the first row that would be skipped, naming it", group="data")

    # -- options --
    output: str | None = opt(None, "directory to write shards and manifest.json into", required=True)
    shard_rows: int = opt(4096, "rows per shard file", ge=1)
    overwrite: bool = opt(False, "replace an existing cache made with other settings")

    def __post_init__(self):
        check_fields(self)
        quant.check_quant_options(self)
        modeling.check_scoring_options(self)

    def settings(self) -> dict:
        """Everything that changes the cache's contents (a resume must match it)."""
        skip = {"output", "overwrite", "progress", "strict"}
        return {k: v for k, v in to_dict(self).items() if k not in skip}


def dataset_fingerprint(ds, args: PrecomputeConfig) -> str:
    """Content hash of local data files; `datasets`' own fingerprint for Hub data."""
    if os.path.isfile(args.dataset):
        return "sha256:" + sha256_file(args.dataset)
    if os.path.isdir(args.dataset):
        files = sorted(str(p) for p in Path(args.dataset).rglob("*") if p.is_file())
        return "sha256:" + sha256_json([(os.path.relpath(f, args.dataset), sha256_file(f)) for f in files])
    return "datasets:" + getattr(ds, "_fingerprint", "unknown")


def compute_shard(scorer, rows, cfg: PrecomputeConfig, layout, device, pad_id: int, on_batch=None) -> dict:
    """Reference log-probs for one shard's rows (a `datasets.Dataset` slice), in source order, as cache columns."""
    import numpy as np

    from ..scoring import score_rows

    prompts, chosens, rejecteds = rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]
    tok_c, tok_r = score_rows(scorer, prompts, chosens, rejecteds, cfg.batch_size, layout, pad_id, device, on_batch)
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


def _manifest(cfg: PrecomputeConfig, setup, fingerprint: str, hashes: dict, stats: dict, skips, n_rows: int,
              shards: list, num_processes: int, times: list[float]) -> cache.Manifest:
    tok = setup.tokenizer
    return cache.Manifest(
        format_version=cache.FORMAT_VERSION, fastdpo_version=__version__, fingerprint=fingerprint,
        model={"name_or_path": cfg.model, "revision": cfg.revision, "weights_sha256": hashes["weights"]},
        tokenizer={"sha256": hashes["tokenizer"], "name_or_path": cfg.model, "pad_token_id": tok.pad_token_id,
                   "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        dataset={"name": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split, "fingerprint": hashes["data"],
                 "rows_read": stats["rows_read"], "rows_written": n_rows, "rows_skipped": dict(sorted(skips.items())),
                 "boundary_merges": stats["boundary_merges"], "turns_rendered_apart": stats["turns_rendered_apart"],
                 "columns": {
                     "prompt": cfg.prompt_column, "chosen": cfg.chosen_column, "rejected": cfg.rejected_column}},
        settings={**cfg.settings(), "resolved_dtype": str(setup.dtype).replace("torch.", ""),
                  "resolved_device": str(modeling.resolve_device(cfg.device)),
                  "resolved_layout": dataclasses.asdict(setup.layout), "quantization": quant.spec(cfg)},
        config=to_dict(cfg), num_processes=num_processes, shards=shards,
        timings={"tokenize_s": round(times[1] - times[0], 3), "forward_s": round(times[2] - times[1], 3),
                 "total_s": round(time.perf_counter() - times[0], 3)})


def _compute_shards(cfg: PrecomputeConfig, setup, rows, out: Path, fingerprint: str, n_shards: int,
                    device, stop) -> tuple[int, int]:
    """This process's unfinished shards (r, r + N, ...), each written with its done-marker; returns the pairs
    computed and the tokens run through the model, summed over processes. `stop` (`loop.StopSignals`): a
    SIGTERM or Ctrl-C stops at the end of the batch, with the finished shards kept for the re-run."""
    state = modeling.process_state()
    mine = list(range(state.process_index, n_shards, state.num_processes))
    todo = [(i, i * cfg.shard_rows, min((i + 1) * cfg.shard_rows, len(rows))) for i in mine
            if cache.finished_shard(out, i, fingerprint) is None]
    kept = _sum_over_processes(len(mine) - len(todo))
    if kept and state.is_main_process:
        print(f"resuming: {kept} of {n_shards} shards already complete", file=sys.stderr)
    scorer = setup.scorer(setup.load(device=device).eval()) if todo else None
    setup.print_notes(state.is_main_process)
    progress = _Progress(sum(hi - lo for _, lo, hi in todo), cfg.progress and state.is_main_process)

    def on_batch(pairs: int, tokens: int):
        progress.update(pairs, tokens)
        if stop.signum is not None:  # the shard in progress is dropped; the finished ones stay
            progress.close()
            done = len(list(out.glob(".shard-*.done.json")))
            raise Interrupted(f"stopped by {stop.name}: {done} of {n_shards} shards complete in {out}; run the same "
                              "command again to resume", stop.signum)

    for i, lo, hi in todo:
        columns = compute_shard(scorer, rows[lo:hi], cfg, setup.layout, device, setup.tokenizer.pad_token_id,
                                on_batch=on_batch)
        meta = {"fingerprint": fingerprint, "shard": i, "num_shards": n_shards}
        cache.write_finished_shard(out, i, cache.build_table(columns, meta), fingerprint)
    progress.close()
    return _sum_over_processes(sum(hi - lo for _, lo, hi in todo)), _sum_over_processes(progress.tokens)


def precompute(config: PrecomputeConfig | None = None, **kwargs) -> dict:
    """Run stage 1; `fastdpo.precompute(model=..., dataset=..., output=...)` works like the CLI.

    Returns the manifest (as a dict).
    """
    from ..scoring import prepare

    cfg = make(PrecomputeConfig, config, **kwargs)
    state = modeling.process_state()
    is_main = state.is_main_process
    t0 = time.perf_counter()
    modeling.set_library_progress(cfg.progress and is_main)
    if is_main:
        print(f"fastdpo {__version__} precompute\n{format_config(cfg)}", file=sys.stderr)
    check_output_apart(cfg.output, {"--model": cfg.model, "--dataset": cfg.dataset})
    device = modeling.resolve_device(cfg.device)
    dtype = modeling.resolve_dtype(cfg.dtype, device)
    setup = prepare(cfg, device, dtype)
    tokenizer = setup.tokenizer  # checked before anything is written: a bad --model claims no --output

    source = data.load_source(cfg)
    tok_hash = modeling.tokenizer_hash(tokenizer)
    data_fp = dataset_fingerprint(source, cfg)
    # The tokenization code is part of the key, so a changed pipeline never reuses a stale datasets cache.
    map_fp = sha256_json([tok_hash, data_fp, data.data_settings(cfg), sha256_file(data.__file__)])[:32]
    with state.local_main_process_first():  # one process per node tokenizes; the others read datasets' cache
        rows, skips, stats = data.tokenize_dataset(source, tokenizer, cfg, fingerprint=map_fp)
    t_tok = time.perf_counter()
    data.keep_rows((rows, skips, stats), cfg, is_main=False)  # refuses a dataset without a usable row

    hashes = {"weights": modeling.weights_hash(cfg.model, cfg.revision), "tokenizer": tok_hash, "data": data_fp}
    settings = cfg.settings()
    fingerprint = sha256_json({"settings": settings, **hashes, "resolved_dtype": str(dtype),
                               "format": cache.FORMAT_VERSION})
    # SIGTERM or Ctrl-C from here: while shards are computed, the run stops at the end of the batch; after, the
    # cache is finished
    with StopSignals(announce=is_main) as stop:
        return _write_cache(cfg, setup, device, (rows, skips, stats), hashes, fingerprint, stop, [t0, t_tok])


def _write_cache(cfg: PrecomputeConfig, setup, device, tokenized, hashes: dict, fingerprint: str, stop,
                 times: list[float]) -> dict:
    """Claim and lock --output, compute this process's shards, and (the main process) write the manifest."""
    state, out, (rows, skips, stats), (t0, t_tok) = modeling.process_state(), Path(cfg.output), tokenized, times
    is_main, settings = state.is_main_process, cfg.settings()
    # the main process claims and locks --output; a refusal stops every process with its line
    lock = on_main(state, lambda: cache.prepare_output(out, fingerprint, settings, cfg.overwrite, True))
    try:
        # every process must see the claim (one filesystem): all agree, so that all stop with the same line
        blind = _sum_over_processes(0 if is_main or cache.claim_visible(out) else 1)
        if blind:
            raise UserError(f"--output {out}: {blind} of {state.num_processes} processes cannot see the main "
                            "process's claim there; over several nodes, --output must be on a filesystem all nodes "
                            "share")
        if not is_main:
            cache.prepare_output(out, fingerprint, settings, False, False)
        n_shards = (len(rows) + cfg.shard_rows - 1) // cfg.shard_rows
        computed, tokens = _compute_shards(cfg, setup, rows, out, fingerprint, n_shards, device, stop)
    except BaseException:  # nothing finished: leave no claim that would refuse the retry
        if is_main:
            cache.release_output(out, lock)
        raise
    t_fwd = time.perf_counter()

    if is_main:
        try:
            shards = [cache.finished_shard(out, i, fingerprint) for i in range(n_shards)]
            if any(s is None for s in shards):  # a shard damaged between its write and now
                bad = [cache.shard_name(i) for i, s in enumerate(shards) if s is None]
                raise UserError(f"shard(s) {', '.join(bad)} in {out} failed their checksum after writing; re-run to "
                                "recompute them")
            cache.write_manifest(out, _manifest(cfg, setup, fingerprint, hashes, stats, skips, len(rows), shards,
                                                state.num_processes, [t0, t_tok, t_fwd]))
            skipped = data.summarise_skips(skips, stats["rows_read"])
            if skipped:
                print(skipped, file=sys.stderr)
            elapsed = time.perf_counter() - t0
            print(f"precompute: {len(rows)} pairs in {n_shards} shard(s) -> {out} "
                  f"({computed} computed, {len(rows) - computed} resumed) in {elapsed:.1f}s, "
                  f"{computed / max(t_fwd - t_tok, 1e-9):.1f} pairs/s, {tokens / max(t_fwd - t_tok, 1e-9):.0f} "
                  f"tokens/s over {state.num_processes} process(es)", file=sys.stderr)
        finally:
            lock.release()
    state.wait_for_everyone()
    return cache.load_manifest(out).to_dict()
