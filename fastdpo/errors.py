"""User-facing errors: one line, naming the thing, exit code 2. Tracebacks are for our bugs."""


class UserError(ValueError):
    """A mistake in the user's input (flag, file, column, row). The CLI prints it on one line and exits 2.

    A ValueError, so that Python callers of `fastdpo.train(...)` who catch ValueError keep working.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class TrainingStopped(Exception):
    """A run stopped on purpose (e.g. too many non-finite steps); the message says why. Exit code 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Interrupted(TrainingStopped):
    """A command stopped by SIGTERM or SIGINT at a safe point (its work so far saved, resumable); the message says
    where. Exit code 128 + the signal's number, as a shell reports a process the signal ended: 143 for SIGTERM,
    130 for SIGINT."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
