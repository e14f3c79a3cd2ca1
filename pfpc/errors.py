"""The one exception type users see: a one-line message, exit code 2."""


class PfpcError(Exception):
    """A user mistake or an unsupported input; the CLI prints it as one line and exits with 2."""

    exit_code = 2
    #: The most recent error, so one raised inside a TVM pass (which TVM re-raises as another
    #: exception type) can be recovered by `reraise_from_tvm`.
    last = None

    def __init__(self, message):
        super().__init__(message)
        PfpcError.last = self


def reraise_from_tvm(err: Exception):
    """Re-raise the PfpcError that TVM's FFI wrapped into ``err``, if there is one."""
    last = PfpcError.last
    if last is not None and str(last) in str(err):
        raise last from None
