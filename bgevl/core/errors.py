"""User-facing errors: each message names the problem and the fix.

The command line prints a :class:`BgevlError` as one paragraph without a traceback and exits
non-zero; library users catch it (``InputError`` is also a ``ValueError``).
"""


class BgevlError(Exception):
    """An error whose message is meant for the user, not a bug report."""


class InputError(BgevlError, ValueError):
    """Bad input to ``Embedder.encode``: the message names the offending item.

    ``field`` ("images", "text", "instruction", "role") and ``index`` (the item's position in the caller's
    list; None for a field of the whole request) say which, and ``reason`` is the message without the item's
    name, so that a caller names the item its own way (the API's ``input[3].image``, the corpus's item id)
    without reading the message."""

    def __init__(self, message: str, *, field: str | None = None, index: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.field, self.index = field, index
        self.reason = message if reason is None else reason

    @classmethod
    def of_item(cls, field: str, index: int | None, reason: str, detail: str = "") -> "InputError":
        """``<field>[<index>] <detail>: <reason>`` (``<field>: <reason>`` for a request-wide field)."""
        where = field if index is None else f"{field}[{index}]"
        return cls(f"{where}{' ' + detail if detail else ''}: {reason}", field=field, index=index, reason=reason)


class Cancelled(BgevlError):
    """Work stopped because its caller no longer wants it (a request that timed out, a client gone)."""


class CheckpointError(BgevlError):
    """A checkpoint cannot be found, downloaded or loaded."""


class ValidationFailed(BgevlError):
    """An export's parity against the PyTorch reference fell below its threshold."""
