"""The reference cache: Arrow IPC stream shards plus `manifest.json`.

    DIR/shard-00000.arrow, shard-00001.arrow, ...   `--shard-rows` rows each, in source order
    DIR/manifest.json                                 written last, atomically

Shards are Arrow IPC *stream* files, the format `datasets` uses for its own cache, so
`datasets.Dataset.from_file(shard)` opens one zero-copy. The column names are a contract:

    id                         int64           the row's index in the source split
    prompt_ids                 list<int32>
    chosen_ids, rejected_ids   list<int32>     completion tokens (EOS included)
    ref_chosen_logps           float32         sum over completion tokens
    ref_rejected_logps         float32
    ref_chosen_token_logps     list<float32>   one value per completion token
    ref_rejected_token_logps   list<float32>
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import UserError
from .io import atomic_write_bytes, sha256_bytes, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = ".fastdpo-precompute.json"  # written at start: the settings a resume must match
RECORD_BATCH_ROWS = 1024

ids_type = pa.list_(pa.int32())
logps_type = pa.list_(pa.float32())
SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("prompt_ids", ids_type),
    ("chosen_ids", ids_type),
    ("rejected_ids", ids_type),
    ("ref_chosen_logps", pa.float32()),
    ("ref_rejected_logps", pa.float32()),
    ("ref_chosen_token_logps", logps_type),
    ("ref_rejected_token_logps", logps_type),
])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def _list_array(values: list, np_dtype, pa_type) -> pa.Array:
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v, dtype=np_dtype) for v in values]) if values else np.zeros(0, np_dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa_type.value_type))


def build_table(rows: dict, metadata: dict | None = None) -> pa.Table:
    """rows: column name -> list (one entry per row), in SCHEMA's columns."""
    arrays = [
        pa.array(rows["id"], type=pa.int64()),
        _list_array(rows["prompt_ids"], np.int32, ids_type),
        _list_array(rows["chosen_ids"], np.int32, ids_type),
        _list_array(rows["rejected_ids"], np.int32, ids_type),
        pa.array(np.asarray(rows["ref_chosen_logps"], dtype=np.float32)),
        pa.array(np.asarray(rows["ref_rejected_logps"], dtype=np.float32)),
        _list_array(rows["ref_chosen_token_logps"], np.float32, logps_type),
        _list_array(rows["ref_rejected_token_logps"], np.float32, logps_type),
    ]
    meta = {b"fastdpo": json.dumps(metadata or {}, sort_keys=True).encode()}
    return pa.Table.from_arrays(arrays, schema=SCHEMA.with_metadata(meta))


def serialize(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=RECORD_BATCH_ROWS)
    return sink.getvalue()


def write_shard(path: str | os.PathLike, table: pa.Table) -> dict:
    """Write atomically (temporary name, fsync, rename). Returns the manifest entry."""
    buf = serialize(table)
    atomic_write_bytes(path, memoryview(buf))
    return {"file": Path(path).name, "rows": table.num_rows, "sha256": sha256_bytes(memoryview(buf)),
            "bytes": buf.size}


def read_shard(path: str | os.PathLike) -> pa.Table:
    """Memory-mapped, zero-copy: the table's buffers point into the file's pages."""
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all()


def shard_metadata(table: pa.Table) -> dict:
    meta = (table.schema.metadata or {}).get(b"fastdpo")
    return json.loads(meta) if meta else {}


# ----------------------------------------------------------------------------------------------
# Manifest


def load_manifest(cache_dir: str | os.PathLike) -> dict:
    """The parsed manifest of a finished cache, or a UserError saying what is wrong with DIR."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"reference cache not found: {cache_dir} (no such directory)")
    path = cache_dir / MANIFEST
    if not path.is_file():
        hint = " (precompute has not finished; re-run it to resume)" if (cache_dir / STATE).exists() else ""
        raise UserError(f"{cache_dir} is not a fastdpo cache: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{path} is not a fastdpo manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has cache format version {version}; this fastdpo reads version {FORMAT_VERSION}")
    return manifest


def verify_shard(cache_dir: str | os.PathLike, entry: dict) -> Path:
    """Check a shard against its manifest sha256; a missing, truncated or modified shard is refused by name."""
    path = Path(cache_dir) / entry["file"]
    if not path.is_file():
        raise UserError(f"cache shard {path} is missing")
    if path.stat().st_size != entry.get("bytes", path.stat().st_size):
        raise UserError(f"cache shard {path} is truncated or damaged (size {path.stat().st_size}, "
                        f"manifest says {entry['bytes']}); re-run precompute into a new directory")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise UserError(f"cache shard {path} is damaged: sha256 {digest[:12]}... does not match the manifest "
                        f"({entry['sha256'][:12]}...); re-run precompute into a new directory")
    return path


# ----------------------------------------------------------------------------------------------
# Reading a cache for training


class CacheSource:
    """A finished cache as one row space over its memory-mapped shards (nothing loaded into RAM).

    Every shard is checked against its manifest sha256 when first opened; opening happens here,
    before training starts, so a damaged cache fails in seconds, not hours into a run.
    """

    has_ref = True

    def __init__(self, cache_dir: str | os.PathLike, manifest: dict | None = None, verify: bool = True):
        import pyarrow.compute as pc

        self.dir = Path(cache_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.dir)
        self.tables = []
        for entry in self.manifest["shards"]:
            path = verify_shard(self.dir, entry) if verify else self.dir / entry["file"]
            table = read_shard(path)
            if table.num_rows != entry["rows"] or table.schema.remove_metadata() != SCHEMA:
                raise UserError(f"cache shard {path} does not match the manifest (rows or columns differ)")
            self.tables.append(table)
        self.shard_bounds = [0]
        for t in self.tables:
            self.shard_bounds.append(self.shard_bounds[-1] + t.num_rows)
        lens = {c: np.concatenate([pc.list_value_length(t.column(c)).to_numpy(zero_copy_only=False)
                                   for t in self.tables]).astype(np.int64) if self.tables else np.zeros(0, np.int64)
                for c in ("prompt_ids", "chosen_ids", "rejected_ids")}
        self.lengths = lens["prompt_ids"] + np.maximum(lens["chosen_ids"], lens["rejected_ids"])
        self.chosen_lengths = lens["chosen_ids"]

    def __len__(self):
        return self.shard_bounds[-1]

    def fetch(self, indices: np.ndarray, with_token_logps: bool = False) -> dict:
        """Rows at global `indices`, in that order, as python lists (only these rows are read)."""
        columns = ["id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
        if with_token_logps:
            columns += ["ref_chosen_token_logps", "ref_rejected_token_logps"]
        shard = np.searchsorted(self.shard_bounds, indices, side="right") - 1
        out = {c: [None] * len(indices) for c in columns}
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = pa.array(np.asarray(indices)[where] - self.shard_bounds[s], type=pa.int64())
            part = self.tables[s].select(columns).take(local)
            for c in columns:
                values = part.column(c).to_pylist()
                for j, w in enumerate(where):
                    out[c][w] = values[j]
        return out
