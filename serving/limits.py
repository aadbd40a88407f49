"""The server's limits: the request size (an ASGI middleware that refuses a body over its limit
with a 413 before the body is read, so an oversized upload costs the server neither the memory
nor the time), and the rate at which one client may send corrections."""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import error


class BodyLimit:
    """ASGI middleware: 413 for a body over its limit, before the body is read.

    A declared Content-Length over the limit is refused at once; a body without one (chunked) is
    counted as it streams and refused when it passes the limit. Uploads (``upload_paths``) and
    JSON bodies have their own limits.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        max_upload_bytes: int,
        upload_paths: frozenset[str],
    ) -> None:
        self.app, self.max_body, self.max_upload = app, max_body_bytes, max_upload_bytes
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, counting its body when no Content-Length declares it."""
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        upload = scope["path"] in self.upload_paths
        limit, field = (self.max_upload, "file") if upload else (self.max_body, "body")
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                return await self._refuse(send, field, int(declared), limit)
            # The HTTP parser delivers exactly the declared length, no more: nothing to count.
            return await self.app(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(field, seen, limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except TooLarge:  # raised where no handler turned it into a response
            if not started:
                await self._refuse(send, field, seen, limit)

    @staticmethod
    async def _refuse(send: Send, field: str, size: int, limit: int) -> None:
        response = error(413, field, TooLarge(field, size, limit).detail)
        await response({"type": "http"}, None, send)


class TooLarge(HTTPException):
    """A streamed body passed its limit (an HTTPException, so FastAPI's body parsing re-raises it
    as it is instead of turning it into a 400)."""

    def __init__(self, field: str, size: int, limit: int):
        super().__init__(413, f"is {size:,} bytes or more; the limit is {limit:,} bytes")
        self.field = field


class RateLimit:
    """At most ``per_minute`` events per key in any 60 seconds (a sliding window per client).

    The table of keys is bounded: past ``max_keys`` clients the one seen longest ago is forgotten,
    so a flood of addresses cannot grow the server's memory.
    """

    def __init__(self, per_minute: int, max_keys: int = 10_000, clock=time.monotonic) -> None:
        self.per_minute, self.max_keys, self.clock = per_minute, max_keys, clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def allow(self, key: str) -> float | None:
        """Count one event for ``key``; None if allowed, else the seconds until it would be."""
        now = self.clock()
        times = self._seen.pop(key, None) or deque()
        while times and now - times[0] >= 60:
            times.popleft()
        self._seen[key] = times  # most recently seen last
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        if len(times) >= self.per_minute:
            return 60 - (now - times[0])
        times.append(now)
        return None
