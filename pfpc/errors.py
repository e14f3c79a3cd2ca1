"""The one exception type users see: a one-line message, exit code 2."""


class PfpcError(Exception):
    """A user mistake or an unsupported input; the CLI prints it as one line and exits with 2."""

    exit_code = 2

    def __init__(self, message):
        super().__init__(one_line(message))


def one_line(text) -> str:
    """``text`` on one line: line breaks become " | ", other control characters are escaped (names
    from a model or a compiler's output may hold any character)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in " | ".join(lines))
