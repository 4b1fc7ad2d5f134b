"""The one exception type a user ever sees: a clear sentence, never a traceback."""

__all__ = ["UserError"]


class UserError(Exception):
    """A problem the user can fix (bad argument, missing file, no network, unusable data).

    The CLIs print ``str(error)`` as one line and exit with ``exit_code`` (2 by default).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
