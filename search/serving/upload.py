"""A request body read into memory under a byte cap, and the image taken out of it.

The cap is enforced before the body is read: a ``Content-Length`` over it is refused at once, and
a body without one (chunked) is counted as it streams and refused the moment it passes the cap.
A ``multipart/form-data`` body is parsed in memory (python-multipart's streaming parser, no
spooled temporary files) and its one file taken, whatever its field's name (``image`` as the
page and the README send it, ``file`` as Flask and FastAPI examples do); any other body is the
image itself. Nothing here touches a file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from search.serving.budget import BodyHold
from search.serving.images import BadImage

__all__ = ["COPIES", "FIELD", "image_bytes", "read_capped"]

FIELD = "image"
"""The multipart field the page and the README send the image in."""
_NAMED = (FIELD, "file")
COPIES = 2
"""Copies of a body in memory at its peak: its chunks and their join, or a form and the image copied out of it."""
"""Fields taken as the image even when the client sends them without a filename (``curl -F image=<photo.jpg``)."""


async def read_capped(
    declared: str | None, stream: AsyncIterator[bytes], limit: int, hold: BodyHold | None = None
) -> bytes:
    """The body, or :class:`BadImage` 413 once it is known to be over ``limit`` bytes (400 for a bad length).

    ``declared`` is the request's Content-Length header, if it has one. With ``hold``, the memory the
    body will take is reserved from the server's upload budget before it is read, twice its size
    (:data:`COPIES`): the declared length at once, a chunked body chunk by chunk;
    :class:`~search.serving.budget.NoRoom` when the budget is spent.
    """
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadImage(400, f"Content-Length {declared[:40]!r} is not a number") from None
        if length > limit:
            raise BadImage(413, _too_large(limit, f" {length / 1e6:.1f} MB,"))
        if hold is not None:
            hold.grow(max(length, 0) * COPIES)
    chunks: list[bytes] = []
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise BadImage(413, _too_large(limit, ""))
        if hold is not None and total * COPIES > hold.held:  # a chunked body
            hold.grow(total * COPIES - hold.held)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, got: str) -> str:
    return (
        f"the upload is{got} over the limit of {limit / 1e6:.1f} MB; send a smaller image "
        "(or start serve with a larger --max-upload-mb)"
    )


def image_bytes(content_type: str, body: bytes) -> bytes:
    """The image in ``body``: its multipart field :data:`FIELD`, or the whole body."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        return body
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadImage(400, "the multipart body has no boundary in its Content-Type; let the client set it")
    parts = _parse_multipart(body, boundary)
    files = [
        (name, data)
        for name, data, filename in parts
        if name in _NAMED or (filename is not None and (filename or data))  # "" and no bytes: no file chosen
    ]
    if len(files) == 1:
        return files[0][1]
    named = ", ".join(repr(name) for name, _, _ in parts) or "none"
    if not files:
        raise BadImage(
            400, f"the form has no file (fields sent: {named}); send the image as a file, -F {FIELD}=@photo.jpg"
        )
    raise BadImage(400, f"the form has {len(files)} files (fields sent: {named}); send one image per request")


class _Parts:
    """python-multipart's callbacks, collecting each part's headers and bytes."""

    def __init__(self) -> None:
        self.found: list[tuple[str, bytes, str | None]] = []
        """Each part: its field name, its bytes, and its filename (None when it is not a file)."""
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._data: list[memoryview] = []

    def on_part_begin(self) -> None:
        self._headers, self._data = {}, []

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(memoryview(data)[start:end])  # a view of the body: the part is copied once, when joined

    def on_part_end(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        shown = None if filename is None else filename.decode("utf-8", "replace")
        self.found.append((name, b"".join(self._data), shown))


def _parse_multipart(body: bytes, boundary: bytes) -> list[tuple[str, bytes, str | None]]:
    """Each part's field name, bytes and filename, parsed in memory."""
    parts = _Parts()
    names = ("on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end")
    parser = MultipartParser(boundary, {name: getattr(parts, name) for name in names})  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadImage(400, f"the multipart body is malformed ({str(exc)[:120]}); let the client encode it") from None
    if parser.state not in (MultipartState.END, MultipartState.END_BOUNDARY):
        raise BadImage(400, "the multipart body is malformed: it ends before its closing boundary; send all of it")
    return parts.found
