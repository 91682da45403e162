"""Padding-free packing and prompt-prefix sharing for batches of preference pairs.

One pair has P prompt, C chosen and R rejected tokens. Three layouts of a micro-batch (`lay_out`):

    padded          [P C . . .]  [P R . . .]   one row per sequence, right-padded (the classic one)
    packed          [P C P R P' C' P' R' ...]  sequences concatenated into rows; positions restart
    prefix-shared   [P C R P' C' R' ...]       the prompt once per pair (Wang & Hegde 2024,
                                               "Accelerating Direct Preference Optimization with
                                               Prefix Sharing"); with packing, several pairs per row

Every layout is described per token by a segment id `seg` (-1 for padding), a position id `pos`
(chosen and rejected both continue from the prompt) and a branch (0 prompt, 1 chosen, 2 rejected).
One rule gives the attention of query q over key k within a row:

    allowed(q, k) = seg[q] == seg[k]  and  pos[k] <= pos[q]  and  (branch[k] == 0 or branch[k] == branch[q])

so a rejected token sees its prompt but never the chosen answer, and sequences never see each
other. The mask goes to the model through transformers' attention interface: a FlexAttention
`BlockMask` (GPU; masked blocks are skipped), or a dense additive 4D mask for SDPA/eager (CPU).

The BlockMask is built from the rows' runs (stretches of one segment and branch), never from the
dense (L, L) mask: per pair of 128-token blocks, the number of allowed (q, k) pairs is a sum of
rectangles and causal triangles, O((L/128)^2) memory. With FlexAttention, rows are padded to a
multiple of 128 tokens so that shapes recur and a compiled flex_attention does not recompile for
every micro-batch (padding attends only itself and is never scored).

Row length: FlexAttention and varlen FlashAttention cost what the sequences cost, so by default a
whole micro-batch goes in one row. A dense mask scores every query against the whole row, (sum L)^2
instead of sum L^2, so with SDPA/eager rows are by default no longer than the micro-batch's longest
sequence (the padded width): packing then only fills what padding would have wasted.

Scoring: completion token j is predicted by the hidden state of the token before it *in its own
sequence*: the last prompt token for the first chosen and the first rejected token alike. Only
those (source position, label) pairs go through the LM head (`fastdpo.scoring`), in every layout,
in pair order (pair 0's chosen tokens, its rejected tokens, pair 1's chosen, ...: what
`kernels.pair_grids` and the fused pair loss read). SFT lays out one completion per prompt
(`rejecteds=None`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .modeling import LLAMA_LIKE_MODEL_TYPES

# transformers attention implementations that take a custom mask, and those that only do varlen packing
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")

# FlexAttention's sparse block size (torch's default): flex rows are padded to a multiple of it
FLEX_BLOCK = 128

# Model types whose attention layers take a custom 4D / BlockMask attention mask and explicit position_ids
MASKABLE_MODEL_TYPES = LLAMA_LIKE_MODEL_TYPES


@dataclass
class Layout:
    """How a micro-batch of pairs is laid out for one forward."""

    packing: bool = False
    prefix_sharing: bool = False
    max_tokens: int | None = None  # cap on a packed row's length (None: see row_budget)
    attention: str = "sdpa"  # the model's attention implementation

    @property
    def padded(self) -> bool:
        return not (self.packing or self.prefix_sharing)

    def row_budget(self, longest: int) -> int | None:
        """Tokens per packed row (0: a row per sequence; None: one row). Default: one row where the attention
        skips masked-out keys, the longest sequence's length where a dense mask makes a row cost its length^2."""
        if not self.packing:
            return 0
        if self.max_tokens is not None:
            return self.max_tokens
        return longest if self.attention in ("sdpa", "eager") else None


def resolve_layout(config, attention: str | None, packing: bool | None, prefix_sharing: bool | None,
                   max_tokens: int | None) -> tuple[Layout, list[str]]:
    """The layout to use and notes saying why a requested or default feature is off.

    `config` is the model's config and `attention` the attention implementation it is loaded with
    (None: transformers' default, SDPA for the supported models). For packing and prefix sharing,
    None means "on wherever exact for this model's attention implementation".
    """
    attention = attention or "sdpa"
    notes = []
    reason = None
    if getattr(config, "model_type", None) not in MASKABLE_MODEL_TYPES:
        reason = f"model type {config.model_type!r} is not known to take custom attention masks"
    elif _uses_sliding_window(config):
        reason = "the model uses sliding-window attention, which a custom mask would override"
    elif attention not in MASKED_ATTENTION + VARLEN_ATTENTION:
        reason = f"attention implementation {attention!r} takes no custom mask"
    pack_ok = reason is None
    share_ok = reason is None and attention in MASKED_ATTENTION
    share_reason = reason or (f"{attention} can pack sequences (varlen) but cannot express the prefix-sharing mask; "
                              "use --attn-implementation sdpa or flex_attention")
    use_pack = pack_ok if packing is None else packing
    use_share = share_ok if prefix_sharing is None else prefix_sharing
    if use_pack and not pack_ok:
        notes.append(f"packing off: {reason}")
        use_pack = False
    if use_share and not share_ok:
        notes.append(f"prefix sharing off: {share_reason}")
        use_share = False
    if packing is None and not pack_ok:
        notes.append(f"packing off by default: {reason}")
    if prefix_sharing is None and not share_ok and pack_ok:
        notes.append(f"prefix sharing off by default: {share_reason}")
    return Layout(use_pack, use_share, max_tokens, attention), notes


def attention_for(device, attn_implementation: str | None, packing: bool | None, prefix_sharing: bool | None):
    """The attention implementation to load the model with: FlexAttention on CUDA when packing or prefix
    sharing may be used and the user chose none; otherwise the user's choice (or transformers' default)."""
    wanted = packing is not False or prefix_sharing is not False
    if attn_implementation is None and wanted and getattr(device, "type", str(device)) == "cuda":
        return "flex_attention"
    return attn_implementation


def _uses_sliding_window(config) -> bool:
    if getattr(config, "sliding_window", None) is None:
        return False
    if getattr(config, "use_sliding_window", True) is False:
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or any("sliding" in str(t) for t in layer_types)


@dataclass
class PackedRows:
    """A micro-batch laid out in rows, plus where each completion token is scored from."""

    input_ids: torch.Tensor  # (N, L)
    position_ids: torch.Tensor  # (N, L)
    seg: torch.Tensor  # (N, L) segment id within the row, -1 on padding
    branch: torch.Tensor  # (N, L) 0 prompt, 1 chosen, 2 rejected
    # the S scored tokens, in pair order
    src_row: torch.Tensor  # (S,) row of the hidden state that predicts scored token s
    src_pos: torch.Tensor  # (S,) its position in the row
    labels: torch.Tensor  # (S,) the scored token
    pair: torch.Tensor  # (S,) which pair it belongs to
    side: torch.Tensor  # (S,) 0 chosen, 1 rejected
    index: torch.Tensor  # (S,) its index within the completion

    @property
    def num_tokens(self) -> int:
        return int((self.seg >= 0).sum())

    def to(self, device):
        for name, value in vars(self).items():
            setattr(self, name, value.to(device, non_blocking=True))
        return self


def _units(prompts, chosens, rejecteds, prefix_sharing: bool):
    """Sequences to place in rows: (pair, [(branch, tokens), ...])."""
    units = []
    if rejecteds is None:  # one completion per prompt (SFT)
        return [(i, [(0, p), (1, c)]) for i, (p, c) in enumerate(zip(prompts, chosens))]
    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
        if prefix_sharing:
            units.append((i, [(0, p), (1, c), (2, r)]))
        else:
            units.append((i, [(0, p), (1, c)]))
            units.append((i, [(0, p), (2, r)]))
    return units


def _fill_rows(units, max_tokens: int | None) -> list[list]:
    """First-fit decreasing: longest units first, each into the first row with room."""
    sizes = [sum(len(t) for _, t in parts) for _, parts in units]
    order = sorted(range(len(units)), key=lambda u: -sizes[u])  # stable: ties keep batch order
    if max_tokens is None:
        return [[units[u] for u in order]]
    rows, room = [], []
    for u in order:
        for r in range(len(rows)):
            if sizes[u] <= room[r]:
                rows[r].append(units[u])
                room[r] -= sizes[u]
                break
        else:  # a unit longer than the budget gets a row of its own
            rows.append([units[u]])
            room.append(max_tokens - sizes[u])
    return rows


def lay_out(prompts, chosens, rejecteds, layout: Layout, pad_id: int) -> PackedRows:
    """Lay out a micro-batch of pairs in rows (see the module docstring); `rejecteds=None`: completions only."""
    # without packing, every sequence (or prefix-shared pair) gets a row of its own
    units = _units(prompts, chosens, rejecteds, layout.prefix_sharing)
    rows = _fill_rows(units, layout.row_budget(max(sum(len(t) for _, t in parts) for _, parts in units)))
    width = max(sum(len(t) for unit in row for _, t in unit[1]) for row in rows)
    if layout.attention == "flex_attention" and not layout.padded:  # shapes recur: fewer flex recompiles
        width = -(-width // FLEX_BLOCK) * FLEX_BLOCK
    n = len(rows)
    # built in numpy, converted once: a micro-batch has hundreds of small pieces, and a torch op costs 5-10x more
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    position_ids = np.zeros((n, width), dtype=np.int64)
    seg = np.full((n, width), -1, dtype=np.int64)
    branch = np.zeros((n, width), dtype=np.int64)
    scored = []  # per completion: (row, source positions, labels, pair, side)
    for r, row in enumerate(rows):
        o = 0
        for s, (i, parts) in enumerate(row):
            p_len = len(parts[0][1])
            prompt_end = o + p_len - 1  # the hidden state that predicts each completion's first token
            for b, tokens in parts:
                k = len(tokens)
                input_ids[r, o:o + k] = tokens
                start = 0 if b == 0 else p_len
                position_ids[r, o:o + k] = np.arange(start, start + k)
                seg[r, o:o + k] = s
                branch[r, o:o + k] = b
                if b:  # score every completion token from the token before it in its own sequence
                    prev = np.arange(o - 1, o + k - 1)
                    prev[0] = prompt_end
                    scored.append((r, prev, tokens, i, b - 1))
                o += k
    scored.sort(key=lambda x: (x[3], x[4]))  # pair order: pair 0's chosen, its rejected, pair 1's chosen, ...
    lens = np.array([len(t) for _, _, t, _, _ in scored], dtype=np.int64)

    def per_token(values):  # one value per completion -> one per scored token
        return torch.from_numpy(np.repeat(np.array(values, dtype=np.int64), lens))

    def joined(arrays):
        return torch.from_numpy(np.concatenate(arrays).astype(np.int64)) if arrays else torch.zeros(0, dtype=torch.long)

    return PackedRows(torch.from_numpy(input_ids), torch.from_numpy(position_ids), torch.from_numpy(seg),
                      torch.from_numpy(branch), per_token([x[0] for x in scored]), joined([x[1] for x in scored]),
                      joined([np.asarray(x[2]) for x in scored]), per_token([x[3] for x in scored]),
                      per_token([x[4] for x in scored]), joined([np.arange(k) for k in lens]))


def allowed(seg: torch.Tensor, pos: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(N, L, L) bool: may query q attend key k (the module docstring's rule; padding attends itself)."""
    same = seg[:, :, None] == seg[:, None, :]
    causal = pos[:, None, :] <= pos[:, :, None]
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    real = (seg[:, :, None] >= 0)
    eye = torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device)[None]
    return (same & causal & visible & real) | eye


def attention_mask(packed: PackedRows, layout: Layout, dtype: torch.dtype):
    """What the model's attention takes: the usual (N, L) padding mask for padded rows; otherwise a
    BlockMask (flex), None (varlen), a boolean (N, 1, L, L) mask (SDPA: True attends) or an additive one
    (eager adds it to the scores)."""
    if layout.padded:
        return (packed.seg >= 0).long()
    if layout.attention == "flex_attention":
        return block_mask(packed)
    if layout.attention in VARLEN_ATTENTION:
        return None  # transformers finds the sequences from the restarting position_ids
    ok = allowed(packed.seg, packed.position_ids, packed.branch)[:, None]  # (N, 1, L, L)
    if layout.attention == "sdpa":
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)


def block_mask(packed: PackedRows, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask of `allowed`, built from the rows' runs without the dense (L, L) mask.

    A (q block, k block) pair is full when all its block^2 pairs are allowed (the kernel skips mask_mod
    there), partial when some are (mask_mod, the exact rule, decides per element), skipped otherwise.
    """
    from torch.nn.attention.flex_attention import BlockMask

    seg, pos, branch = packed.seg, packed.position_ids, packed.branch

    def mask_mod(b, h, q, k):
        rule = (seg[b, q] == seg[b, k]) & (pos[b, k] <= pos[b, q]) & ((branch[b, k] == 0) | (branch[b, k] ==
                                                                                             branch[b, q]))
        return (rule & (seg[b, q] >= 0)) | (q == k)

    count, unknown = _block_counts(seg, pos, branch, block)  # (N, nb, nb) each
    full = count == block * block
    partial = ((count > 0) | unknown) & ~full
    length = seg.shape[1]
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


def _ordered(blocks: torch.Tensor):
    """(N, nq, nk) bool -> BlockMask's (N, 1, nq) counts and (N, 1, nq, nk) indices, listed blocks first."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None].contiguous(), idx[:, None].contiguous()


def _runs(seg, pos, branch):
    """Runs: maximal stretches of one row, segment and branch with consecutive positions, padding left out.
    Returns row, start, end (exclusive, in the row), seg, branch, first and last position, each (R,)."""
    n, length = seg.shape
    s, p, b = seg.reshape(-1), pos.reshape(-1), branch.reshape(-1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = (s[1:] != s[:-1]) | (b[1:] != b[:-1]) | (p[1:] != p[:-1] + 1)
    new[::length] = True  # a row starts a run
    starts = new.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([n * length])])
    real = s[starts] >= 0
    starts, ends = starts[real], ends[real]
    row = torch.div(starts, length, rounding_mode="floor")
    return row, starts - row * length, ends - row * length, s[starts], b[starts], p[starts], p[ends - 1]


def _run_pairs(row, seg, branch, first, last):
    """Ordered pairs (q run, k run) of distinct runs of one segment, split by what `allowed` says of all
    their (q, k): every pair allowed (full), none, or it depends (unknown). Positions within a run are
    consecutive, so `pos[k] <= pos[q]` holds for all pairs iff last[k] <= first[q], for none iff first[k] > last[q]."""
    key = row * (int(seg.max()) + 1 if len(seg) else 1) + seg
    key, order = torch.sort(key, stable=True)
    groups = torch.unique_consecutive(key, return_counts=True)[1]
    qs, ks = [], []
    for d in range(1, int(groups.max()) if len(groups) else 0):  # runs d apart in the same segment
        i = torch.arange(len(key) - d, device=key.device)
        i = i[key[i] == key[i + d]]
        qs += [order[i], order[i + d]]
        ks += [order[i + d], order[i]]
    q = torch.cat(qs) if qs else row.new_zeros(0)
    k = torch.cat(ks) if ks else row.new_zeros(0)
    visible = (branch[k] == 0) | (branch[k] == branch[q])
    full = visible & (last[k] <= first[q])
    none = ~visible | (first[k] > last[q])
    return q[full], k[full], q[~full & ~none], k[~full & ~none]


def _touches(q0, q1, k0, k1, block: int):
    """Block pairs touched by rectangles [q0, q1) x [k0, k1), (P,) each -> piece p, q block i, k block j,
    and the rectangle's tokens in block i (a) and in block j (b), (E,) each. E is about the rectangles'
    area in blocks plus their number: sparse, never (P, nb)."""
    qa, ka = q0 // block, k0 // block
    nq, nk = (q1 - 1) // block - qa + 1, (k1 - 1) // block - ka + 1
    sizes = nq * nk
    p = torch.repeat_interleave(torch.arange(len(q0), device=q0.device), sizes)
    local = torch.arange(len(p), device=q0.device) - (torch.cumsum(sizes, 0) - sizes)[p]
    i, j = qa[p] + local // nk[p], ka[p] + local % nk[p]
    a = torch.minimum(q1[p], (i + 1) * block) - torch.maximum(q0[p], i * block)
    b = torch.minimum(k1[p], (j + 1) * block) - torch.maximum(k0[p], j * block)
    return p, i, j, a, b


def _block_counts(seg, pos, branch, block: int):
    """(N, nb, nb) int64: allowed (q, k) pairs per (q block, k block), and (N, nb, nb) bool: blocks touched
    by run pairs whose rule depends on the element (`_run_pairs`' unknown; not counted).

    The allowed pairs are disjoint pieces: a run with another run of its segment is all or nothing (its
    prompt, for a completion), a run with itself a causal triangle (k <= q), padding its diagonal."""
    n, length = seg.shape
    nb = -(-length // block)
    row, start, end, rseg, rbranch, first, last = _runs(seg, pos, branch)
    fq, fk, uq, uk = _run_pairs(row, rseg, rbranch, first, last)
    count = torch.zeros(n, nb, nb, dtype=torch.long, device=seg.device)
    p, i, j, a, b = _touches(start[fq], end[fq], start[fk], end[fk], block)
    count.index_put_((row[fq][p], i, j), a * b, accumulate=True)
    # a run with itself: k blocks before the q block are all below the diagonal; the diagonal block holds
    # a triangle of a(a+1)/2 pairs for the run's a tokens in it
    p, i, j, a, b = _touches(start, end, start, end, block)
    area = torch.where(i > j, a * b, torch.where(i == j, a * (a + 1) // 2, 0))
    count.index_put_((row[p], i, j), area, accumulate=True)
    pad = torch.nn.functional.pad((seg < 0).long(), (0, nb * block - length)).view(n, nb, block).sum(-1)
    count += torch.diag_embed(pad)  # padding attends itself
    unknown = torch.zeros(n, nb, nb, dtype=torch.bool, device=seg.device)
    p, i, j, _, _ = _touches(start[uq], end[uq], start[uk], end[uk], block)
    unknown[row[uq][p], i, j] = True
    return count, unknown
