"""Writers: every byte of an answer leaves through a ResponseWriter (plain, chunked, SSE, paced)."""

import time

from .base import DPMOCK, Reply, COMPACT_JSON, COMPACT_JSON_PARTS, SPACED_JSON, SPACED_JSON_PARTS, scenarios
from .faults import NO_FAULT, ORDINARY
from .providers import PROVIDERS
from .request import Answered


def encode_body(body, compact=False):
    """Bytes for a reply body: JSON for dicts and lists, UTF-8 for text."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return (COMPACT_JSON if compact else SPACED_JSON)(body).encode("utf-8")


class ResponseWriter:
    """One request's answer on one connection: its head, its body or stream, and its fault.

    A whole answer is one write (head and body together; TCP_NODELAY is on), a stream item is
    one write (one chunk), so nothing waits on Nagle or a delayed ACK. Faults act through the
    hooks this calls (FaultKind); handlers only say what to send.
    """

    __slots__ = ("conn", "server", "req", "fault", "sent", "status", "events", "headers_sent", "chunked",
                 "extra_headers", "json_array", "entry", "ended", "request_id", "stream_error", "framer")

    def __init__(self, conn, req):
        self.conn = conn  #: the MockHandler: the socket, its files, and the connection's state
        self.server = conn.server
        self.req = req
        self.fault = NO_FAULT  #: (FaultKind, params) this answer carries out
        self.sent = 0  #: response bytes written
        self.status = 0
        self.events = 0  #: stream items sent
        self.headers_sent = False
        self.chunked = True  #: a stream's body is chunked (not for HTTP/1.0 clients)
        self.extra_headers = ()  #: the provider's headers on every answer (request id...)
        self.json_array = False  #: the stream is a JSON array (Gemini without alt=sse), not SSE
        self.entry = None  #: this request's journal entry, once it has one
        self.ended = None  #: how the answer ended, when not simply
        self.request_id = None
        self.stream_error = None  #: ``f(writer)`` -> this stream's own error event, when not the provider's
        self.framer = None  #: frames a binary stream's items (Bedrock's event stream), set when it starts

    # ---------------------------------------------------------------- the lowest level

    def put(self, data):
        """Write bytes as they are (no fault applies)."""
        if data:
            self.conn.sendall(data)
            self.sent += len(data)

    def write(self, data):
        """The one place answer bytes leave; faults counted in bytes act here."""
        if not self.fault[0].write(self, data, self.fault[1]):
            self.put(data)

    def pause(self, seconds):
        """A deliberate wait: cut short by a stop, or when the client leaves."""
        self.conn.pause(seconds)

    def stall(self, ms):
        """Send nothing more for ``ms``, then end the connection with a FIN."""
        self.pause(ms / 1000.0)
        self.abort("fin")

    def abort(self, how):
        """End the connection now, by FIN or by TCP reset, and stop handling this request."""
        self.ended = how
        self.conn.journal_entry(self)
        self.note_end()
        self.conn.close_connection = True
        if how == "reset":
            self.conn.reset()
        raise Answered(how)

    def half_close(self):
        """Shut the sending side (FIN) and keep reading until the client closes (bounded), then stop."""
        self.ended = "half_close"
        self.note_end()
        self.conn.close_connection = True
        self.conn.shutdown_write(scenarios.MAX_WAIT_S)
        raise Answered("half_close")

    def linger(self):
        """After answering an unread upload: stop writing, drain for a bounded time, then close.

        Closing with unread data queued makes the kernel send a reset, which can destroy the
        answer before the client reads it; a lingering close lets the client see it.
        """
        self.conn.close_connection = True
        self.conn.shutdown_write(LINGER_SECONDS)

    # ---------------------------------------------------------------- heads

    def head(self, status, headers, close):
        """The status line and headers, through http.server's buffering (send_response_only,
        send_header, end_headers), returned as bytes so they leave with the body."""
        conn = self.conn
        self.status = status
        self.headers_sent = True
        if self.entry is not None:
            self.entry.status = status  # a client holding its answer finds it in the journal
        conn.send_response_only(status)
        conn.send_header("Date", conn.date_time_string())
        conn.send_header("Server", conn.server_version)
        for k, v in headers:
            conn.send_header(k, v)
        for k, v in self.extra_headers:
            conn.send_header(k, v)
        if close or conn.close_connection or self.server.stopping or self.req is None or self.req.close_after:
            conn.close_connection = True
            conn.send_header("Connection", "close")
        elif self.req.version == "HTTP/1.0":
            conn.send_header("Connection", "keep-alive")
        conn.end_headers()
        return conn.take_head()

    @staticmethod
    def whole_headers(ctype, length, headers):
        return [("Content-Type", ctype), ("Content-Length", str(length))] + list(headers)

    # ---------------------------------------------------------------- whole answers

    def send_bytes(self, status, body, ctype, headers=(), close=False):
        """Send a whole answer in one write (head and body together), unless its fault breaks it."""
        fault, p = self.fault
        if not fault.reply(self, status, body, ctype, headers, close, p):
            self.send_whole(status, body, ctype, headers, close)

    def send_whole(self, status, body, ctype, headers=(), close=False):
        head = self.head(status, self.whole_headers(ctype, len(body), headers), close)
        data = head if self.req is not None and self.req.method == "HEAD" else head + body
        self.note_end(len(data))
        self.write(data)

    def note_end(self, pending=0):
        """The answer's last bytes (or its end) are next: the journal says so before the client can
        see them, so a client holding its answer always finds it there, complete."""
        e = self.entry
        if e is not None:
            req = self.req
            e.body, e.body_bytes = bytes(req.captured), req.body_bytes
            e.status, e.bytes_sent = self.status or None, self.sent + pending
            e.duration_ms = (time.monotonic() - req.t0) * 1000
            e.ended = self.ended or ("closed" if self.conn.close_connection else "ok")
            e.rule, e.scenario, e.source = req.rule, req.scenario, req.source
            e.miss, e.warning = req.miss, req.warning

    def send_json(self, status, obj, headers=(), close=False):
        """A JSON answer, compact as the providers send it."""
        self.send_bytes(status, encode_body(obj, compact=True), scenarios.JSON, headers, close)

    def send_reply(self, reply, close=False):
        self.send_bytes(reply.status, encode_body(reply.body), reply.content_type, reply.headers, close)

    def error_reply(self, err):
        """An HTTPError as a Reply in the request's provider shape (with its request id)."""
        provider = PROVIDERS[(self.req.voice or self.req.provider or DPMOCK) if self.req is not None else DPMOCK]
        return Reply(err.status, provider.error_body(err, self.request_id), scenarios.JSON,
                     tuple(err.headers) + tuple(provider.error_headers(err)))

    def send_error_reply(self, err, close=False):
        reply = self.error_reply(err)
        self.send_json(reply.status, reply.body, reply.headers, close=close or err.close)

    # ---------------------------------------------------------------- streams

    def start_stream(self, status, ctype, headers=(), close=False, raw=False):
        """The head of a streamed answer: chunked on HTTP/1.1, raw until the close on HTTP/1.0.

        A route whose stream is binary (``route.framing``) gets its framer here: its items, SSE events
        to the handler, leave framed as that route's clients read them, with its content type. A ``raw``
        body (relayed from upstream by --record, a whole answer a fault sends chunked) goes as it came."""
        fault, p = self.fault
        close = fault.stream_head(self, p) or close
        self.chunked = self.req is None or self.req.version != "HTTP/1.0"
        framing = self.req.route.framing if self.req is not None and self.req.route is not None else None
        if framing is not None and self.framer is None and not raw:
            self.framer = framing(self.req)
        if self.framer is not None:
            given = {k.lower() for k, _ in headers}
            ctype = self.framer.content_type
            headers = list(headers) + [kv for kv in self.framer.headers if kv[0].lower() not in given]
        hdrs = [("Content-Type", ctype), ("Cache-Control", "no-cache")]
        if self.chunked:
            hdrs.insert(1, ("Transfer-Encoding", "chunked"))
        hdrs.extend(headers)
        self.write(self.head(status, hdrs, close or not self.chunked))
        fault.after_head(self, p)

    def is_sse(self):
        """Whether the stream is SSE text (not a JSON array, not a binary framing): SSE-only faults ask."""
        return not self.json_array and self.framer is None

    def send_chunk(self, data):
        """One piece of a streamed body (a chunk when chunked), in one write: each event leaves at once."""
        if data and not self.fault[0].chunk(self, data, self.fault[1]):
            self.frame_chunk(data)

    def frame_chunk(self, data):
        if data:
            self.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def end_stream(self):
        fault, p = self.fault
        fault.end(self, p)
        if self.chunked:
            self.note_end(5)
            self.write(b"0\r\n\r\n")

    def send_sse_event(self, data, event=None, sep="\n\n", compact=True):
        """One SSE event (``data: `` + one line of JSON, optional ``event:``) as one chunk."""
        parts = COMPACT_JSON_PARTS if compact else SPACED_JSON_PARTS
        payload = data if isinstance(data, str) else "".join(parts(data, 0))
        if self.fault[0] is ORDINARY:  # the common case: framed here and written at once
            self.ordinary_item(self.framer.frame(event, payload) if self.framer is not None else
                               ("event: %s\ndata: %s%s" % (event, payload, sep) if event else
                                "data: %s%s" % (payload, sep)).encode("utf-8"))
            return
        self.stream_item(payload, event, sep)

    def stream_item(self, payload, event=None, sep="\n\n", index=None):
        """One item of a stream: an SSE event, or (``index`` set) an element of a JSON array; a framed
        stream's item is its payload until it is framed (after the faults that reshape it)."""
        if index is not None:
            self.json_array = True
            text = ("[" if index == 0 else ",\r\n") + payload
        elif event:
            text = "event: %s\ndata: %s%s" % (event, payload, sep)
        else:
            text = "data: %s%s" % (payload, sep)
        self.stream_text(text, payload, event)

    def stream_text(self, text, payload, event=None):
        """One stream item already framed (an SSE event, a JSON array element, a recorded event):
        the faults that count items or reshape them see it as one item (a framed stream's: its payload,
        framed after them)."""
        fault, p = self.fault
        if self.framer is not None:
            text = payload
        if fault is ORDINARY:  # the common case, in one write without the hooks' calls
            self.ordinary_item(self.framer.frame(event, text) if self.framer is not None else text.encode("utf-8"))
            return
        text = fault.item(self, self.events, text, payload, event, p)
        if text is None:
            return
        self.events += 1
        self.send_chunk(self.framer.frame(event, text) if self.framer is not None else text.encode("utf-8"))

    def ordinary_item(self, data):
        """One stream item no fault touches: counted, framed as a chunk (when chunked), one write."""
        self.events += 1
        self.put(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def send_stream_error(self):
        """The provider's own in-stream error, then the end of the stream (the connection closes)."""
        if self.framer is not None:
            self.send_framed_end(self.framer.error())
        text = self.stream_error(self) if self.stream_error else PROVIDERS[self.req.provider].stream_error()
        if self.json_array:
            text = "%s%s]" % ("[" if self.events == 0 else ",\r\n", text)
        elif not text.startswith(("data:", "event:")):
            text = "data: %s\r\n\r\n" % text
        self.send_framed_end(text.encode("utf-8"))

    def send_framed_end(self, raw):
        """A stream's error item and its end, in one write; the connection closes after it."""
        self.conn.close_connection = True
        self.ended = "stream_error"
        self.note_end(len(raw))
        self.put(b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw) if self.chunked else raw)
        raise Answered("stream_error")

    def send_stream(self, stream):
        """Send a scenario Stream: headers, each event flushed on its own, an optional broken tail."""
        self.start_stream(200, stream.content_type, close=stream.close)
        for ev in stream.events:
            self.send_sse_event(ev.data, ev.event, compact=False)  # the Flask mock's spacing
        if stream.pause_ms:
            self.pause(stream.pause_ms / 1000.0)
        if stream.tail:
            self.send_chunk(stream.tail.encode("utf-8"))
        self.end_stream()

LINGER_SECONDS = 2.0  #: how long an unread upload is drained after its answer before closing
