"""The one exception type that means "the user asked for something we cannot do".

Library code raises :class:`UsageError` with a one-line message that names the problem
and, where there is one, the fix. The CLI prints it without a traceback and exits
non-zero; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A user mistake or missing resource, explained in one line."""

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)
