"""Base: the vocabulary every part shares: provider names, the two errors, JSON encoders, small helpers,
and where scenarios.py, the certificates and the launcher are."""

import binascii
import importlib.util
import json
import math
import os
import sys
import threading

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
HOME = os.path.dirname(PACKAGE_DIR)  #: the folder that holds the package: a checkout, a vendored copy, site-packages


def _load_scenarios():
    """scenarios.py: inside the package when installed (the wheel puts it there), else the one beside the
    package (a checkout or a vendored tests/mock-server/, where a team edits it), loaded as dpmocklib.scenarios."""
    if os.path.exists(os.path.join(PACKAGE_DIR, "scenarios.py")):
        from . import scenarios as mod
        return mod
    path = os.path.join(HOME, "scenarios.py")
    mod = sys.modules.get("scenarios")  # already imported by name from beside the package: the same module
    if mod is not None and os.path.abspath(getattr(mod, "__file__", None) or "") == path:
        return mod
    spec = importlib.util.spec_from_file_location("dpmocklib.scenarios", path)
    if spec is None or not os.path.exists(path):
        raise ImportError("scenarios.py is missing: it belongs beside the dpmocklib folder (%s)" % path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dpmocklib.scenarios"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["dpmocklib.scenarios"]
        raise
    return mod


scenarios = _load_scenarios()
ByProvider, Reply, Stream, Upload = scenarios.ByProvider, scenarios.Reply, scenarios.Stream, scenarios.Upload

#: The TLS certificates (certs/): inside the package when installed, beside it in a checkout or a copy.
CERTS = next((p for p in (os.path.join(PACKAGE_DIR, "certs"), os.path.join(HOME, "certs")) if os.path.isdir(p)),
             os.path.join(HOME, "certs"))
#: The command that starts dpmock again (re-exec, the sandbox's inner server): the dpmock.py beside the
#: package when there is one, else the installed package run as a module.
LAUNCHER = ([sys.executable, os.path.join(HOME, "dpmock.py")] if os.path.exists(os.path.join(HOME, "dpmock.py"))
            else [sys.executable, "-m", "dpmocklib"])


OPENAI, ANTHROPIC, GEMINI = "openai", "anthropic", "gemini"
SHARED, DPMOCK = None, ""  #: route.provider of paths the providers share, and of dpmock's own
#: Clouds that serve a provider's models on paths, keys and error shapes of their own (route.platform).
VERTEX, AZURE, BEDROCK, GEMINI_OPENAI = "vertex", "azure", "bedrock", "gemini-openai"


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


COMPACT_JSON = _encoder(",", ":")
SPACED_JSON = _encoder(", ", ": ")
COMPACT_JSON_PARTS, SPACED_JSON_PARTS = COMPACT_JSON.parts, SPACED_JSON.parts

class HTTPError(Exception):
    """Raised anywhere in request handling; rendered in the provider's own error shape."""

    def __init__(self, status, message, code=None, headers=(), close=False, etype=None, param=None, details=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.close = headers, close
        self.etype, self.param, self.details = etype, param, details

MISSING = object()


def is_finite(value):
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)


def count_arg(value, default, ceil=True):
    """A non-negative count from an int, integral float or digit string (Gemini int64)."""
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    if isinstance(value, bool) or not is_finite(value):
        return default
    value = math.ceil(value) if ceil else math.floor(value)
    return max(int(value), 0)


def is_digits(text):
    """ASCII digits only: str.isdigit() also admits characters int() refuses (such as "²")."""
    return text.isascii() and text.isdigit()


def read_regular_file(path, limit):
    """A regular file's bytes, up to ``limit`` (ValueError past it). A FIFO, device or folder is an OSError,
    never opened for reading (which could block): it is opened without blocking and checked first."""
    import stat
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        pieces, size = [], 0
        while size <= limit:
            more = os.read(fd, min(1 << 20, limit + 1 - size))  # never a buffer of the limit's size up front
            if not more:
                break
            pieces.append(more)
            size += len(more)
        data = b"".join(pieces)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError("%s: over the %d byte limit" % (path, limit))
    return data


def cached(cache, key, make, limit=1024):
    """``cache[key]``, made by ``make(key)`` on first use; the cache starts again empty past ``limit`` entries."""
    try:
        return cache[key]
    except KeyError:
        pass
    value = make(key)
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


REGEX_BUDGET = 1.0  #: seconds one request may spend on regexes its client or a rule wrote (saferegex)
_REQUEST = threading.local()


def start_regex_budget():
    """A new request on this thread: its REGEX_BUDGET starts (dispatch calls this for each)."""
    _REQUEST.regex_left = REGEX_BUDGET


def regex_left():
    """Seconds of regex search left to this thread's request (REGEX_BUDGET outside any request)."""
    return getattr(_REQUEST, "regex_left", REGEX_BUDGET)


def spend_regex(seconds):
    if getattr(_REQUEST, "regex_left", None) is not None:  # outside a request (a direct call): not counted
        _REQUEST.regex_left -= seconds


def clip(text, n=40):
    """``text`` cut to ``n`` characters (marked with ...), for messages that quote what a client sent."""
    return text if len(text) <= n else text[:n] + "..."


def bounded_int(text, low, high):
    """The whole number ``text`` spells in ASCII digits, when it is from low to high; else None. Its length is
    checked first: int() of thousands of digits is slow, and past 4,300 an error of its own."""
    if not isinstance(text, str) or not is_digits(text):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        return None
    value = int(digits)
    return value if low <= value <= high else None


def b64(data):
    return binascii.b2a_base64(data, newline=False).decode("ascii")


class StartError(Exception):
    """A start-up step failed; the message is one plain line."""
