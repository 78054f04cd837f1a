"""Server: the connection (MockHandler) and the listening server (MockServer)."""

import errno
import http.server
import itertools
import os
import select
import socket
import socketserver
import sys
import threading
import time

from . import __version__
from .base import HTTPError, StartError, scenarios
from .dispatch import dispatch, refuse_body
from .log import format_exc
from .request import Answered, ClientGone, RequestReader
from .routes import ROUTER
from .rules import RuleBook
from .state import FileStore, Journal, JournalEntry, ResponseStore, Schedules, ThreadStore, mask_query
from .writer import ResponseWriter, encode_body


FRESH_GRACE = 1.0  #: at a stop, how long a just-accepted connection may take to send its request
HANDSHAKE_TIMEOUT = 10.0  #: how long a TLS client may take to finish its handshake
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  #: the peer shut its sending side (Linux)

_date_cache = [0, ""]


class MockHandler(http.server.BaseHTTPRequestHandler):
    """One connection: the keep-alive loop, TLS, strict request parsing, and its answers' heads.

    http.server's own machinery is kept where it fits: ``handle`` loops over
    ``handle_one_request`` until ``close_connection``; ``parse_request`` is overridden with
    dpmock's stricter parser (RequestReader); ``send_response_only``/``send_header``/
    ``end_headers`` build each head, which leaves with its body in one write;
    ``handle_expect_100``, ``send_error`` (JSON), ``log_request`` and ``responses`` are its hooks.
    """

    protocol_version = "HTTP/1.1"
    server_version = "dpmock/" + __version__
    disable_nagle_algorithm = True  #: with one write per response, no 40 ms delayed-ACK stall
    wbufsize = 0  #: unbuffered: every wfile.write is one sendall, which the writer controls
    timeout = None  #: blocking sockets: a Python-level timeout would poll() before every recv and send;
    #: the kernel enforces --io-timeout instead (SO_RCVTIMEO / SO_SNDTIMEO), set once per connection
    responses = dict(http.server.BaseHTTPRequestHandler.responses)
    responses[529] = ("Site is overloaded", "Anthropic's overloaded status")

    # ---------------------------------------------------------------- the connection

    def setup(self):
        #: host:port of the client, as the log names it
        self.peer = "%s:%s" % self.client_address[:2] if isinstance(self.client_address, tuple) else "?"
        self.idle = False  #: blocked waiting for the next request (a stop's drain may end that wait)
        self.served = 0  #: requests answered on this connection before the current one
        self.req = None
        self.writer = None
        self._head = b""
        self._poller = None
        ctx = self.server.attach(self)
        self.tls = ctx is not None
        if self.tls:
            self.handshake(ctx)
        # A read that times out ends the input (the connection closes); a write raises OSError.
        import struct
        timeval = struct.pack("ll", self.server.config.io_timeout, 0)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        super().setup()
        self.sendall = self.connection.sendall  #: what wfile.write would call, without its frame
        self.reader = RequestReader(self.rfile)

    def handshake(self, ctx):
        """TLS, in this connection's own thread: a slow or failing client never holds up the others."""
        self.request.settimeout(HANDSHAKE_TIMEOUT)
        self.idle = True  # a stop may end a handshake that is taking its time
        try:
            first = self.request.recv(1, socket.MSG_PEEK)
            if first and first[0] != 0x16:  # not a TLS record: plain HTTP (or garbage) on an HTTPS port
                self.refuse_plain_http()
            # Wrap first, handshake after: wrapping moves the descriptor to the TLS socket, which
            # drain() must be able to reach while the handshake waits.
            self.request = ctx.wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
            self.request.do_handshake()
        except (OSError, ValueError) as e:
            self.server.log.info("%s: TLS handshake failed: %s", self.peer, getattr(e, "reason", None) or e)
            raise ClientGone("TLS handshake failed")
        finally:
            self.idle = False
        self.request.settimeout(None)

    def refuse_plain_http(self):
        """Answer plain HTTP sent to a TLS port with a readable 400, as nginx and Go do."""
        body = encode_body({"error": {"message": "plain HTTP request sent to an HTTPS port; use https://",
                                      "type": "invalid_request_error", "param": None, "code": "plain_http"}}, True)
        try:
            self.request.settimeout(0.5)
            self.request.recv(65536)  # the request head, so the close is not a reset
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            self.request.shutdown(socket.SHUT_WR)
            self.request.recv(65536)
        except OSError:
            pass
        self.server.log.info("%s: plain HTTP on a TLS port: answered 400", self.peer)
        raise ClientGone("plain HTTP on a TLS port")

    def handle(self):
        self.close_connection = False
        try:
            while not self.close_connection and self.wait_for_request(self.served == 0):
                self.handle_one_request()
                self.served += 1
        except (OSError, ClientGone) as e:  # resets, timeouts, TLS errors: the connection ended
            self.server.log.debug("%s: connection ended: %s", self.peer, e.__class__.__name__)

    def finish(self):
        try:
            super().finish()
        finally:
            if self.tls and self.connection is not None:
                self.connection.close()  # the listening loop only knows the plain socket

    def wait_for_request(self, fresh):
        """Wait for the next request's first byte; False when the connection should close instead.

        At a stop, drain() shuts the reading side of connections idle here (after a grace
        period for fresh ones), so the wait ends at once; peek() never loses buffered bytes.
        """
        if self.server.stopping and not fresh:
            return False
        self.idle = True
        try:
            return bool(self.rfile.peek(1))  # b"" at EOF, at a stop's SHUT_RD and after io_timeout
        finally:
            self.idle = False

    def pause(self, seconds):
        """A deliberate wait, cut short by a stop; a client that leaves meanwhile ends the request.

        The wait is a poll on the connection (for the peer's FIN or a reset) and on the server's
        stop pipe, so neither a gone client nor a stop has to wait for the pause to run out.
        """
        seconds = max(0.0, min(seconds, 300.0))
        if seconds <= 0 or self.server.stopping:
            return
        poller = self._poller
        if poller is None:  # made once per connection: a paced stream pauses at every event
            poller = self._poller = select.poll()
            poller.register(self.connection.fileno(), _POLLRDHUP)
            poller.register(self.server.wake_fd, select.POLLIN)
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, events in poller.poll(left * 1000 + 1):
                if fd == self.server.wake_fd:
                    return
                if events & (_POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    raise ClientGone("the client left during a pause")

    def reset(self):
        """Close with SO_LINGER 0: the client gets a TCP reset when finish() drops the files."""
        import struct
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def shutdown_write(self, seconds):
        """Send FIN, then read and drop what the client sends until it closes, at most ``seconds``."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            self.connection.settimeout(0.2)
            while time.monotonic() < deadline and not self.server.stopping:
                try:
                    if not self.connection.recv(65536):
                        return
                except socket.timeout:
                    continue
        except OSError:
            pass

    # ---------------------------------------------------------------- one request

    def handle_one_request(self):
        self.req = None
        self.request_version = "HTTP/1.1"  #: until the request line says otherwise (send_response_only reads it)
        w = self.writer = ResponseWriter(self, None)
        self.raw_requestline = self.reader.request_line()
        if not self.raw_requestline:
            self.close_connection = True
            return
        srv = self.server
        srv.begin_request()
        try:
            self.idle = True  # until the head is whole, a stop may end the wait for the rest of it
            try:
                self.parse_request()
            finally:
                self.idle = False
            dispatch(w, self.req)
            self.close_unread(w)
        except HTTPError as e:
            if self.req is not None:
                refuse_body(w, self.req, e)
            self.answer_error(w, e)
            self.close_unread(w)
        except (OSError, ClientGone) as e:
            w.ended = w.ended or ("closed" if isinstance(e, Answered) else "client_gone")
            raise
        except Exception:  # a bug: one traceback in the log, a 500 to the client
            srv.log.error("error while handling %s:\n%s", self.requestline_text(), format_exc())
            if not w.headers_sent:
                w.send_json(500, {"error": {"message": "dpmock internal error; see its log", "type": "server_error",
                                            "param": None, "code": "internal_error"}}, close=True)
            else:
                self.close_connection = True
        finally:
            srv.end_request()
            if srv.stopping:
                self.close_connection = True
            self.end_entry(w)
            self.log_request(w.status or "-", w.sent)

    def parse_request(self):
        """http.server's hook, with dpmock's stricter parser; raises HTTPError when malformed."""
        req = self.reader.head(self.raw_requestline)
        req.scheme = "https" if self.tls else "http"
        req.server = self.server
        self.req = self.writer.req = req
        self.command, self.path, self.request_version = req.method, req.target, req.version
        self.headers = req.headers
        if req.close_after:
            self.close_connection = True
        return True

    def handle_expect_100(self):
        """The interim answer; not part of the answer's bytes (faults do not count it)."""
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def send_error(self, code, message=None, explain=None):
        """http.server's error hook: a JSON answer, in the provider's shape when there is one."""
        self.answer_error(self.writer, HTTPError(code, message or self.responses.get(code, ("error",))[0]))

    def answer_error(self, w, e):
        if e.close:
            self.close_connection = True
        if w.headers_sent:
            self.close_connection = True
            return
        w.send_error_reply(e)

    def close_unread(self, w):
        """After the answer: a body left unread must neither be parsed as the next request nor
        turn the close into a reset that destroys the answer, so linger-close."""
        req = self.req
        if req is not None and req.has_body() and not req.body_done and w.ended is None:
            w.linger()

    def send_header(self, keyword, value):
        """Buffer one header line (http.server's hook, without its per-line Connection checks:
        the writer decides the Connection header itself)."""
        self._headers_buffer.append(("%s: %s\r\n" % (keyword, value)).encode("latin-1"))

    def flush_headers(self):
        """Keep the head (end_headers calls this) so it leaves with the body in one write."""
        self._head = b"".join(self._headers_buffer)
        self._headers_buffer = []

    def take_head(self):
        head, self._head = self._head, b""
        return head

    def date_time_string(self, timestamp=None):
        """The Date header value, formatted once per second."""
        now = int(time.time())
        if _date_cache[0] != now:
            _date_cache[:] = [now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))]
        return _date_cache[1]

    def version_string(self):
        return self.server_version

    # ---------------------------------------------------------------- journal and log

    def journal_entry(self, w):
        """Put this request in the journal (once), as soon as its head and body are read."""
        req = self.req
        if w.entry is not None or req is None or (req.route is not None and req.route.name.startswith("control_")):
            return
        w.entry = self.server.journal.add(JournalEntry(self.client_address, req, self.served > 0))

    def end_entry(self, w):
        """The answer is over: its journal entry says how it went."""
        self.journal_entry(w)
        w.note_end()
        if w.entry is not None:
            self.server.journal.complete(w.entry)

    def requestline_text(self):
        req = self.req
        return "%s %s" % (req.method, mask_target(req.target)) if req else "(unparsed request)"

    def log_request(self, code="-", size="-"):
        log = self.server.log
        if log.enabled(1):
            req = self.req
            ms = (time.monotonic() - req.t0) * 1000 if req else 0.0
            log.info('%s "%s" %s %s %.1fms%s', self.peer, self.requestline_text(), code, size, ms,
                     " scenario=%s" % req.scenario if req is not None and req.scenario else "")

    def log_message(self, format, *args):
        self.server.log.info("%s " + format, self.peer, *args)


def mask_target(target):
    """A request target for the log, with ``?key=`` masked."""
    path, sep, query = target.partition("?")
    return path + sep + mask_query(query) if sep else target


def somaxconn(default=4096):
    """The system's listen backlog limit (as Go sizes its backlog), so a burst of connects isn't dropped."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(128, int(f.read().strip()))
    except (OSError, ValueError):
        return default


class MockServer(http.server.ThreadingHTTPServer):
    """The listening sockets, the connection threads, and the state every handler shares.

    The sockets are bound by bind_listener (or inherited across a restart), so
    HTTPServer.server_bind and its socket.getfqdn (which can stall on broken DNS) never run.
    """

    daemon_threads = True
    block_on_close = False  # idle keep-alive threads must not hold up a stop; drain() closes them instead

    def __init__(self, config, listeners, log, restarts=0, rules=None, router=None):
        """``listeners``: [(listening socket, TLS context or None)], the first one's URL is DP_MOCK_SERVER;
        ``router`` answers the routes (by default ROUTER, the route table's)."""
        sock = listeners[0][0]
        socketserver.BaseServer.__init__(self, sock.getsockname(), MockHandler)
        self.socket = sock
        self.address_family = sock.family
        self.server_name, self.server_port = sock.getsockname()[:2]
        self.listeners = listeners
        self.config, self.log, self.restarts = config, log, restarts
        self.router = ROUTER if router is None else router
        self.refused_prefixes = scenarios.BAD_KEY_PREFIXES + tuple(config.refuse_keys)  #: keys refused as invalid
        self.urls = [base_url(s, ctx is not None) for s, ctx in listeners]
        self.url = next((u for u in self.urls if u.startswith("http:")), self.urls[0])
        self.boot_id = os.urandom(16).hex()
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.wake_fd, self._wake_w = os.pipe()  #: readable once a stop is asked for: ends every pause
        self.restart_requested = False
        self._lock = threading.Lock()
        self._conns = {}  # accepted connection sockets not yet closed -> [handler, accepted at, TLS context]
        self._counter = itertools.count(1)
        self.request_count = 0
        self.active = 0
        self.files = FileStore()
        self.threads = ThreadStore()
        self.responses = ResponseStore()
        self.journal = Journal(config.journal_size)
        self.schedules = Schedules(config.seed)
        self.rules = rules or RuleBook(log)
        self.reload_rules = threading.Event()  #: set by SIGHUP: the watcher re-reads the rules files
        self.recorder = None  #: with --record, the Recorder that forwards and saves what no rule answers
        self.last_activity = time.monotonic()

    @property
    def stopping(self):
        return self.stop_event.is_set()

    def serve_forever(self, poll_interval=0.05):
        """Accept on every listening socket until a stop; each connection gets its own thread."""
        import selectors
        with selectors.DefaultSelector() as sel:
            for sock, ctx in self.listeners:
                sel.register(sock, selectors.EVENT_READ, ctx)
            while not self.stopping:
                for key, _ in sel.select(poll_interval):
                    try:
                        conn, addr = key.fileobj.accept()
                    except OSError:
                        continue
                    self.process_request(conn, addr, key.data)

    # ---------------------------------------------------------------- bookkeeping

    def process_request(self, request, client_address, tls=None):
        """Count the connection from the moment it is accepted, so a drain never misses it."""
        with self._lock:
            self._conns[request] = [None, time.monotonic(), tls]  # [handler once it runs, accepted at, TLS]
        super().process_request(request, client_address)

    def attach(self, handler):
        """Register a connection's handler; returns the TLS context to handshake with, or None."""
        with self._lock:
            entry = self._conns.get(handler.request)
            if entry is not None:
                entry[0] = handler
                return entry[2]
        return None

    def shutdown_request(self, request):
        try:
            super().shutdown_request(request)
        finally:
            with self._lock:
                self._conns.pop(request, None)

    def begin_request(self):
        self.last_activity = time.monotonic()
        with self._lock:
            self.active += 1
            self.request_count = next(self._counter)

    def end_request(self):
        self.last_activity = time.monotonic()
        with self._lock:
            self.active -= 1

    def handle_error(self, request, client_address):
        """Only unexpected errors reach here (handlers absorb disconnects): log one traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ClientGone)):
            self.log.debug("%s: connection ended: %s", client_address, exc.__class__.__name__)
            return
        self.log.error("unexpected error on a connection from %s:\n%s", client_address, format_exc())

    # ---------------------------------------------------------------- lifecycle

    def request_stop(self, why, restart=False):
        """Ask serve_forever to return; safe from handlers and signal handlers (never blocks)."""
        if self.stopping:
            return
        self.log.info("stopping: %s", why)
        self.restart_requested = restart
        self.stop_event.set()  # serve_forever sees it within its poll interval
        try:
            os.write(self._wake_w, b"x")  # every pause ends now
        except OSError:
            pass
        self.journal.wake_all()

    def close_pipe(self):
        """Close the wake pipe once no connection is left (after a drain that returned 0): a server made
        in a long-lived process (dpmock.serve, a restart in a thread) leaves no descriptor behind."""
        for fd in (self.wake_fd, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def drain(self, timeout=10.0):
        """After serve_forever: wait (bounded) until every connection has finished and closed.

        Idle keep-alive connections are woken and closed; busy ones finish their request
        (deliberate waits are cut short) and answer with Connection: close.
        Returns how many connections were still open at the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            with self._lock:
                conns = list(self._conns.items())
            for sock, (handler, accepted, _) in conns:
                # An idle keep-alive connection ends now; a fresh one first gets FRESH_GRACE to send
                # its request. Shutting the reading side wakes the handler's wait with an EOF (the
                # plain socket call: a TLS socket's own shutdown() would drop its TLS state).
                if handler is not None and handler.idle and (handler.served or now - accepted > FRESH_GRACE):
                    try:
                        socket.socket.shutdown(handler.request, socket.SHUT_RD)
                    except OSError:
                        pass
            if not conns or now >= deadline:
                return len(conns)
            time.sleep(0.01)


def base_url(sock, tls=False):
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return "%s://%s:%d" % ("https" if tls else "http", "[%s]" % host if ":" in host else host, port)


def tls_context(config):
    """The server-side TLS context for tls: listeners (ssl is imported only when one is used)."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise StartError("cannot load TLS certificate %s / key %s: %s"
                         % (config.tls_cert, config.tls_key, getattr(e, "strerror", None) or e))
    return ctx


def bind_listener(host, port, backlog=None):
    """Bind and listen (backlog: the system's somaxconn); raises OSError with a plain message."""
    try:
        # An ASCII host goes as bytes: a str is IDNA-encoded, which loads unicodedata on every start.
        name = host.encode("ascii") if host.isascii() else host
        infos = socket.getaddrinfo(name, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(errno.EADDRNOTAVAIL, "cannot resolve host %r: %s" % (host, e.strerror))
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog or somaxconn())
    except OSError:
        sock.close()
        raise
    return sock
