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


class Scenario(namedtuple("Scenario", "name doc routes")):
    """A named scenario: route name -> Reply | Stream | Upload."""

    __slots__ = ()


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

_OPENAI_429 = Reply(429, {"error": {
    "message": "Rate limit reached for requests in organization org-dpmock on requests per min (RPM): Limit 60, "
               "Used 60, Requested 1. Please try again in 1s.",
    "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
    headers=(("retry-after", "1"), ("retry-after-ms", "1000"), ("x-ratelimit-limit-requests", "60"),
             ("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "1s"),
             ("x-ratelimit-limit-tokens", "30000"), ("x-ratelimit-remaining-tokens", "30000"),
             ("x-ratelimit-reset-tokens", "0s")))
_ANTHROPIC_429 = Reply(429, {"type": "error", "error": {
    "type": "rate_limit_error", "message": "This request would exceed the rate limit for your organization of 50 "
                                          "requests per minute. Please try again in 1s."}},
    headers=(("retry-after", "1"), ("anthropic-ratelimit-requests-limit", "50"),
             ("anthropic-ratelimit-requests-remaining", "0"),
             ("anthropic-ratelimit-requests-reset", "2025-01-01T00:00:01Z")))
_GEMINI_429 = Reply(429, {"error": {
    "code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED",
    "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]}})

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
    Scenario("RATE_LIMITED", "429 in each provider's own shape, with its rate-limit headers (`retry-after`, "
             "`x-ratelimit-*` or `anthropic-ratelimit-*`; Gemini's `RetryInfo` detail).", {
        "chat": _OPENAI_429, "images": _OPENAI_429,
        "messages": _ANTHROPIC_429, "messages_count_tokens": _ANTHROPIC_429,
        "gemini_generate": _GEMINI_429, "gemini_stream": _GEMINI_429, "gemini_count_tokens": _GEMINI_429,
        "gemini_predict": _GEMINI_429,
        "models": ByProvider(_OPENAI_429, _ANTHROPIC_429, _GEMINI_429),
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

SCENARIOS = {s.name: s for s in _CATALOGUE}

# --------------------------------------------------------------------------- provider fixtures

#: A model id containing this is unknown to every provider (404); every other id exists.
MISSING_MODEL_MARK = "does-not-exist"

#: OpenAI models: (id, created, owned_by).
OPENAI_MODELS = (
    ("gpt-4o", 1715367049, "system"), ("gpt-4o-mini", 1721172741, "system"), ("gpt-4.1", 1744316542, "system"),
    ("gpt-4.1-mini", 1744318173, "system"), ("o3-mini", 1737146383, "system"), ("o4-mini", 1744225351, "system"),
    ("gpt-5", 1754425777, "system"), ("gpt-5-mini", 1754425928, "system"), ("dall-e-3", 1698785189, "system"),
    ("gpt-image-1", 1745517030, "system"), ("text-embedding-3-small", 1705948997, "system"),
)

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
    ("imagen-4.0-generate-001", "Imagen 4", 480, 8192, False),
    ("imagen-3.0-generate-002", "Imagen 3", 480, 8192, False),
)

# --------------------------------------------------------------------------- helpers

def names():
    """Scenario names in catalogue order."""
    return [s.name for s in _CATALOGUE]


def get(name):
    """The scenario called ``name``, or None."""
    return SCENARIOS.get(name)


def answer(name, route):
    """What scenario ``name`` answers on ``route``, or None when it does not apply there."""
    scenario = SCENARIOS.get(name)
    return scenario.routes.get(route) if scenario else None


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
    raise TypeError("not a scenario answer: %r" % (value,))


def markdown_table():
    """The README's scenario table, generated from the catalogue."""
    rows = ["| scenario | route | answer | what it does |", "|---|---|---|---|"]
    for s in _CATALOGUE:
        for i, (route, value) in enumerate(s.routes.items()):
            rows.append("| %s | %s | %s | %s |" % (
                "`%s`" % s.name if i == 0 else "", route, describe(value), s.doc if i == 0 else ""))
    return "\n".join(rows) + "\n"
