"""Atomic, durable writes, content hashes and local paths. A crash never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from .errors import UserError, first_line


def fsync_dir(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets you open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path, exc: OSError) -> UserError:
    """A one-line UserError for a failed write: 'cannot write PATH: no space left on device'."""
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror or str(exc))
    return UserError(f"cannot write {path}: {reason}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def writing(path, cleanup: str | os.PathLike | None = None):
    """Turn a failed write (full disk, no permission) into a one-line UserError, removing `cleanup` first.

    torch.save reports a full disk as a RuntimeError from its stream writer; that is caught too.
    """
    import shutil

    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "writ" not in str(e).lower():
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise UserError(f"cannot write {path}: {first_line(e)}") from None


def ensure_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write {path}: permission denied")
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


def is_local_path(name: str) -> bool:
    """Whether `name` can only mean a local path, never a Hub id (`org/name`): it starts with `.`, `/` or
    `~`, has more than one `/`, or ends in a data file's suffix."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.lower().endswith(DATA_SUFFIXES)
            or (os.sep != "/" and os.sep in name) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name))


def check_output_apart(out: str, inputs: dict[str, str | None]) -> None:
    """Refuse an --output that is, or lies inside, one of the local `inputs` (flag -> path) a command reads."""
    path = Path(out).resolve()
    for flag, other in inputs.items():
        if not other or not Path(other).exists():
            continue
        other_path = Path(other).resolve()
        if path == other_path or other_path in path.parents:
            where = "the same directory as" if path == other_path else "inside"
            raise UserError(f"--output {out} is {where} {flag} {other}; choose a directory of its own")
