"""Getting image bytes out of an HTTP request, with limits and messages a person can act on."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

RAW_TYPES = ("image/", "application/octet-stream")
FILE_FIELD = "file"


class ApiError(Exception):
    """An HTTP error with a JSON body `{"detail": message}`; raised by request handling.

    `retry_after_s` (503s the caller should retry) adds a `Retry-After` header, in whole
    seconds as HTTP wants them, and the same number as `retry_after_s` in the body.
    """

    def __init__(self, status: int, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = None if retry_after_s is None else max(0, math.ceil(retry_after_s))

    def response_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The JSON body and the extra headers of this error."""
        if self.retry_after_s is None:
            return {"detail": self.message}, {}
        body = {"detail": self.message, "retry_after_s": self.retry_after_s}
        return body, {"Retry-After": str(self.retry_after_s)}


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its name (for messages) and raw bytes (decoded by the model side)."""

    filename: str
    data: bytes


async def read_uploads(request: Request, max_files: int) -> tuple[list[Upload], FormData | None]:
    """Images from a multipart form (field `file`, repeatable) or a raw image body.

    Returns the uploads and the form (for its other fields), or raises ApiError.
    """
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=max_files, max_fields=50)
        files = [item for item in form.getlist(FILE_FIELD) if isinstance(item, UploadFile)]
        if not files:
            fields = sorted(set(form.keys()))
            raise ApiError(
                400,
                f"no image in form field '{FILE_FIELD}' (got fields {fields}); send the image "
                f"as multipart field '{FILE_FIELD}', e.g. curl -F {FILE_FIELD}=@lesion.jpg",
            )
        uploads = [
            Upload(f.filename or f"file {i + 1}", await f.read()) for i, f in enumerate(files)
        ]
        return uploads, form
    if content_type.startswith(RAW_TYPES):
        return [Upload("body", await request.body())], None
    shown = content_type or "none"
    raise ApiError(
        415,
        f"unsupported content type {shown!r}; send multipart/form-data with the image in field "
        f"'{FILE_FIELD}', or the raw image with Content-Type image/jpeg or image/png",
    )


def check_sizes(uploads: list[Upload], max_files: int) -> None:
    """Empty images and too many files are the caller's to fix (4xx)."""
    if len(uploads) > max_files:
        raise ApiError(413, f"{len(uploads)} images in one request; the limit is {max_files}")
    empty = [u.filename for u in uploads if not u.data]
    if empty:
        raise ApiError(400, f"empty upload (0 bytes): {', '.join(empty)}; attach the image file")


class BodyTooLarge(Exception):
    """The request body passed the configured byte limit."""


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class BodyLimitMiddleware:
    """Rejects bodies over `app.state.max_body_bytes` early (Content-Length) or while streaming.

    A streamed body over the limit raises BodyTooLarge inside the endpoint, where the app's
    exception handler turns it into a 413.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], default: int):
        self.app = app
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = getattr(scope.get("app"), "state", None)
        limit = int(getattr(state, "max_body_bytes", self.default))
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, too_large_message(int(declared), limit))
            return
        received = 0

        async def limited_receive() -> MutableMapping[str, Any]:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(too_large_message(received, limit))
            return message

        await self.app(scope, limited_receive, send)


def too_large_message(size: int, limit: int) -> str:
    return (
        f"request body of {size:,} bytes is over the limit of {limit:,} bytes; "
        "send a smaller or more compressed image (JPEG)"
    )


async def _send_json(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
