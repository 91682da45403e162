"""FlexAttention's BlockMask built from segment runs: equal to the dense rule, small, and few recompiles."""

from __future__ import annotations

import random
import shutil
import tracemalloc

import pytest
import torch

from fastdpo import packing
from fastdpo.packing import Layout, PackedRows

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
BlockMask, create_block_mask, flex_attention = flex_mod.BlockMask, flex_mod.create_block_mask, flex_mod.flex_attention
FLEX = "flex_attention"


def _rows(spec, layout, sft=False):
    """spec: (prompt, chosen, rejected) lengths per pair -> lay_out rows."""
    prompts = [[5] * p for p, _, _ in spec]
    chosens = [[6] * c for _, c, _ in spec]
    rejecteds = None if sft else [[7] * r for _, _, r in spec]
    return packing.lay_out(prompts, chosens, rejecteds, layout, pad_id=0)


# ugly shapes: one-token completions, odd lengths, a pair filling exactly one or two blocks, rows crossing
# block edges by one token, several rows, no prefix sharing, SFT, unpadded (SDPA-width) rows
UGLY = {
    "one-token completions": ([(1, 1, 1), (3, 1, 2), (1, 2, 1)], Layout(packing=True, prefix_sharing=True,
                                                                         attention=FLEX), False),
    "odd lengths, shared": ([(37, 5, 91), (3, 60, 1), (101, 1, 1), (13, 17, 19)],
                            Layout(packing=True, prefix_sharing=True, attention=FLEX), False),
    "odd lengths, not shared": ([(37, 5, 91), (3, 60, 1), (101, 1, 1)], Layout(packing=True, attention=FLEX), False),
    "one pair = one block": ([(100, 20, 8)], Layout(packing=True, prefix_sharing=True, attention=FLEX), False),
    "one pair = two blocks": ([(128, 64, 64)], Layout(packing=True, prefix_sharing=True, attention=FLEX), False),
    "129 tokens": ([(64, 32, 33)], Layout(packing=True, prefix_sharing=True, attention="sdpa"), False),
    "several rows": ([(70, 9, 40), (5, 5, 5), (200, 3, 30), (1, 1, 1)],
                     Layout(packing=True, prefix_sharing=True, max_tokens=120, attention=FLEX), False),
    "shared, unpacked": ([(70, 9, 40), (5, 5, 5), (33, 3, 1)], Layout(prefix_sharing=True, attention=FLEX), False),
    "sft": ([(30, 50, 0), (1, 1, 0), (90, 7, 0)], Layout(packing=True, attention=FLEX), True),
    "unpadded rows": ([(40, 9, 3), (1, 2, 1), (77, 5, 50)], Layout(packing=True, prefix_sharing=True), False),
}


def _block_reference(ok: torch.Tensor, block: int):
    """Dense (N, L, L) rule -> (N, nb, nb) blocks with some allowed pair, and with all allowed."""
    n, length, _ = ok.shape
    nb = -(-length // block)
    extra = nb * block - length  # pairs past the row count as masked, as in create_block_mask
    x = torch.nn.functional.pad(ok, (0, extra, 0, extra)).view(n, nb, block, nb, block)
    return x.any(4).any(2), x.all(4).all(2)


def _blocks_of(bm: BlockMask):
    """A BlockMask's (N, nb, nb) partial and full blocks, through its own to_dense()."""
    b = bm.BLOCK_SIZE
    partial = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=b).to_dense()[:, 0].bool()
    full = BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=b).to_dense()[:, 0].bool()
    assert torch.equal(bm.to_dense()[:, 0].bool(), partial | full) and not (partial & full).any()
    return partial, full


def _dense(rows: PackedRows) -> torch.Tensor:
    return packing.allowed(rows.seg, rows.position_ids, rows.branch)


def _qkv(rows: PackedRows, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, length = rows.seg.shape
    return [torch.randn(n, heads, length, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("block", [128, 16])
@pytest.mark.parametrize("name", list(UGLY))
def test_blocks_equal_the_dense_rule(name, block):
    spec, layout, sft = UGLY[name]
    rows = _rows(spec, layout, sft)
    if layout.attention == FLEX:
        assert rows.seg.shape[1] % packing.FLEX_BLOCK == 0  # flex rows recur in 128-token steps
    bm = packing.block_mask(rows, block)
    nonempty, full = _block_reference(_dense(rows), block)
    partial, got_full = _blocks_of(bm)
    assert torch.equal(got_full, full) and torch.equal(partial, nonempty & ~full)
    assert bm.seq_lengths == (rows.seg.shape[1],) * 2 and bm.BLOCK_SIZE == (block, block)
    # the same structure (and kv index order) as torch's own dense-built mask
    old = create_block_mask(bm.mask_mod, rows.seg.shape[0], None, *bm.seq_lengths, device="cpu", BLOCK_SIZE=block)
    for a, b in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(bm, a), getattr(old, a)) and torch.equal(getattr(bm, b), getattr(old, b))


@pytest.mark.parametrize("name", ["odd lengths, shared", "several rows", "sft", "unpadded rows"])
def test_flex_forward_equals_sdpa_with_the_dense_mask(name):
    """Eager flex on CPU applies mask_mod to every element (it ignores the block lists; the compiled kernel,
    in the integration test below, does not): this checks the per-element rule."""
    spec, layout, sft = UGLY[name]
    rows = _rows(spec, layout, sft)
    q, k, v = _qkv(rows)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_dense(rows)[:, None])
    got = flex_attention(q, k, v, block_mask=packing.block_mask(rows))
    assert (got - want).abs().max() < 1e-5


def test_runs_whose_rule_depends_on_the_element_leave_their_blocks_partial():
    """Rows lay_out never makes (a completion whose positions overlap its prompt's): blocks such a pair of
    runs touches are kept partial, never full or skipped, so mask_mod decides and the mask stays exact."""
    length = 300
    pos = torch.cat([torch.arange(200), torch.arange(150, 250)])[None]  # the completion restarts at 150
    branch = torch.cat([torch.zeros(200), torch.ones(100)]).long()[None]
    seg = torch.zeros(1, length, dtype=torch.long)
    seg[0, 280:] = -1  # and trailing padding
    z = torch.zeros(0, dtype=torch.long)
    rows = PackedRows(torch.zeros_like(seg), pos, seg, branch, z, z, z, z, z, z)
    for block in (16, 64):
        assert packing._block_counts(rows.seg, rows.position_ids, rows.branch, block)[1].any()  # the case is hit
        nonempty, full = _block_reference(_dense(rows), block)
        partial, got_full = _blocks_of(packing.block_mask(rows, block))
        assert not (got_full & ~full).any() and not (nonempty & ~(partial | got_full)).any()
    q, k, v = _qkv(rows)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_dense(rows)[:, None])
    assert (flex_attention(q, k, v, block_mask=packing.block_mask(rows)) - want).abs().max() < 1e-5


def _peak_bytes(fn):
    """Peak bytes allocated while fn runs: torch's CPU allocations (profiler memory events, in time order)
    plus Python/numpy ones (tracemalloc). Their sum bounds the joint peak from above."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()  # inside: the profiler's own start and stop are not fn's
        try:
            fn()
            py_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = top = 0
    for e in events:
        now += e.nbytes()
        top = max(top, now)
    return top + py_peak


def _long_row(length):
    """One flex row of `length` tokens: pairs of 256 prompt, 129 chosen and 127 rejected tokens."""
    pairs = length // 512
    return _rows([(256, 129, 127)] * pairs, Layout(packing=True, prefix_sharing=True, attention=FLEX))


def test_block_mask_memory_at_32k_tokens():
    """Building the mask of a 32,768-token row (64 prefix-shared pairs) takes under 64 MiB; measured ~3 MiB.
    torch's create_block_mask materialises (L, L) masks, ~10 L^2 bytes: 160 MiB at L = 4,096 (checked here,
    so the meter sees it), 2.5 GiB at 16k and 10 GiB at 32k (measured once as peak RSS)."""
    rows = _long_row(32768)
    assert rows.seg.shape == (1, 32768)
    packing.block_mask(_long_row(1024))  # lazy imports and first-call setup are not the mask's cost
    assert _peak_bytes(lambda: packing.block_mask(rows)) < 64 * 2**20
    small = _long_row(4096)
    mod = packing.block_mask(small).mask_mod
    assert _peak_bytes(lambda: create_block_mask(mod, 1, None, 4096, 4096, device="cpu")) > 64 * 2**20


def _micro_batch(rng: random.Random) -> PackedRows:
    """A random micro-batch as flex gets one: 2-6 pairs, lengths 1-120, sharing on or off, one row.
    (Rows varying in number and length together break torch 2.13's CPU flex codegen once both dims are
    dynamic, a torch bug; CPU only, and fastdpo's flex default is one row.)"""
    spec = [(rng.randint(1, 120), rng.randint(1, 60), rng.randint(1, 60)) for _ in range(rng.randint(2, 6))]
    return _rows(spec, Layout(packing=True, prefix_sharing=rng.random() < 0.7, attention=FLEX))


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_flex_equals_sdpa_and_recompiles_are_bounded():
    """30 micro-batches of varied lengths through torch.compile(flex_attention), as
    transformers compiles it. Compiled, the kernel skips empty blocks and skips mask_mod on full ones, so
    equality with SDPA checks the block lists element by element. ~15 s cold on 2 CPU cores (two compiles)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        flex = torch.compile(flex_attention)
        rng = random.Random(0)
        lengths = set()
        for step in range(30):
            rows = _micro_batch(rng)
            lengths.add(tuple(rows.seg.shape))
            q, k, v = _qkv(rows, seed=step)
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_dense(rows)[:, None])
            got = flex(q, k, v, block_mask=packing.block_mask(rows))
            assert (got - want).abs().max() < 1e-5, step
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert len(lengths) > 5
    # One graph for the first shape, one more when a second shape makes dynamo mark the lengths dynamic
    # (automatic dynamic shapes); rows padded to multiples of 128 keep every later shape on that graph.
    # Measured: 2. Allowing 3 leaves room for one more specialisation in another torch version.
    assert graphs <= 3, graphs
