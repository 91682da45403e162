"""The reference cache, written and read here: Arrow IPC stream shards plus `manifest.json`.

    DIR/.fastdpo-precompute.json         written first: the run's fingerprint and settings (claims DIR)
    DIR/shard-00000.arrow, ...           `--shard-rows` rows each, in source order; tmp + fsync + rename
    DIR/.shard-00000.arrow.done.json     after each shard: its manifest entry (what a resume keeps)
    DIR/manifest.json                    written last, atomically: the cache is finished

Shards are Arrow IPC *stream* files, the format `datasets` uses for its own cache, so
`datasets.Dataset.from_file(shard)` opens one zero-copy. The column names are a contract:

    id                         int64           the row's index in the source split
    prompt_ids                 list<int32>
    chosen_ids, rejected_ids   list<int32>     completion tokens (EOS included)
    ref_chosen_logps           float32         sum over completion tokens
    ref_rejected_logps         float32
    ref_chosen_token_logps     list<float32>   one value per completion token
    ref_rejected_token_logps   list<float32>

The manifest's schema is `Manifest` below. Reading (`open_cache`) checks it field by field, checks
that the directory holds exactly the listed shards, each against its sha256, and that the cache
was made with the policy's tokenizer, before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .batching import Source
from .errors import UserError, first_line
from .io import DirLock, atomic_write_bytes, atomic_write_json, ensure_dir, is_lock_file, sha256_bytes, sha256_file

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


# ----------------------------------------------------------------------------------------------
# The manifest


@dataclass
class ShardEntry:
    file: str  # name inside the cache directory
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """manifest.json. Nested sections are plain JSON objects; their keys are listed beside each."""

    format_version: int
    fastdpo_version: str
    fingerprint: str  # sha256 of settings, weights, tokenizer, data, dtype and format: what a resume must match
    model: dict  # name_or_path, revision, weights_sha256 (None when the weights are not local files)
    tokenizer: dict  # sha256 (modeling.tokenizer_hash), name_or_path, pad_token_id, bos_token_id, eos_token_id
    dataset: dict  # name, config, split, fingerprint, rows_read, rows_written, rows_skipped {reason: n},
    #                boundary_merges, turns_rendered_apart, columns {prompt, chosen, rejected}
    settings: dict  # PrecomputeConfig.settings() + resolved_dtype, resolved_device, resolved_layout
    config: dict  # the full PrecomputeConfig
    num_processes: int
    shards: list[ShardEntry]
    timings: dict = field(default_factory=dict)  # tokenize_s, forward_s, total_s

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MAX_BYTES = 2**63 - 1  # no file is larger (a file size is a signed 64-bit number)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text)} characters)"


def _is_int(value, lo: int = 0, hi: int = MAX_BYTES) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
# section -> {field: (types, required)}: the fields fastdpo writes and reads; a hand-edited or damaged one is named
_SECTIONS = {
    "model": {"name_or_path": (str, True), "revision": (_OPT_STR, False), "weights_sha256": (_OPT_STR, False),
              "external": (bool, False)},
    "tokenizer": {"sha256": (str, True), "name_or_path": (_OPT_STR, False), "pad_token_id": (_OPT_INT, False),
                  "bos_token_id": (_OPT_INT, False), "eos_token_id": (_OPT_INT, False)},
    "dataset": {"name": (_OPT_STR, False), "rows_read": (int, True), "rows_written": (int, True),
                "rows_skipped": (dict, True), "boundary_merges": (int, False),
                "turns_rendered_apart": (int, False), "columns": (dict, False)},
    "settings": {"resolved_dtype": (_OPT_STR, False), "resolved_device": (_OPT_STR, False),
                 "resolved_layout": ((dict, type(None)), False), "max_prompt_length": (_OPT_INT, False),
                 "max_length": (_OPT_INT, False), "truncation": (_OPT_STR, False),
                 "logps_backend": (_OPT_STR, False), "quantization": ((dict, type(None)), False)},
}


def manifest_problems(data) -> list[str]:
    """Every field of a parsed manifest that is missing, of the wrong type or out of range, one line each (empty:
    the manifest is well-formed)."""
    if not isinstance(data, dict):
        return ["not a fastdpo manifest (not a JSON object)"]
    if data.get("format_version") != FORMAT_VERSION or isinstance(data.get("format_version"), bool):
        return [f"cache format version {_shown(data.get('format_version'))}; this fastdpo reads version "
                f"{FORMAT_VERSION}"]
    problems = []
    for name in ("fastdpo_version", "fingerprint"):
        if name in data and not isinstance(data[name], str):
            problems.append(f"field {name!r} must be a string, got {_shown(data[name])}")
    for section, fields in _SECTIONS.items():
        value = data.get(section)
        if not isinstance(value, dict):
            needs = ", ".join(k for k, (_, required) in fields.items() if required) or "an object"
            problems.append(f"field {section!r} is missing or incomplete (needs {needs})")
            continue
        for key, (types, required) in fields.items():
            if key not in value:
                if required:
                    problems.append(f"field {section}.{key} is missing")
                continue
            v = value[key]
            allowed = types if isinstance(types, tuple) else (types,)
            if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):  # (a bool is an int)
                problems.append(f"field {section}.{key} has the wrong type ({_shown(v)})")
            elif isinstance(v, int) and not isinstance(v, bool) and not _is_int(v):
                problems.append(f"field {section}.{key} is out of range ({_shown(v)})")
    skipped = data.get("dataset", {}).get("rows_skipped") if isinstance(data.get("dataset"), dict) else None
    if isinstance(skipped, dict) and not all(isinstance(k, str) and _is_int(v) for k, v in skipped.items()):
        problems.append("field dataset.rows_skipped must map reasons to counts")
    timings = data.get("timings", {})
    if not isinstance(timings, dict) or not all(_is_number(v) for v in timings.values()):
        problems.append(f"field 'timings' must map names to seconds, got {_shown(timings)}")
    if "config" in data and not isinstance(data["config"], dict):
        problems.append("field 'config' must be an object")
    if "num_processes" in data and not _is_int(data["num_processes"], 1, 2**31):
        problems.append(f"field 'num_processes' must be a positive integer, got {_shown(data['num_processes'])}")
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        return problems + ["field 'shards' must be a non-empty list"]
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or any(k not in entry for k in ("file", "rows", "sha256", "bytes")):
            problems.append(f"shards[{i}] needs file, rows, sha256 and bytes")
            continue
        file = entry["file"]
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            problems.append(f"shards[{i}].file {_shown(file)} must be a file name inside the cache directory")
        if not _is_int(entry["rows"], 1):
            problems.append(f"shards[{i}].rows {_shown(entry['rows'])} is not a row count")
        if not _is_int(entry["bytes"], 1):
            problems.append(f"shards[{i}].bytes {_shown(entry['bytes'])} is not a file size")
        if not (isinstance(entry["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            problems.append(f"shards[{i}].sha256 {_shown(entry['sha256'])} is not a sha256 digest")
    return problems


def parse_manifest(data, path: Path) -> Manifest:
    """A Manifest from parsed JSON, or a UserError naming the file and the (first) field that is wrong."""
    problems = manifest_problems(data)
    if problems:
        more = f" (and {len(problems) - 1} more: fastdpo cache info lists them)" if len(problems) > 1 else ""
        raise UserError(f"{path}: {problems[0]}{more}")
    entries = [ShardEntry(**{k: s[k] for k in ("file", "rows", "sha256", "bytes")}) for s in data["shards"]]
    known = {f.name for f in dataclasses.fields(Manifest)}
    values = {k: v for k, v in data.items() if k in known}
    values.setdefault("fastdpo_version", "unknown")
    values.setdefault("fingerprint", "")
    values.setdefault("config", {})
    values.setdefault("num_processes", 1)
    return Manifest(**{**values, "shards": entries})


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """The manifest of a finished cache, or a UserError saying what is wrong with DIR."""
    return parse_manifest(read_manifest_json(cache_dir), Path(cache_dir) / MANIFEST)


def read_manifest_json(cache_dir: str | os.PathLike):
    """DIR/manifest.json parsed as JSON (unchecked), or a UserError: no such cache, unreadable, not JSON."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"reference cache not found: {cache_dir} (no such directory)")
    path = cache_dir / MANIFEST
    if not path.is_file():
        hint = " (precompute has not finished; re-run it to resume)" if (cache_dir / STATE).exists() else ""
        raise UserError(f"{cache_dir} is not a fastdpo cache: no {MANIFEST}{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, a number past Python's digit limit, nesting
        raise UserError(f"{path} is damaged: {first_line(e)}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return data


def write_manifest(out: Path, manifest: Manifest) -> None:
    atomic_write_json(out / MANIFEST, manifest.to_dict())


# ----------------------------------------------------------------------------------------------
# Writing: the directory, shards, done-markers


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def _our_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.is_file() and (p.name in (MANIFEST, STATE)
            or p.name.startswith(("shard-", ".shard-", ".manifest.json.", f"{STATE}.")))]


def prepare_output(out: Path, fingerprint: str, settings: dict, overwrite: bool, is_main: bool,
                   command: str = "precompute") -> DirLock | None:
    """Claim `out` for a cache with these settings: fresh, resumable (same fingerprint) or refused. The main
    process locks it first (one writer at a time) and returns the lock, whose `created` says whether the directory
    was made here; the others only check."""
    lock = None
    if is_main:
        created = not out.exists()
        ensure_dir(out)
        lock = DirLock(out, command).acquire()
        lock.created = created
    try:
        _claim(out, fingerprint, settings, overwrite, is_main)
    except BaseException:
        release_output(out, lock)
        raise
    return lock


def _claim(out: Path, fingerprint: str, settings: dict, overwrite: bool, is_main: bool) -> None:
    state_path = out / STATE
    entries = [p for p in out.iterdir() if not is_lock_file(p.name)] if out.is_dir() else []
    if entries:
        previous = None
        if state_path.is_file():
            try:
                previous = json.loads(state_path.read_text())
            except (OSError, ValueError):
                previous = None
        if isinstance(previous, dict) and previous.get("fingerprint") == fingerprint:
            return  # resume
        if not overwrite:
            if not isinstance(previous, dict):
                raise UserError(f"--output {out} is not empty and holds no fastdpo precompute; choose an empty "
                                "directory or pass --overwrite")
            theirs = previous.get("settings") if isinstance(previous.get("settings"), dict) else {}
            diff = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
            what = ", ".join(diff) if diff else "model, tokenizer or data contents"
            raise UserError(f"--output {out} holds a cache made with other settings (differs in: {what}); "
                            "pass --overwrite to replace it or choose another --output")
        if is_main:
            for p in _our_files(out):
                p.unlink()
    if is_main:
        atomic_write_json(state_path, {"fingerprint": fingerprint, "settings": settings})


def claim_visible(out: Path) -> bool:
    """Whether the main process's claim (`prepare_output`) is visible here: not where --output is on a filesystem
    of this node's own."""
    return (out / STATE).is_file()


def release_output(out: Path, lock: DirLock | None) -> None:
    """Undo a claim that produced nothing (the run failed before its first shard), so that it cannot block
    the retry with other settings, e.g. a fixed model; a claim with finished shards stays to be resumed. The lock
    is released either way, and a directory the claim created and left empty removed."""
    if out.is_dir() and not any(out.glob(".shard-*.done.json")):
        (out / STATE).unlink(missing_ok=True)
    if lock is not None:
        lock.release()
        if lock.created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _list_array(values: list, np_dtype, pa_type) -> pa.Array:
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v, dtype=np_dtype) for v in values]) if values else np.zeros(0, np_dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa_type.value_type))


def build_table(rows: dict, metadata: dict | None = None) -> pa.Table:
    """rows: column name -> list (one entry per row), in SCHEMA's columns. metadata: the shard's own record
    (`SHARD_META`), to which its row count and first and last row ids are added."""
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
    ids = [int(i) for i in rows["id"]]
    record = {**(metadata or {}), "rows": len(ids), "ids": [ids[0], ids[-1]] if ids else []}
    meta = {b"fastdpo": json.dumps(record, sort_keys=True).encode()}
    return pa.Table.from_arrays(arrays, schema=SCHEMA.with_metadata(meta))


# What each shard says of itself (its schema's b"fastdpo" metadata): the cache it belongs to, its place in it, its
# rows. Checked against the manifest when a cache is opened, so a shard from another cache or another place, with
# the manifest's sha256 and sizes edited to match it, is refused.
SHARD_META = ("fingerprint", "shard", "num_shards", "rows", "ids")


def shard_problem(table: pa.Table, index: int, manifest: Manifest) -> str | None:
    """What contradicts the manifest in shard `index`'s own metadata and ids, or None (older caches carry fewer
    fields: those they carry are checked)."""
    try:
        meta = json.loads(table.schema.metadata[b"fastdpo"])
        if not isinstance(meta, dict):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        return "carries no fastdpo metadata (not a shard fastdpo wrote)"
    if manifest.fingerprint and meta.get("fingerprint") != manifest.fingerprint:
        return (f"belongs to another cache: its metadata names fingerprint {str(meta.get('fingerprint'))[:12]}..., "
                f"the manifest {manifest.fingerprint[:12]}...")
    if meta.get("shard") != index:
        return f"is shard {meta.get('shard')!r} of its cache but listed as shard {index}"
    if "num_shards" in meta and meta["num_shards"] != len(manifest.shards):
        return f"belongs to a cache of {meta['num_shards']} shards; the manifest lists {len(manifest.shards)}"
    if "rows" in meta and meta["rows"] != table.num_rows:
        return f"holds {table.num_rows} rows; its metadata says {meta['rows']}"
    ids = table.column("id")
    if "ids" in meta and table.num_rows and meta["ids"] != [ids[0].as_py(), ids[-1].as_py()]:
        return f"holds rows {ids[0].as_py()}..{ids[-1].as_py()}; its metadata says {meta['ids']}"
    return None


def serialize(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=RECORD_BATCH_ROWS)
    return sink.getvalue()


def write_shard(path: str | os.PathLike, table: pa.Table) -> ShardEntry:
    """Write atomically (temporary name, fsync, rename). Returns the manifest entry."""
    buf = serialize(table)
    atomic_write_bytes(path, memoryview(buf))
    return ShardEntry(Path(path).name, table.num_rows, sha256_bytes(memoryview(buf)), buf.size)


def _marker(out: Path, index: int) -> Path:
    return out / f".{shard_name(index)}.done.json"


def write_finished_shard(out: Path, index: int, table: pa.Table, fingerprint: str) -> ShardEntry:
    """Write shard `index`, then its done-marker (its manifest entry and the run's fingerprint)."""
    entry = write_shard(out / shard_name(index), table)
    atomic_write_json(_marker(out, index), {"fingerprint": fingerprint, "entry": dataclasses.asdict(entry)})
    return entry


def finished_shard(out: Path, index: int, fingerprint: str) -> ShardEntry | None:
    """The entry of shard `index` if a run with this fingerprint finished it and it is intact, else None."""
    try:
        marker = json.loads(_marker(out, index).read_text())
        entry = ShardEntry(**marker["entry"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = out / shard_name(index)
    if marker.get("fingerprint") != fingerprint or not path.is_file() or path.stat().st_size != entry.bytes:
        return None
    return entry if sha256_file(path) == entry.sha256 else None


# ----------------------------------------------------------------------------------------------
# Reading


def read_shard(path: str | os.PathLike) -> pa.Table:
    """Memory-mapped, zero-copy: the table's buffers point into the file's pages."""
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all()


def verify_shard(cache_dir: str | os.PathLike, entry: ShardEntry | dict) -> Path:
    """Check a shard against its manifest entry (a `ShardEntry`, or the dict `precompute()` returns); a
    missing, truncated or modified shard is refused by name."""
    entry = ShardEntry(**entry) if isinstance(entry, dict) else entry
    path = Path(cache_dir) / entry.file
    if not path.is_file():
        raise UserError(f"cache shard {path} is missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise UserError(f"cache shard {path} is truncated or damaged (size {size}, manifest says {entry.bytes}); "
                        "re-run precompute into a new directory")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise UserError(f"cannot read cache shard {path}: {e.strerror}") from None
    if digest != entry.sha256:
        raise UserError(f"cache shard {path} is damaged: sha256 {digest[:12]}... does not match the manifest "
                        f"({entry.sha256[:12]}...); re-run precompute into a new directory")
    return path


class CacheSource(Source):
    """A finished cache as one row space over its memory-mapped shards (nothing loaded into RAM).

    Every shard is checked against its manifest sha256 when opened, before training starts, so a
    damaged cache fails in seconds, not hours into a run.
    """

    has_ref = True

    def __init__(self, cache_dir: str | os.PathLike, manifest: Manifest | None = None):
        import pyarrow.compute as pc

        self.dir = Path(cache_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.dir)
        listed = {e.file for e in self.manifest.shards}
        unlisted = sorted(p.name for p in self.dir.glob("shard-*.arrow") if p.name not in listed)
        if unlisted:
            raise UserError(f"{self.dir} holds shard(s) its manifest does not list ({', '.join(unlisted[:3])}"
                            f"{', ...' if len(unlisted) > 3 else ''}); the cache is inconsistent: re-run precompute "
                            "into a new directory")
        self.tables = []
        for index, entry in enumerate(self.manifest.shards):
            table = read_shard(verify_shard(self.dir, entry))
            if table.num_rows != entry.rows or table.schema.remove_metadata() != SCHEMA:
                raise UserError(f"cache shard {self.dir / entry.file} does not match the manifest (rows or columns "
                                "differ)")
            problem = shard_problem(table, index, self.manifest)
            if problem:
                raise UserError(f"cache shard {self.dir / entry.file} {problem}; the cache is inconsistent: re-run "
                                "precompute into a new directory")
            self.tables.append(table)
        ids = np.concatenate([t.column("id").to_numpy() for t in self.tables])
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise UserError(f"{self.dir}: row id {int(unique[counts > 1][0])} appears in more than one row; the cache "
                            "is inconsistent: re-run precompute into a new directory")
        self.shard_bounds = np.concatenate([[0], np.cumsum([t.num_rows for t in self.tables])]).tolist()
        self._set_lengths(*(np.concatenate([pc.list_value_length(t.column(c)).to_numpy(zero_copy_only=False)
                                            for t in self.tables]).astype(np.int64)
                            for c in ("prompt_ids", "chosen_ids", "rejected_ids")))

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


def open_cache(cache_dir: str, setup, *, policy_weights: str | None = None, is_main: bool = True) -> CacheSource:
    """Open a cache for a model: refused unless it was made with `setup`'s tokenizer; with `policy_weights`
    (a policy that should start at the reference), a note when the weights or dtype differ from the cache's,
    and a refusal when the quantization does (`quant.check_reference`)."""
    from .modeling import tokenizer_hash, weights_hash
    from .quant import check_reference, spec

    manifest = load_manifest(cache_dir)
    theirs, ours = manifest.tokenizer["sha256"], tokenizer_hash(setup.tokenizer)
    if theirs != ours:
        raise UserError(f"tokenizer mismatch: {setup.args.model} has tokenizer {ours[:12]} but the cache {cache_dir} "
                        f"was made with {manifest.model['name_or_path']}'s tokenizer {str(theirs)[:12]}; precompute "
                        "the cache with this model's tokenizer")
    if policy_weights is not None and not manifest.model.get("external"):  # every process refuses, not only main
        line = check_reference(cache_dir, manifest.settings.get("quantization"), spec(setup.args),
                               getattr(setup.args, "allow_reference_mismatch", False))
        if line and is_main:
            print(line, file=sys.stderr)
    if policy_weights is not None and is_main:
        weights = weights_hash(policy_weights, setup.args.revision)
        if weights and manifest.model.get("weights_sha256") not in (None, weights):
            print(f"warning: {policy_weights}'s weights differ from the cache's reference "
                  f"{manifest.model['name_or_path']} (fine for a policy that starts elsewhere, but usually a "
                  "mistake)", file=sys.stderr)
        ref_dtype = manifest.settings.get("resolved_dtype")
        ours_dtype = setup.precision or str(setup.dtype).replace("torch.", "")
        if ref_dtype and ref_dtype != ours_dtype:
            print(f"note: the cache was computed in {ref_dtype} and the policy runs in {ours_dtype}; a fresh "
                  "policy's margin will not start at exactly 0", file=sys.stderr)
    return CacheSource(cache_dir, manifest)


# ----------------------------------------------------------------------------------------------
# Inspecting and verifying a cache; caches built from reference log-probs computed elsewhere


def _quantiles(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    return {"min": int(x.min()), "median": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "max": int(x.max())}


def describe(cache_dir: str | os.PathLike) -> dict:
    """What `fastdpo cache info` shows, as a dict. Never raises for a damaged cache: what is wrong is listed
    under "problems" (sizes are checked; `verify` checks contents)."""
    import pyarrow.compute as pc

    cache_dir = Path(cache_dir)
    info: dict = {"cache": str(cache_dir), "problems": []}
    try:
        data = read_manifest_json(cache_dir)
    except UserError as e:
        info["problems"].append(str(e))
        return info
    problems = manifest_problems(data)
    if problems:  # every damaged or hand-edited field, by name
        info["problems"] = [f"{MANIFEST}: {p}" for p in problems]
        return info
    m = parse_manifest(data, cache_dir / MANIFEST)
    info.update(format_version=m.format_version, fastdpo_version=m.fastdpo_version, rows=m.num_rows,
                shards=len(m.shards), bytes=sum(s.bytes for s in m.shards), model=m.model, tokenizer=m.tokenizer,
                dataset={k: v for k, v in m.dataset.items() if k != "columns"}, timings=m.timings,
                settings={k: m.settings.get(k) for k in ("resolved_dtype", "resolved_device", "resolved_layout",
                                                         "max_prompt_length", "max_length", "truncation",
                                                         "logps_backend", "quantization") if k in m.settings})
    listed = {s.file for s in m.shards}
    unlisted = sorted(p.name for p in cache_dir.glob("shard-*.arrow") if p.name not in listed)
    if unlisted:
        info["problems"].append(f"shard(s) not in the manifest: {', '.join(unlisted)}")
    lengths: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for s in m.shards:
        path = cache_dir / s.file
        if not path.is_file() or path.stat().st_size != s.bytes:
            what = "missing" if not path.is_file() else "size differs from the manifest"
            info["problems"].append(f"{s.file}: {what}")
            continue
        try:
            table = read_shard(path)
        except (OSError, pa.ArrowException) as e:
            info["problems"].append(f"{s.file}: unreadable ({str(e).splitlines()[0]})")
            continue
        problem = shard_problem(table, m.shards.index(s), m)
        if problem:
            info["problems"].append(f"{s.file}: {problem}")
        for k in lengths:
            lengths[k].append(pc.list_value_length(table.column(f"{k}_ids")).to_numpy(zero_copy_only=False))
    arrays = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in lengths.items()}
    info["lengths"] = {k: _quantiles(v) for k, v in arrays.items()}
    cap_p, cap_len = m.settings.get("max_prompt_length"), m.settings.get("max_length")
    if cap_p:
        info["lengths"]["prompt"]["at_cap"] = float((arrays["prompt"] >= cap_p).mean()) if len(arrays["prompt"]) else 0
    if cap_len and len(arrays["prompt"]):
        for k in ("chosen", "rejected"):
            info["lengths"][k]["at_cap"] = float((arrays["prompt"] + arrays[k] >= cap_len).mean())
    return info


def verify(cache_dir: str | os.PathLike, model: str | None = None, *, sample: int = 64, seed: int = 0,
           device: str = "auto", batch_size: int = 8) -> dict:
    """Check a cache: the manifest, every shard's sha256 and, with `model`, that `sample` random rows
    recomputed through the scorer, dtype and layout the cache records match the stored per-token values.

    Tolerance on the largest per-token difference: 1e-4 in fp32; in 16 bits, twice the difference the
    same computation shows against fp32 on the same rows (its own rounding), at least 1e-4.
    Returns a report with `ok` and, when a row is off, the worst one. A damaged cache is a failed check.
    """
    report: dict = {"cache": str(cache_dir), "ok": False}
    try:
        manifest = load_manifest(cache_dir)
        source = CacheSource(cache_dir, manifest)
    except UserError as e:
        report["problem"] = str(e)
        return report
    report.update(rows=len(source), shards=len(manifest.shards), sha256="ok", ok=True)
    if model is not None:
        report.update(_recompute(source, manifest, model, sample, seed, device, batch_size))
    return report


def _recompute(source: CacheSource, manifest: Manifest, model: str, sample: int, seed: int, device: str,
               batch_size: int) -> dict:
    from .modeling import ModelSpec, resolve_device, resolve_dtype, tokenizer_hash
    from .quant import options
    from .scoring import prepare, score_rows

    layout = manifest.settings.get("resolved_layout") or {}
    dtype_name = manifest.settings.get("resolved_dtype") or "float32"
    args = ModelSpec(model=model, logps_backend=manifest.settings.get("logps_backend", "auto"),
                     attn_implementation=layout.get("attention"), packing=layout.get("packing", False),
                     prefix_sharing=layout.get("prefix_sharing", False), max_tokens_per_batch=layout.get("max_tokens"),
                     **options(manifest.settings.get("quantization")))  # the quantization it was made with
    dev = resolve_device(device)
    idx = np.sort(np.random.default_rng(seed).choice(len(source), min(sample, len(source)), replace=False))
    rows = source.fetch(idx, with_token_logps=True)

    def scores(dtype):
        setup = prepare(args, dev, dtype)
        if setup.layout.packing != bool(layout.get("packing")) or setup.layout.prefix_sharing != bool(
                layout.get("prefix_sharing")):
            raise UserError(f"--model {model} cannot reproduce the cache's layout ({layout}): {'; '.join(setup.notes)}")
        if tokenizer_hash(setup.tokenizer) != manifest.tokenizer["sha256"]:
            raise UserError(f"--model {model}'s tokenizer is not the one the cache was made with")
        scorer = setup.scorer(setup.load(device=dev).eval())
        c, r = score_rows(scorer, rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], batch_size,
                          setup.layout, setup.tokenizer.pad_token_id, dev)
        return [np.concatenate([a, b]) for a, b in zip(c, r)]

    dtype = resolve_dtype(dtype_name, dev)
    ours = scores(dtype)
    stored = [np.concatenate([np.asarray(a, np.float32), np.asarray(b, np.float32)])
              for a, b in zip(rows["ref_chosen_token_logps"], rows["ref_rejected_token_logps"])]
    per_row = np.array([np.abs(a - b).max() for a, b in zip(ours, stored)])
    tolerance = 1e-4
    if str(dtype) != "torch.float32":  # the rounding of this computation, measured on the same rows
        import torch

        exact = scores(torch.float32)
        tolerance = max(1e-4, 2 * max(float(np.abs(a - b).max()) for a, b in zip(ours, exact)))
    worst = int(per_row.argmax())
    return {"ok": bool(per_row.max() <= tolerance), "rows_checked": len(idx), "dtype": dtype_name,
            "max_diff": float(per_row.max()), "mean_diff": float(np.mean(np.concatenate([np.abs(a - b) for a, b in
                                                                                        zip(ours, stored)]))),
            "worst_row": int(rows["id"][worst]), "tolerance": tolerance}


def write(rows, output: str | os.PathLike, *, tokenizer, reference: str, shard_rows: int = 4096,
          overwrite: bool = False) -> Manifest:
    """Build a cache from token ids and reference log-probs computed elsewhere (another framework, an
    inference server); `fastdpo train` takes it like any cache.

    rows: an iterable of mappings with `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of token ids, the
    completions with their EOS) and `ref_chosen_token_logps`, `ref_rejected_token_logps` (one log-prob per
    completion token: token t's log-probability given everything before it); optionally `id` and the sums
    `ref_chosen_logps`, `ref_rejected_logps`. tokenizer: the tokenizer that made the ids (an object or a
    name/path): the policy must use the same one. reference: what computed the log-probs (recorded; the
    manifest marks the reference as external, so `fastdpo cache verify --model REF` is how to check it).

    Every row is checked as it is written: lengths match, ids inside the vocabulary, log-probs finite and
    <= 0, sums equal to the per-token values. A bad row is a UserError naming it.
    """
    import hashlib

    from . import __version__
    from .io import sha256_json
    from .modeling import load_tokenizer, tokenizer_hash

    if isinstance(shard_rows, bool) or not isinstance(shard_rows, numbers.Integral) or shard_rows < 1:
        raise UserError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
    shard_rows = int(shard_rows)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    vocab, tok_hash = len(tok), tokenizer_hash(tok)
    checked, content, seen = [], hashlib.sha256(), {}
    for i, r in enumerate(rows):
        checked.append(_checked_row(i, r, vocab))
        if seen.setdefault(checked[-1]["id"], i) != i:
            raise UserError(f"row {i}: id {checked[-1]['id']} is also row {seen[checked[-1]['id']]}'s; a row id names "
                            "one row")
        content.update(json.dumps(checked[-1], sort_keys=True).encode())
    if not checked:
        raise UserError("no rows to write")
    out = Path(output)
    settings = {"external_reference": reference, "shard_rows": shard_rows}
    fingerprint = sha256_json({"rows": content.hexdigest(), "tokenizer": tok_hash, "settings": settings})
    n_shards = (len(checked) + shard_rows - 1) // shard_rows
    lock = prepare_output(out, fingerprint, settings, overwrite, True, command="cache.write")
    try:
        shards = []
        for s in range(n_shards):
            part = checked[s * shard_rows:(s + 1) * shard_rows]
            columns = {k: [r[k] for r in part] for k in part[0]}
            meta = {"fingerprint": fingerprint, "shard": s, "num_shards": n_shards}
            shards.append(write_finished_shard(out, s, build_table(columns, meta), fingerprint))
        manifest = Manifest(
            format_version=FORMAT_VERSION, fastdpo_version=__version__, fingerprint=fingerprint,
            model={"name_or_path": reference, "revision": None, "weights_sha256": None, "external": True},
            tokenizer={"sha256": tok_hash, "name_or_path": getattr(tok, "name_or_path", None),
                       "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                       "eos_token_id": tok.eos_token_id},
            dataset={"name": "external", "rows_read": len(checked), "rows_written": len(checked),
                     "rows_skipped": {}},
            settings=settings, config={}, num_processes=1, shards=shards)
        write_manifest(out, manifest)
    except BaseException:  # nothing of a failed write stays to refuse the retry: it is fast to redo
        for f in _our_files(out):
            f.unlink(missing_ok=True)
        release_output(out, lock)
        raise
    lock.release()
    return manifest


def _token_ids(values, what: str, bad) -> list[int]:
    """A list of integer token ids, or `bad(...)`: a fractional, boolean or non-numeric id is refused, never
    rounded."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError) as e:
        raise bad(f"{what} is not a list of token ids ({e})") from None
    if arr.ndim != 1:
        raise bad(f"{what} must be a flat list of token ids")
    if arr.size == 0:
        return []
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64).tolist()
    wrong = next((v for v in arr.tolist() if isinstance(v, bool) or not isinstance(v, numbers.Integral)),
                 None) if arr.dtype.kind == "O" else (arr[0].item() if arr.size else None)
    if arr.dtype.kind == "O" and wrong is None:
        return [int(v) for v in arr.tolist()]
    if arr.dtype.kind == "f":  # name the first fractional one, else the first
        wrong = next((v for v in arr.tolist() if not float(v).is_integer()), arr[0].item())
    raise bad(f"{what} holds {wrong!r}: token ids are integers")


def _checked_row(i: int, row, vocab: int) -> dict:
    def bad(what):
        return UserError(f"row {i}: {what}")

    try:
        ids = {k: _token_ids(row[k], k, bad) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        logps = {k: np.asarray(row[f"ref_{k}_token_logps"], dtype=np.float32) for k in ("chosen", "rejected")}
    except KeyError as e:
        raise bad(f"missing {e.args[0]}") from None
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise bad(f"not a list of numbers ({e})") from None
    if not ids["prompt_ids"] or not ids["chosen_ids"] or not ids["rejected_ids"]:
        raise bad("prompt, chosen and rejected each need at least one token")
    for k, v in ids.items():
        if min(v) < 0 or max(v) >= vocab:
            raise bad(f"{k} holds a token id outside the tokenizer's {vocab} ids")
    row_id = row.get("id", i)
    if isinstance(row_id, bool) or not isinstance(row_id, numbers.Integral):
        raise bad(f"id {row_id!r} is not an integer")
    out = {"id": int(row_id), **ids}
    for k in ("chosen", "rejected"):
        lp = logps[k]
        if lp.ndim != 1 or len(lp) != len(ids[f"{k}_ids"]):
            raise bad(f"ref_{k}_token_logps has {lp.size} values for {len(ids[f'{k}_ids'])} {k} tokens")
        if not np.isfinite(lp).all() or (lp > 0).any():
            raise bad(f"ref_{k}_token_logps must be finite log-probabilities (<= 0)")
        total = lp.sum(dtype=np.float32)
        given = row.get(f"ref_{k}_logps")
        if given is not None and not abs(float(given) - float(total)) <= 1e-4 * max(1.0, abs(float(total))):
            raise bad(f"ref_{k}_logps {float(given):.6g} is not the sum of its per-token values ({float(total):.6g})")
        out[f"ref_{k}_logps"] = float(total)
        out[f"ref_{k}_token_logps"] = lp.tolist()
    return out
