#!/usr/bin/env python3
"""dpmock: a standard-library-only mock of the OpenAI, Gemini and Anthropic HTTP APIs.

Usage:
    python3 dpmock.py [--host 127.0.0.1] [--port 8080] [--foreground]
                      [--pidfile PATH] [--logfile PATH] [-q | -v]

By default it detaches (double fork + setsid) and the launching process exits 0 only once
the daemon is serving, after printing ``DP_MOCK_SERVER=http://HOST:PORT``.

Exit codes: 0 started (or, in the foreground, stopped cleanly); 1 could not start (address
in use, bad host, pidfile locked, log file unwritable); 2 bad command line.
"""

import argparse
import errno
import fcntl
import itertools
import json
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections import namedtuple
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

import scenarios
from scenarios import Reply, Stream, Upload

__version__ = "0.1.0"

#: Absolute path of this script, taken before any chdir, for re-execution.
SCRIPT = os.path.abspath(__file__)


################################################################################
# Config and CLI
################################################################################

class Config:
    """Server settings, as parsed from the command line."""

    def __init__(self, host="127.0.0.1", port=8080, foreground=False, pidfile=None, logfile=None, verbosity=1):
        self.host, self.port, self.foreground = host, port, foreground
        self.pidfile, self.logfile = pidfile, logfile
        self.verbosity = verbosity  #: 0 quiet (errors only), 1 one line per request, 2 debug

    def to_argv(self):
        """Command-line arguments that rebuild this config (used by restart)."""
        argv = ["--host", self.host, "--port", str(self.port)]
        if self.foreground:
            argv.append("--foreground")
        if self.pidfile:
            argv += ["--pidfile", self.pidfile]
        if self.logfile:
            argv += ["--logfile", self.logfile]
        argv += {0: ["-q"], 1: [], 2: ["-v"]}[self.verbosity]
        return argv


def parse_args(argv):
    """Parse the command line into a Config; paths become absolute (the daemon chdirs to /)."""
    p = argparse.ArgumentParser(prog="dpmock.py", description="Mock OpenAI, Gemini and Anthropic APIs.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one (default 8080)")
    p.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")
    p.add_argument("--pidfile", help="write and lock this pid file")
    p.add_argument("--logfile", help="append the log here (daemon default: no log)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
    a = p.parse_args(argv)
    if not 0 <= a.port <= 65535:
        p.error("--port must be between 0 and 65535, not %d" % a.port)
    return Config(host=a.host, port=a.port, foreground=a.foreground,
                  pidfile=os.path.abspath(a.pidfile) if a.pidfile else None,
                  logfile=os.path.abspath(a.logfile) if a.logfile else None,
                  verbosity=0 if a.quiet else 2 if a.verbose else 1)


################################################################################
# Routing
################################################################################

BODY_NONE, BODY_JSON, BODY_COUNT = "none", "json", "count"


class Route(namedtuple("Route", "method pattern name body handler versioned anthropic")):
    """One row of the route table.

    ``pattern`` is the path after any version prefix, with ``{name}`` placeholders; ``name``
    is the key scenarios.py uses; ``body`` is BODY_NONE, BODY_JSON or BODY_COUNT (counted,
    never held); ``handler`` names a module-level function; ``versioned`` routes are also
    served under /v1 and /v1beta; ``anthropic`` routes read the key as the Anthropic SDK
    sends it (x-api-key first).
    """

    __slots__ = ()

    def __new__(cls, method, pattern, name, body, handler, versioned=True, anthropic=False):
        return super().__new__(cls, method, pattern, name, body, handler, versioned, anthropic)


ROUTES = (
    Route("POST", "/chat/completions", "chat", BODY_JSON, "handle_scenario_route"),
    Route("POST", "/models/{model}:generateContent", "gemini_generate", BODY_JSON, "handle_scenario_route"),
    Route("POST", "/models/{model}:countTokens", "gemini_count_tokens", BODY_JSON, "handle_scenario_route"),
    Route("POST", "/messages", "messages", BODY_JSON, "handle_scenario_route", anthropic=True),
    Route("POST", "/messages/count_tokens", "messages_count_tokens", BODY_JSON, "handle_scenario_route",
          anthropic=True),
    Route("GET", "/models", "models", BODY_NONE, "handle_scenario_route"),
    Route("POST", "/files", "files", BODY_COUNT, "handle_scenario_route"),
    Route("POST", "/files:upload", "gemini_upload", BODY_COUNT, "handle_scenario_route"),
    Route("GET", "/_control/status", "control_status", BODY_NONE, "handle_control_status", versioned=False),
    Route("POST", "/_control/shutdown", "control_shutdown", BODY_NONE, "handle_control_shutdown",
          versioned=False),
    Route("POST", "/_control/restart", "control_restart", BODY_NONE, "handle_control_restart",
          versioned=False),
)

#: Version prefixes a provider route may carry (the C library sends bare paths).
PREFIXES = ("", "/v1", "/v1beta")
_PREFIX_RE = re.compile(r"^/v1(?:beta)?(?=/)")


def _compile(pattern):
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", re.escape(pattern)) + "$")


_EXACT = {}  # path -> {method: route}
_PATTERNS = []  # (regex, {method: route})
for _r in ROUTES:
    if "{" in _r.pattern:
        for _rx, _methods in _PATTERNS:
            if _rx.pattern == _compile(_r.pattern).pattern:
                _methods[_r.method] = _r
                break
        else:
            _PATTERNS.append((_compile(_r.pattern), {_r.method: _r}))
    else:
        _EXACT.setdefault(_r.pattern, {})[_r.method] = _r


class HTTPError(Exception):
    """Raised anywhere in request handling to answer with a JSON error."""

    def __init__(self, status, message, code=None, headers=(), close=False):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.close = headers, close

    def body(self):
        err = {"message": self.message, "type": "invalid_request_error" if self.status < 500 else "server_error",
               "code": self.code}
        return {"error": err}


def match(method, path):
    """Return (route, params) for a request, or raise HTTPError 404 / 405 (with Allow)."""
    stripped = path
    for _ in range(2):  # the C library may send /v1beta/v1/files:upload
        m = _PREFIX_RE.match(stripped)
        if not m:
            break
        stripped = stripped[m.end():]
    versioned = stripped != path
    candidates = []
    methods = _EXACT.get(stripped)
    if methods is not None:
        candidates.append((methods, {}))
    else:
        for rx, methods in _PATTERNS:
            m = rx.match(stripped)
            if m:
                candidates.append((methods, {k: unquote(v) for k, v in m.groupdict().items()}))
                break
    for methods, params in candidates:
        lookup = "GET" if method == "HEAD" else method
        route = methods.get(lookup)
        if route is not None and (route.versioned or not versioned):
            return route, params
        allowed = sorted({m for m, r in methods.items() if r.versioned or not versioned})
        if allowed:
            if "GET" in allowed:
                allowed.append("HEAD")
            raise HTTPError(405, "method %s is not allowed on %s; allowed: %s" % (method, path, ", ".join(allowed)),
                            "method_not_allowed", headers=(("Allow", ", ".join(allowed)),))
    raise HTTPError(404, "no route for %s %s" % (method, path), "not_found")


################################################################################
# Requests
################################################################################

MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 65536
MAX_HEADERS = 100
MAX_JSON_BODY = 32 * scenarios.MIB  #: larger JSON bodies get 413 unread
MAX_DISCARD = 64 * 1024  #: unwanted bodies up to this are drained; larger ones close the connection
LINGER_SECONDS = 2.0  #: how long an unread upload is drained after its answer before closing
IDLE_POLL = 0.1  #: how often an idle keep-alive connection checks for a stop
FRESH_GRACE = 1.0  #: at a stop, how long a just-accepted connection may take to send its request


class Headers:
    """Request headers in arrival order with case-insensitive lookup (first value wins)."""

    __slots__ = ("items", "_map")

    def __init__(self, items):
        self.items = items
        self._map = {}
        for k, v in items:
            self._map.setdefault(k.lower(), v)

    def get(self, name, default=None):
        return self._map.get(name, default)

    def __contains__(self, name):
        return name in self._map


class Request:
    """One parsed request; attributes are filled in as the handler learns them."""

    __slots__ = ("method", "target", "version", "path", "query", "headers", "route", "params",
                 "length", "chunked", "body", "json", "nbytes", "scenario", "t0")

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        parts = urlsplit(target)
        self.path = parts.path or "/"
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.route, self.params = None, {}
        self.length, self.chunked = None, False
        self.body, self.json, self.nbytes = None, None, 0
        self.scenario = None
        self.t0 = time.monotonic()

    def arg(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default


def _bearer(value):
    return value[7:] if value[:7].lower() == "bearer " else value


def request_key(req):
    """The API key, looked up where the Flask mock looked (Anthropic routes: x-api-key first)."""
    h = req.headers
    if req.route.anthropic:
        sources = (h.get("x-api-key"), h.get("authorization"))
    else:
        sources = (h.get("authorization"), h.get("x-api-key"), h.get("x-goog-api-key"), req.arg("key"))
    for value in sources:
        if value is not None:
            return _bearer(value.strip())
    return None


def select_scenario(req):
    """The scenario name for this request: X-DP-Scenario if sent, else the key if it names one."""
    explicit = req.headers.get("x-dp-scenario")
    if explicit is not None:
        name = explicit.strip()
        if scenarios.get(name) is None:
            raise HTTPError(400, "unknown scenario %r in X-DP-Scenario; known: %s"
                            % (name, ", ".join(scenarios.names())), "unknown_scenario")
        return name
    key = request_key(req)
    return key if key is not None and scenarios.get(key) is not None else None


################################################################################
# Provider routes (driven by the scenario catalogue)
################################################################################

def handle_scenario_route(h, req):
    """Answer with the selected scenario's value for this route, else the contract's default."""
    value = scenarios.answer(req.scenario, req.route.name) if req.scenario else None
    if value is None:
        value = scenarios.NO_SCENARIO[req.route.name]
    if isinstance(value, Upload):
        value = scenarios.upload_reply(value, req.nbytes)
    if isinstance(value, Stream):
        h.send_stream(value)
    else:
        h.send_reply(value)


def early_reply(req):
    """A Reply decided from the headers alone (before reading the body), or None."""
    value = scenarios.answer(req.scenario, req.route.name) if req.scenario else None
    if isinstance(value, Upload) and value.max_bytes is not None and req.length is not None \
            and req.length > value.max_bytes:
        return value.too_large
    return None


################################################################################
# Control endpoints
################################################################################

def handle_control_status(h, req):
    srv = h.server
    h.send_json(200, {
        "status": "running",
        "version": __version__,
        "pid": os.getpid(),
        "foreground_mode": srv.config.foreground,
        "url": srv.url,
        "boot_id": srv.boot_id,
        "restarts": srv.restarts,
        "uptime_s": round(time.monotonic() - srv.started, 3),
        "requests": srv.request_count,
        "active_requests": srv.active,
        "scenarios": scenarios.names(),
        "endpoints": ["%s %s" % (r.method, r.pattern) for r in ROUTES],
    })


def handle_control_shutdown(h, req):
    h.send_json(200, {"status": "shutting_down", "pid": os.getpid(),
                      "message": "dpmock stops once in-flight requests finish"}, close=True)
    h.server.request_stop("shutdown requested over HTTP")


def handle_control_restart(h, req):
    h.send_json(200, {"status": "restarting", "pid": os.getpid(), "boot_id": h.server.boot_id,
                      "message": "dpmock re-executes itself keeping its listening socket"}, close=True)
    h.server.request_stop("restart requested over HTTP", restart=True)


################################################################################
# Handler: parsing, writers, dispatch
################################################################################

_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError, socket.timeout)


class ClientGone(Exception):
    """The client closed the connection before sending what it announced."""


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_REASONS.update({529: "Site is overloaded"})
_STATUS_LINES = {code: ("HTTP/1.1 %d %s\r\n" % (code, phrase)).encode("latin-1") for code, phrase in _REASONS.items()}

_date_cache = [0, ""]


def http_date():
    """The Date header value, formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))]
    return _date_cache[1]


def encode_body(body, compact=False):
    """Bytes for a reply body: JSON for dicts and lists, UTF-8 for text."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(body, separators=seps, ensure_ascii=False).encode("utf-8")


class MockHandler(socketserver.StreamRequestHandler):
    """One connection: parses requests itself so limits, Expect and bodies are under control.

    Like http.server.BaseHTTPRequestHandler, but that module is not imported: its import
    (http.client, email, ssl) would add ~15 ms to every start, and its parser is not used.
    """

    server_version = "dpmock/" + __version__
    disable_nagle_algorithm = True  #: with one write per response, no 40 ms delayed-ACK stall
    wbufsize = 0  #: unbuffered: every wfile.write is one sendall
    timeout = 120  #: idle keep-alive connections are closed after this

    # ---------------------------------------------------------------- connection loop

    def handle(self):
        self.close_connection = False
        served = 0
        try:
            while not self.close_connection and self.wait_for_request(served == 0):
                self.handle_one_request()
                served += 1
        except _DISCONNECTS + (ClientGone,) as e:
            self.server.log.debug("%s: connection ended: %s", self.peer, e.__class__.__name__)

    def wait_for_request(self, fresh):
        """Wait for the next request's first byte; False when the connection should close instead.

        Polls in short steps so a stop or restart closes idle keep-alive connections promptly,
        while a request already on its way (or a fresh connection's first one) is still served.
        peek() does at most one raw read, so a timeout here never loses buffered bytes.
        """
        srv = self.server
        sock = self.connection
        idle_deadline = time.monotonic() + self.timeout
        grace_deadline = None
        sock.settimeout(IDLE_POLL)
        try:
            while True:
                try:
                    return bool(self.rfile.peek(1))
                except socket.timeout:
                    now = time.monotonic()
                    if now >= idle_deadline:
                        return False
                    if srv.stopping:
                        if not fresh:
                            return False
                        grace_deadline = grace_deadline or now + FRESH_GRACE
                        if now >= grace_deadline:
                            return False
        finally:
            sock.settimeout(self.timeout)

    @property
    def peer(self):
        return "%s:%s" % self.client_address[:2] if isinstance(self.client_address, tuple) else "?"

    def handle_one_request(self):
        self.headers_sent = False
        self.req = None
        self.status = 0
        self.sent = 0
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            self.close_connection = True
            return
        srv = self.server
        srv.begin_request(self)
        try:
            req = self.parse_head(line)
            if req is None:
                return
            self.req = req
            self.dispatch(req)
        except HTTPError as e:
            self.answer_error(e)
        except _DISCONNECTS + (ClientGone,):
            raise
        except Exception:
            srv.log.error("error while handling %s:\n%s", self.requestline_text(), traceback.format_exc().rstrip())
            if not self.headers_sent:
                self.send_json(500, {"error": {"message": "dpmock internal error; see its log", "type": "server_error",
                                               "code": "internal_error"}}, close=True)
            else:
                self.close_connection = True
        finally:
            srv.end_request(self)
            if srv.stopping:
                self.close_connection = True
            self.log_request_line()

    def requestline_text(self):
        req = self.req
        return "%s %s" % (req.method, req.target) if req else "(unparsed request)"

    def parse_head(self, line):
        """Parse the request line and headers into a Request, or answer an error and return None."""
        if len(line) > MAX_REQUEST_LINE:
            raise HTTPError(414, "request line longer than %d bytes" % MAX_REQUEST_LINE, "uri_too_long", close=True)
        if not line.endswith(b"\n"):
            raise ClientGone("request line cut off")
        try:
            text = line.decode("latin-1").rstrip("\r\n")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
            text = ""
        parts = text.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise HTTPError(400, "malformed request line %r" % text[:100], "bad_request_line", close=True)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            if re.match(r"^HTTP/\d\.\d$", version):
                raise HTTPError(505, "HTTP version %s is not supported; use HTTP/1.1" % version,
                                "http_version_not_supported", close=True)
            raise HTTPError(400, "malformed HTTP version %r" % version[:20], "bad_request_line", close=True)
        if not method.isalpha() or not method.isupper():
            raise HTTPError(400, "malformed method %r" % method[:20], "bad_request_line", close=True)
        items, total = [], 0
        while True:
            hline = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(hline)
            if total > MAX_HEADER_BYTES or len(items) >= MAX_HEADERS:
                raise HTTPError(431, "request header section over %d bytes or %d fields"
                                % (MAX_HEADER_BYTES, MAX_HEADERS), "headers_too_large", close=True)
            if not hline.endswith(b"\n"):
                raise ClientGone("header section cut off")
            if hline in (b"\r\n", b"\n"):
                break
            if hline[:1] in (b" ", b"\t"):
                raise HTTPError(400, "obsolete header line folding is not accepted", "bad_header", close=True)
            name, sep, value = hline.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise HTTPError(400, "malformed header line %r" % hline[:100].decode("latin-1"), "bad_header",
                                close=True)
            items.append((name, value.strip()))
        req = Request(method, target, version, Headers(items))
        conn = (req.headers.get("connection") or "").lower()
        if version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in conn
        elif "close" in conn:
            self.close_connection = True
        self.parse_framing(req)
        return req

    def parse_framing(self, req):
        """Work out how the body is framed; bad framing closes the connection."""
        h = req.headers
        te = h.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise HTTPError(501, "Transfer-Encoding %r is not supported; use chunked" % te,
                                "unsupported_transfer_encoding", close=True)
            if "content-length" in h:
                raise HTTPError(400, "both Content-Length and Transfer-Encoding were sent", "bad_framing",
                                close=True)
            req.chunked = True
            return
        values = [v for k, v in h.items if k.lower() == "content-length"]
        if values:
            vals = {v.strip() for v in ",".join(values).split(",")}
            if len(vals) != 1 or not re.match(r"^[0-9]{1,18}$", next(iter(vals))):
                raise HTTPError(400, "invalid Content-Length %r" % ", ".join(values)[:50], "bad_content_length",
                                close=True)
            req.length = int(next(iter(vals)))

    def has_body(self, req):
        return req.chunked or (req.length or 0) > 0

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, req):
        try:
            req.route, req.params = match(req.method, req.path)
        except HTTPError as e:
            self.refuse_body(req, e)
            raise
        route = req.route
        if route.body != BODY_NONE and req.length is None and not req.chunked:
            self.close_connection = True  # whatever follows can't be told apart from a body
            raise HTTPError(411, "%s %s needs a request body with Content-Length or chunked encoding"
                            % (req.method, req.path), "length_required")
        if route.versioned:
            try:
                req.scenario = select_scenario(req)
            except HTTPError as e:
                self.refuse_body(req, e)
                raise
        expect = req.headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                self.refuse_body(req, None)
                raise HTTPError(417, "unsupported Expect %r" % expect, "expectation_failed")
        reply = early_reply(req) if req.scenario else None
        if reply is not None:
            # Answered from the headers: the body is never read, so the connection can't be reused.
            self.send_reply(reply, close=True)
            if expect is None:
                self.linger()
            return
        if route.body == BODY_JSON and req.length is not None and req.length > MAX_JSON_BODY:
            self.refuse_body(req, None)
            raise HTTPError(413, "request body of %d bytes is over the %d byte limit" % (req.length, MAX_JSON_BODY),
                            "request_too_large", close=True)
        if expect is not None and req.version == "HTTP/1.1" and self.has_body(req):
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.read_body(req)
        if route.body == BODY_JSON:
            req.json = parse_json_body(req.body)
        _HANDLERS[route.handler](self, req)

    def refuse_body(self, req, err):
        """Before an error answer: drain a small body so the connection stays usable, else close."""
        if not self.has_body(req):
            return
        if req.headers.get("expect") is None and not req.chunked and req.length <= MAX_DISCARD:
            self.read_exact(req.length)
        else:
            self.close_connection = True
            if err is not None:
                err.close = True

    # ---------------------------------------------------------------- bodies

    def read_body(self, req):
        """Read the body: kept for JSON routes, counted (never held) for uploads, drained otherwise."""
        keep = req.route.body == BODY_JSON
        limit = MAX_JSON_BODY if keep else None
        if req.route.body == BODY_NONE and self.has_body(req):
            if req.chunked or req.length > MAX_DISCARD:
                self.close_connection = True
                return
        sink = bytearray() if keep else None
        if req.chunked:
            req.nbytes = self.read_chunked(sink, limit, req)
        elif req.length:
            req.nbytes = self.read_exact(req.length, sink)
        req.body = bytes(sink) if keep else None

    def read_exact(self, n, sink=None):
        """Read exactly n bytes, appending to sink if given; memory stays bounded when sink is None."""
        left = n
        buf = bytearray(min(n, 65536)) if sink is None else None
        view = memoryview(buf) if buf is not None else None
        while left:
            if sink is not None:
                piece = self.rfile.read(min(left, 1 << 20))
                if not piece:
                    raise ClientGone("body cut off")
                sink += piece
                left -= len(piece)
            else:
                got = self.rfile.readinto(view[:min(left, len(buf))])
                if not got:
                    raise ClientGone("body cut off")
                left -= got
        return n

    def read_chunked(self, sink, limit, req):
        """Decode a chunked body; an over-limit upload is answered 413 as soon as the limit is passed."""
        total = 0
        rule = scenarios.answer(req.scenario, req.route.name) if req.scenario else None
        cap = rule.max_bytes if isinstance(rule, Upload) else None
        while True:
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                if not line:
                    raise ClientGone("chunked body cut off")
                raise HTTPError(400, "chunk size line too long", "bad_chunk", close=True)
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or not re.match(rb"^[0-9A-Fa-f]{1,15}$", size_text):
                raise HTTPError(400, "invalid chunk size %r" % size_text[:20].decode("latin-1"), "bad_chunk",
                                close=True)
            size = int(size_text, 16)
            if size == 0:
                for _ in range(MAX_HEADERS + 1):  # trailers, ignored
                    t = self.rfile.readline(8194)
                    if not t:
                        raise ClientGone("chunked trailer cut off")
                    if t in (b"\r\n", b"\n"):
                        return total
                raise HTTPError(431, "too many trailer fields", "headers_too_large", close=True)
            total += size
            if limit is not None and total > limit:
                raise HTTPError(413, "request body is over the %d byte limit" % limit, "request_too_large",
                                close=True)
            if cap is not None and total > cap:
                self.send_reply(rule.too_large, close=True)
                self.linger()
                raise _Answered()
            self.read_exact(size, sink)
            if self.rfile.read(2) != b"\r\n":
                raise HTTPError(400, "chunk data not followed by CRLF", "bad_chunk", close=True)

    def linger(self):
        """After answering an unread upload: stop writing, drain for a bounded time, then close.

        Closing with unread data queued makes the kernel send a reset, which can destroy the
        answer before the client reads it; a lingering close lets the client see it.
        """
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            self.connection.settimeout(0.2)
            while time.monotonic() < deadline and not self.server.stopping:
                try:
                    if not self.connection.recv(65536):
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass

    # ---------------------------------------------------------------- writers

    def head_bytes(self, status, headers, close):
        out = [_STATUS_LINES.get(status) or ("HTTP/1.1 %d Status\r\n" % status).encode("latin-1"),
               b"Date: ", http_date().encode("latin-1"), b"\r\nServer: ", self.server_version.encode("latin-1"),
               b"\r\n"]
        for k, v in headers:
            out.append(("%s: %s\r\n" % (k, v)).encode("latin-1"))
        if close or self.close_connection or self.server.stopping:
            self.close_connection = True
            out.append(b"Connection: close\r\n")
        elif self.req is not None and self.req.version == "HTTP/1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def send_bytes(self, status, body, content_type, headers=(), close=False):
        """Send a whole response in one write (headers and body together)."""
        hdrs = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        hdrs.extend(headers)
        data = self.head_bytes(status, hdrs, close)
        if not (self.req is not None and self.req.method == "HEAD"):
            data += body
        self.headers_sent = True
        self.status = status
        self.wfile.write(data)
        self.sent += len(data)

    def send_json(self, status, obj, headers=(), close=False):
        self.send_bytes(status, encode_body(obj), scenarios.JSON, headers, close)

    def send_reply(self, reply, close=False):
        self.send_bytes(reply.status, encode_body(reply.body), reply.content_type, reply.headers, close)

    def start_chunked(self, status, content_type, headers=(), close=False):
        hdrs = [("Content-Type", content_type), ("Transfer-Encoding", "chunked"), ("Cache-Control", "no-cache")]
        hdrs.extend(headers)
        data = self.head_bytes(status, hdrs, close)
        self.headers_sent = True
        self.status = status
        self.wfile.write(data)
        self.sent += len(data)

    def send_chunk(self, data):
        """Write one chunk (size line, data, CRLF) in one write, so each event leaves at once."""
        if data:
            out = b"%x\r\n%s\r\n" % (len(data), data)
            self.wfile.write(out)
            self.sent += len(out)

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.sent += 5

    def send_sse_event(self, data, event=None):
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        text = ("event: %s\ndata: %s\n\n" % (event, payload)) if event else ("data: %s\n\n" % payload)
        self.send_chunk(text.encode("utf-8"))

    def send_stream(self, stream):
        """Send a scenario Stream: headers, each event flushed on its own, an optional broken tail."""
        self.start_chunked(200, stream.content_type, close=stream.close)
        for ev in stream.events:
            self.send_sse_event(ev.data, ev.event)
        if stream.pause_ms:
            self.server.pause(stream.pause_ms / 1000.0)
        if stream.tail:
            self.send_chunk(stream.tail.encode("utf-8"))
        self.end_chunked()

    def answer_error(self, e):
        if e.close:
            self.close_connection = True
        if self.headers_sent:
            self.close_connection = True
            return
        self.send_json(e.status, e.body(), e.headers, close=e.close)

    # ---------------------------------------------------------------- logging

    def log_request_line(self):
        log = self.server.log
        if not log.enabled(1):
            return
        req = self.req
        ms = (time.monotonic() - req.t0) * 1000 if req else 0.0
        log.info('%s "%s" %s %d %.1fms%s', self.peer, self.requestline_text(), self.status or "-", self.sent, ms,
                 " scenario=%s" % req.scenario if req is not None and req.scenario else "")


class _Answered(ClientGone):
    """The body reader already answered (and closed); stop handling this connection quietly."""


def parse_json_body(body):
    """Decode a JSON object body or raise HTTPError 400 naming the problem."""
    if not body:
        raise HTTPError(400, "request body is empty; expected a JSON object", "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPError(400, "request body is not valid JSON: not UTF-8 (byte 0x%02x at offset %d)"
                        % (body[e.start], e.start), "invalid_json")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise HTTPError(400, "request body is not valid JSON: %s" % e, "invalid_json")
    if not isinstance(value, dict):
        raise HTTPError(400, "request body must be a JSON object, not %s" % type(value).__name__, "invalid_json")
    return value


################################################################################
# Log
################################################################################

class Log:
    """A tiny thread-safe line logger writing to one stream (or nowhere)."""

    def __init__(self, stream, verbosity):
        self.stream, self.verbosity = stream, verbosity
        self.lock = threading.Lock()

    def enabled(self, level):
        return self.stream is not None and self.verbosity >= level

    def _write(self, level, fmt, args):
        if not self.enabled(level):
            return
        line = "%s dpmock[%d] %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), os.getpid(), fmt % args if args else fmt)
        with self.lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def error(self, fmt, *args):
        self._write(0, fmt, args)

    def info(self, fmt, *args):
        self._write(1, fmt, args)

    def debug(self, fmt, *args):
        self._write(2, fmt, args)


################################################################################
# Server
################################################################################

class MockServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The listening socket, the connection threads, and the state every handler shares.

    This is http.server.ThreadingHTTPServer's own recipe (ThreadingMixIn over TCPServer),
    written out so that http.server and its imports stay off the start-up path.
    """

    daemon_threads = True
    block_on_close = False  # idle keep-alive threads must not hold up a stop; stop() drains instead
    request_queue_size = 128

    def __init__(self, config, sock, log, restarts=0):
        socketserver.BaseServer.__init__(self, sock.getsockname(), MockHandler)
        self.socket = sock
        self.address_family = sock.family
        self.config, self.log, self.restarts = config, log, restarts
        self.url = base_url(sock)
        self.boot_id = os.urandom(16).hex()
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.restart_requested = False
        self._lock = threading.Lock()
        self._conns = set()  # accepted connection sockets not yet closed
        self._counter = itertools.count(1)
        self.request_count = 0
        self.active = 0

    @property
    def stopping(self):
        return self.stop_event.is_set()

    def pause(self, seconds):
        """Every deliberate wait goes through here, so a stop cuts it short."""
        self.stop_event.wait(max(0.0, min(seconds, 300.0)))

    # ---------------------------------------------------------------- bookkeeping

    def process_request(self, request, client_address):
        """Count the connection from the moment it is accepted, so a drain never misses it."""
        with self._lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        try:
            super().shutdown_request(request)
        finally:
            with self._lock:
                self._conns.discard(request)

    def begin_request(self, handler):
        with self._lock:
            self.active += 1
            self.request_count = next(self._counter)

    def end_request(self, handler):
        with self._lock:
            self.active -= 1

    def handle_error(self, request, client_address):
        """Only unexpected errors reach here (handlers absorb disconnects): log one traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECTS + (ClientGone,)):
            self.log.debug("%s: connection ended: %s", client_address, exc.__class__.__name__)
            return
        self.log.error("unexpected error on a connection from %s:\n%s", client_address,
                       traceback.format_exc().rstrip())

    # ---------------------------------------------------------------- lifecycle

    def request_stop(self, why, restart=False):
        """Ask serve_forever to return; safe from handlers and signal handlers (never blocks)."""
        if self.stopping:
            return
        self.log.info("stopping: %s", why)
        self.restart_requested = restart
        self.stop_event.set()
        threading.Thread(target=self.shutdown, name="dpmock-stop", daemon=True).start()

    def drain(self, timeout=10.0):
        """After serve_forever: wait (bounded) until every connection has finished and closed.

        Idle keep-alive connections notice the stop within IDLE_POLL; busy ones finish their
        request (deliberate waits are cut short) and answer with Connection: close.
        Returns how many connections were still open at the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                left = len(self._conns)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.01)


def base_url(sock):
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


def bind_listener(host, port, backlog=MockServer.request_queue_size):
    """Bind and listen; raises OSError with a plain message."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(errno.EADDRNOTAVAIL, "cannot resolve host %r: %s" % (host, e.strerror))
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


################################################################################
# Daemon and lifecycle
################################################################################

ENV_LISTEN_FD = "DPMOCK_LISTEN_FD"
ENV_PIDFILE_FD = "DPMOCK_PIDFILE_FD"
ENV_RESTARTS = "DPMOCK_RESTARTS"


class StartError(Exception):
    """A start-up step failed; the message is one plain line."""


class PidFile:
    """A pid file held with flock (kept across fork and exec, unlike lockf)."""

    def __init__(self, path, fd=None):
        self.path, self.fd = path, fd

    def acquire(self):
        """Lock first, then truncate: never clobber the pid of a live holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StartError("cannot open pid file %s: %s" % (self.path, e.strerror))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise StartError("pid file %s is locked by running process %s" % (self.path, held or "?"))
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.fd = fd

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def daemonize():
    """Detach (fork, setsid, fork); return the readiness pipe's write end in the daemon.

    The launching process never returns: it waits on the pipe, prints what the daemon
    reported, and exits 0 only if the daemon said it is serving.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        chunks = []
        while True:
            piece = os.read(r, 4096)
            if not piece:
                break
            chunks.append(piece)
        os.waitpid(pid, 0)
        msg = b"".join(chunks).decode("utf-8", "replace").strip()
        if msg.startswith("ok "):
            print("DP_MOCK_SERVER=%s" % msg[3:], flush=True)
            os._exit(0)
        print("dpmock: %s" % (msg[6:] if msg.startswith("error ") else "daemon exited before it was ready"),
              file=sys.stderr, flush=True)
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    return w


def redirect_stdio():
    """Point fds 0-2 at /dev/null so the daemon holds no terminal or pipe of its launcher."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def install_signals(server):
    def on_signal(signum, frame):
        server.request_stop("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def reexec(server, sock, pidfile):
    """Replace this process with a fresh dpmock that inherits the listening socket and pid file."""
    sock.set_inheritable(True)
    env = dict(os.environ)
    env[ENV_LISTEN_FD] = str(sock.fileno())
    env[ENV_RESTARTS] = str(server.restarts + 1)
    if pidfile is not None and pidfile.fd is not None:
        os.set_inheritable(pidfile.fd, True)
        env[ENV_PIDFILE_FD] = str(pidfile.fd)
    else:
        env.pop(ENV_PIDFILE_FD, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, SCRIPT] + server.config.to_argv(), env)


def open_log(config):
    if config.logfile:
        try:
            return open(config.logfile, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise StartError("cannot open log file %s: %s" % (config.logfile, e.strerror))
    return sys.stderr if config.foreground else None


def main(argv=None):
    config = parse_args(sys.argv[1:] if argv is None else argv)
    inherited = os.environ.pop(ENV_LISTEN_FD, None)
    pid_fd = os.environ.pop(ENV_PIDFILE_FD, None)
    restarts = int(os.environ.pop(ENV_RESTARTS, "0") or 0)
    if inherited is not None:
        sock = socket.socket(fileno=int(inherited))
        sock.set_inheritable(False)
    else:
        try:
            sock = bind_listener(config.host, config.port)
        except OSError as e:
            print("dpmock: cannot listen on %s port %d: %s" % (config.host, config.port, e.strerror or e),
                  file=sys.stderr)
            return 1
    ready = None
    if inherited is None and not config.foreground:
        ready = daemonize()
    pidfile = None
    try:
        log = Log(open_log(config), config.verbosity)
        if config.pidfile:
            pidfile = PidFile(config.pidfile, int(pid_fd) if pid_fd else None)
            if pidfile.fd is None:
                pidfile.acquire()
            else:
                os.set_inheritable(pidfile.fd, False)
    except StartError as e:
        if ready is not None:
            os.write(ready, ("error %s\n" % e).encode())
            os._exit(1)
        print("dpmock: %s" % e, file=sys.stderr)
        return 1
    server = MockServer(config, sock, log, restarts)
    install_signals(server)
    if ready is not None:
        redirect_stdio()
        os.write(ready, ("ok %s\n" % server.url).encode())
        os.close(ready)
    elif inherited is None:
        print("DP_MOCK_SERVER=%s" % server.url, flush=True)
    log.info("serving %s (pid %d, dpmock %s%s)", server.url, os.getpid(), __version__,
             ", restart %d" % restarts if restarts else "")
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        left = server.drain()
        if left:
            log.error("stopping with %d connection(s) still open", left)
    if server.restart_requested:
        reexec(server, sock, pidfile)
    if pidfile is not None:
        pidfile.release()
    sock.close()
    log.info("stopped")
    return 0


#: Handler functions by name, resolved once (a misspelt name in ROUTES fails at import).
_HANDLERS = {r.handler: globals()[r.handler] for r in ROUTES}

if __name__ == "__main__":
    sys.exit(main())
