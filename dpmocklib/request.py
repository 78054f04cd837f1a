"""Requests: the request line, the header section, body framing and body pieces."""

import re
import time

from .base import HTTPError, scenarios
from .routing import parse_query


MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 65536
MAX_HEADERS = 100
MAX_JSON_BODY = 32 * scenarios.MIB  #: larger JSON bodies get 413 unread
MAX_DISCARD = 64 * 1024  #: unwanted bodies up to this are drained; larger ones close the connection
MAX_FIELD = 64 * 1024  #: a non-file multipart field or upload metadata body kept in memory
MAX_FORM_BYTES = 1024 * 1024  #: all the non-file fields of one multipart body, kept in memory
MAX_PARTS = 1000  #: parts (fields and files) in one multipart body
PIECE = 65536  #: request bodies are read in pieces of this size
JOURNAL_BODY = 16384  #: request body bytes kept in each journal entry


class ClientGone(Exception):
    """The client closed the connection before sending what it announced."""


class Headers:
    """Request headers in arrival order with case-insensitive lookup (first value wins)."""

    __slots__ = ("items", "_map", "_repeated")

    def __init__(self, items):
        self.items = items
        self._map = {}
        self._repeated = False  #: some name came more than once
        for k, v in items:
            k = k.lower()
            if k in self._map:
                self._repeated = True
            else:
                self._map[k] = v

    def get(self, name, default=None):
        return self._map.get(name, default)

    def all(self, name):
        """Every value of a header (lower-case ``name``), in order."""
        if not self._repeated:
            return [self._map[name]] if name in self._map else []
        return [v for k, v in self.items if k.lower() == name]

    def __contains__(self, name):
        return name in self._map


class Request:
    """One parsed request; attributes are filled in as dispatch learns them."""

    __slots__ = ("method", "target", "version", "path", "query_string", "query", "headers", "route", "params",
                 "provider", "length", "chunked", "json", "body_done", "captured", "body_bytes", "scenario", "t0",
                 "scheme", "reader", "close_after", "key", "test", "turn", "answer", "rule", "server", "source",
                 "miss", "warning", "voice")

    def __init__(self, method, target, version, headers, reader=None):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        if target.startswith(("http://", "https://")):  # absolute form, as sent to a proxy
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = target.partition("#")[0].partition("?")
        self.path = path or "/"
        self.query_string = query
        self.query = parse_query(query) if query else {}
        self.route, self.params, self.provider = None, {}, None
        self.voice = None  #: whose keys, error shapes and headers the answer has: the route's platform, else provider
        self.length, self.chunked = None, False
        self.json, self.body_done = None, False
        self.captured, self.body_bytes = bytearray(), 0  #: the body's first JOURNAL_BODY bytes, its size
        self.scenario = None
        self.t0 = time.monotonic()
        self.scheme = "http"
        self.reader = reader
        self.close_after = False  #: the connection must close after this answer (its framing said so)
        self.key = False  #: the API key once looked up (request_key), None when there is none
        self.test = None  #: the test namespace (X-DP-Test-Id, or a /_t/NAME/ path prefix)
        self.turn = None  #: the conversation, once a route's reader has read it
        self.answer = None  #: a matching rule's answer
        self.rule = None  #: the id of the rule that answered (or why none did, in strict mode)
        self.miss = None  #: (rule book, RuleContext) when rules exist and none answered: the journal says why
        self.warning = None  #: what was wrong with the answer served (a rule's tool call that does not fit)
        self.server = None  #: the MockServer answering it (its stores: files, threads...)
        self.source = None  #: who answered, for the journal: rule, replayed, recorded, upstream (None: dpmock)

    def arg(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default

    def has_body(self):
        return self.chunked or (self.length or 0) > 0

    def body_pieces(self, limit=None):
        """The body in pieces of at most PIECE bytes; ``limit``: 413 once more would arrive."""
        return self.reader.pieces(self, limit)

    def drain(self):
        for _ in self.body_pieces():
            pass

    def origin(self):
        """scheme://host[:port] as the client addressed this server (for URLs it will follow)."""
        return "%s://%s" % (self.scheme, self.headers.get("host") or "127.0.0.1")


#: Bytes that may not appear in a header value (RFC 9110 5.5: CTLs other than HTAB, and DEL).
CTL_BYTES = bytes(c for c in range(32) if c != 9) + b"\x7f"
TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
#: What a Host header may hold (RFC 3986 host and port: reg-name, IP literals, percent-encoding).
_HOST_CHARS = frozenset("-._~:[]%!$&'()*+,;=0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


_FIELD = r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00-\x1f\x7f]|\t)*?)[ \t]*\r?\n"
compiled_cache = {}


def _field_re():
    """The matcher of a valid header line (compiled on first use, not at start-up)."""
    m = compiled_cache.get("field")
    if m is None:
        m = compiled_cache["field"] = re.compile(_FIELD).fullmatch
    return m


def _fields_re():
    """Every valid CRLF header line of a section, each one whole (compiled on first use)."""
    m = compiled_cache.get("fields")
    if m is None:
        m = compiled_cache["fields"] = re.compile("(?m)^" + _FIELD.replace(r"\r?\n", r"\r\n")).findall
    return m


class RequestReader:
    """Reads requests from a binary file object (a socket's, or a BytesIO in tests)."""

    def __init__(self, rfile):
        self.rfile = rfile

    def request_line(self):
        """The next request line (b"" at EOF); one stray empty line before it is skipped (RFC 9112 2.2)."""
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if line in (b"\r\n", b"\n"):
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        return line

    def head(self, line):
        """Parse a request line and the header section into a Request; HTTPError when malformed."""
        method, target, version = self._parse_line(line)
        items = self._header_lines()
        req = Request(method, target, version, Headers(items), self)
        self._check_host(req)
        self._framing(req)
        return req

    @staticmethod
    def _parse_line(line):
        if len(line) > MAX_REQUEST_LINE:
            raise HTTPError(414, "request line longer than %d bytes" % MAX_REQUEST_LINE, "uri_too_long", close=True)
        if not line.endswith(b"\n"):
            raise ClientGone("request line cut off")
        text = line.decode("latin-1").rstrip("\r\n")
        parts = text.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise HTTPError(400, "malformed request line (%d bytes); expected METHOD TARGET HTTP/1.1" % len(text),
                            "bad_request_line", close=True)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            if len(version) == 8 and version[5].isdigit() and version[6] == "." and version[7].isdigit():
                raise HTTPError(505, "HTTP version %s is not supported; use HTTP/1.1" % version,
                                "http_version_not_supported", close=True)
            raise HTTPError(400, "malformed HTTP version; use HTTP/1.1", "bad_request_line", close=True)
        if not method.isalpha() or not method.isupper() or not method.isascii():
            raise HTTPError(400, "malformed method %r" % method[:20], "bad_request_line", close=True)
        if not target or not target.isascii() or not target.isprintable():
            raise HTTPError(400, "malformed request target: it must be printable ASCII without spaces",
                            "bad_request_line", close=True)
        return method, target, version

    def _header_lines(self):
        """The header section's (name, value) pairs; the whole section at once when it is buffered."""
        buf = self.rfile.peek(MAX_HEADER_BYTES)
        end = buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
        if end > 0 and buf[:2] != b"\r\n":
            block = buf[:end + 2].decode("latin-1")
            items = _fields_re()(block)
            if len(items) == block.count("\r\n") and len(items) <= MAX_HEADERS:
                self.rfile.read(end + 4)  # every line was a valid field: consume the section
                return items
        return self._header_lines_one_by_one()

    def _header_lines_one_by_one(self):
        """Line by line: a section that is not buffered whole, uses bare LF, or has a bad line."""
        items, total = [], 0
        field = _field_re()
        while True:
            hline = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(hline)
            if total > MAX_HEADER_BYTES or len(items) >= MAX_HEADERS:
                raise HTTPError(431, "request header section over %d bytes or %d fields"
                                % (MAX_HEADER_BYTES, MAX_HEADERS), "headers_too_large", close=True)
            m = field(hline.decode("latin-1"))
            if m is not None:
                items.append(m.groups())
                continue
            if hline in (b"\r\n", b"\n"):
                return items
            self._bad_header_line(hline, len(items) + 1)

    @staticmethod
    def _bad_header_line(hline, number):
        """Why a header line was refused (the line itself is never quoted: it may hold a key)."""
        if not hline.endswith(b"\n"):
            raise ClientGone("header section cut off")
        if hline[:1] in (b" ", b"\t"):
            raise HTTPError(400, "obsolete header line folding is not accepted", "bad_header", close=True)
        name, sep, value = hline.partition(b":")
        if sep and name and TOKEN_CHARS.issuperset(name):
            raise HTTPError(400, "header %s holds a control character (CR, LF, NUL...)" % name.decode("latin-1"),
                            "bad_header", close=True)
        raise HTTPError(400, "malformed header line %d: expected NAME: VALUE with a token name" % number,
                        "bad_header", close=True)

    @staticmethod
    def _check_host(req):
        hosts = req.headers.all("host")
        if req.version == "HTTP/1.1" and len(hosts) != 1:
            raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header, not %d" % len(hosts),
                            "bad_host", close=True)
        if hosts and not _HOST_CHARS.issuperset(hosts[0]):
            raise HTTPError(400, "malformed Host header", "bad_host", close=True)

    @staticmethod
    def _framing(req):
        """Work out how the body is framed; bad framing closes the connection."""
        h = req.headers
        conn = (h.get("connection") or "").lower()
        if req.version == "HTTP/1.0":
            req.close_after = "keep-alive" not in conn
        elif "close" in conn:
            req.close_after = True
        te = h.all("transfer-encoding")
        if te:
            te = ",".join(te)
            if te.lower().replace(" ", "").replace("\t", "") != "chunked":
                raise HTTPError(501, "Transfer-Encoding %r is not supported; use chunked" % te[:40],
                                "unsupported_transfer_encoding", close=True)
            if "content-length" in h:
                raise HTTPError(400, "both Content-Length and Transfer-Encoding were sent", "bad_framing",
                                close=True)
            req.chunked = True
            if req.version == "HTTP/1.0":  # RFC 9112 6.1: faulty framing; answer, then close
                req.close_after = True
            return
        values = h.all("content-length")
        if values:
            vals = {v.strip() for v in ",".join(values).split(",")}
            one = next(iter(vals))
            if len(vals) != 1 or not one.isascii() or not one.isdigit() or len(one) > 18:
                raise HTTPError(400, "invalid Content-Length %r" % ", ".join(values)[:50], "bad_content_length",
                                close=True)
            req.length = int(one)

    def pieces(self, req, limit=None):
        """Yield the request body in pieces (Content-Length or chunked); the first JOURNAL_BODY
        bytes are kept for the journal, the rest never are. Past ``limit`` bytes: 413."""
        if req.body_done:
            return
        if limit is not None and req.length is not None and req.length > limit:
            raise HTTPError(413, "request body of %d bytes is over the %d byte limit" % (req.length, limit),
                            "request_too_large", close=True)
        source = self._chunked(limit) if req.chunked else self._exact(req.length or 0)
        for piece in source:
            req.body_bytes += len(piece)
            room = JOURNAL_BODY - len(req.captured)
            if room > 0:
                req.captured += piece[:room]
            yield piece
        req.body_done = True

    def _exact(self, left):
        while left:
            piece = self.rfile.read(min(left, PIECE))
            if not piece:
                raise ClientGone("body cut off")
            left -= len(piece)
            yield piece

    def _chunked(self, limit):
        total = 0
        while True:
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                if not line:
                    raise ClientGone("chunked body cut off")
                raise HTTPError(400, "chunk size line too long", "bad_chunk", close=True)
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 15 or size_text.strip(b"0123456789abcdefABCDEF"):
                raise HTTPError(400, "invalid chunk size %r" % size_text[:20].decode("latin-1"), "bad_chunk",
                                close=True)
            size = int(size_text, 16)
            total += size
            if limit is not None and total > limit:
                raise HTTPError(413, "chunked request body over the %d byte limit" % limit, "request_too_large",
                                close=True)
            if size == 0:
                for _ in range(MAX_HEADERS + 1):  # trailers, ignored
                    t = self.rfile.readline(8194)
                    if not t:
                        raise ClientGone("chunked trailer cut off")
                    if t in (b"\r\n", b"\n"):
                        return
                raise HTTPError(431, "too many trailer fields", "headers_too_large", close=True)
            yield from self._exact(size)
            if self.rfile.read(2) != b"\r\n":
                raise HTTPError(400, "chunk data not followed by CRLF", "bad_chunk", close=True)

class Answered(ClientGone):
    """The answer was given (or deliberately broken) and the connection must end: stop quietly."""


def read_json_body(req):
    data = bytearray()
    for piece in req.body_pieces(MAX_JSON_BODY):
        data += piece
    return bytes(data)
