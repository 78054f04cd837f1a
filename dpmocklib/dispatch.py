"""Dispatch: from a parsed request to its answer, in numbered steps."""

import json
import re

from .base import DPMOCK, HTTPError, Reply, SHARED, Stream, Upload, scenarios, start_regex_budget
from .faults import FAULTS, scenario_answer, select_scenario
from .providers import PROVIDERS, detect_provider, new_id, request_key
from .request import Answered, MAX_DISCARD, MAX_JSON_BODY, compiled_cache, read_json_body
from .routing import BODY_JSON, BODY_NONE, BODY_STREAM, percent_decode
from .rules import RuleError, apply_rules, check_test_id


def dispatch(w, req):
    """Answer one request whose head has been read, through its writer ``w``."""
    conn = w.conn
    start_regex_budget()
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
    req.voice = route.platform or req.provider
    if route.provider != DPMOCK:
        w.request_id = new_id("req_", 12)
        w.extra_headers = PROVIDERS[req.voice].answer_headers(w.request_id)
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
        if route.model_param is not None and isinstance(req.json, dict):
            req.json["model"] = req.params[route.model_param]  # the path names the model (Vertex AI)
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
        from .record import send_recorded  # record and replay load only when a rule replays
        return send_recorded(w, req, req.answer["raw"])
    route.handler(w, req)
    if req.has_body() and not req.body_done:
        conn.close_connection = True  # the handler answered without reading the body


def take_test_id(req):
    """The test namespace: a /_t/NAME/ path prefix (for clients that can only set a base URL), else
    an X-DP-Test-Id header. Each test's rules, counters and journal entries are its own."""
    if req.path.startswith("/_t/"):
        name, _, rest = req.path[4:].partition("/")
        name = percent_decode(name)  # /_t/tests%2Ftest_a.py%3A%3Atest_b/v1/...: any test id, encoded
        req.path = "/" + rest
    else:
        name = req.headers.get("x-dp-test-id")
        if name is not None and not name.strip():
            name = None  # an empty header (a client that always sends it) is no test, as X-DP-Scenario's is
    if name is not None:
        try:
            req.test = check_test_id(name)
        except RuleError as e:
            raise HTTPError(400, str(e), "bad_test_id")


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
        inner = params.get("inner") or {}
        takes = {p.name for p in scenarios.SCENARIOS[name].params}
        scenario, params = scenarios.resolve(name, {k: v for k, v in inner.items() if k in takes})
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
    provider = PROVIDERS[w.req.voice]
    status = pe.status if isinstance(pe.status, int) else pe.status[provider.family]
    if pe.html:
        return Reply(status, pe.html, scenarios.HTML)
    headers, details = provider.rate_limit(params["retry_after"]) if "retry_after" in params else ([], None)
    return w.error_reply(provider.scenario_error(pe, status, headers, details))


def refuse_body(w, req, err):
    """Before answering without the body: drain a small one so the connection stays usable, else close."""
    if not req.has_body() or req.body_done:
        return
    if req.headers.get("expect") is None and not req.chunked and req.length <= MAX_DISCARD and not req.body_bytes:
        # (a body read in part, by a handler that stopped midway, is not read again: the connection closes)
        req.drain()
    else:
        w.conn.close_connection = True
        if err is not None:
            err.close = True


MAX_JSON_VALUES = 2000000  #: values (arrays, objects, scalars) one JSON body may hold: bounds its memory
_JSON_STRINGS = r'"(?:[^"\\]|\\.)*"'


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def _decoder():
    """The request-body JSON decoder (made once: json.loads with options builds one per call)."""
    d = compiled_cache.get("json")
    if d is None:
        d = compiled_cache["json"] = json.JSONDecoder(parse_constant=_no_constant)
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
