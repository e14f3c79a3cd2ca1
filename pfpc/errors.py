"""The one exception type users see: a one-line message, exit code 2."""


class PfpcError(Exception):
    """A user mistake or an unsupported input; the CLI prints it as one line and exits with 2."""

    exit_code = 2
    #: The most recent error, so one raised inside a TVM pass (which TVM re-raises as another
    #: exception type) can be recovered by `reraise_from_tvm`.
    last = None

    def __init__(self, message):
        super().__init__(one_line(message))
        PfpcError.last = self


def one_line(text) -> str:
    """``text`` on one line: line breaks become " | ", other control characters are escaped (names
    from a model or a compiler's output may hold any character)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in " | ".join(lines))


def reraise_from_tvm(err: Exception):
    """Re-raise the PfpcError that TVM's FFI wrapped into ``err``, if there is one."""
    last = PfpcError.last
    if last is not None and str(last) in str(err):
        raise last from None
