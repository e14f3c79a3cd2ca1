"""The one exception type users see: a one-line message, exit code 2."""


class PfpcError(Exception):
    """A user mistake or an unsupported input; the CLI prints it as one line and exits with 2."""

    exit_code = 2
