"""Record and replay: answers forwarded upstream, saved as rules, served back byte for byte.

Imported only when recording or replaying."""

import binascii
import itertools
import json
import os
import re
import socket
import threading
import time

from .base import AZURE, BEDROCK, GEMINI, GEMINI_OPENAI, HTTPError, StartError, VERTEX, b64, read_regular_file, \
    scenarios
from .config import split_url
from .conversation import read_turn
from .providers import bearer_token, first_of
from .request import PIECE, CTL_BYTES, TOKEN_CHARS, compiled_cache, read_json_body
from .routing import BODY_STREAM, STREAM_NEVER, API_VERSIONS, percent_decode
from .rule import Rule
from .rules import MAX_FILE, RuleError
from .responses_api import remember_response
from .state import SECRET_HEADERS


#: Request headers never forwarded: hop-by-hop (RFC 9110 7.6.1) and framing, which http.client redoes.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                         "upgrade", "host", "content-length", "expect", "accept-encoding", "proxy-authorization",
                         "proxy-authenticate"))
#: Answer headers the writer makes itself, so the upstream's are not relayed.
_WRITER_HEADERS = frozenset(("date", "server", "content-type", "content-length"))
#: The only answer headers a recording keeps: request ids, dates, cookies and organisation names never.
RECORDED_HEADERS = ("content-type", "content-encoding", "retry-after", "retry-after-ms", "x-amzn-errortype")
#: Ids a recording normalises: values of these keys that start with one of these prefixes, and any
#: value of the _ALWAYS_IDS keys (Gemini's responseId has no prefix).
_ID_KEYS = ("id", "tool_call_id", "tool_use_id", "previous_response_id", "item_id", "toolUseId")
_ALWAYS_IDS = ("responseId", "response_id", "request_id")
ID_PREFIXES = ("chatcmpl-", "cmpl-", "modr-", "msg_", "resp_", "rs_", "fc_", "toolu_", "srvtoolu_", "call_", "req_",
               "tooluse_")
RECORDED_TIME, RECORDED_STAMP = 1700000000, "2023-11-14T22:13:20Z"  #: what times become in a recording
REDACTED = "[REDACTED]"
_SECRET_MIN = 4  #: shorter key values are not searched for (every "a" would go)
RECORD_BODY_MATCH = 4096  #: a route without a conversation matches its whole JSON body up to this size
_RECORD_RES = {
    "id": r'"(%s)"\s*:\s*"([^"\\]+)"' % "|".join(_ID_KEYS + _ALWAYS_IDS),
    "time": r'("(?:created|created_at|completed_at)"\s*:\s*)\d+(?:\.\d+)?',
    "stamp": r'("(?:createTime|updateTime|expirationTime)"\s*:\s*")[^"\\]*(")',
    "latency": r'("(?:latencyMs|invocationLatency|firstByteLatency)"\s*:\s*)\d+',  # Bedrock's
    "padding": r',\s*"p"\s*:\s*"[A-Za-z0-9]*"',  # Bedrock's random-length padding of stream events
}


def _record_re(name):
    """A normalisation pattern, compiled on first use (never at start-up)."""
    key = "record_" + name
    pattern = compiled_cache.get(key)
    if pattern is None:
        pattern = compiled_cache[key] = (re.compile(rb"\r\n\r\n|\n\n|\r\r") if name == "sse_end"
                                    else re.compile(_RECORD_RES[name]))
    return pattern


def recording_file(test):
    """The file a test's recordings go to: its id when that is a plain file name (lower case letters, digits,
    '.', '_', '-'; not "default"), else the id made one (other characters as '_') plus '~' and a digest of it.
    No plain name has a '~', and none differs from another by case alone (as on a case-blind file system),
    so two tests never share a file. The file says its test."""
    if test is None:
        return "default.json"
    safe = re.sub(r"[^a-z0-9._-]", "_", test).strip(".") or "_"
    if safe != test or safe == "default":
        safe = "%s~%s" % (re.sub(r"[^A-Za-z0-9._-]", "_", test).strip(".")[:80] or "_", _digest(test)[:10])
    return safe + ".json"


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
        self._unsigned_warned = False
        try:
            os.makedirs(self.dir, exist_ok=True)
            names = sorted(os.listdir(self.dir))
        except OSError as e:
            raise StartError("cannot make the --record folder %s: %s" % (self.dir, e.strerror))
        self.check_folder(names)
        if config.upstream_ca:  # a bad bundle stops the start, not the first request
            self.tls_context()

    def check_folder(self, names):
        """At start: remove the temporary files of a recorder that was killed mid-write (dpmock's own: its
        pattern, a process that is gone), and say in one line each which files are no recordings."""
        from .daemon import pid_alive
        for name in names:
            path = os.path.join(self.dir, name)
            m = _TMP_NAME.match(name)
            if m is not None:
                pid = int(m.group(1))
                if pid == os.getpid() or not pid_alive(pid):
                    try:
                        os.unlink(path)
                        self.log.info("record: removed %s, left by a recorder that stopped mid-write", path)
                    except OSError as e:
                        self.log.error("record: cannot remove %s: %s", path, e.strerror)
            elif name.endswith(".json"):
                problem = recording_problem(path)
                if problem is not None:
                    self.log.error("record: %s: %s; it is left alone (its test's answers are relayed, not "
                                   "recorded)", path, problem)

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
        up = upstream_for(self.upstreams, req)
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
            target = upstream_target(req, up)
            headers = forward_headers(req, up, body, self.via)
            if req.voice == BEDROCK:
                headers = self.signed(req, target, up, body, headers)
            conn.putrequest(req.method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise self.upstream_error(req, up, e, "cannot be reached")

    def signed(self, req, target, up, body, headers):
        """A SigV4-signed request, signed again for the upstream's host (the client signed for dpmock's) with
        the AWS credentials in dpmock's environment; without them it goes as the client signed it."""
        access, region = sigv4_scope(req.headers.get("authorization") or "")
        named = re.match(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com\Z", up.host)
        region = named.group(1) if named else region  # the upstream's own region, when its host says it
        if access is None:
            return headers  # a Bedrock API key (Bearer) is forwarded as it came
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            if not self._unsigned_warned:
                self._unsigned_warned = True
                self.log.error("record: Bedrock requests go upstream signed as the client signed them (for %s, not "
                               "%s): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) for "
                               "dpmock to sign them", req.headers.get("host") or "dpmock", up.host)
            return headers
        token = os.environ.get("AWS_SESSION_TOKEN")
        drop = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
        headers = [(k, v) for k, v in headers if k.lower() not in drop]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers += [("X-Amz-Date", stamp)] + ([("X-Amz-Security-Token", token)] if token else [])
        auth = sigv4_authorization(req.method, target, headers, body or b"", key, secret, region or "us-east-1",
                                   "bedrock", stamp)
        return headers + [("Authorization", auth)]

    def upstream_error(self, req, up, e, what):
        """The HTTPError (502, or 504 for a timeout) that says which upstream failed, and how."""
        timeout = isinstance(e, (socket.timeout, TimeoutError))
        if timeout:
            reason = "no answer within --io-timeout %ds" % self.config.io_timeout
        elif getattr(e, "verify_message", None):
            reason = "certificate verify failed: %s (--upstream-ca names the CA bundle to trust)" % e.verify_message
        else:
            reason = getattr(e, "strerror", None) or str(e) or "closed"
        message = "dpmock --record: the %s upstream %s %s: %s: %s" % (req.voice or req.provider, up.url, what,
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
        w.start_stream(resp.status, ctype, relay_headers(items, stream=True), raw=True)
        events = EventSplitter(stream_kind(ctype)) if keep else None
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
        remember_response(req, raw)  # with the upstream's own ids, which the client chains by
        secrets = request_secrets(req)
        scrub = lambda value: scrub_value(value, secrets, self.redact)  # noqa: E731
        match = recorded_match(req, turn, scrub)
        rid = "rec-" + _digest(json.dumps([req.test, match], sort_keys=True, ensure_ascii=False))[:12]
        norm = Normaliser(rid)
        if "body" in raw:
            raw["body"] = scrub(norm.text(raw["body"]))
        elif "body_base64" in raw:
            raw["body_base64"] = b64(scrub_bytes(binascii.a2b_base64(raw["body_base64"]), scrub))
        for ev in raw.get("events", ()):
            if "data" in ev:
                ev["data"] = scrub(norm.text(ev["data"]))
            elif "chunk" in ev:
                ev["chunk"] = scrub(norm.text(ev["chunk"]))
            else:
                ev["data_base64"] = b64(scrub_bytes(binascii.a2b_base64(ev["data_base64"]), scrub))
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
        except (OSError, ValueError, RecursionError) as e:
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
        name = recording_file(test)
        path = os.path.join(self.dir, name)
        with self.lock:
            rules = []
            if os.path.lexists(path):
                doc = json.loads(read_regular_file(path, MAX_FILE).decode("utf-8"))
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


#: A recorder's temporary file: .NAME.json.PID.N.tmp (written aside, then renamed over NAME.json).
_TMP_NAME = re.compile(r"\..+\.json\.([0-9]{1,9})\.[0-9]+\.tmp\Z")


def recording_problem(path):
    """What keeps a file of the record folder from being a recordings file, or None."""
    try:
        doc = json.loads(read_regular_file(path, MAX_FILE).decode("utf-8"))
    except OSError as e:
        return "cannot be read: %s" % (e.strerror or e)
    except (ValueError, RecursionError, MemoryError) as e:
        return "not JSON text: %s" % (getattr(e, "msg", None) or type(e).__name__)
    if not (isinstance(doc, list) or isinstance(doc, dict) and isinstance(doc.get("rules"), list)):
        return "not a recordings file ({\"test\", \"rules\": [...]})"
    return None


def _digest(text):
    import hashlib
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def upstream_for(upstreams, req):
    """Where this request goes: --upstream's URL for its provider or cloud, else the provider's host, or the
    cloud's host for the request's own region (Vertex AI: the path's location; Bedrock: the SigV4 scope's
    region, else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1). Azure's resource has no default."""
    name = req.route.platform or req.provider
    name = GEMINI if name == GEMINI_OPENAI else name
    up = upstreams.get(name)
    if up is not None:
        return up
    if name == AZURE:
        raise HTTPError(501, "dpmock --record needs --upstream azure=https://RESOURCE.openai.azure.com to forward "
                             "Azure OpenAI requests (the resource is yours to name)", "not_forwarded")
    if name == VERTEX:
        where = req.params.get("location", "")
        host = "aiplatform.googleapis.com" if where == "global" else where + "-aiplatform.googleapis.com"
    else:
        where = sigv4_scope(req.headers.get("authorization") or "")[1] or os.environ.get(
            "AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        host = "bedrock-runtime.%s.amazonaws.com" % where
    if not re.match(r"[a-z0-9-]{1,40}\Z", where):
        raise HTTPError(400, "dpmock --record: %r is no %s region to forward to" % (where[:40], name),
                        "bad_region")
    return split_url("https://" + host)


def upstream_target(req, up):
    """The upstream path: the client's, under the upstream's base path, with the provider's version
    (/v1, Gemini's /v1beta) when the client sent a bare one; the query as it came."""
    path = req.path
    upload = path.startswith("/upload/")
    parts = path.split("/")
    if req.route.platform in (None, VERTEX) and (parts[2] if upload and len(parts) > 2 else parts[1]) \
            not in API_VERSIONS:  # Azure's and Bedrock's paths have no version
        version = "/v1beta" if req.provider == GEMINI else "/v1"
        path = "/upload" + version + path[7:] if upload else version + path
    return up.base + path + ("?" + req.query_string if req.query_string else "")


def sigv4_scope(authorization):
    """(access key id, region) of a SigV4 Authorization value, or (None, None)."""
    if authorization[:17] != "AWS4-HMAC-SHA256 ":
        return None, None
    credential = authorization[17:].split(",")[0].strip()
    parts = credential[11:].split("/") if credential[:11] == "Credential=" else []
    return (parts[0], parts[2]) if len(parts) == 5 else (None, None)


def _aws_quote(text, safe="-_.~"):
    import urllib.parse
    return urllib.parse.quote(text, safe=safe)


def sigv4_authorization(method, target, headers, body, key, secret, region, service, stamp):
    """AWS Signature Version 4 (the Authorization value) for a request to ``target`` (path?query as sent),
    signing its Host and X-Amz-* headers; the path is encoded once more, as AWS does for all but S3."""
    import hashlib
    import hmac
    path, _, query = target.partition("?")
    pairs = [(p.partition("=")[0], p.partition("=")[2]) for p in query.split("&") if p]
    canonical_query = "&".join("%s=%s" % (_aws_quote(percent_decode(k, True)), _aws_quote(percent_decode(v, True)))
                               for k, v in sorted(pairs))
    signed = sorted((k.lower(), " ".join(v.split())) for k, v in headers
                    if k.lower() == "host" or k.lower().startswith("x-amz-"))
    names = ";".join(k for k, _ in signed)
    canonical = "\n".join([method, _aws_quote(path, "/~"), canonical_query, "".join("%s:%s\n" % kv for kv in signed),
                           names, hashlib.sha256(body).hexdigest()])
    scope = "%s/%s/%s/aws4_request" % (stamp[:8], region, service)
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    k = ("AWS4" + secret).encode("utf-8")
    for part in (stamp[:8], region, service, "aws4_request"):
        k = hmac.new(k, part.encode("utf-8"), hashlib.sha256).digest()
    signature = hmac.new(k, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (key, scope, names, signature)


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


def stream_kind(ctype):
    """How a streamed answer of this content type is cut into recorded events: SSE, AWS's event stream, or
    as it came (Gemini's JSON array)."""
    ctype = ctype.lower()
    return "sse" if "event-stream" in ctype else EVENTSTREAM if "vnd.amazon.eventstream" in ctype else "pieces"


EVENTSTREAM = "eventstream"


class EventSplitter:
    """A streamed answer cut into recorded events as it arrives: an SSE stream at its blank lines
    (each event whole), AWS's event stream into its messages (each one's event type and JSON, a chunk's
    bytes decoded: readable, redactable, framed again when served), anything else as the pieces came;
    together, every byte (or every message) in order."""

    def __init__(self, kind):
        self.kind, self.buf, self.events = kind, b"", []

    def feed(self, piece, t):
        self.buf += piece
        if self.kind == EVENTSTREAM:
            from .bedrock import read_message
            while True:
                message, used = read_message(self.buf)
                if message is None:
                    break
                self.events.append(dict(message, t=round(t, 3)))
                self.buf = self.buf[used:]
            return
        if self.kind == "sse":
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
            t = self.events[-1]["t"] if self.events else 0.0
            if self.kind == EVENTSTREAM:  # the start of a message that never ended: its bytes, as they came
                self.events.append({"t": t, "data_base64": b64(self.buf)})
            else:
                self.add(self.buf, t)
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
        text = _record_re("latency").sub(r"\g<1>0", _record_re("padding").sub("", text))
        return _record_re("stamp").sub(r"\g<1>%s\g<2>" % RECORDED_STAMP, text)


def request_secrets(req):
    """Every key the request carries (headers, ?key=), longest first: none may reach a recording."""
    found = set()
    for name in SECRET_HEADERS + ("api-key",):
        for value in req.headers.all(name):
            found.update((value.strip(), bearer_token(value.strip())))
    found.update(v.strip() for v in req.query.get("key", ()))
    if req.voice == BEDROCK:  # what dpmock signs again with (Recorder.signed)
        found.update(os.environ.get(n) or "" for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                       "AWS_SESSION_TOKEN"))
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


def scrub_bytes(data, scrub):
    """Bytes that are not UTF-8 text, scrubbed as text all the same: the bytes that are no character pass
    through as they are (surrogateescape), so keys and --record-redact matches go from binary bodies too."""
    return scrub(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def recorded_match(req, turn, scrub):
    """A recorded rule's match, from the request: provider, route, model, the exact last user text, turn
    and tool result (or a small body, whole, on routes without a conversation), stream and query."""
    route = req.route
    match = {"provider": req.provider, "platform": route.platform or "", "route": route.name}
    model = turn.model if turn is not None else req.params.get("model") or first_of(req.json, "model")
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
    if route.stream != STREAM_NEVER or route.reader is not None:  # Bedrock's /converse and /converse-stream
        match["stream"] = route.streaming(req)  # share a name; a stream and a whole answer never meet
    query = {k: v[0] for k, v in req.query.items() if k != "key"}
    if req.provider == GEMINI and route.stream != STREAM_NEVER:
        query.setdefault("alt", None)  # alt=sse and the JSON array are two answers
    if query:
        match["query"] = scrub(query)
    return match


def _event_type(text):
    """An Anthropic event's ``type`` (what a recorded InvokeModel chunk is), without parsing all of it."""
    m = re.search(r'"type"\s*:\s*"([^"\\]*)"', text)
    return m.group(1) if m else None


#: The forms of a recorded stream event (each with ``t``): bytes as text or base64, or AWS event stream messages.
_EVENT_FORMS = ({"data"}, {"data_base64"}, {"chunk"}, {"event", "data"}, {"exception", "data"})


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
        if not k or not TOKEN_CHARS.issuperset(k.encode("latin-1", "replace")) or not isinstance(v, str) \
                or any(c in CTL_BYTES.decode("latin-1") for c in v):
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
        if not isinstance(ev, dict) or set(ev) - {"t"} not in _EVENT_FORMS:
            raise RuleError("%s must be {t, data} or {t, data_base64} (an event stream's: {t, chunk}, {t, event, "
                            "data} or {t, exception, data})" % at)
        _check_seconds(ev.get("t"), at + ".t")
        for name in ("data", "chunk", "event", "exception"):
            if name in ev and not isinstance(ev[name], str):
                raise RuleError("%s.%s must be a string" % (at, name))
            if name in ("event", "exception") and name in ev and not 0 < len(ev[name].encode("utf-8")) <= 255:
                raise RuleError("%s.%s must be an event type of 1 to 255 bytes" % (at, name))
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
    remember_response(req, raw)  # a replayed Responses answer can be chained to, as a recorded one was
    headers = [(k, v) for k, v in raw.get("headers", {}).items() if k.lower() != "content-type"]
    ctype = next((v for k, v in raw.get("headers", {}).items() if k.lower() == "content-type"), scenarios.JSON)
    paced = w.server.config.replay_timing == "recorded"
    if paced:
        w.pause(raw.get("t", 0))
    if "events" not in raw:
        body = raw["body"].encode("utf-8") if "body" in raw else binascii.a2b_base64(raw["body_base64"])
        w.send_bytes(raw["status"], body, ctype, headers)
        return
    kind = stream_kind(ctype)
    sse = kind == "sse"
    if kind == EVENTSTREAM:  # messages framed again (each one stream item, as dpmock's own are)
        from .bedrock import ConverseFramer, InvokeFramer
        w.framer = (InvokeFramer if any("chunk" in ev for ev in raw["events"]) else ConverseFramer)(req)
    else:
        w.json_array = not sse  # Gemini's JSON array: the SSE-only faults leave it alone
    w.start_stream(raw["status"], ctype, headers)
    last = 0.0
    for ev in raw["events"]:
        if paced:
            w.pause(ev["t"] - last)
            last = max(last, ev["t"])
        if "chunk" in ev:
            w.stream_text(ev["chunk"], ev["chunk"], _event_type(ev["chunk"]))
        elif "event" in ev:
            w.stream_text(ev["data"], ev["data"], ev["event"])
        elif "exception" in ev:
            from .bedrock import exception_message
            w.send_chunk(exception_message(ev["exception"], ev["data"]))
        elif "data" not in ev or kind == EVENTSTREAM:  # bytes that were no message: as they came
            w.send_chunk(binascii.a2b_base64(ev["data_base64"]) if "data" not in ev else ev["data"].encode("utf-8"))
        elif "data" not in ev:
            w.send_chunk(binascii.a2b_base64(ev["data_base64"]))
        elif sse:
            w.stream_text(ev["data"], *sse_parts(ev["data"]))
        elif ev["data"].strip(" \t\r\n,[]"):
            w.stream_text(ev["data"], ev["data"].strip(" \t\r\n,[]"))
        else:  # a bare "]" or separator: not an item
            w.send_chunk(ev["data"].encode("utf-8"))
    w.end_stream()
