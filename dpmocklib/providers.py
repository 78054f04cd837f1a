"""Providers: one row each (error shape, keys, models, request ids, rate limits, stream errors)."""

import itertools
import json
import os
import re
import time
from collections import namedtuple

from .base import ANTHROPIC, AZURE, BEDROCK, DPMOCK, GEMINI, GEMINI_OPENAI, HTTPError, OPENAI, SHARED, VERTEX, scenarios


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


def _azure_error(e, request_id):
    """OpenAI's shape, with a code always (Azure's own errors have a code and a message only)."""
    body = _openai_error(e, request_id)
    if body["error"]["code"] is None:
        body["error"]["code"] = str(e.status)
    return body


def _azure_headers(rid):
    return [("apim-request-id", rid), ("x-request-id", rid), ("x-ms-region", "East US"),
            ("x-ms-client-request-id", rid)]


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


def ascii_json(obj):
    return json.dumps(obj, separators=(",", ":"))


def _no_headers(e):
    return ()


class Provider(namedtuple("Provider", "name error_body answer_headers key_headers missing_key bad_key "
                                      "missing_model rate_limit stream_error scenario_error field_path family "
                                      "error_headers", defaults=(_no_headers,))):
    """How one provider says things: every ``if provider == ...`` of the server lives in these rows.

    ``error_body(HTTPError, request id)`` -> JSON body; ``answer_headers(request id)`` -> headers
    on every answer; ``key_headers``: where its clients put the key, in lookup order;
    ``missing_key()``/``bad_key(key)``/``missing_model(model, action)`` -> HTTPError;
    ``rate_limit(seconds)`` -> (headers, error details); ``stream_error`` -> the in-stream error's
    SSE text; ``scenario_error(ProviderError, status, headers, details)`` -> HTTPError;
    ``field_path(parts)`` -> how its error messages name a field; ``family``: the provider whose scenario
    statuses and messages it uses (a cloud's row: the provider whose error shape it has);
    ``error_headers(HTTPError)`` -> headers an error answer carries (Bedrock's error type).
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
        lambda: "data: %s\n\n" % ascii_json({"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": None, "code": None}}),
        lambda pe, status, headers, details: HTTPError(status, pe.openai[2], pe.openai[1], etype=pe.openai[0],
                                                       headers=headers),
        lambda parts: "".join("[%d]" % p if isinstance(p, int) else ("." if i else "") + p
                              for i, p in enumerate(parts)), OPENAI),
    ANTHROPIC: Provider(
        ANTHROPIC, _anthropic_error, _anthropic_headers,
        ("x-api-key", "authorization"),
        lambda: HTTPError(401, "x-api-key header is required", etype="authentication_error"),
        lambda key: HTTPError(401, "invalid x-api-key", etype="authentication_error"),
        lambda model, action: HTTPError(404, "model: %s" % model, etype="not_found_error"),
        _anthropic_rate_limit,
        lambda: "event: error\ndata: %s\n\n" % ascii_json({"type": "error", "error": {
            "type": "overloaded_error", "message": "Overloaded"}}),
        lambda pe, status, headers, details: HTTPError(status, pe.anthropic[1], etype=pe.anthropic[0],
                                                       headers=headers),
        lambda parts: ".".join(str(p) for p in parts), ANTHROPIC),
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
        lambda: ascii_json({"error": {"code": 500, "message": "An internal error has occurred. Please retry.",
                                    "status": "INTERNAL"}}),
        lambda pe, status, headers, details: HTTPError(status, pe.gemini[1], etype=pe.gemini[0], headers=headers,
                                                       details=details),
        lambda parts: "".join("[%d]" % p if isinstance(p, int) else ("." if i else "") + p
                              for i, p in enumerate(parts)), GEMINI),
}
PROVIDERS[DPMOCK] = PROVIDERS[SHARED] = PROVIDERS[OPENAI]._replace(name=DPMOCK, answer_headers=lambda rid: [])
#: Azure OpenAI: the api-key header (or Entra ID's Bearer token), Azure's codes on OpenAI's error shape.
PROVIDERS[AZURE] = PROVIDERS[OPENAI]._replace(
    name=AZURE, error_body=_azure_error, answer_headers=_azure_headers, key_headers=("api-key", "authorization"),
    missing_key=lambda: HTTPError(401, "Access denied due to invalid subscription key or wrong API endpoint. Make "
                                       "sure to provide a valid key for an active subscription and use a correct "
                                       "regional API endpoint for your resource.", "401"),
    bad_key=lambda key: HTTPError(401, "Access denied due to invalid subscription key or wrong API endpoint. Make "
                                       "sure to provide a valid key for an active subscription and use a correct "
                                       "regional API endpoint for your resource.", "401"),
    missing_model=lambda model, action: HTTPError(404, "The API deployment for this resource does not exist. If you "
                                                       "created the deployment within the last 5 minutes, please wait "
                                                       "a moment and try again.", "DeploymentNotFound"))
#: Gemini's OpenAI-compatible endpoint (/v1beta/openai/...): OpenAI's shapes on Google's service.
PROVIDERS[GEMINI_OPENAI] = PROVIDERS[OPENAI]._replace(name=GEMINI_OPENAI)
#: Vertex AI (Gemini and Anthropic models): OAuth Bearer tokens, and Google's error shape for every error.
PROVIDERS[VERTEX] = PROVIDERS[GEMINI]._replace(
    name=VERTEX, key_headers=("authorization",),
    missing_key=lambda: HTTPError(401, "Request is missing required authentication credential. Expected OAuth 2 "
                                       "access token, login cookie or other valid authentication credential. See "
                                       "https://developers.google.com/identity/sign-in/web/devconsole-project.",
                                  etype="UNAUTHENTICATED"),
    bad_key=lambda key: HTTPError(401, "Request had invalid authentication credentials. Expected OAuth 2 access "
                                       "token, login cookie or other valid authentication credential.",
                                  etype="UNAUTHENTICATED"),
    missing_model=lambda model, action: HTTPError(404, "Publisher Model `%s` was not found or your project does "
                                                       "not have access to it." % model, etype="NOT_FOUND"))


#: Bedrock's exception for each status (its error type, in x-amzn-ErrorType), and what it says by default.
_BEDROCK_ERRORS = {
    400: ("ValidationException", None), 403: ("AccessDeniedException", None),
    404: ("ResourceNotFoundException", None),
    408: ("ModelTimeoutException", "Model has timed out in processing the request. Try your request again."),
    413: ("ValidationException", "Input is too long for requested model."),
    424: ("ModelErrorException", None),
    429: ("ThrottlingException", "Too many requests, please wait before trying again."),
    500: ("InternalServerException", "The system encountered an unexpected error during processing. Try your "
                                     "request again."),
    503: ("ServiceUnavailableException", "Bedrock is unable to process your request."),
}


def bedrock_type(e):
    """The Bedrock exception an HTTPError is (its own, when it names one: ``...Exception``)."""
    if e.etype and e.etype.endswith("Exception"):
        return e.etype
    return _BEDROCK_ERRORS.get(e.status, ("InternalServerException" if e.status >= 500 else "ValidationException",
                                          None))[0]


def _bedrock_scenario_error(pe, status, headers, details):
    """A scenario's error as Bedrock says it: its exception for the status (529 is 503 there), its words."""
    status = 503 if status == 529 else status
    etype, message = _BEDROCK_ERRORS.get(status, ("InternalServerException", None))
    return HTTPError(status, message or pe.anthropic[1], etype=etype, headers=headers)


#: Amazon Bedrock (Anthropic's models): SigV4 or a Bedrock API key in Authorization, AWS's error shape
#: ({"message"} with the type in x-amzn-ErrorType) and request id header.
PROVIDERS[BEDROCK] = PROVIDERS[ANTHROPIC]._replace(
    name=BEDROCK, error_body=lambda e, rid: {"message": e.message},
    answer_headers=lambda rid: [("x-amzn-RequestId", rid)], key_headers=("authorization",),
    missing_key=lambda: HTTPError(403, "Missing Authentication Token", etype="MissingAuthenticationTokenException"),
    bad_key=lambda key: HTTPError(403, "The security token included in the request is invalid.",
                                  etype="UnrecognizedClientException"),
    missing_model=lambda model, action: HTTPError(400, "The provided model identifier is invalid.",
                                                  etype="ValidationException"),
    rate_limit=lambda wait: ([], None), scenario_error=_bedrock_scenario_error,
    error_headers=lambda e: [("x-amzn-ErrorType", bedrock_type(e) + ":http://internal.amazon.com/coral/"
                                                                   "com.amazon.bedrock/")])


_ID_PREFIX = os.urandom(4).hex()  #: differs per process, so ids stay unique across restarts
_ID_COUNTER = itertools.count(1)


def new_id(prefix, nbytes=12):
    """A unique id of ``2 * nbytes`` hex digits: no system call per id (they are made per request)."""
    return "%s%s%0*x" % (prefix, _ID_PREFIX, 2 * nbytes - 8, next(_ID_COUNTER))


def rfc3339(t, fraction=True):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return stamp + (".%06dZ" % int((t % 1) * 1e6) if fraction else "Z")


_WORDS = r"\S+"  #: a token (patterns compile on first use, not at start-up)
TOKEN_PIECES = r"\S+\s*"  #: a token with the spaces after it
MEDIA_TOKENS = 85  #: what one image, document or file part counts in a prompt


def count_tokens(texts, media=0):
    """dpmock's token rule: one token per run of non-space characters, MEDIA_TOKENS per media part."""
    return max(1, sum(len(re.findall(_WORDS, t)) for t in texts) + MEDIA_TOKENS * media)


def bearer_token(value):
    """The key in an Authorization value: a Bearer token, or a SigV4 signature's access key id."""
    if value[:17] == "AWS4-HMAC-SHA256 ":  # Credential=AKID/date/region/service/aws4_request, SignedHeaders=...
        credential = value[17:].split(",")[0].strip()
        return credential[11:].split("/")[0] if credential[:11] == "Credential=" else ""
    return value[7:] if value[:7].lower() == "bearer " else "" if value.lower() == "bearer" else value


def request_key(req):
    """The API key, looked up where the provider's clients put it (Anthropic routes: x-api-key first)."""
    if req.key is False:
        req.key = find_key(req.headers, req.route, req.query)
    return req.key


def find_key(h, route, query):
    order = PROVIDERS[(route.platform or route.provider) if route is not None and (
        route.platform or route.provider == ANTHROPIC) else OPENAI].key_headers
    for name in order:
        value = h.get(name)
        if value is not None:
            return bearer_token(value.strip()).strip() or None  # "Bearer " with nothing after it is no key
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
    voice = PROVIDERS[req.voice or req.provider]
    if not key:
        raise voice.missing_key()
    if key in scenarios.BAD_KEYS or key.startswith(req.server.refused_prefixes):
        raise voice.bad_key(key)


def mask_key(key):
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)


def check_model(req, model, action="generateContent"):
    """Refuse a model id containing ``does-not-exist``, in the provider's words."""
    if scenarios.MISSING_MODEL_MARK in model:
        raise PROVIDERS[req.voice or req.provider].missing_model(model, action)


def first_of(obj, *names):
    """The first present key of ``names`` (camelCase or snake_case spellings)."""
    if isinstance(obj, dict):
        for n in names:
            if n in obj:
                return obj[n]
    return None
