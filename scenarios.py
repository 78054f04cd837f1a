"""dpmock scenario catalogue: data only, plus small pure helpers (no I/O, no sleeps).

A scenario is selected by the request's API key (or an ``X-DP-Scenario`` header) and
answers, per route, with a fixed reply, an SSE stream or an upload rule. The server
(dpmock.py) interprets these values; the tests loop over them; the README's scenario
table is generated from them (``markdown_table()``) and checked by a test.

Route names used below are the ``name`` column of dpmock.ROUTES.
"""

from collections import namedtuple

JSON = "application/json"
HTML = "text/html; charset=utf-8"
SSE = "text/event-stream; charset=utf-8"
MIB = 1024 * 1024


# Plain named tuples, not dataclasses: importing dataclasses (and inspect) would cost
# dpmock ~15 ms of its start-up.

class Reply(namedtuple("Reply", "status body content_type headers")):
    """A complete answer: status, body (dict/list -> JSON, str -> text), content type, extra headers."""

    __slots__ = ()

    def __new__(cls, status, body, content_type=JSON, headers=()):
        return super().__new__(cls, status, body, content_type, headers)


class Event(namedtuple("Event", "data event")):
    """One server-sent event: a ``data:`` payload (dict -> one line of JSON) and an optional name."""

    __slots__ = ()

    def __new__(cls, data, event=None):
        return super().__new__(cls, data, event)


class Stream(namedtuple("Stream", "events pause_ms tail close content_type")):
    """A 200 ``text/event-stream`` answer sent chunked, one event per chunk.

    ``tail`` is raw text sent after a pause of ``pause_ms`` (a deliberately broken event);
    ``close`` closes the connection once the chunked body has ended.
    """

    __slots__ = ()

    def __new__(cls, events, pause_ms=0, tail="", close=False, content_type=SSE):
        return super().__new__(cls, tuple(events), pause_ms, tail, close, content_type)


class Upload(namedtuple("Upload", "ok empty max_bytes too_large")):
    """An upload rule: the answer depends on the body's byte count, which is never kept.

    ``ok`` is the file object answered with 200 (``bytes`` is added); ``empty`` answers an
    empty body; bodies over ``max_bytes`` get ``too_large``.
    """

    __slots__ = ()

    def __new__(cls, ok, empty=None, max_bytes=None, too_large=None):
        return super().__new__(cls, ok, empty, max_bytes, too_large)


class ByProvider(namedtuple("ByProvider", "openai anthropic gemini")):
    """Answers for a path the providers share (GET /models/{id}), one per provider."""

    __slots__ = ()

    def get(self, provider):
        return getattr(self, provider)


class ProviderError(namedtuple("ProviderError", "status openai anthropic gemini html")):
    """An HTTP error in each provider's own shape (or a proxy's HTML page when ``html`` is set).

    ``openai`` is (type, code, message), ``anthropic`` (type, message), ``gemini`` (status, message).
    """

    __slots__ = ()

    def __new__(cls, status, openai=None, anthropic=None, gemini=None, html=None):
        return super().__new__(cls, status, openai, anthropic, gemini, html)


class Fault(namedtuple("Fault", "kind")):
    """A behaviour dpmock carries out itself (a broken connection, a paced stream, a schedule...)."""

    __slots__ = ()


class Param(namedtuple("Param", "name kind default low high doc")):
    """A scenario parameter: ``int``/``float`` clamped to [low, high], ``choice`` (low = the choices),
    ``scenario`` (another scenario's name) or ``steps`` (names, or OK, separated by commas)."""

    __slots__ = ()


class On(namedtuple("On", "applies answer providers")):
    """A fault's answer on every route of one kind (ANY_PROVIDER_ROUTE, BODY or STREAMED), as each
    route of dpmock.ROUTES declares itself; ``providers`` narrows it. A route added to the
    server gets its faults with no change here."""

    __slots__ = ()

    def __new__(cls, applies, answer, providers=None):
        return super().__new__(cls, applies, answer, providers)


class Scenario(namedtuple("Scenario", "name doc routes params group answer applies providers")):
    """A named scenario: route name -> Reply | Stream | Upload | ByProvider | ProviderError | Fault,
    or (``On``) one answer on every route of a kind."""

    __slots__ = ()

    def __new__(cls, name, doc, routes, params=(), group="contract"):
        on = routes if isinstance(routes, On) else On(None, None, None)
        return super().__new__(cls, name, doc, {} if isinstance(routes, On) else routes, tuple(params), group,
                               on.answer, on.applies, on.providers)


# --------------------------------------------------------------------------- bodies

RATE_LIMIT = {"error": {"message": "Rate limit exceeded", "type": "rate_limit_error", "code": 429}}
OPENAI_AUTH = {"error": {"message": "Invalid Authentication", "type": "invalid_request_error", "code": 401}}
GEMINI_AUTH = {"error": {"message": "Invalid Authentication", "code": 401}}
ANTHROPIC_AUTH = {"type": "error", "message": "Authentication Error"}
FILE_EMPTY = {"error": {"message": "File is empty", "code": 400}}
FILE_TOO_LARGE = {"error": {"message": "File size exceeds limit", "code": 413}}
OPENAI_NO_MODEL = {"error": {"message": "The model does not exist or you do not have access to it.",
                             "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
ANTHROPIC_NO_MODEL = {"type": "error", "error": {"type": "not_found_error", "message": "model: not found"}}
GEMINI_NO_MODEL = {"error": {"code": 404, "message": "models/unknown is not found for API version v1beta, or is "
                             "not supported for generateContent. Call ListModels to see the list of available "
                             "models and their supported methods.", "status": "NOT_FOUND"}}


def _anthropic_start(model):
    """message_start data: the contract's ``message`` plus the real API's ``type`` and ``content``."""
    return {
        "type": "message_start",
        "message": {
            "id": "msg_01J1.1", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        },
    }


_BLOCK_START = Event({"type": "content_block_start", "index": 0,
                      "content_block": {"type": "text", "text": ""}}, "content_block_start")


def _text_delta(text):
    return Event({"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": text}}, "content_block_delta")


_ZERO_BYTE = Upload(ok={"id": "file-123", "filename": "test_file.txt", "purpose": "fine-tune"},
                    empty=Reply(400, FILE_EMPTY))
_LARGE_FILE = Upload(ok={"id": "file-456", "filename": "large_test_file.bin", "purpose": "fine-tune"},
                     max_bytes=100 * MIB, too_large=Reply(413, FILE_TOO_LARGE))

# --------------------------------------------------------------------------- catalogue

_CATALOGUE = (
    Scenario("NON_JSON_ERROR", "500 with an HTML page instead of JSON.", {
        "chat": Reply(500, "<html><body><h1>500 Internal Server Error</h1></body></html>", HTML),
    }),
    Scenario("ABRUPT_STREAM", "One whole chunk, then a truncated `data:` event; the chunked body "
             "ends cleanly and the connection closes.", {
        "chat": Stream(
            events=(Event({"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
                           "model": "gpt-3.5-turbo-0613",
                           "choices": [{"index": 0, "delta": {"role": "assistant"}}, {"finish_reason": None}]}),),
            pause_ms=10, tail='data: {"id":"truncated_chunk", "content":"partial', close=True),
    }),
    Scenario("RATE_LIMIT_COMPLETION", "429 rate-limit error on completions.", {
        "chat": Reply(429, RATE_LIMIT),
    }),
    Scenario("AUTH_FAILURE_OPENAI", "401 OpenAI-style authentication error.", {
        "chat": Reply(401, OPENAI_AUTH),
        "models": Reply(401, OPENAI_AUTH),
        "files": Reply(401, OPENAI_AUTH),
    }),
    Scenario("AUTH_FAILURE_GEMINI", "401 Gemini-style authentication error (OpenAI-style on the "
             "shared models list).", {
        "gemini_generate": Reply(401, GEMINI_AUTH),
        "gemini_count_tokens": Reply(401, GEMINI_AUTH),
        "gemini_upload": Reply(401, GEMINI_AUTH),
        "models": Reply(401, OPENAI_AUTH),
    }),
    Scenario("AUTH_FAILURE_ANTHROPIC", "401 Anthropic-style authentication error.", {
        "messages": Reply(401, ANTHROPIC_AUTH),
        "messages_count_tokens": Reply(401, ANTHROPIC_AUTH),
        "models": Reply(401, ANTHROPIC_AUTH),
    }),
    Scenario("STREAM_ERROR_ANTHROPIC", "Stream starts, one text delta, then `event: error` "
             "(top-level `message` and nested `error`).", {
        "messages": Stream(events=(
            Event(_anthropic_start("claude-3-haiku-20240307"), "message_start"),
            _BLOCK_START,
            _text_delta("Partial"),
            Event({"type": "error", "message": "Simulated mid-stream error.",
                   "error": {"type": "api_error", "message": "Simulated mid-stream error."}}, "error"),
        )),
    }),
    Scenario("STREAM_PING_ANTHROPIC", "Complete stream with an `event: ping` between two text deltas.", {
        "messages": Stream(events=(
            Event(_anthropic_start("claude-3-opus-20240229"), "message_start"),
            _BLOCK_START,
            _text_delta("Hello"),
            Event({"type": "ping"}, "ping"),
            _text_delta(" World!"),
            Event({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                   "usage": {"output_tokens": 2}, "stop_reason": "end_turn", "stop_sequence": None},
                  "message_delta"),
            Event({"type": "message_stop"}, "message_stop"),
        )),
    }),
    Scenario("EMPTY_LIST", "200 with an empty model list.", {
        "models": Reply(200, {"object": "list", "data": []}),
    }),
    Scenario("RATE_LIMIT_LIST_MODELS", "429 rate-limit error on the model list.", {
        "models": Reply(429, RATE_LIMIT),
    }),
    Scenario("NO_SCENARIO", "The Flask mock's answer to a key that names no scenario: 400 `No test scenario "
             "triggered ...` (dpmock itself answers such requests like the provider).", {
        "chat": Reply(400, {"error": "No test scenario triggered in mock server"}),
        "gemini_generate": Reply(400, {"error": "No test scenario triggered for Gemini completions endpoint"}),
        "messages": Reply(400, {"error": "No test scenario triggered for Anthropic completions endpoint"}),
        "models": Reply(400, {"error": "No test scenario triggered for models endpoint"}),
        "files": Reply(400, {"error": "No test scenario triggered for files endpoint"}),
        "gemini_upload": Reply(400, {"error": "No test scenario triggered for files:upload endpoint"}),
        "gemini_count_tokens": Reply(400, {"error": "No test scenario triggered for countTokens endpoint"}),
        "messages_count_tokens": Reply(400, {"error": "No test scenario triggered for Anthropic count_tokens "
                                                      "endpoint"}),
    }),
    Scenario("MODEL_NOT_FOUND", "404 unknown model, in each provider's own error shape (as for a model id "
             "containing `does-not-exist`).", {
        "chat": Reply(404, OPENAI_NO_MODEL),
        "images": Reply(404, OPENAI_NO_MODEL),
        "messages": Reply(404, ANTHROPIC_NO_MODEL),
        "messages_count_tokens": Reply(404, ANTHROPIC_NO_MODEL),
        "gemini_generate": Reply(404, GEMINI_NO_MODEL),
        "gemini_stream": Reply(404, GEMINI_NO_MODEL),
        "gemini_count_tokens": Reply(404, GEMINI_NO_MODEL),
        "gemini_predict": Reply(404, GEMINI_NO_MODEL),
        "models_get": ByProvider(Reply(404, OPENAI_NO_MODEL), Reply(404, ANTHROPIC_NO_MODEL),
                                 Reply(404, GEMINI_NO_MODEL)),
    }),
    Scenario("ZERO_BYTE_FILE", "Empty upload: 400 `File is empty`; otherwise 200 with the byte count.", {
        "files": _ZERO_BYTE,
        "gemini_upload": _ZERO_BYTE,
    }),
    Scenario("LARGE_FILE_UPLOAD", "Upload over 100 MiB: 413 (at once, unread, under `Expect: "
             "100-continue`); otherwise 200 with the byte count.", {
        "files": _LARGE_FILE,
        "gemini_upload": _LARGE_FILE,
    }),
)

# --------------------------------------------------------------------------- faults

#: The kinds of route a fault applies to; each route of dpmock.ROUTES says which kinds it is.
ANY_PROVIDER_ROUTE, BODY, STREAMED = "provider", "body", "stream"
APPLIES = {ANY_PROVIDER_ROUTE: "every provider route", BODY: "requests with a body", STREAMED: "streamed answers"}

PROVIDER_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic", "gemini": "Gemini"}

#: The longest any deliberate wait may last, whatever a parameter says (seconds).
MAX_WAIT_S = 120


def _int(name, default, low, high, doc):
    return Param(name, "int", default, low, high, doc)


_PROXY_502 = ("<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
              "</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
_PROXY_503 = ("<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center>"
              "<h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>"
              "\r\n</html>\r\n")
_AFTER = _int("after", 2, 0, 100000, "events sent before it")
_WAIT = _int("ms", 30000, 0, MAX_WAIT_S * 1000, "how long, in ms")
_INNER = Param("fault", "scenario", "SERVER_ERROR", None, None, "the scenario applied when failing")

_FAULTS = (
    # provider-shaped HTTP errors
    Scenario("RATE_LIMITED", "429 with `retry-after`, `retry-after-ms` and `x-ratelimit-*` (OpenAI) or "
             "`anthropic-ratelimit-*` (Anthropic) headers, Gemini's `RESOURCE_EXHAUSTED` with a `RetryInfo` detail",
             On(ANY_PROVIDER_ROUTE, ProviderError(
                 429, ("requests", "rate_limit_exceeded", "Rate limit reached for requests in organization "
                       "org-dpmock on requests per min (RPM): Limit 60, Used 60, Requested 1."),
                 ("rate_limit_error", "This request would exceed the rate limit for your organization."),
                 ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."))),
             [_int("retry_after", 1, 0, 3600, "seconds the client is told to wait")], "fault"),
    Scenario("SERVER_ERROR", "500 in the provider's shape", On(ANY_PROVIDER_ROUTE, ProviderError(
        500, ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
        ("api_error", "Internal server error"), ("INTERNAL", "An internal error has occurred. Please retry."))),
        group="fault"),
    Scenario("BAD_GATEWAY", "502 with a proxy's HTML page", On(ANY_PROVIDER_ROUTE, ProviderError(502, html=_PROXY_502)),
             group="fault"),
    Scenario("SERVICE_UNAVAILABLE", "503 with a proxy's HTML page",
             On(ANY_PROVIDER_ROUTE, ProviderError(503, html=_PROXY_503)), group="fault"),
    Scenario("OVERLOADED", "Anthropic 529 `overloaded_error`; Gemini 503 `UNAVAILABLE`; OpenAI 503 `server_error`",
             On(ANY_PROVIDER_ROUTE, ProviderError(
                 {"openai": 503, "anthropic": 529, "gemini": 503},
                 ("server_error", None, "The engine is currently overloaded, please try again later"),
                 ("overloaded_error", "Overloaded"), ("UNAVAILABLE", "The model is overloaded. Please try again "
                                                                     "later."))), group="fault"),
    Scenario("REQUEST_TIMEOUT", "408 in the provider's shape", On(ANY_PROVIDER_ROUTE, ProviderError(
        408, ("timeout", None, "Request timed out."), ("timeout_error", "Request timed out"),
        ("DEADLINE_EXCEEDED", "The request timed out."))), group="fault"),
    Scenario("TOO_LARGE", "413 in the provider's shape", On(ANY_PROVIDER_ROUTE, ProviderError(
        413, ("invalid_request_error", "request_too_large", "Request too large."),
        ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
        ("INVALID_ARGUMENT", "Request payload size exceeds the limit: 20971520 bytes."))), group="fault"),
    # in-stream errors
    Scenario("STREAM_ERROR", "200 stream, then the provider's in-stream error: Anthropic `event: error` "
             "(`overloaded_error`), an OpenAI `data: {\"error\": ...}` (Responses: `event: error` with `type`, "
             "`code` and `sequence_number`), a Gemini `{\"error\": ...}` element; then the stream ends",
             On(STREAMED, Fault("STREAM_ERROR")), [_AFTER], "fault"),
    # pacing
    Scenario("STREAM_SLOW", "the stream paced: first event after `ttft_ms`, then `tps` events a second",
             On(STREAMED, Fault("STREAM_SLOW")),
             [_int("ttft_ms", 500, 0, MAX_WAIT_S * 1000, "time to the first event, ms"),
              _int("tps", 10, 1, 100000, "events per second after it")], "fault"),
    Scenario("SLOW_BODY", "the whole response dribbled `bytes` at a time, `interval_ms` apart",
             On(ANY_PROVIDER_ROUTE, Fault("SLOW_BODY")),
             [_int("bytes", 16, 1, 1 << 20, "bytes per write"),
              _int("interval_ms", 50, 0, 10000, "pause between writes, ms")], "fault"),
    Scenario("HEADERS_STALL", "status line and headers, then nothing for `ms`, then the connection closes",
             On(ANY_PROVIDER_ROUTE, Fault("HEADERS_STALL")), [_WAIT], "fault"),
    # hangs
    Scenario("HANG", "the request is read, never answered; the connection closes after `ms` (a client "
             "timeout fires first: curl 28)", On(ANY_PROVIDER_ROUTE, Fault("HANG")), [_WAIT], "fault"),
    Scenario("STREAM_STALL", "`after` events, then nothing for `ms`, then the connection closes mid-stream",
             On(STREAMED, Fault("STREAM_STALL")), [_AFTER, _WAIT], "fault"),
    # connection ends
    Scenario("EMPTY_REPLY", "the connection closes before the status line (curl 52)",
             On(ANY_PROVIDER_ROUTE, Fault("EMPTY_REPLY")), group="fault"),
    Scenario("RESET", "TCP reset (SO_LINGER 0) after `after_bytes` bytes of the response (curl 56)",
             On(ANY_PROVIDER_ROUTE, Fault("RESET")), [_int("after_bytes", 0, 0, 1 << 30, "response bytes sent first")],
             "fault"),
    Scenario("SHORT_BODY", "`Content-Length` promises `missing` more bytes than sent, then FIN (curl 18)",
             On(ANY_PROVIDER_ROUTE, Fault("SHORT_BODY")), [_int("missing", 100, 1, 1 << 30, "bytes never sent")],
             "fault"),
    Scenario("NO_FINAL_CHUNK", "chunked body without its final `0` chunk, then FIN (curl 18)",
             On(ANY_PROVIDER_ROUTE, Fault("NO_FINAL_CHUNK")), group="fault"),
    Scenario("HALF_CLOSE", "headers and half the body, then the server shuts its sending side (FIN) and keeps "
             "reading until the client closes (curl 18)", On(ANY_PROVIDER_ROUTE, Fault("HALF_CLOSE")), group="fault"),
    Scenario("STREAM_CUT", "the stream cut after `events` events (or `bytes` response bytes, headers included) "
             "by FIN or reset (curl 18 / 56)", On(STREAMED, Fault("STREAM_CUT")),
             [_int("events", 2, 0, 100000, "events sent first"),
              _int("bytes", 0, 0, 1 << 30, "cut after this many response bytes instead (0: by events)"),
              Param("how", "choice", "fin", ("fin", "reset"), None, "how the connection ends")], "fault"),
    # framing stress, valid
    Scenario("SSE_SPLIT", "every event written in pieces, each its own chunk: at the byte offsets `at` when "
             "given, else every `every` bytes, so events break inside `data: `, inside line ends and inside "
             "multi-byte UTF-8 characters (the answer text has some)",
             On(STREAMED, Fault("SSE_SPLIT")),
             [_int("every", 3, 1, 65536, "bytes per piece"),
              Param("at", "offsets", [], None, None, "byte offsets in each event, by commas (e.g. 3,7)")], "fault"),
    Scenario("SSE_LINE_ENDINGS", "events framed with `eol` line ends (the C library accepts only LF and CRLF)",
             On(STREAMED, Fault("SSE_LINE_ENDINGS")),
             [Param("eol", "choice", "crlf", ("crlf", "lf", "cr"), None, "line end")], "fault"),
    Scenario("SSE_COMMENTS", "a `: comment` line and an empty keep-alive comment event between events",
             On(STREAMED, Fault("SSE_COMMENTS")), group="fault"),
    Scenario("SSE_BIG_EVENT", "one text event of `kib` KiB (over 64 KiB by default)",
             On(STREAMED, Fault("SSE_BIG_EVENT")), [_int("kib", 80, 1, 16384, "size of the event")], "fault"),
    Scenario("SSE_MANY_EVENTS", "the answer as `n` one-character events",
             On(STREAMED, Fault("SSE_MANY_EVENTS")), [_int("n", 10000, 1, 1000000, "events")], "fault"),
    # framing, invalid
    Scenario("BAD_CHUNK_SIZE", "a chunk-size line that is not hex, then FIN (curl 56)",
             On(ANY_PROVIDER_ROUTE, Fault("BAD_CHUNK_SIZE")), group="fault"),
    Scenario("INVALID_JSON_200", "200 whose JSON is cut in half (a stream: its second event)",
             On(ANY_PROVIDER_ROUTE, Fault("INVALID_JSON_200")), group="fault"),
    Scenario("HTML_200", "200 `text/html` page, also to a streaming request",
             On(ANY_PROVIDER_ROUTE, Fault("HTML_200")), group="fault"),
    Scenario("STREAM_NO_END", "a stream without its `data: [DONE]` (OpenAI Chat), `response.completed` "
             "(OpenAI Responses) or `message_stop` (Anthropic)",
             On(STREAMED, Fault("STREAM_NO_END"), ("openai", "anthropic")), group="fault"),
    # Expect: 100-continue
    Scenario("EXPECT_REJECT", "the answer `status` at once, without `100 Continue` and without reading the body "
             "(then the connection closes)", On(BODY, Fault("EXPECT_REJECT")),
             [Param("status", "choice", "413", ("413", "401"), None, "status sent")], "fault"),
    Scenario("EXPECT_IGNORE", "no `100 Continue`: the client sends its body when its own wait ends (curl: 1 s)",
             On(BODY, Fault("EXPECT_IGNORE")), group="fault"),
    # batches (OpenAI's /v1/batches): how a batch made with one of these goes
    Scenario("BATCH_SLOW", "a batch moves `validating` -> `in_progress` -> `finalizing` -> `completed`, each "
             "status `step_ms` long (without it: finished at once)", {"batches_create": Fault("BATCH_SLOW"), "messages_batches_create": Fault("BATCH_SLOW"),
              "gemini_batches_create": Fault("BATCH_SLOW")},
             [_int("step_ms", 1000, 0, MAX_WAIT_S * 1000, "how long each status lasts, ms")], "fault"),
    Scenario("BATCH_FAILED", "a batch fails once `validating` is over (`errors`: the enqueued token limit), "
             "running none of its requests", {"batches_create": Fault("BATCH_FAILED"), "messages_batches_create": Fault("BATCH_FAILED"),
              "gemini_batches_create": Fault("BATCH_FAILED")},
             [_int("step_ms", 0, 0, MAX_WAIT_S * 1000, "how long validating lasts, ms")], "fault"),
    Scenario("BATCH_EXPIRED", "a batch `expired` after `in_progress`: its first half answered, the rest "
             "`batch_expired` in its error file", {"batches_create": Fault("BATCH_EXPIRED"), "messages_batches_create": Fault("BATCH_EXPIRED"),
              "gemini_batches_create": Fault("BATCH_EXPIRED")},
             [_int("step_ms", 0, 0, MAX_WAIT_S * 1000, "how long each status lasts, ms")], "fault"),
    Scenario("BATCH_CANCELLED", "a batch `cancelling`, then `cancelled`, once `validating` is over (as if "
             "cancelled then): its first half answered, the rest `batch_cancelled`",
             {"batches_create": Fault("BATCH_CANCELLED"), "messages_batches_create": Fault("BATCH_CANCELLED"),
              "gemini_batches_create": Fault("BATCH_CANCELLED")},
             [_int("step_ms", 0, 0, MAX_WAIT_S * 1000, "how long each status lasts, ms")], "fault"),
    # schedules
    Scenario("FAIL_FIRST", "the first `n` requests of a key get `fault`, later ones succeed",
             On(ANY_PROVIDER_ROUTE, Fault("FAIL_FIRST")), [_int("n", 1, 0, 1000000, "failing requests"), _INNER],
             "schedule"),
    Scenario("FAIL_EVERY", "every `k`-th request of a key gets `fault`", On(ANY_PROVIDER_ROUTE, Fault("FAIL_EVERY")),
             [_int("k", 2, 1, 1000000, "period"), _INNER], "schedule"),
    Scenario("SEQUENCE", "the requests of a key get `steps` in turn (`OK`: a normal answer), then succeed",
             On(ANY_PROVIDER_ROUTE, Fault("SEQUENCE")),
             [Param("steps", "steps", ["SERVER_ERROR", "OK"], None, None, "scenario names or OK, by commas")],
             "schedule"),
    Scenario("FAIL_RANDOM", "each request of a key gets `fault` with probability `p`, reproducibly from `seed` "
             "(echoed in `x-dp-seed`; default: the server's `--seed`)", On(ANY_PROVIDER_ROUTE, Fault("FAIL_RANDOM")),
             [Param("p", "float", 0.5, 0.0, 1.0, "failure probability"), _INNER,
              _int("seed", -1, -1, 2 ** 31 - 1, "random seed (-1: the server's)")], "schedule"),
)

SCENARIOS = {s.name: s for s in _CATALOGUE + _FAULTS}

# --------------------------------------------------------------------------- provider fixtures

#: A model id containing this is unknown to every provider (404); every other id exists.
MISSING_MODEL_MARK = "does-not-exist"

#: Refused as a real provider refuses a bad key: exactly the placeholder Disaster Party's tests
#: send (BAD_KEYS), and keys starting with BAD_KEY_PREFIXES (plus dpmock.py's --refuse-key
#: prefixes). Every other key is accepted, "dummy" and "sk-dummy" included.
BAD_KEYS = frozenset({"dummy_key"})
BAD_KEY_PREFIXES = ("invalid",)

#: OpenAI models: (id, created, owned_by).
OPENAI_MODELS = (
    ("gpt-4o", 1715367049, "system"), ("gpt-4o-mini", 1721172741, "system"), ("gpt-4.1", 1744316542, "system"),
    ("gpt-4.1-mini", 1744318173, "system"), ("o3-mini", 1737146383, "system"), ("o4-mini", 1744225351, "system"),
    ("gpt-5", 1754425777, "system"), ("gpt-5-mini", 1754425928, "system"), ("dall-e-3", 1698785189, "system"),
    ("gpt-image-1", 1745517030, "system"), ("text-embedding-3-small", 1705948997, "system"),
    ("text-embedding-3-large", 1705953180, "system"), ("gpt-3.5-turbo-instruct", 1692901427, "system"),
    ("omni-moderation-latest", 1731689265, "system"),
)

#: POST /moderations: a text containing one of these words is flagged in that category (scores 0.9871;
#: every other category 0.0001). Deterministic, so a test can expect a flag.
MODERATION_WORDS = {
    "harassment": ("harass", "bully"), "harassment/threatening": ("threaten",), "hate": ("hate",),
    "hate/threatening": (), "illicit": ("illicit",), "illicit/violent": (), "self-harm": ("selfharm",),
    "self-harm/intent": (), "self-harm/instructions": (), "sexual": ("sexual",), "sexual/minors": (),
    "violence": ("kill", "violence", "violent"), "violence/graphic": ("gore",),
}

#: Anthropic models, newest first as the API lists them: (id, display_name, created_at).
ANTHROPIC_MODELS = (
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-01T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    ("claude-opus-4-20250514", "Claude Opus 4", "2025-05-22T00:00:00Z"),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z"),
    ("claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", "2025-02-24T00:00:00Z"),
    ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z"),
    ("claude-3-haiku-20240307", "Claude Haiku 3", "2024-03-07T00:00:00Z"),
)

#: Gemini models: (id, displayName, inputTokenLimit, outputTokenLimit, thinking).
GEMINI_MODELS = (
    ("gemini-2.5-pro", "Gemini 2.5 Pro", 1048576, 65536, True),
    ("gemini-2.5-flash", "Gemini 2.5 Flash", 1048576, 65536, True),
    ("gemini-2.5-flash-lite", "Gemini 2.5 Flash-Lite", 1048576, 65536, True),
    ("gemini-2.0-flash", "Gemini 2.0 Flash", 1048576, 8192, False),
    ("gemini-2.0-flash-lite", "Gemini 2.0 Flash-Lite", 1048576, 8192, False),
    ("gemini-embedding-001", "Gemini Embedding 001", 2048, 1, False),
    ("text-embedding-004", "Text Embedding 004", 2048, 1, False),
    ("imagen-4.0-generate-001", "Imagen 4", 480, 8192, False),
    ("imagen-3.0-generate-002", "Imagen 3", 480, 8192, False),
)

# --------------------------------------------------------------------------- helpers

def names():
    """Scenario names in catalogue order (the Flask mock's first, then the faults)."""
    return [s.name for s in _CATALOGUE + _FAULTS]


def get(name):
    """The scenario called ``name``, or None."""
    return SCENARIOS.get(name)


def answer(name, route):
    """What scenario ``name`` answers on ``route``, or None when it does not apply there."""
    scenario = SCENARIOS.get(name)
    return scenario.routes.get(route) if scenario else None


def parse_spec(text):
    """``NAME; a=1; b=2`` -> (NAME, {a: "1", b: "2"}). Raises ValueError naming what is wrong."""
    name, *rest = [p.strip() for p in text.split(";")]
    params = {}
    for item in rest:
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError("scenario parameter %r is not name=value" % item)
        if key.strip() in params:
            raise ValueError("scenario parameter %r is given twice" % key.strip())
        params[key.strip()] = value.strip()
    return name, params


def resolve(text, extra=None):
    """(scenario, {param: value}) for a spec, defaults filled in and numbers clamped to their bounds.

    A schedule also takes the parameters of the scenarios it applies (``FAIL_FIRST; n=2;
    fault=RATE_LIMITED; retry_after=0``): checked now, kept in ``values["inner"]`` and given to the
    inner scenario when it fires (``extra``: those, for ``resolve(inner name, extra)``).
    Raises KeyError for an unknown scenario name, ValueError for a bad parameter (naming it).
    """
    name, raw = parse_spec(text)
    if extra:
        raw = dict(extra, **raw)
    scenario = SCENARIOS.get(name)
    if scenario is None:
        raise KeyError(name)
    specs = {p.name: p for p in scenario.params}
    values = {}
    for p in scenario.params:
        value = raw.get(p.name)
        values[p.name] = p.default if value is None else _param_value(name, p, value)
    inner = {k: v for k, v in raw.items() if k not in specs}
    if inner and scenario.group == "schedule":
        targets = [t for t in (values.get("steps") or [values.get("fault")]) if t != "OK"]
        takes = {p.name for t in targets if t in SCENARIOS for p in SCENARIOS[t].params}
        for key in inner:
            if key not in takes:
                raise ValueError("%s has no parameter %r%s; %s take%s %s" % (
                    name, key, ", nor does %s" % " or ".join(targets) if targets else "",
                    "they" if targets else "it", "" if targets else "s", ", ".join(sorted(set(specs) | takes))))
        for t in targets:  # each value checked now, not when the schedule first fires
            if t in SCENARIOS:
                resolve(t, {k: v for k, v in inner.items() if k in {p.name for p in SCENARIOS[t].params}})
        values["inner"] = inner
    elif inner:
        key = next(iter(inner))
        raise ValueError("%s has no parameter %r; it takes %s" % (name, key, ", ".join(specs) if specs else "none"))
    return scenario, values


def _param_value(scenario, p, raw):
    if p.kind in ("int", "float"):
        try:
            value = int(raw) if p.kind == "int" else float(raw)
        except ValueError:
            raise ValueError("%s: %s must be %s number, not %r" % (
                scenario, p.name, "a whole" if p.kind == "int" else "a", raw if len(raw) <= 40 else raw[:40] + "..."))
        if value != value:  # NaN
            raise ValueError("%s: %s must be a number, not %r" % (scenario, p.name, raw))
        return min(max(value, p.low), p.high)
    if p.kind == "offsets":
        try:
            offsets = sorted({int(x) for x in raw.split(",") if x.strip()})
        except ValueError:
            raise ValueError("%s: %s must be whole numbers separated by commas, not %r" % (scenario, p.name, raw))
        if any(o < 1 or o > 1 << 20 for o in offsets):
            raise ValueError("%s: %s offsets must be from 1 to %d" % (scenario, p.name, 1 << 20))
        return offsets
    if p.kind == "choice":
        if raw not in p.low:
            raise ValueError("%s: %s must be one of %s, not %r" % (scenario, p.name, ", ".join(p.low), raw))
        return raw
    names_ = [n.strip() for n in raw.split(",")] if p.kind == "steps" else [raw]
    for n in names_:
        target = SCENARIOS.get(n)
        if n == "OK" and p.kind == "steps":
            continue
        if target is None or target.group == "schedule":
            raise ValueError("%s: %s must name %s, not %r" % (
                scenario, p.name, "scenarios (or OK)" if p.kind == "steps" else "a scenario that is not a schedule",
                n))
    return names_ if p.kind == "steps" else raw


def upload_reply(rule, nbytes):
    """The Reply an Upload rule gives for a body of ``nbytes`` bytes."""
    if nbytes == 0 and rule.empty is not None:
        return rule.empty
    if rule.max_bytes is not None and nbytes > rule.max_bytes:
        return rule.too_large
    body = dict(rule.ok)
    body["bytes"] = nbytes
    return Reply(200, body)


def describe(value):
    """A one-line description of a Reply, Stream or Upload, for tables and logs."""
    if isinstance(value, Reply):
        return "%d %s" % (value.status, value.content_type.split(";")[0])
    if isinstance(value, Stream):
        n = len(value.events)
        return "200 SSE, %d event%s%s" % (n, "" if n == 1 else "s", " + broken tail" if value.tail else "")
    if isinstance(value, ByProvider):
        return " / ".join("%s: %s" % (p, describe(v)) for p, v in zip(value._fields, value))
    if isinstance(value, Upload):
        parts = []
        if value.empty is not None:
            parts.append("empty: %d" % value.empty.status)
        if value.max_bytes is not None:
            parts.append("> %d MiB: %d" % (value.max_bytes // MIB, value.too_large.status))
        parts.append("else 200")
        return ", ".join(parts)
    if isinstance(value, ProviderError):
        status = value.status if isinstance(value.status, int) else "/".join(map(str, value.status.values()))
        return "%s %s" % (status, "HTML page" if value.html else "in the provider's shape")
    if isinstance(value, Fault):
        return value.kind
    raise TypeError("not a scenario answer: %r" % (value,))


def fault_table():
    """The README's fault catalogue, generated from the catalogue."""
    rows = ["| scenario | parameters (default, bounds) | routes | what a client sees |", "|---|---|---|---|"]
    for s in _FAULTS:
        params = "; ".join(
            "`%s=%s` (%s)" % (p.name, ",".join(map(str, p.default)) if isinstance(p.default, list) else p.default,
                              "%s..%s" % (p.low, p.high) if p.kind in ("int", "float") else
                              " / ".join(p.low) if p.kind == "choice" else p.doc)
            for p in s.params) or "-"
        where = APPLIES.get(s.applies, ", ".join(s.routes))
        if s.providers:
            where += " (%s)" % " and ".join(PROVIDER_NAMES[p] for p in s.providers)
        rows.append("| `%s` | %s | %s | %s |" % (s.name, params, where, s.doc))
    return "\n".join(rows) + "\n"


def markdown_table():
    """The README's table of the Flask mock's scenarios (and dpmock's fixed ones), from the catalogue."""
    rows = ["| scenario | route | answer | what it does |", "|---|---|---|---|"]
    for s in _CATALOGUE:
        for i, (route, value) in enumerate(s.routes.items()):
            rows.append("| %s | %s | %s | %s |" % (
                "`%s`" % s.name if i == 0 else "", route, describe(value), s.doc if i == 0 else ""))
    return "\n".join(rows) + "\n"
