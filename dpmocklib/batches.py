"""Batches: OpenAI's Batch API (/v1/batches over a JSONL input file) and Anthropic's Message Batches
(/v1/messages/batches), each request answered by the same engine and rules as a direct call (answer_inline),
the results read back as JSONL."""

import json
import threading
import time

from .base import ANTHROPIC, GEMINI, HTTPError, OPENAI, bounded_int, clip, scenarios, start_regex_budget
from .faults import NO_FAULT
from .files import file_record, openai_file
from .providers import check_key, check_model, invalid, new_id, rfc3339
from .request import Request
from .routing import anthropic_page, int_arg, page_body
from .writer import ResponseWriter, encode_body


ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations",
             "/v1/images/generations")  #: (the SDK's others, /v1/images/edits and /v1/videos, dpmock does not batch)
MAX_REQUESTS = 50000  #: requests one batch may hold (the real limit)
MAX_OUTPUT = 64 * 1024 * 1024  #: bytes of answers one batch's files hold; requests past it fail, saying so
WINDOW = 24 * 3600


# ----------------------------------------------------------------------------- one request, answered inline

class CaptureWriter(ResponseWriter):
    """A writer with no connection: the answer a handler gives is kept (status, body), not sent."""

    def __init__(self, server, req):  # noqa: super's needs a connection; these are the fields handlers use
        self.conn, self.server, self.req = None, server, req
        self.fault, self.sent, self.status, self.events = NO_FAULT, 0, 0, 0
        self.headers_sent, self.chunked = False, False
        self.extra_headers, self.json_array, self.entry, self.ended = (), False, None, None
        self.request_id, self.stream_error, self.framer = new_id("req_", 12), None, None
        self.answer = None

    def send_bytes(self, status, body, ctype, headers=(), close=False):
        self.answer = (status, body)

    def start_stream(self, status, ctype, headers=(), close=False, raw=False):
        raise HTTPError(400, "a batch request cannot stream: leave \"stream\" out of its body", param="body.stream")


def answer_inline(server, parent, path, body):
    """(status, answer JSON, request id) of ``POST path`` with ``body``, as a client with the parent request's
    key and test would get it: the route's reader, the rules (a rule's error, scenario or recorded answer
    included; a regex budget of its own) and its handler. Whatever goes wrong is that request's answer."""
    from .dispatch import provider_error
    from .faults import scenario_answer
    from .rules import apply_rules
    req = Request("POST", path, "HTTP/1.1", parent.headers)
    req.server, req.test, req.json = server, parent.test, body
    w = CaptureWriter(server, req)
    start_regex_budget()
    try:
        req.route, req.params = server.router.match("POST", path)
        req.provider = req.voice = req.route.provider
        req.body_bytes = len(encode_body(body, compact=True))
        answer = apply_rules(w, req)
        if answer is not None and "raw" in answer:  # a recorded answer: its status and body, as recorded
            raw = answer["raw"]
            return raw["status"], _parsed(raw.get("body", "").encode("utf-8")), w.request_id
        if answer is not None and "scenario" in answer:  # a rule's scenario: its fixed answer or error, if any
            scenario, params = scenarios.resolve(answer["scenario"])
            value = scenario_answer(scenario, req.route, req.provider)
            if isinstance(value, scenarios.ProviderError):
                value = provider_error(w, value, params)
            if isinstance(value, scenarios.Reply):
                return value.status, _parsed(encode_body(value.body)), w.request_id
        req.answer = answer
        req.route.handler(w, req)
        status, data = w.answer
    except HTTPError as e:
        reply = w.error_reply(e)
        status, data = reply.status, encode_body(reply.body, compact=True)
    except Exception as e:  # noqa: BLE001 - one request of a batch: its own 500, the batch goes on
        reply = w.error_reply(HTTPError(500, "dpmock internal error answering this batch request: %s: %s" % (
            type(e).__name__, e)))
        status, data = reply.status, encode_body(reply.body, compact=True)
    return status, _parsed(data), w.request_id


def _parsed(data):
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


# ----------------------------------------------------------------------------- the store

class BatchStore:
    """The batches made: the last LIMIT, holding at most BYTES of requests and results (the oldest go first),
    shared by every connection."""

    LIMIT = 1000
    BYTES = 256 * 1024 * 1024

    def __init__(self):
        self.lock = threading.Lock()
        self.batches = {}  # id -> Batch, oldest first
        self.size = 0

    def add(self, batch):
        with self.lock:
            self.batches[batch.id] = batch
            self.size += batch.size
            self._evict()

    def grew(self, batch, n):
        """A batch holds ``n`` more bytes (its results) or fewer (its requests, once answered)."""
        with self.lock:
            batch.size += n
            if self.batches.get(batch.id) is batch:
                self.size += n
                self._evict()

    def _evict(self):
        while len(self.batches) > self.LIMIT or (self.size > self.BYTES and len(self.batches) > 1):
            self.size -= self.batches.pop(next(iter(self.batches))).size

    def get(self, batch_id):
        with self.lock:
            return self.batches.get(batch_id)

    def listing(self):
        with self.lock:
            return list(self.batches.values())

    def remove(self, batch_id):
        with self.lock:
            batch = self.batches.pop(batch_id, None)
            self.size -= batch.size if batch is not None else 0
            return batch


def store(server):
    """The server's batch store, made at the first batch (a run that makes none never holds one)."""
    with _MADE:
        if getattr(server, "batches", None) is None:
            server.batches = BatchStore()
    return server.batches


_MADE = threading.Lock()
STEPS = ("validating", "in_progress", "finalizing")


class Batch:
    """One batch: its input (the file's bytes, not a copy: read again when it runs), its pace (``step``
    seconds per status) and how it ends (``outcome``)."""

    def __init__(self, req, content, count, errors, step, outcome, prefix="batch_", size=0):
        self.id = new_id(prefix, 12)
        self.body = {k: req.json.get(k) for k in ("endpoint", "input_file_id", "metadata")}  #: what its object says
        self.content, self.count, self.errors = content, count, errors
        self.provider, self.size = req.provider, size  #: bytes it holds of its own (not a file's)
        self.step, self.outcome = step, outcome
        self.headers, self.test = req.headers, req.test  #: its requests are answered with its maker's key and test
        self.created = time.time()
        self.cancelled = self.created + step if outcome == "cancelled" else None  #: when cancel was asked
        if outcome == "failed" and not errors:
            self.errors = [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached in organization "
                            "org-dpmock. Please try again once some in_progress batches have been completed.",
                            "param": None, "line": None}]
        self.results = None  #: (output file id, error file id, counts), once made
        self.lock = threading.Lock()

    def status(self, now):
        """(status, {status: when it began}) at ``now``."""
        t0, step = self.created, self.step
        if self.errors:  # refused once validating is over
            return ("validating", {}) if now < t0 + step else ("failed", {"failed_at": t0 + step})
        stamps = {"in_progress_at": t0 + step, "finalizing_at": t0 + 2 * step}
        if self.cancelled is not None and now >= self.cancelled:
            stamps = {k: v for k, v in stamps.items() if v <= self.cancelled}
            stamps["cancelling_at"] = self.cancelled
            if now < self.cancelled + step:
                return "cancelling", stamps
            return "cancelled", dict(stamps, cancelled_at=self.cancelled + step)
        for i, name in enumerate(STEPS):
            if now < t0 + (i + 1) * step:
                return name, {k: v for k, v in stamps.items() if v <= now}
        end = t0 + 3 * step
        if self.outcome == "expired":
            return "expired", dict(stamps, expired_at=end)
        return "completed", dict(stamps, completed_at=end)


# ----------------------------------------------------------------------------- the API

def handle_batch_create(w, req):
    check_key(req)
    body = req.json
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise invalid("Missing required parameter: '%s'." % name, name, "missing_required_parameter")
    if body["endpoint"] not in ENDPOINTS:
        raise invalid("Invalid value for 'endpoint': %r. Supported values are: %s." % (
            clip(body["endpoint"]), ", ".join("'%s'" % e for e in ENDPOINTS)), "endpoint", "invalid_value")
    if body["completion_window"] != "24h":
        raise invalid("Invalid value for 'completion_window': %r. Supported values are: '24h'." % clip(
            body["completion_window"]), "completion_window", "invalid_value")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())):
        raise invalid("Invalid 'metadata': up to 16 string keys (64 characters) with string values (512).",
                      "metadata", "invalid_value")
    file_id = body["input_file_id"]
    record = w.server.files.get(OPENAI, file_id[5:] if file_id.startswith("file-") else file_id)
    if record is None:
        raise HTTPError(404, "No such File object: %s" % clip(file_id), param="input_file_id")
    if record.get("purpose") != "batch" or record.get("content") is None:
        raise invalid("The file %s was not uploaded with purpose 'batch'." % clip(file_id), "input_file_id",
                      "invalid_file_purpose")
    lines, errors = read_lines(record["content"], body["endpoint"])
    step, outcome = w.fault[0].batch(w.fault[1]) if hasattr(w.fault[0], "batch") else (0.0, "completed")
    batch = Batch(req, record["content"], len(lines), errors, step, outcome)
    store(w.server).add(batch)
    w.send_json(200, batch_object(w.server, batch, batch.created, fresh=True))


def read_lines(content, endpoint):  # noqa: C901 - one check per rule of the real service
    """The requests of a batch's JSONL input, and what is wrong with it, as the real service checks it:
    each line a JSON object with a unique custom_id, method POST, the batch's endpoint as url and a body."""
    lines, errors, seen = [], [], set()

    def error(code, message, n, param=None):
        if len(errors) < 100:
            errors.append({"code": code, "message": message, "param": param, "line": n})
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        error("invalid_json_line", "The file is not UTF-8 text.", 1)
        return lines, errors
    from .dispatch import parse_json_body  # a line is read as a request body is: bounded, no NaN, no lone surrogate
    for n, line in enumerate(text.split("\n"), 1):  # JSONL's lines end at \n only (not U+2028 and the like)
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        try:
            item = parse_json_body(line.encode("utf-8"))
        except HTTPError:
            error("invalid_json_line", "This line is not parseable as valid JSON.", n)
            continue
        custom = item.get("custom_id")
        if not isinstance(custom, str) or not custom:
            error("missing_required_parameter", "Missing required parameter: 'custom_id'.", n, "custom_id")
        elif custom in seen:  # a string: seen holds strings only
            error("duplicate_custom_id", "The custom_id for this request is a duplicate of another request. The "
                                         "custom_id parameter must be unique for each request in a batch.", n,
                  "custom_id")
        if isinstance(custom, str):
            seen.add(custom)
        if item.get("method") != "POST":
            error("invalid_method", "The method for this request is invalid: only POST is supported.", n, "method")
        if item.get("url") != endpoint:
            error("mismatched_endpoint", "The provided url for this request does not match the batch endpoint %s."
                  % endpoint, n, "url")
        if not isinstance(item.get("body"), dict):
            error("missing_required_parameter", "Missing required parameter: 'body'.", n, "body")
        if not errors:
            lines.append((custom, item.get("body")))
    if not lines and not errors:
        error("empty_file", "The batch input file is empty.", 1)
    if len(lines) > MAX_REQUESTS:
        error("too_many_requests", "The batch input file has %d requests; the limit is %d." % (len(lines),
                                                                                           MAX_REQUESTS), 1)
    return lines, errors


def batch_object(server, batch, now, fresh=False):
    """The Batch object as it is at ``now`` (its results made when it has finished); ``fresh``: as the create
    call answers it, validating."""
    status, stamps = ("validating", {}) if fresh else batch.status(now)
    out = {"id": batch.id, "object": "batch", "endpoint": batch.body["endpoint"], "errors": None,
           "input_file_id": batch.body["input_file_id"], "completion_window": "24h", "status": status,
           "output_file_id": None, "error_file_id": None, "created_at": int(batch.created),
           "in_progress_at": None, "expires_at": int(batch.created) + WINDOW, "finalizing_at": None,
           "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
           "request_counts": {"total": batch.count, "completed": 0, "failed": 0},
           "metadata": batch.body.get("metadata")}
    for name, when in stamps.items():
        out[name] = int(when) if when is not None else None
    if batch.errors and status == "failed":
        out["errors"] = {"object": "list", "data": batch.errors}
        out["request_counts"]["total"] = 0
    elif status in ("completed", "expired", "cancelled"):
        output, error, counts = results(server, batch, status)
        out.update(output_file_id=output, error_file_id=error, request_counts=counts)
    elif status in ("in_progress", "finalizing", "cancelling"):
        done = batch.count if status == "finalizing" else batch.count // 2
        out["request_counts"]["completed"] = done
    return out


def results(server, batch, status):
    """The batch's output and error files (made once): each request answered as a direct call would be."""
    with batch.lock:
        if batch.results is None:
            ok, failed, size = [], [], 0
            run = batch.count if status == "completed" else batch.count // 2
            requests = batch.content if batch.provider == ANTHROPIC else read_lines(batch.content,
                                                                                    batch.body["endpoint"])[0]
            path = "/v1/messages" if batch.provider == ANTHROPIC else batch.body["endpoint"]
            for i, (custom, body) in enumerate(requests):
                rid = new_id("batch_req_", 12)
                if i >= run or size > MAX_OUTPUT:  # expired or cancelled before it ran, or too much already
                    code = "batch_expired" if status == "expired" else "batch_cancelled" if i >= run else \
                        "output_limit"
                    failed.append({"id": rid, "custom_id": custom, "response": None, "error": {
                        "code": code, "message": {
                            "batch_expired": "This request could not be executed before the completion window "
                                             "expired.",
                            "batch_cancelled": "This request was cancelled.",
                            "output_limit": "dpmock holds up to %d bytes of one batch's answers" % MAX_OUTPUT}[code]}})
                    continue
                code, answer, request_id = answer_inline(server, batch, path, body)
                line = json.dumps({"id": rid, "custom_id": custom, "response": {
                    "status_code": code, "request_id": request_id, "body": answer}, "error": None},
                    separators=(",", ":"), ensure_ascii=False)
                size += len(line)
                (ok if code < 400 else failed).append(line)
            output = _result_file(server, batch, "output", ok)
            error = _result_file(server, batch, "error", failed)
            batch.results = (output, error, {"total": batch.count, "completed": len(ok), "failed": len(failed)})
            batch.content = None  # the input is not needed again (its file holds it)
        return batch.results


def _result_file(server, batch, kind, lines):
    if not lines:
        return None
    data = "".join((line if isinstance(line, str) else json.dumps(line, separators=(",", ":"), ensure_ascii=False))
                   + "\n" for line in lines).encode("utf-8")
    from .files import _hasher
    digest = _hasher()
    digest.update(data)
    record = file_record("batch_%s_%s.jsonl" % (batch.id[6:], kind), "application/jsonl", len(data), digest.digest(),
                         purpose="batch_output", content=data, expires_at=time.time() + 30 * 24 * 3600)
    return openai_file(server.files.add(OPENAI, record))["id"]


def _batch(w, req):
    """The request's provider's batch the path names, made in the request's test; 404 otherwise."""
    check_key(req)
    batch_id = req.params["batch_id"]
    if req.provider == GEMINI and batch_id.startswith("batches/"):
        batch_id = batch_id[8:]
    batch = store(w.server).get(batch_id)
    if batch is None or batch.provider != req.provider or batch.test != req.test:
        if req.provider == GEMINI:
            raise HTTPError(404, "Batch batches/%s not found." % clip(batch_id), etype="NOT_FOUND")
        if req.provider == ANTHROPIC:
            raise HTTPError(404, "message_batch_id: no Message Batch %s" % clip(req.params["batch_id"]),
                            etype="not_found_error")
        raise HTTPError(404, "No batch found with id '%s'." % clip(req.params["batch_id"]), param="batch_id")
    return batch


def _openai_only(req):
    """GET /batches is OpenAI's and Gemini's; Anthropic's batches live under /v1/messages/batches."""
    if req.provider not in (OPENAI, GEMINI):
        raise HTTPError(404, "no route for %s %s: Anthropic's batches are /v1/messages/batches" % (
            req.method, req.path), etype="not_found_error")


def handle_batch_get(w, req):
    _openai_only(req)
    if req.provider == GEMINI:  # GET /v1beta/batches/{id}: Gemini's operation
        return handle_gemini_batch_get(w, req)
    batch = _batch(w, req)
    w.send_json(200, batch_object(w.server, batch, time.time()))


def handle_batch_cancel(w, req):
    batch = _batch(w, req)
    now = time.time()
    status, _ = batch.status(now)
    if status not in STEPS:
        raise HTTPError(409, "Cannot cancel a batch with status '%s'." % status, param="batch_id")
    with batch.lock:
        if batch.cancelled is None:
            batch.cancelled = now
    w.send_json(200, batch_object(w.server, batch, now))


def handle_batch_list(w, req):
    _openai_only(req)
    if req.provider == GEMINI:
        return handle_gemini_batch_list(w, req)
    check_key(req)
    limit = int_arg(req, "limit", 20, 1, 100)
    batches = [b for b in reversed(store(w.server).listing()) if b.test == req.test and b.provider == OPENAI]
    after = req.arg("after")
    if after is not None:
        ids = [b.id for b in batches]
        batches = batches[ids.index(after) + 1:] if after in ids else []
    page = batches[:limit]
    now = time.time()
    data = [batch_object(w.server, b, now) for b in page]
    w.send_json(200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None, "has_more": len(batches) > limit})


# ----------------------------------------------------------------------------- Anthropic's Message Batches

MAX_MESSAGE_REQUESTS = 100000  #: requests one Message Batch may hold (the real limit)
_CUSTOM_ID = r"[A-Za-z0-9_-]{1,64}\Z"
#: Anthropic's processing_status for each of the batch's own statuses.
_PROCESSING = {"validating": "in_progress", "in_progress": "in_progress", "finalizing": "in_progress",
               "cancelling": "canceling"}


def handle_message_batch_create(w, req):
    """POST /v1/messages/batches: ``requests`` of ``{custom_id, params}``, each params a messages body."""
    import re
    check_key(req)
    requests = req.json.get("requests")
    if not isinstance(requests, list) or not requests:
        raise invalid("requests: Field required (a list of at least one request)")
    if len(requests) > MAX_MESSAGE_REQUESTS:
        raise invalid("requests: at most %d requests in one batch, not %d" % (MAX_MESSAGE_REQUESTS, len(requests)))
    seen, items = set(), []
    for i, r in enumerate(requests):
        if not isinstance(r, dict) or not isinstance(r.get("params"), dict):
            raise invalid("requests.%d.params: Field required" % i)
        custom = r.get("custom_id")
        if not isinstance(custom, str) or not re.match(_CUSTOM_ID, custom):
            raise invalid("requests.%d.custom_id: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'" % i)
        if custom in seen:
            raise invalid("requests.%d.custom_id: Duplicate custom_id %r: each must be unique in a batch" % (i, custom))
        if r["params"].get("stream") is True:
            raise invalid("requests.%d.params.stream: a batch request cannot stream" % i)
        seen.add(custom)
        items.append((custom, r["params"]))
    step, outcome = w.fault[0].batch(w.fault[1]) if hasattr(w.fault[0], "batch") else (0.0, "completed")
    batch = Batch(req, items, len(items), [], step, outcome, prefix="msgbatch_01", size=req.body_bytes)
    store(w.server).add(batch)
    w.send_json(200, message_batch(w.server, req, batch, batch.created, fresh=True))


def message_batch(server, req, batch, now, fresh=False):
    """The MessageBatch object at ``now`` (its results made once it has ended); ``fresh``: as made."""
    status, stamps = ("validating", {}) if fresh else batch.status(now)
    out = {"id": batch.id, "type": "message_batch", "processing_status": _PROCESSING.get(status, "ended"),
           "request_counts": {"processing": batch.count, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
           "ended_at": None, "created_at": rfc3339(batch.created), "expires_at": rfc3339(batch.created + WINDOW),
           "archived_at": None, "cancel_initiated_at": rfc3339(batch.cancelled) if "cancelling_at" in stamps else None,
           "results_url": None}
    if out["processing_status"] == "ended":
        end = stamps.get("completed_at") or stamps.get("expired_at") or stamps.get("cancelled_at") or \
            stamps.get("failed_at") or now
        counts = message_results(server, batch, status)[1]
        out.update(ended_at=rfc3339(end), request_counts=counts,
                   results_url="%s/v1/messages/batches/%s/results" % (req.origin(), batch.id))
    return out


def message_results(server, batch, status):
    """(the results JSONL, request_counts) of an ended Message Batch, made once."""
    with batch.lock:
        if batch.results is None:
            lines, counts = [], {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            run = batch.count if status == "completed" else 0 if status == "failed" else batch.count // 2
            size = 0
            for i, (custom, params) in enumerate(batch.content):
                if i < run and size <= MAX_OUTPUT:
                    code, answer, _ = answer_inline(server, batch, "/v1/messages", params)
                    result = ({"type": "succeeded", "message": answer} if code < 400 else
                              {"type": "errored", "error": answer if isinstance(answer, dict) else
                               {"type": "error", "error": {"type": "api_error", "message": str(answer)}}})
                elif status == "failed" or i < run:
                    result = {"type": "errored", "error": {"type": "error", "error": {
                        "type": "api_error", "message": "Internal server error" if status == "failed" else
                        "dpmock holds up to %d bytes of one batch's results" % MAX_OUTPUT}}}
                else:
                    result = {"type": "expired" if status == "expired" else "canceled"}
                counts[{"succeeded": "succeeded", "errored": "errored", "expired": "expired",
                        "canceled": "canceled"}[result["type"]]] += 1
                line = json.dumps({"custom_id": custom, "result": result}, separators=(",", ":"), ensure_ascii=False)
                size += len(line)
                lines.append(line)
            batch.results = (("\n".join(lines) + "\n").encode("utf-8"), counts)
            batch.content = None  # the requests are not needed again
            store(server).grew(batch, len(batch.results[0]) - batch.size)
        return batch.results


def handle_message_batch_get(w, req):
    w.send_json(200, message_batch(w.server, req, _batch(w, req), time.time()))


def handle_message_batch_cancel(w, req):
    batch = _batch(w, req)
    now = time.time()
    status, _ = batch.status(now)
    with batch.lock:
        if status in STEPS and batch.cancelled is None:
            batch.cancelled = now
    w.send_json(200, message_batch(w.server, req, batch, now))


def handle_message_batch_delete(w, req):
    batch = _batch(w, req)
    if message_batch(w.server, req, batch, time.time())["processing_status"] != "ended":
        raise invalid("Batch %s cannot be deleted while it is still in progress: cancel it first" % batch.id)
    store(w.server).remove(batch.id)
    w.send_json(200, {"id": batch.id, "type": "message_batch_deleted"})


def handle_message_batch_results(w, req):
    batch = _batch(w, req)
    status, _ = batch.status(time.time())
    if _PROCESSING.get(status, "ended") != "ended":
        raise HTTPError(404, "Results for Message Batch %s are not available: it has not ended" % batch.id,
                        etype="not_found_error")
    w.send_bytes(200, message_results(w.server, batch, status)[0], "application/binary")


def handle_message_batch_list(w, req):
    """Newest first, ``limit`` (1-1000), ``after_id`` / ``before_id``, as Anthropic's list pages are."""
    check_key(req)
    batches = [b for b in reversed(store(w.server).listing()) if b.test == req.test and b.provider == ANTHROPIC]
    page, more = anthropic_page(req, batches, lambda b: b.id, "message batch")
    now = time.time()
    w.send_json(200, dict(page_body([message_batch(w.server, req, b, now) for b in page]), has_more=more))


# ----------------------------------------------------------------------------- Gemini's batch mode

_GEMINI_STATES = {"validating": "BATCH_STATE_PENDING", "in_progress": "BATCH_STATE_RUNNING",
                  "finalizing": "BATCH_STATE_RUNNING", "cancelling": "BATCH_STATE_RUNNING",
                  "completed": "BATCH_STATE_SUCCEEDED", "failed": "BATCH_STATE_FAILED",
                  "expired": "BATCH_STATE_EXPIRED", "cancelled": "BATCH_STATE_CANCELLED"}
_GEMINI_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch"


def handle_gemini_batch_create(w, req):
    """POST models/{model}:batchGenerateContent: ``batch.inputConfig.requests.requests`` of ``{request,
    metadata}``, each request a generateContent body."""
    check_key(req)
    model = req.params["model"]
    if "/" in model or ":" in model:
        raise invalid("* BatchGenerateContentRequest.model: unexpected model name format")
    check_model(req, model, "batchGenerateContent")
    batch = req.json.get("batch")
    config = batch.get("inputConfig", batch.get("input_config")) if isinstance(batch, dict) else None
    if not isinstance(config, dict):
        raise invalid("* BatchGenerateContentRequest.batch.input_config: input_config is required")
    name = config.get("fileName", config.get("file_name"))
    if name is not None and config.get("requests") is not None:
        raise invalid("* BatchGenerateContentRequest.batch.input_config: one of file_name and requests, not both")
    if name is not None:  # an uploaded JSONL file of {"key", "request"} lines
        items, count = gemini_file_requests(w, name)
    else:
        requests = (config.get("requests") or {}).get("requests") if isinstance(config.get("requests"),
                                                                                dict) else None
        if not isinstance(requests, list) or not requests:
            raise invalid("* BatchGenerateContentRequest.batch.input_config.requests.requests: at least one request "
                          "is required")
        items = []
        for i, r in enumerate(requests):
            if not isinstance(r, dict) or not isinstance(r.get("request"), dict):
                raise invalid("* BatchGenerateContentRequest.batch.input_config.requests.requests[%d].request: "
                              "request is required" % i)
            items.append((r.get("metadata"), dict(r["request"], model=None)))
        count = len(items)
    step, outcome = w.fault[0].batch(w.fault[1]) if hasattr(w.fault[0], "batch") else (0.0, "completed")
    job = Batch(req, items, count, [], step, outcome, prefix="", size=req.body_bytes)
    display = batch.get("displayName", batch.get("display_name"))
    if display is not None and not isinstance(display, str):
        raise invalid("* BatchGenerateContentRequest.batch.display_name: expected a string")
    job.model, job.display, job.to_file = model, display or job.id, name is not None
    store(w.server).add(job)
    w.send_json(200, gemini_operation(w.server, job, job.created))


def gemini_operation(server, job, now):
    """The batch as Gemini's long-running operation (its GenerateContentBatch in ``metadata``)."""
    status, stamps = job.status(now)
    state = _GEMINI_STATES[status]
    done = state not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
    meta = {"@type": _GEMINI_TYPE, "model": "models/" + job.model, "displayName": job.display,
            "createTime": rfc3339(job.created), "updateTime": rfc3339(min(now, job.created + 3 * job.step)),
            "batchStats": {"requestCount": str(job.count), "pendingRequestCount": str(0 if done else job.count)},
            "state": state, "name": "batches/" + job.id}
    op = {"name": "batches/" + job.id, "metadata": meta}
    if done:
        responses, ok = gemini_results(server, job, status)
        meta["endTime"] = meta["updateTime"]
        meta["batchStats"].update(successfulRequestCount=str(ok), failedRequestCount=str(job.count - ok))
        meta["output"] = {"responsesFile": responses} if isinstance(responses, str) else {
            "inlinedResponses": {"inlinedResponses": responses}}
        op.update(done=True, response=dict(meta["output"], **{"@type": _GEMINI_TYPE + "Output"}))
    return op


def gemini_results(server, job, status):
    """([inlined response], successes) of an ended batch, made once: each request answered as a direct
    generateContent call would be."""
    with job.lock:
        if job.results is None:
            out, ok, size = [], 0, 0
            run = job.count if status == "completed" else 0 if status == "failed" else job.count // 2
            for i, (metadata, request) in enumerate(job.content):
                item = {} if metadata is None else {"metadata": metadata}
                if i < run and size <= MAX_OUTPUT:
                    request = {k: v for k, v in request.items() if k != "model"}
                    code, answer, _ = answer_inline(server, job, "/v1beta/models/%s:generateContent" % job.model,
                                                    request)
                    if code < 400:
                        item["response"] = answer
                        ok += 1
                    else:
                        item["error"] = answer.get("error") if isinstance(answer, dict) else {
                            "code": code, "message": str(answer), "status": "INTERNAL"}
                    size += len(encode_body(item, compact=True))
                elif i < run:
                    item["error"] = {"code": 8, "message": "dpmock holds up to %d bytes of one batch's answers"
                                     % MAX_OUTPUT, "status": "RESOURCE_EXHAUSTED"}
                else:
                    item["error"] = {"code": 1, "message": "The batch ended (%s) before this request ran." % status,
                                     "status": "CANCELLED"}
                if "error" in item:
                    size += len(encode_body(item, compact=True))
                out.append(item)
            if job.to_file:  # read from a file: answered into one, {"key", "response" or "error"} per line
                data = "".join(json.dumps(dict((("key", i["metadata"]["key"]),) if "metadata" in i else (), **{
                    k: v for k, v in i.items() if k != "metadata"}), separators=(",", ":"), ensure_ascii=False) + "\n"
                    for i in out).encode("utf-8")
                from .files import _hasher
                digest = _hasher()
                digest.update(data)
                record = server.files.add(GEMINI, file_record("batch-%s-responses.jsonl" % job.id, "application/jsonl",
                                                              len(data), digest.digest(), content=data,
                                                              generated=True))
                out, size = "files/" + record["id"], 0
            job.results = (out, ok)
            job.content = None
            store(server).grew(job, size - job.size)
        return job.results


def handle_gemini_batch_get(w, req):
    w.send_json(200, gemini_operation(w.server, _batch(w, req), time.time()))


def handle_gemini_batch_cancel(w, req):
    job = _batch(w, req)
    now = time.time()
    with job.lock:
        if job.status(now)[0] in STEPS and job.cancelled is None:
            job.cancelled = now
    w.send_json(200, {})


def handle_gemini_batch_delete(w, req):
    job = _batch(w, req)
    store(w.server).remove(job.id)
    w.send_json(200, {})


def handle_gemini_batch_list(w, req):
    check_key(req)
    size = int_arg(req, "pageSize", 50, 1, 1000)
    jobs = [b for b in reversed(store(w.server).listing()) if b.test == req.test and b.provider == GEMINI]
    token = req.arg("pageToken") or "0"
    start = bounded_int(token, 0, 2 ** 62)
    if start is None:
        raise invalid("Invalid page token %r." % clip(token), "pageToken")
    now = time.time()
    answer = {"operations": [gemini_operation(w.server, b, now) for b in jobs[start:start + size]]}
    if start + size < len(jobs):
        answer["nextPageToken"] = str(start + size)
    w.send_json(200, answer)


def gemini_file_requests(w, name):
    """The (metadata, request) pairs of an uploaded JSONL file (each line ``{"key", "request"}``), checked
    whole now and read again, lazily, when the batch runs (the file's bytes are shared, not copied)."""
    from .files import file_key
    if not isinstance(name, str) or not name:
        raise invalid("* BatchGenerateContentRequest.batch.input_config.file_name: a file name is required")
    record = w.server.files.get(GEMINI, file_key(GEMINI, name))
    if record is None:
        raise HTTPError(404, "File %s does not exist." % clip(name), etype="NOT_FOUND")
    if record.get("content") is None:
        raise invalid("* BatchGenerateContentRequest.batch.input_config.file_name: %s is not a JSONL file dpmock "
                      "kept (upload it by the resumable or multipart protocol with mime type jsonl, up to 32 MiB)"
                      % clip(name))
    requests = FileRequests(record["content"], name)
    count = sum(1 for _ in requests)
    if not count:
        raise invalid("* %s holds no requests" % clip(name))
    if count > MAX_REQUESTS:
        raise invalid("* %s holds %d requests; a batch takes at most %d" % (clip(name), count, MAX_REQUESTS))
    return requests, count


class FileRequests:
    """The requests of a JSONL file's bytes, read line by line each time they are iterated."""

    def __init__(self, data, name):
        self.data, self.name = data, name

    def __iter__(self):
        from .dispatch import parse_json_body
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise invalid("* %s is not UTF-8 text (byte %d)" % (clip(self.name), e.start))
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                item = parse_json_body(line.encode("utf-8"))
            except HTTPError as e:
                raise invalid("* %s line %d: %s" % (clip(self.name), n, e.message))
            if not isinstance(item.get("request"), dict):
                raise invalid("* %s line %d: request is required" % (clip(self.name), n))
            yield ({"key": item["key"]} if "key" in item else None, dict(item["request"], model=None))


def handle_gemini_file_download(w, req):
    """GET /download/v1beta/files/{id}:download?alt=media: a generated file's bytes (a batch's responses)."""
    from .files import file_key
    if req.provider != GEMINI:  # a shared path: only Gemini's files have a :download
        raise HTTPError(404, "no route for %s %s" % (req.method, req.path), "not_found", etype="not_found_error"
                        if req.provider == ANTHROPIC else None)
    check_key(req)
    record = w.server.files.get(GEMINI, file_key(GEMINI, req.params["file_id"]))
    if record is None:
        raise HTTPError(404, "File files/%s does not exist." % clip(req.params["file_id"]), etype="NOT_FOUND")
    if not record.get("generated"):
        raise invalid("Only generated files can be downloaded; uploaded files cannot.")
    w.send_bytes(200, record["content"], record.get("mime") or "application/octet-stream")
