"""The in-process API: ``with dpmock.serve(rules=[...], port=0) as mock:`` runs a server for a Python test suite.

The server runs in a thread of the calling process, not in a child process: it is ready in a few
milliseconds (no second interpreter to start), it cannot outlive the tests (a child would be orphaned
when the runner is killed), and it needs no port file or pid file. What a thread costs: the server
shares the GIL with the tests, so a test that spins the CPU delays its answers (paced streams keep
their own clock and catch up), and what would end a process does not: in a thread, /_control/restart
starts a fresh server on the same socket, and /_control/shutdown stops the server, not the tests.
``Mock.attach(url)`` drives a server that runs elsewhere (``python3 dpmock.py``) with the same methods.

Every helper goes through the control endpoints over HTTP, as dpmockctl does, so a rule, a reset or
the journal mean the same here as on the command line.
"""

import http.client
import json
import os
import sys
import threading
from urllib.parse import quote, urlencode, urlsplit

#: The base URL each provider's official SDK takes, as a path after the server's URL (or a test's
#: /_t/NAME prefix): openai's ``base_url`` ends in /v1; anthropic's and google-genai's take the bare host
#: (they add /v1 and /v1beta themselves).
SDK_BASE_PATHS = {"openai": "/v1", "anthropic": "", "gemini": ""}
#: The base URL the C library (Disaster Party) and other clients that name the API version take.
VERSIONED_BASE_PATHS = {"openai": "/v1", "anthropic": "/v1", "gemini": "/v1beta"}
#: Options that make no sense for a server in a thread of the tests' process.
_NOT_IN_A_THREAD = ("--pidfile", "--parent-pid", "--port-file", "--help", "-h", "--version")


class DpmockError(Exception):
    """A control request failed: a bad rule (the message names the field), or no server at the URL."""


class _Stderr:
    """The log's stream: whatever sys.stderr is at the moment of writing (pytest swaps it per test)."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


class Mock:
    """A dpmock server (or one test's view of it, ``for_test``): its URLs, rules, journal and reset."""

    def __init__(self, url, test=None, _runner=None, owner=False):
        self.url = url.rstrip("/")
        self.test = test  #: the test namespace this view's requests and helpers belong to (None: all)
        self._runner = _runner  #: the thread serving it, when it runs in this process
        self._owner = owner  #: whether close() stops it: the Mock serve() returned, not a test's view
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port or (443 if self._https else 80)

    # ---- where clients point

    @property
    def root(self):
        """The URL a client of this test uses in place of the provider's host: with a test, /_t/NAME."""
        return self.url + ("/_t/%s" % quote(self.test, safe="") if self.test else "")

    def base_url(self, provider, versioned=False):
        """The base URL for ``provider`` (openai, anthropic, gemini) as its official Python SDK takes it
        (openai: .../v1; anthropic and gemini: the bare root); ``versioned=True``: with the API version
        every provider (.../v1, .../v1, .../v1beta), as the C library's *_API_BASE_URL variables take it."""
        table = VERSIONED_BASE_PATHS if versioned else SDK_BASE_PATHS
        if provider not in table:
            raise ValueError("provider must be one of %s, not %r" % (", ".join(sorted(table)), provider))
        return self.root + table[provider]

    @property
    def headers(self):
        """Headers that put a request in this test's namespace (for clients that set headers, not URLs)."""
        return {"X-DP-Test-Id": self.test} if self.test else {}

    def for_test(self, name):
        """This server, seen from test ``name``: its own rules, counters and journal."""
        return Mock(self.url, name, self._runner)  # a view: its close() leaves the server running

    # ---- control

    def _call(self, method, path, query=None, body=None):
        runner = self._runner
        if runner is not None and not runner.thread.is_alive():
            raise DpmockError("the dpmock server in this process has stopped: %s" % (runner.ended or "it was closed"))
        query = dict(query or {})
        if self.test is not None:
            query.setdefault("test", self.test)
        target = path + ("?" + urlencode(query) if query else "")
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=70)
        try:
            data = None if body is None else json.dumps(body).encode("utf-8")
            conn.request(method, target, body=data if data is not None else (b"" if method == "POST" else None),
                         headers={"Content-Type": "application/json", "User-Agent": "dpmocklib.api"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise DpmockError("cannot reach dpmock at %s: %s" % (self.url, getattr(e, "strerror", None) or e))
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = raw.decode("utf-8", "replace")
        if resp.status != 200:
            message = answer.get("error", {}).get("message") if isinstance(answer, dict) and isinstance(
                answer.get("error"), dict) else answer
            raise DpmockError("dpmock answered %d to %s %s: %s" % (resp.status, method, path, message))
        return answer

    def add_rules(self, rules):
        """Add one rule (a dict) or a list of them, for this test (or every test); returns their ids.
        A bad rule raises DpmockError naming the field, and none of the list is added."""
        return self._call("POST", "/_control/rules", body=rules)["ids"]

    add_rule = add_rules

    def rules(self):
        """The rules in force: this test's and the global ones (each with its source and hits)."""
        return self._call("GET", "/_control/rules")["rules"]

    def clear_rules(self):
        """Remove the rules added at run time (of this test only, for a test's view); returns how many."""
        return self._call("DELETE", "/_control/rules")["cleared"]

    def requests(self, wait_for=0, timeout=10.0, **filters):
        """Journal entries (oldest first) of this test, filtered by path, route, scenario, key, rule or
        source; ``wait_for=N`` waits (up to ``timeout`` s) until N match. Each entry is the JSON of
        ``GET /_control/requests``: method, path, query, headers (keys masked), body, status, route, ..."""
        query = {k: v for k, v in filters.items() if v is not None}
        query.update(limit=10 ** 6)
        if wait_for:
            query.update(wait_for=wait_for, timeout=timeout)
        return self._call("GET", "/_control/requests", query)["requests"]

    def last_request(self, **filters):
        """The newest matching journal entry, or None."""
        found = self.requests(**filters)
        return found[-1] if found else None

    def reset(self):
        """Clear the journal, schedule counters and rule hits (this test's only, for a test's view)."""
        return self._call("POST", "/_control/reset")

    def status(self):
        return self._call("GET", "/_control/status")

    # ---- lifetime

    @classmethod
    def attach(cls, url=None):
        """A Mock for a server already running at ``url`` (default: $DP_MOCK_SERVER)."""
        url = url or os.environ.get("DP_MOCK_SERVER")
        if not url:
            raise DpmockError("no URL given and DP_MOCK_SERVER is not set")
        mock = cls(url)
        mock.status()
        return mock

    def close(self):
        """Stop the server serve() started (waits for in-flight requests); a no-op for a test's view
        (``for_test``, the pytest fixture) and for an attached server."""
        if self._owner and self._runner is not None:
            self._runner.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return "<dpmock %s%s>" % (self.url, " test %s" % self.test if self.test else "")


class _Runner:
    """The thread that serves: a MockServer on the bound sockets, made again on /_control/restart."""

    def __init__(self, config, socks, router, rules):
        from .cli import start_server
        from .daemon import watch
        from .log import Log
        self.config, self.socks, self.router, self.rules = config, socks, router, rules
        self._start, self._watch = start_server, watch
        self.log = Log(open(config.logfile, "a", buffering=1, encoding="utf-8") if config.logfile else _Stderr(),
                       config.verbosity)
        self._lock = threading.Lock()
        self._stopped = False
        self.ended = None  #: why the thread stopped serving on its own (a shutdown, --idle-exit, a failed restart)
        try:
            self.server = self._make(0)
        except BaseException:
            self._close_log()
            raise
        self.thread = threading.Thread(target=self._serve, name="dpmock-server", daemon=True)
        self.thread.start()

    def _make(self, restarts):
        """A server with serve()'s own rules, which a restart keeps (as the command line keeps --rules files)."""
        from .rules import RuleError
        server = self._start(self.config, self.socks, self.log, restarts, self.router)
        if self.rules:
            try:
                server.rules.add(self.rules, None)
            except RuleError as e:
                server.close_pipe()
                raise DpmockError("bad rule: %s" % e) from None
        return server

    def _serve(self):
        server = self.server
        try:
            while True:
                self._watch(server, self.config)
                try:
                    server.serve_forever(poll_interval=0.05)
                finally:
                    if not server.drain():
                        server.close_pipe()
                    self.log.flush()
                with self._lock:
                    if not server.restart_requested or self._stopped:
                        self.ended = self.ended or "it was stopped (a shutdown or --idle-exit)"
                        return
                try:  # a restart: fresh state on the same socket, as the command line's re-exec gives
                    new = self._make(server.restarts + 1)
                except Exception as e:  # noqa: BLE001 - a rules file broken since the start: report, stop
                    self.log.error("restart failed: %s", e)
                    self.ended = "its restart failed: %s" % e
                    return
                with self._lock:
                    self.server = server = new
                    if self._stopped:  # close() came during the restart: stop the new one too
                        server.request_stop("the in-process API closed it")
        finally:
            if not self._stopped:  # stopped on its own: refuse connections now rather than leave them hanging
                for s in self.socks:
                    s.close()

    def stop(self):
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self.server.request_stop("the in-process API closed it")
        self.thread.join(15)
        for s in self.socks:
            s.close()
        self._close_log()

    def _close_log(self):
        self.log.close()
        if self.config.logfile and hasattr(self.log.stream, "close"):
            self.log.stream.close()


def serve(rules=(), port=0, host="127.0.0.1", args=(), verbose=False, router=None):
    """Start dpmock in a thread of this process; returns a Mock (a context manager that stops it).

    ``rules``: rule dicts, added for every test (files and folders go in ``args`` as --rules PATH);
    ``args``: more command-line options (``["--seed", "7", "--strict"]``); ``verbose``: log each request
    to stderr (else only errors); ``router``: a Router in place of the route table. A bad option or rule
    raises DpmockError (ValueError for a bad argument type).
    """
    from .base import StartError
    from .config import UsageError, parse_args
    from .server import bind_listener
    args = [str(a) for a in args]
    refused = [a for a in args if a.split("=")[0] in _NOT_IN_A_THREAD]
    if refused:
        raise DpmockError("%s is for the command line, not for a server in a thread" % refused[0])
    loud = verbose or any(a in ("-v", "-q", "--verbose", "--quiet") for a in args)  # theirs win over the default
    argv = ["--foreground", "--host", str(host), "--port", str(int(port))] + ([] if loud else ["-q"]) + args
    try:
        config = parse_args(argv)
    except UsageError as e:
        raise DpmockError(str(e)) from None
    rules = [rules] if isinstance(rules, dict) else list(rules or ())
    socks = []
    try:
        for tls, h, p in config.listens:
            socks.append(bind_listener(h, p))
        runner = _Runner(config, socks, router, rules)
    except (OSError, StartError, DpmockError) as e:
        for s in socks:
            s.close()
        if isinstance(e, DpmockError):
            raise
        raise DpmockError("cannot start dpmock: %s" % (getattr(e, "strerror", None) or e)) from None
    return Mock(runner.server.url, None, runner, owner=True)
