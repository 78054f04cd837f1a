"""Scenarios and faults: what a request asked for, and one implementation per fault kind."""

import re

from .base import ByProvider, HTTPError, StartError, scenarios
from .conversation import answer_text
from .providers import TOKEN_PIECES, request_key
from .request import Answered


def select_scenario(req):
    """(spec, scenario, params) chosen by X-DP-Scenario, else by a key naming a scenario; else Nones.

    Both may carry parameters: ``STREAM_SLOW; ttft_ms=200; tps=20``. A bad one is a 400 naming it.
    """
    explicit = req.headers.get("x-dp-scenario")
    if explicit is not None and not explicit.strip():
        explicit = None  # an empty header (a client that always sends it) asks for no scenario
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
    """What a scenario answers on a route: its own row for it, else its answer if the route is of its kind.
    A row's literal answer (a Reply or Stream: the provider's own bytes, as the Flask mock's contract has
    them) is not a cloud's (route.platform): its shape differs there."""
    value = scenario.routes.get(route.name)
    if route.platform is not None and isinstance(value, (scenarios.Reply, scenarios.Stream, ByProvider)):
        value = None
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
ORDINARY = NO_FAULT[0]
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
        w.start_stream(status, ctype, headers, close=True, raw=True)
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
_END_EVENTS = ("message_stop", "response.completed", "response.incomplete", "messageStop")


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
    ends = frozenset(_END_EVENTS)  #: events that end a stream

    def item(self, w, n, text, payload, event, p):
        return None if payload == "[DONE]" or event in self.ends else text


class SseSplit(FaultKind):
    kind = "SSE_SPLIT"
    streams_only = True

    def pieces(self, turn, p):  # multi-byte characters, so pieces of a few bytes split them
        return re.findall(TOKEN_PIECES, "dpmock ünïcödé ✓ 😀 " + answer_text(turn))

    def chunk(self, w, data, p):
        cuts = [c for c in p["at"] if c < len(data)] or list(range(p["every"], len(data), p["every"]))
        for start, end in zip([0] + cuts, cuts + [len(data)]):
            w.frame_chunk(data[start:end])
        return True


class SseLineEndings(FaultKind):
    kind = "SSE_LINE_ENDINGS"
    streams_only = True

    def item(self, w, n, text, payload, event, p):
        return text if not w.is_sse() else text.replace("\r\n", "\n").replace("\n", _EOL[p["eol"]])


class SseComments(FaultKind):
    kind = "SSE_COMMENTS"
    streams_only = True

    def item(self, w, n, text, payload, event, p):
        return text if not w.is_sse() else ": dpmock comment before event %d\n%s:\n\n" % (n, text)


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


class _BatchFault(FaultKind):
    """How a batch made with it goes: its pace (``step_ms`` per status) and its end (batches.py asks)."""

    outcome = "completed"

    def batch(self, p):
        return p["step_ms"] / 1000.0, self.outcome


class BatchSlow(_BatchFault):
    kind = "BATCH_SLOW"


class BatchFailed(_BatchFault):
    kind = "BATCH_FAILED"
    outcome = "failed"


class BatchExpired(_BatchFault):
    kind = "BATCH_EXPIRED"
    outcome = "expired"


class BatchCancelled(_BatchFault):
    kind = "BATCH_CANCELLED"
    outcome = "cancelled"


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
