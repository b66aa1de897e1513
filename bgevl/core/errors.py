"""User-facing errors: each message names the problem and the fix.

The command line prints a :class:`BgevlError` as one paragraph without a traceback and exits
non-zero; library users catch it (``InputError`` is also a ``ValueError``).
"""


class BgevlError(Exception):
    """An error whose message is meant for the user, not a bug report."""


class InputError(BgevlError, ValueError):
    """Bad input to ``Embedder.encode``: the message names the offending item."""


class CheckpointError(BgevlError):
    """A checkpoint cannot be found, downloaded or loaded."""


class ValidationFailed(BgevlError):
    """An export's parity against the PyTorch reference fell below its threshold."""
