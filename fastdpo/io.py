"""Atomic, durable writes, content hashes and local paths. A crash never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
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


_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


TORCH_WRITE_FAILED = r"PytorchStreamWriter|inline_container|file write failed|iostream error"


def failed_write(exc: BaseException) -> tuple[int | None, str] | None:
    """(errno or None, what happened) if `exc` is a failed write, else None. Besides OSError: torch.save's zip
    writer reports a full disk as a RuntimeError ("unexpected pos 576 vs 534", "file write failed", or from its C++
    stream "basic_ios::clear: iostream error"), and
    safetensors as a SafetensorError ("I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno, _REASONS.get(exc.errno, exc.strerror or str(exc))
    failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        return failed_write(next(iter(failures.values()))[0])
    text = str(exc)
    code = re.search(r"os error (\d+)", text)
    if code and type(exc).__name__ == "SafetensorError":
        n = int(code.group(1))
        return n, _REASONS.get(n, os.strerror(n))
    if isinstance(exc, RuntimeError) and re.search(TORCH_WRITE_FAILED, text):
        return None, f"torch's writer failed ({first_line(exc)})"
    return None


def write_error(path, exc: BaseException, need: int | None = None) -> UserError:
    """A one-line UserError for a failed write: 'cannot write PATH: no space left on device (1.2 MB free there,
    it needs about 3.4 MB)'. `need`: the bytes the write needed, when known."""
    code, reason = failed_write(exc) or (None, first_line(exc))
    free = free_bytes(path) if code in (None, errno.ENOSPC, errno.EDQUOT) else None
    if code is None and need is not None and free is not None and free < need:
        reason = _REASONS[errno.ENOSPC]  # torch does not say why; the numbers do
    if free is not None:
        reason += f" ({_size(free)} free there" + (f", it needs about {_size(need)})" if need else ")")
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
        raise write_error(path, e, len(data)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def writing(path, cleanup: str | os.PathLike | None = None, need=None):
    """Turn a failed write (full disk, no permission) into a one-line UserError, removing `cleanup` first.

    Failed writes are OSErrors and the libraries' own reports of them (`failed_write`); `need()`: the bytes the
    write needs, for the message (called only on failure).
    """
    try:
        yield
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if failed_write(e) is None:
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise write_error(path, e, need() if need is not None else None) from None


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


# ----------------------------------------------------------------------------------------------
# One writer per directory

LOCK = ".fastdpo.lock"  # in a directory a command writes: who holds it (JSON), while it runs


def _machine() -> dict:
    """What tells this machine and pid namespace apart: a pid means the same process only where all three match."""
    def read(path):
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def _start_time(pid: int) -> str | None:
    """The process's start time since boot (Linux /proc), to tell a live holder from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def lock_holder(directory) -> tuple[dict | None, bool]:
    """(the lock's content or None, whether its holder is certainly gone). A lock another machine (or pid
    namespace) holds is never taken for gone: from here, its process cannot be seen."""
    path = Path(directory) / LOCK
    try:
        text = path.read_text(encoding="utf-8")
        holder = json.loads(text)
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
            raise ValueError
    except FileNotFoundError:
        return None, True
    except (OSError, ValueError):  # torn (written without link()) or not ours: gone once it is a minute old
        try:
            return {"pid": None}, time.time() - path.stat().st_mtime > 60
        except OSError:
            return None, True
    here = _machine()
    if holder.get("host") != here["host"] or holder.get("pid_ns") != here["pid_ns"]:
        return holder, False
    if holder.get("boot_id") != here["boot_id"]:  # this machine restarted since
        return holder, True
    pid = holder["pid"]
    gone = not _alive(pid) or (holder.get("start") is not None and _start_time(pid) != holder["start"])
    return holder, gone


def describe_holder(directory, flag: str, holder: dict) -> str:
    if holder.get("pid") is None:
        return (f"{flag} {directory} holds a damaged lock file {Path(directory) / LOCK}; if no fastdpo command "
                "writes there, remove it")
    who = f"fastdpo {holder.get('command', '?')} (pid {holder['pid']}"
    since = f" since {holder['since']}" if holder.get("since") else ""
    if holder.get("host") == socket.gethostname() and holder.get("pid_ns") == _machine()["pid_ns"]:
        return f"{flag} {directory} is in use by {who}{since}); wait for it to end, or choose another {flag}"
    return (f"{flag} {directory} is in use by {who} on host {holder.get('host')}{since}), whose process cannot be "
            f"checked from here; if it has ended, remove {Path(directory) / LOCK}, else choose another {flag}")


class DirLock:
    """An exclusive lock on a directory: `DIR/.fastdpo.lock` names its holder (pid, host, command, start).

    Taken atomically: the content is written to a temporary file, which `os.link` puts in place only if no lock
    exists (O_EXCL semantics, which also hold on NFS); where the filesystem has no hard links, O_CREAT|O_EXCL.
    A lock whose holder is gone (same machine: the pid is dead or reused, or the machine rebooted) is taken
    over; a holder on another machine is never presumed gone. Released (removed) by its holder only.
    """

    def __init__(self, directory, command: str, flag: str = "--output"):
        self.dir, self.path, self.flag = Path(directory), Path(directory) / LOCK, flag
        self.content = {"pid": os.getpid(), "start": _start_time(os.getpid()), **_machine(), "command": command,
                        "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": os.urandom(8).hex()}
        self.held = False

    def acquire(self) -> DirLock:
        data = json.dumps(self.content).encode()
        tmp = self.dir / f"{LOCK}.{os.getpid()}.tmp"
        try:
            for _ in range(5):
                if self._create(data, tmp):
                    self.held = True
                    return self
                holder, gone = lock_holder(self.dir)
                if holder is None:
                    continue  # released meanwhile
                if not gone:
                    raise UserError(describe_holder(self.dir, self.flag, holder))
                self._break(holder)
            raise UserError(f"cannot lock {self.flag} {self.dir}: other processes keep taking it")
        except OSError as e:
            raise write_error(self.path, e) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _create(self, data: bytes, tmp: Path) -> bool:
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
        try:  # no hard links here
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _break(self, stale: dict) -> None:
        """Remove a stale lock; if another process replaced it meanwhile (its lock, not the stale one), put that
        one back (link: never over a third)."""
        aside = self.dir / f"{LOCK}.{os.getpid()}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {"pid": None}
        if moved.get("token") != stale.get("token") or moved.get("pid") != stale.get("pid"):
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text(encoding="utf-8")).get("token") == self.content["token"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def is_lock_file(name: str) -> bool:
    """The lock and its temporaries: never a user's file, never part of a run or cache."""
    return name == LOCK or name.startswith(LOCK + ".")
