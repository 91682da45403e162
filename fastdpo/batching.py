"""Which rows go into which micro-batch, deterministically from (seed, epoch).

Rows come from a `Source`: the reference cache's memory-mapped shards (`cache.CacheSource`) or a
tokenized dataset (`DatasetSource`: live-reference, reference-free and SFT runs). An epoch's order is:

1. shards in an order drawn from (seed, epoch), rows within each shard from (seed, epoch, shard);
2. windows of `step_size * GROUP_WINDOW` rows, each sorted by length and cut into step batches,
   so that pairs of similar length share a batch (less padding); the step batches of a window are
   then shuffled again so that lengths do not drift through the epoch.
3. each step batch (batch_size x grad_accum x processes pairs) is cut into micro-batches of
   `batch_size`, and process r takes micro-batches r, r + N, ...

So gradient accumulation and extra processes change how a step is computed, never which pairs form
it: 2 x 4 is 1 x 8, and 2 processes match 1 process with twice the accumulation. The plan depends
only on row lengths, seed and epoch, so a resumed run recomputes it and skips the steps already
taken, and two sources holding the same rows plan identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_WINDOW = 50  # micro-batches per length-sorting window (as transformers' LengthGroupedSampler)


def length_buckets(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    order = np.argsort(-np.asarray(lengths), kind="stable")  # ties keep their order
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_plan(lengths: np.ndarray, shard_bounds: list[int], batch_size: int, *, seed: int, epoch: int,
               shuffle: bool = True, group_by_length: bool = True) -> list[np.ndarray]:
    """Step batches (arrays of row indices, `batch_size` = pairs per optimizer step) for one epoch."""
    n_shards = len(shard_bounds) - 1
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        parts = []
        for s in rng.permutation(n_shards):
            lo, hi = shard_bounds[s], shard_bounds[s + 1]
            parts.append(lo + np.random.default_rng([seed, epoch, int(s)]).permutation(hi - lo))
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    else:
        order = np.arange(shard_bounds[-1])
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    window = batch_size * GROUP_WINDOW
    for w, lo in enumerate(range(0, len(order), window)):
        chunk = order[lo:lo + window]
        wb = [chunk[b] for b in length_buckets(lengths[chunk], batch_size)]
        if shuffle:
            perm = np.random.default_rng([seed, epoch, 1 << 20, w]).permutation(len(wb))
            wb = [wb[i] for i in perm]
        batches.extend(wb)
    return batches


def micro_batches(step_batch: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [step_batch[i:i + batch_size] for i in range(0, len(step_batch), batch_size)]


def pair_lengths(prompt_len: np.ndarray, chosen_len: np.ndarray, rejected_len: np.ndarray) -> np.ndarray:
    return prompt_len + np.maximum(chosen_len, rejected_len)


class Source:
    """Rows to train on: `len`, per-row lengths for planning, shard boundaries, and `fetch`.

    has_ref: the rows carry reference log-probs (`ref_chosen_logps`, ... as in the cache's columns).
    """

    has_ref = False
    shard_bounds: list[int]  # row ranges that are read together (the cache's shards)
    lengths: np.ndarray  # (n,) prompt + longer completion, for length grouping
    chosen_lengths: np.ndarray  # (n,) chosen (SFT: target) tokens, for token-mean normalisation

    def _set_lengths(self, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> None:
        self.lengths = pair_lengths(prompt, chosen, rejected)
        self.chosen_lengths = chosen
        self.prompt_lengths = prompt  # (n,) for the memory estimate (`plan.check_run`)

    def __len__(self) -> int:
        return self.shard_bounds[-1]

    def fetch(self, indices: np.ndarray, with_token_logps: bool = False) -> dict:
        """Rows at `indices`, in that order: column name -> list."""
        raise NotImplementedError


class DatasetSource(Source):
    """Tokenized rows held by a `datasets.Dataset` (memory-mapped by datasets), no reference log-probs."""

    def __init__(self, rows, rows_per_shard: int = 4096):
        self.rows = rows
        n = len(rows)
        self.shard_bounds = sorted({0, n} | set(range(0, n, rows_per_shard)))
        self._set_lengths(*(np.array([len(x) for x in rows[c]], dtype=np.int64)
                            for c in ("prompt_ids", "chosen_ids", "rejected_ids")))

    def fetch(self, indices: np.ndarray, with_token_logps: bool = False) -> dict:
        return self.rows[[int(i) for i in indices]]


@dataclass
class Batch:
    """One micro-batch of rows, and what a loss needs to know of the optimizer step it belongs to."""

    rows: dict  # column name -> list, as `Source.fetch` returns them
    has_ref: bool  # the rows carry cached reference log-probs
    step_examples: int  # examples (pairs) in the whole optimizer step: all micro-batches, all processes
    step_chosen_tokens: int  # their chosen (SFT: target) tokens, for token-mean losses
