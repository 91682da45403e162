"""`fastdpo compare`: did training make the model better? The win rate of one model's answers over another's.

    fastdpo compare --model runs/dpo --baseline runs/sft --ref-cache cache/heldout \\
        --judge fastdpo.demo_task:judge_pair --output runs/dpo/vs-sft                # a program judge
    fastdpo compare --model runs/dpo --baseline runs/sft --dataset prompts.jsonl \\
        --reward-model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --output vs-sft-rm   # a reward model
    fastdpo compare --model runs/dpo --baseline runs/sft --dataset prompts.jsonl \\
        --llm-judge Qwen/Qwen2.5-7B-Instruct --output vs-sft-llm                     # an LLM judge
    # a tiny run on a CPU, after `fastdpo demo` (~10 s):
    fastdpo compare --model fastdpo-demo/dpo --baseline fastdpo-demo/sft --ref-cache fastdpo-demo/cache-eval \\
        --judge fastdpo.demo_task:judge_pair --max-new-tokens 6 --output /tmp/vs-sft

Both models (A, `--model`, and B, `--baseline`) answer the same held-out prompts, from a reference
cache's prompt ids or a dataset's prompt column, with the same generation settings and seed (greedy
unless --temperature > 0; batched, left-padded; sampling is seeded per batch, so a resumed run draws
what an uninterrupted one would). A judge then decides each pair. Every judgement is a probability
`p` that the answer shown first is the better one, and `|p - 1/2| <= --tie-epsilon` is a tie:

- `--judge module:function(prompt, answer_a, answer_b)` returns "a", "b" or "tie" (p = 1, 0, 1/2), or
  a float in [0, 1], the probability that answer_a is better. The prompt is the dataset's own (a
  string or a list of {role, content} messages), or with --ref-cache the decoded prompt ids.
- `--reward-model M` (`AutoModelForSequenceClassification`, a local directory or a Hub id) scores
  each answer after the prompt in its own chat template (it tokenizes itself; without a chat
  template, prompt + answer as plain text); p = sigmoid(r_A - r_B), the Bradley-Terry probability.
  A model with several output labels needs `--reward-index`.
- `--llm-judge M`, a causal LM, reads `judges.LLM_JUDGE_TEMPLATE` (in its chat template if it has
  one), and its choice is read from the log-probs of the two labels that could follow, not parsed
  from text: p = exp(lp_A) / (exp(lp_A) + exp(lp_B)), the labels scored through fastdpo's one
  log-prob path (`scoring.score_rows`).

Position bias: the pairwise judges (--judge, --llm-judge) see every pair in both orders, A's answer
first and B's first. A wins a pair only if both orders prefer A, B only if both prefer B; anything
else (one order a tie, or the orders disagreeing) is a tie. `orders.disagree` is the fraction of pairs
whose two orders gave different verdicts. A reward model scores each answer alone: there is no order.

Statistics (all in OUT/report.json and the printed table):

- `win_rate` = (wins + ties / 2) / n, with a 95% Wilson score interval computed on wins + ties/2
  successes out of n. A tie varies less than a win or a loss, so with many ties the interval is wider
  than it needs to be (conservative).
- answer lengths in tokens (EOS excluded), each under its own model's tokenizer: mean, median, and
  the fraction of answers cut at --max-new-tokens (`at_cap`; a cut answer is judged unfinished).
- `length_balanced`: the win rate and interval over the pairs of similar length only, those whose
  token counts differ by at most --length-tolerance of the longer one (|len_A - len_B| <=
  tol * max(len_A, len_B)). A lead that holds there does not come from longer answers alone.
- `longer_won`: of the decided pairs whose lengths differ, the fraction the longer answer won.

The output directory, written as the work goes (every file atomically):

    OUT/.fastdpo-compare.json            written first: the settings of the answers and of the judge
    OUT/answers/model-00000000.json      one file per batch of prompts: ids, token ids, text
    OUT/answers/baseline-00000000.json
    OUT/judgements/pairs-00000000.json   one file per batch: each order's p and the judge's raw output
    OUT/report.json, OUT/compare.png     written last

Re-running the same command continues from the batches already written and gives the same report.
The verdicts are computed from the stored judgements when the report is written, so --tie-epsilon and
--length-tolerance can change on a re-run. Other answer settings are refused unless --overwrite
(which removes the old comparison); another judge with the same answers is refused unless
--overwrite, which then keeps the answers and judges them again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, judges, modeling, quant
from ..config import check_fields, format_config, make, opt, to_dict
from ..errors import UserError
from ..io import atomic_write_json, ensure_dir

STATE = ".fastdpo-compare.json"
REPORT = "report.json"
PLOT = "compare.png"
SIDES = ("model", "baseline")  # A and B
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass
class CompareConfig:
    """`fastdpo compare`: win rate of --model over --baseline on held-out prompts, as a judge decides. Every option
    of the command is declared here, with its default and help; the flags are generated from these fields (the model
    fields are copies of eval's, but for --model's help; tests/test_config.py keeps the copies equal)."""

    GROUP_TITLES = {"model": "models (A: --model, B: --baseline)", "data": "prompts"}

    # -- model --
    model: str | None = opt(None, "model A, the one evaluated (e.g. the DPO run): a local directory or a Hub id",
                            required=True, group="model")
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
    baseline: str | None = opt(None, "model B, the one A is compared with (e.g. the SFT model)", required=True,
                               group="model")
    baseline_revision: str | None = opt(None, "--baseline's revision on the Hub (--revision is --model's)",
                                        group="model")

    # -- options --
    output: str | None = opt(None, "directory for the answers, judgements, report.json and compare.png "
                                   "(re-run the same command to continue an interrupted comparison)", required=True)
    overwrite: bool = opt(False, "replace a comparison with other settings in --output (the answers are kept if "
                                 "only the judge changed)")

    # -- data --
    ref_cache: str | None = opt(None, "prompts from this reference cache (its prompt ids; both models must have its "
                                      "tokenizer)", group="data")
    dataset: str | None = opt(None, "prompts from this dataset's --prompt-column (strings or lists of messages): Hub "
                                    "id, .jsonl/.json/.parquet/.csv/.arrow file or directory", group="data")
    dataset_config: str | None = opt(None, "Hub dataset configuration name", group="data")
    split: str = opt("train", "dataset split to read", group="data")
    prompt_column: str = opt("prompt", "column holding the prompts", group="data")
    max_prompt_length: int | None = opt(None, "cap on prompt tokens, --truncation says which end stays (default: "
                                              "none)", ge=1, group="data")
    truncation: str = opt("keep_end", "which end of a long prompt to keep", choices=["keep_end", "keep_start"],
                          group="data")
    limit: int | None = opt(None, "compare on only the first N prompts", ge=1, group="data")

    # -- judge --
    judge: str | None = opt(None, "a program judge module:function(prompt, answer_a, answer_b) -> 'a'|'b'|'tie' or "
                                  "a float P(answer_a is better) (e.g. fastdpo.demo_task:judge_pair)", group="judge")
    reward_model: str | None = opt(None, "a reward model (AutoModelForSequenceClassification): local directory or "
                                         "Hub id", group="judge")
    reward_index: int | None = opt(None, "which output of a multi-label --reward-model is the reward", ge=0,
                                   group="judge")
    llm_judge: str | None = opt(None, "an LLM judge (a causal LM: local directory or Hub id), asked the pairwise "
                                      "template in both orders", group="judge")
    tie_epsilon: float = opt(1e-3, "a judgement p (probability that the first-shown answer is better) within this of "
                                   "1/2 is a tie", ge=0, lt=0.5, group="judge")
    length_tolerance: float = opt(0.2, "length-balanced win rate: pairs whose token counts differ by at most this "
                                       "fraction of the longer", ge=0, le=1, group="judge")

    # -- generation --
    max_new_tokens: int = opt(256, "generation length cap", ge=1, group="generation")
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", ge=0, group="generation")
    seed: int = opt(0, "sampling seed, the same for both models", ge=0, group="generation")
    batch_size: int = opt(16, "prompts per generate call, pairs per judge forward", ge=1, group="generation")

    # -- model --
    device: str = opt("auto", "device to run on (auto: the GPU when there is one)", group="model")

    # -- options --
    progress: bool = opt(True, "show progress bars")

    def __post_init__(self):
        check_fields(self)
        quant.check_quant_options(self)
        if self.dtype == "bf16-mixed":
            raise UserError("--dtype bf16-mixed is a training mode; to generate and judge, use bfloat16 or float32")
        named = [flag for flag, v in (("--judge", self.judge), ("--reward-model", self.reward_model),
                                      ("--llm-judge", self.llm_judge)) if v]
        if len(named) != 1:
            raise UserError("give exactly one judge: --judge module:function, --reward-model M or --llm-judge M"
                            + (f" (got {', '.join(named)})" if named else ""))
        if self.reward_index is not None and not self.reward_model:
            raise UserError("--reward-index picks a --reward-model's output; add --reward-model")
        if self.logps_backend != "auto" and not self.llm_judge:
            raise UserError("--logps-backend applies to --llm-judge's scoring only; drop it")
        if bool(self.ref_cache) == bool(self.dataset):
            raise UserError("give the prompts with exactly one of --ref-cache CACHE or --dataset D")
        if self.ref_cache:
            given = [flag for flag, v, default in (("--dataset-config", self.dataset_config, None),
                                                   ("--split", self.split, "train"),
                                                   ("--prompt-column", self.prompt_column, "prompt"),
                                                   ("--max-prompt-length", self.max_prompt_length, None),
                                                   ("--truncation", self.truncation, "keep_end")) if v != default]
            if given:
                raise UserError(f"{', '.join(given)} apply to --dataset; with --ref-cache the cache's prompt ids are "
                                "used as they are")


# ----------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (Wilson 1927); (nan, nan) when n = 0.

        centre = (p + z²/2n) / (1 + z²/n),   half = z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    """
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _verdict(p: float, eps: float) -> str:
    """'first', 'second' or 'tie' from the probability that the first-shown answer is better."""
    return "tie" if abs(p - 0.5) <= eps else ("first" if p > 0.5 else "second")


def pair_winner(record: dict, eps: float) -> tuple[str, dict]:
    """'model', 'baseline' or 'tie' for one pair's judgement record, and each order's verdict (pairwise judges)."""
    if "rewards" in record:  # a reward model: one judgement, no order
        return {"first": "model", "second": "baseline", "tie": "tie"}[_verdict(record["p_model"], eps)], {}
    a = {"first": "model", "second": "baseline", "tie": "tie"}[_verdict(record["model_first"]["p_first"], eps)]
    b = {"first": "baseline", "second": "model", "tie": "tie"}[_verdict(record["baseline_first"]["p_first"], eps)]
    return (a if a == b else "tie"), {"model_first": a, "baseline_first": b}


def _win_rate(winners: list[str]) -> dict:
    n = len(winners)
    wins, ties = winners.count("model"), winners.count("tie")
    score = wins + 0.5 * ties
    lo, hi = wilson_interval(score, n)
    if not n:
        return {"n": 0, "wins": 0, "ties": 0, "losses": 0, "win_rate": None, "ci95": [None, None]}
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": score / n, "ci95": [lo, hi]}


def _lengths(xs: list[int], cap: int | None) -> dict:
    import numpy as np

    return {"mean": float(np.mean(xs)), "median": float(np.median(xs)), "max": int(max(xs)),
            "at_cap": None if cap is None else sum(x >= cap for x in xs) / len(xs)}


def summarise(pairs: list[dict], eps: float, tol: float, cap: int | None = None) -> dict:
    """The report's statistics from the per-pair records (`pairs`: lengths and judgements; see the module
    docstring for each figure's rule; `cap`: --max-new-tokens, to count the answers cut there). Adds each pair's
    `winner` (and per-order verdicts) to its record."""
    winners, orders = [], []
    for p in pairs:
        p["winner"], per_order = pair_winner(p["judgement"], eps)
        if per_order:
            p["judgement"]["verdicts"] = per_order
            orders.append(per_order)
        winners.append(p["winner"])
    la = [p["model"]["tokens"] for p in pairs]
    lb = [p["baseline"]["tokens"] for p in pairs]
    out = _win_rate(winners)
    if orders:
        n = len(orders)
        shown_first = sum((o["model_first"] == "model") + (o["baseline_first"] == "baseline") for o in orders)
        shown_second = sum((o["model_first"] == "baseline") + (o["baseline_first"] == "model") for o in orders)
        out["orders"] = {"disagree": sum(o["model_first"] != o["baseline_first"] for o in orders) / n,
                         "first_shown_preferred": shown_first / (2 * n),
                         "second_shown_preferred": shown_second / (2 * n)}
    else:
        out["orders"] = None  # a reward model scores each answer alone
    out["lengths"] = {"model": _lengths(la, cap), "baseline": _lengths(lb, cap)}
    balanced = [w for w, x, y in zip(winners, la, lb) if abs(x - y) <= tol * max(x, y)]
    out["length_balanced"] = {"tolerance": tol, **_win_rate(balanced)}
    decided = [(w, x, y) for w, x, y in zip(winners, la, lb) if w != "tie" and x != y]
    longer = sum((w == "model") == (x > y) for w, x, y in decided)
    out["longer_won"] = {"n": len(decided), "fraction": longer / len(decided) if decided else None}
    return out


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    ids: list[int]  # the rows' ids (cache ids, or row indices of the dataset split)
    for_judge: list  # what the judge sees: the dataset's prompt (str or messages) or the decoded prompt ids
    tokens: dict  # side -> list of prompt token ids, under that model's tokenizer
    source: dict  # where they came from, for the report and the settings
    skipped: dict  # reason -> count


def prompts_from_cache(cfg: CompareConfig, setups: dict) -> Prompts:
    import numpy as np

    from .. import cache

    source = cache.open_cache(cfg.ref_cache, setups["model"])  # refused unless made with --model's tokenizer
    if modeling.tokenizer_hash(setups["baseline"].tokenizer) != modeling.tokenizer_hash(setups["model"].tokenizer):
        raise UserError(f"--baseline {cfg.baseline} has another tokenizer than --model {cfg.model}; --ref-cache's "
                        "prompt ids mean nothing to it: give the prompts with --dataset instead")
    n = min(len(source), cfg.limit or len(source))
    rows = source.fetch(np.arange(n))
    tok = setups["model"].tokenizer
    return Prompts(list(rows["id"]), [tok.decode(p, skip_special_tokens=True) for p in rows["prompt_ids"]],
                   {side: rows["prompt_ids"] for side in setups},
                   {"ref_cache": cfg.ref_cache, "fingerprint": source.manifest.fingerprint}, {})


def prompts_from_dataset(cfg: CompareConfig, setups: dict) -> Prompts:
    """The prompt column, rendered and tokenized as `fastdpo precompute` renders prompts (chat template for
    messages, BOS once where the tokenizer uses one), by each model's own tokenizer; bad rows are counted skips."""
    import collections

    from ..data import RowTokenizer, _classify, _messages, check_chat_template, load_source
    from .precompute import dataset_fingerprint

    ds = load_source(cfg)
    if cfg.prompt_column not in ds.column_names:
        raise UserError(f"dataset {cfg.dataset} has no column {cfg.prompt_column!r} (--prompt-column); columns found: "
                        f"{', '.join(ds.column_names)}")
    for setup in setups.values():  # messages without a chat template: one line, not a skip per row
        check_chat_template(ds, setup.tokenizer, [cfg.prompt_column])
    n = min(len(ds), cfg.limit or len(ds))
    values = ds.select(range(n))[cfg.prompt_column]
    limits = types.SimpleNamespace(max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation, max_length=None,
                                   chat_bos="template")
    row_tokenizers = {side: RowTokenizer(s.tokenizer, limits) for side, s in setups.items()}
    skipped = collections.Counter()
    ids, for_judge, tokens = [], [], {side: [] for side in setups}
    for i, value in enumerate(values):
        kind = _classify(value)
        if kind == "messages":
            value = _messages(value)
        if kind not in ("text", "messages"):
            skipped[kind] += 1
            continue
        try:
            row = {side: rt.prompt_ids(kind, value) for side, rt in row_tokenizers.items()}
        except Exception:  # jinja's own exception types, or no chat template
            skipped["chat_template_error"] += 1
            continue
        ids.append(i)
        for_judge.append(value)
        for side in setups:
            tokens[side].append(row[side])
    if not ids:
        raise UserError(f"dataset {cfg.dataset}: none of its first {n} rows has a usable {cfg.prompt_column!r} "
                        f"(skipped: {dict(skipped)})")
    return Prompts(ids, for_judge, tokens, {"dataset": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split,
                                            "prompt_column": cfg.prompt_column, "fingerprint":
                                            dataset_fingerprint(ds, cfg)}, dict(skipped))


# ----------------------------------------------------------------------------------------------
# The output directory


def _differing(new: dict, old: dict) -> str:
    keys = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
    return ", ".join(keys) or "contents"


def claim_output(cfg: CompareConfig, answers: dict, judge: dict) -> Path:
    """Make `--output` this comparison's directory: new, continued (same settings), or replaced with --overwrite
    (all of it if the answers' settings differ, the judgements and report if only the judge's do)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a directory")
    new = json.loads(json.dumps({"answers": answers, "judge": judge}))  # as it reads back from the file
    if out.is_dir() and any(out.iterdir()):
        try:
            old = json.loads((out / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or not {"answers", "judge"} <= set(old):
            raise UserError(f"--output {out} is not empty and holds no fastdpo comparison; choose another directory")

        def written(sub):  # a changed setting loses nothing where nothing was written under it yet
            return any((out / sub).glob("*.json"))

        if old["answers"] != new["answers"] and (written("answers") or written("judgements")):
            if not cfg.overwrite:
                raise UserError(f"--output {out} holds a comparison of other answers (differs in: "
                                f"{_differing(new['answers'], old['answers'])}); choose another --output or pass "
                                "--overwrite to replace it")
            _remove(out, ("answers", "judgements", REPORT, PLOT))
        elif old["judge"] != new["judge"] and written("judgements"):
            if not cfg.overwrite:
                raise UserError(f"--output {out} holds these answers judged by another judge (differs in: "
                                f"{_differing(new['judge'], old['judge'])}); pass --overwrite to judge them again "
                                "(the answers are kept) or choose another --output")
            _remove(out, ("judgements", REPORT, PLOT))
        elif old != new:
            _remove(out, (REPORT, PLOT))  # another judge's report, from before a failure
    for sub in ("answers", "judgements"):
        d = ensure_dir(out / sub)
        for tmp in d.glob(".*.tmp"):  # what a killed write left
            tmp.unlink(missing_ok=True)
    atomic_write_json(out / STATE, {"fastdpo_version": __version__, **new})
    return out


def _remove(out: Path, names) -> None:
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _read_part(path: Path, ids: list[int]) -> dict | None:
    """A finished batch file, or None if absent or not for these prompt ids."""
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and part.get("ids") == ids else None


def _batches(n: int, size: int):
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _batch_seed(seed: int, start: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{start}".encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def _bar(enabled: bool, total: int, done: int, desc: str):
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="prompt", desc=desc, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _free(device) -> None:
    """Give a model's GPU memory back before the next one loads (collecting takes ~0.5 s: on the GPU only)."""
    import torch

    if getattr(device, "type", None) == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_batches(directory: Path, name: str, ids: list, cfg: CompareConfig, desc: str, start, work) -> list[dict]:
    """Each batch of --batch-size prompts' record, `{"ids": ..., **work(lo, hi)}`, read back from
    `directory/NAME-LO.json` where an earlier run wrote it, else computed and written atomically as it comes.
    `start()` runs once before the first batch to compute (it loads a model), never when every batch is there."""
    batches = _batches(len(ids), cfg.batch_size)
    paths = [directory / f"{name}-{lo:08d}.json" for lo, _ in batches]
    parts = [_read_part(p, ids[lo:hi]) for p, (lo, hi) in zip(paths, batches)]
    todo = [i for i, part in enumerate(parts) if part is None]
    if todo:
        start()
        with _bar(cfg.progress, len(ids), len(ids) - sum(batches[i][1] - batches[i][0] for i in todo), desc) as bar:
            for i in todo:
                lo, hi = batches[i]
                parts[i] = {"ids": ids[lo:hi], **work(lo, hi)}
                atomic_write_json(paths[i], parts[i])
                if bar is not None:
                    bar.update(hi - lo)
    return parts


def generate_side(out: Path, side: str, setup, prompts: Prompts, cfg: CompareConfig, device) -> list[dict]:
    """One model's answers to every prompt: {"text", "tokens" (how many)} each."""
    import torch

    from .eval import generate_tokens

    held = {}

    def start():
        held["model"] = setup.load(device=device).eval()
        setup.print_notes()

    def work(lo, hi):
        torch.manual_seed(_batch_seed(cfg.seed, lo))  # the same draws for both models, resumed or not
        new = generate_tokens(held["model"], setup.tokenizer, prompts.tokens[side][lo:hi], cfg, device)
        return {"tokens": new, "texts": [setup.tokenizer.decode(t, skip_special_tokens=True) for t in new]}

    parts = run_batches(out / "answers", side, prompts.ids, cfg, f"answers ({side})", start, work)
    if held:
        del held["model"]
        _free(device)
    return [{"text": text, "tokens": len(t)} for part in parts for text, t in zip(part["texts"], part["tokens"])]


def judge_all(out: Path, judge, prompts: Prompts, answers: dict, cfg: CompareConfig, device) -> list[dict]:
    """Every pair's judgement record (`judges.judge_batch`)."""
    loaded = []

    def start():
        judge.load()
        loaded.append(True)

    def work(lo, hi):
        a, b = ([x["text"] for x in answers[side][lo:hi]] for side in SIDES)
        return {"records": judges.judge_batch(judge, prompts.for_judge[lo:hi], a, b, prompts.ids[lo:hi])}

    parts = run_batches(out / "judgements", "pairs", prompts.ids, cfg, "judge", start, work)
    if loaded:
        judge.close()
        _free(device)
    return [r for part in parts for r in part["records"]]


# ----------------------------------------------------------------------------------------------
# The command


def _answer_settings(cfg: CompareConfig, setups: dict, prompts: Prompts) -> dict:
    keep = ("model", "revision", "baseline", "baseline_revision", "trust_remote_code", "attn_implementation", "limit",
            "max_prompt_length", "truncation", "max_new_tokens", "temperature", "seed", "batch_size")
    return {**{k: getattr(cfg, k) for k in keep}, "prompts": prompts.source,
            "dtype": str(setups["model"].dtype),
            "weights": {side: modeling.weights_hash(s.args.model, s.args.revision) for side, s in setups.items()}}


def compare(config: CompareConfig | None = None, **kwargs) -> dict:
    """Run `fastdpo compare`; `fastdpo.compare(model=..., baseline=..., ...)` works like the CLI. Returns the report
    (also in OUTPUT/report.json)."""
    from ..scoring import prepare

    cfg = make(CompareConfig, config, **kwargs)
    t0 = time.perf_counter()
    modeling.set_library_progress(cfg.progress)
    if cfg.progress:
        print(f"fastdpo {__version__} compare\n{format_config(cfg)}", file=sys.stderr)
    for flag, path in (("--model", cfg.model), ("--baseline", cfg.baseline), ("--ref-cache", cfg.ref_cache),
                       ("--dataset", cfg.dataset)):
        if path and os.path.exists(path) and Path(path).resolve() == Path(cfg.output).resolve():
            raise UserError(f"--output {cfg.output} is {flag} {path}; choose a directory of its own")
    device = modeling.resolve_device(cfg.device)
    dtype = modeling.resolve_dtype(cfg.dtype, device)
    judge = judges.make_judge(cfg, device, dtype)  # a bad judge fails here, before any model answers
    setups = {"model": prepare(cfg, device, dtype),
              "baseline": prepare(dataclasses.replace(cfg, model=cfg.baseline, revision=cfg.baseline_revision),
                                  device, dtype)}
    prompts = (prompts_from_cache if cfg.ref_cache else prompts_from_dataset)(cfg, setups)
    out = claim_output(cfg, _answer_settings(cfg, setups, prompts), judge.settings())
    answers = {side: generate_side(out, side, setups[side], prompts, cfg, device) for side in SIDES}
    records = judge_all(out, judge, prompts, answers, cfg, device)

    pairs = [{"id": row_id, "prompt": prompt, "model": a, "baseline": b, "judgement": r}
             for row_id, prompt, a, b, r in zip(prompts.ids, prompts.for_judge, answers["model"], answers["baseline"],
                                                 records)]
    report = {"model": cfg.model, "baseline": cfg.baseline, "judge": judge.settings(),
              "prompts": {**prompts.source, "num": len(prompts.ids), "skipped": prompts.skipped},
              **summarise(pairs, cfg.tie_epsilon, cfg.length_tolerance, cfg.max_new_tokens),
              "rules": {"win_rate": "(wins + ties/2) / n; 95% Wilson score interval on wins + ties/2 out of n",
                        "tie": f"|p - 1/2| <= {cfg.tie_epsilon:g}, p = P(the first-shown answer is better)",
                        "orders": "pairwise judges: each pair in both orders; a win only if both orders agree, "
                                  "else a tie" if judge.pairwise else "a reward model scores each answer alone",
                        "length_balanced": f"pairs with |len_A - len_B| <= {cfg.length_tolerance:g} * "
                                           "max(len_A, len_B), lengths in tokens (EOS excluded)"},
              "config": to_dict(cfg), "pairs": pairs}
    plot = out / PLOT
    try:
        from ..plot import plot_comparison

        plot_comparison(report, plot)
    except UserError as e:  # matplotlib missing: the report is still written
        print(f"note: no plot ({e})", file=sys.stderr)
        plot = None
    report["plot"] = str(plot) if plot else None
    report["elapsed_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out / REPORT, report)
    return report


def table(report: dict) -> str:
    """The report on one screen."""
    def pct(x):
        return "  n/a" if x is None or x != x else f"{x:.3f}"

    def ci(r):
        return f"[{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]"

    j = report["judge"]
    judge = j.get("judge") or j.get("reward_model") or j.get("llm_judge")
    lb, la = report["length_balanced"], report["lengths"]
    lines = [f"fastdpo compare: A = {report['model']}  vs  B = {report['baseline']}",
             f"{report['prompts']['num']} prompts; judge {judge}"
             + (" (both orders)" if report["orders"] is not None else " (reward model: no order)"),
             "",
             f"{'':<26}{'A wins':>8}{'ties':>8}{'B wins':>8}",
             f"{'pairs':<26}{report['wins']:>8}{report['ties']:>8}{report['losses']:>8}",
             f"{'win rate of A over B':<26}{pct(report['win_rate']):>8}  {ci(report)}  95% Wilson, ties count 1/2"]
    if report["orders"] is not None:
        o = report["orders"]
        lines.append(f"{'orders disagreed':<26}{pct(o['disagree']):>8}  counted as ties; the first-shown answer was "
                     f"preferred {o['first_shown_preferred']:.3f}, the second {o['second_shown_preferred']:.3f}")
    lines += ["",
              f"{'answer length (tokens)':<26}{'mean':>8}{'median':>8}{'at cap':>8}  (cut at --max-new-tokens)"]
    for side, letter in (("model", "A"), ("baseline", "B")):
        x = la[side]
        name = f"{letter} ({os.path.basename(os.path.normpath(report[side]))})"
        lines.append(f"{name:<26}{x['mean']:>8.1f}{x['median']:>8.1f}{pct(x['at_cap']):>8}")
    lw = report["longer_won"]
    lines += [f"{'length-balanced win rate':<26}{pct(lb['win_rate']):>8}  {ci(lb)}  {lb['n']} pairs within "
              f"{lb['tolerance']:.0%} of each other's length",
              f"{'the longer answer won':<26}{pct(lw['fraction']):>8}  of {lw['n']} decided pairs of different lengths"]
    return "\n".join(lines)
