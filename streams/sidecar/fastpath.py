"""Fresh cache hits answered where the request is parsed, before aiohttp builds a request.

aiohttp's server hands every parsed request to a task of the connection, which builds a
request object, runs the handler in a new task, builds a response object and serializes
its headers: about 60 µs of a cached hit's ~85 µs on the development machine, for an answer
whose bytes are the same every time. :class:`FastServer` makes connections whose
``data_received`` asks ``answer(message, peer)`` for each parsed request first; whole
response bytes go straight to the transport, ``None`` leaves the request to the ordinary
path (the proxy's handler), untouched.

Only when it is safe: the connection's handler is idle (nothing queued or in progress:
responses stay in order), the transport is not paused for writing (a client that does not
read gets aiohttp's back-pressure), and the request is an HTTP/1.1 keep-alive ``GET``
without a body. The first request the answer declines ends the fast path for that chunk of
input: it and everything after it go to the handler in order.

A client on a keep-alive connection often repeats its last request byte for byte (a
poller, a dashboard, a load generator): each connection keeps the last request head it
answered here and what it parsed to, and while its parser is between messages, bytes equal
to it are answered from that message without parsing again. Only a chunk that was one
whole bodiless head, parsed from a clean start, is kept; the same bytes parse to the same
message, so the answer is the one the parser would have led to. Bytes that differ cost one
comparison.

It uses attributes of aiohttp's ``RequestHandler`` that are not public API (checked at
import: :data:`SUPPORTED`; without them the server is plain aiohttp).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

# (parsed request, client address) -> the whole response, or None: the ordinary path
Answer = Callable[[RawRequestMessage, str | None], bytes | None]

_NEEDED = ("_waiter", "_messages", "_request_count", "_payload_parser", "_upgraded",
           "_paused", "_parser", "_buffer_paused", "_msg_queue_resume_size",
           "_resume_reading_if_drained", "_next_keepalive_close_time", "_keepalive_timeout",
           "_loop", "_close", "_force_close")
SUPPORTED = all(hasattr(RequestHandler, n) for n in _NEEDED)


MAX_REMEMBERED_BYTES = 4096  # a longer head is parsed every time (bounds what a connection keeps)


class FastRequestHandler(RequestHandler):
    """aiohttp's connection protocol with fresh hits answered in ``data_received``."""

    __slots__ = ("_answer", "_between", "_last_bytes", "_last_msg", "_peer")

    def __init__(self, manager: web.Server, *, answer: Answer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._answer = answer
        self._peer: str | None = None
        # the last request head answered here and what it parsed to
        self._last_bytes = b""
        self._last_msg: Any = None  # RawRequestMessage
        # the parser holds nothing of a message: every chunk so far was one whole
        # bodiless request head (a new connection is between messages)
        self._between = True

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or self._payload_parser is not None \
                or self._upgraded or self._paused:
            self._parse(data)  # busy (or not HTTP any more): the ordinary path
            return
        transport = self.transport
        if data == self._last_bytes and self._between and not self._messages \
                and transport is not None and not self._force_close and not self._close:
            msg = self._last_msg
            if msg is not None:
                try:
                    out = self._answer(msg, self._peer)
                except Exception:  # the ordinary path below asks again and logs
                    out = None
                if out is not None:
                    self._request_count += 1
                    transport.write(out)
                    self._next_keepalive_close_time = (self._loop.time()
                                                       + self._keepalive_timeout)
                    return
        # Hide the idle handler's waiter while parsing, so it is woken only for what is
        # left for it (it must not wake to an empty queue).
        self._waiter = None
        try:
            self._parse(data)
        finally:
            self._waiter = waiter
        messages = self._messages
        served = 0
        remember = self._between and len(messages) == 1 and len(data) <= MAX_REMEMBERED_BYTES
        while messages and transport is not None and not self._paused:
            msg, payload = messages[0]
            if payload is not EMPTY_PAYLOAD or not isinstance(msg, RawRequestMessage) \
                    or msg.should_close or msg.version != HttpVersion11 \
                    or msg.method != "GET" or msg.upgrade:
                break
            try:
                out = self._answer(msg, self._peer)
            except Exception:  # never lose a request to the fast path: the handler has it
                log.exception("fast path failed; the request goes the ordinary way")
                out = None
            if out is None:
                break
            if remember:
                self._last_bytes, self._last_msg = data, msg
            messages.popleft()
            if self._parser is not None:
                self._parser.message_consumed()
            transport.write(out)
            served += 1
        if served:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()
        if messages and not waiter.done():
            waiter.set_result(None)

    def _parse(self, data: bytes) -> None:
        """aiohttp's parsing of ``data``; notes whether the parser is left between
        messages (``data`` was one whole bodiless head, the parser was between before)."""
        if not self._between:
            super().data_received(data)
            return
        before = self._request_count
        super().data_received(data)
        messages = self._messages
        if self._request_count != before + 1 or not messages \
                or data.find(b"\r\n\r\n") != len(data) - 4:
            self._between = False
            return
        msg, payload = messages[-1]
        self._between = payload is EMPTY_PAYLOAD and isinstance(msg, RawRequestMessage) \
            and not msg.upgrade


class FastServer(web.Server):
    """``web.Server`` whose connections try ``answer`` first (see the module docstring)."""

    def __init__(self, handler: Any, answer: Answer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.answer = answer

    def __call__(self) -> RequestHandler:
        return FastRequestHandler(self, answer=self.answer, loop=self._loop, **self._kwargs)


# never copied from a stored response into the prebuilt head: set per answer, or framing
_NOT_IN_HEAD = frozenset({"age", "x-cache", "content-length", "transfer-encoding",
                          "connection", "keep-alive"})


def response_head(status: int, headers: Iterable[tuple[str, str]], length: int,
                  x_cache: str | None) -> bytes | None:
    """The status line and header lines of a stored response as aiohttp would send them
    (its ``Content-Type`` and ``Server`` when the origin sent none, ``X-Cache``,
    ``Content-Length``), all but
    ``Age`` and the blank line: what a fresh hit sends before ``Age``. None when aiohttp
    would add something that changes per answer (no ``Date`` from the origin: the current
    one) or a value cannot go on the wire as it is.

    >>> head = response_head(200, [("Date", "Thu, 03 Dec 2026 13:00:00 GMT"), ("Age", "3")],
    ...                      5, "HIT")
    >>> head.startswith(b"HTTP/1.1 200 OK\\r\\nDate: Thu, 03 Dec 2026 13:00:00 GMT\\r\\n")
    True
    >>> head.endswith(b"X-Cache: HIT\\r\\nContent-Length: 5\\r\\n"), b"Age" in head
    (True, False)
    >>> b"Content-Type: application/octet-stream\\r\\n" in head  # none from the origin
    True
    >>> response_head(200, [("Server", "x")], 5, None) is None  # no Date: aiohttp adds one
    True
    """
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        return None
    lines = [f"HTTP/1.1 {status} {reason}"]
    names = set()
    for k, v in headers:
        lk = k.lower()
        if lk in _NOT_IN_HEAD:
            continue
        if "\r" in v or "\n" in v or "\r" in k or "\n" in k or ":" in k:
            return None
        lines.append(f"{k}: {v}")
        names.add(lk)
    if "date" not in names:
        return None
    if "content-type" not in names and length:
        lines.append("Content-Type: application/octet-stream")  # as aiohttp says then
    if "server" not in names:
        lines.append(f"Server: {SERVER_SOFTWARE}")
    if x_cache:
        lines.append(f"X-Cache: {x_cache}")
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
