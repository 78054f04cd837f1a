#!/usr/bin/env python3
"""dpmock: a standard-library-only mock of the OpenAI, Gemini and Anthropic HTTP APIs.

Usage:
    python3 dpmock.py [--host 127.0.0.1] [--port 8080] [--listen [tls:][HOST:]PORT]...
                      [--tls-cert PATH --tls-key PATH] [--foreground]
                      [--pidfile PATH] [--logfile PATH] [--port-file PATH]
                      [--idle-exit SECONDS] [--parent-pid PID] [--journal-size N]
                      [--seed N] [--io-timeout SECONDS] [-q | -v] [--version]
    python3 dpmock.py sandbox [options above] -- CMD [ARGS...]

By default it detaches (double fork + setsid) and the launching process exits 0 only once
the daemon is serving, after printing ``DP_MOCK_SERVER=http://HOST:PORT``. ``sandbox`` runs
CMD offline in new mount and network namespaces where the providers' hosts are dpmock.

Exit codes: 0 started (or, in the foreground, stopped cleanly); 1 could not start (address
in use, bad host, pidfile locked, log file unwritable); 2 bad command line. ``sandbox``
returns CMD's status, or 125 when the sandbox cannot be made.
"""

import binascii
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
from collections import namedtuple

if sys.version_info < (3, 8):  # checked before anything 3.7 lacks: one line, not an AttributeError
    sys.stderr.write("dpmock needs Python 3.8 or newer (this is %d.%d)\n" % tuple(sys.version_info[:2]))
    raise SystemExit(2)


def _cannot_start(exc):
    """Run as a script, the code cannot load (a broken scenarios.py, say): say why in one line, exit 1.

    After a restart (re-exec) nobody reads stderr, so the line goes to --logfile too, and what the
    old process left (the pid file, whose lock this process inherited, and the port file) is
    removed: the server is gone, and nothing claims it runs. The environment names are ENV_* below.
    """
    if isinstance(exc, SyntaxError):
        where, what = (exc.filename, exc.lineno), exc.msg
    else:
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where, what = (tb.tb_frame.f_code.co_filename, tb.tb_lineno), str(exc)
    line = "cannot start: %s line %s: %s: %s" % (where[0], where[1], type(exc).__name__, what)
    argv = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    paths = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--logfile", "--pidfile", "--port-file"):
            paths[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    sys.stderr.write("dpmock: %s\n" % line)
    if paths.get("--logfile"):
        try:
            with open(paths["--logfile"], "a", encoding="utf-8") as f:
                f.write("%s dpmock[%d] %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), os.getpid(), line))
        except OSError:
            pass
    inherited = os.environ.get("DPMOCK_PIDFILE_FD")
    try:
        if inherited and paths.get("--pidfile"):
            held, named = os.fstat(int(inherited)), os.stat(paths["--pidfile"])
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                os.unlink(paths["--pidfile"])
        if os.environ.get("DPMOCK_LISTEN_FD") and paths.get("--port-file"):
            os.unlink(paths["--port-file"])
    except (OSError, ValueError):
        pass
    raise SystemExit(1)


try:
    import scenarios
    from scenarios import ByProvider, Reply, Stream, Upload
except Exception as e:  # noqa: BLE001 - whatever stops the catalogue loading stops the server
    if __name__ != "__main__":
        raise
    _cannot_start(e)

__version__ = "0.1.0"

#: Absolute path of this script, taken before any chdir, for re-execution.
SCRIPT = os.path.abspath(__file__)


################################################################################
# Config and CLI
################################################################################

class Config:
    """Server settings, as parsed from the command line."""

    def __init__(self, host="127.0.0.1", port=8080, foreground=False, pidfile=None, logfile=None, verbosity=1,
                 port_file=None, idle_exit=0.0, parent_pid=0, journal_size=1000, seed=None, listens=None,
                 tls_cert=None, tls_key=None, io_timeout=120, refuse_keys=()):
        self.host, self.port, self.foreground = host, port, foreground
        self.pidfile, self.logfile = pidfile, logfile
        self.verbosity = verbosity  #: 0 quiet (errors only), 1 one line per request, 2 debug
        self.port_file, self.idle_exit, self.parent_pid = port_file, idle_exit, parent_pid
        self.journal_size = journal_size
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        #: listening addresses, [(tls, host, port)]; the first plain one is DP_MOCK_SERVER
        self.listens = listens or [(False, host, port)]
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.io_timeout = io_timeout  #: seconds a connection may sit without reading or writing
        self.refuse_keys = tuple(refuse_keys)  #: --refuse-key prefixes, refused besides scenarios.BAD_KEY_*

    def to_argv(self):
        """Command-line arguments that rebuild this config (used by restart)."""
        argv = ["--host", self.host]
        for tls, host, port in self.listens:
            argv += ["--listen", "%s%s:%d" % ("tls:" if tls else "", "[%s]" % host if ":" in host else host, port)]
        if self.tls_cert:
            argv += ["--tls-cert", self.tls_cert, "--tls-key", self.tls_key]
        if self.foreground:
            argv.append("--foreground")
        if self.pidfile:
            argv += ["--pidfile", self.pidfile]
        if self.logfile:
            argv += ["--logfile", self.logfile]
        if self.port_file:
            argv += ["--port-file", self.port_file]
        if self.idle_exit:
            argv += ["--idle-exit", repr(self.idle_exit)]
        if self.parent_pid:
            argv += ["--parent-pid", str(self.parent_pid)]
        argv += ["--journal-size", str(self.journal_size), "--seed", str(self.seed),
                 "--io-timeout", str(self.io_timeout)]
        for prefix in self.refuse_keys:
            argv += ["--refuse-key", prefix]
        argv += {0: ["-q"], 1: [], 2: ["-v"]}[self.verbosity]
        return argv


USAGE = """usage: dpmock.py [--host HOST] [--port PORT] [--listen [tls:][HOST:]PORT]...
                 [--tls-cert PATH --tls-key PATH] [--foreground] [--pidfile PATH]
                 [--logfile PATH] [--port-file PATH] [--idle-exit SECONDS]
                 [--parent-pid PID] [--journal-size N] [--seed N] [--io-timeout SECONDS]
                 [--refuse-key PREFIX]... [-q | -v] [--version]"""

HELP = USAGE + """
       dpmock.py sandbox [options above] -- CMD [ARGS...]

Mock the OpenAI, Gemini and Anthropic HTTP APIs. The sandbox form runs CMD offline, in new
mount and network namespaces where the providers' hosts resolve to dpmock (HTTPS on 443,
HTTP on 80 and 8080), and returns its exit status. Started by a user other than root, CMD
runs as uid 0 inside (a user namespace maps that user to root there, and only there).

options:
  --host HOST      address to bind (default 127.0.0.1)
  --port PORT      port to bind; 0 picks a free one (default 8080)
  --listen [tls:][HOST:]PORT
                   listen here too (repeatable; with --listen and no --port, only there);
                   tls: serves HTTPS (HTTP/1.1, ALPN http/1.1)
  --tls-cert PATH, --tls-key PATH
                   certificate chain and key for tls: listeners (default: certs/server.pem
                   and certs/server.key beside dpmock.py, the sandbox's test certificate)
  --foreground     stay attached and log to stderr (default: detach as a daemon)
  --pidfile PATH   write the pid here, held with flock
  --logfile PATH   append the log here (a daemon logs nothing without it)
  --port-file PATH write the port here (atomically) once serving; removed at exit
  --idle-exit SECONDS  stop after no request for this long
  --parent-pid PID stop when this process is gone
  --journal-size N requests kept in the journal (default 1000; 0 keeps none)
  --seed N         seed for random scenario choices (default: random, shown in status)
  --io-timeout SECONDS  close a connection idle (or stalled) this long (default 120)
  --refuse-key PREFIX  answer keys starting with PREFIX as invalid (401), like the
                   built-in dummy_key and invalid... (repeatable)
  -q, --quiet      log errors only
  -v, --verbose    log debug lines too
  --version        print the version and exit
  -h, --help       show this help and exit"""

#: Options that take a value, and flags, by every spelling.
_VALUE_OPTIONS = {"--host": "host", "--port": "port", "--pidfile": "pidfile", "--logfile": "logfile",
                  "--port-file": "port_file", "--idle-exit": "idle_exit", "--parent-pid": "parent_pid",
                  "--journal-size": "journal_size", "--seed": "seed", "--io-timeout": "io_timeout",
                  "--tls-cert": "tls_cert", "--tls-key": "tls_key"}
_REPEATED = ("--listen", "--refuse-key")  #: options given once per value
_FLAGS = {"--foreground": "foreground", "-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose"}


class UsageError(Exception):
    """A bad command line; the message is one line."""


def parse_listen(spec, default_host):
    """``[tls:][HOST:]PORT`` -> (tls, host, port)."""
    tls = spec.startswith("tls:")
    rest = spec[4:] if tls else spec
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]") if sep else default_host
    if not is_digits(port) or not 0 <= int(port) <= 65535 or (sep and not host):
        raise UsageError("--listen takes [tls:][HOST:]PORT, not %r" % spec)
    return tls, host, int(port)


def parse_args(argv):
    """Parse the command line into a Config; paths become absolute (the daemon chdirs to /).

    Hand-written rather than argparse: argparse's help formatter imports shutil, locale and
    gettext on every start, several milliseconds of a ~45 ms start-up.
    """
    values = {"host": "127.0.0.1", "port": "8080", "pidfile": None, "logfile": None, "port_file": None,
              "idle_exit": "0", "parent_pid": "0", "journal_size": "1000", "seed": None, "tls_cert": None,
              "tls_key": None, "io_timeout": "120"}
    flags = set()
    listens, refuse, given = [], [], set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(HELP)
            raise SystemExit(0)
        if arg == "--version":
            print("dpmock " + __version__)
            raise SystemExit(0)
        name, eq, value = arg.partition("=")
        if name in _VALUE_OPTIONS or name in _REPEATED:
            if not eq:
                # "-1" is a (bad) value, not an option: the range check below says what is valid
                if not args or args[0].startswith("-") and args[0] != "-" and not args[0][1:2].isdigit():
                    raise UsageError("%s needs a value" % name)
                value = args.pop(0)
            given.add(name)
            if name == "--listen":
                listens.append(value)
            elif name == "--refuse-key":
                if not value:
                    raise UsageError("--refuse-key needs a non-empty key prefix")
                refuse.append(value)
            else:
                values[_VALUE_OPTIONS[name]] = value
        elif arg in _FLAGS:
            flags.add(_FLAGS[arg])
        else:
            raise UsageError("unrecognized argument %r" % arg)
    if {"quiet", "verbose"} <= flags:
        raise UsageError("-q and -v exclude each other")

    def number(option, low, high, kind=int):
        raw = values[_VALUE_OPTIONS[option]]
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise UsageError("%s must be a number from %s to %s, not %r" % (option, low, high, raw))
        return value

    def path(name):
        return os.path.abspath(values[name]) if values[name] else None
    seed = number("--seed", 0, 2 ** 31 - 1) if values["seed"] is not None else None
    port = number("--port", 0, 65535)
    addresses = [parse_listen(spec, values["host"]) for spec in listens]
    if not addresses or "--port" in given:
        addresses.insert(0, (False, values["host"], port))
    cert, key = path("tls_cert"), path("tls_key")
    if bool(cert) != bool(key):
        raise UsageError("--tls-cert and --tls-key go together")
    if any(tls for tls, _, _ in addresses) and not cert:
        cert, key = (os.path.join(os.path.dirname(SCRIPT), "certs", name) for name in ("server.pem", "server.key"))
    return Config(host=values["host"], port=port, foreground="foreground" in flags, listens=addresses,
                  tls_cert=cert, tls_key=key,
                  pidfile=path("pidfile"), logfile=path("logfile"), port_file=path("port_file"),
                  idle_exit=number("--idle-exit", 0, 10 ** 7, float), parent_pid=number("--parent-pid", 0, 2 ** 31),
                  journal_size=number("--journal-size", 0, 10 ** 6), seed=seed,
                  io_timeout=number("--io-timeout", 1, 86400), refuse_keys=refuse,
                  verbosity=0 if "quiet" in flags else 2 if "verbose" in flags else 1)


################################################################################
# Routing
################################################################################

BODY_NONE, BODY_JSON, BODY_STREAM = "none", "json", "stream"
OPENAI, ANTHROPIC, GEMINI = "openai", "anthropic", "gemini"


class Route(namedtuple("Route", "method pattern name body handler provider versioned")):
    """One row of the route table.

    ``pattern`` is the path after any version prefix, with ``{name}`` placeholders; ``name``
    is the key scenarios.py uses; ``body`` is BODY_NONE, BODY_JSON (read and parsed) or
    BODY_STREAM (the handler reads it in pieces: counted or parsed, never held whole);
    ``handler`` names a module-level function; ``provider`` is OPENAI, ANTHROPIC, GEMINI,
    None for paths the providers share (told apart per request) or "" for dpmock's own;
    ``versioned`` routes are also served under /v1, /v1beta, /v1alpha and /v1beta1.
    """

    __slots__ = ()

    def __new__(cls, method, pattern, name, body, handler, provider, versioned=True):
        return super().__new__(cls, method, pattern, name, body, handler, provider, versioned)


_GEMINI_MODEL = "/models/{model}"
_VERTEX_MODEL = "/projects/{project}/locations/{location}/publishers/{publisher}/models/{model}"
_EXPRESS_MODEL = "/publishers/{publisher}/models/{model}"

ROUTES = (
    Route("POST", "/chat/completions", "chat", BODY_JSON, "handle_openai_chat", OPENAI),
    Route("POST", "/images/generations", "images", BODY_JSON, "handle_openai_images", OPENAI),
    Route("POST", "/files", "files", BODY_STREAM, "handle_openai_file_upload", OPENAI),
    Route("POST", "/messages", "messages", BODY_JSON, "handle_anthropic_messages", ANTHROPIC),
    Route("POST", "/messages/count_tokens", "messages_count_tokens", BODY_JSON, "handle_anthropic_count_tokens",
          ANTHROPIC),
    Route("POST", _GEMINI_MODEL + ":generateContent", "gemini_generate", BODY_JSON, "handle_gemini_generate", GEMINI),
    Route("POST", _GEMINI_MODEL + ":streamGenerateContent", "gemini_stream", BODY_JSON, "handle_gemini_generate",
          GEMINI),
    Route("POST", _GEMINI_MODEL + ":countTokens", "gemini_count_tokens", BODY_JSON, "handle_gemini_count_tokens",
          GEMINI),
    Route("POST", _GEMINI_MODEL + ":predict", "gemini_predict", BODY_JSON, "handle_gemini_predict", GEMINI),
    Route("POST", _VERTEX_MODEL + ":predict", "gemini_predict", BODY_JSON, "handle_gemini_predict", GEMINI),
    Route("POST", _EXPRESS_MODEL + ":predict", "gemini_predict", BODY_JSON, "handle_gemini_predict", GEMINI),
    Route("POST", _EXPRESS_MODEL + ":generateContent", "gemini_generate", BODY_JSON, "handle_gemini_generate", GEMINI),
    Route("POST", _EXPRESS_MODEL + ":streamGenerateContent", "gemini_stream", BODY_JSON, "handle_gemini_generate",
          GEMINI),
    Route("POST", "/files:upload", "gemini_upload", BODY_STREAM, "handle_gemini_upload_raw", GEMINI),
    Route("POST", "/upload/files", "gemini_upload_media", BODY_STREAM, "handle_gemini_upload", GEMINI),
    Route("GET", "/models", "models", BODY_NONE, "handle_models_list", None),
    Route("GET", "/models/{model}", "models_get", BODY_NONE, "handle_model_get", None),
    Route("GET", "/files", "files_list", BODY_NONE, "handle_files_list", None),
    Route("GET", "/files/{file_id}", "files_get", BODY_NONE, "handle_file_get", None),
    Route("DELETE", "/files/{file_id}", "files_delete", BODY_NONE, "handle_file_delete", None),
    Route("GET", "/_images/{image}", "image_png", BODY_NONE, "handle_image_png", "", versioned=False),
    Route("GET", "/_control/status", "control_status", BODY_NONE, "handle_control_status", "", versioned=False),
    Route("GET", "/_control/requests", "control_requests", BODY_NONE, "handle_control_requests", "",
          versioned=False),
    Route("DELETE", "/_control/requests", "control_requests_clear", BODY_NONE, "handle_control_requests_clear", "",
          versioned=False),
    Route("GET", "/_control/schedules", "control_schedules", BODY_NONE, "handle_control_schedules", "",
          versioned=False),
    Route("POST", "/_control/reset", "control_reset", BODY_NONE, "handle_control_reset", "", versioned=False),
    Route("POST", "/_control/shutdown", "control_shutdown", BODY_NONE, "handle_control_shutdown", "",
          versioned=False),
    Route("POST", "/_control/restart", "control_restart", BODY_NONE, "handle_control_restart", "",
          versioned=False),
)

#: Version prefixes the tests exercise (the C library sends bare paths; SDKs /v1 or /v1beta).
PREFIXES = ("", "/v1", "/v1beta")
#: Version segments; google-genai also uses /v1alpha and, in Vertex express mode, /v1beta1.
_VERSIONS = ("v1", "v1beta", "v1alpha", "v1beta1")

# Routes are matched by path segments, not regexes: compiling a regex per route would cost
# milliseconds at every start. A pattern segment is a literal, "{name}" or "{name}:action".
_EXACT = {}  # path -> {method: route}
_PATTERNS = {}  # segment count -> [(segments, {method: route})]
for _r in ROUTES:
    if "{" not in _r.pattern:
        _EXACT.setdefault(_r.pattern, {})[_r.method] = _r
        continue
    _segs = tuple(_r.pattern.split("/"))
    _same = _PATTERNS.setdefault(len(_segs), [])
    for _known, _methods in _same:
        if _known == _segs:
            _methods[_r.method] = _r
            break
    else:
        _same.append((_segs, {_r.method: _r}))


def _match_segments(pattern, segments):
    """Placeholder values if a path's segments fit a pattern's, else None."""
    params = {}
    for want, got in zip(pattern, segments):
        if want[:1] != "{":
            if want != got:
                return None
            continue
        name, _, action = want[1:].partition("}")
        if action:
            value, sep, got_action = got.rpartition(":")
            if not sep or ":" + got_action != action:
                return None
        else:
            value = got
        if not value or ":" in value:
            return None
        params[name] = percent_decode(value)
    return params


def percent_decode(text, plus=False):
    """URL percent-decoding (UTF-8), with ``+`` as space in query strings."""
    if plus:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    parts = text.split("%")
    out = bytearray(parts[0].encode("utf-8"))
    for part in parts[1:]:
        try:
            out += bytes.fromhex(part[:2]) if len(part) >= 2 else b"%" + part.encode("utf-8")
            out += part[2:].encode("utf-8") if len(part) >= 2 else b""
        except ValueError:
            out += b"%" + part.encode("utf-8")
    return out.decode("utf-8", "replace")


def parse_query(query):
    """{name: [values]} of a query string, blank values kept (as urllib.parse.parse_qs does)."""
    out = {}
    for pair in query.split("&"):
        if pair:
            k, _, v = pair.partition("=")
            out.setdefault(percent_decode(k, True), []).append(percent_decode(v, True))
    return out


def match(method, path):
    """Return (route, params) for a request, or raise HTTPError 404 / 405 (with Allow)."""
    upload = path.startswith("/upload/")  # Gemini media uploads: /upload/v1beta/files
    segments = path.split("/")[2 if upload else 1:]
    versioned = False
    for _ in range(2):  # the C library may send /v1beta/v1/files:upload
        if len(segments) > 1 and segments[0] in _VERSIONS:
            segments = segments[1:]
            versioned = True
    stripped = ("/upload/" if upload else "/") + "/".join(segments)
    candidates = []
    methods = _EXACT.get(stripped)
    if methods is not None:
        candidates.append((methods, {}))
    else:
        for pattern, methods in _PATTERNS.get(stripped.count("/") + 1, ()):
            params = _match_segments(pattern, stripped.split("/"))
            if params is not None:
                candidates.append((methods, params))
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
MAX_FIELD = 64 * 1024  #: a non-file multipart field or upload metadata body kept in memory
PIECE = 65536  #: request bodies are read in pieces of this size
JOURNAL_BODY = 16384  #: request body bytes kept in each journal entry
LINGER_SECONDS = 2.0  #: how long an unread upload is drained after its answer before closing
FRESH_GRACE = 1.0  #: at a stop, how long a just-accepted connection may take to send its request
HANDSHAKE_TIMEOUT = 10.0  #: how long a TLS client may take to finish its handshake


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

    __slots__ = ("method", "target", "version", "path", "query_string", "query", "headers", "route", "params",
                 "provider", "length", "chunked", "json", "body_done", "captured", "body_bytes", "scenario", "t0",
                 "scheme")

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        if target.startswith(("http://", "https://")):  # absolute form, as sent to a proxy
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = target.partition("#")[0].partition("?")
        self.path = path or "/"
        self.query_string = query
        self.query = parse_query(query)
        self.route, self.params, self.provider = None, {}, None
        self.length, self.chunked = None, False
        self.json, self.body_done = None, False
        self.captured, self.body_bytes = bytearray(), 0  #: the body's first JOURNAL_BODY bytes, its size
        self.scenario = None
        self.t0 = time.monotonic()
        self.scheme = "http"

    def arg(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default

    def has_body(self):
        return self.chunked or (self.length or 0) > 0

    def origin(self):
        """scheme://host[:port] as the client addressed this server (for URLs it will follow)."""
        return "%s://%s" % (self.scheme, self.headers.get("host") or "127.0.0.1")


def _bearer(value):
    return value[7:] if value[:7].lower() == "bearer " else value


def request_key(req):
    """The API key, looked up where the Flask mock looked (Anthropic routes: x-api-key first)."""
    return find_key(req.headers, req.route, req.query)


def find_key(h, route, query):
    if route is not None and route.provider == ANTHROPIC:
        sources = (h.get("x-api-key"), h.get("authorization"))
    else:
        sources = (h.get("authorization"), h.get("x-api-key"), h.get("x-goog-api-key"), (query.get("key") or [None])[0])
    for value in sources:
        if value is not None:
            return _bearer(value.strip())
    return None


def select_scenario(req):
    """(spec, scenario, params) chosen by X-DP-Scenario, else by a key naming a scenario; else Nones.

    Both may carry parameters: ``STREAM_SLOW; ttft_ms=200; tps=20``. A bad one is a 400 naming it.
    """
    explicit = req.headers.get("x-dp-scenario")
    spec = explicit.strip() if explicit is not None else (request_key(req) or "")
    if explicit is None and scenarios.get(spec.split(";")[0].strip()) is None:
        return None, None, {}
    try:
        scenario, params = scenarios.resolve(spec)
    except KeyError as e:
        raise HTTPError(400, "unknown scenario %r in X-DP-Scenario; known: %s"
                        % (e.args[0], ", ".join(scenarios.names())), "unknown_scenario")
    except ValueError as e:
        raise HTTPError(400, "bad scenario parameter: %s" % e, "bad_scenario_parameter")
    return spec, scenario, params


def detect_provider(req):
    """Which provider a request on a shared path (GET /models, /files/...) is meant for."""
    h = req.headers
    if "anthropic-version" in h or "x-api-key" in h:
        return ANTHROPIC
    if "x-goog-api-key" in h or req.arg("key") is not None or req.path.startswith(("/v1beta/", "/v1alpha/")):
        return GEMINI
    return OPENAI


################################################################################
# Provider conventions: ids, times, tokens, errors, keys, models
################################################################################

_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                          403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                          413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
                          529: "overloaded_error"}
_GEMINI_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                    408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                    499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
                    504: "DEADLINE_EXCEEDED"}


class HTTPError(Exception):
    """Raised anywhere in request handling; rendered in the provider's own error shape."""

    def __init__(self, status, message, code=None, headers=(), close=False, etype=None, param=None, details=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.close = headers, close
        self.etype, self.param, self.details = etype, param, details

    def body(self, provider, request_id=None):
        if provider == ANTHROPIC:
            body = {"type": "error", "error": {
                "type": self.etype or _ANTHROPIC_ERROR_TYPES.get(self.status,
                                                                 "api_error" if self.status >= 500 else
                                                                 "invalid_request_error"),
                "message": self.message}}
            if request_id:
                body["request_id"] = request_id
            return body
        if provider == GEMINI:
            err = {"code": self.status, "message": self.message,
                   "status": self.etype or _GEMINI_STATUSES.get(self.status,
                                                                "INTERNAL" if self.status >= 500 else
                                                                "FAILED_PRECONDITION")}
            if self.details:
                err["details"] = self.details
            return {"error": err}
        etype = self.etype or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": etype, "param": self.param, "code": self.code}}


def invalid(message, param=None, code=None):
    """A 400 for a request the provider would refuse; the message names the field."""
    return HTTPError(400, message, code, param=param)


_ID_PREFIX = os.urandom(4).hex()  #: differs per process, so ids stay unique across restarts
_ID_COUNTER = itertools.count(1)


def new_id(prefix, nbytes=12):
    """A unique id of ``2 * nbytes`` hex digits: no system call per id (they are made per request)."""
    return "%s%s%0*x" % (prefix, _ID_PREFIX, 2 * nbytes - 8, next(_ID_COUNTER))


def rfc3339(t, fraction=True):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return stamp + (".%06dZ" % int((t % 1) * 1e6) if fraction else "Z")


_WORDS = r"\S+"  #: a token (patterns compile on first use, not at start-up)
_PIECES = r"\S+\s*"  #: a token with the spaces after it
MEDIA_TOKENS = 85  #: what one image, document or file part counts in a prompt


def count_tokens(texts, media=0):
    """dpmock's token rule: one token per run of non-space characters, MEDIA_TOKENS per media part."""
    return max(1, sum(len(re.findall(_WORDS, t)) for t in texts) + MEDIA_TOKENS * media)


#: Key prefixes refused as invalid: scenarios.BAD_KEY_PREFIXES plus --refuse-key (set by main).
REFUSED_KEY_PREFIXES = scenarios.BAD_KEY_PREFIXES


def check_key(req):
    """Refuse a missing key, or a bad one (scenarios.BAD_KEYS, REFUSED_KEY_PREFIXES), as the provider does."""
    key = request_key(req)
    p = req.provider
    if not key:
        if p == ANTHROPIC:
            raise HTTPError(401, "x-api-key header is required", etype="authentication_error")
        if p == GEMINI:
            raise HTTPError(403, "Method doesn't allow unregistered callers (callers without established "
                                 "identity). Please use API Key or other form of API consumer identity to call "
                                 "this API.", etype="PERMISSION_DENIED")
        raise HTTPError(401, "You didn't provide an API key. You need to provide your API key in an "
                             "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    if key in scenarios.BAD_KEYS or key.startswith(REFUSED_KEY_PREFIXES):
        if p == ANTHROPIC:
            raise HTTPError(401, "invalid x-api-key", etype="authentication_error")
        if p == GEMINI:
            text = "API key not valid. Please pass a valid API key."
            raise HTTPError(400, text, etype="INVALID_ARGUMENT", details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": text}])
        raise HTTPError(401, "Incorrect API key provided: %s. You can find your API key at "
                             "https://platform.openai.com/account/api-keys." % mask_key(key), "invalid_api_key")


def mask_key(key):
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)


def check_model(req, model, action="generateContent"):
    """Refuse a model id containing ``does-not-exist``, in the provider's words."""
    if scenarios.MISSING_MODEL_MARK not in model:
        return
    p = req.provider
    if p == ANTHROPIC:
        raise HTTPError(404, "model: %s" % model, etype="not_found_error")
    if p == GEMINI:
        raise HTTPError(404, "models/%s is not found for API version v1beta, or is not supported for %s. Call "
                             "ListModels to see the list of available models and their supported methods."
                        % (model, action), etype="NOT_FOUND")
    raise HTTPError(404, "The model `%s` does not exist or you do not have access to it." % model,
                    "model_not_found")


def provider_headers(provider, request_id):
    """Headers the real provider puts on every answer (the SDKs read the request id)."""
    if provider == OPENAI:
        return [("x-request-id", request_id), ("openai-version", "2020-10-01"), ("openai-processing-ms", "1")]
    if provider == ANTHROPIC:
        return [("request-id", request_id), ("anthropic-organization-id", "d9f4a1c2-7e3b-4c5d-9a8f-0b1c2d3e4f50")]
    return []


def _get(obj, *names):
    """The first present key of ``names`` (camelCase or snake_case spellings)."""
    if isinstance(obj, dict):
        for n in names:
            if n in obj:
                return obj[n]
    return None


################################################################################
# Conversations: what was asked, and dpmock's deterministic answer
################################################################################

class Turn:
    """A request reduced to what dpmock's answer depends on, whatever the provider."""

    def __init__(self, model):
        self.model = model
        self.texts = []  #: every text in the prompt, for token counts
        self.media = 0  #: image/document/file parts in the prompt
        self.user_text = ""  #: the last user message's text
        self.tool_result = None  #: (tool name, result text) when the last message answers a tool call
        self.tools = []  #: (name, JSON schema) the model may call
        self.forced_tool = None  #: a tool the request insists on
        self.tools_off = False  #: tool_choice none / mode NONE
        self.thinking = False
        self.max_tokens = None

    def add_text(self, text):
        if isinstance(text, str) and text:
            self.texts.append(text)


class Plan:
    """dpmock's answer to a Turn: optional thinking, then text pieces or tool calls."""

    def __init__(self, turn, fault=(None, None)):
        self.thinking = thinking_text(turn) if turn.thinking else None
        self.calls = []  #: (call id suffix, tool name, arguments dict)
        self.pieces = []
        self.finish = "stop"  #: stop | length | tool
        if turn.tool_result is None and turn.tools and not turn.tools_off:
            name = turn.forced_tool or turn.tools[0][0]
            schema = dict(turn.tools).get(name, {})
            self.calls.append((os.urandom(12).hex(), name, example_value(schema)))
            self.finish = "tool"
        else:
            self.pieces = shaped_pieces(turn, *fault) or re.findall(_PIECES, answer_text(turn))
            if turn.max_tokens is not None and len(self.pieces) > turn.max_tokens:
                self.pieces = self.pieces[:turn.max_tokens]
                self.finish = "length"
        self.text = "".join(self.pieces)
        self.prompt_tokens = count_tokens(turn.texts, turn.media)
        self.thinking_tokens = count_tokens([self.thinking]) if self.thinking else 0
        self.output_tokens = (len(self.pieces) if not self.calls else
                              sum(count_tokens([json.dumps(args)]) for _, _, args in self.calls))


def shaped_pieces(turn, kind, params):
    """The answer's pieces (one per stream event) as a framing-stress fault wants them, else None."""
    if kind == "SSE_SPLIT":  # multi-byte characters, so pieces of a few bytes split them
        return re.findall(_PIECES, "dpmock ünïcödé ✓ 😀 " + answer_text(turn))
    if kind == "SSE_BIG_EVENT":
        unit = "dpmock big event ünïcödé ✓ "
        return [unit * (params["kib"] * 1024 // len(unit.encode("utf-8")) + 1)]
    if kind == "SSE_MANY_EVENTS":
        text = answer_text(turn)
        return [text[i % len(text)] for i in range(params["n"])]
    return None


def answer_text(turn):
    """The documented text rule (README): what dpmock says back."""
    if turn.tool_result is not None:
        name, result = turn.tool_result
        return "The %s tool returned: %s" % (name, result)
    if turn.user_text.strip():
        return "dpmock reply to: " + " ".join(turn.user_text.split())
    return "dpmock reply to a message with no text."


def thinking_text(turn):
    return "Thinking about: " + (" ".join(turn.user_text.split()) or "a message with no text")


_FORMATS = {"date": "2025-01-01", "date-time": "2025-01-01T00:00:00Z", "time": "00:00:00", "email": "user@example.com",
            "uri": "https://example.com", "url": "https://example.com", "uuid": "00000000-0000-4000-8000-000000000000",
            "hostname": "example.com", "ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}


def example_value(schema, depth=0):
    """A value valid against a JSON schema (Gemini's upper-case types too): the documented tool-argument rule."""
    if not isinstance(schema, dict) or depth > 8:
        return "example"
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    for key in ("enum", "examples"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema[key][0]
    for key in ("anyOf", "oneOf", "any_of", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example_value(schema[key][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if str(k).lower() != "null"), "null")
    kind = str(kind).lower() if kind else ("object" if "properties" in schema else "string")
    if kind == "object":
        props = schema.get("properties")
        return {k: example_value(v, depth + 1) for k, v in props.items()} if isinstance(props, dict) else {}
    if kind == "array":
        n = schema.get("minItems", schema.get("min_items", 1))
        n = min(max(int(n) if isinstance(n, int) and not isinstance(n, bool) else
                    int(n) if isinstance(n, str) and is_digits(n) else 1, 1), 3)
        return [example_value(schema.get("items"), depth + 1) for _ in range(n)]
    if kind in ("integer", "number"):
        low = _get(schema, "minimum", "exclusiveMinimum")
        high = _get(schema, "maximum", "exclusiveMaximum")
        low = low if isinstance(low, (int, float)) and not isinstance(low, bool) and abs(low) < 1e15 else None
        high = high if isinstance(high, (int, float)) and not isinstance(high, bool) and abs(high) < 1e15 else None
        value = 1
        if isinstance(low, (int, float)):
            value = low + (1 if "exclusiveMinimum" in schema else 0)
        if isinstance(high, (int, float)) and value > high:
            value = high
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = _FORMATS.get(schema.get("format"), "example")
    low, high = schema.get("minLength"), schema.get("maxLength")
    low = low if isinstance(low, int) and 0 <= low <= 100000 else None
    if isinstance(low, int) and len(text) < low:
        text += "x" * (low - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def _require_model(body):
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter", "model")
    return model


def _max_tokens(value, name):
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid("Invalid '%s': expected an integer of at least 1, got %s." % (name, json.dumps(value)), name)
    return value


################################################################################
# OpenAI
################################################################################

def openai_turn(body):
    """Read a chat/completions body into a Turn, refusing what OpenAI refuses."""
    turn = Turn(_require_model(body))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of message objects.", "messages")
    calls = {}  # tool_call_id -> name
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool",
                                                              "function"):
            raise invalid("Invalid value for 'messages[%d].role': expected one of system, developer, user, "
                          "assistant, tool." % i, "messages[%d].role" % i)
        text = _openai_content(m.get("content"), turn)
        for tc in m.get("tool_calls") or []:
            if isinstance(tc, dict):
                calls[tc.get("id")] = _get(tc.get("function"), "name")
        if m["role"] == "user":
            turn.user_text = text
    last = messages[-1]
    if last["role"] in ("tool", "function"):
        name = calls.get(last.get("tool_call_id")) or last.get("name") or "tool"
        turn.tool_result = (name, _openai_content(last.get("content"), Turn("")))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("Invalid type for 'tools': expected an array of tool objects.", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise invalid("Missing required parameter: 'tools[%d].function.name'." % i,
                              "tools[%d].function.name" % i, "missing_required_parameter")
            turn.tools.append((fn["name"], fn.get("parameters") or {"type": "object", "properties": {}}))
    choice = body.get("tool_choice")
    if choice == "none":
        turn.tools_off = True
    elif isinstance(choice, dict):
        turn.forced_tool = _get(choice.get("function"), "name")
    turn.thinking = (body.get("reasoning_effort") not in (None, "none", "minimal")
                     or isinstance(body.get("reasoning"), dict) or bool(body.get("thinking")))
    turn.max_tokens = _max_tokens(body.get("max_completion_tokens"), "max_completion_tokens") or \
        _max_tokens(body.get("max_tokens"), "max_tokens")
    return turn


def _openai_content(content, turn):
    if isinstance(content, str):
        turn.add_text(content)
        return content
    texts = []
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
            texts.append(str(part.get("text", "")))
            turn.add_text(texts[-1])
        elif isinstance(part, dict):
            turn.media += 1
    return "\n".join(texts)


_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool": "tool_calls"}


def openai_usage(plan):
    out = plan.output_tokens + plan.thinking_tokens
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": out, "total_tokens": plan.prompt_tokens + out,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": plan.thinking_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def handle_openai_chat(h, req):
    check_key(req)
    body = req.json
    turn = openai_turn(body)
    check_model(req, turn.model)
    plan = Plan(turn, h.fault)
    head = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": turn.model}
    calls = [{"id": "call_" + cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
             for cid, name, args in plan.calls]
    if not body.get("stream"):
        message = {"role": "assistant", "content": plan.text if not calls else None, "refusal": None,
                   "annotations": []}
        if calls:
            message["tool_calls"] = calls
        if plan.thinking:
            message["reasoning_content"] = plan.thinking
        h.send_json(200, dict(head, choices=[{"index": 0, "message": message, "logprobs": None,
                                              "finish_reason": _OPENAI_FINISH[plan.finish]}],
                              usage=openai_usage(plan), service_tier="default", system_fingerprint="fp_dpmock"))
        return
    head["object"] = "chat.completion.chunk"
    head["system_fingerprint"] = "fp_dpmock"
    usage = bool(_get(body.get("stream_options"), "include_usage"))

    def chunk(delta, finish=None):
        c = dict(head, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if usage:
            c["usage"] = None
        return c
    h.start_chunked(200, scenarios.SSE)
    h.send_sse_event(chunk({"role": "assistant", "content": "" if not calls else None, "refusal": None}))
    if plan.thinking:
        for piece in re.findall(_PIECES, plan.thinking):
            h.send_sse_event(chunk({"reasoning_content": piece}))
    for i, piece in enumerate(plan.pieces):
        # The last content chunk carries finish_reason too (the empty-delta finish chunk follows, as
        # OpenAI sends it): Disaster Party's detailed-stream parser stops at the first chunk with a
        # finish_reason and crashes (NULL callback) when that chunk has no text.
        last = i == len(plan.pieces) - 1 and not calls
        h.send_sse_event(chunk({"content": piece}, _OPENAI_FINISH[plan.finish] if last else None))
    for i, call in enumerate(calls):
        h.send_sse_event(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        for fragment in json_fragments(call["function"]["arguments"]):
            h.send_sse_event(chunk({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]}))
    h.send_sse_event(chunk({}, _OPENAI_FINISH[plan.finish]))
    if usage:
        h.send_sse_event(dict(head, choices=[], usage=openai_usage(plan)))
    h.send_sse_event("[DONE]")
    h.end_chunked()


def json_fragments(text, size=8):
    """A JSON text cut into the small fragments a streamed tool call arrives in."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def handle_openai_images(h, req):
    check_key(req)
    body = req.json
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    model = body.get("model") or "dall-e-2"
    check_model(req, model)
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        raise invalid("Invalid 'n': expected an integer from 1 to 10.", "n")
    fmt = body.get("response_format") or ("b64_json" if model.startswith("gpt-image") else "url")
    if fmt not in ("url", "b64_json"):
        raise invalid("Invalid 'response_format': expected 'url' or 'b64_json'.", "response_format")
    data = []
    for _ in range(n):
        name = image_name(prompt)
        item = {"b64_json": b64(png_for(name))} if fmt == "b64_json" else \
            {"url": "%s/_images/%s" % (req.origin(), name)}
        if not model.startswith("gpt-image"):
            item["revised_prompt"] = prompt
        data.append(item)
    answer = {"created": int(time.time()), "data": data}
    if model.startswith("gpt-image"):
        words = count_tokens([prompt])
        answer["usage"] = {"input_tokens": words, "input_tokens_details": {"text_tokens": words, "image_tokens": 0},
                           "output_tokens": 272 * n, "total_tokens": words + 272 * n}
    h.send_json(200, answer)


################################################################################
# Anthropic
################################################################################

def anthropic_turn(body, need_max_tokens=True):
    """Read a messages body into a Turn, refusing what Anthropic refuses."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: Field required")
    turn = Turn(model)
    if need_max_tokens:
        if "max_tokens" not in body:
            raise invalid("max_tokens: Field required")
        turn.max_tokens = _max_tokens(body.get("max_tokens"), "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: at least one message is required")
    system = body.get("system")
    _anthropic_content(system, turn, {})
    names = {}  # tool_use id -> name
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise invalid("messages.%d.role: Input should be 'user' or 'assistant'" % i)
        text = _anthropic_content(m.get("content"), turn, names)
        if m["role"] == "user":
            turn.user_text = text
    last = messages[-1]
    if last["role"] == "user" and isinstance(last.get("content"), list):
        for block in last["content"]:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                turn.tool_result = (names.get(block.get("tool_use_id"), "tool"),
                                    _anthropic_content(block.get("content"), Turn(""), {}))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools: Input should be a valid list")
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
                raise invalid("tools.%d.name: Field required" % i)
            if t.get("type") in (None, "custom"):
                if not isinstance(t.get("input_schema"), dict):
                    raise invalid("tools.%d.custom.input_schema: Field required" % i)
                turn.tools.append((t["name"], t["input_schema"]))
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        turn.tools_off = choice.get("type") == "none"
        if choice.get("type") == "tool":
            turn.forced_tool = choice.get("name")
    thinking = body.get("thinking")
    turn.thinking = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    return turn


def _anthropic_content(content, turn, names):
    if isinstance(content, str):
        turn.add_text(content)
        return content
    texts = []
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
            turn.add_text(texts[-1])
        elif kind == "tool_use":
            names[block.get("id")] = block.get("name")
            turn.add_text(json.dumps(block.get("input")))
        elif kind == "tool_result":
            turn.add_text(_anthropic_content(block.get("content"), Turn(""), names))
        elif kind in ("image", "document"):
            turn.media += 1
    return "\n".join(texts)


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use"}


def anthropic_blocks(plan):
    """The content blocks of the answer, in order."""
    blocks = []
    if plan.thinking:
        blocks.append({"type": "thinking", "thinking": plan.thinking, "signature": signature(plan.thinking)})
    if plan.text or not plan.calls:
        blocks.append({"type": "text", "text": plan.text})
    for cid, name, args in plan.calls:
        blocks.append({"type": "tool_use", "id": "toolu_01" + cid, "name": name, "input": args})
    return blocks


def signature(text):
    """An opaque, deterministic signature for a thinking block (base64, as the real ones are)."""
    return b64(("dpmock-signature:" + text[:48]).encode("utf-8"))


def anthropic_usage(plan, output_tokens):
    return {"input_tokens": plan.prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": output_tokens, "service_tier": "standard"}


def handle_anthropic_messages(h, req):
    check_key(req)
    turn = anthropic_turn(req.json)
    check_model(req, turn.model)
    plan = Plan(turn, h.fault)
    blocks = anthropic_blocks(plan)
    out = plan.output_tokens + plan.thinking_tokens
    message = {"id": new_id("msg_01"), "type": "message", "role": "assistant", "model": turn.model}
    if not req.json.get("stream"):
        h.send_json(200, dict(message, content=blocks, stop_reason=_ANTHROPIC_STOP[plan.finish], stop_sequence=None,
                              usage=anthropic_usage(plan, out)))
        return
    h.start_chunked(200, scenarios.SSE)
    h.send_sse_event(dict(type="message_start", message=dict(message, content=[], stop_reason=None,
                                                             stop_sequence=None, usage=anthropic_usage(plan, 1))),
                     "message_start")
    for i, block in enumerate(blocks):
        kind = block["type"]
        start = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "text": {"type": "text", "text": ""}, "tool_use": dict(block, input={})}[kind]
        h.send_sse_event({"type": "content_block_start", "index": i, "content_block": start}, "content_block_start")
        if i == 0:
            h.send_sse_event({"type": "ping"}, "ping")
        if kind == "thinking":
            deltas = [{"type": "thinking_delta", "thinking": p} for p in re.findall(_PIECES, block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "text":
            deltas = [{"type": "text_delta", "text": p} for p in plan.pieces]
        else:
            deltas = [{"type": "input_json_delta", "partial_json": f}
                      for f in [""] + json_fragments(json.dumps(block["input"]))]
        for delta in deltas:
            h.send_sse_event({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta")
        h.send_sse_event({"type": "content_block_stop", "index": i}, "content_block_stop")
    h.send_sse_event({"type": "message_delta", "delta": {"stop_reason": _ANTHROPIC_STOP[plan.finish],
                                                          "stop_sequence": None},
                      "usage": {"output_tokens": out}}, "message_delta")
    h.send_sse_event({"type": "message_stop"}, "message_stop")
    h.end_chunked()


def handle_anthropic_count_tokens(h, req):
    check_key(req)
    turn = anthropic_turn(req.json, need_max_tokens=False)
    check_model(req, turn.model)
    for name, schema in turn.tools:
        turn.add_text(name + " " + json.dumps(schema))
    h.send_json(200, {"input_tokens": count_tokens(turn.texts, turn.media)})


################################################################################
# Gemini
################################################################################

def gemini_turn(body, model):
    """Read a generateContent body (camelCase or snake_case) into a Turn."""
    turn = Turn(model)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified")
    _gemini_parts(_get(_get(body, "systemInstruction", "system_instruction"), "parts"), turn)
    for i, c in enumerate(contents):
        if not isinstance(c, dict) or not isinstance(c.get("parts"), list):
            raise invalid("* GenerateContentRequest.contents[%d].parts: contents.parts must not be empty" % i)
        text = _gemini_parts(c["parts"], turn)
        if c.get("role", "user") == "user" and text:
            turn.user_text = text
    results = [_get(p, "functionResponse", "function_response") for p in contents[-1]["parts"]]
    results = [r for r in results if isinstance(r, dict)]
    if results:
        response = results[-1].get("response")
        content = _get(response, "content", "result", "output")
        turn.tool_result = (results[-1].get("name") or "tool",
                            content if isinstance(content, str) else json.dumps(response))
    for t in body.get("tools") or []:
        decls = _get(t, "functionDeclarations", "function_declarations")
        for i, d in enumerate(decls if isinstance(decls, list) else ()):
            if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
                raise invalid("* GenerateContentRequest.tools[0].function_declarations[%d].name: Name cannot be "
                              "empty." % i)
            schema = _get(d, "parameters", "parametersJsonSchema", "parameters_json_schema") or {}
            turn.tools.append((d["name"], schema))
    config = _get(_get(body, "toolConfig", "tool_config"), "functionCallingConfig", "function_calling_config")
    if isinstance(config, dict):
        turn.tools_off = str(config.get("mode", "")).upper() == "NONE"
        allowed = _get(config, "allowedFunctionNames", "allowed_function_names")
        if isinstance(allowed, list) and allowed:
            turn.forced_tool = allowed[0]
    gen = _get(body, "generationConfig", "generation_config") or {}
    turn.max_tokens = _max_tokens(_get(gen, "maxOutputTokens", "max_output_tokens"), "maxOutputTokens")
    thinking = _get(gen, "thinkingConfig", "thinking_config")
    turn.thinking = bool(_get(thinking, "includeThoughts", "include_thoughts"))
    return turn


def _gemini_parts(parts, turn):
    texts = []
    for p in parts if isinstance(parts, list) else ():
        if not isinstance(p, dict):
            continue
        if isinstance(p.get("text"), str) and not p.get("thought"):
            texts.append(p["text"])
            turn.add_text(p["text"])
        elif _get(p, "inlineData", "inline_data", "fileData", "file_data") is not None:
            turn.media += 1
        else:
            call = _get(p, "functionCall", "function_call", "functionResponse", "function_response")
            if call is not None:
                turn.add_text(json.dumps(call))
    return "\n".join(texts)


_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool": "STOP"}


def gemini_usage(plan, output_tokens):
    usage = {"promptTokenCount": plan.prompt_tokens, "candidatesTokenCount": output_tokens,
             "totalTokenCount": plan.prompt_tokens + output_tokens + plan.thinking_tokens,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": plan.prompt_tokens}]}
    if plan.thinking_tokens:
        usage["thoughtsTokenCount"] = plan.thinking_tokens
    return usage


def gemini_chunks(plan):
    """The answer as a list of (parts, finished?, cumulative output tokens): one item per streamed chunk."""
    out = []
    if plan.thinking:
        out.append(([{"text": plan.thinking, "thought": True}], False, 0))
    if plan.calls:
        out.append(([{"functionCall": {"name": name, "args": args}} for _, name, args in plan.calls], True,
                    plan.output_tokens))
        return out
    for i, piece in enumerate(plan.pieces or [""]):
        out.append(([{"text": piece}], i == max(len(plan.pieces), 1) - 1, i + 1 if plan.pieces else 0))
    return out


def handle_gemini_generate(h, req):
    check_key(req)
    model = req.params["model"]
    stream = req.route.name == "gemini_stream"
    check_model(req, model, "streamGenerateContent" if stream else "generateContent")
    plan = Plan(gemini_turn(req.json, model), h.fault)
    head = {"modelVersion": model, "responseId": new_id("", 11)}
    finish = _GEMINI_FINISH[plan.finish]

    def response(parts, final, tokens):
        candidate = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if final:
            candidate["finishReason"] = finish
        return dict({"candidates": [candidate], "usageMetadata": gemini_usage(plan, tokens)}, **head)
    if not stream:
        parts = [p for chunk_parts, _, _ in gemini_chunks(plan) for p in chunk_parts]
        text = [p for p in parts if "text" in p and not p.get("thought")]
        if len(text) > 1:  # one text part for the whole answer, as the real API sends it
            parts = [p for p in parts if p not in text] + [{"text": "".join(p["text"] for p in text)}]
        h.send_json(200, response(parts, True, plan.output_tokens))
        return
    chunks = [response(*c) for c in gemini_chunks(plan)]
    if req.arg("alt") == "sse":
        h.start_chunked(200, "text/event-stream")
        for c in chunks:
            h.send_sse_event(c, sep="\r\n\r\n")
    else:  # alt=json: one JSON array, written element by element
        h.start_chunked(200, "application/json; charset=UTF-8")
        for i, c in enumerate(chunks):
            h.stream_item(json.dumps(c, indent=2), index=i)
        h.send_chunk(b"]")
    h.end_chunked()


def handle_gemini_count_tokens(h, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "countTokens")
    body = req.json
    inner = _get(body, "generateContentRequest", "generate_content_request")
    # The C library sends a top-level system_instruction (the real API has none here): counted too.
    turn = gemini_turn(inner if isinstance(inner, dict) else body, model)
    total = count_tokens(turn.texts, turn.media)
    h.send_json(200, {"totalTokens": total, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]})


def handle_gemini_predict(h, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "predict")
    instances = req.json.get("instances")
    if not isinstance(instances, list) or not instances or not all(
            isinstance(i, dict) and isinstance(i.get("prompt"), str) and i["prompt"] for i in instances):
        raise invalid("instances: every instance needs a non-empty prompt")
    params = req.json.get("parameters") or {}
    n = _get(params, "sampleCount", "sample_count", "numberOfImages")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 8:
        raise invalid("parameters.sampleCount: expected an integer from 1 to 8")
    predictions = [{"mimeType": "image/png", "bytesBase64Encoded": b64(png_for(image_name(inst["prompt"])))}
                   for inst in instances for _ in range(n)]
    h.send_json(200, {"predictions": predictions})


################################################################################
# Shared paths: model lists, files, images
################################################################################

def handle_models_list(h, req):
    check_key(req)
    p = req.provider
    if p == OPENAI:
        h.send_json(200, {"object": "list", "data": [openai_model(m) for m in scenarios.OPENAI_MODELS]})
    elif p == ANTHROPIC:
        models = [anthropic_model(m) for m in scenarios.ANTHROPIC_MODELS]
        limit = _int_arg(req, "limit", 20, 1, 1000)
        ids = [m["id"] for m in models]
        after, before = req.arg("after_id"), req.arg("before_id")
        for name, cursor in (("after_id", after), ("before_id", before)):
            if cursor is not None and cursor not in ids:
                raise invalid("%s: unknown model id %r" % (name, cursor))
        if before is not None:
            end = ids.index(before)
            page = models[max(0, end - limit):end]
            more = end - limit > 0
        else:
            start = ids.index(after) + 1 if after is not None else 0
            page = models[start:start + limit]
            more = start + limit < len(models)
        h.send_json(200, {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None})
    else:
        models = [gemini_model(m) for m in scenarios.GEMINI_MODELS]
        size = _int_arg(req, "pageSize", 50, 1, 1000)
        token = req.arg("pageToken") or "0"
        if not is_digits(token) or int(token) > len(models):
            raise invalid("Invalid page token %r." % token)
        start = int(token)
        answer = {"models": models[start:start + size]}
        if start + size < len(models):
            answer["nextPageToken"] = str(start + size)
        h.send_json(200, answer)


def is_digits(text):
    """ASCII digits only: str.isdigit() also admits characters int() refuses (such as "²")."""
    return text.isascii() and text.isdigit()


def _int_arg(req, name, default, low, high):
    raw = req.arg(name)
    if raw is None:
        return default
    if not is_digits(raw) or not low <= int(raw) <= high:
        raise invalid("%s: expected an integer from %d to %d, got %r" % (name, low, high, raw), name)
    return int(raw)


def handle_model_get(h, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "get")
    p = req.provider
    if p == OPENAI:
        known = {m[0]: m for m in scenarios.OPENAI_MODELS}
        h.send_json(200, openai_model(known.get(model, (model, 1700000000, "system"))))
    elif p == ANTHROPIC:
        known = {m[0]: m for m in scenarios.ANTHROPIC_MODELS}
        h.send_json(200, anthropic_model(known.get(model, (model, model, "2025-01-01T00:00:00Z"))))
    else:
        known = {m[0]: m for m in scenarios.GEMINI_MODELS}
        h.send_json(200, gemini_model(known.get(model, (model, model, 1048576, 65536, False))))


def openai_model(m):
    return {"id": m[0], "object": "model", "created": m[1], "owned_by": m[2]}


def anthropic_model(m):
    return {"type": "model", "id": m[0], "display_name": m[1], "created_at": m[2]}


def gemini_model(m):
    name, display, input_limit, output_limit, thinking = m
    methods = ["predict"] if name.startswith("imagen") else \
        ["embedContent"] if "embedding" in name else \
        ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"]
    model = {"name": "models/" + name, "version": "001", "displayName": display,
             "description": "%s (served by dpmock)" % display, "inputTokenLimit": input_limit,
             "outputTokenLimit": output_limit, "supportedGenerationMethods": methods}
    if methods[0] == "generateContent":
        model.update(temperature=1, topP=0.95, topK=64, maxTemperature=2, thinking=thinking)
    return model


# ---------------------------------------------------------------- files

class FileStore:
    """Uploaded files' metadata (never their bytes), bounded, shared by every connection."""

    LIMIT = 1000

    def __init__(self):
        self.lock = threading.Lock()
        self.files = {}  # (provider, id) -> record dict
        self.uploads = {}  # upload_id -> resumable session dict

    def add(self, provider, record):
        with self.lock:
            self.files[(provider, record["id"])] = record
            while len(self.files) > self.LIMIT:
                self.files.pop(next(iter(self.files)))
        return record

    def get(self, provider, file_id):
        with self.lock:
            return self.files.get((provider, file_id))

    def remove(self, provider, file_id):
        with self.lock:
            return self.files.pop((provider, file_id), None)

    def list(self, provider):
        with self.lock:
            return [r for (p, _), r in self.files.items() if p == provider]

    def start_upload(self, session):
        with self.lock:
            self.uploads[session["id"]] = session
            while len(self.uploads) > self.LIMIT:
                self.uploads.pop(next(iter(self.uploads)))

    def upload(self, upload_id):
        with self.lock:
            return self.uploads.get(upload_id)

    def end_upload(self, upload_id):
        with self.lock:
            self.uploads.pop(upload_id, None)


def file_record(name, mime, nbytes, digest, **extra):
    record = {"id": new_id("", 8), "filename": name, "mime": mime, "bytes": nbytes, "created": time.time(),
              "sha256": digest}
    record.update(extra)
    return record


def openai_file(r):
    return {"id": "file-" + r["id"], "object": "file", "bytes": r["bytes"], "created_at": int(r["created"]),
            "filename": r["filename"], "purpose": r.get("purpose", "user_data"), "status": "processed",
            "expires_at": None, "status_details": None}


def gemini_file(r, origin):
    created = rfc3339(r["created"])
    return {"name": "files/" + r["id"], "displayName": r["filename"], "mimeType": r["mime"],
            "sizeBytes": str(r["bytes"]), "createTime": created, "updateTime": created,
            "expirationTime": rfc3339(r["created"] + 48 * 3600), "sha256Hash": b64(r["sha256"]),
            "uri": "%s/v1beta/files/%s" % (origin, r["id"]), "state": "ACTIVE", "source": "UPLOADED"}


def _file_id(req):
    file_id = req.params["file_id"]
    if req.provider == OPENAI:
        return file_id[5:] if file_id.startswith("file-") else file_id
    return file_id[6:] if file_id.startswith("files/") else file_id


def _missing_file(req):
    if req.provider == GEMINI:
        return HTTPError(404, "File files/%s does not exist." % _file_id(req), etype="NOT_FOUND")
    return HTTPError(404, "No such File object: %s" % req.params["file_id"], param="id")


def handle_files_list(h, req):
    check_key(req)
    records = h.server.files.list(req.provider)
    if req.provider == GEMINI:
        size = _int_arg(req, "pageSize", 10, 1, 100)
        token = req.arg("pageToken") or "0"
        if not is_digits(token):
            raise invalid("Invalid page token %r." % token)
        start = int(token)
        answer = {"files": [gemini_file(r, req.origin()) for r in records[start:start + size]]}
        if start + size < len(records):
            answer["nextPageToken"] = str(start + size)
        h.send_json(200, answer)
        return
    data = [openai_file(r) for r in reversed(records)]
    h.send_json(200, {"object": "list", "data": data, "has_more": False,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


def handle_file_get(h, req):
    check_key(req)
    record = h.server.files.get(req.provider, _file_id(req))
    if record is None:
        raise _missing_file(req)
    h.send_json(200, gemini_file(record, req.origin()) if req.provider == GEMINI else openai_file(record))


def handle_file_delete(h, req):
    check_key(req)
    record = h.server.files.remove(req.provider, _file_id(req))
    if record is None:
        raise _missing_file(req)
    h.send_json(200, {} if req.provider == GEMINI else {"id": "file-" + record["id"], "object": "file",
                                                         "deleted": True})


def _hasher():
    import hashlib  # loads OpenSSL: kept off the start-up path
    return hashlib.sha256()


def count_body(h, req):
    """Consume the body, returning (byte count, sha256 digest); nothing is kept."""
    digest = _hasher()
    n = 0
    for piece in h.body_pieces(req):
        n += len(piece)
        digest.update(piece)
    return n, digest.digest()


def small_body(h, req):
    """The whole body when it is small metadata; 413 past MAX_FIELD."""
    data = bytearray()
    for piece in h.body_pieces(req):
        data += piece
        if len(data) > MAX_FIELD:
            raise HTTPError(413, "metadata body over %d bytes" % MAX_FIELD, close=True)
    return bytes(data)


def handle_openai_file_upload(h, req):
    """POST /files: multipart/form-data parsed as it streams in; the file part is only counted."""
    check_key(req)
    boundary = multipart_boundary(req, "multipart/form-data")
    fields, files = read_multipart(h, req, boundary)
    if not files:
        raise invalid("Missing required parameter: 'file'.", "file", "missing_required_parameter")
    purpose = fields.get("purpose")
    if not purpose:
        raise invalid("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
    name, mime, nbytes, digest = files[0]
    record = h.server.files.add(OPENAI, file_record(name, mime, nbytes, digest, purpose=purpose))
    h.send_json(200, openai_file(record))


def handle_gemini_upload_raw(h, req):
    """POST /files:upload?key=: the C library's raw upload (body = the file's bytes)."""
    check_key(req)
    nbytes, digest = count_body(h, req)
    if nbytes == 0:
        raise invalid("File is empty.")
    mime = (req.headers.get("content-type") or "application/octet-stream").split(";")[0].strip()
    record = h.server.files.add(GEMINI, file_record(req.arg("name") or "upload", mime, nbytes, digest))
    h.send_json(200, {"file": gemini_file(record, req.origin())})


def handle_gemini_upload(h, req):
    """POST /upload/v1beta/files: the resumable protocol (start, upload, finalize), media or multipart."""
    hdr = req.headers
    protocol = (hdr.get("x-goog-upload-protocol") or req.arg("uploadType") or "").lower()
    upload_id = req.arg("upload_id")
    if upload_id is not None:  # the upload URL: authorised by its session, the SDK sends no key there
        return resumable_chunk(h, req, upload_id)
    check_key(req)
    if protocol == "resumable":
        command = (hdr.get("x-goog-upload-command") or "").lower()
        if command != "start":
            raise invalid("X-Goog-Upload-Command must be 'start' to begin a resumable upload, not %r" % command)
        meta = _upload_meta(small_body(h, req))
        session = {"id": new_id("", 16), "received": 0, "hash": _hasher(),
                   "name": meta.get("name") or hdr.get("x-goog-upload-file-name") or "upload",
                   "mime": meta.get("mime") or hdr.get("x-goog-upload-header-content-type") or
                   "application/octet-stream"}
        h.server.files.start_upload(session)
        url = "%s/upload/v1beta/files?upload_id=%s&upload_protocol=resumable" % (req.origin(), session["id"])
        h.send_bytes(200, b"", "text/plain; charset=utf-8", [
            ("X-Goog-Upload-URL", url), ("X-Goog-Upload-Control-URL", url), ("X-Goog-Upload-Status", "active"),
            ("X-Goog-Upload-Chunk-Granularity", "8388608")])
    elif protocol == "multipart":
        boundary = multipart_boundary(req, "multipart/related")
        fields, files = read_multipart(h, req, boundary, keep_first=True)
        if not files:
            raise invalid("multipart upload has no media part")
        meta = _upload_meta(fields.get(""))
        _, mime, nbytes, digest = files[0]
        gemini_store(h, req, meta.get("name") or "upload", meta.get("mime") or mime, nbytes, digest)
    elif protocol in ("media", "raw", ""):
        nbytes, digest = count_body(h, req)
        mime = (hdr.get("content-type") or "application/octet-stream").split(";")[0].strip()
        gemini_store(h, req, hdr.get("x-goog-upload-file-name") or "upload", mime, nbytes, digest)
    else:
        raise invalid("unsupported upload protocol %r; use resumable, multipart or media" % protocol)


def _upload_meta(raw):
    """Display name and MIME type from an upload's JSON metadata (either spelling)."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise invalid("upload metadata is not valid JSON: %s" % e)
    f = _get(meta, "file") if isinstance(meta, dict) else None
    f = f if isinstance(f, dict) else {}
    return {"name": _get(f, "displayName", "display_name"), "mime": _get(f, "mimeType", "mime_type")}


def gemini_store(h, req, name, mime, nbytes, digest, headers=()):
    if nbytes == 0:
        raise invalid("File is empty.")
    record = h.server.files.add(GEMINI, file_record(name, mime, nbytes, digest))
    h.send_json(200, {"file": gemini_file(record, req.origin())}, headers)


def resumable_chunk(h, req, upload_id):
    session = h.server.files.upload(upload_id)
    if session is None:
        raise HTTPError(404, "upload session %r is unknown or finished" % upload_id, etype="NOT_FOUND")
    command = [c.strip() for c in (req.headers.get("x-goog-upload-command") or "").lower().split(",")]
    offset = req.headers.get("x-goog-upload-offset")
    if "upload" in command:
        if offset is None or not is_digits(offset) or int(offset) != session["received"]:
            raise invalid("X-Goog-Upload-Offset %r does not match the %d bytes received"
                          % (offset, session["received"]))
        for piece in h.body_pieces(req):
            session["received"] += len(piece)
            session["hash"].update(piece)
    elif "query" in command or "cancel" in command or "finalize" in command:
        small_body(h, req)
    else:
        raise invalid("X-Goog-Upload-Command must be upload, finalize, query or cancel")
    if "cancel" in command:
        h.server.files.end_upload(upload_id)
        h.send_bytes(200, b"", "text/plain; charset=utf-8", [("X-Goog-Upload-Status", "cancelled")])
    elif "finalize" in command:
        h.server.files.end_upload(upload_id)
        gemini_store(h, req, session["name"], session["mime"], session["received"], session["hash"].digest(),
                     [("X-Goog-Upload-Status", "final")])
    else:
        h.send_bytes(200, b"", "text/plain; charset=utf-8", [
            ("X-Goog-Upload-Status", "active"), ("X-Goog-Upload-Size-Received", str(session["received"]))])


# ---------------------------------------------------------------- multipart, streamed

_PARAM_RE = r';\s*([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))'


def header_params(value):
    """(main value lower-cased, {param: value}) of a header like Content-Type or Content-Disposition."""
    main = value.split(";", 1)[0].strip().lower()
    return main, {k.lower(): q or u for k, q, u in re.findall(_PARAM_RE, value)}


def multipart_boundary(req, kind):
    ctype = req.headers.get("content-type") or ""
    main, params = header_params(ctype)
    if main != kind or not params.get("boundary"):
        raise invalid("Content-Type must be %s with a boundary, not %r" % (kind, ctype[:80]))
    return params["boundary"].encode("latin-1")


def read_multipart(h, req, boundary, keep_first=False):
    """Parse a multipart body as it arrives: fields are kept (up to MAX_FIELD), files only counted.

    Returns ({field name: text}, [(filename, mime, byte count, sha256 digest)]). With
    ``keep_first`` the first part is kept as field "" (Gemini's JSON metadata part).
    """
    delim = b"\r\n--" + boundary
    buf = b"\r\n"  # so the first delimiter looks like every later one
    pieces = h.body_pieces(req)
    fields, files = {}, []

    def more():
        piece = next(pieces, None)
        if piece is None:
            raise invalid("multipart body ended before its closing boundary")
        return piece
    while True:  # preamble
        at = buf.find(delim)
        if at >= 0:
            buf = buf[at + len(delim):]
            break
        buf = buf[-len(delim):] + more()
    index = 0
    while True:
        while len(buf) < 2:
            buf += more()
        if buf[:2] == b"--":  # closing delimiter: drain the epilogue
            for _ in pieces:
                pass
            return fields, files
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_FIELD:
                raise invalid("multipart part headers over %d bytes" % MAX_FIELD)
            buf += more()
        head, buf = buf.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        _, disp = header_params(headers.get("content-disposition", ""))
        is_file = "filename" in disp or (index > 0 and keep_first)
        kept = bytearray()
        size = 0
        digest = _hasher() if is_file else None
        while True:
            at = buf.find(delim)
            if at >= 0:
                body, buf = buf[:at], buf[at + len(delim):]
            else:
                cut = max(0, len(buf) - len(delim))
                body, buf = buf[:cut], buf[cut:]
            size += len(body)
            if is_file:
                digest.update(body)
            elif len(kept) + len(body) <= MAX_FIELD:
                kept += body
            else:
                raise invalid("multipart field over %d bytes" % MAX_FIELD)
            if at >= 0:
                break
            buf += more()
        if is_file:
            files.append((disp.get("filename") or "upload", headers.get("content-type", "application/octet-stream"),
                          size, digest.digest()))
        else:
            fields["" if keep_first and index == 0 else disp.get("name", "")] = kept.decode("utf-8", "replace")
        index += 1


# ---------------------------------------------------------------- images

def image_name(prompt):
    """An image id whose colour comes from the prompt, so the PNG can be made again from the name."""
    import zlib
    rgb = zlib.crc32(prompt.encode("utf-8")) & 0xFFFFFF
    return "img-%06x-%s.png" % (rgb, os.urandom(6).hex())


def png_for(name, size=8):
    """A real size x size PNG in one colour (taken from an image_name)."""
    import struct
    import zlib
    m = re.match(r"^img-([0-9a-f]{6})-[0-9a-f]+\.png$", name)
    if not m:
        raise HTTPError(404, "no image %r" % name, "not_found")
    rgb = bytes.fromhex(m.group(1))
    raw = b"".join(b"\0" + rgb * size for _ in range(size))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def b64(data):
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def handle_image_png(h, req):
    h.send_bytes(200, png_for(req.params["image"]), "image/png")


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
        "urls": srv.urls,
        "boot_id": srv.boot_id,
        "restarts": srv.restarts,
        "uptime_s": round(time.monotonic() - srv.started, 3),
        "requests": srv.request_count,
        "active_requests": srv.active,
        "scenarios": scenarios.names(),
        "seed": srv.config.seed,
        "journal": {"size": srv.config.journal_size, "held": len(srv.journal.entries), "last_seq": srv.journal.seq},
        "endpoints": ["%s %s" % (r.method, r.pattern) for r in ROUTES],
    })


def handle_control_requests(h, req):
    """The journal, filtered; with wait_for=N, held until N matching requests have arrived (or timeout)."""
    journal = h.server.journal
    filters = {name: req.arg(name) for name in ("path", "route", "scenario", "key") if req.arg(name) is not None}
    since = _int_arg(req, "since", 0, 0, 2 ** 62)
    limit = _int_arg(req, "limit", 100, 1, 10 ** 6)
    want = _int_arg(req, "wait_for", 0, 0, 10 ** 6)
    timeout = _float_arg(req, "timeout", 10.0, 0.0, 60.0)
    found, timed_out = journal.wait(filters, since, want, timeout, h.server.stop_event)
    h.send_json(200, {"requests": [public_entry(e) for e in found[-limit:]], "count": min(len(found), limit),
                      "matched": len(found), "last_seq": journal.seq, "timed_out": timed_out})


def handle_control_requests_clear(h, req):
    h.send_json(200, {"cleared": h.server.journal.clear()})


def handle_control_schedules(h, req):
    h.send_json(200, {"counters": h.server.schedules.listing()})


def handle_control_reset(h, req):
    counters = len(h.server.schedules.listing())
    h.server.schedules.reset()
    h.send_json(200, {"cleared_requests": h.server.journal.clear(), "cleared_counters": counters})


def _float_arg(req, name, default, low, high):
    raw = req.arg(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise invalid("%s: expected a number from %s to %s, got %r" % (name, low, high, raw), name)
    return value


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



class ClientGone(Exception):
    """The client closed the connection before sending what it announced."""


#: Reason phrases (http.HTTPStatus's, written out: building that enum costs every start).
_REASONS = {100: 'Continue', 101: 'Switching Protocols', 102: 'Processing', 103: 'Early Hints', 200: 'OK',
            201: 'Created', 202: 'Accepted', 203: 'Non-Authoritative Information', 204: 'No Content',
            205: 'Reset Content', 206: 'Partial Content', 207: 'Multi-Status', 208: 'Already Reported',
            226: 'IM Used', 300: 'Multiple Choices', 301: 'Moved Permanently', 302: 'Found', 303: 'See Other',
            304: 'Not Modified', 305: 'Use Proxy', 307: 'Temporary Redirect', 308: 'Permanent Redirect',
            400: 'Bad Request', 401: 'Unauthorized', 402: 'Payment Required', 403: 'Forbidden', 404: 'Not Found',
            405: 'Method Not Allowed', 406: 'Not Acceptable', 407: 'Proxy Authentication Required',
            408: 'Request Timeout', 409: 'Conflict', 410: 'Gone', 411: 'Length Required',
            412: 'Precondition Failed', 413: 'Request Entity Too Large', 414: 'Request-URI Too Long',
            415: 'Unsupported Media Type', 416: 'Requested Range Not Satisfiable', 417: 'Expectation Failed',
            418: "I'm a Teapot", 421: 'Misdirected Request', 422: 'Unprocessable Entity', 423: 'Locked',
            424: 'Failed Dependency', 425: 'Too Early', 426: 'Upgrade Required', 428: 'Precondition Required',
            429: 'Too Many Requests', 431: 'Request Header Fields Too Large', 451: 'Unavailable For Legal Reasons',
            500: 'Internal Server Error', 501: 'Not Implemented', 502: 'Bad Gateway', 503: 'Service Unavailable',
            504: 'Gateway Timeout', 505: 'HTTP Version Not Supported', 506: 'Variant Also Negotiates',
            507: 'Insufficient Storage', 508: 'Loop Detected', 510: 'Not Extended',
            511: 'Network Authentication Required', 529: 'Site is overloaded'}
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
    timeout = None  #: blocking sockets: a Python-level timeout would poll() before every recv and send;
    #: the kernel enforces --io-timeout instead (SO_RCVTIMEO / SO_SNDTIMEO), set once per connection

    # ---------------------------------------------------------------- connection loop

    def handle(self):
        self.close_connection = False
        try:
            while not self.close_connection and self.wait_for_request(self.served == 0):
                self.handle_one_request()
                self.served += 1
        except (OSError, ClientGone) as e:  # resets, timeouts, TLS errors: the connection ended
            self.server.log.debug("%s: connection ended: %s", self.peer, e.__class__.__name__)

    def setup(self):
        self.idle = False  #: blocked waiting for the next request (drain() may end that wait)
        self.served = 0  #: requests answered on this connection before the current one
        ctx = self.server.attach(self)
        self.tls = ctx is not None
        if self.tls:
            # The handshake happens here, in this connection's own thread: a slow or failing
            # client never holds up the others. A failure is one log line, never a traceback.
            self.request.settimeout(HANDSHAKE_TIMEOUT)
            self.idle = True  # a stop may end a handshake that is taking its time
            try:
                # Wrap first, handshake after: wrapping moves the descriptor to the TLS socket, which
                # drain() must be able to reach while the handshake waits.
                self.request = ctx.wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
                self.request.do_handshake()
            except (OSError, ValueError) as e:
                self.server.log.info("%s:%s: TLS handshake failed: %s", self.client_address[0],
                                     self.client_address[1], getattr(e, "reason", None) or e)
                raise ClientGone("TLS handshake failed")
            finally:
                self.idle = False
            self.request.settimeout(None)
        # A read that times out ends the input (the connection closes); a write raises OSError.
        import struct
        timeval = struct.pack("ll", self.server.config.io_timeout, 0)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        super().setup()

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

    @property
    def peer(self):
        return "%s:%s" % self.client_address[:2] if isinstance(self.client_address, tuple) else "?"

    def handle_one_request(self):
        self.headers_sent = False
        self.req = None
        self.status = 0
        self.sent = 0
        self.extra_headers = ()
        self.fault = NO_FAULT  #: (kind, params) of the fault this answer carries out
        self.events = 0  #: stream items sent
        self.chunked_out = True  #: the streamed body is chunked (not for HTTP/1.0 clients)
        self.recorded = False  #: already in the journal
        self.pending = 0  #: bytes about to be written when the journal entry is made
        self.ended = None  #: how the answer ended, when not simply
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if line in (b"\r\n", b"\n"):  # a stray empty line before a request line is ignored (RFC 9112)
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            self.close_connection = True
            return
        srv = self.server
        srv.begin_request(self)
        try:
            self.idle = True  # until the head is whole, a stop may end the wait for the rest of it
            try:
                req = self.parse_head(line)
            finally:
                self.idle = False
            if req is None:
                return
            self.req = req
            self.dispatch(req)
            self.close_unread()
        except HTTPError as e:
            if self.req is not None:
                self.refuse_body(self.req, e)
            self.answer_error(e)
            self.close_unread()
        except Exception as e:
            if isinstance(e, (OSError, ClientGone)):
                self.ended = self.ended or ("closed" if isinstance(e, _Answered) else "client_gone")
                raise
            srv.log.error("error while handling %s:\n%s", self.requestline_text(), format_exc())
            if not self.headers_sent:
                self.send_json(500, {"error": {"message": "dpmock internal error; see its log", "type": "server_error",
                                               "code": "internal_error"}}, close=True)
            else:
                self.close_connection = True
        finally:
            srv.end_request(self)
            if srv.stopping:
                self.close_connection = True
            self.record()
            self.log_request_line()

    def journal_entry(self, seq):
        return journal_entry(self, seq)

    def record(self, ended=None, pending=0):
        """Put this request in the journal, once: called just before the answer's last bytes
        leave (a client holding its answer always finds it there), else when handling ends."""
        if ended:
            self.ended = ended
        req = self.req
        if self.recorded or req is None or (req.route and req.route.name.startswith("control_")):
            return
        self.recorded = True
        self.pending = pending
        self.server.journal.add(self.journal_entry)
        self.pending = 0

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
        if self.tls:
            req.scheme = "https"
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
            te = ",".join(v for k, v in h.items if k.lower() == "transfer-encoding")
            if te.lower().replace(" ", "") != "chunked":
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

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, req):
        try:
            req.route, req.params = match(req.method, req.path)
        except HTTPError as e:
            self.refuse_body(req, e)
            raise
        route = req.route
        if route.provider != "":
            req.provider = route.provider or detect_provider(req)
            self.extra_headers = provider_headers(req.provider, new_id("req_", 12))
        if route.body != BODY_NONE and req.length is None and not req.chunked:
            self.close_connection = True  # whatever follows can't be told apart from a body
            raise HTTPError(411, "%s %s needs a request body with Content-Length or chunked encoding"
                            % (req.method, req.path), "length_required")
        value, params = None, {}
        if route.versioned:
            try:
                value, params = self.scenario_value(req)
            except HTTPError as e:
                self.refuse_body(req, e)
                raise
        kind = value.kind if isinstance(value, scenarios.Fault) else None
        expect = req.headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            self.refuse_body(req, None)
            raise HTTPError(417, "unsupported Expect %r" % expect, "expectation_failed")
        early = None
        if kind == "EXPECT_REJECT" and req.has_body():
            early = self.error_reply(HTTPError(int(params["status"]), "refused before the body was read "
                                               "(scenario EXPECT_REJECT)"))
        elif isinstance(value, Upload) and value.max_bytes is not None and (req.length or 0) > value.max_bytes:
            early = value.too_large
        if early is not None:
            # Answered from the headers: the body is never read, so the connection can't be reused.
            self.send_reply(early, close=True)
            if expect is None:
                self.linger()
            return
        if route.body == BODY_JSON and req.length is not None and req.length > MAX_JSON_BODY:
            self.refuse_body(req, None)
            raise HTTPError(413, "request body of %d bytes is over the %d byte limit" % (req.length, MAX_JSON_BODY),
                            "request_too_large", close=True)
        if expect is not None and req.version == "HTTP/1.1" and req.has_body() and kind != "EXPECT_IGNORE":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # interim: not part of the answer's bytes
        if route.body == BODY_JSON:
            req.json = parse_json_body(self.read_json_body(req))
        elif route.body == BODY_NONE:
            self.refuse_body(req, None)
        if kind in _STREAM_FAULTS and not is_streaming(req):
            value = kind = None  # a stream fault leaves other answers alone
        if kind is not None:
            self.fault = (kind, params)
            self.start_fault(req)
        elif value is not None:
            self.answer_scenario(req, value, params)
            return
        try:
            _HANDLERS[route.handler](self, req)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            if self.headers_sent or isinstance(e, (HTTPError, UnicodeDecodeError)):
                raise
            # A field of the wrong type or value deep in a request body (a list where an id goes,
            # a number where a list goes): the provider answers 400, so does dpmock.
            self.server.log.debug("%s: bad field in %s: %r", self.peer, req.path, e)
            raise invalid("invalid request body: a field has the wrong type or value (%s: %s)"
                          % (e.__class__.__name__, e))
        if req.has_body() and not req.body_done:
            self.close_connection = True  # the handler answered without reading the body

    def scenario_value(self, req):
        """(answer, params) of the scenario selected for this route (schedules stepped), or (None, {})."""
        spec, scenario, params = select_scenario(req)
        if scenario is None:
            return None, {}
        req.scenario = spec
        if scenario.group == "schedule":
            name, seed = self.server.schedules.step(request_key(req) or "", spec, scenario.name, params)
            if seed is not None:
                self.extra_headers = list(self.extra_headers) + [("x-dp-seed", str(seed))]
            if name is None:
                return None, {}
            scenario, params = scenarios.resolve(name)
        value = scenario.routes.get(req.route.name)
        return (value.get(req.provider) if isinstance(value, ByProvider) else value), params

    def start_fault(self, req):
        """Faults that act before any answer is made; the others act in the writers."""
        kind, p = self.fault
        if kind in ("EMPTY_REPLY", "HANG"):
            for _ in self.body_pieces(req):  # an unread body would turn the close into a reset
                pass
        if kind == "EMPTY_REPLY":
            self.abort("empty")
        if kind == "HANG":
            self.server.pause(p["ms"] / 1000.0)
            self.abort("hang")
        if kind == "RESET" and p["after_bytes"] == 0:
            self.abort("reset")

    def answer_scenario(self, req, value, params):
        if isinstance(value, Upload):
            n = 0
            for piece in self.body_pieces(req):
                n += len(piece)
                if value.max_bytes is not None and n > value.max_bytes:
                    self.send_reply(value.too_large, close=True)
                    self.linger()
                    raise _Answered()
            value = scenarios.upload_reply(value, n)
        elif req.route.body == BODY_STREAM:
            for _ in self.body_pieces(req):
                pass
        if isinstance(value, scenarios.ProviderError):
            value = self.provider_error(value, params)
        if isinstance(value, Stream):
            self.send_stream(value)
        else:
            self.send_reply(value)

    def error_reply(self, err):
        """An HTTPError as a Reply in the request's provider shape (with its request id)."""
        rid = next((v for k, v in self.extra_headers if k in ("request-id", "x-request-id")), None)
        return Reply(err.status, err.body(self.req.provider, rid), scenarios.JSON, tuple(err.headers))

    def provider_error(self, pe, params):
        """A ProviderError scenario as this provider's Reply (a proxy page when it has one)."""
        provider = self.req.provider
        status = pe.status if isinstance(pe.status, int) else pe.status[provider]
        if pe.html:
            return Reply(status, pe.html, scenarios.HTML)
        headers, details = [], None
        if "retry_after" in params:
            wait = params["retry_after"]
            if provider == OPENAI:
                headers = [("retry-after", str(wait)), ("retry-after-ms", str(wait * 1000)),
                           ("x-ratelimit-limit-requests", "60"), ("x-ratelimit-remaining-requests", "0"),
                           ("x-ratelimit-reset-requests", "%ds" % wait), ("x-ratelimit-limit-tokens", "30000"),
                           ("x-ratelimit-remaining-tokens", "30000"), ("x-ratelimit-reset-tokens", "0s")]
            elif provider == ANTHROPIC:
                headers = [("retry-after", str(wait)), ("anthropic-ratelimit-requests-limit", "50"),
                           ("anthropic-ratelimit-requests-remaining", "0"),
                           ("anthropic-ratelimit-requests-reset", rfc3339(time.time() + wait, False))]
            else:
                details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "%ds" % wait}]
        if provider == ANTHROPIC:
            err = HTTPError(status, pe.anthropic[1], etype=pe.anthropic[0], headers=headers)
        elif provider == GEMINI:
            err = HTTPError(status, pe.gemini[1], etype=pe.gemini[0], headers=headers, details=details)
        else:
            err = HTTPError(status, pe.openai[2], pe.openai[1], etype=pe.openai[0], headers=headers)
        return self.error_reply(err)

    def close_unread(self):
        """After the answer: a body left unread must neither be parsed as the next request nor
        turn the close into a reset that destroys the answer, so linger-close."""
        req = self.req
        if req is not None and req.has_body() and not req.body_done and self.ended is None:
            self.linger()

    def refuse_body(self, req, err):
        """Before answering without the body: drain a small one so the connection stays usable, else close."""
        if not req.has_body() or req.body_done:
            return
        if req.headers.get("expect") is None and not req.chunked and req.length <= MAX_DISCARD:
            for _ in self.body_pieces(req):
                pass
        else:
            self.close_connection = True
            if err is not None:
                err.close = True

    # ---------------------------------------------------------------- bodies

    def read_json_body(self, req):
        data = bytearray()
        for piece in self.body_pieces(req):
            data += piece
            if len(data) > MAX_JSON_BODY:
                raise HTTPError(413, "request body is over the %d byte limit" % MAX_JSON_BODY, "request_too_large",
                                close=True)
        return bytes(data)

    def body_pieces(self, req):
        """Yield the request body in pieces of at most PIECE bytes (Content-Length or chunked).

        The first JOURNAL_BODY bytes are kept for the request journal; the rest never are.
        """
        if req.body_done:
            return
        for piece in self._chunked_pieces() if req.chunked else self._length_pieces(req.length or 0):
            req.body_bytes += len(piece)
            room = JOURNAL_BODY - len(req.captured)
            if room > 0:
                req.captured += piece[:room]
            yield piece
        req.body_done = True

    def _length_pieces(self, left):
        while left:
            piece = self.rfile.read(min(left, PIECE))
            if not piece:
                raise ClientGone("body cut off")
            left -= len(piece)
            yield piece

    def _chunked_pieces(self):
        while True:
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                if not line:
                    raise ClientGone("chunked body cut off")
                raise HTTPError(400, "chunk size line too long", "bad_chunk", close=True)
            size_text = line.split(b";", 1)[0].strip()
            if not re.match(rb"^[0-9A-Fa-f]{1,15}$", size_text):
                raise HTTPError(400, "invalid chunk size %r" % size_text[:20].decode("latin-1"), "bad_chunk",
                                close=True)
            size = int(size_text, 16)
            if size == 0:
                for _ in range(MAX_HEADERS + 1):  # trailers, ignored
                    t = self.rfile.readline(8194)
                    if not t:
                        raise ClientGone("chunked trailer cut off")
                    if t in (b"\r\n", b"\n"):
                        return
                raise HTTPError(431, "too many trailer fields", "headers_too_large", close=True)
            yield from self._length_pieces(size)
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
            self.drain_until_eof(LINGER_SECONDS)
        except OSError:
            pass

    def drain_until_eof(self, seconds):
        """Read and drop what the client sends until it closes, at most ``seconds`` (or a stop)."""
        deadline = time.monotonic() + seconds
        self.connection.settimeout(0.2)
        while time.monotonic() < deadline and not self.server.stopping:
            try:
                if not self.connection.recv(65536):
                    return
            except socket.timeout:
                continue

    # ---------------------------------------------------------------- writers

    def head_bytes(self, status, headers, close):
        out = [_STATUS_LINES.get(status) or ("HTTP/1.1 %d Status\r\n" % status).encode("latin-1"),
               b"Date: ", http_date().encode("latin-1"), b"\r\nServer: ", self.server_version.encode("latin-1"),
               b"\r\n"]
        for k, v in itertools.chain(headers, self.extra_headers):
            out.append(("%s: %s\r\n" % (k, v)).encode("latin-1"))
        if close or self.close_connection or self.server.stopping:
            self.close_connection = True
            out.append(b"Connection: close\r\n")
        elif self.req is not None and self.req.version == "HTTP/1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def write(self, data):
        """The one place response bytes leave; faults counted in bytes (RESET, STREAM_CUT, SLOW_BODY) act here."""
        kind, p = self.fault
        if kind == "RESET" or kind == "STREAM_CUT" and p["bytes"]:
            limit = p["after_bytes"] if kind == "RESET" else p["bytes"]
            if self.sent + len(data) >= limit:
                self._put(data[:max(0, limit - self.sent)])
                self.abort("reset" if kind == "RESET" or p["how"] == "reset" else "fin")
        if kind == "SLOW_BODY":
            for i in range(0, len(data), p["bytes"]):
                if self.sent:
                    self.server.pause(p["interval_ms"] / 1000.0)
                self._put(data[i:i + p["bytes"]])
            return
        self._put(data)

    def _put(self, data):
        if data:
            self.wfile.write(data)
            self.sent += len(data)

    def abort(self, how):
        """End the connection now, by FIN or by TCP reset, and stop handling this request."""
        self.record(how)
        self.close_connection = True
        if how == "reset":
            import struct
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # the RST leaves when finish() drops the file objects' references
        raise _Answered(how)

    def half_close(self):
        """Shut the sending side (FIN) and keep reading until the client closes (bounded), then stop."""
        self.close_connection = True
        self.record("half_close")
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.drain_until_eof(scenarios.MAX_WAIT_S)
        except OSError:
            pass
        raise _Answered("half_close")

    def send_bytes(self, status, body, content_type, headers=(), close=False):
        """Send a whole response in one write (headers and body together)."""
        kind, p = self.fault
        if self.req is not None and self.req.method == "HEAD" and kind in _BODY_FAULTS:
            kind = None  # a HEAD answer has no body to break
        if kind == "HTML_200":
            status, body, content_type = 200, _HTML_PAGE, scenarios.HTML
        elif kind == "INVALID_JSON_200" and status == 200 and content_type == scenarios.JSON:
            body = body[:len(body) // 2]
        elif kind in ("NO_FINAL_CHUNK", "BAD_CHUNK_SIZE"):
            self.start_chunked(status, content_type, headers, close=True)
            self.send_chunk(body)
            self.end_chunked()
        length = len(body) + (p["missing"] if kind == "SHORT_BODY" else 0)
        hdrs = [("Content-Type", content_type), ("Content-Length", str(length))]
        hdrs.extend(headers)
        head = self.head_bytes(status, hdrs, close or kind == "SHORT_BODY")
        if self.req is not None and self.req.method == "HEAD":
            body = b""
        self.headers_sent = True
        self.status = status
        if kind == "HEADERS_STALL":
            self.write(head)
            self.server.pause(p["ms"] / 1000.0)
            self.abort("fin")
        if kind == "HALF_CLOSE":
            self.write(head + body[:len(body) // 2])
            self.half_close()
        if kind not in ("SHORT_BODY", "RESET", "SLOW_BODY"):
            self.record(pending=len(head) + len(body))
        self.write(head + body)
        if kind == "SHORT_BODY":
            self.abort("fin")

    def send_json(self, status, obj, headers=(), close=False):
        """A JSON answer, compact as the providers send it."""
        self.send_bytes(status, encode_body(obj, compact=True), scenarios.JSON, headers, close)

    def send_reply(self, reply, close=False):
        self.send_bytes(reply.status, encode_body(reply.body), reply.content_type, reply.headers, close)

    def start_chunked(self, status, content_type, headers=(), close=False):
        kind, p = self.fault
        if kind == "HTML_200":  # an HTML page where a stream was expected
            self.send_bytes(200, _HTML_PAGE, scenarios.HTML, close=True)
            raise _Answered("ok")
        # HTTP/1.0 has no chunked encoding: there the body is raw and ends when the connection closes.
        self.chunked_out = self.req is None or self.req.version != "HTTP/1.0"
        hdrs = [("Content-Type", content_type), ("Cache-Control", "no-cache")]
        if self.chunked_out:
            hdrs.insert(1, ("Transfer-Encoding", "chunked"))
        hdrs.extend(headers)
        head = self.head_bytes(status, hdrs, close or not self.chunked_out or
                               kind in ("NO_FINAL_CHUNK", "SHORT_BODY", "BAD_CHUNK_SIZE"))
        self.headers_sent = True
        self.status = status
        self.write(head)
        if kind == "HEADERS_STALL":
            self.server.pause(p["ms"] / 1000.0)
            self.abort("fin")

    def send_chunk(self, data):
        """Write one chunk (size line, data, CRLF) in one write, so each event leaves at once."""
        if data:
            if not self.chunked_out:
                self.write(data)
                return
            if self.fault[0] == "BAD_CHUNK_SIZE":  # a size line that is not hex
                self.write(b"zz\r\n%s\r\n" % data)
                self.abort("fin")
            self.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self):
        kind, p = self.fault
        if kind in ("NO_FINAL_CHUNK", "SHORT_BODY", "BAD_CHUNK_SIZE"):
            self.abort("fin")
        # A stream fault whose threshold the stream never reached fires at its end.
        if kind == "STREAM_ERROR":
            self.send_stream_error("\r\n\r\n" if self.req.provider == GEMINI else "\n\n", None)
        if kind == "STREAM_STALL":
            self.server.pause(p["ms"] / 1000.0)
            self.abort("fin")
        if kind == "STREAM_CUT":
            self.abort(p["how"])
        if self.chunked_out:
            if kind not in ("RESET", "SLOW_BODY"):
                self.record(pending=5)
            self.write(b"0\r\n\r\n")

    def send_sse_event(self, data, event=None, sep="\n\n", compact=True):
        """One SSE event (``data: `` + one line of JSON, optional ``event:``) as one chunk."""
        payload = data if isinstance(data, str) else encode_body(data, compact).decode("utf-8")
        self.stream_item(payload, event, sep)

    def stream_item(self, payload, event=None, sep="\n\n", index=None):
        """One item of a stream: an SSE event, or (``index`` set) an element of a JSON array.

        Stream faults act here: they count items, pace them, break or cut the stream.
        """
        kind, p = self.fault
        n = self.events
        if kind == "STREAM_NO_END" and (payload == "[DONE]" or event == "message_stop"):
            return
        if kind == "STREAM_ERROR" and n == p["after"]:
            self.send_stream_error(sep, index)
        if kind == "STREAM_CUT" and not p["bytes"] and n == p["events"]:
            self.abort(p["how"])
        if kind == "STREAM_STALL" and n == p["after"]:
            self.server.pause(p["ms"] / 1000.0)
            self.abort("fin")
        if kind == "HALF_CLOSE" and n == 1:
            self.half_close()
        if kind == "STREAM_SLOW":
            self.server.pause(p["ttft_ms"] / 1000.0 if n == 0 else 1.0 / p["tps"])
        if kind == "INVALID_JSON_200" and n == 1:
            payload = payload[:len(payload) // 2]
        if index is not None:
            text = ("[" if index == 0 else ",\r\n") + payload
        else:
            text = ("event: %s\ndata: %s%s" % (event, payload, sep)) if event else ("data: %s%s" % (payload, sep))
            if kind == "SSE_LINE_ENDINGS":
                text = text.replace("\r\n", "\n").replace("\n", _EOL[p["eol"]])
            elif kind == "SSE_COMMENTS":
                text = ": dpmock comment before event %d\n%s:\n\n" % (n, text)
        raw = text.encode("utf-8")
        self.events += 1
        if kind == "SSE_SPLIT":
            cuts = [c for c in p["at"] if c < len(raw)] or list(range(p["every"], len(raw), p["every"]))
            for start, end in zip([0] + cuts, cuts + [len(raw)]):
                self.send_chunk(raw[start:end])
        else:
            self.send_chunk(raw)

    def send_stream_error(self, sep, index):
        """The provider's own in-stream error, then the end of the stream (the connection closes)."""
        provider = self.req.provider
        if provider == ANTHROPIC:
            text = "event: error\ndata: %s%s" % (json.dumps({"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}}, separators=(",", ":")), sep)
        else:
            err = {"error": {"message": "The server had an error while processing your request. Sorry about that!",
                             "type": "server_error", "param": None, "code": None}} if provider == OPENAI else \
                {"error": {"code": 500, "message": "An internal error has occurred. Please retry.",
                           "status": "INTERNAL"}}
            payload = json.dumps(err, separators=(",", ":"))
            text = ("data: %s%s" % (payload, sep)) if index is None else \
                "%s%s]" % ("[" if index == 0 else ",\r\n", payload)
        self.close_connection = True
        raw = text.encode("utf-8")
        data = b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw) if self.chunked_out else raw
        self.record("stream_error", len(data))
        self.write(data)
        raise _Answered("stream_error")

    def send_stream(self, stream):
        """Send a scenario Stream: headers, each event flushed on its own, an optional broken tail."""
        self.start_chunked(200, stream.content_type, close=stream.close)
        for ev in stream.events:
            self.send_sse_event(ev.data, ev.event, compact=False)  # the Flask mock's spacing
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
        req = self.req
        provider = req.provider if req is not None else None
        rid = next((v for k, v in self.extra_headers if k in ("request-id", "x-request-id")), None)
        self.send_json(e.status, e.body(provider, rid), e.headers, close=e.close)

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
    """The answer was given (or deliberately broken) and the connection must end: stop quietly."""


NO_FAULT = (None, None)
_BODY_FAULTS = {"NO_FINAL_CHUNK", "BAD_CHUNK_SIZE", "SHORT_BODY", "HALF_CLOSE", "INVALID_JSON_200", "SLOW_BODY"}
#: Faults that shape a stream; other answers are left alone by them.
_STREAM_FAULTS = {"STREAM_ERROR", "STREAM_SLOW", "STREAM_STALL", "STREAM_CUT", "STREAM_NO_END", "SSE_SPLIT",
                  "SSE_LINE_ENDINGS", "SSE_COMMENTS", "SSE_BIG_EVENT", "SSE_MANY_EVENTS"}


def is_streaming(req):
    return req.route.name == "gemini_stream" or bool(isinstance(req.json, dict) and req.json.get("stream"))
_EOL = {"crlf": "\r\n", "lf": "\n", "cr": "\r"}
_HTML_PAGE = b"<html><body><h1>200 OK</h1><p>A page, not the JSON or event stream you asked for.</p></body></html>"


def format_exc():
    """The current exception's traceback (the module loads only when something went wrong)."""
    import traceback
    return traceback.format_exc().rstrip()


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


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
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise HTTPError(400, "request body is not valid JSON: %s" % e, "invalid_json")
    if "\\u" in text:  # escaped lone surrogates parse, but no answer could carry them as UTF-8
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(400, "request body is not valid JSON: it holds a lone UTF-16 surrogate",
                            "invalid_json")
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

class Journal:
    """The last N requests (a ring), for tests to assert on what a client sent."""

    def __init__(self, size):
        import collections
        self.entries = collections.deque(maxlen=size)
        self.cond = threading.Condition()
        self._seq = itertools.count(1)
        self.seq = 0  #: the last sequence number given out
        self.waiters = 0  #: long-polls waiting (only then is there anyone to wake)

    def add(self, make_entry):
        """Record ``make_entry(seq)``. Lock-free (deque.append and next() are atomic): a lock taken by
        every request would make the handler threads queue for it."""
        seq = next(self._seq)
        self.entries.append(make_entry(seq))
        self.seq = seq
        if self.waiters:
            with self.cond:
                self.cond.notify_all()

    def clear(self):
        n = len(self.entries)
        self.entries.clear()
        return n

    def wait(self, filters, since, want, timeout, stop_event):
        """(matching entries, timed out?): at once, or once ``want`` match, or at the timeout or a stop."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = sorted((e for e in list(self.entries) if e.seq > since and _matches(e, filters)),
                               key=lambda e: e.seq)
                left = deadline - time.monotonic()
                if len(found) >= want or left <= 0 or stop_event.is_set():
                    return found, len(found) < want
                self.waiters += 1
                try:
                    self.cond.wait(min(left, 0.25))
                finally:
                    self.waiters -= 1


def _matches(e, filters):
    for name, value in filters.items():
        if name == "path" and value not in e.path:
            return False
        if name == "route" and (e.route.name if e.route else None) != value:
            return False
        if name == "scenario" and (e.scenario or "").split(";")[0].strip() != value:
            return False
        if name == "key" and entry_key(e) != value:
            return False
    return True


_SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "proxy-authorization")


def mask_header(name, value):
    if name.lower() not in _SECRET_HEADERS:
        return value
    scheme, sep, token = value.partition(" ")
    return scheme + sep + mask_key(token) if sep and scheme.lower() in ("bearer", "basic") else mask_key(value)


#: What the journal keeps of each request, raw: formatting waits until someone reads it.
JournalEntry = namedtuple("JournalEntry", "seq time client method path query headers body body_bytes route "
                                          "scenario status bytes_sent duration_ms reused ended")


def journal_entry(h, seq):
    """A cheap record of the request just answered (the request path must stay fast)."""
    req = h.req
    return JournalEntry(seq, time.time(), h.client_address, req.method, req.path, req.query_string,
                        tuple(req.headers.items),
                        bytes(req.captured), req.body_bytes, req.route, req.scenario, h.status or None,
                        h.sent + h.pending, (time.monotonic() - req.t0) * 1000, h.served > 0,
                        h.ended or ("closed" if h.close_connection else "ok"))


def entry_key(e):
    """The unmasked API key of a journal entry (for the ``key`` filter)."""
    return find_key(Headers(e.headers), e.route, parse_query(e.query))


def public_entry(e):
    """A journal entry as JSON: keys masked, body as text (else base64)."""
    try:
        text, b64_text = e.body.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64_text = None, b64(e.body)
    query = re.sub(r"(^|&)key=([^&]*)", lambda m: m.group(1) + "key=" + mask_key(percent_decode(m.group(2))),
                   e.query)
    client = "%s:%s" % e.client[:2] if isinstance(e.client, tuple) else str(e.client)
    return {"seq": e.seq, "time": rfc3339(e.time), "client": client, "method": e.method, "path": e.path,
            "query": query, "headers": [[k, mask_header(k, v)] for k, v in e.headers], "body": text,
            "body_base64": b64_text, "body_bytes": e.body_bytes, "body_truncated": e.body_bytes > len(e.body),
            "route": e.route.name if e.route else None, "scenario": e.scenario, "status": e.status,
            "bytes_sent": e.bytes_sent, "duration_ms": round(e.duration_ms, 3), "reused": e.reused,
            "ended": e.ended}


class Schedules:
    """Per-key request counters for the schedule scenarios (FAIL_FIRST, FAIL_EVERY, SEQUENCE, FAIL_RANDOM)."""

    LIMIT = 10000  #: counters kept; the oldest go first

    def __init__(self, seed):
        self.seed = seed
        self.lock = threading.Lock()
        self.counters = {}  # (key, spec) -> {"count": n, "rng": Random or None}

    def step(self, key, spec, kind, params):
        """Count this request; return (scenario name to apply or None, seed used or None)."""
        with self.lock:
            c = self.counters.get((key, spec))
            if c is None:
                c = self.counters[(key, spec)] = {"count": 0, "rng": None}
                while len(self.counters) > self.LIMIT:
                    self.counters.pop(next(iter(self.counters)))
            i = c["count"]
            c["count"] += 1
            seed = None
            if kind == "FAIL_FIRST":
                fail = i < params["n"]
            elif kind == "FAIL_EVERY":
                fail = (i + 1) % params["k"] == 0
            elif kind == "SEQUENCE":
                step = params["steps"][i] if i < len(params["steps"]) else "OK"
                return (None if step == "OK" else step), None
            else:  # FAIL_RANDOM
                seed = params["seed"] if params["seed"] >= 0 else self.seed
                if c["rng"] is None:
                    import random  # off the start-up path
                    c["rng"] = random.Random(seed)
                fail = c["rng"].random() < params["p"]
        return (params["fault"] if fail else None), seed

    def listing(self):
        with self.lock:
            return [{"key": mask_key(k) if k else "", "scenario": spec, "requests": c["count"]}
                    for (k, spec), c in self.counters.items()]

    def reset(self):
        with self.lock:
            self.counters.clear()


class MockServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The listening socket, the connection threads, and the state every handler shares.

    This is http.server.ThreadingHTTPServer's own recipe (ThreadingMixIn over TCPServer),
    written out so that http.server and its imports stay off the start-up path.
    """

    daemon_threads = True
    block_on_close = False  # idle keep-alive threads must not hold up a stop; stop() drains instead
    request_queue_size = 128

    def __init__(self, config, listeners, log, restarts=0):
        """``listeners``: [(listening socket, TLS context or None)], the first one's URL is DP_MOCK_SERVER."""
        sock = listeners[0][0]
        socketserver.BaseServer.__init__(self, sock.getsockname(), MockHandler)
        self.socket = sock
        self.address_family = sock.family
        self.listeners = listeners
        self.config, self.log, self.restarts = config, log, restarts
        self.urls = [base_url(s, ctx is not None) for s, ctx in listeners]
        self.url = next((u for u in self.urls if u.startswith("http:")), self.urls[0])
        self.boot_id = os.urandom(16).hex()
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.restart_requested = False
        self._lock = threading.Lock()
        self._conns = {}  # accepted connection sockets not yet closed -> [handler, accepted at]
        self._counter = itertools.count(1)
        self.request_count = 0
        self.active = 0
        self.files = FileStore()
        self.journal = Journal(config.journal_size)
        self.schedules = Schedules(config.seed)
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

    def pause(self, seconds):
        """Every deliberate wait goes through here, so a stop cuts it short."""
        self.stop_event.wait(max(0.0, min(seconds, 300.0)))

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

    def begin_request(self, handler):
        self.last_activity = time.monotonic()
        with self._lock:
            self.active += 1
            self.request_count = next(self._counter)

    def end_request(self, handler):
        self.last_activity = time.monotonic()
        with self._lock:
            self.active -= 1

    def handle_error(self, request, client_address):
        """Only unexpected errors reach here (handlers absorb disconnects): log one traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ClientGone)):
            self.log.debug("%s: connection ended: %s", client_address, exc.__class__.__name__)
            return
        self.log.error("unexpected error on a connection from %s:\n%s", client_address,
                       format_exc())

    # ---------------------------------------------------------------- lifecycle

    def request_stop(self, why, restart=False):
        """Ask serve_forever to return; safe from handlers and signal handlers (never blocks)."""
        if self.stopping:
            return
        self.log.info("stopping: %s", why)
        self.restart_requested = restart
        self.stop_event.set()  # serve_forever sees it within its poll interval

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


def bind_listener(host, port, backlog=MockServer.request_queue_size):
    """Bind and listen; raises OSError with a plain message."""
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


def reexec(server, pidfile):
    """Replace this process with a fresh dpmock that inherits the listening sockets and pid file."""
    for sock, _ in server.listeners:
        sock.set_inheritable(True)
    env = dict(os.environ)
    env[ENV_LISTEN_FD] = ",".join(str(sock.fileno()) for sock, _ in server.listeners)
    env[ENV_RESTARTS] = str(server.restarts + 1)
    if pidfile is not None and pidfile.fd is not None:
        os.set_inheritable(pidfile.fd, True)
        env[ENV_PIDFILE_FD] = str(pidfile.fd)
    else:
        env.pop(ENV_PIDFILE_FD, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, SCRIPT] + server.config.to_argv(), env)


################################################################################
# Sandbox: the providers' real hosts, answered by dpmock, offline by construction
################################################################################

SANDBOX_HOSTS = ("api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com")
#: Where distributions keep the system CA bundle (each one present is overlaid in the sandbox).
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/ca-bundle.pem",
              "/etc/ssl/cert.pem", "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem")
SANDBOX_LISTENS = ["--listen", "tls:443", "--listen", "80", "--listen", "8080"]
SANDBOX_UNAVAILABLE = 125  #: exit status when the sandbox itself cannot be made


def sandbox_main(argv):
    """``dpmock.py sandbox [dpmock options] -- CMD [ARGS...]``: CMD's exit status."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("dpmock.py sandbox: usage: python3 dpmock.py sandbox [dpmock options] -- CMD [ARGS...]",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    options, command = argv[:cut], argv[cut + 1:]
    try:
        parse_args(options + SANDBOX_LISTENS)  # refuse bad options before making anything
    except UsageError as e:
        print("dpmock.py sandbox: error: %s" % e, file=sys.stderr)
        return 2
    import shutil
    unshare = shutil.which("unshare")
    if unshare is None:
        return sandbox_unavailable("the unshare command is not installed (util-linux)",
                                   "install util-linux, or run the command without the sandbox")
    flags = ["--mount", "--net", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        flags += ["--user", "--map-root-user"]
    import subprocess
    probe = subprocess.run([unshare] + flags + ["true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if probe.returncode != 0:
        why = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        return sandbox_unavailable("unshare %s failed: %s" % (" ".join(flags), why[-1] if why else "?"),
                                   "run as root, or allow unprivileged user namespaces "
                                   "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces)")
    inner = subprocess.run([unshare] + flags + ["--", sys.executable, SCRIPT, "_sandbox-inner"] + argv)
    return inner.returncode if inner.returncode >= 0 else 128 - inner.returncode


def sandbox_unavailable(cause, hint):
    print("dpmock: sandbox unavailable: %s; %s" % (cause, hint), file=sys.stderr)
    return SANDBOX_UNAVAILABLE


def sandbox_inner(argv):
    """Inside the new namespaces (as root there): set the stage, serve, run the command."""
    cut = argv.index("--")
    options, command = argv[:cut], argv[cut + 1:]
    try:
        loopback_up()
        hosts = "127.0.0.1 localhost %s\n::1 localhost ip6-localhost ip6-loopback\n127.0.0.1 %s\n" % (
            socket.gethostname(), " ".join(SANDBOX_HOSTS))
        overlay(hosts.encode(), "/etc/hosts")
        with open(os.path.join(os.path.dirname(SCRIPT), "certs", "ca.pem"), "rb") as f:
            test_ca = f.read()
        bundles = [p for p in CA_BUNDLES if os.path.isfile(p)]
        for path in bundles:
            with open(path, "rb") as f:
                overlay(f.read().rstrip(b"\n") + b"\n" + test_ca, path)
    except (OSError, StartError) as e:
        return sandbox_unavailable(str(e), "the namespaces were made, but setting them up failed")
    import subprocess
    quiet = [] if any(o in options for o in ("-v", "--verbose", "-q", "--quiet", "--logfile")) else ["-q"]
    server = subprocess.Popen([sys.executable, SCRIPT, "--foreground"] + SANDBOX_LISTENS + quiet + options,
                              stdout=subprocess.PIPE)
    line = server.stdout.readline().decode().strip()
    if not line.startswith("DP_MOCK_SERVER="):
        server.wait()
        return sandbox_unavailable("dpmock did not start inside the sandbox", "see its error above")
    # DP_MOCK_SERVER names the --port listener when one was asked for (so --port 0 gives its real
    # port), else 8080 (the first plain listener dpmock reports is 80).
    asked = any(o == "--port" or o.startswith("--port=") for o in options)
    env = dict(os.environ, DP_MOCK_SERVER=line.split("=", 1)[1] if asked else "http://127.0.0.1:8080")
    bundle = bundles[0] if bundles else None
    if bundle:  # for clients that bring their own CA list (Python's certifi, requests, Node)
        env.update(SSL_CERT_FILE=bundle, REQUESTS_CA_BUNDLE=bundle, CURL_CA_BUNDLE=bundle)
    env["NODE_EXTRA_CA_CERTS"] = os.path.join(os.path.dirname(SCRIPT), "certs", "ca.pem")
    try:
        status = subprocess.call(command, env=env)
    except OSError as e:
        print("dpmock: cannot run %s: %s" % (command[0], e.strerror), file=sys.stderr)
        status = 127
    finally:
        server.terminate()
        server.wait()
    return status if status >= 0 else 128 - status


def loopback_up():
    """Bring the new network namespace's lo interface up (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 0x1))
    finally:
        s.close()


def overlay(content, target):
    """Lay ``content`` over the file ``target`` in this mount namespace only.

    The source is a temporary file, unlinked as soon as it is mounted: the mount keeps the file
    alive as long as the namespace, and outside the namespace nothing remains.
    """
    import ctypes
    import tempfile
    fd, path = tempfile.mkstemp(prefix="dpmock-sandbox-")
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, content)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(path.encode(), target.encode(), None, 4096, None) != 0:  # MS_BIND
            err = ctypes.get_errno()
            raise OSError(err, "cannot bind a file over %s: %s" % (target, os.strerror(err)))
    finally:
        os.close(fd)
        os.unlink(path)


def write_port_file(path, port):
    """Write the port atomically (a reader never sees a half-written file)."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, path)
    except OSError as e:
        raise StartError("cannot write port file %s: %s" % (path, e.strerror))


def watch(server, config):
    """Stop the server once it has been idle for --idle-exit seconds or --parent-pid has gone."""
    while not server.stop_event.wait(0.1):
        if config.parent_pid and not pid_alive(config.parent_pid):
            server.request_stop("parent process %d is gone" % config.parent_pid)
        elif config.idle_exit and server.active == 0 and \
                time.monotonic() - server.last_activity >= config.idle_exit:
            server.request_stop("no request for %g s" % config.idle_exit)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_log(config):
    if config.logfile:
        try:
            return open(config.logfile, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise StartError("cannot open log file %s: %s" % (config.logfile, e.strerror))
    return sys.stderr if config.foreground else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sandbox"]:
        return sandbox_main(argv[1:])
    if argv[:1] == ["_sandbox-inner"]:
        return sandbox_inner(argv[1:])
    try:
        config = parse_args(argv)
    except UsageError as e:
        print("dpmock.py: error: %s (see --help)" % e, file=sys.stderr)
        return 2
    global REFUSED_KEY_PREFIXES
    REFUSED_KEY_PREFIXES = scenarios.BAD_KEY_PREFIXES + config.refuse_keys
    inherited = os.environ.pop(ENV_LISTEN_FD, None)
    pid_fd = os.environ.pop(ENV_PIDFILE_FD, None)
    restarts = int(os.environ.pop(ENV_RESTARTS, "0") or 0)
    socks = []
    if inherited is not None:
        for fd in inherited.split(","):
            socks.append(socket.socket(fileno=int(fd)))
            socks[-1].set_inheritable(False)
    else:
        for tls, host, port in config.listens:
            try:
                socks.append(bind_listener(host, port))
            except OSError as e:
                print("dpmock: cannot listen on %s port %d%s: %s" % (host, port, " (TLS)" if tls else "",
                                                                    e.strerror or e), file=sys.stderr)
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
        ctx = tls_context(config) if any(tls for tls, _, _ in config.listens) else None
        listeners = [(s, ctx if tls else None) for s, (tls, _, _) in zip(socks, config.listens)]
        if config.port_file:
            write_port_file(config.port_file, socks[0].getsockname()[1])
    except StartError as e:
        if ready is not None:
            os.write(ready, ("error %s\n" % e).encode())
            os._exit(1)
        print("dpmock: %s" % e, file=sys.stderr)
        return 1
    server = MockServer(config, listeners, log, restarts)
    install_signals(server)
    if config.idle_exit or config.parent_pid:
        threading.Thread(target=watch, args=(server, config), name="dpmock-watch", daemon=True).start()
    if ready is not None:
        redirect_stdio()
        os.write(ready, ("ok %s\n" % server.url).encode())
        os.close(ready)
    elif inherited is None:
        print("DP_MOCK_SERVER=%s" % server.url, flush=True)
    log.info("serving %s (pid %d, dpmock %s%s)", " ".join(server.urls), os.getpid(), __version__,
             ", restart %d" % restarts if restarts else "")
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        left = server.drain()
        if left:
            log.error("stopping with %d connection(s) still open", left)
    if server.restart_requested:
        reexec(server, pidfile)
    if pidfile is not None:
        pidfile.release()
    if config.port_file:
        try:
            os.unlink(config.port_file)
        except OSError:
            pass
    for s in socks:
        s.close()
    log.info("stopped")
    return 0


#: Handler functions by name, resolved once (a misspelt name in ROUTES fails at import).
_HANDLERS = {r.handler: globals()[r.handler] for r in ROUTES}

if __name__ == "__main__":
    sys.exit(main())
