"""What every benchmark script shares: the machine line, tables written row by row, the SIGTERM handler, the time
left, and children with a timeout.

A measurement is written the moment it exists: `Table.add` appends the row to PREFIX.csv (flushed and synced) and
rewrites PREFIX.md, so a run cut at any second keeps every finished row. `exit_on_sigterm` turns the signal that
`timeout` sends into a normal exit, so `finally` blocks run and the rows not measured are written as
`cut (budget)`; `run_child` gives every subprocess the time left and kills its whole process group when that runs
out. Standard library only (plus torch for the machine line, imported when asked).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUT = "cut (budget)"  # the status of a row its run had no time left for


def machine(device: str = "cpu") -> str:
    """The machine a result was measured on: the GPU's name, or the CPU model and core count."""
    from fastdpo.modeling import machine_name

    return machine_name(device)


def header(title: str, device: str, argv: list[str], script: str, note: str | None = None) -> list[str]:
    """The markdown lines every result starts with: machine, versions, date, load, command."""
    import torch

    kind = "GPU" if str(device).startswith("cuda") else "CPU (not a GPU result)"
    return [
        f"# {title}",
        "",
        f"- machine: {machine(device)} — {kind}",
        f"- torch {torch.__version__}, "
        + ", ".join(f"{k} {v}" for k, v in versions("triton", "transformers", "trl").items())
        + f", python {platform.python_version()}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; load average (1 min) "
        f"{os.getloadavg()[0]:.1f} at the start ({os.cpu_count()} cores)",
        f"- command: `python benchmarks/{script} {' '.join(argv)}`",
        *([f"- note: {note}"] if note else []),
        "",
    ]


def versions(*names: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def one_line(e: BaseException, n: int = 160) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()[0][:n] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def quantile(xs, q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt(x, spec: str = ".4g") -> str:
    return "" if x is None else ("n/a" if x == "n/a" else format(x, spec))


# ----------------------------------------------------------------------------------------------------------------
# time and signals
# ----------------------------------------------------------------------------------------------------------------


class Deadline:
    """The time a run may still take (`--time-limit-s`); no limit when `seconds` is None."""

    def __init__(self, seconds: float | None):
        self.end = time.monotonic() + seconds if seconds is not None else math.inf

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, reserve: float = 0.0) -> float | None:
        """A child's timeout: the time left less `reserve` (for writing what it measured), at least 1 s."""
        return None if self.end == math.inf else max(1.0, self.left() - reserve)


def unfinished_status() -> str:
    """The status of the rows a run did not reach, from inside its `finally`: `cut (budget)` after the time limit or
    SIGTERM, else "not run: " and the error that stopped it."""
    e = sys.exc_info()[1]
    if e is None or (isinstance(e, SystemExit) and e.code in (143, 124)):
        return CUT
    return f"not run: {one_line(e)}"


def exit_on_sigterm() -> None:
    """SIGTERM (what `timeout` sends) raises SystemExit(143) in the main thread: `finally` blocks run, open tables
    write their cut rows, and `run_child` kills its child. A second SIGTERM is ignored while that happens."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_child(cmd: list[str], log: Path, timeout: float | None, env: dict | None = None, cwd=None) -> int:
    """Run `cmd` with stdout and stderr appended to `log`; returns its exit status, 124 when `timeout` ran out.
    The child gets its own process group, killed whole on a timeout or when this process exits (torchrun's and
    accelerate's workers too)."""
    with open(log, "a") as f:
        f.write(f"# {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            f.write(f"\n# killed: the {timeout:.0f} s left ran out\n")
            return 124
        except BaseException:
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# tables written row by row
# ----------------------------------------------------------------------------------------------------------------


class Table:
    """Rows of one result: PREFIX.csv appended as each row exists (header first), PREFIX.md rewritten with the
    header lines, the rows so far and `footer` (atomically). `append=True` adds to an existing CSV of the same
    columns (two stages into one file). With prefix None nothing is written (rows are still kept)."""

    def __init__(
        self,
        prefix: Path | str | None,
        columns: list[str],
        head: list[str] | None = None,
        md_columns: list[str] | None = None,
        append: bool = False,
        write_md: bool = True,
    ):
        self.prefix = Path(prefix) if prefix is not None else None
        self.columns, self.md_columns = columns, md_columns or columns
        self.head, self.footer, self.rows = list(head or []), [], []
        self.write_md = write_md
        if self.prefix is not None:
            self.prefix.parent.mkdir(parents=True, exist_ok=True)
            path = self.prefix.with_suffix(".csv")
            if append and path.is_file() and path.stat().st_size:
                self.rows = read_csv(path)  # the markdown shows the earlier rows too
            else:
                with open(path, "w", newline="") as f:
                    csv.DictWriter(f, fieldnames=columns).writeheader()
            self._markdown()

    def add(self, row: dict) -> dict:
        row = {c: row.get(c, "") for c in self.columns}
        self.rows.append(row)
        if self.prefix is not None:
            with open(self.prefix.with_suffix(".csv"), "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
                f.flush()
                os.fsync(f.fileno())
            self._markdown()
        return row

    def set_footer(self, lines: list[str]) -> None:
        self.footer = list(lines)
        self._markdown()

    def markdown(self) -> str:
        return "\n".join([*self.head, *table_lines(self.rows, self.md_columns), "", *self.footer]) + "\n"

    def _markdown(self) -> None:
        if self.prefix is not None and self.write_md:
            write_atomic(self.prefix.with_suffix(".md"), self.markdown())


def table_lines(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in columns) + " |" for r in rows]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log(msg: str) -> None:
    print(msg, flush=True, file=sys.stdout)
