"""Config and CLI: the command line, parsed into one Config."""

import os
import re
from collections import namedtuple

from . import __version__
from .base import CERTS, is_digits


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
       dpmock.py sandbox [--sandbox-host NAME]... [options above] -- CMD [ARGS...]
       dpmock.py record DIR [options above]

Mock the OpenAI, Gemini and Anthropic HTTP APIs. The sandbox form runs CMD offline, in new
mount and network namespaces where the providers' hosts (and the clouds' regional hosts; an
Azure resource's with --sandbox-host NAME.openai.azure.com) resolve to dpmock (HTTPS on 443,
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
                   where --record forwards openai, anthropic, gemini, azure, vertex or bedrock
                   requests (repeatable, several after one --upstream too; default: the
                   providers' HTTPS hosts, each cloud request's regional host; azure: none)
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
#: The clouds' upstreams, unless --upstream names one: each request's own region's host (Vertex AI's location
#: from the path, Bedrock's region from the SigV4 credential scope); an Azure resource is the user's to name.
CLOUD_UPSTREAMS = {"azure": "https://RESOURCE.openai.azure.com (no default: name yours)",
                   "vertex": "https://LOCATION-aiplatform.googleapis.com",
                   "bedrock": "https://bedrock-runtime.REGION.amazonaws.com"}

UPSTREAM_NAMES = tuple(DEFAULT_UPSTREAMS) + tuple(CLOUD_UPSTREAMS)


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
                while args and args[0].partition("=")[0] in UPSTREAM_NAMES and "=" in args[0]:
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
        cert, key = (os.path.join(CERTS, name) for name in ("server.pem", "server.key"))
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
        if provider not in UPSTREAM_NAMES or not sep:
            raise UsageError("--upstream takes PROVIDER=URL with PROVIDER %s, not %r"
                             % (", ".join(UPSTREAM_NAMES), spec[:60]))
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
