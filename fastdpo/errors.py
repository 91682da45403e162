"""User-facing errors: one line, naming the thing, exit code 2. Tracebacks are for our bugs."""


class UserError(Exception):
    """A mistake in the user's input (flag, file, column, row). The CLI prints it on one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class TrainingStopped(Exception):
    """A run stopped on purpose (e.g. too many non-finite steps); the message says why. Exit code 1."""

    exit_code = 1
