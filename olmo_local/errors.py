"""The one exception type for errors a user can cause (bad path, corrupt file, unsupported config,
out of memory, context full). The CLI prints its message on one line and exits non-zero."""


class OlmoError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
