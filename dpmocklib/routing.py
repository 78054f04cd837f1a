"""Routing: paths matched to routes (the Router), and the query string."""

import importlib
from collections import namedtuple

from .base import DPMOCK, HTTPError, SHARED, bounded_int, clip, scenarios
from .providers import invalid


BODY_NONE, BODY_JSON, BODY_STREAM = "none", "json", "stream"
STREAM_NEVER, STREAM_FLAG, STREAM_ALWAYS, STREAM_SSE_FORMAT = "", "flag", "always", "sse_format"


class Lazy:
    """``"module.function"`` of the package, imported at its first call: the route table names every
    handler, and a run loads only the provider modules its requests need (a start compiles less)."""

    __slots__ = ("where", "fn")

    def __init__(self, where):
        self.where, self.fn = where, None

    def __call__(self, *args):
        fn = self.fn
        if fn is None:  # two first calls at once both import (under the import lock) and agree
            module, _, name = self.where.rpartition(".")
            try:
                fn = getattr(importlib.import_module("dpmocklib." + module), name)
            except Exception as e:  # noqa: BLE001 - a broken module: the client hears which, the server serves on
                raise HTTPError(500, "dpmock cannot load dpmocklib.%s: %s: %s" % (self.where, type(e).__name__, e),
                                "internal_error")
            self.fn = fn
        return fn(*args)

    def exists(self):
        """Whether the module is there (found, not imported): checked at start, so a missing file is a
        one-line "cannot start", not a 500 at the first request."""
        import importlib.util
        return importlib.util.find_spec("dpmocklib." + self.where.rpartition(".")[0]) is not None

    def __repr__(self):
        return "dpmocklib." + self.where


def check_modules(routes):
    """Raise ImportError naming the first route whose handler or reader names a module that is not there."""
    for route in routes:
        for fn in (route.handler, route.reader, route.framing):
            if isinstance(fn, Lazy) and not fn.exists():
                raise ImportError("route %s names %r, whose module is missing" % (route.name, fn))


class Route(namedtuple("Route", "method pattern name handler provider body stream versioned reader platform "
                                 "model_param framing")):
    """One row of the route table: what a path is, and the one function that answers it.

    ``pattern`` is the path after any version prefix, with ``{name}`` placeholders; ``name``
    is the key scenarios.py uses; ``handler(w, req)`` answers through the writer ``w``;
    ``provider`` is OPENAI, ANTHROPIC, GEMINI, SHARED (told apart per request) or DPMOCK;
    ``body`` is BODY_NONE, BODY_JSON (read and parsed before the handler runs) or BODY_STREAM
    (the handler reads it in pieces, never held whole); ``stream`` is STREAM_NEVER,
    STREAM_FLAG (streams when the JSON body says ``"stream": true``), STREAM_SSE_FORMAT (when it says
    ``"stream_format": "sse"``: speech) or STREAM_ALWAYS;
    ``reader(req)`` reads a conversation route's body into a Turn (what rules match on). ``handler``
    and ``reader`` are functions, or ``"module.function"`` names in the package (imported when first called).
    ``platform`` is a cloud (VERTEX, AZURE, BEDROCK, GEMINI_OPENAI) that serves the provider's models: its
    keys, error shapes and headers (providers.PROVIDERS[platform]) replace the provider's, while the
    provider's engine answers;
    ``model_param`` names the path placeholder that is the model (the body's ``model`` is set from it);
    ``framing(req)`` makes the framer of a stream that is not SSE (Bedrock's binary event stream).
    A placeholder written ``{name*}`` may hold a ``:`` (Bedrock's model ids: ``...-v1:0``).
    Provider routes are also served under /v1, /v1beta, /v1alpha and /v1beta1, and every
    fault of their kind applies to them (see ``applies``): no second list names them.
    """

    __slots__ = ()

    def __new__(cls, method, pattern, name, handler, provider, body=BODY_NONE, stream=STREAM_NEVER, reader=None,
                platform=None, model_param=None, framing=None):
        handler, reader, framing = (Lazy(f) if isinstance(f, str) else f for f in (handler, reader, framing))
        return super().__new__(cls, method, pattern, name, handler, provider, body, stream, provider != DPMOCK, reader,
                               platform, model_param, framing)

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
        if self.stream == STREAM_ALWAYS:
            return True
        if not isinstance(req.json, dict):
            return False
        return (self.stream == STREAM_FLAG and req.json.get("stream") is True) or (
            self.stream == STREAM_SSE_FORMAT and req.json.get("stream_format") == "sse")


#: Version segments; google-genai also uses /v1alpha and, in Vertex express mode, /v1beta1.
API_VERSIONS = ("v1", "v1beta", "v1alpha", "v1beta1")
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
            if len(segments) > 1 and segments[0] in API_VERSIONS:
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
            platforms = sorted({g.platform for g in group if g.platform})
            if platforms:
                provider += " (also %s)" % ", ".join(platforms)
            body = {BODY_NONE: "none", BODY_JSON: "JSON", BODY_STREAM: "streamed in pieces"}[r.body]
            kinds = {STREAM_NEVER: "-", STREAM_FLAG: '`"stream": true`', STREAM_ALWAYS: "always",
                     STREAM_SSE_FORMAT: '`"stream_format": "sse"`'}
            stream = " or ".join(dict.fromkeys(kinds[g.stream] for g in group))
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
        if name[-1:] == "*":
            name = name[:-1]
        elif ":" in value:
            return None
        if not value:
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


def int_arg(req, name, default, low, high):
    raw = req.arg(name)
    if raw is None:
        return default
    value = bounded_int(raw, low, high)
    if value is None:
        raise invalid("%s: expected an integer from %d to %d, got %r" % (name, low, high, clip(raw)), name)
    return value


def anthropic_page(req, items, ident, what):
    """(page, has_more) of ``items`` as Anthropic pages a list: ``limit`` (1-1000, default 20), ``after_id`` or
    ``before_id`` (an id the list does not hold is a 400 naming it); ``ident(item)`` is an item's id."""
    limit = int_arg(req, "limit", 20, 1, 1000)
    ids = [ident(i) for i in items]
    after, before = req.arg("after_id"), req.arg("before_id")
    for name, cursor in (("after_id", after), ("before_id", before)):
        if cursor is not None and cursor not in ids:
            raise invalid("%s: unknown %s id %r" % (name, what, clip(cursor)))
    if before is not None:
        end = ids.index(before)
        return items[max(0, end - limit):end], end - limit > 0
    start = ids.index(after) + 1 if after is not None else 0
    return items[start:start + limit], start + limit < len(items)


def page_body(data):
    """An Anthropic list answer of the page's objects."""
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
