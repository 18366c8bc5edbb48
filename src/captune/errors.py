"""The one exception type captune raises for problems the user can fix."""


class CaptuneError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code`.

    The message should say what went wrong, where (file, line, option) and how to fix it.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
