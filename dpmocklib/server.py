"""dpmock: a standard-library-only mock of the OpenAI, Gemini and Anthropic HTTP APIs.

Usage:
    python3 dpmock.py [--host 127.0.0.1] [--port 8080] [--listen [tls:][HOST:]PORT]...
                      [--tls-cert PATH --tls-key PATH] [--foreground]
                      [--pidfile PATH] [--logfile PATH] [--port-file PATH]
                      [--idle-exit SECONDS] [--parent-pid PID] [--journal-size N]
                      [--seed N] [--io-timeout SECONDS] [-q | -v] [--version]
    python3 dpmock.py sandbox [options above] -- CMD [ARGS...]
    python3 dpmock.py record DIR [--upstream PROVIDER=URL]... [options above]

By default it detaches (double fork + setsid) and the launching process exits 0 only once
the daemon is serving, after printing ``DP_MOCK_SERVER=http://HOST:PORT``. ``sandbox`` runs
CMD offline in new mount and network namespaces where the providers' hosts are dpmock.
``record`` serves in the foreground, forwards what no rule answers to the real providers and
saves each answer in DIR as a rule (``--rules DIR`` replays them), printing where each went.

Exit codes: 0 started (or, in the foreground, stopped cleanly); 1 could not start (address
in use, bad host, pidfile locked, log file unwritable); 2 bad command line. ``sandbox``
returns CMD's status, or 125 when the sandbox cannot be made.
"""

import array
import binascii
import copy
import errno
import fcntl
import http.server
import itertools
import json
import math
import os
import re
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import namedtuple

import scenarios
from scenarios import ByProvider, Reply, Stream, Upload

__version__ = "0.1.0"

#: Absolute path of the dpmock.py launcher beside this package, taken before any chdir, for re-execution.
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dpmock.py")


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
        self.control_from = ()  #: networks (beyond loopback) whose clients may use the control routes
        self.rules = ()  #: --rules files and folders
        self.strict = False  #: --strict: a conversation request no rule matches is an error
        self.refuse_keys = tuple(refuse_keys)  #: --refuse-key prefixes, refused besides scenarios.BAD_KEY_*
        self.record = None  #: --record: the folder where answers forwarded upstream are saved as rules
        self.upstreams = dict(DEFAULT_UPSTREAMS)  #: --upstream: provider -> base URL forwarded to
        self.upstream_ca = None  #: --upstream-ca: CA bundle that verifies HTTPS upstreams (default: the system's)
        self.record_errors = False  #: --record-errors: upstream answers with status >= 400 are recorded too
        self.record_redact = ()  #: --record-redact patterns, replaced by [REDACTED] in recordings
        self.replay_timing = "fast"  #: --replay-timing: recorded answers at their recorded pace, or at once
        self.announce = False  #: the record subcommand: one line per recording on stdout

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
        for net in self.control_from:
            argv += ["--control-from", str(net)]
        for path in self.rules:
            argv += ["--rules", path]
        if self.strict:
            argv.append("--strict")
        if self.record:
            argv += ["--record", self.record]
        for provider, url in sorted(self.upstreams.items()):
            argv += ["--upstream", "%s=%s" % (provider, url)]
        if self.upstream_ca:
            argv += ["--upstream-ca", self.upstream_ca]
        if self.record_errors:
            argv.append("--record-errors")
        for pattern in self.record_redact:
            argv += ["--record-redact", pattern]
        argv += ["--replay-timing", self.replay_timing]
        return (["record"] if self.announce else []) + argv


USAGE = """usage: dpmock.py [--host HOST] [--port PORT] [--listen [tls:][HOST:]PORT]...
                 [--tls-cert PATH --tls-key PATH] [--foreground] [--pidfile PATH]
                 [--logfile PATH] [--port-file PATH] [--idle-exit SECONDS]
                 [--parent-pid PID] [--journal-size N] [--seed N] [--io-timeout SECONDS]
                 [--refuse-key PREFIX]... [--control-from CIDR]... [--rules PATH]... [--strict]
                 [--record DIR [--upstream PROVIDER=URL]... [--upstream-ca PATH]
                  [--record-errors] [--record-redact REGEX]...] [--replay-timing recorded|fast]
                 [-q | -v] [--version]"""

HELP = USAGE + """
       dpmock.py sandbox [options above] -- CMD [ARGS...]
       dpmock.py record DIR [options above]

Mock the OpenAI, Gemini and Anthropic HTTP APIs. The sandbox form runs CMD offline, in new
mount and network namespaces where the providers' hosts resolve to dpmock (HTTPS on 443,
HTTP on 80 and 8080), and returns its exit status. Started by a user other than root, CMD
runs as uid 0 inside (a user namespace maps that user to root there, and only there).
The record form is --record DIR in the foreground, printing one line per recording.

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
  --control-from CIDR  let clients from this network use /_control/ (repeatable; default:
                   loopback only)
  --rules PATH     answer with the rules in this JSON file, or the *.json files of this
                   folder (repeatable; reloaded when a file changes, or on SIGHUP)
  --strict         a conversation request that no rule matches is an error naming the
                   nearest rules (per request: X-DP-Strict: 1)
  --record DIR     forward a provider request that no rule answers (and that selects no
                   scenario) to its upstream, relay the answer, and save it in DIR as a rule
                   (DIR/TEST.json per X-DP-Test-Id, else DIR/default.json); keys never saved
  --upstream PROVIDER=URL
                   where --record forwards openai, anthropic or gemini requests (repeatable,
                   several after one --upstream too; default: the providers' HTTPS hosts)
  --upstream-ca PATH  CA bundle that verifies HTTPS upstreams (default: the system's)
  --record-errors  record upstream answers with status 400 or more too (default: relay only)
  --record-redact REGEX  replace matches by [REDACTED] in recordings (repeatable)
  --replay-timing recorded|fast
                   recorded answers wait their recorded delays, or come at once (default fast)
  -q, --quiet      log errors only
  -v, --verbose    log debug lines too
  --version        print the version and exit
  -h, --help       show this help and exit"""

#: Options that take a value, and flags, by every spelling.
_VALUE_OPTIONS = {"--host": "host", "--port": "port", "--pidfile": "pidfile", "--logfile": "logfile",
                  "--port-file": "port_file", "--idle-exit": "idle_exit", "--parent-pid": "parent_pid",
                  "--journal-size": "journal_size", "--seed": "seed", "--io-timeout": "io_timeout",
                  "--tls-cert": "tls_cert", "--tls-key": "tls_key", "--record": "record",
                  "--upstream-ca": "upstream_ca", "--replay-timing": "replay_timing"}
#: options given once per value
_REPEATED = ("--listen", "--refuse-key", "--control-from", "--rules", "--upstream", "--record-redact")
_FLAGS = {"--foreground": "foreground", "-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose",
          "--strict": "strict", "--record-errors": "record_errors"}
#: Where --record forwards each provider's requests unless --upstream says otherwise.
DEFAULT_UPSTREAMS = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com",
                     "gemini": "https://generativelanguage.googleapis.com"}


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
              "tls_key": None, "io_timeout": "120", "record": None, "upstream_ca": None, "replay_timing": "fast"}
    flags = set()
    listens, refuse, given, control_from, rules, upstreams, redact = [], [], set(), [], [], [], []
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
            elif name == "--control-from":
                control_from.append(value)
            elif name == "--rules":
                rules.append(os.path.abspath(value))
            elif name == "--upstream":  # --upstream openai=URL anthropic=URL: the PROVIDER=URL words that follow
                upstreams.append(value)
                while args and args[0].partition("=")[0] in DEFAULT_UPSTREAMS and "=" in args[0]:
                    upstreams.append(args.pop(0))
            elif name == "--record-redact":
                redact.append(value)
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
    config = Config(host=values["host"], port=port, foreground="foreground" in flags, listens=addresses,
                  tls_cert=cert, tls_key=key,
                  pidfile=path("pidfile"), logfile=path("logfile"), port_file=path("port_file"),
                  idle_exit=number("--idle-exit", 0, 10 ** 7, float), parent_pid=number("--parent-pid", 0, 2 ** 31),
                  journal_size=number("--journal-size", 0, 10 ** 6), seed=seed,
                  io_timeout=number("--io-timeout", 1, 86400), refuse_keys=refuse,
                  verbosity=0 if "quiet" in flags else 2 if "verbose" in flags else 1)
    config.control_from = tuple(parse_network(spec) for spec in control_from)
    config.rules, config.strict = tuple(rules), "strict" in flags
    for rules_path in config.rules:
        if not os.path.exists(rules_path):
            raise UsageError("--rules %s: no such file or folder" % rules_path)
    parse_record_options(config, values, flags, upstreams, redact, path)
    return config


def parse_record_options(config, values, flags, upstreams, redact, path):
    """--record, --upstream, --upstream-ca, --record-errors, --record-redact and --replay-timing."""
    config.record, config.upstream_ca = path("record"), path("upstream_ca")
    config.record_errors = "record_errors" in flags
    if config.record and os.path.exists(config.record) and not os.path.isdir(config.record):
        raise UsageError("--record %s: not a folder" % config.record)
    if config.upstream_ca and not os.path.isfile(config.upstream_ca):
        raise UsageError("--upstream-ca %s: no such file" % config.upstream_ca)
    for spec in upstreams:
        provider, sep, url = spec.partition("=")
        if provider not in DEFAULT_UPSTREAMS or not sep:
            raise UsageError("--upstream takes PROVIDER=URL with PROVIDER openai, anthropic or gemini, not %r"
                             % spec[:60])
        try:
            config.upstreams[provider] = split_url(url).url
        except ValueError as e:
            raise UsageError("--upstream %s: %s" % (provider, e))
    for pattern in redact:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UsageError("--record-redact %r is not a regular expression: %s" % (pattern[:60], e))
        if not pattern or re.compile(pattern).search("") is not None:
            raise UsageError("--record-redact %r matches the empty text: it would redact everywhere" % pattern[:60])
    config.record_redact = tuple(redact)
    if values["replay_timing"] not in ("recorded", "fast"):
        raise UsageError("--replay-timing takes recorded or fast, not %r" % values["replay_timing"][:40])
    config.replay_timing = values["replay_timing"]


class Upstream(namedtuple("Upstream", "url scheme host port base")):
    """An --upstream base URL, split: scheme (http or https), host, port, and the path before the version."""

    __slots__ = ()

    @property
    def netloc(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return host if self.port == {"http": 80, "https": 443}[self.scheme] else "%s:%d" % (host, self.port)


def split_url(url):
    """An http(s)://HOST[:PORT][/PATH] URL as an Upstream; ValueError says what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://, not %r" % url[:60])
    scheme = scheme.lower()
    netloc, _, base = rest.partition("/")
    if "?" in rest or "#" in rest or "@" in netloc:
        raise ValueError("the URL may hold a host, port and path only (no query, fragment or credentials)")
    if netloc.startswith("["):
        host, _, port = netloc[1:].partition("]")
        port = port[1:] if port.startswith(":") else ("" if not port else None)
    else:
        host, _, port = netloc.partition(":")
    if not host or port is None or (port and (not is_digits(port) or not 0 < int(port) < 65536)):
        raise ValueError("%r has no valid host[:port]" % url[:60])
    port = int(port) if port else {"http": 80, "https": 443}[scheme]
    base = ("/" + base).rstrip("/")
    up = Upstream("", scheme, host, port, base)
    return up._replace(url="%s://%s%s" % (scheme, up.netloc, base))


def parse_network(spec):
    """A --control-from value: an address or a CIDR network."""
    import ipaddress
    try:
        return ipaddress.ip_network(spec, strict=False)
    except ValueError:
        raise UsageError("--control-from takes an address or CIDR network (such as 10.0.0.0/8), not %r" % spec)


################################################################################
# Routing
################################################################################

BODY_NONE, BODY_JSON, BODY_STREAM = "none", "json", "stream"
STREAM_NEVER, STREAM_FLAG, STREAM_ALWAYS = "", "flag", "always"
OPENAI, ANTHROPIC, GEMINI = "openai", "anthropic", "gemini"
SHARED, DPMOCK = None, ""  #: route.provider of paths the providers share, and of dpmock's own


class Route(namedtuple("Route", "method pattern name handler provider body stream versioned reader")):
    """One row of the route table: what a path is, and the one function that answers it.

    ``pattern`` is the path after any version prefix, with ``{name}`` placeholders; ``name``
    is the key scenarios.py uses; ``handler(w, req)`` answers through the writer ``w``;
    ``provider`` is OPENAI, ANTHROPIC, GEMINI, SHARED (told apart per request) or DPMOCK;
    ``body`` is BODY_NONE, BODY_JSON (read and parsed before the handler runs) or BODY_STREAM
    (the handler reads it in pieces, never held whole); ``stream`` is STREAM_NEVER,
    STREAM_FLAG (streams when the JSON body says ``"stream": true``) or STREAM_ALWAYS;
    ``reader(req)`` reads a conversation route's body into a Turn (what rules match on).
    Provider routes are also served under /v1, /v1beta, /v1alpha and /v1beta1, and every
    fault of their kind applies to them (see ``applies``): no second list names them.
    """

    __slots__ = ()

    def __new__(cls, method, pattern, name, handler, provider, body=BODY_NONE, stream=STREAM_NEVER, reader=None):
        return super().__new__(cls, method, pattern, name, handler, provider, body, stream, provider != DPMOCK, reader)

    def applies(self, scenario):
        """Whether a fault scenario (``applies`` provider / body / stream) covers this route."""
        kind = scenario.applies
        if kind is None or self.provider == DPMOCK:
            return False
        if scenario.providers and self.provider not in scenario.providers:
            return False
        return (kind == scenarios.ANY_PROVIDER_ROUTE or (kind == scenarios.BODY and self.body != BODY_NONE)
                or (kind == scenarios.STREAMED and self.stream != STREAM_NEVER))

    def streaming(self, req):
        """Whether this request's answer is a stream."""
        return self.stream == STREAM_ALWAYS or (self.stream == STREAM_FLAG and isinstance(req.json, dict)
                                                and req.json.get("stream") is True)


#: Version segments; google-genai also uses /v1alpha and, in Vertex express mode, /v1beta1.
_VERSIONS = ("v1", "v1beta", "v1alpha", "v1beta1")
#: Version prefixes the tests exercise (the C library sends bare paths; SDKs /v1 or /v1beta).
PREFIXES = ("", "/v1", "/v1beta")


class Router:
    """Matches a method and path to a route; 404, or 405 with ``Allow``.

    Routes are matched by path segments, not regexes: compiling a regex per route would cost
    milliseconds at every start. A pattern segment is a literal, ``{name}`` or ``{name}:action``.
    """

    def __init__(self, routes):
        self.routes = tuple(routes)
        self._exact = {}  # path -> {method: route}
        self._hits = {}  # (method, request path) -> route, for paths that name an exact route (a finite set)
        self._patterns = {}  # segment count -> [(segments, {method: route})]
        for r in self.routes:
            if "{" not in r.pattern:
                self._exact.setdefault(r.pattern, {})[r.method] = r
                continue
            segs = tuple(r.pattern.split("/"))
            same = self._patterns.setdefault(len(segs), [])
            for known, methods in same:
                if known == segs:
                    methods[r.method] = r
                    break
            else:
                same.append((segs, {r.method: r}))

    def match(self, method, path):
        """Return (route, params) for a request, or raise HTTPError 404 / 405 (with Allow)."""
        route = self._hits.get((method, path))
        if route is not None:
            return route, {}
        upload = path.startswith("/upload/")  # Gemini media uploads: /upload/v1beta/files
        segments = path.split("/")[2 if upload else 1:]
        versioned = False
        for _ in range(2):  # the C library may send /v1beta/v1/files:upload
            if len(segments) > 1 and segments[0] in _VERSIONS:
                segments = segments[1:]
                versioned = True
        stripped = ("/upload/" if upload else "/") + "/".join(segments)
        allowed = set()
        for methods, params in self._candidates(stripped):
            route = methods.get("GET" if method == "HEAD" else method)
            if route is not None and (route.versioned or not versioned):
                if not params and len(self._hits) < 4096:  # an exact route: the same answer next time
                    self._hits[(method, path)] = route
                return route, params
            allowed.update(m for m, r in methods.items() if r.versioned or not versioned)
        if allowed:
            allowed = sorted(allowed) + (["HEAD"] if "GET" in allowed else [])
            raise HTTPError(405, "method %s is not allowed on %s; allowed: %s" % (method, path, ", ".join(allowed)),
                            "method_not_allowed", headers=(("Allow", ", ".join(allowed)),))
        raise HTTPError(404, "no route for %s %s" % (method, path), "not_found")

    def _candidates(self, path):
        """({method: route}, params) of the exact path, then of the first pattern it fits.

        An exact path wins, but only for its own methods: ``GET /responses/input_tokens`` is
        ``GET /responses/{response_id}``, as the provider sees it, not a 405 from the exact row.
        """
        methods = self._exact.get(path)
        if methods is not None:
            yield methods, {}
        for pattern, methods in self._patterns.get(path.count("/") + 1, ()):
            params = _match_segments(pattern, path.split("/"))
            if params is not None:
                yield methods, params
                return

    def scenario_routes(self, scenario):
        """Names of the routes a scenario answers on: its own rows, or every route of its kind."""
        names = [r.name for r in self.routes if r.applies(scenario)]
        return list(dict.fromkeys(list(scenario.routes) + names))

    def markdown_table(self):
        """The README's route table, generated from the routes."""
        rows = ["| route name | method and path | provider | request body | streams |", "|---|---|---|---|---|"]
        by_name = {}
        for r in self.routes:
            by_name.setdefault(r.name, []).append(r)
        for name, group in by_name.items():
            r = group[0]
            paths = ", ".join("`%s %s`" % (g.method, g.pattern) for g in group)
            provider = {SHARED: "shared", DPMOCK: "dpmock"}.get(r.provider, r.provider)
            body = {BODY_NONE: "none", BODY_JSON: "JSON", BODY_STREAM: "streamed in pieces"}[r.body]
            stream = {STREAM_NEVER: "-", STREAM_FLAG: '`"stream": true`', STREAM_ALWAYS: "always"}[r.stream]
            rows.append("| %s | %s | %s | %s | %s |" % (name, paths, provider, body, stream))
        return "\n".join(rows) + "\n"


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


################################################################################
# Requests: the request line, the header section, body framing and body pieces
################################################################################

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
                 "scheme", "reader", "close_after", "key", "test", "turn", "answer", "rule", "server", "source")

    def __init__(self, method, target, version, headers, reader=None):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        if target.startswith(("http://", "https://")):  # absolute form, as sent to a proxy
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = target.partition("#")[0].partition("?")
        self.path = path or "/"
        self.query_string = query
        self.query = parse_query(query) if query else {}
        self.route, self.params, self.provider = None, {}, None
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
_CTL = bytes(c for c in range(32) if c != 9) + b"\x7f"
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
#: What a Host header may hold (RFC 3986 host and port: reg-name, IP literals, percent-encoding).
_HOST_CHARS = frozenset("-._~:[]%!$&'()*+,;=0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


_FIELD = r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00-\x1f\x7f]|\t)*?)[ \t]*\r?\n"
_compiled = {}


def _field_re():
    """The matcher of a valid header line (compiled on first use, not at start-up)."""
    m = _compiled.get("field")
    if m is None:
        m = _compiled["field"] = re.compile(_FIELD).fullmatch
    return m


def _fields_re():
    """Every valid CRLF header line of a section, each one whole (compiled on first use)."""
    m = _compiled.get("fields")
    if m is None:
        m = _compiled["fields"] = re.compile("(?m)^" + _FIELD.replace(r"\r?\n", r"\r\n")).findall
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
        if sep and name and _TOKEN_CHARS.issuperset(name):
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


################################################################################
# Writers: every byte of an answer leaves through a ResponseWriter
################################################################################

class Answered(ClientGone):
    """The answer was given (or deliberately broken) and the connection must end: stop quietly."""


def _encoder(item_sep, key_sep):
    """A JSON encoder made once: json.dumps with options builds a new encoder at every call, and
    even JSONEncoder.encode builds the C encoder per call; this calls the C one directly."""
    c_make = getattr(json.encoder, "c_make_encoder", None)
    plain = json.JSONEncoder(separators=(item_sep, key_sep), ensure_ascii=False)
    if c_make is None:  # pragma: no cover - CPython always has it
        def encode(obj):
            return plain.encode(obj)
        encode.parts = lambda obj, _level: (plain.encode(obj),)
        return encode

    def fail(o):
        raise TypeError("Object of type %s is not JSON serializable" % o.__class__.__name__)
    fast = c_make(None, fail, json.encoder.encode_basestring, None, key_sep, item_sep, False, False, True)

    def encode(obj):
        if isinstance(obj, str):
            return plain.encode(obj)
        return "".join(fast(obj, 0))
    encode.parts = fast  #: ``parts(obj, 0)``: the pieces of a dict's or list's JSON, to join
    return encode


_COMPACT = _encoder(",", ":")
_SPACED = _encoder(", ", ": ")
_COMPACT_PARTS, _SPACED_PARTS = _COMPACT.parts, _SPACED.parts


def encode_body(body, compact=False):
    """Bytes for a reply body: JSON for dicts and lists, UTF-8 for text."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return (_COMPACT if compact else _SPACED)(body).encode("utf-8")


class ResponseWriter:
    """One request's answer on one connection: its head, its body or stream, and its fault.

    A whole answer is one write (head and body together; TCP_NODELAY is on), a stream item is
    one write (one chunk), so nothing waits on Nagle or a delayed ACK. Faults act through the
    hooks this calls (FaultKind); handlers only say what to send.
    """

    __slots__ = ("conn", "server", "req", "fault", "sent", "status", "events", "headers_sent", "chunked",
                 "extra_headers", "json_array", "entry", "ended", "request_id", "stream_error")

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

    def send_json(self, status, obj, headers=(), close=False):
        """A JSON answer, compact as the providers send it."""
        self.send_bytes(status, encode_body(obj, compact=True), scenarios.JSON, headers, close)

    def send_reply(self, reply, close=False):
        self.send_bytes(reply.status, encode_body(reply.body), reply.content_type, reply.headers, close)

    def error_reply(self, err):
        """An HTTPError as a Reply in the request's provider shape (with its request id)."""
        provider = self.req.provider if self.req is not None else DPMOCK
        return Reply(err.status, PROVIDERS[provider].error_body(err, self.request_id), scenarios.JSON, tuple(err.headers))

    def send_error_reply(self, err, close=False):
        reply = self.error_reply(err)
        self.send_json(reply.status, reply.body, reply.headers, close=close or err.close)

    # ---------------------------------------------------------------- streams

    def start_stream(self, status, ctype, headers=(), close=False):
        """The head of a streamed answer: chunked on HTTP/1.1, raw until the close on HTTP/1.0."""
        fault, p = self.fault
        close = fault.stream_head(self, p) or close
        self.chunked = self.req is None or self.req.version != "HTTP/1.0"
        hdrs = [("Content-Type", ctype), ("Cache-Control", "no-cache")]
        if self.chunked:
            hdrs.insert(1, ("Transfer-Encoding", "chunked"))
        hdrs.extend(headers)
        self.write(self.head(status, hdrs, close or not self.chunked))
        fault.after_head(self, p)

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
        payload = data if isinstance(data, str) else "".join((_COMPACT_PARTS if compact else _SPACED_PARTS)(data, 0))
        if self.fault[0] is _ORDINARY:  # the common case: framed here and written at once
            self.ordinary_item(("event: %s\ndata: %s%s" % (event, payload, sep) if event else
                                "data: %s%s" % (payload, sep)).encode("utf-8"))
            return
        self.stream_item(payload, event, sep)

    def stream_item(self, payload, event=None, sep="\n\n", index=None):
        """One item of a stream: an SSE event, or (``index`` set) an element of a JSON array."""
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
        the faults that count items or reshape them see it as one item."""
        fault, p = self.fault
        if fault is _ORDINARY:  # the common case, in one write without the hooks' calls
            self.ordinary_item(text.encode("utf-8"))
            return
        text = fault.item(self, self.events, text, payload, event, p)
        if text is None:
            return
        self.events += 1
        self.send_chunk(text.encode("utf-8"))

    def ordinary_item(self, data):
        """One stream item no fault touches: counted, framed as a chunk (when chunked), one write."""
        self.events += 1
        self.put(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def send_stream_error(self):
        """The provider's own in-stream error, then the end of the stream (the connection closes)."""
        text = self.stream_error(self) if self.stream_error else PROVIDERS[self.req.provider].stream_error()
        if self.json_array:
            text = "%s%s]" % ("[" if self.events == 0 else ",\r\n", text)
        elif not text.startswith(("data:", "event:")):
            text = "data: %s\r\n\r\n" % text
        self.conn.close_connection = True
        raw = text.encode("utf-8")
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


################################################################################
# Providers: one row each (error shape, keys, models, request ids, rate limits, stream errors)
################################################################################

class HTTPError(Exception):
    """Raised anywhere in request handling; rendered in the provider's own error shape."""

    def __init__(self, status, message, code=None, headers=(), close=False, etype=None, param=None, details=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.close = headers, close
        self.etype, self.param, self.details = etype, param, details


def invalid(message, param=None, code=None):
    """A 400 for a request the provider would refuse; the message names the field."""
    return HTTPError(400, message, code, param=param)


_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                          403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                          413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
                          504: "timeout_error", 529: "overloaded_error"}
_GEMINI_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                    408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                    499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                    504: "DEADLINE_EXCEEDED"}


def _openai_error(e, request_id):
    etype = e.etype or ("invalid_request_error" if e.status < 500 else "server_error")
    return {"error": {"message": e.message, "type": etype, "param": e.param, "code": e.code}}


def _anthropic_error(e, request_id):
    etype = e.etype or _ANTHROPIC_ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else
                                                  "invalid_request_error")
    body = {"type": "error", "error": {"type": etype, "message": e.message}}
    if request_id:
        body["request_id"] = request_id
    return body


def _gemini_error(e, request_id):
    err = {"code": e.status, "message": e.message,
           "status": e.etype or _GEMINI_STATUSES.get(e.status, "INTERNAL" if e.status >= 500 else "FAILED_PRECONDITION")}
    if e.details:
        err["details"] = e.details
    return {"error": err}


def _openai_headers(rid):
    return [("x-request-id", rid), ("openai-version", "2020-10-01"), ("openai-processing-ms", "1")]


def _anthropic_headers(rid):
    return [("request-id", rid), ("anthropic-organization-id", "d9f4a1c2-7e3b-4c5d-9a8f-0b1c2d3e4f50")]


def _openai_rate_limit(wait):
    return [("retry-after", str(wait)), ("retry-after-ms", str(wait * 1000)), ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "%ds" % wait),
            ("x-ratelimit-limit-tokens", "30000"), ("x-ratelimit-remaining-tokens", "30000"),
            ("x-ratelimit-reset-tokens", "0s")], None


def _anthropic_rate_limit(wait):
    return [("retry-after", str(wait)), ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", rfc3339(time.time() + wait, False))], None


def _gemini_rate_limit(wait):
    return [], [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "%ds" % wait}]


def _gemini_bad_key(key):
    text = "API key not valid. Please pass a valid API key."
    return HTTPError(400, text, etype="INVALID_ARGUMENT", details=[
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": text}])


def _compact(obj):
    return json.dumps(obj, separators=(",", ":"))


class Provider(namedtuple("Provider", "name error_body answer_headers key_headers missing_key bad_key "
                                      "missing_model rate_limit stream_error scenario_error field_path")):
    """How one provider says things: every ``if provider == ...`` of the server lives in these rows.

    ``error_body(HTTPError, request id)`` -> JSON body; ``answer_headers(request id)`` -> headers
    on every answer; ``key_headers``: where its clients put the key, in lookup order;
    ``missing_key()``/``bad_key(key)``/``missing_model(model, action)`` -> HTTPError;
    ``rate_limit(seconds)`` -> (headers, error details); ``stream_error`` -> the in-stream error's
    SSE text; ``scenario_error(ProviderError, status, headers, details)`` -> HTTPError;
    ``field_path(parts)`` -> how its error messages name a field.
    """

    __slots__ = ()


PROVIDERS = {
    OPENAI: Provider(
        OPENAI, _openai_error, _openai_headers,
        ("authorization", "x-api-key", "x-goog-api-key"),
        lambda: HTTPError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                               "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."),
        lambda key: HTTPError(401, "Incorrect API key provided: %s. You can find your API key at "
                                   "https://platform.openai.com/account/api-keys." % mask_key(key), "invalid_api_key"),
        lambda model, action: HTTPError(404, "The model `%s` does not exist or you do not have access to it."
                                        % model, "model_not_found"),
        _openai_rate_limit,
        lambda: "data: %s\n\n" % _compact({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": None, "code": None}}),
        lambda pe, status, headers, details: HTTPError(status, pe.openai[2], pe.openai[1], etype=pe.openai[0],
                                                       headers=headers),
        lambda parts: "".join("[%d]" % p if isinstance(p, int) else ("." if i else "") + p
                              for i, p in enumerate(parts))),
    ANTHROPIC: Provider(
        ANTHROPIC, _anthropic_error, _anthropic_headers,
        ("x-api-key", "authorization"),
        lambda: HTTPError(401, "x-api-key header is required", etype="authentication_error"),
        lambda key: HTTPError(401, "invalid x-api-key", etype="authentication_error"),
        lambda model, action: HTTPError(404, "model: %s" % model, etype="not_found_error"),
        _anthropic_rate_limit,
        lambda: "event: error\ndata: %s\n\n" % _compact({"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}}),
        lambda pe, status, headers, details: HTTPError(status, pe.anthropic[1], etype=pe.anthropic[0],
                                                       headers=headers),
        lambda parts: ".".join(str(p) for p in parts)),
    GEMINI: Provider(
        GEMINI, _gemini_error, lambda rid: [],
        ("authorization", "x-api-key", "x-goog-api-key"),
        lambda: HTTPError(403, "Method doesn't allow unregistered callers (callers without established identity). "
                               "Please use API Key or other form of API consumer identity to call this API.",
                          etype="PERMISSION_DENIED"),
        _gemini_bad_key,
        lambda model, action: HTTPError(404, "models/%s is not found for API version v1beta, or is not supported for "
                                             "%s. Call ListModels to see the list of available models and their "
                                             "supported methods." % (model, action), etype="NOT_FOUND"),
        _gemini_rate_limit,
        lambda: _compact({"error": {"code": 500, "message": "An internal error has occurred. Please retry.",
                                    "status": "INTERNAL"}}),
        lambda pe, status, headers, details: HTTPError(status, pe.gemini[1], etype=pe.gemini[0], headers=headers,
                                                       details=details),
        lambda parts: "".join("[%d]" % p if isinstance(p, int) else ("." if i else "") + p
                              for i, p in enumerate(parts))),
}
PROVIDERS[DPMOCK] = PROVIDERS[SHARED] = PROVIDERS[OPENAI]._replace(name=DPMOCK, answer_headers=lambda rid: [])


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


def _bearer(value):
    return value[7:] if value[:7].lower() == "bearer " else "" if value.lower() == "bearer" else value


def request_key(req):
    """The API key, looked up where the provider's clients put it (Anthropic routes: x-api-key first)."""
    if req.key is False:
        req.key = find_key(req.headers, req.route, req.query)
    return req.key


def find_key(h, route, query):
    order = PROVIDERS[route.provider if route is not None and route.provider == ANTHROPIC else OPENAI].key_headers
    for name in order:
        value = h.get(name)
        if value is not None:
            return _bearer(value.strip()).strip() or None  # "Bearer " with nothing after it is no key
    values = query.get("key")  # names are percent-decoded: ?%6Bey= is ?key=
    return values[0].strip() if values else None


def detect_provider(req):
    """Which provider a request on a shared path (GET /models, /files/...) is meant for."""
    h = req.headers
    if "anthropic-version" in h or "x-api-key" in h:
        return ANTHROPIC
    if "x-goog-api-key" in h or req.arg("key") is not None or req.path.startswith(("/v1beta/", "/v1alpha/")):
        return GEMINI
    return OPENAI


def check_key(req):
    """Refuse a missing key, or a bad one (scenarios.BAD_KEYS, or a prefix the server refuses:
    scenarios.BAD_KEY_PREFIXES plus --refuse-key), as the provider does."""
    key = request_key(req)
    if not key:
        raise PROVIDERS[req.provider].missing_key()
    if key in scenarios.BAD_KEYS or key.startswith(req.server.refused_prefixes):
        raise PROVIDERS[req.provider].bad_key(key)


def mask_key(key):
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)


def check_model(req, model, action="generateContent"):
    """Refuse a model id containing ``does-not-exist``, in the provider's words."""
    if scenarios.MISSING_MODEL_MARK in model:
        raise PROVIDERS[req.provider].missing_model(model, action)


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
        self.output = None  #: structured output: a JSON schema, JSON_OBJECT (any object), or ("enum", schema)
        self.system = ""  #: the system prompt / instructions, as text
        self.user_turns = 0  #: user messages that are not only tool results (rules' ``turn``)

    def add_text(self, text):
        if isinstance(text, str) and text:
            self.texts.append(text)


JSON_OBJECT = {"type": "object"}  #: Turn.output for "any JSON object" (json_object, a bare JSON MIME type)


class Plan:
    """dpmock's answer to a Turn: optional thinking, then text pieces or tool calls.

    ``answer`` is a matching rule's (rendered) answer: its text, tool calls, thinking, JSON,
    finish and usage replace dpmock's own; what it leaves out follows dpmock's rules.
    """

    def __init__(self, turn, fault, answer=None):
        answer = answer or {}
        self.thinking = answer.get("thinking") or (thinking_text(turn) if turn.thinking else None)
        self.calls = []  #: (call id suffix, tool name, arguments dict)
        self.pieces = []
        self.finish = "stop"  #: stop | length | tool | filter
        self.structured = None  #: the JSON value of a structured-output answer
        if answer.get("tool_calls"):
            self.calls = [(os.urandom(12).hex(), c["name"], c.get("arguments") or {}) for c in answer["tool_calls"]]
            self.finish = "tool"
        elif "json" in answer or "text" in answer:
            self.structured = answer.get("json")
            text = answer["text"] if "json" not in answer else (
                answer["json"] if isinstance(answer["json"], str) else _COMPACT(answer["json"]))
            self.pieces = json_fragments(text) if "json" in answer else re.findall(_PIECES, text) or [text]
            if turn.max_tokens is not None and len(self.pieces) > turn.max_tokens:
                self.pieces = self.pieces[:turn.max_tokens]
                self.finish = "length"
        elif turn.tool_result is None and turn.tools and not turn.tools_off:
            name = turn.forced_tool or turn.tools[0][0]
            schema = dict(turn.tools).get(name, {})
            self.calls.append((os.urandom(12).hex(), name, schema_instance(schema)))
            self.finish = "tool"
        else:
            if turn.output is not None:  # the JSON arrives as text, in 8-character pieces
                self.structured = structured_answer(turn)
                text = self.structured if isinstance(self.structured, str) else _COMPACT(self.structured)
                self.pieces = json_fragments(text)
            else:
                self.pieces = fault[0].pieces(turn, fault[1]) or re.findall(_PIECES, answer_text(turn))
            if turn.max_tokens is not None and len(self.pieces) > turn.max_tokens:
                self.pieces = self.pieces[:turn.max_tokens]
                self.finish = "length"
        self.text = "".join(self.pieces)
        self.prompt_tokens = count_tokens(turn.texts, turn.media)
        self.thinking_tokens = count_tokens([self.thinking]) if self.thinking else 0
        self.output_tokens = (len(self.pieces) if not self.calls else
                              sum(count_tokens([json.dumps(args)]) for _, _, args in self.calls))
        if "finish" in answer:
            self.finish = RULE_FINISH[answer["finish"]]
        usage = answer.get("usage") or {}
        self.prompt_tokens = usage.get("input_tokens", self.prompt_tokens)
        self.output_tokens = usage.get("output_tokens", self.output_tokens)


def structured_answer(turn):
    """The value of a structured-output answer: an instance of the schema whose first string
    carries the answer text; {"response": text} for any JSON object; an enum's first value."""
    if turn.output is JSON_OBJECT:
        return {"response": answer_text(turn)}
    if isinstance(turn.output, tuple):  # ("enum", schema): Gemini's text/x.enum answers a bare value
        return str(schema_instance(turn.output[1], answer_text(turn)))
    return schema_instance(turn.output, answer_text(turn))


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




# ---------------------------------------------------------------- request bodies, typed as the SDKs type them

class Shape:
    """What a request field must be: ``validate(value, spec, path)`` checks a body against a spec.

    A spec is a type or a tuple of types (``int`` excludes ``bool``), ``[spec]`` (a list of
    such), ``{name: spec}`` (an object whose given fields are such; others are not checked),
    ``Shape.any`` (anything), or ``Shape.of(spec, ...)`` (any one of several specs).
    """

    any = object()

    def __init__(self, *options):
        self.options = options

    @classmethod
    def of(cls, *options):
        return cls(*options)


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
               list: "an array", type(None): "null"}


def _describe(spec):
    if isinstance(spec, list):
        return "an array"
    if isinstance(spec, dict):
        return "an object"
    if isinstance(spec, Shape):
        return " or ".join(_describe(o) for o in spec.options)
    if isinstance(spec, tuple):
        return " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in spec)
    return _TYPE_WORDS.get(spec, getattr(spec, "__name__", "?"))


def _is(value, types):
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def shape_error(value, spec, path):
    """The first place where ``value`` does not fit ``spec``: (path parts, expected words), else None."""
    if spec is Shape.any:
        return None
    if isinstance(spec, Shape):
        errors = []
        if value.__class__ in spec.options:
            return None  # the common case: a plain value of a listed type
        for option in spec.options:
            err = shape_error(value, option, path)
            if err is None:
                return None
            errors.append(err)
        deeper = [e for e in errors if len(e[0]) > len(path)]
        return deeper[0] if len(deeper) == 1 else (path, _describe(spec))
    if isinstance(spec, list):
        if not isinstance(value, list):
            return path, "an array"
        for i, item in enumerate(value):
            err = shape_error(item, spec[0], path + [i])
            if err:
                return err
        return None
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return path, "an object"
        for name, item in value.items():
            sub = spec.get(name, Shape.any)
            if sub is Shape.any or (sub.__class__ is type and item.__class__ is sub):
                continue  # the common cases, without a call
            err = shape_error(item, sub, path + [name])
            if err:
                return err
        return None
    return None if _is(value, spec) else (path, _describe(spec))


def _type_name(value):
    return {True: "a boolean", False: "a boolean"}.get(value, None) if isinstance(value, bool) else \
        _TYPE_WORDS.get(type(value), type(value).__name__)


def validate(provider, body, spec):
    """Raise the provider's 400 naming the first field of ``body`` that does not fit ``spec``."""
    err = shape_error(body, spec, [])
    if err is None:
        return
    parts, expected = err
    value = body
    for p in parts:
        value = value[p]
    field = PROVIDERS[provider].field_path(parts) or "body"
    if provider == ANTHROPIC:
        raise invalid("%s: Input should be %s, not %s" % (field, expected, _type_name(value)))
    if provider == GEMINI:
        raise invalid("Invalid value at '%s': expected %s, got %s" % (field, expected, _type_name(value)))
    raise invalid("Invalid type for '%s': expected %s, but got %s instead." % (field, expected, _type_name(value)),
                  field, "invalid_type")


################################################################################
# Schema instances and embeddings: the values dpmock makes up, deterministically
################################################################################

MAX_DEPTH = 16          # nesting depth from which only the cheapest valid value is generated
MAX_REF_REPEAT = 2      # a $ref may recur this often on one path before cheap mode
HARD_DEPTH = 48         # past this depth generation gives up (None)
MAX_ITEMS = 1000        # clamp for minItems / minProperties
MAX_STRING = 10000
MAX_PATTERN_CHECK = 100  # longer strings are never checked against a pattern (re can backtrack exponentially)      # clamp for minLength and regex repeats
BUDGET = 20000          # values generated per call before cheap mode (twice that: give up)
STEP_LIMIT = 200000     # schema resolutions + validation steps per call
UNION_TRIALS = 8        # anyOf / oneOf branches tried
UNIQUE_TRIES = 16       # attempts to find a distinct item under uniqueItems

_MISSING = object()
_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
_ALIASES = (("min_items", "minItems"), ("max_items", "maxItems"), ("min_length", "minLength"),
            ("max_length", "maxLength"), ("min_properties", "minProperties"),
            ("max_properties", "maxProperties"), ("property_ordering", "propertyOrdering"),
            ("any_of", "anyOf"), ("one_of", "oneOf"), ("all_of", "allOf"),
            ("additional_properties", "additionalProperties"), ("prefix_items", "prefixItems"),
            ("pattern_properties", "patternProperties"), ("multiple_of", "multipleOf"),
            ("exclusive_minimum", "exclusiveMinimum"), ("exclusive_maximum", "exclusiveMaximum"),
            ("unique_items", "uniqueItems"), ("min_contains", "minContains"),
            ("max_contains", "maxContains"), ("$recursiveRef", "$ref"), ("$dynamicRef", "$ref"))
_FIRST_WINS = frozenset(("title", "description", "default", "examples", "example", "$schema", "$id",
                         "id", "$comment", "$defs", "definitions", "discriminator", "propertyOrdering",
                         "readOnly", "writeOnly", "deprecated", "$anchor", "$dynamicAnchor"))
_MAX_OF = frozenset(("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties", "minContains"))
_MIN_OF = frozenset(("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties", "maxContains"))
_SUBSCHEMA = frozenset(("items", "additionalProperties", "contains", "propertyNames",
                        "unevaluatedProperties", "unevaluatedItems"))
_OBJ_KEYS = ("properties", "required", "additionalProperties", "patternProperties", "minProperties",
             "maxProperties", "propertyOrdering", "propertyNames", "dependentRequired")
_ARR_KEYS = ("items", "prefixItems", "minItems", "maxItems", "contains", "uniqueItems")
_NUM_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_STR_KEYS = ("minLength", "maxLength", "pattern", "format")
_LAST_RESORT = ("Example123!",)


def schema_instance(schema, text="example"):
    """A JSON value valid against `schema`; the first string field carries `text` (module doc)."""
    if not isinstance(text, str):
        text = "example" if text is None else str(text)
    ctx = _Ctx(schema, text)
    try:
        return _gen(schema, ctx, 0, 0)
    except Exception:  # never raise: RecursionError on absurd inputs, anything unforeseen
        return text


class _Ctx(object):
    """Per-call state: the root for $ref, the text slot, budgets and caches."""

    def __init__(self, root, text):
        self.root = root
        self.text = text
        self.text_used = False
        self.budget = BUDGET
        self.steps = 0
        self.refs = {}
        self.over = 0
        self.canon = {}
        self.index = None


################################################################################
# Schema normalisation: canonical keys, $ref, allOf
################################################################################

def _num(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value):
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)


def _count(value, default, ceil=True):
    """A non-negative count from an int, integral float or digit string (Gemini int64)."""
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    if isinstance(value, bool) or not _finite(value):
        return default
    value = math.ceil(value) if ceil else math.floor(value)
    return max(int(value), 0)


def _canon(schema, ctx):
    """A canonical shallow copy: camelCase keys, lower-case type list, nullable folded in,
    draft-4 boolean exclusives made numeric, tuple `items` turned into `prefixItems`."""
    hit = ctx.canon.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    out = dict(schema)
    for old, new in _ALIASES:
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    types = out.pop("type", None)
    if isinstance(types, str):
        types = [types]
    if isinstance(types, (list, tuple)):
        types = [t.lower() for t in types if isinstance(t, str) and t.lower() in _TYPES]
        if types:
            out["type"] = list(dict.fromkeys(types))
    if out.pop("nullable", None) is True:
        if "type" in out and "null" not in out["type"]:
            out["type"] = out["type"] + ["null"]
        if isinstance(out.get("enum"), list) and not any(e is None for e in out["enum"]):
            out["enum"] = out["enum"] + [None]
    for flag_key, bound_key in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(flag_key)
        if isinstance(flag, bool):
            del out[flag_key]
            if flag and bound_key in out:
                out[flag_key] = out.pop(bound_key)
    if isinstance(out.get("items"), list):
        out.setdefault("prefixItems", out["items"])
        out["items"] = out.pop("additionalItems", True)
    ctx.canon[id(schema)] = (schema, out)
    return out


def _norm(schema, ctx, refs, chain=(), level=0):
    """`schema` with $ref and allOf merged in (None for the false schema); appends the $refs used."""
    if schema is False:
        return None
    if not isinstance(schema, dict):
        return {}
    ctx.steps += 1
    if level > 24 or ctx.steps > STEP_LIMIT:
        return {}
    out = dict(_canon(schema, ctx))
    ref = out.pop("$ref", None)
    if isinstance(ref, str):
        refs.append(ref)
        target = {} if ref in chain else _norm(_resolve(ref, ctx), ctx, refs, chain + (ref,), level + 1)
        if target is None:
            return None
        out = _merge(target, out, ctx)
    subs = out.pop("allOf", None)
    if isinstance(subs, list):
        for sub in subs:
            part = _norm(sub, ctx, refs, chain, level + 1)
            if part is None:
                return None
            out = _merge(out, part, ctx)
    return out


def _type_meet(a, b):
    out = []
    for t in a:
        if t in b:
            out.append(t)
        elif t in ("number", "integer") and ("number" in b or "integer" in b):
            out.append("integer")
    return list(dict.fromkeys(out)) or None


def _merge(a, b, ctx):
    """The conjunction of two canonical schemas; what cannot be merged stays in `allOf`."""
    out = dict(a)
    rest = {}
    for key, value in b.items():
        if key not in out:
            out[key] = value
            continue
        cur = out[key]
        if key == "type" and isinstance(cur, list) and isinstance(value, list):
            meet = _type_meet(cur, value)
            if meet is None:
                rest[key] = value
            else:
                out[key] = meet
        elif key == "required" and isinstance(cur, list) and isinstance(value, list):
            out[key] = list(cur) + [r for r in value if r not in cur]
        elif key in ("properties", "patternProperties") and isinstance(cur, dict) and isinstance(value, dict):
            merged = dict(cur)
            for name, sub in value.items():
                merged[name] = {"allOf": [merged[name], sub]} if name in merged else sub
            out[key] = merged
        elif key == "allOf" and isinstance(cur, list) and isinstance(value, list):
            out[key] = cur + value
        elif key in _MAX_OF and _finite(cur) and _finite(value):
            out[key] = max(cur, value)
        elif key in _MIN_OF and _finite(cur) and _finite(value):
            out[key] = min(cur, value)
        elif key == "enum" and isinstance(cur, list) and isinstance(value, list):
            out[key] = [x for x in cur if any(_jeq(x, y) for y in value)]
        elif key in _SUBSCHEMA and isinstance(cur, (dict, bool)) and isinstance(value, (dict, bool)):
            out[key] = {"allOf": [cur, value]}
        elif key == "uniqueItems":
            out[key] = cur is True or value is True
        elif key in _FIRST_WINS or _jeq(cur, value):
            pass
        else:
            rest[key] = value
    _close_properties(a, b, out)
    if rest:
        left = out.get("allOf")
        out["allOf"] = (list(left) if isinstance(left, list) else []) + [rest]
    return out


def _close_properties(a, b, out):
    """Merged properties that are additional for one side obey its additionalProperties:
    dropped where it is false, combined with it where it is a schema."""
    props = out.get("properties")
    if not isinstance(props, dict):
        return
    for side in (a, b):
        extra = side.get("additionalProperties")
        if extra is not False and not isinstance(extra, dict):
            continue
        own = side.get("properties") if isinstance(side.get("properties"), dict) else {}
        pats = side.get("patternProperties") if isinstance(side.get("patternProperties"), dict) else {}
        covered = lambda k: k in own or any(_search(p, k) for p in pats)
        if extra is False:
            props = {k: v for k, v in props.items() if covered(k)}
        else:
            props = {k: v if covered(k) else {"allOf": [v, extra]} for k, v in props.items()}
    out["properties"] = props


def _resolve(ref, ctx):
    """The local target of a $ref (None when it is not local or missing)."""
    pos = ref.find("#")
    base, frag = (ref, "") if pos < 0 else (ref[:pos], ref[pos + 1:])
    start = ctx.root
    if base:
        root_id = ctx.root.get("$id") if isinstance(ctx.root, dict) else None
        if not (isinstance(root_id, str) and (root_id == base or root_id.endswith("/" + base))):
            start = _index(ctx).get(base)
            if start is None:
                return None
    if "%" in frag:
        from urllib.parse import unquote
        frag = unquote(frag)
    if not frag:
        return start
    if not frag.startswith("/"):
        return _index(ctx).get("#" + frag)
    node = start
    for token in frag.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and token.isascii() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _index(ctx):
    """$id and $anchor names of the root's subschemas (built once per call, bounded)."""
    if ctx.index is not None:
        return ctx.index
    index, stack, seen = {}, [ctx.root], 0
    while stack and seen < 20000:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            for key in ("$anchor", "$dynamicAnchor"):
                if isinstance(node.get(key), str):
                    index.setdefault("#" + node[key], node)
            sid = node.get("$id", node.get("id"))
            if isinstance(sid, str):
                index.setdefault(sid, node)
                index.setdefault(sid.rstrip("#"), node)
                if "/" in sid:
                    index.setdefault(sid.rsplit("/", 1)[1], node)
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    ctx.index = index
    return index


################################################################################
# Validation (the truth every generated candidate is checked against)
################################################################################

def _jeq(a, b):
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _num(a) and _num(b):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_jeq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_jeq(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _jkey(value):
    """A hashable key equal for JSON-equal values."""
    if isinstance(value, bool):
        return ("b", value)
    if _num(value):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z",)
    if isinstance(value, (list, tuple)):
        return ("l",) + tuple(_jkey(x) for x in value)
    if isinstance(value, dict):
        return ("d", frozenset((k, _jkey(x)) for k, x in value.items()))
    return ("o", repr(value))


def _is_type(value, kind):
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return _num(value) and (isinstance(value, int) or math.isfinite(value) and value.is_integer())
    if kind == "number":
        return _num(value)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "array":
        return isinstance(value, (list, tuple))
    if kind == "object":
        return isinstance(value, dict)
    return True


def _ok(value, schema, ctx, depth=0):
    """Whether `value` is valid against `schema` (True when it cannot tell within the budget)."""
    if schema is False:
        return False
    if not isinstance(schema, dict):
        return True
    ctx.steps += 1
    if depth > 64 or ctx.steps > STEP_LIMIT:
        return True
    s = _canon(schema, ctx)
    ref = s.get("$ref")
    if isinstance(ref, str) and not _ok(value, _resolve(ref, ctx), ctx, depth + 1):
        return False
    types = s.get("type")
    if types and not any(_is_type(value, t) for t in types):
        return False
    enum = s.get("enum")
    if isinstance(enum, list) and not any(_jeq(value, e) for e in enum):
        return False
    if "const" in s and not _jeq(value, s["const"]):
        return False
    if not _ok_logic(value, s, ctx, depth + 1):
        return False
    if isinstance(value, bool) or value is None:
        return True
    if _num(value):
        return _ok_number(value, s)
    if isinstance(value, str):
        return _ok_string(value, s)
    if isinstance(value, (list, tuple)):
        return _ok_array(value, s, ctx, depth + 1)
    if isinstance(value, dict):
        return _ok_object(value, s, ctx, depth + 1)
    return True


def _ok_logic(value, s, ctx, depth):
    subs = s.get("allOf")
    if isinstance(subs, list) and not all(_ok(value, x, ctx, depth) for x in subs):
        return False
    subs = s.get("anyOf")
    if isinstance(subs, list) and subs and not any(_ok(value, x, ctx, depth) for x in subs):
        return False
    subs = s.get("oneOf")
    if isinstance(subs, list) and subs and sum(1 for x in subs if _ok(value, x, ctx, depth)) != 1:
        return False
    if isinstance(s.get("not"), (dict, bool)) and _ok(value, s["not"], ctx, depth):
        return False
    if isinstance(s.get("if"), (dict, bool)):
        branch = s.get("then") if _ok(value, s["if"], ctx, depth) else s.get("else")
        if isinstance(branch, (dict, bool)) and not _ok(value, branch, ctx, depth):
            return False
    return True


def _bounds(s):
    """(low, low_exclusive, high, high_exclusive) from a canonical schema."""
    lo, lo_ex, hi, hi_ex = None, False, None, False
    for key, exclusive in (("minimum", False), ("exclusiveMinimum", True)):
        v = s.get(key)
        if _finite(v) and (lo is None or v > lo or v == lo and exclusive):
            lo, lo_ex = v, exclusive
    for key, exclusive in (("maximum", False), ("exclusiveMaximum", True)):
        v = s.get(key)
        if _finite(v) and (hi is None or v < hi or v == hi and exclusive):
            hi, hi_ex = v, exclusive
    return lo, lo_ex, hi, hi_ex


def _ok_number(value, s):
    try:
        lo, lo_ex, hi, hi_ex = _bounds(s)
        if lo is not None and (value < lo or lo_ex and value == lo):
            return False
        if hi is not None and (value > hi or hi_ex and value == hi):
            return False
        m = s.get("multipleOf")
        if _finite(m) and m > 0:
            if isinstance(m, float):  # the same float arithmetic as the jsonschema package
                quotient = value / m
                return math.isfinite(quotient) and int(quotient) == quotient
            return not value % m
    except (ArithmeticError, ValueError, TypeError):
        return True
    return True


def _ok_string(value, s):
    lo, hi = _count(s.get("minLength"), None), _count(s.get("maxLength"), None, False)
    if lo is not None and len(value) < lo or hi is not None and len(value) > hi:
        return False
    pattern = s.get("pattern")
    if isinstance(pattern, str):
        if len(value) > MAX_PATTERN_CHECK:  # re backtracks exponentially on some patterns: never on long text
            return False
        rx = _regex(pattern)
        if rx is not None and rx.search(value) is None:
            return False
    fmt = s.get("format")
    return not isinstance(fmt, str) or _format_ok(fmt, value)


def _ok_array(value, s, ctx, depth):
    n = len(value)
    lo, hi = _count(s.get("minItems"), None), _count(s.get("maxItems"), None, False)
    if lo is not None and n < lo or hi is not None and n > hi:
        return False
    prefix = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else []
    items = s.get("items", True)
    for i, item in enumerate(value):
        if not _ok(item, prefix[i] if i < len(prefix) else items, ctx, depth):
            return False
    if s.get("uniqueItems") is True:
        try:
            if len(set(_jkey(x) for x in value)) != n:
                return False
        except TypeError:
            pass
    if isinstance(s.get("contains"), (dict, bool)):
        hits = sum(1 for x in value if _ok(x, s["contains"], ctx, depth))
        lo, hi = _count(s.get("minContains"), 1), _count(s.get("maxContains"), None, False)
        if hits < lo or hi is not None and hits > hi:
            return False
    return True


def _ok_object(value, s, ctx, depth):
    req = s.get("required")
    if isinstance(req, list) and any(isinstance(r, str) and r not in value for r in req):
        return False
    props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
    pats = s.get("patternProperties") if isinstance(s.get("patternProperties"), dict) else {}
    extra = s.get("additionalProperties", True)
    for key, item in value.items():
        matched = key in props
        if matched and not _ok(item, props[key], ctx, depth):
            return False
        for pattern, sub in pats.items():
            if isinstance(key, str) and _search(pattern, key):
                matched = True
                if not _ok(item, sub, ctx, depth):
                    return False
        if not matched and not _ok(item, extra, ctx, depth):
            return False
    lo, hi = _count(s.get("minProperties"), None), _count(s.get("maxProperties"), None, False)
    if lo is not None and len(value) < lo or hi is not None and len(value) > hi:
        return False
    names = s.get("propertyNames")
    if isinstance(names, (dict, bool)) and not all(_ok(k, names, ctx, depth) for k in value):
        return False
    deps = s.get("dependentRequired")
    if isinstance(deps, dict):
        for key, needed in deps.items():
            if key in value and isinstance(needed, list) and any(n not in value for n in needed):
                return False
    return True


_RX_CACHE = {}


def _regex(pattern):
    """`pattern` compiled by Python's re (ECMA named groups translated), None if it can't be."""
    try:
        return _RX_CACHE[pattern]
    except KeyError:
        pass
    except TypeError:
        return None
    source = pattern
    if "(?<" in source or "\\k<" in source:
        source = _ecma_to_python(source)
    try:
        rx = re.compile(source)
    except (re.error, RecursionError, OverflowError, ValueError, TypeError, MemoryError):
        rx = None
    if len(_RX_CACHE) > 512:
        _RX_CACHE.clear()
    _RX_CACHE[pattern] = rx
    return rx


def _ecma_to_python(source):
    out, i = [], 0
    while i < len(source):
        if source.startswith("\\", i):
            if source.startswith("\\k<", i) and source.find(">", i) > 0:
                end = source.find(">", i)
                out.append("(?P=" + source[i + 3:end] + ")")
                i = end + 1
                continue
            out.append(source[i:i + 2])
            i += 2
        elif source.startswith("(?<", i) and source[i + 3:i + 4] not in ("=", "!"):
            out.append("(?P<")
            i += 3
        else:
            out.append(source[i])
            i += 1
    return "".join(out)


def _search(pattern, value):
    rx = _regex(pattern) if isinstance(pattern, str) else None
    return rx is not None and isinstance(value, str) and rx.search(value) is not None


_FORMAT_RX = {
    "date": r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}\Z",
    "date-time": r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
                 r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})\Z",
    "time": r"\A[0-2][0-9]:[0-5][0-9]:[0-6][0-9](?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?\Z",
    "email": r"\A[^@\s]+@[^@\s]+\Z", "idn-email": r"\A[^@\s]+@[^@\s]+\Z",
    "uri": r"\A[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z", "url": r"\A[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z",
    "iri": r"\A[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z", "uri-reference": r"\A[^\s]*\Z", "iri-reference": r"\A[^\s]*\Z",
    "uri-template": r"\A[^\s]*\Z",
    "uuid": r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z",
    "hostname": r"\A(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z",
    "idn-hostname": r"\A[^\s@/]+\Z",
    "duration": r"\AP(?=[0-9T])(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+W)?(?:[0-9]+D)?"
                r"(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+(?:\.[0-9]+)?S)?)?\Z",
    "byte": r"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z",
    "json-pointer": r"\A(?:/(?:[^~/]|~[01])*)*\Z",
    "relative-json-pointer": r"\A[0-9]+(?:#|(?:/(?:[^~/]|~[01])*)*)\Z",
}


def _format_ok(fmt, value):
    """Whether `value` has string format `fmt` (unknown formats always pass)."""
    fmt = fmt.lower()
    if fmt in ("ipv4", "ipv6"):
        import ipaddress
        try:
            (ipaddress.IPv4Address if fmt == "ipv4" else ipaddress.IPv6Address)(value)
            return True
        except ValueError:
            return False
    if fmt == "regex":
        return _regex(value) is not None
    source = _FORMAT_RX.get(fmt)
    if source is None:
        return True
    if _regex(source).search(value) is None:
        return False
    if fmt in ("date", "date-time"):
        import datetime
        try:
            datetime.date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
        except ValueError:
            return False
    if fmt in ("date-time", "time"):
        clock = value[11:19] if fmt == "date-time" else value[0:8]
        if int(clock[0:2]) > 23 or int(clock[3:5]) > 59 or int(clock[6:8]) > 60:
            return False
    return True


def _format_sample(fmt, k):
    """The k-th sample value of a string format (None when unknown)."""
    fmt = fmt.lower()
    n = "" if k == 0 else str(k + 1)
    samples = {
        "date": "2025-01-%02d" % (1 + k % 28), "date-time": "2025-01-%02dT00:00:00Z" % (1 + k % 28),
        "time": "00:00:%02dZ" % (k % 60), "email": "user%s@example.com" % n,
        "idn-email": "user%s@example.com" % n, "uri": "https://example.com" + (n and "/" + n),
        "uuid": "00000000-0000-4000-8000-%012d" % (k % 10 ** 12), "hostname": "example%s.com" % n,
        "idn-hostname": "example%s.com" % n, "ipv4": "192.0.2.%d" % (1 + k % 254),
        "ipv6": "2001:db8::%x" % (k + 1), "duration": "P%dD" % (k + 1),
        "byte": b64(("example" + n).encode()), "json-pointer": "/example" + n,
        "relative-json-pointer": str(k), "regex": "example" + n, "uri-template": "https://example.com/{id}",
    }
    for alias in ("url", "iri", "uri-reference", "iri-reference"):
        samples[alias] = samples["uri"]
    return samples.get(fmt)


################################################################################
# Generation
################################################################################

def _copy(value):
    try:
        return copy.deepcopy(value)
    except Exception:
        return value


def _infer_types(view):
    for keys, kind in ((_OBJ_KEYS, "object"), (_ARR_KEYS, "array"), (_NUM_KEYS, "number"), (_STR_KEYS, "string")):
        if any(k in view for k in keys):
            fmt = view.get("format")
            if kind == "string" and fmt in ("int32", "int64", "uint32", "uint64"):
                return ["integer"]
            if kind == "string" and fmt in ("float", "double"):
                return ["number"]
            return [kind]
    return ["string"]


def _gen(schema, ctx, depth, variant=0):
    """A value for `schema` at nesting `depth`; `variant` > 0 asks for a different value."""
    ctx.budget -= 1
    if ctx.budget < -BUDGET or depth > HARD_DEPTH:
        return None
    refs = []
    view = _norm(schema, ctx, refs)
    if view is None:
        return None
    for ref in refs:  # ctx.over: how many $refs recur too often on the current path
        ctx.refs[ref] = ctx.refs.get(ref, 0) + 1
        ctx.over += ctx.refs[ref] == MAX_REF_REPEAT + 1
    try:
        cheap = depth >= MAX_DEPTH or ctx.budget <= 0 or ctx.over > 0
        return _gen_view(view, ctx, depth, variant, cheap)
    finally:
        for ref in refs:
            ctx.over -= ctx.refs[ref] == MAX_REF_REPEAT + 1
            ctx.refs[ref] -= 1


def _gen_view(view, ctx, depth, variant, cheap):
    if "const" in view:
        return _copy(view["const"])
    default = view.get("default")
    if default is not None and _ok(default, view, ctx):
        if isinstance(default, str) and not ctx.text_used:
            return _gen_string(view, ctx, variant, [default])
        return _copy(default)
    for key in ("oneOf", "anyOf"):
        branches = view.get(key)
        if isinstance(branches, list) and branches:
            return _gen_union(view, key, branches, ctx, depth, variant, cheap)
    enum = view.get("enum")
    if isinstance(enum, list) and enum:
        return _gen_enum(view, enum, ctx, variant)
    types = view.get("type")
    if not types:  # inferred from the keywords; other types may do when that one cannot be valid
        types = _infer_types(view)
        types = types + [t for t in ("string", "integer", "boolean", "null") if t not in types]
    if cheap and "null" in types and "type" in view:
        return None
    kinds = [t for t in types if t != "null"] or ["null"]
    if "null" in types and "type" not in view:
        kinds.append("null")
    if len(kinds) > 1 and ("not" in view or "allOf" in view or "type" not in view):  # first type that can be valid
        for kind in kinds:
            start = ctx.text_used
            value = _gen_kind(kind, view, ctx, depth, variant, cheap)
            if _ok(value, view, ctx):
                return value
            ctx.text_used = start
    return _gen_kind(kinds[0], view, ctx, depth, variant, cheap)


def _gen_kind(kind, view, ctx, depth, variant, cheap):
    if kind == "object":
        return _gen_object(view, ctx, depth, variant, cheap)
    if kind == "array":
        return _gen_array(view, ctx, depth, variant, cheap)
    if kind in ("integer", "number"):
        return _gen_number(view, ctx, kind == "integer", variant)
    if kind == "boolean":
        return variant % 2 == 0
    if kind == "null":
        return None
    return _gen_string(view, ctx, variant, [])


def _null_only(schema, ctx):
    view = _norm(schema, ctx, [])
    return view is not None and (view.get("type") == ["null"] or "const" in view and view["const"] is None
                                 or isinstance(view.get("enum"), list) and view["enum"] == [None])


def _cost(schema, ctx, level=0):
    """A rough size of the cheapest value of `schema`, for choosing branches at the depth limit."""
    view = _norm(schema, ctx, [])
    if view is None:
        return 1000
    if "const" in view or isinstance(view.get("enum"), list):
        return 1
    types = view.get("type") or _infer_types(view)
    if "null" in types:
        return 0
    for key in ("oneOf", "anyOf"):
        subs = view.get(key)
        if isinstance(subs, list) and subs:
            return 1 + (min(_cost(s, ctx, level + 1) for s in subs[:UNION_TRIALS]) if level < 2 else 10)
    if types[0] == "array":
        return 5 if _count(view.get("minItems"), 0) else 2
    if types[0] == "object":
        req = view.get("required")
        return 2 + 3 * (len(req) if isinstance(req, list) else 0)
    return 1


def _gen_union(view, key, branches, ctx, depth, variant, cheap):
    """The first branch (null-only ones last; cheapest first in cheap mode) whose value validates."""
    rest = dict(view)
    del rest[key]
    rest.pop("default", None)
    if cheap:
        order = [b for _, _, b in sorted((_cost(b, ctx), i, b) for i, b in enumerate(branches[:UNION_TRIALS * 4]))]
    else:
        nulls = [_null_only(b, ctx) for b in branches]
        order = [b for b, n in zip(branches, nulls) if not n] + [b for b, n in zip(branches, nulls) if n]
    start = ctx.text_used
    first = None
    trials = [(b, variant, start) for b in order[:UNION_TRIALS]]
    if key == "oneOf":  # then values without text, then other variants, may match just one branch
        trials += [(b, variant + k, True) for k in (0, 1) for b in order[:UNION_TRIALS]]
    for branch, var, used in trials:
        ctx.text_used = used
        value = _gen({"allOf": [rest, branch]}, ctx, depth + 1, var)
        if first is None:
            first = (value, ctx.text_used)
        if _ok(value, view, ctx):
            return value
    ctx.text_used = first[1]
    return first[0]


def _gen_enum(view, enum, ctx, variant):
    good = [e for e in enum if _ok(e, view, ctx)] or list(enum)
    pick = good[variant % len(good)]
    if isinstance(pick, str) and not ctx.text_used:
        ctx.text_used = True
        if any(isinstance(e, str) and e == ctx.text for e in good):
            return ctx.text
    return _copy(pick)


def _fit(value, view):
    """`value` cut to maxLength and padded with "x" to minLength."""
    hi = _count(view.get("maxLength"), None, False)
    lo = min(_count(view.get("minLength"), 0), MAX_STRING)
    if hi is not None and len(value) > hi:
        value = value[:hi]
    return value + "x" * (lo - len(value)) if len(value) < lo else value


def _patterns(view):
    found = [view.get("pattern")]
    extra = view.get("allOf")
    if isinstance(extra, list):
        found.extend(x.get("pattern") for x in extra if isinstance(x, dict))
    return [p for p in found if isinstance(p, str)]


_NESTED_QUANTIFIER = r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)[+*{]"


def _text_may_meet(pattern, text):
    """Whether the client's text may be checked against a pattern: not when it is long, nor when the
    pattern quantifies a quantified group (re can backtrack exponentially on those, holding the GIL)."""
    if not isinstance(pattern, str):
        return True
    return len(text) <= MAX_PATTERN_CHECK and re.search(_NESTED_QUANTIFIER, pattern) is None


def _gen_string(view, ctx, variant, preferred):
    """text (first string field only), a preferred value, the format sample, "example",
    then strings generated from the patterns: the first that validates."""
    candidates = []
    if not ctx.text_used:
        ctx.text_used = True
        if _text_may_meet(view.get("pattern"), ctx.text):
            candidates.append(_fit(ctx.text, view))
    candidates.extend(preferred)
    fmt = view.get("format")
    sample = _format_sample(fmt, variant) if isinstance(fmt, str) else None
    if sample is not None:
        candidates.append(sample)
    candidates.append(_fit("example" if variant == 0 else "example%d" % (variant + 1), view))
    for value in candidates:
        if _ok(value, view, ctx):
            return value
    attempt = None
    tries = [(e, variant) for e in (0, 1, 2, 4, 8, 16, 64, 256, 1024)] + [(0, variant + 1), (1, variant + 1),
                                                                            (0, variant + 2), (1, variant + 2)]
    lo = min(_count(view.get("minLength"), 0), MAX_STRING)
    for pattern in _patterns(view)[:4]:
        for extra, seed in tries:
            value = _rx_generate(pattern, extra, seed)
            if value is None:
                break
            if attempt is None:
                attempt = value
            pad = "x" * (lo - len(value))  # unanchored patterns may take padding at either end
            for padded in ((value, value + pad, pad + value) if pad else (value,)):
                if _ok(padded, view, ctx):
                    return padded
    for value in _LAST_RESORT:
        if _ok(value, view, ctx):
            return value
    return attempt if attempt is not None else candidates[-1]


def _num_candidates(view, integer, count):
    """Numbers near 1, moved into the bounds and onto the multipleOf grid, nearest first."""
    lo, lo_ex, hi, hi_ex = _bounds(view)
    m = view.get("multipleOf")
    step = m if _finite(m) and m > 0 else 1
    if integer and not float(step).is_integer():
        from fractions import Fraction
        step = Fraction(repr(float(step))).limit_denominator(10 ** 9).numerator
    anchor = 1
    if lo is not None and (anchor < lo or lo_ex and anchor <= lo):
        anchor = lo
    elif hi is not None and (anchor > hi or hi_ex and anchor >= hi):
        anchor = hi
    try:
        k0 = math.ceil(anchor / step)
    except (ArithmeticError, ValueError):
        return [anchor]
    values = [k * step for k in list(range(k0, k0 + count)) + list(range(k0 - 1, k0 - 1 - count, -1))]
    if not integer and lo is not None and hi is not None:
        values.extend(lo + (hi - lo) * j / 16.0 for j in (8, 4, 12, 2, 6, 10, 14, 1, 3, 5, 7, 9, 11, 13, 15))
    out = []
    for v in values:
        try:
            out.append(int(v) if integer else float(v))
        except (ArithmeticError, ValueError):
            out.append(v)
    return out


def _gen_number(view, ctx, integer, variant):
    found = []
    candidates = _num_candidates(view, integer, variant + 24)
    for value in candidates:
        if _ok(value, view, ctx):
            found.append(value)
            if len(found) > variant:
                return value
    if found:
        return found[-1]
    return candidates[0] if candidates else (1 if integer else 1.0)


def _ordered(props, ordering):
    names = []
    if isinstance(ordering, list):
        names = list(dict.fromkeys(n for n in ordering if isinstance(n, str) and n in props))
    seen = set(names)
    return names + [n for n in props if n not in seen]


def _extra_schema(view, name):
    """The schema a property outside `properties` gets: matching patternProperties, else
    additionalProperties."""
    pats = view.get("patternProperties")
    hits = [s for p, s in pats.items() if _search(p, name)] if isinstance(pats, dict) else []
    if hits:
        return {"allOf": hits}
    extra = view.get("additionalProperties", True)
    return extra if isinstance(extra, (dict, bool)) else True


def _gen_object(view, ctx, depth, variant, cheap):
    props = view.get("properties") if isinstance(view.get("properties"), dict) else {}
    req = view.get("required")
    req = list(dict.fromkeys(r for r in req if isinstance(r, str))) if isinstance(req, list) else []
    need = set(req)
    names = [n for n in _ordered(props, view.get("propertyOrdering")) if props[n] is not False or n in need]
    if cheap:
        names = [n for n in names if n in need]
    hi = _count(view.get("maxProperties"), None, False)
    if hi is not None and len(names) > hi:
        room = hi - sum(1 for n in names if n in need)
        kept = []
        for n in names:
            if n in need or room > 0:
                room -= n not in need
                kept.append(n)
        names = kept
    out = {}
    for name in names:
        out[name] = _gen(props[name], ctx, depth + 1, variant)
    for name in req:
        if name not in out:
            out[name] = _gen(_extra_schema(view, name), ctx, depth + 1, variant)
    lo = min(_count(view.get("minProperties"), 0), MAX_ITEMS)
    if len(out) < lo:
        _fill_object(view, props, out, lo, ctx, depth, variant)
    return out


def _fill_object(view, props, out, lo, ctx, depth, variant):
    """Add properties until there are `lo`: omitted listed ones, then patternProperties names,
    then "key1", "key2", ... when additionalProperties allows."""
    for name in props:
        if len(out) >= lo:
            return
        if name not in out and props[name] is not False:
            out[name] = _gen(props[name], ctx, depth + 1, variant)
    pats = view.get("patternProperties") if isinstance(view.get("patternProperties"), dict) else {}
    for pattern in pats:
        misses = 0
        for k in range(2 * lo + 8):
            if len(out) >= lo or misses > 8:
                break
            base = _rx_generate(pattern, 0, 0) if isinstance(pattern, str) else None
            if base is None:
                break
            picks = [_rx_generate(pattern, 0, k), _rx_generate(pattern, 1, k), base + str(k)]
            name = next((c for c in picks if c is not None and c not in out and c not in props
                         and _search(pattern, c)), None)
            if name is None:
                misses += 1
                continue
            out[name] = _gen(_extra_schema(view, name), ctx, depth + 1, variant)
    extra = view.get("additionalProperties", True)
    k = 0
    while extra is not False and len(out) < lo and k < lo + MAX_ITEMS:
        k += 1
        name = "key%d" % k
        if name in out or name in props or any(_search(p, name) for p in pats):
            continue
        out[name] = _gen(extra if isinstance(extra, (dict, bool)) else True, ctx, depth + 1, variant)


def _gen_array(view, ctx, depth, variant, cheap):
    prefix = view.get("prefixItems") if isinstance(view.get("prefixItems"), list) else []
    items = view.get("items", True)
    items = items if isinstance(items, (dict, bool)) else True
    lo, hi = _count(view.get("minItems"), 0), _count(view.get("maxItems"), None, False)
    contains = view.get("contains")
    need = _count(view.get("minContains"), 1) if isinstance(contains, (dict, bool)) else 0
    n = max(lo, need) if cheap else max(lo, need, 1, len(prefix))
    if items is False:
        n = min(n, len(prefix))
    if hi is not None:
        n = min(n, hi)
    n = min(n, MAX_ITEMS)
    unique = view.get("uniqueItems") is True
    out, seen = [], set()
    for i in range(n):
        sub = prefix[i] if i < len(prefix) else items
        if i < need:
            sub = {"allOf": [sub, contains]}
        if not unique:
            out.append(_gen(sub, ctx, depth + 1, variant))
            continue
        for j in range(UNIQUE_TRIES):
            value = _gen(sub, ctx, depth + 1, variant + i + j)
            try:
                key = _jkey(value)
            except Exception:
                key = ("o", id(value))
            if key not in seen:
                seen.add(key)
                out.append(value)
                break
        else:
            break
    return out


################################################################################
# Regex -> string
################################################################################

class _RxUnsupported(Exception):
    pass


_RX_CHARS = ("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
             " -_.,:;@/+#!?$%&*=~^()[]{}<>|'\"`\\\t\n\r")
_RX_EXOTIC = "\u00e9\u00df\u4e2d\u00a0\u2603"
_RX_TREES = {}


def _rx_generate(pattern, extra, seed):
    """A string for `pattern`: repeats at their minimum plus `extra`, the `seed`-th choice in
    classes and alternations (None when the pattern is out of reach)."""
    tree = _RX_TREES.get(pattern, _MISSING)
    if tree is _MISSING:
        try:
            tree = _RxParser(pattern).parse()
        except Exception:
            tree = None
        if len(_RX_TREES) > 256:
            _RX_TREES.clear()
        _RX_TREES[pattern] = tree
    if tree is None:
        return None
    out = []
    try:
        _rx_emit(tree, extra, seed, out)
    except Exception:
        return None
    return "".join(out)[:MAX_STRING]


class _RxParser(object):
    """Parses a regex into ("seq", items) / ("alt", branches) / ("grp", node) / ("rep", node, lo, hi)
    / ("lit", ch) / ("set", negated, items, cache) / ("any",) / ("nop",) nodes."""

    def __init__(self, pattern):
        self.p = pattern
        self.i = 0
        self.depth = 0

    def peek(self, k=0):
        j = self.i + k
        return self.p[j] if j < len(self.p) else ""

    def parse(self):
        node = self.alternation()
        if self.i != len(self.p):
            raise _RxUnsupported("unbalanced )")
        return node

    def alternation(self):
        self.depth += 1
        if self.depth > 64:
            raise _RxUnsupported("nesting")
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        self.depth -= 1
        return ("alt", branches) if len(branches) > 1 else branches[0]

    def sequence(self):
        items = []
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            items.append(self.quantified(self.atom()))
        return ("seq", items)

    def atom(self):
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c == "\\":
            return self.escape(False)
        if c == ".":
            return ("any",)
        if c in "^$":
            return ("nop",)
        if c in "*+?":
            raise _RxUnsupported("nothing to repeat")
        return ("lit", c)

    def quantified(self, node):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            bounds = self.braces()
            if bounds is None:
                return node
            lo, hi = bounds
        else:
            return node
        if self.peek() in ("?", "+"):
            self.i += 1
        return node if node[0] == "nop" else ("rep", node, lo, hi)

    def braces(self):
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        low, comma, high = self.p[self.i + 1:end].partition(",")
        digits = lambda s: s.isdigit() and s.isascii()
        if not (digits(low) or low == "" and comma) or high and not digits(high):
            return None
        lo = int(low) if low else 0
        hi = (int(high) if high else None) if comma else lo
        if hi is not None and hi < lo:
            raise _RxUnsupported("bad repeat")
        self.i = end + 1
        return min(lo, MAX_STRING), hi

    def group(self):
        if self.peek() == "?":
            self.i += 1
            c = self.peek()
            if c in (":", ">"):
                self.i += 1
            elif c == "P" and self.peek(1) == "<" or c == "<" and self.peek(1) not in ("=", "!", ""):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise _RxUnsupported("bad group name")
                self.i = end + 1
            elif c == "#":
                end = self.p.find(")", self.i)
                if end < 0:
                    raise _RxUnsupported("unterminated comment")
                self.i = end + 1
                return ("nop",)
            elif c in ("=", "!") or c == "<" and self.peek(1) in ("=", "!"):
                behind = self.p.startswith("<=", self.i)  # a positive lookbehind's text is emitted;
                self.i += 2 if c == "<" else 1            # other lookarounds are left to the re check
                node = self.alternation()
                if self.peek() != ")":
                    raise _RxUnsupported("missing )")
                self.i += 1
                return ("grp", node) if behind else ("nop",)
            elif c and c in "aiLmsux-":
                while self.peek() and self.peek() in "aiLmsux-":
                    self.i += 1
                if self.peek() == ")":
                    self.i += 1
                    return ("nop",)
                if self.peek() != ":":
                    raise _RxUnsupported("bad flags")
                self.i += 1
            else:
                raise _RxUnsupported("backreference or conditional")
        node = self.alternation()
        if self.peek() != ")":
            raise _RxUnsupported("missing )")
        self.i += 1
        return ("grp", node)

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        items, first = [], True
        while True:
            if self.i >= len(self.p):
                raise _RxUnsupported("unterminated [")
            if self.p[self.i] == "]" and not first:
                self.i += 1
                return ("set", negate, items, [None])
            first = False
            lo = self.class_atom()
            if isinstance(lo, str) and self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if isinstance(hi, str):
                    if ord(hi) < ord(lo):
                        raise _RxUnsupported("bad range")
                    items.append((ord(lo), ord(hi)))
                else:
                    items.extend([(ord(lo), ord(lo)), (45, 45), hi])
                continue
            items.append((ord(lo), ord(lo)) if isinstance(lo, str) else lo)

    def class_atom(self):
        c = self.p[self.i]
        self.i += 1
        return self.escape(True) if c == "\\" else c

    def escape(self, in_class):
        if self.i >= len(self.p):
            raise _RxUnsupported("trailing backslash")
        c = self.p[self.i]
        self.i += 1
        if c in "dDwWsS":
            return ("cat", c) if in_class else ("set", False, [("cat", c)], [None])
        if not in_class and c in "bBAZzG":
            return ("nop",)
        simple = {"b": "\b", "n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
        if c in simple:
            ch = simple[c]
        elif c in "xuU":
            ch = self.hex_escape(c)
        elif c == "c" and self.peek().isalpha():
            ch = chr(ord(self.peek()) % 32)
            self.i += 1
        elif c.isdigit() or c in "pPkNg":
            raise _RxUnsupported("backreference or property escape")
        else:
            ch = c
        return ch if in_class else ("lit", ch)

    def hex_escape(self, c):
        if c == "u" and self.peek() == "{":
            end = self.p.find("}", self.i)
            digits = self.p[self.i + 1:end] if end > 0 else ""
            self.i = end + 1 if end > 0 else len(self.p)
        else:
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            self.i += width
        if not digits or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise _RxUnsupported("bad hex escape")
        try:
            return chr(int(digits, 16))
        except (ValueError, OverflowError):
            raise _RxUnsupported("bad code point")


def _rx_cat(ch, cat):
    low = cat.lower()
    if low == "d":
        hit = ch.isdecimal()
    elif low == "w":
        hit = ch.isalnum() or ch == "_"
    else:
        hit = ch.isspace()
    return hit if cat.islower() else not hit


def _rx_in(ch, node):
    hit = False
    for item in node[2]:
        hit = _rx_cat(ch, item[1]) if item[0] == "cat" else item[0] <= ord(ch) <= item[1]
        if hit:
            break
    return hit != node[1]


def _rx_pick(node, seed):
    members = node[3][0]
    if members is None:
        members = [c for c in _RX_CHARS if _rx_in(c, node)] or [c for c in _RX_EXOTIC if _rx_in(c, node)]
        if not members and not node[1] and node[2] and node[2][0][0] != "cat":
            members = [chr(node[2][0][0])]
        node[3][0] = members = members or ["\u2603"]
    return members[seed % len(members)]


def _rx_emit(node, extra, seed, out):
    if len(out) >= MAX_STRING:
        return
    kind = node[0]
    if kind == "lit":
        out.append(node[1])
    elif kind == "seq":
        for item in node[1]:
            _rx_emit(item, extra, seed, out)
    elif kind == "alt":
        _rx_emit(node[1][seed % len(node[1])], extra, seed, out)
    elif kind == "grp":
        _rx_emit(node[1], extra, seed, out)
    elif kind == "rep":
        lo, hi = node[2], node[3]
        times = lo + extra if hi is None else min(hi, lo + extra)
        for _ in range(min(times, MAX_STRING)):
            if len(out) >= MAX_STRING:
                break
            _rx_emit(node[1], extra, seed, out)
    elif kind == "set":
        out.append(_rx_pick(node, seed))
    elif kind == "any":
        out.append(_RX_CHARS[seed % 62])


################################################################################
# Embeddings
################################################################################

EMBED_MAX_DIMS = 16384
_EMBED_SLOTS = 4        # signed positions per word
_EMBED_TEXT_TERM = 0.1  # norm of the per-text term relative to the word part
_WORD_RX = []


def _words(text):
    if not _WORD_RX:
        _WORD_RX.append(re.compile(r"\w+"))
    return _WORD_RX[0].findall(text.lower())


def _text_term(data, dims):
    """`dims` deterministic pseudo-random values in [-127.5, 127.5] from BLAKE2b of `data`."""
    import hashlib  # loads OpenSSL: first embedding only
    key = hashlib.blake2b(data, digest_size=32, person=b"dpmock-text").digest()
    blocks = [hashlib.blake2b(i.to_bytes(4, "little"), digest_size=64, key=key).digest()
              for i in range((dims + 63) // 64)]
    return array.array("b", b"".join(blocks)[:dims])


def embedding(text, dims=1536):
    """A deterministic unit vector of `dims` floats whose cosines follow shared words (module doc)."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    dims = _count(dims, 1536, False) if not isinstance(dims, bool) else 1536
    dims = min(max(dims, 1), EMBED_MAX_DIMS)
    import hashlib  # loads OpenSSL: first embedding only
    counts = {}
    for word in _words(text):
        counts[word] = counts.get(word, 0) + 1
    sparse = {}
    for word, n in counts.items():
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=16,
                                 person=b"dpmock-word").digest()
        weight = math.sqrt(n)
        for j in range(_EMBED_SLOTS):
            x = int.from_bytes(digest[4 * j:4 * j + 4], "little")
            slot = (x >> 1) % dims
            sparse[slot] = sparse.get(slot, 0.0) + (weight if x & 1 else -weight)
    word_norm = math.sqrt(sum(v * v for v in sparse.values()))
    term = _text_term(text.encode("utf-8", "surrogatepass"), dims)
    term_norm = math.sqrt(sum((x + 0.5) * (x + 0.5) for x in term))
    scale = (_EMBED_TEXT_TERM * word_norm if word_norm > 0 else 1.0) / term_norm
    cross = sum(v * (term[i] + 0.5) * scale for i, v in sparse.items())
    total = math.sqrt(word_norm * word_norm + (scale * term_norm) ** 2 + 2 * cross)
    if not total > 0:
        return [1.0] + [0.0] * (dims - 1)
    c = scale / total
    vec = [(x + 0.5) * c for x in term]
    for i, v in sparse.items():
        vec[i] += v / total
    return vec


def embedding_dims(model):
    """The default vector size of an embedding model name (1536 when unknown)."""
    name = str(model or "").lower().rsplit("/", 1)[-1]
    if name.startswith(("text-embedding-3-large", "gemini-embedding")):
        return 3072
    if name.startswith(("text-embedding-004", "text-embedding-005", "text-multilingual-embedding", "embedding-001")):
        return 768
    return 1536


def embedding_b64(vec):
    """OpenAI's base64 embedding: the floats as little-endian float32, base64-encoded."""
    data = array.array("f", [float(x) for x in vec])
    if sys.byteorder != "little":
        data.byteswap()
    return b64(data.tobytes())


def cosine(a, b):
    """Cosine similarity of two equal-length vectors (0.0 when either is zero)."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


################################################################################
# OpenAI
################################################################################

_NULL = type(None)
_OPENAI_PART = {"type": str, "text": str, "image_url": Shape.of(str, {"url": str, "detail": str}),
                "input_audio": dict, "file": dict}
_OPENAI_TOOL_CALL = {"id": str, "type": str, "function": {"name": str, "arguments": str}}
#: chat/completions fields typed as the SDKs type them (the real API refuses other types).
OPENAI_CHAT_SHAPE = {
    "model": str,
    "messages": [{"role": str, "name": str, "tool_call_id": str, "content": Shape.of(str, _NULL, [_OPENAI_PART]),
                  "tool_calls": Shape.of(_NULL, [_OPENAI_TOOL_CALL]), "refusal": (str, _NULL)}],
    "tools": [{"type": str, "function": {"name": str, "description": str, "parameters": dict,
                                         "strict": (bool, _NULL)}}],
    "tool_choice": Shape.of(str, {"type": str, "function": {"name": str}}),
    "stream": (bool, _NULL), "stream_options": Shape.of(_NULL, {"include_usage": bool}),
    "max_tokens": (int, _NULL), "max_completion_tokens": (int, _NULL), "n": (int, _NULL),
    "temperature": (float, _NULL), "top_p": (float, _NULL), "presence_penalty": (float, _NULL),
    "frequency_penalty": (float, _NULL), "seed": (int, _NULL), "user": str, "logprobs": (bool, _NULL),
    "stop": Shape.of(str, _NULL, [str]), "reasoning_effort": (str, _NULL), "parallel_tool_calls": bool,
    "response_format": {"type": str, "json_schema": dict}, "metadata": (dict, _NULL), "store": (bool, _NULL),
}


def openai_turn(body):
    """Read a chat/completions body into a Turn, refusing what OpenAI refuses."""
    validate(OPENAI, body, OPENAI_CHAT_SHAPE)
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
            turn.user_turns += 1
        elif m["role"] in ("system", "developer"):
            turn.system = (turn.system + "\n" + text).strip("\n")
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
    turn.output = openai_output(body.get("response_format"), "response_format")
    return turn


def openai_output(fmt, name):
    """Turn.output for an OpenAI response_format (Chat) or text.format (Responses)."""
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return JSON_OBJECT
    if fmt.get("type") != "json_schema":
        raise invalid("Invalid value: '%s'. Supported values are: 'text', 'json_object' and 'json_schema'."
                      % fmt.get("type"), name + ".type", "invalid_value")
    spec = fmt.get("json_schema", fmt)  # Chat nests it under json_schema, Responses does not
    where = name if spec is fmt and name == "text.format" else name + ".json_schema"  # the field the error names
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise invalid("Missing required parameter: '%s.name'." % where, where + ".name", "missing_required_parameter")
    if schema is not None and not isinstance(schema, dict):
        raise invalid("Invalid type for '%s.schema': expected an object." % where, where + ".schema", "invalid_type")
    return schema if schema else JSON_OBJECT


def _openai_content(content, turn):
    if isinstance(content, str):
        turn.add_text(content)
        return content
    texts = []
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text", "")))
            turn.add_text(texts[-1])
        elif isinstance(part, dict):
            turn.media += 1
    return "\n".join(texts)


_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool": "tool_calls", "filter": "content_filter"}


def openai_usage(plan):
    out = plan.output_tokens + plan.thinking_tokens
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": out, "total_tokens": plan.prompt_tokens + out,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": plan.thinking_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def handle_openai_chat(w, req):
    check_key(req)
    body = req.json
    turn = read_turn(req)
    check_model(req, turn.model)
    plan = Plan(turn, w.fault, req.answer)
    head = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": turn.model}
    calls = [{"id": "call_" + cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
             for cid, name, args in plan.calls]
    if not req.route.streaming(req):
        message = {"role": "assistant", "content": plan.text if not calls else None, "refusal": None,
                   "annotations": []}
        if calls:
            message["tool_calls"] = calls
        if plan.thinking:
            message["reasoning_content"] = plan.thinking
        w.send_json(200, dict(head, choices=[{"index": 0, "message": message, "logprobs": None,
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
    w.start_stream(200, scenarios.SSE)
    w.send_sse_event(chunk({"role": "assistant", "content": "" if not calls else None, "refusal": None}))
    if plan.thinking:
        for piece in re.findall(_PIECES, plan.thinking):
            w.send_sse_event(chunk({"reasoning_content": piece}))
    for i, piece in enumerate(plan.pieces):
        # The last content chunk carries finish_reason too (the empty-delta finish chunk follows, as
        # OpenAI sends it): Disaster Party's detailed-stream parser stops at the first chunk with a
        # finish_reason and crashes (NULL callback) when that chunk has no text.
        last = i == len(plan.pieces) - 1 and not calls
        w.send_sse_event(chunk({"content": piece}, _OPENAI_FINISH[plan.finish] if last else None))
    for i, call in enumerate(calls):
        w.send_sse_event(chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                                "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        for fragment in json_fragments(call["function"]["arguments"]):
            w.send_sse_event(chunk({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]}))
    w.send_sse_event(chunk({}, _OPENAI_FINISH[plan.finish]))
    if usage:
        w.send_sse_event(dict(head, choices=[], usage=openai_usage(plan)))
    w.send_sse_event("[DONE]")
    w.end_stream()


def json_fragments(text, size=8):
    """A JSON text cut into the small fragments a streamed tool call arrives in."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def handle_openai_images(w, req):
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": (str, _NULL), "prompt": str, "n": (int, _NULL), "size": (str, _NULL),
                            "response_format": (str, _NULL), "quality": (str, _NULL), "style": (str, _NULL)})
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
    w.send_json(200, answer)


def embedding_texts(value, name, provider=OPENAI):
    """The texts of an embeddings input: a string, strings, or token arrays (read as their numbers)."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid("'%s' must be a non-empty string, array of strings or array of token arrays." % name, name)
    texts = []
    for i, item in enumerate(value):
        if isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            item = " ".join("t%d" % t for t in item)
        if not isinstance(item, str) or not item:
            raise invalid("'%s[%d]' must be a non-empty string or array of integers." % (name, i), "%s[%d]" % (name, i))
        texts.append(item)
    if len(texts) > 2048:
        raise invalid("'%s' holds %d inputs; at most 2048 are accepted." % (name, len(texts)), name)
    return texts


def handle_openai_embeddings(w, req):
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": str, "encoding_format": str, "dimensions": (int, _NULL), "user": str})
    model = _require_model(body)
    check_model(req, model)
    texts = embedding_texts(body.get("input"), "input")
    dims = body.get("dimensions")
    if dims is not None:
        if model.startswith("text-embedding-ada"):
            raise invalid("This model does not support specifying dimensions.", "dimensions")
        if not 1 <= dims <= embedding_dims(model):
            raise invalid("Invalid 'dimensions': expected an integer from 1 to %d." % embedding_dims(model),
                          "dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise invalid("Invalid value for 'encoding_format': expected 'float' or 'base64'.", "encoding_format")
    data = []
    given = (req.answer or {}).get("embedding")
    for i, text in enumerate(texts):
        vec = given or embedding(text, dims or embedding_dims(model))
        data.append({"object": "embedding", "index": i,
                     "embedding": embedding_b64(vec) if fmt == "base64" else [round(x, 9) for x in vec]})
    tokens = count_tokens(texts)
    w.send_json(200, {"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def texts_turn(model, texts):
    """A Turn for routes whose input is plain texts (completions, embeddings): the last is the user's."""
    turn = Turn(model)
    for text in texts:
        turn.add_text(text)
    turn.user_text = texts[-1]
    turn.user_turns = 1
    return turn


def completion_turn(req):
    return texts_turn(_require_model(req.json), embedding_texts(req.json.get("prompt"), "prompt"))


def embeddings_turn(req):
    return texts_turn(_require_model(req.json), embedding_texts(req.json.get("input"), "input"))


def handle_openai_completions(w, req):
    """POST /completions, the legacy text completion: max_tokens defaults to 16, as there."""
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": str, "max_tokens": (int, _NULL), "stream": (bool, _NULL), "n": (int, _NULL),
                            "echo": (bool, _NULL), "suffix": (str, _NULL), "stream_options": (dict, _NULL)})
    turn = read_turn(req)
    model = turn.model
    check_model(req, model)
    prompts = embedding_texts(body.get("prompt"), "prompt")
    turn.max_tokens = 16 if "max_tokens" not in body else _max_tokens(body["max_tokens"], "max_tokens")
    plan = Plan(turn, w.fault, req.answer)
    finish = _OPENAI_FINISH[plan.finish]
    echo = prompts[-1] if body.get("echo") else ""
    head = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model}
    usage = {"prompt_tokens": plan.prompt_tokens, "completion_tokens": plan.output_tokens,
             "total_tokens": plan.prompt_tokens + plan.output_tokens}
    if not req.route.streaming(req):
        w.send_json(200, dict(head, choices=[{"text": echo + plan.text, "index": 0, "logprobs": None,
                                              "finish_reason": finish}], usage=usage))
        return
    w.start_stream(200, scenarios.SSE)
    pieces = ([echo] if echo else []) + plan.pieces
    for i, piece in enumerate(pieces):
        w.send_sse_event(dict(head, choices=[{"text": piece, "index": 0, "logprobs": None,
                                              "finish_reason": finish if i == len(pieces) - 1 else None}]))
    if _get(body.get("stream_options"), "include_usage"):
        w.send_sse_event(dict(head, choices=[], usage=usage))
    w.send_sse_event("[DONE]")
    w.end_stream()


def handle_openai_moderations(w, req):
    """POST /moderations: flagged by the documented word rule (scenarios.MODERATION_WORDS)."""
    check_key(req)
    body = req.json
    validate(OPENAI, body, {"model": str})
    validate(OPENAI, body, {"input": Shape.of(str, [str], [{"type": str, "text": str, "image_url": dict}])})
    value = body.get("input")
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # multi-modal parts
        value = [" ".join(v.get("text", "") for v in value if v.get("type") == "text") or "image"]
    texts = embedding_texts(value, "input")
    results = []
    for text in texts:
        words = set(re.findall(r"\w+", text.lower()))
        categories = {c: bool(words & set(ws)) for c, ws in scenarios.MODERATION_WORDS.items()}
        results.append({"flagged": any(categories.values()), "categories": categories,
                        "category_scores": {c: 0.9871 if hit else 0.0001 for c, hit in categories.items()},
                        "category_applied_input_types": {c: ["text"] for c in categories}})
    w.send_json(200, {"id": new_id("modr-"), "model": body.get("model") or "omni-moderation-latest",
                      "results": results})


################################################################################
# OpenAI Responses
################################################################################

_RESPONSES_PART = {"type": str, "text": str, "image_url": (str, _NULL), "file_id": (str, _NULL), "file_data": str,
                   "file_url": str, "filename": str, "detail": str, "annotations": list, "logprobs": list}
_RESPONSES_ITEM = {"type": str, "id": str, "role": str, "status": (str, _NULL),
                   "content": Shape.of(str, _NULL, [_RESPONSES_PART]), "call_id": str, "name": str, "arguments": str,
                   "output": Shape.of(str, [_RESPONSES_PART]), "summary": [{"type": str, "text": str}]}
#: /responses fields typed as the SDKs type them (``tools`` are flat: no ``function`` object as in Chat).
RESPONSES_SHAPE = {
    "model": str, "input": Shape.of(str, [_RESPONSES_ITEM]), "instructions": (str, _NULL),
    "tools": [{"type": str, "name": str, "description": (str, _NULL), "parameters": (dict, _NULL),
               "strict": (bool, _NULL)}],
    "tool_choice": Shape.of(str, {"type": str, "name": str}),
    "reasoning": Shape.of(_NULL, {"effort": (str, _NULL), "summary": (str, _NULL), "generate_summary": (str, _NULL)}),
    "text": Shape.of(_NULL, {"format": {"type": str, "name": str, "schema": dict, "strict": (bool, _NULL),
                                        "description": str}, "verbosity": (str, _NULL)}),
    "max_output_tokens": (int, _NULL), "max_tool_calls": (int, _NULL), "store": (bool, _NULL),
    "background": (bool, _NULL), "previous_response_id": (str, _NULL), "metadata": (dict, _NULL),
    "temperature": (float, _NULL), "top_p": (float, _NULL), "top_logprobs": (int, _NULL),
    "parallel_tool_calls": (bool, _NULL), "stream": (bool, _NULL), "stream_options": (dict, _NULL),
    "truncation": (str, _NULL), "include": (list, _NULL), "user": str, "service_tier": (str, _NULL),
    "prompt_cache_key": (str, _NULL), "safety_identifier": (str, _NULL),
}
MIN_OUTPUT_TOKENS = 16  #: the API refuses a smaller max_output_tokens
_ITEM_IDS = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def _missing(name):
    return invalid("Missing required parameter: '%s'." % name, name, "missing_required_parameter")


def responses_input(value):
    """The request's ``input`` as the items the API stores: each with a type, an id and a status."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for i, raw in enumerate(value):
        kind = raw.get("type") or ("message" if "role" in raw else None)
        where = "input[%d]" % i
        if kind is None:
            raise _missing(where + ".type")
        item = dict(raw, type=kind, id=raw.get("id") or new_id(_ITEM_IDS.get(kind, "item_"), 24))
        if kind == "message":
            role, content = raw.get("role"), raw.get("content")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid("Invalid value: '%s'. Supported values are: 'assistant', 'system', 'developer', and "
                              "'user'." % role, where + ".role", "invalid_value")
            if content is None:
                raise _missing(where + ".content")
            if isinstance(content, str):
                content = [{"type": "output_text", "text": content, "annotations": []} if role == "assistant" else
                           {"type": "input_text", "text": content}]
            item["content"] = content
        for field in {"function_call": ("call_id", "name", "arguments"),
                      "function_call_output": ("call_id", "output")}.get(kind, ()):
            if raw.get(field) is None:
                raise _missing("%s.%s" % (where, field))
        if kind in ("message", "function_call", "function_call_output"):
            item["status"] = raw.get("status") or "completed"
        items.append(item)
    return items


def responses_turn(body, model, items):
    """Read a /responses body (its items: previous ones, then this input) into a Turn."""
    turn = Turn(model)
    turn.add_text(body.get("instructions"))
    turn.system = body.get("instructions") or ""
    names = {}  # call_id -> function name
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = _openai_content(item["content"], turn)
            if item["role"] == "user":
                turn.user_text = text
                turn.user_turns += 1
            elif item["role"] in ("system", "developer"):
                turn.system = (turn.system + "\n" + text).strip("\n")
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            turn.add_text(item["arguments"])
        elif kind == "function_call_output":
            result = _openai_content(item["output"], turn)
    if items and items[-1]["type"] == "function_call_output":
        last = items[-1]
        turn.tool_result = (names.get(last["call_id"]) or last.get("name") or "tool", result)
    for i, t in enumerate(body.get("tools") or ()):
        if t.get("type") == "function":
            if not t.get("name"):
                raise _missing("tools[%d].name" % i)
            turn.tools.append((t["name"], t.get("parameters") or {"type": "object", "properties": {}}))
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise invalid("Invalid value: '%s'. Supported values are: 'none', 'auto', and 'required'." % choice,
                      "tool_choice", "invalid_value")
    if isinstance(choice, dict) and choice.get("type") == "function":
        if choice.get("name") not in dict(turn.tools):
            raise invalid("Tool choice 'function' not found in 'tools' parameter.", "tool_choice")
        turn.forced_tool = choice["name"]
    turn.tools_off = choice == "none"
    if choice == "required" or turn.forced_tool:
        turn.tool_result = None  # the model must call a tool, even right after a tool's result
    reasoning = body.get("reasoning")
    turn.thinking = isinstance(reasoning, dict) and reasoning.get("effort") != "none"
    limit = body.get("max_output_tokens")
    if limit is not None and limit < MIN_OUTPUT_TOKENS:
        raise invalid("Invalid 'max_output_tokens': integer below minimum value. Expected a value >= %d, but got %d "
                      "instead." % (MIN_OUTPUT_TOKENS, limit), "max_output_tokens", "integer_below_min_value")
    turn.max_tokens = limit
    turn.output = openai_output(_get(body.get("text"), "format"), "text.format")
    return turn


def responses_history(store, previous_id):
    """The items a previous response carries into this one (its conversation, input and output), and
    what they cost the store."""
    if previous_id is None:
        return [], 0
    record = store.get(previous_id)
    if record is None:
        raise HTTPError(400, "Previous response with id '%s' not found." % previous_id, "previous_response_not_found",
                        param="previous_response_id")
    return record.context, record.size


def responses_output(plan, summary):
    """The answer's output items: reasoning (when asked for), then one message or the function calls."""
    output = []
    if plan.thinking:
        output.append({"id": new_id("rs_", 24), "type": "reasoning",
                       "summary": [{"type": "summary_text", "text": plan.thinking}] if summary else []})
    for cid, name, args in plan.calls:
        output.append({"id": new_id("fc_", 24), "type": "function_call", "status": "completed",
                       "arguments": _COMPACT(args), "call_id": "call_" + cid, "name": name})
    if not plan.calls:
        output.append({"id": new_id("msg_", 24), "type": "message",
                       "status": "incomplete" if plan.finish == "length" else "completed",
                       "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": plan.text}],
                       "role": "assistant"})
    return output


def responses_usage(plan):
    out = plan.output_tokens + plan.thinking_tokens
    return {"input_tokens": plan.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": plan.thinking_tokens},
            "total_tokens": plan.prompt_tokens + out}


def _given(body, name, default):
    value = body.get(name)
    return default if value is None else value


def responses_object(body, model, plan, output):
    """The Response object, every field the SDK types (the SDK computes ``output_text`` itself)."""
    now = int(time.time())
    status = "incomplete" if plan.finish == "length" else "completed"
    reasoning = body.get("reasoning") or {}
    text = body.get("text") or {}
    tools = [dict(t, description=t.get("description"), parameters=t.get("parameters"), strict=_given(t, "strict", True))
             if t.get("type") == "function" else t for t in body.get("tools") or ()]
    return {"id": new_id("resp_", 24), "object": "response", "created_at": now, "status": status,
            "background": body.get("background") is True, "completed_at": now if status == "completed" else None,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"), "model": model, "output": output,
            "parallel_tool_calls": _given(body, "parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "safety_identifier": body.get("safety_identifier"), "service_tier": "default",
            "store": body.get("store") is not False, "temperature": _given(body, "temperature", 1.0),
            "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
            "tool_choice": _given(body, "tool_choice", "auto"), "tools": tools,
            "top_logprobs": _given(body, "top_logprobs", 0), "top_p": _given(body, "top_p", 1.0),
            "truncation": _given(body, "truncation", "disabled"), "usage": responses_usage(plan),
            "user": body.get("user"), "metadata": _given(body, "metadata", {})}


def responses_reader(req):
    """The route's reader: the conversation, a previous response's items first."""
    body = req.json
    validate(OPENAI, body, RESPONSES_SHAPE)
    model = _require_model(body)
    if body.get("input") is None:
        raise _missing("input")
    history, _ = responses_history(req.server.responses, body.get("previous_response_id"))
    return responses_turn(body, model, history + responses_input(body["input"]))


def handle_openai_responses(w, req):
    check_key(req)
    body = req.json
    turn = read_turn(req)
    model = turn.model
    store = body.get("store") is not False
    if body.get("background") is True and not store:
        raise invalid("Background mode requires 'store' to be true.", "background")
    history, inherited = responses_history(w.server.responses, body.get("previous_response_id"))
    items = responses_input(body["input"])
    check_model(req, model)
    plan = Plan(turn, w.fault, req.answer)
    reasoning = body.get("reasoning") or {}
    response = responses_object(body, model, plan, responses_output(plan, reasoning.get("summary") or
                                                                    reasoning.get("generate_summary")))
    if store:
        cost = inherited + req.body_bytes + len(plan.text)  # a context holds its ancestors' items
        w.server.responses.add(StoredResponse(response, items, history + items + response["output"], cost))
    if req.route.streaming(req):
        send_responses_stream(w, response, plan)
    elif response["background"]:  # asked to run in the background: it is queued, and done when next asked
        w.send_json(200, dict(response, status="queued", output=[], usage=None, completed_at=None,
                              incomplete_details=None))
    else:
        w.send_json(200, response)


def send_responses_stream(w, response, plan):
    """response.created and .in_progress, each output item's events, then response.completed (or
    .incomplete) with the whole response; every event carries its type and a sequence number."""
    seq = itertools.count()

    def emit(kind, where=None, **fields):
        event = {"type": kind, "sequence_number": next(seq)}
        event.update(where or ())
        event.update(fields)
        w.send_sse_event(event, event=kind)
    w.stream_error = responses_stream_error
    w.start_stream(200, scenarios.SSE)
    head = dict(response, status="in_progress", output=[], usage=None, completed_at=None, incomplete_details=None)
    emit("response.created", response=head)
    emit("response.in_progress", response=head)
    for index, item in enumerate(response["output"]):
        _stream_output_item(emit, index, item, plan)
    emit("response." + response["status"], response=response)
    w.end_stream()


def _stream_output_item(emit, index, item, plan):
    """The events of one output item, from output_item.added to output_item.done."""
    kind = item["type"]
    where = {"item_id": item["id"], "output_index": index}
    if kind == "message":
        part = item["content"][0]
        emit("response.output_item.added", output_index=index, item=dict(item, status="in_progress", content=[]))
        emit("response.content_part.added", where, content_index=0, part=dict(part, text=""))
        for piece in plan.pieces:
            emit("response.output_text.delta", where, content_index=0, delta=piece, logprobs=[])
        emit("response.output_text.done", where, content_index=0, text=part["text"], logprobs=[])
        emit("response.content_part.done", where, content_index=0, part=part)
    elif kind == "function_call":
        emit("response.output_item.added", output_index=index, item=dict(item, status="in_progress", arguments=""))
        for fragment in json_fragments(item["arguments"]):
            emit("response.function_call_arguments.delta", where, delta=fragment)
        emit("response.function_call_arguments.done", where, name=item["name"], arguments=item["arguments"])
    else:  # reasoning: its summary parts
        emit("response.output_item.added", output_index=index, item=dict(item, summary=[]))
        for i, part in enumerate(item["summary"]):
            emit("response.reasoning_summary_part.added", where, summary_index=i, part=dict(part, text=""))
            for piece in re.findall(_PIECES, part["text"]):
                emit("response.reasoning_summary_text.delta", where, summary_index=i, delta=piece)
            emit("response.reasoning_summary_text.done", where, summary_index=i, text=part["text"])
            emit("response.reasoning_summary_part.done", where, summary_index=i, part=part)
    emit("response.output_item.done", output_index=index, item=item)


def _stored_response(w, req):
    record = w.server.responses.get(req.params["response_id"])
    if record is None:
        raise HTTPError(404, "Response with id '%s' not found." % req.params["response_id"])
    return record


def handle_responses_get(w, req):
    check_key(req)
    w.send_json(200, _stored_response(w, req).response)


def handle_responses_delete(w, req):
    check_key(req)
    if w.server.responses.remove(req.params["response_id"]) is None:
        _stored_response(w, req)  # its 404
    w.send_json(200, {"id": req.params["response_id"], "object": "response.deleted", "deleted": True})


def handle_responses_cancel(w, req):
    """Only a background response can be cancelled; dpmock's have finished by then, and a finished
    one is answered as it is."""
    check_key(req)
    record = _stored_response(w, req)
    if not record.response["background"]:
        raise invalid("Only responses created with background=true can be cancelled.", "response_id")
    w.send_json(200, record.response)


def handle_responses_input_items(w, req):
    check_key(req)
    items = list(_stored_response(w, req).input)
    order = req.arg("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("Invalid value: '%s'. Supported values are: 'asc' and 'desc'." % order, "order", "invalid_value")
    if order == "desc":
        items.reverse()
    limit = _int_arg(req, "limit", 20, 1, 100)
    after = req.arg("after")
    ids = [item["id"] for item in items]
    if after is not None and after not in ids:
        raise invalid("Invalid 'after': no input item with id '%s' in this response." % after, "after")
    start = ids.index(after) + 1 if after is not None else 0
    page = items[start:start + limit]
    w.send_json(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                      "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)})


def handle_responses_input_tokens(w, req):
    """What POST /responses would count as its input_tokens, without answering it."""
    check_key(req)
    body = req.json
    validate(OPENAI, body, RESPONSES_SHAPE)
    model = body.get("model") or "gpt-4o"
    check_model(req, model)
    history, _ = responses_history(w.server.responses, body.get("previous_response_id"))
    turn = responses_turn(body, model, history + responses_input(body.get("input")))
    w.send_json(200, {"object": "response.input_tokens", "input_tokens": count_tokens(turn.texts, turn.media)})


def responses_stream_error(w):
    """The Responses stream's own error event, numbered as the next event would have been."""
    return "event: error\ndata: %s\n\n" % _compact({
        "type": "error", "code": "server_error", "param": None, "sequence_number": w.events,
        "message": "The server had an error while processing your request. Sorry about that!"})


################################################################################
# Anthropic
################################################################################

_ANTHROPIC_BLOCK = {"type": str, "text": str, "id": str, "name": str, "input": dict, "tool_use_id": str,
                    "content": Shape.of(str, [dict]), "is_error": bool, "source": dict, "thinking": str,
                    "signature": str, "cache_control": (dict, type(None))}
#: messages fields typed as the SDKs type them (the real API refuses other types).
ANTHROPIC_MESSAGES_SHAPE = {
    "model": str, "max_tokens": int,
    "messages": [{"role": str, "content": Shape.of(str, [_ANTHROPIC_BLOCK])}],
    "system": Shape.of(str, [{"type": str, "text": str}]),
    "tools": [{"name": str, "description": str, "input_schema": dict, "type": str}],
    "tool_choice": {"type": str, "name": str, "disable_parallel_tool_use": bool},
    "stream": bool, "temperature": float, "top_p": float, "top_k": int, "stop_sequences": [str],
    "thinking": {"type": str, "budget_tokens": int}, "metadata": dict, "service_tier": str,
    "output_config": {"format": dict, "effort": str}, "output_format": dict,
    "thread": {"type": str, "previous_message_id": str},
}


def anthropic_reader(req):
    """The route's reader: a server-held thread (``thread: continue``) is resumed first."""
    return anthropic_turn(thread_messages(req))


def thread_messages(req):
    """The body, with a continued thread's earlier messages in front of the new turn's."""
    body = req.json
    thread = body.get("thread")
    if thread is None:
        return body
    validate(ANTHROPIC, body, {"thread": {"type": str, "previous_message_id": str}})
    if thread.get("type") not in ("create", "continue"):
        raise invalid("thread.type: Input should be 'create' or 'continue'")
    if thread["type"] == "create":
        return body
    earlier = req.server.threads.get(thread.get("previous_message_id"))
    if earlier is None:
        raise HTTPError(404, "thread.previous_message_id: no stored message %r (dpmock holds the last %d)" % (
            thread.get("previous_message_id"), ThreadStore.LIMIT), etype="not_found_error")
    return dict(body, messages=earlier + list(body.get("messages") or []))


def anthropic_turn(body, need_max_tokens=True):
    """Read a messages body into a Turn, refusing what Anthropic refuses."""
    validate(ANTHROPIC, body, ANTHROPIC_MESSAGES_SHAPE)
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
    turn.system = _anthropic_content(system, turn, {})
    names = {}  # tool_use id -> name
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise invalid("messages.%d.role: Input should be 'user' or 'assistant'" % i)
        text = _anthropic_content(m.get("content"), turn, names)
        if m["role"] == "user":
            turn.user_text = text
            content = m.get("content")
            if not isinstance(content, list) or any(isinstance(b, dict) and b.get("type") != "tool_result"
                                                    for b in content):
                turn.user_turns += 1
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
    fmt = _get(body.get("output_config"), "format") or body.get("output_format")  # GA, and the beta's name
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("output_config.format.schema: Field required")
        turn.output = fmt["schema"]
    elif fmt is not None:
        raise invalid("output_config.format: Input tag %r found using 'type' does not match the expected tag: "
                      "'json_schema'" % (fmt.get("type") if isinstance(fmt, dict) else fmt,))
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


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use", "filter": "refusal"}


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


def handle_anthropic_messages(w, req):
    check_key(req)
    turn = read_turn(req)
    check_model(req, turn.model)
    plan = Plan(turn, w.fault, req.answer)
    blocks = anthropic_blocks(plan)
    out = plan.output_tokens + plan.thinking_tokens
    message = {"id": new_id("msg_01"), "type": "message", "role": "assistant", "model": turn.model}
    if req.json.get("thread") is not None:  # the server holds the conversation under this answer's id
        w.server.threads.put(message["id"], thread_messages(req)["messages"] +
                             [{"role": "assistant", "content": blocks}], req.body_bytes + len(plan.text))
    if not req.route.streaming(req):
        w.send_json(200, dict(message, content=blocks, stop_reason=_ANTHROPIC_STOP[plan.finish], stop_sequence=None,
                              usage=anthropic_usage(plan, out)))
        return
    w.start_stream(200, scenarios.SSE)
    w.send_sse_event(dict(type="message_start", message=dict(message, content=[], stop_reason=None,
                                                             stop_sequence=None, usage=anthropic_usage(plan, 1))),
                     "message_start")
    for i, block in enumerate(blocks):
        kind = block["type"]
        start = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                 "text": {"type": "text", "text": ""}, "tool_use": dict(block, input={})}[kind]
        w.send_sse_event({"type": "content_block_start", "index": i, "content_block": start}, "content_block_start")
        if i == 0:
            w.send_sse_event({"type": "ping"}, "ping")
        if kind == "thinking":
            deltas = [{"type": "thinking_delta", "thinking": p} for p in re.findall(_PIECES, block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "text":
            deltas = [{"type": "text_delta", "text": p} for p in plan.pieces]
        else:
            deltas = [{"type": "input_json_delta", "partial_json": f}
                      for f in [""] + json_fragments(json.dumps(block["input"]))]
        for delta in deltas:
            w.send_sse_event({"type": "content_block_delta", "index": i, "delta": delta}, "content_block_delta")
        w.send_sse_event({"type": "content_block_stop", "index": i}, "content_block_stop")
    w.send_sse_event({"type": "message_delta", "delta": {"stop_reason": _ANTHROPIC_STOP[plan.finish],
                                                          "stop_sequence": None},
                      "usage": {k: v for k, v in anthropic_usage(plan, out).items() if k != "service_tier"}},
                     "message_delta")
    w.send_sse_event({"type": "message_stop"}, "message_stop")
    w.end_stream()


def handle_anthropic_count_tokens(w, req):
    check_key(req)
    turn = anthropic_turn(req.json, need_max_tokens=False)
    check_model(req, turn.model)
    for name, schema in turn.tools:
        turn.add_text(name + " " + json.dumps(schema))
    w.send_json(200, {"input_tokens": count_tokens(turn.texts, turn.media)})


################################################################################
# Gemini
################################################################################

_GEMINI_CALL = {"name": str, "args": (dict, type(None)), "id": str}
_GEMINI_PART = {"text": str, "thought": bool, "thoughtSignature": str, "thought_signature": str,
                "inlineData": {"mimeType": str, "data": str}, "inline_data": {"mime_type": str, "data": str},
                "fileData": {"mimeType": str, "fileUri": str}, "file_data": {"mime_type": str, "file_uri": str},
                "functionCall": _GEMINI_CALL, "function_call": _GEMINI_CALL,
                "functionResponse": {"name": str, "response": dict, "id": str},
                "function_response": {"name": str, "response": dict, "id": str}}
_GEMINI_CONTENT = {"role": str, "parts": [_GEMINI_PART]}
_GEMINI_DECLARATION = {"name": str, "description": str, "parameters": dict, "parametersJsonSchema": dict,
                       "parameters_json_schema": dict}
_GEMINI_GEN = {"maxOutputTokens": int, "max_output_tokens": int, "temperature": float, "topP": float,
               "top_p": float, "topK": float, "top_k": float, "candidateCount": int, "stopSequences": [str],
               "responseMimeType": str, "response_mime_type": str, "responseSchema": dict, "response_schema": dict,
               "responseJsonSchema": dict, "response_json_schema": dict,
               "thinkingConfig": {"includeThoughts": bool, "thinkingBudget": int},
               "thinking_config": {"include_thoughts": bool, "thinking_budget": int}}
#: generateContent fields typed as the SDKs type them (camelCase and snake_case alike).
GEMINI_GENERATE_SHAPE = {
    "contents": [_GEMINI_CONTENT], "systemInstruction": _GEMINI_CONTENT, "system_instruction": _GEMINI_CONTENT,
    "tools": [{"functionDeclarations": [_GEMINI_DECLARATION], "function_declarations": [_GEMINI_DECLARATION]}],
    "toolConfig": {"functionCallingConfig": {"mode": str, "allowedFunctionNames": [str]}},
    "tool_config": {"function_calling_config": {"mode": str, "allowed_function_names": [str]}},
    "generationConfig": _GEMINI_GEN, "generation_config": _GEMINI_GEN,
}


def gemini_turn(body, model):
    """Read a generateContent body (camelCase or snake_case) into a Turn."""
    validate(GEMINI, body, GEMINI_GENERATE_SHAPE)
    turn = Turn(model)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified")
    turn.system = _gemini_parts(_get(_get(body, "systemInstruction", "system_instruction"), "parts"), turn)
    for i, c in enumerate(contents):
        if not isinstance(c, dict) or not isinstance(c.get("parts"), list):
            raise invalid("* GenerateContentRequest.contents[%d].parts: contents.parts must not be empty" % i)
        text = _gemini_parts(c["parts"], turn)
        if c.get("role", "user") == "user" and text:
            turn.user_text = text
        if c.get("role", "user") == "user" and any(
                isinstance(p, dict) and _get(p, "functionResponse", "function_response") is None for p in c["parts"]):
            turn.user_turns += 1
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
    mime = _get(gen, "responseMimeType", "response_mime_type")
    schema = _get(gen, "responseJsonSchema", "response_json_schema", "responseSchema", "response_schema")
    if mime == "application/json":
        turn.output = schema if isinstance(schema, dict) and schema else JSON_OBJECT
    elif mime == "text/x.enum" and isinstance(schema, dict):
        turn.output = ("enum", schema)
    elif schema is not None and mime not in (None, "text/plain"):
        raise invalid("* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
                      "`text/plain`, `application/json`, `application/xml`, `application/yaml` and `text/x.enum`.")
    elif schema is not None:
        raise invalid("* GenerateContentRequest.generation_config.response_schema: response_mime_type must be "
                      "application/json or text/x.enum when a response schema is set.")
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


_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool": "STOP", "filter": "SAFETY"}


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


def handle_gemini_generate(w, req):
    check_key(req)
    model = req.params["model"]
    stream = req.route.streaming(req)
    check_model(req, model, "streamGenerateContent" if stream else "generateContent")
    plan = Plan(read_turn(req), w.fault, req.answer)
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
        w.send_json(200, response(parts, True, plan.output_tokens))
        return
    chunks = [response(*c) for c in gemini_chunks(plan)]
    if req.arg("alt") == "sse":
        w.start_stream(200, "text/event-stream")
        for c in chunks:
            w.send_sse_event(c, sep="\r\n\r\n")
    else:  # alt=json: one JSON array, written element by element
        w.start_stream(200, "application/json; charset=UTF-8")
        for i, c in enumerate(chunks):
            w.stream_item(json.dumps(c, indent=2), index=i)
        w.send_chunk(b"]")
    w.end_stream()


def handle_gemini_count_tokens(w, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "countTokens")
    body = req.json
    inner = _get(body, "generateContentRequest", "generate_content_request")
    # The C library sends a top-level system_instruction (the real API has none here): counted too.
    turn = gemini_turn(inner if isinstance(inner, dict) else body, model)
    total = count_tokens(turn.texts, turn.media)
    w.send_json(200, {"totalTokens": total, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": total}]})


def handle_gemini_predict(w, req):
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
    w.send_json(200, {"predictions": predictions})


def _gemini_embed_one(req, body, model, where):
    validate(GEMINI, body, {"content": _GEMINI_CONTENT, "taskType": str, "task_type": str, "title": str,
                            "outputDimensionality": int, "output_dimensionality": int, "model": str})
    content = body.get("content")
    if not isinstance(content, dict) or not content.get("parts"):
        raise invalid("* %scontent: content is not specified" % where)
    text = _gemini_parts(content["parts"], Turn(model))
    dims = _get(body, "outputDimensionality", "output_dimensionality")
    if dims is not None and not 1 <= dims <= embedding_dims(model):
        raise invalid("* %soutput_dimensionality: expected an integer from 1 to %d" % (where, embedding_dims(model)))
    given = (req.answer or {}).get("embedding")
    return {"values": given or [round(x, 9) for x in embedding(text, dims or embedding_dims(model))]}


def handle_gemini_embed(w, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "embedContent")
    w.send_json(200, {"embedding": _gemini_embed_one(req, req.json, model, "EmbedContentRequest.")})


def gemini_embed_turn(req):
    content = req.json.get("content") or (req.json.get("requests") or [{}])[-1].get("content")
    turn = Turn(req.params["model"])
    turn.user_text = _gemini_parts(_get(content, "parts"), turn)
    return turn


def handle_gemini_batch_embed(w, req):
    """:batchEmbedContents, what google-genai's embed_content sends."""
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "batchEmbedContents")
    requests = req.json.get("requests")
    if not isinstance(requests, list) or not requests:
        raise invalid("* BatchEmbedContentsRequest.requests: requests is not specified")
    out = []
    for i, r in enumerate(requests):
        if not isinstance(r, dict):
            raise invalid("* BatchEmbedContentsRequest.requests[%d]: expected an object" % i)
        named = r.get("model")
        if isinstance(named, str) and named.split("/")[-1] != model:
            raise invalid("* BatchEmbedContentsRequest.requests[%d].model: it must be models/%s, the model of the "
                          "request, not %s" % (i, model, named))
        out.append(_gemini_embed_one(req, r, model, "BatchEmbedContentsRequest.requests[%d]." % i))
    w.send_json(200, {"embeddings": out})


################################################################################
# Shared paths: model lists, files, images
################################################################################

def handle_models_list(w, req):
    check_key(req)
    p = req.provider
    if p == OPENAI:
        w.send_json(200, {"object": "list", "data": [openai_model(m) for m in scenarios.OPENAI_MODELS]})
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
        w.send_json(200, {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
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
        w.send_json(200, answer)


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


def handle_model_get(w, req):
    check_key(req)
    model = req.params["model"]
    check_model(req, model, "get")
    p = req.provider
    if p == OPENAI:
        known = {m[0]: m for m in scenarios.OPENAI_MODELS}
        w.send_json(200, openai_model(known.get(model, (model, 1700000000, "system"))))
    elif p == ANTHROPIC:
        known = {m[0]: m for m in scenarios.ANTHROPIC_MODELS}
        w.send_json(200, anthropic_model(known.get(model, (model, model, "2025-01-01T00:00:00Z"))))
    else:
        known = {m[0]: m for m in scenarios.GEMINI_MODELS}
        w.send_json(200, gemini_model(known.get(model, (model, model, 1048576, 65536, False))))


def openai_model(m):
    return {"id": m[0], "object": "model", "created": m[1], "owned_by": m[2]}


def anthropic_model(m):
    return {"type": "model", "id": m[0], "display_name": m[1], "created_at": m[2]}


def gemini_model(m):
    name, display, input_limit, output_limit, thinking = m
    methods = ["predict"] if name.startswith("imagen") else \
        ["embedContent", "batchEmbedContents"] if "embedding" in name else \
        ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"]
    model = {"name": "models/" + name, "version": "001", "displayName": display,
             "description": "%s (served by dpmock)" % display, "inputTokenLimit": input_limit,
             "outputTokenLimit": output_limit, "supportedGenerationMethods": methods}
    if methods[0] == "generateContent":
        model.update(temperature=1, topP=0.95, topK=64, maxTemperature=2, thinking=thinking)
    return model


# ---------------------------------------------------------------- files

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


def handle_files_list(w, req):
    check_key(req)
    records = w.server.files.list(req.provider)
    if req.provider == GEMINI:
        size = _int_arg(req, "pageSize", 10, 1, 100)
        token = req.arg("pageToken") or "0"
        if not is_digits(token):
            raise invalid("Invalid page token %r." % token)
        start = int(token)
        answer = {"files": [gemini_file(r, req.origin()) for r in records[start:start + size]]}
        if start + size < len(records):
            answer["nextPageToken"] = str(start + size)
        w.send_json(200, answer)
        return
    data = [openai_file(r) for r in reversed(records)]
    w.send_json(200, {"object": "list", "data": data, "has_more": False,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


def handle_file_get(w, req):
    check_key(req)
    record = w.server.files.get(req.provider, _file_id(req))
    if record is None:
        raise _missing_file(req)
    w.send_json(200, gemini_file(record, req.origin()) if req.provider == GEMINI else openai_file(record))


def handle_file_delete(w, req):
    check_key(req)
    record = w.server.files.remove(req.provider, _file_id(req))
    if record is None:
        raise _missing_file(req)
    w.send_json(200, {} if req.provider == GEMINI else {"id": "file-" + record["id"], "object": "file",
                                                         "deleted": True})


def _hasher():
    import hashlib  # loads OpenSSL: kept off the start-up path
    return hashlib.sha256()


def count_body(req):
    """Consume the body, returning (byte count, sha256 digest); nothing is kept."""
    digest = _hasher()
    n = 0
    for piece in req.body_pieces():
        n += len(piece)
        digest.update(piece)
    return n, digest.digest()


def small_body(req):
    """The whole body when it is small metadata; 413 past MAX_FIELD."""
    data = bytearray()
    for piece in req.body_pieces():
        data += piece
        if len(data) > MAX_FIELD:
            raise HTTPError(413, "metadata body over %d bytes" % MAX_FIELD, close=True)
    return bytes(data)


def handle_openai_file_upload(w, req):
    """POST /files: multipart/form-data parsed as it streams in; the file part is only counted."""
    check_key(req)
    boundary = multipart_boundary(req, "multipart/form-data")
    fields, files = read_multipart(req, boundary)
    if not files:
        raise invalid("Missing required parameter: 'file'.", "file", "missing_required_parameter")
    purpose = fields.get("purpose")
    if not purpose:
        raise invalid("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
    name, mime, nbytes, digest = files[0]
    record = w.server.files.add(OPENAI, file_record(name, mime, nbytes, digest, purpose=purpose))
    w.send_json(200, openai_file(record))


def handle_gemini_upload_raw(w, req):
    """POST /files:upload?key=: the C library's raw upload (body = the file's bytes)."""
    check_key(req)
    nbytes, digest = count_body(req)
    if nbytes == 0:
        raise invalid("File is empty.")
    mime = (req.headers.get("content-type") or "application/octet-stream").split(";")[0].strip()
    record = w.server.files.add(GEMINI, file_record(req.arg("name") or "upload", mime, nbytes, digest))
    w.send_json(200, {"file": gemini_file(record, req.origin())})


def handle_gemini_upload(w, req):
    """POST /upload/v1beta/files: the resumable protocol (start, upload, finalize), media or multipart."""
    hdr = req.headers
    protocol = (hdr.get("x-goog-upload-protocol") or req.arg("uploadType") or "").lower()
    upload_id = req.arg("upload_id")
    if upload_id is not None:  # the upload URL: authorised by its session, the SDK sends no key there
        return resumable_chunk(w, req, upload_id)
    check_key(req)
    if protocol == "resumable":
        command = (hdr.get("x-goog-upload-command") or "").lower()
        if command != "start":
            raise invalid("X-Goog-Upload-Command must be 'start' to begin a resumable upload, not %r" % command)
        meta = _upload_meta(small_body(req))
        session = {"id": new_id("", 16), "received": 0, "hash": _hasher(),
                   "name": meta.get("name") or hdr.get("x-goog-upload-file-name") or "upload",
                   "mime": meta.get("mime") or hdr.get("x-goog-upload-header-content-type") or
                   "application/octet-stream"}
        w.server.files.start_upload(session)
        url = "%s/upload/v1beta/files?upload_id=%s&upload_protocol=resumable" % (req.origin(), session["id"])
        w.send_bytes(200, b"", "text/plain; charset=utf-8", [
            ("X-Goog-Upload-URL", url), ("X-Goog-Upload-Control-URL", url), ("X-Goog-Upload-Status", "active"),
            ("X-Goog-Upload-Chunk-Granularity", "8388608")])
    elif protocol == "multipart":
        boundary = multipart_boundary(req, "multipart/related")
        fields, files = read_multipart(req, boundary, keep_first=True)
        if not files:
            raise invalid("multipart upload has no media part")
        meta = _upload_meta(fields.get(""))
        _, mime, nbytes, digest = files[0]
        gemini_store(w, req, meta.get("name") or "upload", meta.get("mime") or mime, nbytes, digest)
    elif protocol in ("media", "raw", ""):
        nbytes, digest = count_body(req)
        mime = (hdr.get("content-type") or "application/octet-stream").split(";")[0].strip()
        gemini_store(w, req, hdr.get("x-goog-upload-file-name") or "upload", mime, nbytes, digest)
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
    except RecursionError:
        raise invalid("upload metadata is nested too deeply")
    f = _get(meta, "file") if isinstance(meta, dict) else None
    f = f if isinstance(f, dict) else {}
    return {"name": _get(f, "displayName", "display_name"), "mime": _get(f, "mimeType", "mime_type")}


def gemini_store(w, req, name, mime, nbytes, digest, headers=()):
    if nbytes == 0:
        raise invalid("File is empty.")
    record = w.server.files.add(GEMINI, file_record(name, mime, nbytes, digest))
    w.send_json(200, {"file": gemini_file(record, req.origin())}, headers)


def resumable_chunk(w, req, upload_id):
    session = w.server.files.upload(upload_id)
    if session is None:
        raise HTTPError(404, "upload session %r is unknown or finished" % upload_id, etype="NOT_FOUND")
    command = [c.strip() for c in (req.headers.get("x-goog-upload-command") or "").lower().split(",")]
    offset = req.headers.get("x-goog-upload-offset")
    if "upload" in command:
        if offset is None or not is_digits(offset) or int(offset) != session["received"]:
            raise invalid("X-Goog-Upload-Offset %r does not match the %d bytes received"
                          % (offset, session["received"]))
        for piece in req.body_pieces():
            session["received"] += len(piece)
            session["hash"].update(piece)
    elif "query" in command or "cancel" in command or "finalize" in command:
        small_body(req)
    else:
        raise invalid("X-Goog-Upload-Command must be upload, finalize, query or cancel")
    if "cancel" in command:
        w.server.files.end_upload(upload_id)
        w.send_bytes(200, b"", "text/plain; charset=utf-8", [("X-Goog-Upload-Status", "cancelled")])
    elif "finalize" in command:
        w.server.files.end_upload(upload_id)
        gemini_store(w, req, session["name"], session["mime"], session["received"], session["hash"].digest(),
                     [("X-Goog-Upload-Status", "final")])
    else:
        w.send_bytes(200, b"", "text/plain; charset=utf-8", [
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


def read_multipart(req, boundary, keep_first=False):
    """Parse a multipart body as it arrives: fields are kept (up to MAX_FIELD), files only counted.

    Returns ({field name: text}, [(filename, mime, byte count, sha256 digest)]). With
    ``keep_first`` the first part is kept as field "" (Gemini's JSON metadata part). At most
    MAX_PARTS parts and MAX_FORM_BYTES of field text are accepted (as Go's mime/multipart and
    Werkzeug bound forms): a form can't make dpmock hold more than that.
    """
    delim = b"\r\n--" + boundary
    held = 0
    buf = b"\r\n"  # so the first delimiter looks like every later one
    pieces = req.body_pieces()
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
        if index >= MAX_PARTS:
            raise HTTPError(413, "multipart body has more than %d parts" % MAX_PARTS, "request_too_large", close=True)
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
            elif len(kept) + len(body) > MAX_FIELD:
                raise invalid("multipart field over %d bytes" % MAX_FIELD)
            elif held + len(kept) + len(body) > MAX_FORM_BYTES:
                raise HTTPError(413, "multipart fields over %d bytes in all" % MAX_FORM_BYTES, "request_too_large",
                                close=True)
            else:
                kept += body
            if at >= 0:
                break
            buf += more()
        if is_file:
            files.append((disp.get("filename") or "upload", headers.get("content-type", "application/octet-stream"),
                          size, digest.digest()))
        else:
            held += len(kept)
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


def handle_image_png(w, req):
    w.send_bytes(200, png_for(req.params["image"]), "image/png")


################################################################################
# Control endpoints
################################################################################

def handle_control_status(w, req):
    srv = w.server
    w.send_json(200, {
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
        "endpoints": ["%s %s" % (r.method, r.pattern) for r in req.server.router.routes],
    })


def handle_control_requests(w, req):
    """The journal, filtered; with wait_for=N, held until N matching requests have arrived (or timeout)."""
    journal = w.server.journal
    filters = {name: req.arg(name) for name in ("path", "route", "scenario", "key", "test", "rule", "source")
               if req.arg(name) is not None}
    since = _int_arg(req, "since", 0, 0, 2 ** 62)
    limit = _int_arg(req, "limit", 100, 1, 10 ** 6)
    want = _int_arg(req, "wait_for", 0, 0, 10 ** 6)
    timeout = _float_arg(req, "timeout", 10.0, 0.0, 60.0)
    found, last_seq, timed_out = journal.wait(filters, since, want, timeout, w.server.stop_event)
    w.send_json(200, {"requests": [public_entry(e) for e in found[-limit:]], "count": min(len(found), limit),
                      "matched": len(found), "last_seq": last_seq, "timed_out": timed_out})


def control_test(req):
    """The test a control request is about: ?test=NAME, else X-DP-Test-Id (None: every test)."""
    name = req.arg("test") or req.test
    try:
        return check_test_id(name) if name is not None else None
    except RuleError as e:
        raise invalid(str(e), "test")


def handle_control_requests_clear(w, req):
    w.send_json(200, {"cleared": w.server.journal.clear(control_test(req))})


def handle_control_schedules(w, req):
    w.send_json(200, {"counters": w.server.schedules.listing(control_test(req))})


def handle_control_reset(w, req):
    """Clear the journal, schedule counters and rule hit counts: of one test with ?test=NAME."""
    srv, test = w.server, control_test(req)
    counters = len(srv.schedules.listing(test))
    srv.schedules.reset(test)
    srv.rules.reset_hits(test)
    w.send_json(200, {"cleared_requests": srv.journal.clear(test), "cleared_counters": counters, "test": test})


def handle_control_rules_add(w, req):
    """POST /_control/rules: one rule or a list, for every test or (?test=NAME, X-DP-Test-Id) for one."""
    body = bytearray()
    for piece in req.body_pieces(MAX_JSON_BODY):
        body += piece
    try:
        specs = json.loads(bytes(body).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, "rules body is not valid JSON: %s" % e, "invalid_json")
    except RecursionError:
        raise HTTPError(400, "rules body is nested too deeply", "invalid_json")
    test = control_test(req)
    try:
        if isinstance(specs, dict) and "rules" in specs:  # a rules file's shape: {"test": NAME, "rules": [...]}
            if specs.get("test") is not None:
                test = check_test_id(specs["test"], "test")
            specs = specs["rules"]
        ids = w.server.rules.add(specs, test)
    except RuleError as e:
        raise invalid("bad rule: %s" % e, "rules", "bad_rule")
    w.send_json(200, {"ids": ids, "test": test})


def handle_control_rules_list(w, req):
    test = control_test(req)
    rules = [r.public() for r in w.server.rules.all() if test is None or r.test in (None, test)]
    w.send_json(200, {"rules": rules, "count": len(rules), "strict": w.server.rules.strict})


def handle_control_rules_clear(w, req):
    w.send_json(200, {"cleared": w.server.rules.clear(control_test(req))})


def handle_control_rule_delete(w, req):
    try:
        removed = w.server.rules.remove(req.params["rule_id"], control_test(req))
    except RuleError as e:
        raise HTTPError(409, str(e), "rule_from_file")
    if not removed:
        raise HTTPError(404, "no rule %r" % req.params["rule_id"], "not_found")
    w.send_json(200, {"deleted": req.params["rule_id"]})


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


def handle_control_shutdown(w, req):
    w.send_json(200, {"status": "shutting_down", "pid": os.getpid(),
                      "message": "dpmock stops once in-flight requests finish"}, close=True)
    w.server.request_stop("shutdown requested over HTTP")


def handle_control_restart(w, req):
    w.send_json(200, {"status": "restarting", "pid": os.getpid(), "boot_id": w.server.boot_id,
                      "message": "dpmock re-executes itself keeping its listening socket"}, close=True)
    w.server.request_stop("restart requested over HTTP", restart=True)


################################################################################
# Route table: one row per route, bound to the one function that answers it
################################################################################

_GEMINI_MODEL = "/models/{model}"
_VERTEX_MODEL = "/projects/{project}/locations/{location}/publishers/{publisher}/models/{model}"
_EXPRESS_MODEL = "/publishers/{publisher}/models/{model}"

def _gemini_reader(req):
    return gemini_turn(req.json, req.params["model"])


ROUTES = (
    Route("POST", "/chat/completions", "chat", handle_openai_chat, OPENAI, BODY_JSON, STREAM_FLAG,
          lambda req: openai_turn(req.json)),
    Route("POST", "/images/generations", "images", handle_openai_images, OPENAI, BODY_JSON),
    Route("POST", "/embeddings", "embeddings", handle_openai_embeddings, OPENAI, BODY_JSON, reader=embeddings_turn),
    Route("POST", "/completions", "completions", handle_openai_completions, OPENAI, BODY_JSON, STREAM_FLAG,
          completion_turn),
    Route("POST", "/moderations", "moderations", handle_openai_moderations, OPENAI, BODY_JSON),
    Route("POST", "/responses", "responses", handle_openai_responses, OPENAI, BODY_JSON, STREAM_FLAG,
          responses_reader),
    Route("POST", "/responses/input_tokens", "responses_input_tokens", handle_responses_input_tokens, OPENAI,
          BODY_JSON),
    Route("GET", "/responses/{response_id}", "responses_get", handle_responses_get, OPENAI),
    Route("DELETE", "/responses/{response_id}", "responses_delete", handle_responses_delete, OPENAI),
    Route("POST", "/responses/{response_id}/cancel", "responses_cancel", handle_responses_cancel, OPENAI),
    Route("GET", "/responses/{response_id}/input_items", "responses_input_items", handle_responses_input_items,
          OPENAI),
    Route("POST", "/files", "files", handle_openai_file_upload, OPENAI, BODY_STREAM),
    Route("POST", "/messages", "messages", handle_anthropic_messages, ANTHROPIC, BODY_JSON, STREAM_FLAG,
          anthropic_reader),
    Route("POST", "/messages/count_tokens", "messages_count_tokens", handle_anthropic_count_tokens, ANTHROPIC,
          BODY_JSON),
    Route("POST", _GEMINI_MODEL + ":generateContent", "gemini_generate", handle_gemini_generate, GEMINI, BODY_JSON,
          reader=_gemini_reader),
    Route("POST", _EXPRESS_MODEL + ":generateContent", "gemini_generate", handle_gemini_generate, GEMINI, BODY_JSON,
          reader=_gemini_reader),
    Route("POST", _GEMINI_MODEL + ":streamGenerateContent", "gemini_stream", handle_gemini_generate, GEMINI,
          BODY_JSON, STREAM_ALWAYS, _gemini_reader),
    Route("POST", _EXPRESS_MODEL + ":streamGenerateContent", "gemini_stream", handle_gemini_generate, GEMINI,
          BODY_JSON, STREAM_ALWAYS, _gemini_reader),
    Route("POST", _GEMINI_MODEL + ":countTokens", "gemini_count_tokens", handle_gemini_count_tokens, GEMINI,
          BODY_JSON),
    Route("POST", _GEMINI_MODEL + ":embedContent", "gemini_embed", handle_gemini_embed, GEMINI, BODY_JSON,
          reader=gemini_embed_turn),
    Route("POST", _GEMINI_MODEL + ":batchEmbedContents", "gemini_batch_embed", handle_gemini_batch_embed, GEMINI,
          BODY_JSON, reader=gemini_embed_turn),
    Route("POST", _GEMINI_MODEL + ":predict", "gemini_predict", handle_gemini_predict, GEMINI, BODY_JSON),
    Route("POST", _VERTEX_MODEL + ":predict", "gemini_predict", handle_gemini_predict, GEMINI, BODY_JSON),
    Route("POST", _EXPRESS_MODEL + ":predict", "gemini_predict", handle_gemini_predict, GEMINI, BODY_JSON),
    Route("POST", "/files:upload", "gemini_upload", handle_gemini_upload_raw, GEMINI, BODY_STREAM),
    Route("POST", "/upload/files", "gemini_upload_media", handle_gemini_upload, GEMINI, BODY_STREAM),
    Route("GET", "/models", "models", handle_models_list, SHARED),
    Route("GET", "/models/{model}", "models_get", handle_model_get, SHARED),
    Route("GET", "/files", "files_list", handle_files_list, SHARED),
    Route("GET", "/files/{file_id}", "files_get", handle_file_get, SHARED),
    Route("DELETE", "/files/{file_id}", "files_delete", handle_file_delete, SHARED),
    Route("GET", "/_images/{image}", "image_png", handle_image_png, DPMOCK),
    Route("GET", "/_control/status", "control_status", handle_control_status, DPMOCK),
    Route("GET", "/_control/requests", "control_requests", handle_control_requests, DPMOCK),
    Route("DELETE", "/_control/requests", "control_requests_clear", handle_control_requests_clear, DPMOCK),
    Route("GET", "/_control/schedules", "control_schedules", handle_control_schedules, DPMOCK),
    Route("POST", "/_control/reset", "control_reset", handle_control_reset, DPMOCK),
    Route("POST", "/_control/rules", "control_rules_add", handle_control_rules_add, DPMOCK, BODY_STREAM),
    Route("GET", "/_control/rules", "control_rules", handle_control_rules_list, DPMOCK),
    Route("DELETE", "/_control/rules", "control_rules_clear", handle_control_rules_clear, DPMOCK),
    Route("DELETE", "/_control/rules/{rule_id}", "control_rule_delete", handle_control_rule_delete, DPMOCK),
    Route("POST", "/_control/shutdown", "control_shutdown", handle_control_shutdown, DPMOCK),
    Route("POST", "/_control/restart", "control_restart", handle_control_restart, DPMOCK),
)

ROUTER = Router(ROUTES)


################################################################################
# Scenarios and faults: what a request asked for, and one implementation per fault kind
################################################################################

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
                        % (e.args[0][:60], ", ".join(scenarios.names())), "unknown_scenario")
    except ValueError as e:
        raise HTTPError(400, "bad scenario parameter: %s" % e, "bad_scenario_parameter")
    return spec, scenario, params


def scenario_answer(scenario, route, provider):
    """What a scenario answers on a route: its own row for it, else its answer if the route is of its kind."""
    value = scenario.routes.get(route.name)
    if value is None and route.applies(scenario):
        value = scenario.answer
    return value.get(provider) if isinstance(value, ByProvider) else value


class FaultKind:
    """The hooks a fault may use, called by dispatch and the writer; each does nothing here.

    A fault kind subclasses this and overrides the hooks it needs; FAULTS holds one instance
    per kind, and every kind in scenarios.py must have one (checked at import).
    """

    kind = None  #: the scenarios.Fault kind this implements
    breaks_body = False  #: acts on a body: a HEAD answer (which has none) is left alone
    streams_only = False  #: acts on streamed answers only; other answers are given normally
    sends_100 = True  #: ``Expect: 100-continue`` gets its interim answer

    def early(self, w, req, p):
        """Before the body is read: return True when the request has been answered here."""
        return False

    def before(self, w, req, p):
        """The request is read, no answer made yet."""

    def pieces(self, turn, p):
        """The answer text's pieces (one per stream event), reshaped; None keeps them."""
        return None

    def reply(self, w, status, body, ctype, headers, close, p):
        """A whole (non-streamed) answer: return True when this sent it (or broke it) itself."""
        return False

    def stream_head(self, w, p):
        """Called when a stream starts: return True to close the connection after it."""
        return False

    def after_head(self, w, p):
        """The head of a stream is written."""

    def write(self, w, data, p):
        """Bytes about to leave: return True when this wrote (or withheld) them itself."""
        return False

    def item(self, w, n, text, payload, event, p):
        """The text of stream item number ``n``; None drops the item."""
        return text

    def chunk(self, w, data, p):
        """One chunk about to be framed: return True when this sent it itself."""
        return False

    def end(self, w, p):
        """The stream's last chunk is next."""


class NoFault(FaultKind):
    """An ordinary answer."""


NO_FAULT = (NoFault(), None)
_ORDINARY = NO_FAULT[0]
_HTML_PAGE = b"<html><body><h1>200 OK</h1><p>A page, not the JSON or event stream you asked for.</p></body></html>"
_EOL = {"crlf": "\r\n", "lf": "\n", "cr": "\r"}


class EmptyReply(FaultKind):
    kind = "EMPTY_REPLY"

    def before(self, w, req, p):
        req.drain()  # an unread body would turn the close into a reset
        w.abort("empty")


class Hang(FaultKind):
    kind = "HANG"

    def before(self, w, req, p):
        req.drain()
        w.pause(p["ms"] / 1000.0)
        w.abort("hang")


class Reset(FaultKind):
    kind = "RESET"

    def before(self, w, req, p):
        if p["after_bytes"] == 0:
            w.abort("reset")

    def write(self, w, data, p):
        if w.sent + len(data) < p["after_bytes"]:
            return False
        w.put(data[:max(0, p["after_bytes"] - w.sent)])
        w.abort("reset")


class SlowBody(FaultKind):
    kind = "SLOW_BODY"
    breaks_body = True

    def write(self, w, data, p):
        for i in range(0, len(data), p["bytes"]):
            if w.sent:
                w.pause(p["interval_ms"] / 1000.0)
            w.put(data[i:i + p["bytes"]])
        return True


class HeadersStall(FaultKind):
    kind = "HEADERS_STALL"

    def reply(self, w, status, body, ctype, headers, close, p):
        w.put(w.head(status, w.whole_headers(ctype, len(body), headers), close))
        self.after_head(w, p)

    def after_head(self, w, p):
        w.stall(p["ms"])


class HalfClose(FaultKind):
    kind = "HALF_CLOSE"
    breaks_body = True

    def reply(self, w, status, body, ctype, headers, close, p):
        w.put(w.head(status, w.whole_headers(ctype, len(body), headers), close) + body[:len(body) // 2])
        w.half_close()

    def item(self, w, n, text, payload, event, p):
        if n == 1:
            w.half_close()
        return text


class _EndsWithFin(FaultKind):
    """A broken body that ends with the connection: its stream closes, with no final chunk."""

    breaks_body = True

    def stream_head(self, w, p):
        return True

    def end(self, w, p):
        w.abort("fin")


class ShortBody(_EndsWithFin):
    kind = "SHORT_BODY"

    def reply(self, w, status, body, ctype, headers, close, p):
        w.put(w.head(status, w.whole_headers(ctype, len(body) + p["missing"], headers), True) + body)
        w.abort("fin")


class NoFinalChunk(_EndsWithFin):
    kind = "NO_FINAL_CHUNK"

    def reply(self, w, status, body, ctype, headers, close, p):
        w.start_stream(status, ctype, headers, close=True)
        w.send_chunk(body)
        w.end_stream()


class BadChunkSize(NoFinalChunk):
    kind = "BAD_CHUNK_SIZE"

    def chunk(self, w, data, p):
        w.write(b"zz\r\n%s\r\n" % data)  # a size line that is not hex
        w.abort("fin")


class InvalidJson200(FaultKind):
    kind = "INVALID_JSON_200"
    breaks_body = True

    def reply(self, w, status, body, ctype, headers, close, p):
        if status == 200 and ctype.split(";")[0].strip().lower() == scenarios.JSON:  # a replay's may say charset
            w.send_whole(status, body[:len(body) // 2], ctype, headers, close)
            return True
        return False

    def item(self, w, n, text, payload, event, p):
        return text.replace(payload, payload[:len(payload) // 2], 1) if n == 1 else text


class Html200(FaultKind):
    kind = "HTML_200"

    def reply(self, w, status, body, ctype, headers, close, p):
        w.send_whole(200, _HTML_PAGE, scenarios.HTML, (), close)
        return True

    def stream_head(self, w, p):  # an HTML page where a stream was expected
        w.send_whole(200, _HTML_PAGE, scenarios.HTML, (), True)
        raise Answered("ok")


_END_MARKERS = ("[DONE]",)
_END_EVENTS = ("message_stop", "response.completed", "response.incomplete")


class StreamError(FaultKind):
    kind = "STREAM_ERROR"
    streams_only = True

    def item(self, w, n, text, payload, event, p):
        if n == p["after"] or payload in _END_MARKERS or event in _END_EVENTS:  # a short stream: before its end
            w.send_stream_error()
        return text

    def chunk(self, w, data, p):
        if w.json_array and data == b"]":  # Gemini's array: the error is its last element
            w.send_stream_error()
        return False

    def end(self, w, p):  # a stream shorter than ``after`` gets it at its end
        w.send_stream_error()


class StreamSlow(FaultKind):
    kind = "STREAM_SLOW"
    streams_only = True

    def item(self, w, n, text, payload, event, p):
        w.pause(p["ttft_ms"] / 1000.0 if n == 0 else 1.0 / p["tps"])
        return text


class StreamStall(FaultKind):
    kind = "STREAM_STALL"
    streams_only = True

    def item(self, w, n, text, payload, event, p):
        if n == p["after"]:
            self.end(w, p)
        return text

    def end(self, w, p):
        w.stall(p["ms"])


class StreamCut(FaultKind):
    kind = "STREAM_CUT"
    streams_only = True

    def write(self, w, data, p):
        if not p["bytes"] or w.sent + len(data) < p["bytes"]:
            return False
        w.put(data[:max(0, p["bytes"] - w.sent)])
        w.abort("reset" if p["how"] == "reset" else "fin")

    def item(self, w, n, text, payload, event, p):
        if not p["bytes"] and n == p["events"]:
            w.abort(p["how"])
        return text

    def end(self, w, p):
        w.abort(p["how"])


class StreamNoEnd(FaultKind):
    kind = "STREAM_NO_END"
    streams_only = True
    ends = frozenset(("message_stop", "response.completed", "response.incomplete"))  #: events that end a stream

    def item(self, w, n, text, payload, event, p):
        return None if payload == "[DONE]" or event in self.ends else text


class SseSplit(FaultKind):
    kind = "SSE_SPLIT"
    streams_only = True

    def pieces(self, turn, p):  # multi-byte characters, so pieces of a few bytes split them
        return re.findall(_PIECES, "dpmock ünïcödé ✓ 😀 " + answer_text(turn))

    def chunk(self, w, data, p):
        cuts = [c for c in p["at"] if c < len(data)] or list(range(p["every"], len(data), p["every"]))
        for start, end in zip([0] + cuts, cuts + [len(data)]):
            w.frame_chunk(data[start:end])
        return True


class SseLineEndings(FaultKind):
    kind = "SSE_LINE_ENDINGS"
    streams_only = True

    def item(self, w, n, text, payload, event, p):
        return text if w.json_array else text.replace("\r\n", "\n").replace("\n", _EOL[p["eol"]])


class SseComments(FaultKind):
    kind = "SSE_COMMENTS"
    streams_only = True

    def item(self, w, n, text, payload, event, p):
        return text if w.json_array else ": dpmock comment before event %d\n%s:\n\n" % (n, text)


class SseBigEvent(FaultKind):
    kind = "SSE_BIG_EVENT"
    streams_only = True

    def pieces(self, turn, p):
        unit = "dpmock big event ünïcödé ✓ "
        return [unit * (p["kib"] * 1024 // len(unit.encode("utf-8")) + 1)]


class SseManyEvents(FaultKind):
    kind = "SSE_MANY_EVENTS"
    streams_only = True

    def pieces(self, turn, p):
        text = answer_text(turn)
        return [text[i % len(text)] for i in range(p["n"])]


class ExpectReject(FaultKind):
    kind = "EXPECT_REJECT"

    def early(self, w, req, p):
        if not req.has_body():
            return False
        # Answered from the headers: the body is never read, so the connection can't be reused.
        w.send_error_reply(HTTPError(int(p["status"]), "refused before the body was read (scenario EXPECT_REJECT)"),
                           close=True)
        if req.headers.get("expect") is None:
            w.linger()
        return True


class ExpectIgnore(FaultKind):
    kind = "EXPECT_IGNORE"
    sends_100 = False


#: One implementation per fault kind of scenarios.py.
def _kinds(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _kinds(sub)


FAULTS = {k.kind: k() for k in _kinds(FaultKind) if k.kind}


def _fail_first(count, params, seed):
    return count < params["n"]


def _fail_every(count, params, seed):
    return (count + 1) % params["k"] == 0


def _sequence(count, params, seed):
    steps = params["steps"]
    step = steps[count] if count < len(steps) else "OK"
    return None if step == "OK" else step


def _fail_random(count, params, rng):
    return rng.random() < params["p"]


#: Schedule kinds: ``step(count before this request, params, rng)`` -> True (apply ``fault``),
#: False (answer normally) or the name of the scenario to apply.
SCHEDULES = {"FAIL_FIRST": _fail_first, "FAIL_EVERY": _fail_every, "SEQUENCE": _sequence,
             "FAIL_RANDOM": _fail_random}


def check_catalogue(routes):
    """Refuse to start on a catalogue the server cannot carry out: each fault kind needs exactly one
    implementation (and each implementation a scenario), each route a scenario names must exist."""
    kinds = {}
    names = {r.name for r in routes}
    for s in scenarios.SCENARIOS.values():
        for value in list(s.routes.values()) + [s.answer]:
            if isinstance(value, scenarios.Fault):
                kinds.setdefault(value.kind, s.name)
        for route in s.routes:
            if route not in names:
                raise StartError("scenario %s names route %r, which is not in ROUTES" % (s.name, route))
        if s.applies not in (None, scenarios.ANY_PROVIDER_ROUTE, scenarios.BODY, scenarios.STREAMED):
            raise StartError("scenario %s applies to %r, which is not a kind of route" % (s.name, s.applies))
    known = set(FAULTS) | set(SCHEDULES)
    for kind, name in kinds.items():
        if kind not in known:
            raise StartError("scenario %s uses fault kind %r, which has no implementation" % (name, kind))
    for kind in known - set(kinds):
        raise StartError("fault kind %r is implemented but no scenario uses it" % kind)


################################################################################
# Rules: answers a team defines, matched before dpmock's own
################################################################################

#: What a rule's ``match`` may say, and what its ``respond`` may give.
RULE_MATCH_KEYS = ("provider", "route", "model", "text", "text_exact", "text_regex", "system", "tool", "tool_result",
                   "turn", "stream", "key", "header", "query", "body")
RULE_RESPOND_KEYS = ("text", "tool_calls", "thinking", "json", "usage", "finish", "error", "scenario", "embedding",
                     "raw")
RULE_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool", "content_filter": "filter"}
_TEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class RuleError(ValueError):
    """A rule that cannot be used; the message names the field."""


def check_test_id(name, where="test id"):
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not _TEST_ID_CHARS.issuperset(name):
        raise RuleError("%s must be 1-100 letters, digits, '.', '_' or '-', not %r" % (where, str(name)[:40]))
    return name


class Rule:
    """One rule, compiled: its conditions as (name, predicate, wanted) triples over a RuleContext."""

    __slots__ = ("id", "priority", "times", "match", "respond", "test", "source", "order", "conds", "hits",
                 "trigram", "regex", "any_route", "recorded")

    def __init__(self, spec, order, test=None, source=None):
        if not isinstance(spec, dict):
            raise RuleError("a rule must be a JSON object with match and respond")
        unknown = set(spec) - {"id", "priority", "times", "match", "respond", "test", "recorded"}
        if unknown:
            raise RuleError("unknown rule field %r; a rule has id, priority, times, match, respond, recorded"
                            % sorted(unknown)[0])
        self.recorded = spec.get("recorded")  #: where a recorded rule came from (--record writes it)
        if self.recorded is not None and not (isinstance(self.recorded, dict) and all(
                isinstance(v, (str, int)) and not isinstance(v, bool) for v in self.recorded.values())):
            raise RuleError("recorded must be an object of strings and numbers (method, path, upstream, status)")
        self.id = spec.get("id")
        if self.id is not None and (not isinstance(self.id, str) or not self.id):
            raise RuleError("id must be a non-empty string")
        self.priority = _rule_int(spec, "priority", 0)
        self.times = _rule_int(spec, "times", None, low=1)
        self.test = check_test_id(spec["test"], "test") if spec.get("test") is not None else test
        self.source, self.order, self.hits = source, order, {}
        self.match = spec.get("match") or {}
        if not isinstance(self.match, dict):
            raise RuleError("match must be an object")
        self.respond = spec.get("respond")
        answers = self.respond if isinstance(self.respond, list) else [self.respond]
        if not answers:
            raise RuleError("respond must be an answer or a non-empty list of answers")
        for i, a in enumerate(answers):
            check_answer(a, "respond" if not isinstance(self.respond, list) else "respond[%d]" % i)
        self.regex = None
        self.trigram = None
        self.conds = [self._condition(k, v) for k, v in self.match.items()]
        #: it can answer a route without a conversation (models, files...): errors, scenarios, raw answers
        self.any_route = any("error" in a or "scenario" in a or "raw" in a for a in answers)

    def _condition(self, name, want):
        if name not in RULE_MATCH_KEYS:
            raise RuleError("unknown match field %r; known: %s" % (name, ", ".join(RULE_MATCH_KEYS)))
        if name in ("provider", "route", "system", "text", "text_exact", "tool", "key"):
            if not isinstance(want, str):
                raise RuleError("match.%s must be a string" % name)
            if name == "provider" and want not in (OPENAI, ANTHROPIC, GEMINI):
                raise RuleError("match.provider must be openai, anthropic or gemini")
            if name in ("text", "text_exact") and len(want) >= 3:
                self.trigram = want[len(want) // 2 - 1:len(want) // 2 + 2]
            if name == "text_exact":
                return name, (lambda c, w=want: c.text == w), want
        if name == "model":
            if not isinstance(want, str):
                raise RuleError("match.model must be a string (exact, or a glob with *)")
            if not any(ch in want for ch in "*?["):
                return name, (lambda c, w=want: c.model == w), want
            import fnmatch
            glob = re.compile(fnmatch.translate(want)).match  # compiled once, not at every request
            return name, (lambda c: glob(c.model) is not None), want
        if name == "text_regex":
            try:
                self.regex = re.compile(want)
            except (re.error, TypeError) as e:
                raise RuleError("match.text_regex is not a regular expression: %s" % e)
            return name, (lambda c: self.regex.search(c.text) is not None), want
        if name == "tool_result":
            if not isinstance(want, (bool, str)):
                raise RuleError("match.tool_result must be true, false or a tool name")
            return name, (lambda c, w=want: (c.tool_result is not None) == w if isinstance(w, bool)
                          else c.tool_result == w), want
        if name == "turn":
            if not isinstance(want, int) or isinstance(want, bool) or want < 0:
                raise RuleError("match.turn must be a whole number (the count of user messages)")
            return name, (lambda c, w=want: c.turn == w), want
        if name == "stream":
            if not isinstance(want, bool):
                raise RuleError("match.stream must be true or false")
            return name, (lambda c, w=want: c.stream == w), want
        if name == "query":
            if not isinstance(want, dict) or not want or not all(
                    isinstance(v, str) or v is None for v in want.values()):
                raise RuleError("match.query must be an object: parameter -> value (null: absent)")
            return name, (lambda c, w=want: all(c.query.get(k, [None])[0] == v for k, v in w.items())), want
        if name in ("header", "body"):
            if not isinstance(want, dict) or not want:
                raise RuleError("match.%s must be an object: %s" % (name, "name -> value" if name == "header" else
                                                                       "JSON pointer -> value"))
            if name == "body" and not all(k.startswith("/") or k == "" for k in want):
                raise RuleError("match.body keys must be JSON pointers such as /temperature")
            want = {k.lower(): v for k, v in want.items()} if name == "header" else want
            return name, (lambda c, w=want: c.header_has(w)) if name == "header" else \
                (lambda c, w=want: all(json_pointer(c.body, k) == v for k, v in w.items())), want
        if name in ("system", "text"):
            return name, (lambda c, n=name, w=want: w in getattr(c, n)), want
        if name == "tool":
            return name, (lambda c, w=want: w in c.tools), want
        return name, (lambda c, n=name, w=want: getattr(c, n) == w), want

    def first_miss(self, ctx):
        """The first condition ctx fails (name, wanted), else None."""
        for name, ok, want in self.conds:
            if not ok(ctx):
                return name, want
        return None

    def misses(self, ctx):
        return [(name, want) for name, ok, want in self.conds if not ok(ctx)]

    def public(self):
        out = {"id": self.id, "priority": self.priority, "times": self.times, "match": self.match,
               "respond": self.respond, "test": self.test, "source": self.source or "runtime",
               "hits": sum(self.hits.values())}
        if self.recorded is not None:
            out["recorded"] = self.recorded
        if self.hits:
            out["hits_by_test"] = {k or "": v for k, v in self.hits.items()}
        return out


def _rule_int(spec, name, default, low=None):
    value = spec.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        raise RuleError("%s must be a whole number%s" % (name, " of at least %d" % low if low is not None else ""))
    return value


def check_answer(a, where):
    """Refuse an answer a rule cannot give, naming the field."""
    if not isinstance(a, dict) or not a:
        raise RuleError("%s must be an object with text, tool_calls, json, error, scenario..." % where)
    unknown = set(a) - set(RULE_RESPOND_KEYS)
    if unknown:
        raise RuleError("unknown field %s.%s; an answer has %s" % (where, sorted(unknown)[0], ", ".join(RULE_RESPOND_KEYS)))
    if "text" in a and not isinstance(a["text"], str):
        raise RuleError("%s.text must be a string" % where)
    if "thinking" in a and not isinstance(a["thinking"], str):
        raise RuleError("%s.thinking must be a string" % where)
    calls = a.get("tool_calls", [])
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"]
                                              and isinstance(c.get("arguments", {}), dict) for c in calls):
        raise RuleError("%s.tool_calls must be a list of {name, arguments (an object)}" % where)
    if "finish" in a and (not isinstance(a["finish"], str) or a["finish"] not in RULE_FINISH):
        raise RuleError("%s.finish must be one of %s" % (where, ", ".join(RULE_FINISH)))
    usage = a.get("usage", {})
    if not isinstance(usage, dict) or not all(k in ("input_tokens", "output_tokens") and isinstance(v, int)
                                              and not isinstance(v, bool) and v >= 0 for k, v in usage.items()):
        raise RuleError("%s.usage must be {input_tokens, output_tokens} whole numbers" % where)
    err = a.get("error")
    if err is not None and not (isinstance(err, dict) and isinstance(err.get("status"), int)
                                and 400 <= err["status"] <= 599 and isinstance(err.get("message", ""), str)
                                and isinstance(err.get("type", ""), str)):
        raise RuleError("%s.error must be {status (400-599), message, type}" % where)
    if "scenario" in a:
        if not isinstance(a["scenario"], str):
            raise RuleError("%s.scenario must be scenario text such as 'STREAM_SLOW; tps=5'" % where)
        try:
            scenarios.resolve(a["scenario"])
        except KeyError as e:
            raise RuleError("%s.scenario names no scenario: %r" % (where, e.args[0]))
        except ValueError as e:
            raise RuleError("%s.scenario: %s" % (where, e))
    emb = a.get("embedding")
    if emb is not None and not (isinstance(emb, list) and emb and all(isinstance(x, (int, float)) and
                                                                      not isinstance(x, bool) for x in emb)):
        raise RuleError("%s.embedding must be a non-empty list of numbers" % where)
    if "raw" in a:
        if set(a) - {"raw", "scenario"}:
            raise RuleError("%s.raw is a whole answer: it goes alone (with a scenario at most), not with %s"
                            % (where, sorted(set(a) - {"raw", "scenario"})[0]))
        check_raw(a["raw"], where + ".raw")


def json_pointer(doc, pointer):
    """The value at an RFC 6901 JSON pointer, or a sentinel when there is none."""
    if pointer == "":
        return doc
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _NOTHING
    return doc


_NOTHING = object()


class RuleContext:
    """What a request asked, as rules see it (the same words on every provider)."""

    __slots__ = ("provider", "route", "model", "text", "system", "tools", "tool_result", "turn", "stream", "key",
                 "headers", "query", "body", "_trigrams", "conversation")

    def __init__(self, req, turn):
        self.provider, self.route = req.provider, req.route.name
        self.model = turn.model if turn is not None else req.params.get("model") or _get(req.json, "model") or ""
        self.text = turn.user_text if turn is not None else ""
        self.system = turn.system if turn is not None else ""
        self.tools = [name for name, _ in turn.tools] if turn is not None else []
        self.tool_result = turn.tool_result[0] if turn is not None and turn.tool_result else None
        self.turn = turn.user_turns if turn is not None else 0
        self.stream = req.route.streaming(req)
        self.key = request_key(req) or ""
        self.headers, self.query, self.body = req.headers, req.query, req.json
        self._trigrams = None
        self.conversation = req.route.reader is not None  #: the route can use any answer

    def header_has(self, want):
        return all(self.headers.get(k) == v for k, v in want.items())

    def trigrams(self):
        if self._trigrams is None:
            t = self.text
            self._trigrams = {t[i:i + 3] for i in range(len(t) - 2)}
        return self._trigrams


class RuleBook:
    """Every rule in force: from --rules files (reloaded when they change) and added at run time.

    Matching looks only at the rules of the request's route and test (and the global ones);
    a rule with a ``text`` condition is found through a trigram of its text, so a request
    checks the few rules whose text could be in its prompt, not all of them.
    """

    def __init__(self, log, paths=(), strict=False):
        self.log, self.paths, self.strict = log, list(paths), strict
        self.lock = threading.Lock()
        self.file_rules = {}  # file path -> [Rule]
        self.runtime = []
        self.mtimes = {}
        self._order = itertools.count()
        self._ids = itertools.count(1)
        self.index = {}  # (test, route) -> ([rules without trigram], {trigram: [rules]})
        self.count = 0
        if self.paths:
            self.reload(initial=True)

    # ---------------------------------------------------------------- sources

    def files(self):
        out = []
        for path in self.paths:
            if os.path.isdir(path):
                out += sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json"))
            else:
                out.append(path)
        return out

    def reload(self, initial=False):
        """Re-read every rules file that changed; a broken one keeps its old rules and logs one line."""
        changed = False
        current = self.files()
        for path in current:
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError as e:
                if initial:
                    raise StartError("cannot read rules file %s: %s" % (path, e.strerror))
                continue
            if self.mtimes.get(path) == mtime:
                continue
            self.mtimes[path] = mtime
            try:
                rules = self.load_file(path)
            except (OSError, ValueError) as e:
                if initial:
                    raise StartError(str(e))
                self.log.error("rules: %s", e)
                continue
            with self.lock:
                self.file_rules[path] = rules
            changed = True
            self.log.info("rules: %d from %s", len(rules), path)
        for path in set(self.file_rules) - set(current):
            with self.lock:
                del self.file_rules[path]
            self.mtimes.pop(path, None)
            changed = True
        if changed:
            self.rebuild()

    def load_file(self, path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ValueError("%s: line %s: %s" % (path, getattr(e, "lineno", "?"), getattr(e, "msg", e)))
        except RecursionError:
            raise ValueError("%s: nested too deeply to be rules" % path)
        test = None
        if isinstance(doc, dict) and "rules" in doc:
            test = doc.get("test")
            doc = doc["rules"]
        specs = doc if isinstance(doc, list) else [doc]
        rules = []
        for i, spec in enumerate(specs):
            try:
                if test is not None:
                    check_test_id(test, "test")
                rules.append(self.make(spec, test, path))
            except RuleError as e:
                raise ValueError("%s: rule %d: %s" % (path, i + 1, e))
        return rules

    def make(self, spec, test, source):
        rule = Rule(spec, next(self._order), test, source)
        if rule.id is None:
            rule.id = "rule-%d" % next(self._ids)
        return rule

    def add(self, specs, test=None):
        """Add rules at run time (all or none); returns their ids."""
        specs = specs if isinstance(specs, list) else [specs]
        if not specs:
            raise RuleError("no rules given")
        rules = []
        for i, spec in enumerate(specs):
            try:
                rules.append(self.make(spec, test, None))
            except RuleError as e:
                raise RuleError("rule %d: %s" % (i + 1, e) if len(specs) > 1 else str(e))
        with self.lock:
            taken = {(r.test, r.id) for r in self.all()}
            for r in rules:
                if (r.test, r.id) in taken:
                    raise RuleError("a rule with id %r exists%s; DELETE /_control/rules/%s first" % (
                        r.id, " in test %s" % r.test if r.test else "", r.id))
                taken.add((r.test, r.id))
            self.runtime.extend(rules)
        self.rebuild()
        return [r.id for r in rules]

    def remove(self, rule_id, test=None):
        with self.lock:
            for r in self.runtime:
                if r.id == rule_id and r.test == test:
                    self.runtime.remove(r)
                    break
            else:
                source = next((r.source for r in self.all() if r.id == rule_id and r.test == test), None)
                if source:
                    raise RuleError("rule %r comes from %s: edit that file instead" % (rule_id, source))
                return False
        self.rebuild()
        return True

    def clear(self, test=None):
        with self.lock:
            before = len(self.runtime)
            self.runtime = [r for r in self.runtime if test is not None and r.test != test]
        self.rebuild()
        return before - len(self.runtime)

    def reset_hits(self, test=None):
        for r in self.all():
            if test is None:
                r.hits.clear()
            else:
                r.hits.pop(test, None)

    def all(self):
        return [r for rules in self.file_rules.values() for r in rules] + self.runtime

    def rebuild(self):
        """The index: per (test, route) and trigram, rules in priority order (higher first, then as defined)."""
        with self.lock:
            rules = sorted(self.all(), key=lambda r: (-r.priority, r.order))
            index = {}
            for r in rules:
                route = r.match.get("route")
                entry = index.setdefault((r.test, route), ([], {}))
                if r.trigram is not None:
                    entry[1].setdefault(r.trigram, []).append(r)
                else:
                    entry[0].append(r)
            self.index, self.count = index, len(rules)

    # ---------------------------------------------------------------- matching

    def candidates(self, ctx, test):
        """The rules that could match, in priority order."""
        found = []
        index = self.index
        for key in ((test, ctx.route), (test, None), (None, ctx.route), (None, None)) if test else \
                ((None, ctx.route), (None, None)):
            entry = index.get(key)
            if entry is None:
                continue
            found += entry[0]
            by_gram = entry[1]
            if by_gram:
                grams = ctx.trigrams()
                if len(by_gram) < len(grams):
                    for gram, rules in by_gram.items():
                        if gram in grams:
                            found += rules
                else:
                    for gram in grams:
                        found += by_gram.get(gram, ())
        if len(found) > 1:
            found.sort(key=lambda r: (-r.priority, r.order))
        return found

    def match(self, ctx, test):
        """(rule, answer, groups) of the first rule that matches and may still fire, else None."""
        for rule in self.candidates(ctx, test):
            if (not ctx.conversation and not rule.any_route) or rule.first_miss(ctx) is not None:
                continue
            with self.lock:
                n = rule.hits.get(test, 0)
                if rule.times is not None and n >= rule.times:
                    continue
                rule.hits[test] = n + 1
            answers = rule.respond if isinstance(rule.respond, list) else [rule.respond]
            groups = {}
            if rule.regex is not None:
                m = rule.regex.search(ctx.text)
                groups = dict((str(i), g or "") for i, g in enumerate(m.groups(), 1))
                groups.update((k, v or "") for k, v in m.groupdict().items())
            return rule, answers[min(n, len(answers) - 1)], groups
        return None

    def nearest(self, ctx, test, n=3):
        """The rules closest to matching, with the condition each failed (strict mode's diagnostic)."""
        rules = [r for r in self.all() if r.test in (None, test)]
        scored = sorted(((len(r.misses(ctx)), r.priority * -1, r.order, r) for r in rules), key=lambda x: x[:3])
        out = []
        for _, _, _, r in scored[:n]:
            miss = r.first_miss(ctx)
            if miss is None:
                out.append("rule %r (used up: times=%s)" % (r.id, r.times))
            else:
                name = miss[0]
                got = ({k: mask_header(k, ctx.headers.get(k) or "") for k in miss[1]} if name == "header" else
                       {k: json_pointer(ctx.body, k) for k in miss[1]} if name == "body" else
                       mask_key(ctx.key) if name == "key" else
                       {k: ctx.query.get(k, [None])[0] for k in miss[1]} if name == "query" else
                       getattr(ctx, {"text_regex": "text", "text_exact": "text"}.get(name, name), None))
                out.append("rule %r (%s %s, got %s)" % (r.id, name, json.dumps(miss[1])[:60],
                                                        json.dumps(got, default=lambda o: None)[:60]))
        return out


def render(value, ctx, groups):
    """Fill {{text}}, {{model}}, {{1}} and named groups into the strings of an answer."""
    if isinstance(value, str):
        if "{{" not in value:
            return value
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: {"text": ctx.text, "model": ctx.model}.get(
            m.group(1), groups.get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [render(v, ctx, groups) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx, groups) for k, v in value.items()}
    return value


def apply_rules(w, req):
    """Step 7 of dispatch: the answer of the rule that matches this request, or None."""
    book = w.server.rules
    strict = book.strict or (req.headers.get("x-dp-strict") or "").lower() in ("1", "true", "yes")
    if not book.count and not strict:
        return None
    ctx = RuleContext(req, read_turn(req))
    hit = book.match(ctx, req.test)
    if hit is None:
        if strict and req.route.reader is not None and w.server.recorder is None:  # recording: a miss is recorded
            near = book.nearest(ctx, req.test)
            req.rule = "miss: " + ("; ".join(near) if near else "no rules")
            raise HTTPError(400, "dpmock strict mode: no rule matched this request%s" % (
                "; nearest: " + "; ".join(near) if near else " (no rules are loaded)"), "no_rule_matched")
        return None
    rule, answer, groups = hit
    req.rule = rule.id
    req.source = "replayed" if "raw" in answer else "rule"
    if "raw" not in answer:  # a recorded answer is served byte for byte: no {{template}} in it is filled
        answer = render(answer, ctx, groups)
    err = answer.get("error")
    if err is not None:
        raise HTTPError(err["status"], err.get("message") or "error from rule %s" % rule.id, err.get("code"),
                        etype=err.get("type"))
    return answer


################################################################################
# Record and replay: answers forwarded upstream, saved as rules, served back byte for byte
################################################################################

#: Request headers never forwarded: hop-by-hop (RFC 9110 7.6.1) and framing, which http.client redoes.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                         "upgrade", "host", "content-length", "expect", "accept-encoding", "proxy-authorization",
                         "proxy-authenticate"))
#: Answer headers the writer makes itself, so the upstream's are not relayed.
_WRITER_HEADERS = frozenset(("date", "server", "content-type", "content-length"))
#: The only answer headers a recording keeps: request ids, dates, cookies and organisation names never.
RECORDED_HEADERS = ("content-type", "content-encoding", "retry-after", "retry-after-ms")
#: Ids a recording normalises: values of these keys that start with one of these prefixes, and any
#: value of the _ALWAYS_IDS keys (Gemini's responseId has no prefix).
_ID_KEYS = ("id", "tool_call_id", "tool_use_id", "previous_response_id", "item_id")
_ALWAYS_IDS = ("responseId", "response_id", "request_id")
ID_PREFIXES = ("chatcmpl-", "cmpl-", "modr-", "msg_", "resp_", "rs_", "fc_", "toolu_", "srvtoolu_", "call_", "req_")
RECORDED_TIME, RECORDED_STAMP = 1700000000, "2023-11-14T22:13:20Z"  #: what times become in a recording
REDACTED = "[REDACTED]"
_SECRET_MIN = 4  #: shorter key values are not searched for (every "a" would go)
RECORD_BODY_MATCH = 4096  #: a route without a conversation matches its whole JSON body up to this size
_RECORD_RES = {
    "id": r'"(%s)"\s*:\s*"([^"\\]+)"' % "|".join(_ID_KEYS + _ALWAYS_IDS),
    "time": r'("(?:created|created_at|completed_at)"\s*:\s*)\d+(?:\.\d+)?',
    "stamp": r'("(?:createTime|updateTime|expirationTime)"\s*:\s*")[^"\\]*(")',
}


def _record_re(name):
    """A normalisation pattern, compiled on first use (never at start-up)."""
    key = "record_" + name
    pattern = _compiled.get(key)
    if pattern is None:
        pattern = _compiled[key] = (re.compile(rb"\r\n\r\n|\n\n|\r\r") if name == "sse_end"
                                    else re.compile(_RECORD_RES[name]))
    return pattern


class Recorder:
    """--record: forward what no rule answers to the provider's upstream, relay the answer as it
    arrives, and save it as a rule in DIR/TEST.json (written aside and renamed, under a lock: a
    recording is whole or absent, never half-written, even when the client leaves mid-stream)."""

    MAX_WHOLE = 64 * scenarios.MIB  #: a whole upstream answer larger than this is refused (502)
    MAX_RECORDING = 16 * scenarios.MIB  #: a streamed answer larger than this is relayed, not recorded

    def __init__(self, config, log, out=None):
        self.config, self.log, self.out = config, log, out
        self.dir = config.record
        self.upstreams = {p: split_url(u) for p, u in config.upstreams.items()}
        self.redact = [re.compile(p) for p in config.record_redact]
        self.lock = threading.Lock()
        self.reload = None  #: an Event set after each recording (the rules watcher re-reads the files)
        self.via = "1.1 dpmock-" + os.urandom(6).hex()  #: sent upstream; seen again, it is a forwarding loop
        self._tmp = itertools.count(1)
        self._tls = None
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise StartError("cannot make the --record folder %s: %s" % (self.dir, e.strerror))
        if config.upstream_ca:  # a bad bundle stops the start, not the first request
            self.tls_context()

    def tls_context(self):
        """Verified TLS (host name and chain) against --upstream-ca, else the system's trust store."""
        if self._tls is None:
            import ssl
            try:
                ctx = ssl.create_default_context(cafile=self.config.upstream_ca)
            except (OSError, ssl.SSLError) as e:
                raise StartError("cannot load --upstream-ca %s: %s" % (self.config.upstream_ca,
                                                                        getattr(e, "strerror", None) or e))
            ctx.set_alpn_protocols(["http/1.1"])
            self._tls = ctx
        return self._tls

    # ---------------------------------------------------------------- forwarding

    def forward(self, w, req, body):
        """Step 7b of dispatch: send the request upstream, relay the answer, record it when it may be."""
        if any(self.via in v for v in req.headers.all("via")):
            raise HTTPError(508, "dpmock --record: this request came back from dpmock's own upstream (a forwarding "
                                 "loop): --upstream must name another server", "forwarding_loop")
        turn = read_turn(req)  # a missing or bad key, or a body dpmock refuses, is refused here as ever
        if body is None and req.route.body == BODY_STREAM:
            body = read_json_body(req)  # an upload is forwarded whole (up to MAX_JSON_BODY)
        up = self.upstreams[req.provider]
        conn = self.connection(up)
        try:
            t0 = time.monotonic()
            resp = self.send(conn, up, req, body)
            head_t = time.monotonic() - t0
            keep = (resp.status < 400 or self.config.record_errors) and req.method != "HEAD"  # HEAD: no body
            ctype = resp.getheader("content-type") or "application/octet-stream"
            items = resp.getheaders()
            req.source = "upstream"
            self.log.debug("record: %s %s -> %s: %d", req.method, req.path, up.url, resp.status)
            if resp.chunked or resp.length is None:
                events = self.relay_stream(w, req, resp, ctype, items, keep)
                if events is not None:
                    self.save(req, turn, up, recorded_answer(resp.status, items, head_t, events=events))
                w.end_stream()
                return
            data = self.read_whole(req, resp, up)
            if keep:
                self.save(req, turn, up, recorded_answer(resp.status, items, head_t, body=data))
            w.extra_headers = ()  # the upstream's request ids reach the client, not dpmock's
            w.send_bytes(resp.status, data, ctype, relay_headers(items))
        finally:
            conn.close()

    def connection(self, up):
        import http.client
        if up.scheme == "http":
            return http.client.HTTPConnection(up.host, up.port, timeout=self.config.io_timeout)
        return http.client.HTTPSConnection(up.host, up.port, timeout=self.config.io_timeout,
                                           context=self.tls_context())

    def send(self, conn, up, req, body):
        """The request, as the client sent it, to the upstream; its answer's head. 502 or 504 when it fails."""
        import http.client
        try:
            conn.putrequest(req.method, upstream_target(req, up), skip_host=True, skip_accept_encoding=True)
            for k, v in forward_headers(req, up, body, self.via):
                conn.putheader(k, v)
            conn.endheaders(body)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise self.upstream_error(req, up, e, "cannot be reached")

    def upstream_error(self, req, up, e, what):
        """The HTTPError (502, or 504 for a timeout) that says which upstream failed, and how."""
        timeout = isinstance(e, (socket.timeout, TimeoutError))
        if timeout:
            reason = "no answer within --io-timeout %ds" % self.config.io_timeout
        elif getattr(e, "verify_message", None):
            reason = "certificate verify failed: %s (--upstream-ca names the CA bundle to trust)" % e.verify_message
        else:
            reason = getattr(e, "strerror", None) or str(e) or "closed"
        message = "dpmock --record: the %s upstream %s %s: %s: %s" % (req.provider, up.url, what,
                                                                      type(e).__name__, reason)
        self.log.error("%s (%s %s)", message, req.method, req.path)
        return HTTPError(504 if timeout else 502, message, "upstream_timeout" if timeout else "upstream_unreachable")

    def read_whole(self, req, resp, up):
        import http.client
        if resp.length > self.MAX_WHOLE:
            raise HTTPError(502, "dpmock --record: the %s upstream's answer of %d bytes is over the %d byte limit"
                            % (req.provider, resp.length, self.MAX_WHOLE), "upstream_too_large")
        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise self.upstream_error(req, up, e, "cut its answer off")

    def relay_stream(self, w, req, resp, ctype, items, keep):
        """Relay a streamed answer piece by piece as it arrives; its events, or None when not recorded."""
        import http.client
        w.extra_headers = ()
        w.start_stream(resp.status, ctype, relay_headers(items, stream=True))
        events = EventSplitter("event-stream" in ctype.lower()) if keep else None
        start, size = time.monotonic(), 0
        while True:
            try:
                piece = resp.read1(PIECE)
            except (OSError, http.client.HTTPException) as e:
                self.log.error("record: the %s upstream ended %s %s mid-stream (%s): relayed cut, not recorded",
                               req.provider, req.method, req.path, type(e).__name__)
                w.abort("fin")
            if not piece:
                break
            w.send_chunk(piece)  # a client that leaves raises here: nothing is recorded
            if events is not None:
                size += len(piece)
                if size > self.MAX_RECORDING:
                    self.log.error("record: %s %s: stream over %d bytes, relayed, not recorded",
                                   req.method, req.path, self.MAX_RECORDING)
                    events = None
                else:
                    events.feed(piece, time.monotonic() - start)
        return events.finish() if events is not None else None

    # ---------------------------------------------------------------- saving

    def save(self, req, turn, up, raw):
        """Normalise and redact an answer, save it as a rule; a failure is logged, the answer still relayed."""
        secrets = request_secrets(req)
        scrub = lambda value: scrub_value(value, secrets, self.redact)  # noqa: E731
        match = recorded_match(req, turn, scrub)
        rid = "rec-" + _digest(json.dumps([req.test, match], sort_keys=True, ensure_ascii=False))[:12]
        norm = Normaliser(rid)
        if "body" in raw:
            raw["body"] = scrub(norm.text(raw["body"]))
        elif "body_base64" in raw:
            raw["body_base64"] = b64(scrub_bytes(binascii.a2b_base64(raw["body_base64"]), secrets))
        for ev in raw.get("events", ()):
            if "data" in ev:
                ev["data"] = scrub(norm.text(ev["data"]))
            else:
                ev["data_base64"] = b64(scrub_bytes(binascii.a2b_base64(ev["data_base64"]), secrets))
        raw["headers"] = scrub(raw["headers"])
        origin = {"method": req.method, "path": req.path, "upstream": up.url, "status": raw["status"]}
        query = "&".join(p for p in req.query_string.split("&") if p and percent_decode(p.partition("=")[0], True)
                         != "key")
        if query:
            origin["query"] = query
        spec = {"id": rid, "match": match, "respond": {"raw": raw}, "recorded": scrub(origin)}
        try:
            Rule(spec, 0)  # what is written must load as a rule
            text = json.dumps(spec, ensure_ascii=False)
            if any(s in text for s in secrets):
                raise ValueError("a key would reach the recording")
            path = self.write(req.test, spec)
        except (OSError, ValueError) as e:
            self.log.error("record: %s %s not recorded: %s", req.method, req.path,
                           getattr(e, "strerror", None) or e)
            return
        req.rule, req.source = rid, "recorded"
        line = "recorded %s %s -> %s (rule %s)" % (req.method, req.path, path, rid)
        self.log.info("%s", line)
        if self.out is not None:
            try:
                with self.lock:
                    self.out.write(line + "\n")
                    self.out.flush()
            except (OSError, ValueError):  # nobody reads the record command's output any more
                self.out = None
        if self.reload is not None:
            self.reload.set()

    def write(self, test, spec):
        """Put a rule into its test's file (replacing the rule with its id): written aside, then renamed."""
        name = (test or "default") + ".json"
        path = os.path.join(self.dir, name)
        with self.lock:
            rules = []
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
                held = doc.get("test") if isinstance(doc, dict) and "rules" in doc else None
                rules = doc["rules"] if isinstance(doc, dict) and "rules" in doc else doc
                if held != test or not isinstance(rules, list):
                    raise ValueError("%s holds %s, not the recordings of %s" % (
                        path, "test %r" % held if held else "something else", "test %r" % test if test else
                        "every test"))
            for i, r in enumerate(rules):
                if isinstance(r, dict) and r.get("id") == spec["id"]:
                    rules[i] = spec
                    break
            else:
                rules.append(spec)
            doc = dict({"test": test} if test else {}, rules=rules)
            tmp = os.path.join(self.dir, ".%s.%d.%d.tmp" % (name, os.getpid(), next(self._tmp)))
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        return path


def _digest(text):
    import hashlib
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def upstream_target(req, up):
    """The upstream path: the client's, under the upstream's base path, with the provider's version
    (/v1, Gemini's /v1beta) when the client sent a bare one; the query as it came."""
    path = req.path
    upload = path.startswith("/upload/")
    parts = path.split("/")
    if (parts[2] if upload and len(parts) > 2 else parts[1]) not in _VERSIONS:
        version = "/v1beta" if req.provider == GEMINI else "/v1"
        path = "/upload" + version + path[7:] if upload else version + path
    return up.base + path + ("?" + req.query_string if req.query_string else "")


def _connection_tokens(values):
    return {t.strip().lower() for v in values for t in v.split(",")}


def forward_headers(req, up, body, via):
    """The client's headers (its key too), minus hop-by-hop ones and dpmock's own X-DP-*; the upstream's Host,
    identity encoding (bodies stay readable for the recording), the body's length, and dpmock in Via."""
    named = _connection_tokens(req.headers.all("connection"))
    out = [("Host", up.netloc)]
    for k, v in req.headers.items:
        low = k.lower()
        if low not in _HOP_BY_HOP and low not in named and not low.startswith(("x-dp-", "proxy-")) and low != "via":
            out.append((k, v))
    out.append(("Via", ", ".join(req.headers.all("via") + [via])))
    out.append(("Accept-Encoding", "identity"))
    if body is not None:
        out.append(("Content-Length", str(len(body))))
    return out


def relay_headers(items, stream=False):
    """The upstream answer's headers that go on to the client (the writer adds framing, Date and Server)."""
    drop = _HOP_BY_HOP | _WRITER_HEADERS | _connection_tokens(v for k, v in items if k.lower() == "connection")
    return [(k, v) for k, v in items if k.lower() not in drop and not (stream and k.lower() == "cache-control")]


def recorded_answer(status, items, head_t, body=None, events=None):
    """An upstream answer as respond.raw: status, the RECORDED_HEADERS, and its body or events."""
    headers = {}
    for k, v in items:
        if k.lower() in RECORDED_HEADERS:
            headers.setdefault(k.lower(), v)
    raw = {"status": status, "headers": headers, "t": round(head_t, 3)}
    if events is not None:
        raw["events"] = events
    else:
        try:
            raw["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            raw["body_base64"] = b64(body)
    return raw


class EventSplitter:
    """A streamed answer cut into recorded events as it arrives: an SSE stream at its blank lines
    (each event whole), anything else as the pieces came; together, every byte in order."""

    def __init__(self, sse):
        self.sse, self.buf, self.events = sse, b"", []

    def feed(self, piece, t):
        self.buf += piece
        if self.sse:
            end = 0
            for m in _record_re("sse_end").finditer(self.buf):
                self.add(self.buf[end:m.end()], t)
                end = m.end()
            self.buf = self.buf[end:]
        else:
            cut = _utf8_complete(self.buf)  # a character split between pieces waits for its end
            if cut:
                self.add(self.buf[:cut], t)
                self.buf = self.buf[cut:]

    def add(self, data, t):
        try:
            self.events.append({"t": round(t, 3), "data": data.decode("utf-8")})
        except UnicodeDecodeError:
            self.events.append({"t": round(t, 3), "data_base64": b64(data)})

    def finish(self):
        if self.buf:
            self.add(self.buf, self.events[-1]["t"] if self.events else 0.0)
        return self.events


def _utf8_complete(data):
    """How many leading bytes of ``data`` end on a UTF-8 character boundary."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # the last character's first byte
            need = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return len(data) - back if need > back else len(data)
    return len(data)


class Normaliser:
    """Stable ids and times for one recording, so a re-recording diffs cleanly: each id becomes its
    prefix + rec + the rule's digest + a count, the same id the same placeholder everywhere in it."""

    def __init__(self, rule_id):
        self.tag = rule_id[4:12]
        self.ids = {}

    def text(self, text):
        if '"' not in text:
            return text
        for key, value in _record_re("id").findall(text):
            if value not in self.ids and (key in _ALWAYS_IDS or value.startswith(ID_PREFIXES)):
                prefix = next((p for p in ID_PREFIXES if value.startswith(p)), "")
                self.ids[value] = "%srec%s%02d" % (prefix, self.tag, len(self.ids) + 1)
        for value, placeholder in self.ids.items():
            text = text.replace('"%s"' % value, '"%s"' % placeholder)
        text = _record_re("time").sub(r"\g<1>%d" % RECORDED_TIME, text)
        return _record_re("stamp").sub(r"\g<1>%s\g<2>" % RECORDED_STAMP, text)


def request_secrets(req):
    """Every key the request carries (headers, ?key=), longest first: none may reach a recording."""
    found = set()
    for name in _SECRET_HEADERS + ("api-key",):
        for value in req.headers.all(name):
            found.update((value.strip(), _bearer(value.strip())))
    found.update(v.strip() for v in req.query.get("key", ()))
    return sorted((s for s in found if len(s) >= _SECRET_MIN), key=len, reverse=True)


def scrub_value(value, secrets, patterns):
    """Every string in ``value`` with the keys and the --record-redact matches replaced by [REDACTED]."""
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
        for p in patterns:
            value = p.sub(REDACTED, value)
        return value
    if isinstance(value, list):
        return [scrub_value(v, secrets, patterns) for v in value]
    if isinstance(value, dict):
        return {k: scrub_value(v, secrets, patterns) for k, v in value.items()}
    return value


def scrub_bytes(data, secrets):
    for s in secrets:
        data = data.replace(s.encode("utf-8"), REDACTED.encode("ascii"))
    return data


def recorded_match(req, turn, scrub):
    """A recorded rule's match, from the request: provider, route, model, the exact last user text, turn
    and tool result (or a small body, whole, on routes without a conversation), stream and query."""
    route = req.route
    match = {"provider": req.provider, "route": route.name}
    model = turn.model if turn is not None else req.params.get("model") or _get(req.json, "model")
    if isinstance(model, str) and model:
        match["model"] = "".join("[%s]" % c if c in "*?[" else c for c in model)  # a glob: matched exactly
    if turn is not None:
        text = scrub(turn.user_text)
        if text == turn.user_text:
            match["text_exact"] = text
        else:  # redacted: the rest of the text still has to match, exactly
            match["text_regex"] = r"(?s)\A%s\Z" % ".+?".join(re.escape(p) for p in text.split(REDACTED))
        match["turn"] = turn.user_turns
        match["tool_result"] = turn.tool_result[0] if turn.tool_result else False
    elif isinstance(req.json, dict) and req.body_bytes <= RECORD_BODY_MATCH and scrub(req.json) == req.json:
        match["body"] = {"": req.json}
    if route.stream == STREAM_FLAG:
        match["stream"] = route.streaming(req)
    query = {k: v[0] for k, v in req.query.items() if k != "key"}
    if req.provider == GEMINI and route.stream != STREAM_NEVER:
        query.setdefault("alt", None)  # alt=sse and the JSON array are two answers
    if query:
        match["query"] = scrub(query)
    return match


def check_raw(raw, where):
    """Refuse a recorded answer (respond.raw) that cannot be served, naming the field."""
    if not isinstance(raw, dict):
        raise RuleError("%s must be an object: status, headers, and body, body_base64 or events" % where)
    unknown = set(raw) - {"status", "headers", "t", "body", "body_base64", "events"}
    if unknown:
        raise RuleError("unknown field %s.%s; a recorded answer has status, headers, t, and body, body_base64 or "
                        "events" % (where, sorted(unknown)[0]))
    status = raw.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599 or status in (204, 304):
        raise RuleError("%s.status must be a status code from 200 to 599 (one with a body)" % where)
    headers = raw.get("headers", {})
    if not isinstance(headers, dict):
        raise RuleError("%s.headers must be an object: name -> value" % where)
    for k, v in headers.items():
        if not k or not _TOKEN_CHARS.issuperset(k.encode("latin-1", "replace")) or not isinstance(v, str) \
                or any(c in _CTL.decode("latin-1") for c in v):
            raise RuleError("%s.headers[%r] must be a header name with a one-line text value" % (where, k[:40]))
        if k.lower() in _HOP_BY_HOP | _WRITER_HEADERS - {"content-type"}:
            raise RuleError("%s.headers may not set %s: dpmock frames the answer itself" % (where, k))
    bodies = [k for k in ("body", "body_base64", "events") if k in raw]
    if len(bodies) != 1:
        raise RuleError("%s needs exactly one of body, body_base64 and events" % where)
    if "t" in raw:
        _check_seconds(raw["t"], where + ".t")
    if "body" in raw and not isinstance(raw["body"], str):
        raise RuleError("%s.body must be a string (body_base64 for bytes)" % where)
    if "body_base64" in raw:
        _check_base64(raw["body_base64"], where + ".body_base64")
    events = raw.get("events", [])
    if not isinstance(events, list):
        raise RuleError("%s.events must be a list of {t, data}" % where)
    for i, ev in enumerate(events):
        at = "%s.events[%d]" % (where, i)
        if not isinstance(ev, dict) or set(ev) - {"t", "data", "data_base64"} or \
                len([k for k in ("data", "data_base64") if k in ev]) != 1:
            raise RuleError("%s must be {t, data} or {t, data_base64}" % at)
        _check_seconds(ev.get("t"), at + ".t")
        if "data" in ev and not isinstance(ev["data"], str):
            raise RuleError("%s.data must be a string: the event's bytes as text" % at)
        if "data_base64" in ev:
            _check_base64(ev["data_base64"], at + ".data_base64")


def _check_seconds(value, where):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 86400:
        raise RuleError("%s must be a number of seconds from 0 to 86400" % where)


def _check_base64(value, where):
    try:
        if not isinstance(value, str):
            raise ValueError
        binascii.a2b_base64(value)
    except (ValueError, binascii.Error):
        raise RuleError("%s must be base64 text" % where)


def sse_parts(text):
    """(data, event name) of one SSE event's text, for the faults that look inside a stream item."""
    data, event = [], None
    for line in text.splitlines():
        if line.startswith("data:"):
            data.append(line[6:] if line[5:6] == " " else line[5:])
        elif line.startswith("event:"):
            event = line[6:].strip()
    return "\n".join(data), event


def send_recorded(w, req, raw):
    """Serve a recorded answer through the writer, byte for byte, so every fault applies to it: a whole
    body in one write, a stream event by event (each one stream item), at the recorded pace if asked."""
    if req.has_body() and not req.body_done:
        req.drain()
    headers = [(k, v) for k, v in raw.get("headers", {}).items() if k.lower() != "content-type"]
    ctype = next((v for k, v in raw.get("headers", {}).items() if k.lower() == "content-type"), scenarios.JSON)
    paced = w.server.config.replay_timing == "recorded"
    if paced:
        w.pause(raw.get("t", 0))
    if "events" not in raw:
        body = raw["body"].encode("utf-8") if "body" in raw else binascii.a2b_base64(raw["body_base64"])
        w.send_bytes(raw["status"], body, ctype, headers)
        return
    sse = "event-stream" in ctype.lower()
    w.json_array = not sse  # Gemini's JSON array: the SSE-only faults leave it alone
    w.start_stream(raw["status"], ctype, headers)
    last = 0.0
    for ev in raw["events"]:
        if paced:
            w.pause(ev["t"] - last)
            last = max(last, ev["t"])
        if "data" not in ev:
            w.send_chunk(binascii.a2b_base64(ev["data_base64"]))
        elif sse:
            w.stream_text(ev["data"], *sse_parts(ev["data"]))
        elif ev["data"].strip(" \t\r\n,[]"):
            w.stream_text(ev["data"], ev["data"].strip(" \t\r\n,[]"))
        else:  # a bare "]" or separator: not an item
            w.send_chunk(ev["data"].encode("utf-8"))
    w.end_stream()


################################################################################
# Dispatch: from a parsed request to its answer, in numbered steps
################################################################################

def dispatch(w, req):
    """Answer one request whose head has been read, through its writer ``w``."""
    conn = w.conn
    # 1. Route: the one function that answers this path (404, or 405 with Allow), in its test namespace.
    try:
        take_test_id(req)
        req.route, req.params = w.server.router.match(req.method, req.path)
    except HTTPError as e:
        refuse_body(w, req, e)
        raise
    route = req.route
    # 2. Provider: from the route, or told from the request on shared paths; its headers go on every answer.
    req.provider = route.provider if route.provider != SHARED else detect_provider(req)
    if route.provider != DPMOCK:
        w.request_id = new_id("req_", 12)
        w.extra_headers = PROVIDERS[req.provider].answer_headers(w.request_id)
    elif route.name.startswith("control_"):
        check_control_access(req, conn.client_address, w.server.config)
    # 3. Framing: a route with a body needs to know where the body ends.
    if route.body != BODY_NONE and req.length is None and not req.chunked:
        conn.close_connection = True  # whatever follows can't be told apart from a body
        raise HTTPError(411, "%s %s needs a request body with Content-Length or chunked encoding"
                        % (req.method, req.path), "length_required")
    # 4. Scenario: a fault, a fixed answer, or nothing (the provider's ordinary answer).
    value, params = None, {}
    if route.provider != DPMOCK:
        try:
            value, params = choose_scenario(w, req)
        except HTTPError as e:
            refuse_body(w, req, e)
            raise
    fault = FAULTS[value.kind] if isinstance(value, scenarios.Fault) else None
    # 5. Answers from the head alone (the body is never read), and Expect: 100-continue.
    expect = req.headers.get("expect")
    if expect is not None and expect.lower() != "100-continue":
        refuse_body(w, req, None)
        raise HTTPError(417, "unsupported Expect %r" % expect[:40], "expectation_failed")
    if fault is not None and fault.early(w, req, params):
        return
    if isinstance(value, Upload) and value.max_bytes is not None and (req.length or 0) > value.max_bytes:
        w.send_reply(value.too_large, close=True)
        if expect is None:
            w.linger()
        return
    if route.body == BODY_JSON and req.length is not None and req.length > MAX_JSON_BODY:
        refuse_body(w, req, None)
        raise HTTPError(413, "request body of %d bytes is over the %d byte limit" % (req.length, MAX_JSON_BODY),
                        "request_too_large", close=True)
    if expect is not None and req.version == "HTTP/1.1" and req.has_body() and (fault is None or fault.sends_100):
        conn.handle_expect_100()
    # 6. Body: JSON is read and parsed here (its bytes kept, for --record); BODY_STREAM bodies are the handler's.
    body = None
    if route.body == BODY_JSON:
        conn.idle = True  # a client stalled mid-body does not hold up a stop
        try:
            body = read_json_body(req)
            req.json = parse_json_body(body)
        finally:
            conn.idle = False
    elif route.body == BODY_NONE:
        refuse_body(w, req, None)
    conn.journal_entry(w)  # the request is in the journal from here on, even while a fault holds it
    # 7. Rules: the first matching rule's answer, error or scenario (strict mode: a miss is an error).
    #    A scenario's fixed answer, asked for by the request itself, comes before any rule.
    if route.provider != DPMOCK and (value is None or fault is not None):
        answer = apply_rules(w, req)
        if answer is not None:
            req.answer = answer
            if "scenario" in answer:
                value, params = scenario_for(w, req, answer["scenario"], *scenarios.resolve(answer["scenario"]))
                fault = FAULTS[value.kind] if isinstance(value, scenarios.Fault) else None
    # 7b. Record: with --record, a request no rule answered and that selects no scenario goes upstream;
    # its answer is relayed as it arrives and saved as a rule. (A chosen scenario is dpmock's to answer.)
    if req.answer is None and req.scenario is None and w.server.recorder is not None and route.provider != DPMOCK:
        return w.server.recorder.forward(w, req, body)
    # 8. A fault shapes the ordinary answer; a fixed scenario answer replaces it.
    if fault is not None:
        if (fault.streams_only and not route.streaming(req)) or (req.method == "HEAD" and fault.breaks_body):
            fault = None  # this fault leaves this answer alone
        else:
            w.fault = (fault, params)
            fault.before(w, req, params)
    elif value is not None:
        req.source = None  # the scenario's answer, not the rule's
        return answer_scenario(w, req, value, params)
    # 9. The route's handler, or a recorded answer (byte for byte, every fault applying to it).
    if req.answer is not None and "raw" in req.answer:
        return send_recorded(w, req, req.answer["raw"])
    route.handler(w, req)
    if req.has_body() and not req.body_done:
        conn.close_connection = True  # the handler answered without reading the body


def take_test_id(req):
    """The test namespace: a /_t/NAME/ path prefix (for clients that can only set a base URL), else
    an X-DP-Test-Id header. Each test's rules, counters and journal entries are its own."""
    if req.path.startswith("/_t/"):
        name, _, rest = req.path[4:].partition("/")
        req.path = "/" + rest
    else:
        name = req.headers.get("x-dp-test-id")
    if name is not None:
        try:
            req.test = check_test_id(name)
        except RuleError as e:
            raise HTTPError(400, str(e), "bad_test_id")


def read_turn(req):
    """The conversation of a route that has one (read once; handlers reuse it)."""
    if req.turn is None and req.route.reader is not None and req.json is not None:
        check_key(req)  # a missing or bad key is refused before the body's fields are judged
        req.turn = req.route.reader(req)
    return req.turn


def check_control_access(req, client, config):
    """Control routes answer loopback peers (and --control-from networks) only, and never carry
    out a state change that a browser page of another origin asked for: 403 otherwise."""
    import ipaddress  # first control request only: off the start-up path
    try:
        peer = ipaddress.ip_address(client[0].split("%")[0]) if isinstance(client, tuple) else None
    except ValueError:
        peer = None
    if peer is not None and peer.version == 6 and peer.ipv4_mapped:
        peer = peer.ipv4_mapped
    allowed = peer is not None and (peer.is_loopback or any(peer in net for net in config.control_from))
    if allowed and peer.is_loopback and not _local_host(req.headers.get("host") or ""):
        raise HTTPError(403, "control routes answer requests addressed to this machine only (Host: localhost or a "
                             "loopback address), not %r: a page of another site may be behind that name"
                        % (req.headers.get("host") or "")[:60], "control_forbidden", etype="permission_error")
    if not allowed:
        raise HTTPError(403, "control routes answer loopback clients only (start dpmock with --control-from CIDR "
                             "to allow %s)" % (client[0] if isinstance(client, tuple) else "this client"),
                        "control_forbidden", etype="permission_error")
    if req.method in ("GET", "HEAD"):
        return
    site = (req.headers.get("sec-fetch-site") or "").lower()
    origin = req.headers.get("origin")
    if site in ("cross-site", "same-site") or (origin is not None and not _same_origin(origin, req)):
        raise HTTPError(403, "a browser page of another origin may not use %s" % req.path, "control_forbidden",
                        etype="permission_error")


def _local_host(host):
    """Whether a Host header names this machine by a loopback name or address (DNS rebinding guard)."""
    import ipaddress
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.endswith("]") or "]:" in host else host
    name = name.strip("[]").lower()
    if not name or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _same_origin(origin, req):
    """Whether an Origin header names this server, as the client addressed it."""
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme == req.scheme and rest.rstrip("/") == (req.headers.get("host") or "")


def choose_scenario(w, req):
    """(answer, params) of the scenario selected for this route (schedules stepped), or (None, {})."""
    spec, scenario, params = select_scenario(req)
    if scenario is None:
        return None, {}
    return scenario_for(w, req, spec, scenario, params)


def scenario_for(w, req, spec, scenario, params):
    """(answer, params) of a scenario on this request's route; a schedule counts per test and key."""
    req.scenario = spec
    if scenario.group == "schedule":
        name, seed = w.server.schedules.step((req.test or "", request_key(req) or ""), spec, scenario.answer.kind,
                                             params)
        if seed is not None:
            w.extra_headers = list(w.extra_headers) + [("x-dp-seed", str(seed))]
        if name is None:
            return None, {}
        scenario, params = scenarios.resolve(name)
    return scenario_answer(scenario, req.route, req.provider), params


def answer_scenario(w, req, value, params):
    """Send a fixed scenario answer: a Reply, a Stream, an Upload rule or a provider-shaped error."""
    if isinstance(value, Upload):
        n = 0
        for piece in req.body_pieces():
            n += len(piece)
            if value.max_bytes is not None and n > value.max_bytes:
                w.send_reply(value.too_large, close=True)
                w.linger()
                raise Answered("ok")
        value = scenarios.upload_reply(value, n)
    elif req.route.body == BODY_STREAM:
        req.drain()
    if isinstance(value, scenarios.ProviderError):
        value = provider_error(w, value, params)
    if isinstance(value, Stream):
        w.send_stream(value)
    else:
        w.send_reply(value)


def provider_error(w, pe, params):
    """A ProviderError scenario as this provider's Reply (a proxy page when it has one)."""
    provider = PROVIDERS[w.req.provider]
    status = pe.status if isinstance(pe.status, int) else pe.status[w.req.provider]
    if pe.html:
        return Reply(status, pe.html, scenarios.HTML)
    headers, details = provider.rate_limit(params["retry_after"]) if "retry_after" in params else ([], None)
    return w.error_reply(provider.scenario_error(pe, status, headers, details))


def refuse_body(w, req, err):
    """Before answering without the body: drain a small one so the connection stays usable, else close."""
    if not req.has_body() or req.body_done:
        return
    if req.headers.get("expect") is None and not req.chunked and req.length <= MAX_DISCARD:
        req.drain()
    else:
        w.conn.close_connection = True
        if err is not None:
            err.close = True


def read_json_body(req):
    data = bytearray()
    for piece in req.body_pieces(MAX_JSON_BODY):
        data += piece
    return bytes(data)


MAX_JSON_VALUES = 2000000  #: values (arrays, objects, scalars) one JSON body may hold: bounds its memory
_JSON_STRINGS = r'"(?:[^"\\]|\\.)*"'


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def _decoder():
    """The request-body JSON decoder (made once: json.loads with options builds one per call)."""
    d = _compiled.get("json")
    if d is None:
        d = _compiled["json"] = json.JSONDecoder(parse_constant=_no_constant)
    return d


def json_values(text):
    """An upper bound on the number of values in a JSON text: commas and brackets outside strings."""
    bare = re.sub(_JSON_STRINGS, "", text) if '"' in text else text
    return bare.count(",") + bare.count("[") + bare.count("{") + 1


def parse_json_body(body):
    """Decode a JSON object body or raise HTTPError 400 naming the problem."""
    if not body:
        raise HTTPError(400, "request body is empty; expected a JSON object", "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPError(400, "request body is not valid JSON: not UTF-8 (byte 0x%02x at offset %d)"
                        % (body[e.start], e.start), "invalid_json")
    if len(text) > MAX_JSON_VALUES and json_values(text) > MAX_JSON_VALUES:  # shorter texts can't hold more
        raise HTTPError(413, "request body holds more than %d JSON values" % MAX_JSON_VALUES, "request_too_large")
    try:
        value = _decoder().decode(text)
    except ValueError as e:
        raise HTTPError(400, "request body is not valid JSON: %s" % e, "invalid_json")
    except RecursionError:
        raise HTTPError(400, "request body is not valid JSON: nested too deeply", "invalid_json")
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
    """A thread-safe line logger writing to one stream (or nowhere).

    Access lines are queued and written by one flusher thread a moment later (a request
    never waits on a log write, nor on a lock); errors are written at once.
    """

    FLUSH_DELAY = 0.05  #: seconds a queued line may wait before it is written

    def __init__(self, stream, verbosity):
        self.stream, self.verbosity = stream, verbosity
        self.lock = threading.Lock()
        self.queue = []  #: lines not yet written (list.append is atomic)
        self.kick = threading.Event()
        self.flusher = None
        self._stamp = (0, "")

    def enabled(self, level):
        return self.stream is not None and self.verbosity >= level

    def _line(self, fmt, args):
        now = int(time.time())
        if self._stamp[0] != now:
            self._stamp = (now, "%s dpmock[%d] " % (time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
                                                    os.getpid()))
        return self._stamp[1] + (fmt % args if args else fmt) + "\n"

    def _queue(self, line):
        self.queue.append(line)
        if not self.kick.is_set():
            if self.flusher is None:
                self._start_flusher()
            self.kick.set()

    def _start_flusher(self):
        with self.lock:
            if self.flusher is None:
                self.flusher = threading.Thread(target=self._flush_loop, name="dpmock-log", daemon=True)
                self.flusher.start()

    def _flush_loop(self):
        while True:
            self.kick.wait()
            time.sleep(self.FLUSH_DELAY)
            self.kick.clear()
            self.flush()

    def flush(self):
        """Write every queued line now."""
        with self.lock:
            n = len(self.queue)
            lines = self.queue[:n]
            del self.queue[:n]  # lines queued meanwhile stay for the next flush
            if lines:
                self._emit("".join(lines))

    def _emit(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def error(self, fmt, *args):
        if self.enabled(0):
            line = self._line(fmt, args)
            self.flush()
            with self.lock:
                self._emit(line)

    def info(self, fmt, *args):
        if self.enabled(1):
            self._queue(self._line(fmt, args))

    def debug(self, fmt, *args):
        if self.enabled(2):
            self._queue(self._line(fmt, args))


################################################################################
# State: the journal, schedule counters, files and stored responses, shared by every connection
################################################################################

class JournalEntry:
    """One request as the journal keeps it, raw: formatting waits until someone reads it."""

    __slots__ = ("seq", "time", "client", "method", "path", "query", "headers", "body", "body_bytes", "route",
                 "scenario", "status", "bytes_sent", "duration_ms", "reused", "ended", "test", "rule", "source")

    def __init__(self, client, req, reused):
        self.seq = 0
        self.time = time.time()
        self.client = client
        self.method, self.path, self.query = req.method, req.path, req.query_string
        self.headers = tuple(req.headers.items)
        self.body, self.body_bytes = bytes(req.captured), req.body_bytes
        self.route, self.scenario = req.route, req.scenario
        self.status, self.bytes_sent, self.duration_ms = None, 0, 0.0
        self.reused = reused
        self.ended = "pending"  #: until the answer is over
        self.test = req.test
        self.rule = self.source = None


class _Waiter:
    """A long-poll on the journal: it sees each new entry once, and wakes when it has enough."""

    __slots__ = ("filters", "want", "found", "event")

    def __init__(self, filters, want):
        self.filters, self.want, self.found = filters, want, []
        self.event = threading.Event()

    def offer(self, entry):
        if entry_matches(entry, self.filters):
            self.found.append(entry)
            if len(self.found) >= self.want:
                self.event.set()


class Journal:
    """The last N requests (a ring), for tests to assert on what a client sent.

    Entries get their ``seq`` and join the ring under one lock, in order, so an answer's
    ``last_seq`` never names an entry that a later ``since`` query could miss. A long-poll
    scans the ring once, then is offered each new entry (O(1) per waiter per request) and
    sleeps on its own event in between: idle waiters cost nothing.
    """

    def __init__(self, size):
        import collections
        self.entries = collections.deque(maxlen=size)
        self.size = size
        self.lock = threading.Lock()
        self.seq = 0  #: the last sequence number given out
        self.waiters = []

    def add(self, entry):
        with self.lock:
            self.seq += 1
            entry.seq = self.seq
            if self.size:
                self.entries.append(entry)
            for waiter in self.waiters:
                waiter.offer(entry)
        return entry

    def complete(self, entry):
        """The answer is over: waiters whose filters only its end can satisfy (rule, scenario) see it now."""
        if self.waiters:
            with self.lock:
                for waiter in self.waiters:
                    if entry not in waiter.found:
                        waiter.offer(entry)

    def clear(self, test=None):
        """Forget every entry, or those of one test."""
        with self.lock:
            n = len(self.entries)
            if test is None:
                self.entries.clear()
                return n
            kept = [e for e in self.entries if e.test != test]
            self.entries.clear()
            self.entries.extend(kept)
        return n - len(kept)

    def wait(self, filters, since, want, timeout, stop_event):
        """(matching entries, last_seq, timed out?): at once, or once ``want`` match, or at the timeout or a stop."""
        with self.lock:
            found = [e for e in self.entries if e.seq > since and entry_matches(e, filters)]
            if len(found) >= want or timeout <= 0 or stop_event.is_set():
                return found, self.seq, len(found) < want
            waiter = _Waiter(filters, want - len(found))
            self.waiters.append(waiter)
        try:
            waiter.event.wait(timeout)
        finally:
            with self.lock:
                self.waiters.remove(waiter)
                last = self.seq
        found += waiter.found
        return found, last, len(found) < want

    def wake_all(self):
        """At a stop: every long-poll answers now (no lock: this may run in a signal handler)."""
        for waiter in list(self.waiters):
            waiter.event.set()


def entry_matches(e, filters):
    for name, value in filters.items():
        if name == "path" and value not in e.path:
            return False
        if name == "route" and (e.route.name if e.route else None) != value:
            return False
        if name == "scenario" and (e.scenario or "").split(";")[0].strip() != value:
            return False
        if name == "key" and entry_key(e) != value:
            return False
        if name == "test" and e.test != value:
            return False
        if name == "rule" and e.rule != value:
            return False
        if name == "source" and (e.source or "dpmock") != value:
            return False
    return True


_SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "proxy-authorization", "cookie")


def mask_header(name, value):
    if name.lower() not in _SECRET_HEADERS:
        return value
    scheme, sep, token = value.partition(" ")
    return scheme + sep + mask_key(token) if sep and scheme.lower() in ("bearer", "basic") else mask_key(value)


def mask_query(query):
    """A query string with the value of ``key`` masked, however its name was spelled (``%6Bey``)."""
    out = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and percent_decode(name, True) == "key":
            pair = name + "=" + mask_key(percent_decode(value, True))
        out.append(pair)
    return "&".join(out)


def entry_key(e):
    """The unmasked API key of a journal entry (for the ``key`` filter)."""
    return find_key(Headers(e.headers), e.route, parse_query(e.query))


def public_entry(e):
    """A journal entry as JSON: keys masked, body as text (else base64)."""
    try:
        text, b64_text = e.body.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64_text = None, b64(e.body)
    client = "%s:%s" % e.client[:2] if isinstance(e.client, tuple) else str(e.client)
    return {"seq": e.seq, "time": rfc3339(e.time), "client": client, "method": e.method, "path": e.path,
            "query": mask_query(e.query), "headers": [[k, mask_header(k, v)] for k, v in e.headers], "body": text,
            "body_base64": b64_text, "body_bytes": e.body_bytes, "body_truncated": e.body_bytes > len(e.body),
            "route": e.route.name if e.route else None, "scenario": e.scenario, "status": e.status,
            "bytes_sent": e.bytes_sent, "duration_ms": round(e.duration_ms, 3), "reused": e.reused,
            "ended": e.ended, "test": e.test, "rule": e.rule, "source": e.source or "dpmock"}


class Schedules:
    """Per-key request counters for the schedule scenarios (SCHEDULES: FAIL_FIRST, FAIL_EVERY, ...)."""

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
            if "seed" in params:
                seed = params["seed"] if params["seed"] >= 0 else self.seed
                if c["rng"] is None:
                    import random  # off the start-up path
                    c["rng"] = random.Random(seed)
            verdict = SCHEDULES[kind](i, params, c["rng"])
        if isinstance(verdict, str):
            return verdict, seed
        return (params["fault"] if verdict else None), seed

    def listing(self, test=None):
        with self.lock:
            return [{"test": t or None, "key": mask_key(k) if k else "", "scenario": spec, "requests": c["count"]}
                    for ((t, k), spec), c in self.counters.items() if test is None or t == test]

    def reset(self, test=None):
        with self.lock:
            if test is None:
                self.counters.clear()
            else:
                for name in [n for n in self.counters if n[0][0] == test]:
                    del self.counters[name]


class ThreadStore:
    """Conversations the server holds for Anthropic's threads (``thread: create / continue``), bounded."""

    LIMIT = 1000

    def __init__(self):
        self.lock = threading.Lock()
        self.messages = {}  # message id -> (the conversation up to and including that answer, its size)
        self.size = 0

    BYTES = 64 * scenarios.MIB  #: request bodies held in all, at most (each thread holds its body's messages)

    def put(self, message_id, messages, size):
        with self.lock:
            self.messages[message_id] = (messages, size)
            self.size += size
            while len(self.messages) > self.LIMIT or (self.size > self.BYTES and len(self.messages) > 1):
                self.size -= self.messages.pop(next(iter(self.messages)))[1]

    def get(self, message_id):
        with self.lock:
            found = self.messages.get(message_id)
        return list(found[0]) if found is not None else None


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


class StoredResponse:
    """One stored Responses API answer: the response, its input items, and the conversation so far."""

    __slots__ = ("response", "input", "context", "size")

    def __init__(self, response, items, context, size):
        self.response = response
        self.input = items  #: this request's input items, with their ids
        self.context = context  #: every item a response continuing this one sees first
        self.size = size  #: bytes it holds, counted with its ancestors' (its context shares their items)


class ResponseStore:
    """Responses API answers made with ``store`` (for previous_response_id, GET, input_items): the
    last LIMIT of them, holding at most BYTES, shared by every connection."""

    LIMIT = 1000
    BYTES = 64 * scenarios.MIB

    def __init__(self):
        self.lock = threading.Lock()
        self.records = {}  # response id -> StoredResponse, oldest first
        self.size = 0

    def add(self, record):
        with self.lock:
            self.records[record.response["id"]] = record
            self.size += record.size
            while len(self.records) > self.LIMIT or (self.size > self.BYTES and len(self.records) > 1):
                self.size -= self.records.pop(next(iter(self.records))).size

    def get(self, response_id):
        with self.lock:
            return self.records.get(response_id)

    def remove(self, response_id):
        with self.lock:
            record = self.records.pop(response_id, None)
            if record is not None:
                self.size -= record.size
            return record


################################################################################
# Server: the connection (MockHandler) and the listening server (MockServer)
################################################################################

LINGER_SECONDS = 2.0  #: how long an unread upload is drained after its answer before closing
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


def format_exc():
    """The current exception's traceback (the module loads only when something went wrong)."""
    import traceback
    return traceback.format_exc().rstrip()


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
    signal.signal(signal.SIGHUP, lambda signum, frame: server.reload_rules.set())


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
    server.log.flush()
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
    options = argv[:argv.index("--")]  # the command after "--" runs inside (sandbox_inner)
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
    """Stop the server once it has been idle for --idle-exit seconds or --parent-pid has gone;
    re-read the rules files when one changed (checked every second) or on SIGHUP."""
    ticks = 0
    while not server.stop_event.wait(0.1):
        ticks += 1
        if config.rules and (ticks % 10 == 0 or server.reload_rules.is_set()):
            server.reload_rules.clear()
            try:
                server.rules.reload()
            except Exception:  # a bug must not end this thread (--parent-pid and --idle-exit live here)
                server.log.error("rules: reload failed:\n%s", format_exc())
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


################################################################################
# Main
################################################################################

def main(argv=None, router=None):
    """The command line (``argv``, by default sys.argv's); ``router``: a Router to serve in place of
    ROUTER (the route table plus a team's own routes, say). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_catalogue(ROUTES if router is None else router.routes)
    except StartError as e:
        print("dpmock: cannot start: %s" % e, file=sys.stderr)
        return 1
    if argv[:1] == ["sandbox"]:
        return sandbox_main(argv[1:])
    if argv[:1] == ["_sandbox-inner"]:
        return sandbox_inner(argv[1:])
    recording = argv[:1] == ["record"]
    if recording:  # record DIR [options]: --record DIR in the foreground, one line per recording on stdout
        argv = argv[1:]
        if argv[:1] and not argv[0].startswith("-"):
            argv = ["--record"] + argv
    try:
        config = parse_args(argv)
        if recording and not config.record:
            raise UsageError("dpmock.py record needs a folder: record DIR [options], or --record DIR")
    except UsageError as e:
        print("dpmock.py: error: %s (see --help)" % e, file=sys.stderr)
        return 2
    config.foreground = config.foreground or recording
    config.announce = recording
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
        rules = RuleBook(log, config.rules, config.strict)
        recorder = Recorder(config, log, sys.stdout if config.announce else None) if config.record else None
        if config.port_file:
            write_port_file(config.port_file, socks[0].getsockname()[1])
    except StartError as e:
        if pidfile is not None:
            pidfile.release()
        if ready is not None:
            os.write(ready, ("error %s\n" % e).encode())
            os._exit(1)
        print("dpmock: %s" % e, file=sys.stderr)
        return 1
    server = MockServer(config, listeners, log, restarts, rules, router)
    if recorder is not None:
        server.recorder, recorder.reload = recorder, server.reload_rules
        log.info("recording to %s from %s", config.record, " ".join(
            "%s=%s" % kv for kv in sorted(config.upstreams.items())))
    install_signals(server)
    if config.idle_exit or config.parent_pid or config.rules:
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
        log.flush()
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
    log.flush()
    return 0


check_catalogue(ROUTES)  # importing dpmock with a catalogue it cannot carry out fails at once
